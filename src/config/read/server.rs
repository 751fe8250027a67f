//! `[server]` and `[ledger]`.

use std::net::SocketAddr;
use std::time::Duration;

use super::{positive, secret};
use crate::config::document::{Fields, Problems};
use crate::config::{Env, Ledger, LedgerStore, OnLedgerError, RedisStore, Sentinel, Server};
use crate::secret::Secret;

const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
const DEFAULT_MAX_BODY_BYTES: u64 = 4 * 1024 * 1024;
const DEFAULT_SHUTDOWN_GRACE_S: u64 = 30;
const DEFAULT_QUEUE_TIMEOUT_MS: u64 = 5_000;
const DEFAULT_MAX_CONNECTIONS: u64 = 4096;
const DEFAULT_HEADER_READ_TIMEOUT_S: u64 = 10;
const DEFAULT_BODY_READ_TIMEOUT_S: u64 = 30;
const DEFAULT_MAX_HEADER_BYTES: u64 = 8192;
const DEFAULT_MAX_QUEUE: u32 = 256;
const DEFAULT_RETENTION_DAYS: u64 = 30;
const DEFAULT_REDIS_KEY_PREFIX: &str = "tollgate:";
/// A Redis round trip is well under a millisecond on a LAN; past this, something is wrong and
/// the failure policy decides rather than the client waiting.
const DEFAULT_REDIS_TIMEOUT_MS: u64 = 500;
const DEFAULT_REDIS_CONNECT_TIMEOUT_MS: u64 = 1_000;
/// Longer than any replication lag a healthy replica shows (milliseconds), short enough that
/// the settlements kept for it cost little memory (a few MB at thousands of requests/s).
const DEFAULT_REDIS_REPLAY_WINDOW_S: u64 = 10;

pub(super) fn default_ledger() -> Ledger {
    Ledger {
        store: LedgerStore::Memory,
        on_ledger_error: OnLedgerError::FailClosed,
        retention: Duration::from_secs(DEFAULT_RETENTION_DAYS * 86_400),
    }
}

pub(super) fn default_server() -> Server {
    Server {
        listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
        max_body_bytes: DEFAULT_MAX_BODY_BYTES as usize,
        admin_key: None,
        shutdown_grace: Duration::from_secs(DEFAULT_SHUTDOWN_GRACE_S),
        queue_timeout: Duration::from_millis(DEFAULT_QUEUE_TIMEOUT_MS),
        max_queue: DEFAULT_MAX_QUEUE,
        max_connections: DEFAULT_MAX_CONNECTIONS as usize,
        header_read_timeout: Duration::from_secs(DEFAULT_HEADER_READ_TIMEOUT_S),
        body_read_timeout: Duration::from_secs(DEFAULT_BODY_READ_TIMEOUT_S),
        max_header_bytes: DEFAULT_MAX_HEADER_BYTES as usize,
        metrics_key: None,
        max_cached_keys: crate::tenancy::cache::DEFAULT_MAX_PRINCIPALS,
    }
}

pub(super) fn server(f: &mut Fields<'_>, p: &mut Problems<'_>, env: &dyn Env) -> Server {
    let listen_text = f.optional::<String>(p, "listen").unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
    let listen = listen_text.parse().unwrap_or_else(|_| {
        let message = format!("`{listen_text}` is not an address like 127.0.0.1:8080");
        p.at_line(f.line_of(p, "listen"), &f.path_of("listen"), message);
        default_server().listen
    });
    let max_body_bytes = positive(f, p, "max_body_bytes").unwrap_or(DEFAULT_MAX_BODY_BYTES);
    let admin_key = secret(f, p, env, "admin_key_env");
    let grace = f.optional::<u64>(p, "shutdown_grace_s").unwrap_or(DEFAULT_SHUTDOWN_GRACE_S);
    let queue_timeout_ms = f.optional::<u64>(p, "queue_timeout_ms").unwrap_or(DEFAULT_QUEUE_TIMEOUT_MS);
    let max_queue = f.optional::<u32>(p, "max_queue").unwrap_or(DEFAULT_MAX_QUEUE);
    let max_connections = positive(f, p, "max_connections").unwrap_or(DEFAULT_MAX_CONNECTIONS);
    let header_read_timeout_s = positive(f, p, "header_read_timeout_s").unwrap_or(DEFAULT_HEADER_READ_TIMEOUT_S);
    let body_read_timeout_s = positive(f, p, "body_read_timeout_s").unwrap_or(DEFAULT_BODY_READ_TIMEOUT_S);
    let max_header_bytes = positive(f, p, "max_header_bytes").unwrap_or(DEFAULT_MAX_HEADER_BYTES);
    let metrics_key = secret(f, p, env, "metrics_key_env");
    let max_cached_keys = positive(f, p, "max_cached_keys")
        .map_or(crate::tenancy::cache::DEFAULT_MAX_PRINCIPALS, |n| usize::try_from(n).unwrap_or(usize::MAX));
    f.finish(p);
    Server {
        listen,
        max_body_bytes: usize::try_from(max_body_bytes).unwrap_or(usize::MAX),
        admin_key,
        shutdown_grace: Duration::from_secs(grace),
        queue_timeout: Duration::from_millis(queue_timeout_ms),
        max_queue,
        max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
        header_read_timeout: Duration::from_secs(header_read_timeout_s),
        body_read_timeout: Duration::from_secs(body_read_timeout_s),
        max_header_bytes: usize::try_from(max_header_bytes).unwrap_or(usize::MAX),
        metrics_key,
        max_cached_keys,
    }
}

/// The `[ledger]` table, and the line of `reservation_ttl_s` (checked against the backends).
pub(super) fn ledger(f: &mut Fields<'_>, p: &mut Problems<'_>, env: &dyn Env) -> (Ledger, usize) {
    let kind = f.optional::<String>(p, "backend").unwrap_or_else(|| "memory".to_owned());
    let path = f.optional::<String>(p, "path");
    let url = f.optional::<String>(p, "url");
    let redis = redis_settings(f, p, env);
    let store = match kind.as_str() {
        "memory" => LedgerStore::Memory,
        "sqlite" => LedgerStore::Sqlite { path: path.unwrap_or_else(|| "data/tollgate.db".to_owned()) },
        "redis" => match url {
            _ if redis.sentinel.is_some() && !redis.cluster.is_empty() => {
                let message = "set either `sentinels` or `cluster`: a Redis Cluster fails over by itself";
                p.at_line(f.line_of(p, "cluster"), &f.path_of("cluster"), message);
                LedgerStore::Memory
            }
            Some(_) if !redis.cluster.is_empty() => {
                let message = "set either `url` or `cluster`: the cluster's nodes are found from `cluster`";
                p.at_line(f.line_of(p, "url"), &f.path_of("url"), message);
                LedgerStore::Memory
            }
            None if !redis.cluster.is_empty() => LedgerStore::Redis(Box::new(redis)),
            Some(_) if redis.sentinel.is_some() => {
                let message = "set either `url` or `sentinels`: with sentinels the primary is found through them";
                p.at_line(f.line_of(p, "url"), &f.path_of("url"), message);
                LedgerStore::Memory
            }
            None if redis.sentinel.is_some() => LedgerStore::Redis(Box::new(redis)),
            Some(url) if redis_url_ok(&url) => {
                LedgerStore::Redis(Box::new(RedisStore { url: Secret::new(url), ..redis }))
            }
            Some(_) => {
                // The URL may hold a password: the message never repeats it.
                let message = "not a valid `redis://[:password@]host:port[/db]` or `rediss://` URL";
                p.at_line(f.line_of(p, "url"), &f.path_of("url"), message);
                LedgerStore::Memory
            }
            None => {
                let message =
                    "redis needs `url = \"redis://host:port\"` (or `sentinels` and `sentinel_master`, or `cluster`)";
                p.at_line(f.line_of(p, "url"), &f.path_of("url"), message);
                LedgerStore::Memory
            }
        },
        other => {
            let message = format!("`{other}` is not one of \"memory\", \"sqlite\", \"redis\"");
            p.at_line(f.line_of(p, "backend"), &f.path_of("backend"), message);
            LedgerStore::Memory
        }
    };
    let on_ledger_error = match f.optional::<String>(p, "on_ledger_error").as_deref() {
        None | Some("fail-closed") => OnLedgerError::FailClosed,
        Some("fail-open") => OnLedgerError::FailOpen,
        Some(other) => {
            let message = format!("`{other}` is not one of \"fail-closed\", \"fail-open\"");
            p.at_line(f.line_of(p, "on_ledger_error"), &f.path_of("on_ledger_error"), message);
            OnLedgerError::FailClosed
        }
    };
    let retention_days = positive(f, p, "retention_days").unwrap_or(DEFAULT_RETENTION_DAYS);
    let ttl_line = f.line_of(p, "reservation_ttl_s");
    f.finish(p);
    let retention = Duration::from_secs(retention_days.saturating_mul(86_400));
    (Ledger { store, on_ledger_error, retention }, ttl_line)
}

/// The Redis keys other than `url` (read whatever the backend, so none is an unknown key).
fn redis_settings(f: &mut Fields<'_>, p: &mut Problems<'_>, env: &dyn Env) -> RedisStore {
    let key_prefix = f.optional::<String>(p, "key_prefix").unwrap_or_else(|| DEFAULT_REDIS_KEY_PREFIX.to_owned());
    let ok = key_prefix.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/'));
    if key_prefix.is_empty() || !ok {
        let message = "must be non-empty and hold only letters, digits, `-`, `_`, `.`, `:` and `/`";
        p.at_line(f.line_of(p, "key_prefix"), &f.path_of("key_prefix"), message);
    }
    let timeout_ms = positive(f, p, "timeout_ms").unwrap_or(DEFAULT_REDIS_TIMEOUT_MS);
    let connect_ms = positive(f, p, "connect_timeout_ms").unwrap_or(DEFAULT_REDIS_CONNECT_TIMEOUT_MS);
    let reservation_ttl = positive(f, p, "reservation_ttl_s").map(Duration::from_secs);
    let password = secret(f, p, env, "password_env");
    let replay_window_s = f.optional::<u64>(p, "replay_window_s").unwrap_or(DEFAULT_REDIS_REPLAY_WINDOW_S);
    let sentinel = sentinel_settings(f, p, env);
    let cluster = f.optional::<Vec<String>>(p, "cluster").unwrap_or_default();
    if let Some(bad) = cluster.iter().find(|a| !host_port_ok(a)) {
        let message = format!("`{bad}` is not a `host:port` address");
        p.at_line(f.line_of(p, "cluster"), &f.path_of("cluster"), message);
    }
    RedisStore {
        url: Secret::new(String::new()),
        sentinel,
        cluster,
        replay_window: Duration::from_secs(replay_window_s),
        password,
        key_prefix,
        timeout: Duration::from_millis(timeout_ms),
        connect_timeout: Duration::from_millis(connect_ms),
        reservation_ttl,
    }
}

/// `sentinels` and `sentinel_master`, both or neither.
fn sentinel_settings(f: &mut Fields<'_>, p: &mut Problems<'_>, env: &dyn Env) -> Option<Sentinel> {
    let addresses = f.optional::<Vec<String>>(p, "sentinels");
    let master = f.optional::<String>(p, "sentinel_master");
    let password = secret(f, p, env, "sentinel_password_env");
    match (addresses, master) {
        (None, None) => None,
        (Some(addresses), Some(master)) => {
            let bad = addresses.iter().find(|a| !host_port_ok(a));
            if let Some(bad) = bad {
                let message = format!("`{bad}` is not a `host:port` address");
                p.at_line(f.line_of(p, "sentinels"), &f.path_of("sentinels"), message);
            } else if addresses.is_empty() {
                p.at_line(f.line_of(p, "sentinels"), &f.path_of("sentinels"), "needs at least one `host:port`");
            }
            if master.is_empty() {
                p.at_line(f.line_of(p, "sentinel_master"), &f.path_of("sentinel_master"), "must not be empty");
            }
            Some(Sentinel { addresses, master, password })
        }
        (Some(_), None) => {
            let message = "sentinels need `sentinel_master`: the name the sentinels monitor";
            p.at_line(f.line_of(p, "sentinels"), &f.path_of("sentinels"), message);
            None
        }
        (None, Some(_)) => {
            let message = "`sentinel_master` needs `sentinels = [\"host:port\", ...]`";
            p.at_line(f.line_of(p, "sentinel_master"), &f.path_of("sentinel_master"), message);
            None
        }
    }
}

fn host_port_ok(address: &str) -> bool {
    address.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0))
}

fn redis_url_ok(url: &str) -> bool {
    use redis::IntoConnectionInfo;
    (url.starts_with("redis://") || url.starts_with("rediss://")) && url.into_connection_info().is_ok()
}
