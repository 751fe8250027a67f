//! Where the ledger's Redis primary is, and how a failover is noticed.
//!
//! With `url`, the primary is that address; the connection manager reconnects to it after a
//! failure (a managed Redis that fails over behind one name). With `sentinels`, the sentinels
//! are asked which address is the primary of `sentinel_master`; the connection is dropped and
//! the question asked again when a call fails for a reason a failover explains (refused,
//! dropped, timed out, `READONLY` from a demoted primary), and every [`PROBE_EVERY`] anyway, so
//! a primary that was replaced while this replica was idle is noticed too.
//!
//! Either way the probe also reads the primary's `run_id`: a different one means another
//! server (a promoted replica, or a restart) now answers, whose data may lack the newest
//! writes, so the store replays them ([`super::store`]).

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, RedisError, RedisResult};

use crate::config::Sentinel;

/// How often the primary is probed (and, with sentinels, its address asked).
pub const PROBE_EVERY: Duration = Duration::from_millis(500);

/// How the primary is reached.
pub enum Target {
    Direct(redis::Client),
    Sentinels(Sentinels),
}

impl Target {
    /// The primary's client now, and its address when sentinels gave it.
    pub async fn primary(&self, timeout: Duration) -> RedisResult<(redis::Client, Option<String>)> {
        match self {
            Self::Direct(client) => Ok((client.clone(), None)),
            Self::Sentinels(sentinels) => {
                let address = sentinels.primary_address(timeout).await?;
                Ok((sentinels.client_for(&address)?, Some(address)))
            }
        }
    }

    pub fn follows_sentinels(&self) -> bool {
        matches!(self, Self::Sentinels(_))
    }

    /// With sentinels, where the primary is now (`None` without them).
    pub async fn primary_address(&self, timeout: Duration) -> RedisResult<Option<String>> {
        match self {
            Self::Direct(_) => Ok(None),
            Self::Sentinels(sentinels) => sentinels.primary_address(timeout).await.map(Some),
        }
    }
}

pub struct Sentinels {
    clients: Vec<redis::Client>,
    master: String,
    /// Password and protocol for the primary the sentinels name.
    primary_settings: RedisConnectionInfo,
}

impl Sentinels {
    pub fn new(sentinel: &Sentinel, primary_settings: RedisConnectionInfo) -> RedisResult<Self> {
        let mut clients = Vec::with_capacity(sentinel.addresses.len());
        for address in &sentinel.addresses {
            let mut info = tcp(address)?;
            if let Some(password) = &sentinel.password {
                info = info.clone().set_redis_settings(info.redis_settings().clone().set_password(password.expose()));
            }
            clients.push(redis::Client::open(info)?);
        }
        Ok(Self { clients, master: sentinel.master.clone(), primary_settings })
    }

    /// Asks each sentinel in turn; the first that names a primary answers.
    async fn primary_address(&self, timeout: Duration) -> RedisResult<String> {
        let config =
            AsyncConnectionConfig::new().set_connection_timeout(Some(timeout)).set_response_timeout(Some(timeout));
        let mut last_error = None;
        for client in &self.clients {
            let ask = async {
                let mut connection: MultiplexedConnection =
                    client.get_multiplexed_async_connection_with_config(&config).await?;
                let mut command = redis::cmd("SENTINEL");
                command.arg("get-master-addr-by-name").arg(&self.master);
                command.query_async::<Option<(String, u16)>>(&mut connection).await
            };
            match ask.await {
                Ok(Some((host, port))) => return Ok(join(&host, port)),
                Ok(None) => {
                    last_error = Some(RedisError::from((
                        redis::ErrorKind::MasterNameNotFoundBySentinel,
                        "a sentinel does not know the master",
                        self.master.clone(),
                    )));
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error
            .unwrap_or_else(|| RedisError::from((redis::ErrorKind::EmptySentinelList, "no sentinel configured"))))
    }

    fn client_for(&self, address: &str) -> RedisResult<redis::Client> {
        redis::Client::open(tcp(address)?.set_redis_settings(self.primary_settings.clone()))
    }
}

/// `host:port` (IPv6 hosts in brackets) as a plain-TCP connection target.
fn tcp(address: &str) -> RedisResult<redis::ConnectionInfo> {
    let bad = || RedisError::from((redis::ErrorKind::InvalidClientConfig, "not a host:port address"));
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let port = port.parse::<u16>().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ConnectionAddr::Tcp(host.to_owned(), port).into_connection_info()
}

fn join(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Whether `error` is what a lost or replaced primary answers: worth asking the sentinels
/// again rather than retrying the same server.
pub fn primary_lost(error: &RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || matches!(
            error.kind(),
            ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown | ServerErrorKind::BusyLoading)
        )
}

/// `ROLE`'s first element: `master` on a primary.
pub fn is_primary(role: &[redis::Value]) -> bool {
    match role.first() {
        Some(redis::Value::BulkString(bytes)) => bytes == b"master",
        Some(redis::Value::SimpleString(text)) => text == "master",
        _ => false,
    }
}

/// The `run_id` line of `INFO server`.
pub fn run_id(info: &str) -> Option<&str> {
    info.lines().find_map(|line| line.strip_prefix("run_id:")).map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_with_ipv6_in_brackets() {
        assert_eq!(join("10.0.0.7", 6379), "10.0.0.7:6379");
        assert_eq!(join("::1", 6380), "[::1]:6380");
        assert!(tcp("[::1]:6380").is_ok());
        assert!(tcp("localhost").is_err());
        assert!(tcp("localhost:port").is_err());
    }

    #[test]
    fn the_run_id_is_read_from_info() {
        let info = "# Server\r\nredis_version:7.0.15\r\nrun_id:4f1c0ffee\r\ntcp_port:6379\r\n";
        assert_eq!(run_id(info), Some("4f1c0ffee"));
        assert_eq!(run_id("# Server\r\n"), None);
    }

    #[test]
    fn a_primary_says_master_first() {
        assert!(is_primary(&[redis::Value::BulkString(b"master".to_vec()), redis::Value::Int(0)]));
        assert!(!is_primary(&[redis::Value::BulkString(b"slave".to_vec())]));
        assert!(!is_primary(&[]));
    }

    #[test]
    fn only_a_lost_primary_sends_the_gateway_back_to_the_sentinels() {
        let refused = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(primary_lost(&refused));
        let script = RedisError::from((redis::ErrorKind::Client, "duplicate reservation id"));
        assert!(!primary_lost(&script));
    }
}
