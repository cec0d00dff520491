//! [`IdempotencyLayer`]: the configuration, and the `Layer` that applies it.
//!
//! Its `with_*` setters are grouped by what they decide, one file each: `keys` (which
//! requests, and how their keys are found), `fingerprint` (how a retry is told from another
//! request), `records` (what is kept, and for how long) and `operations` (failures, problem
//! responses, metrics and abandoned claims); `grpc` (gRPC calls: which stream, which answers
//! are kept).

pub(crate) mod config;
mod fingerprint;
mod grpc;
mod keys;
mod operations;
mod records;

use std::{fmt, sync::Arc};

use tower_layer::Layer;

use crate::{flow::service::Idempotency, layer::config::Config, store::IdempotencyStore};

/// Applies [`Idempotency`] to a service: retried and duplicated requests run the handler at
/// most once per key, and every retry gets the first response, byte for byte.
///
/// The layer is its configuration: setters return it changed, and each service it makes
/// shares the settings behind one `Arc` (a clone per request is a reference count).
///
/// ```
/// use axum::{Router, routing::post};
/// use tower_idempotency::{IdempotencyLayer, MemoryStore};
///
/// let app: Router = Router::new()
///     .route("/charges", post(|| async { "charged" }))
///     .layer(IdempotencyLayer::new(MemoryStore::default()));
/// ```
#[derive(Clone)]
pub struct IdempotencyLayer<St> {
    store: St,
    config: Arc<Config>,
}

impl<St: IdempotencyStore> IdempotencyLayer<St> {
    /// A layer over `store` with the defaults: `POST` and `PATCH` protected, keys from the
    /// `Idempotency-Key` header (or derived from the request for 60 s when absent), records
    /// kept 24 h, scoped by credentials, duplicates waiting up to 10 s, fail-closed.
    pub fn new(store: St) -> Self {
        Self {
            store,
            config: Arc::new(Config::default()),
        }
    }

    fn config(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// The store and the settings, for what must find records as the layer does (the admin
    /// router).
    #[cfg_attr(not(feature = "axum"), allow(dead_code))]
    pub(crate) fn shared(&self) -> (&St, &Arc<Config>) {
        (&self.store, &self.config)
    }
}

impl<S, St: Clone> Layer<S> for IdempotencyLayer<St> {
    type Service = Idempotency<S, St>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::new(inner, self.store.clone(), Arc::clone(&self.config))
    }
}

impl<St: fmt::Debug> fmt::Debug for IdempotencyLayer<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("store", &self.store)
            .field("config", &self.config)
            .finish()
    }
}
