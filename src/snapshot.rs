//! One loaded configuration with everything derived from it at load time: the key table, the
//! model index and a client per backend. Each request reads exactly one snapshot.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Notify;

use crate::auth::KeyTable;
use crate::config::Config;
use crate::tenancy::Principal;
use crate::upstream::{BackendState, Upstream, UpstreamError};

/// What a requested `model` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelTarget {
    /// A route alias: index into `config.routes`.
    Route(usize),
    /// A pinned backend (by its name or its upstream model): index into `config.backends`.
    Backend(usize),
}

#[derive(Debug)]
pub struct Snapshot {
    pub config: Config,
    pub keys: KeyTable,
    /// One per backend, in `config.backends` order.
    pub upstreams: Vec<Upstream>,
    models: HashMap<String, ModelTarget>,
    /// `GET /v1/models` ids, in a stable order: routes, then backends.
    pub model_ids: Vec<String>,
    /// SHA-256 of the admin key and of the metrics key, hashed once here: presented keys are
    /// hashed and compared with these (see `auth`).
    pub admin_key_sha256: Option<[u8; 32]>,
    pub metrics_key_sha256: Option<[u8; 32]>,
    /// Route aliases as request records carry them, by route index: shared, not copied per
    /// request.
    route_names: Box<[Arc<str>]>,
}

/// What each model name a client may ask for resolves to, and the names in a stable order.
/// Precedence when names collide: route alias, then backend name, then upstream model (the
/// first backend serving it). Config validation forbids route/backend name clashes.
pub fn model_index(config: &Config) -> (HashMap<String, ModelTarget>, Vec<String>) {
    let mut models = HashMap::new();
    let mut model_ids = Vec::new();
    for (i, route) in config.routes.iter().enumerate() {
        models.insert(route.model.clone(), ModelTarget::Route(i));
        model_ids.push(route.model.clone());
    }
    for (i, backend) in config.backends.iter().enumerate() {
        for id in [&backend.name, &backend.model] {
            if !models.contains_key(id) {
                models.insert(id.clone(), ModelTarget::Backend(i));
                model_ids.push(id.clone());
            }
        }
    }
    (models, model_ids)
}

impl Snapshot {
    /// Builds the runtime for `config`. Backends that `previous` already had keep their state
    /// (in-flight count, health, occupancy clock) under the same name, at the new price.
    pub fn new(config: Config, previous: Option<&Snapshot>, freed: &Arc<Notify>) -> Result<Self, UpstreamError> {
        let mut upstreams = Vec::with_capacity(config.backends.len());
        for backend in &config.backends {
            let state = match previous.and_then(|p| p.upstreams.iter().find(|u| u.backend.name == backend.name)) {
                Some(old) => {
                    old.state.reprice(&backend.pricing);
                    Arc::clone(&old.state)
                }
                None => BackendState::new(&backend.pricing, Arc::clone(freed)),
            };
            upstreams.push(Upstream::new(Arc::clone(backend), state)?);
        }
        let (models, model_ids) = model_index(&config);
        let admin_key_sha256 = config.server.admin_key.as_ref().map(|k| crate::auth::sha256(k.expose().as_bytes()));
        let metrics_key_sha256 = config.server.metrics_key.as_ref().map(|k| crate::auth::sha256(k.expose().as_bytes()));
        Ok(Self {
            keys: KeyTable::new(&config.users),
            route_names: config.routes.iter().map(|r| Arc::from(r.model.as_str())).collect(),
            upstreams,
            models,
            model_ids,
            admin_key_sha256,
            metrics_key_sha256,
            config,
        })
    }

    pub fn resolve(&self, model: &str) -> Option<ModelTarget> {
        self.models.get(model).copied()
    }

    /// The route a request record names: route `index`'s alias, or `pinned` (the backend's
    /// name) for a request pinned to one backend.
    pub fn record_route(&self, index: Option<usize>, pinned: &Arc<str>) -> Arc<str> {
        Arc::clone(index.and_then(|i| self.route_names.get(i)).unwrap_or(pinned))
    }

    /// The config user named `name`.
    pub fn user(&self, name: &str) -> Option<&Arc<Principal>> {
        self.keys.named(name)
    }
}
