//! One loaded configuration with everything derived from it at load time: the key table, the
//! model index and a client per backend. Each request reads exactly one snapshot.

use std::collections::HashMap;
use std::sync::Arc;

use crate::auth::KeyTable;
use crate::config::{Backend, Config};
use crate::upstream::{Upstream, UpstreamError};

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
}

impl Snapshot {
    pub fn new(config: Config) -> Result<Self, UpstreamError> {
        let upstreams = config.backends.iter().map(|b| Upstream::new(Arc::clone(b))).collect::<Result<_, _>>()?;
        // Precedence when names collide: route alias, then backend name, then upstream model
        // (the first backend serving it). Config validation forbids route/backend name clashes.
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
        Ok(Self { keys: KeyTable::new(&config.users), upstreams, models, model_ids, config })
    }

    pub fn resolve(&self, model: &str) -> Option<ModelTarget> {
        self.models.get(model).copied()
    }

    pub fn backends(&self) -> Vec<&Backend> {
        self.config.backends.iter().map(AsRef::as_ref).collect()
    }
}
