//! Where answers are kept: in this process (a bounded moka cache: TinyLFU admission, LRU
//! eviction, weighed in bytes, with the TTL), or in the ledger's Redis, shared by replicas
//! (`SET .. PX ttl`; Redis's own `maxmemory` policy bounds it). Redis failing is a miss, never
//! an error: the request goes to a backend as if nothing were cached.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prometheus::IntGauge;
use serde::{Deserialize, Serialize};

use super::{CacheKey, Cached};
use crate::config::Backend;
use crate::cost::Usd;
use crate::ledger::redis::{Op, Store as RedisLedger};
use crate::request::Endpoint;

/// Bytes an entry costs beyond its answer (its key, the store's bookkeeping), so that many
/// small answers cannot overrun `max_bytes`.
const ENTRY_OVERHEAD_BYTES: usize = 256;

pub enum Store {
    Memory { entries: moka::sync::Cache<CacheKey, Arc<Cached>>, bytes: IntGauge },
    Redis { ledger: Arc<RedisLedger>, ttl: Duration },
}

/// What Redis keeps before the answer's bytes (one JSON line): the answer's producer by name,
/// read back against the configuration in force.
#[derive(Serialize, Deserialize)]
struct Header {
    endpoint: String,
    backend: String,
    prompt_tokens: u64,
    completion_tokens: u64,
    cost_pico: i64,
}

impl Store {
    pub fn memory(max_bytes: u64, ttl: Duration, bytes: IntGauge) -> Self {
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .time_to_live(ttl)
            .weigher(|_key: &CacheKey, cached: &Arc<Cached>| {
                u32::try_from(cached.body.len() + ENTRY_OVERHEAD_BYTES).unwrap_or(u32::MAX)
            })
            .build();
        Self::Memory { entries, bytes }
    }

    fn redis_key(ledger: &RedisLedger, key: &CacheKey) -> String {
        let mut name = format!("{}cache:", ledger.keys.prefix());
        for byte in key.0 {
            name.push_str(&format!("{byte:02x}"));
        }
        name
    }

    /// The entry under `key`; `backends`: the configuration's, to resolve a shared entry's
    /// producer (one no longer configured is not served).
    pub async fn get(&self, key: &CacheKey, backends: &[Arc<Backend>]) -> Result<Option<Arc<Cached>>, String> {
        match self {
            Self::Memory { entries, .. } => Ok(entries.get(key)),
            Self::Redis { ledger, .. } => {
                let mut command = redis::cmd("GET");
                command.arg(Self::redis_key(ledger, key));
                let stored: Option<Vec<u8>> = ledger.command(Op::Cache, command).await.map_err(|e| e.to_string())?;
                Ok(stored.and_then(|bytes: Vec<u8>| decode(&bytes, backends)).map(Arc::new))
            }
        }
    }

    /// Stores `cached` under `key`; Redis's write goes on its own task, which releases
    /// `flight` once Redis answered.
    pub fn put(&self, key: CacheKey, cached: Cached, flight: Option<super::FlightGuard>) {
        match self {
            Self::Memory { entries, bytes } => {
                // A better backend's answer is not replaced by a worse one's.
                if entries.get(&key).is_some_and(|old| old.backend.quality > cached.backend.quality) {
                    return;
                }
                entries.insert(key, Arc::new(cached));
                // The store counts its weight as it applies its pending work (evictions too).
                entries.run_pending_tasks();
                bytes.set(i64::try_from(entries.weighted_size()).unwrap_or(i64::MAX));
                drop(flight);
            }
            Self::Redis { ledger, ttl } => {
                let mut command = redis::cmd("SET");
                command
                    .arg(Self::redis_key(ledger, &key))
                    .arg(encode(&cached))
                    .arg("PX")
                    .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
                let ledger = Arc::clone(ledger);
                ledger.runtime.clone().spawn(async move {
                    if let Err(e) = ledger.command::<()>(Op::Cache, command).await {
                        tracing::debug!(error = %e, "a cache entry was not stored in redis");
                    }
                    drop(flight);
                });
            }
        }
    }
}

fn encode(cached: &Cached) -> Vec<u8> {
    let header = Header {
        endpoint: cached.endpoint.label().to_owned(),
        backend: cached.backend.name.clone(),
        prompt_tokens: cached.prompt_tokens,
        completion_tokens: cached.completion_tokens,
        cost_pico: cached.cost.pico(),
    };
    let mut bytes = serde_json::to_vec(&header).unwrap_or_default();
    bytes.push(b'\n');
    bytes.extend_from_slice(&cached.body);
    bytes
}

fn decode(bytes: &[u8], backends: &[Arc<Backend>]) -> Option<Cached> {
    let split = bytes.iter().position(|&b| b == b'\n')?;
    let header: Header = serde_json::from_slice(&bytes[..split]).ok()?;
    let endpoint = Endpoint::ALL.into_iter().find(|e| e.label() == header.endpoint)?;
    let backend = backends.iter().find(|b| b.name == header.backend)?;
    Some(Cached {
        endpoint,
        body: Bytes::copy_from_slice(&bytes[split + 1..]),
        backend: Arc::clone(backend),
        prompt_tokens: header.prompt_tokens,
        completion_tokens: header.completion_tokens,
        cost: Usd::from_pico(header.cost_pico),
    })
}
