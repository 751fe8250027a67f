//! Where the ledger's Redis primary is, and how a failover is noticed.
//!
//! With `cluster`, there is one primary per range of hash slots; the cluster client follows
//! the slots (`MOVED`, `ASK`, a replica promoted) by itself, and a failover is noticed as a
//! change in which nodes own slots (`CLUSTER NODES`).
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
    Cluster(Box<redis::cluster::ClusterClient>),
}

/// A connection to the primary, or to a cluster's primaries.
#[derive(Clone)]
pub enum Connection {
    Single(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

impl Target {
    /// The primary's client now, and its address when sentinels gave it (not for a cluster).
    pub async fn primary(&self, timeout: Duration) -> RedisResult<(redis::Client, Option<String>)> {
        match self {
            Self::Direct(client) => Ok((client.clone(), None)),
            Self::Sentinels(sentinels) => {
                let address = sentinels.primary_address(timeout).await?;
                Ok((sentinels.client_for(&address)?, Some(address)))
            }
            Self::Cluster(_) => {
                Err(RedisError::from((redis::ErrorKind::InvalidClientConfig, "a cluster has no one primary")))
            }
        }
    }

    pub fn follows_sentinels(&self) -> bool {
        matches!(self, Self::Sentinels(_))
    }

    /// With sentinels, where the primary is now (`None` without them).
    pub async fn primary_address(&self, timeout: Duration) -> RedisResult<Option<String>> {
        match self {
            Self::Direct(_) | Self::Cluster(_) => Ok(None),
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

/// Which nodes own hash slots, from `CLUSTER NODES`: their ids, sorted. It changes when a
/// replica takes over a failed primary's slots (not when a node fails, nor when one rejoins
/// as a replica).
pub fn slot_owners(nodes: &str) -> String {
    let mut owners: Vec<&str> = nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let owns_slots = fields.len() > 8 && fields[2].split(',').any(|flag| flag == "master");
            owns_slots.then_some(fields[0])
        })
        .collect();
    owners.sort_unstable();
    owners.join(",")
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
    fn slot_owners_change_when_a_replica_takes_over_not_when_a_node_fails() {
        let before = "a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460\n\
                      b2 127.0.0.1:7001@17001 master - 0 0 2 connected 5461-10922\n\
                      c3 127.0.0.1:7003@17003 slave a1 0 0 1 connected\n";
        let failed = before.replace("myself,master", "myself,master,fail");
        let promoted = "a1 127.0.0.1:7000@17000 master,fail - 0 0 1 disconnected\n\
                        b2 127.0.0.1:7001@17001 master - 0 0 2 connected 5461-10922\n\
                        c3 127.0.0.1:7003@17003 myself,master - 0 0 3 connected 0-5460\n";
        assert_eq!(slot_owners(before), "a1,b2");
        assert_eq!(slot_owners(&failed), slot_owners(before), "a failed primary still owns its slots");
        assert_eq!(slot_owners(promoted), "b2,c3");
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
