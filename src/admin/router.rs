//! [`AdminRouter`]: its settings, the authorization middleware every request goes through,
//! and the handlers behind the routes (the look-up by address is in `lookup.rs`).

use std::{
    collections::HashMap,
    fmt,
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::{
    Router,
    extract::{FromRequestParts, Path, Query, Request, State},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use http::{StatusCode, request::Parts};
use serde_json::{Value, json};

use crate::{
    key::StorageKey,
    layer::IdempotencyLayer,
    layer::config::Config,
    store::AdminStore,
    store::inspect::{Inspection, ListCursor},
};

use super::json::{bad_request, claim_json, json_response, record_json};

type AuthorizeFn = Arc<dyn Fn(&Parts) -> Result<String, StatusCode> + Send + Sync>;

/// The most claims one listing page returns.
const MAX_LIMIT: usize = 1000;

/// Builds the admin [`Router`] for a layer whose store implements [`AdminStore`] (the stores of
/// this crate do). See the [module docs](super).
pub struct AdminRouter<St> {
    pub(super) store: St,
    pub(super) config: Arc<Config>,
    authorize: AuthorizeFn,
}

/// The operator `authorize` named, in the request's extensions for the handlers.
#[derive(Clone)]
struct Operator(String);

impl<St: AdminStore> AdminRouter<St> {
    /// Admin routes over `layer`'s store, finding records as `layer` addresses them (its
    /// secret, its scope), and answering only requests that `authorize` allows.
    ///
    /// `authorize` sees each request's head, before anything else happens: `Ok` with the
    /// operator's name (logged with every action) lets it through; `Err` with a status
    /// answers that status (`401`, `403`; one that is not a client error is answered `403`).
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore, admin::AdminRouter};
    /// use http::{StatusCode, request::Parts};
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_secret([7u8; 32]);
    /// // Nobody yet: every request is refused until you decide who may.
    /// let admin = AdminRouter::for_layer(&layer, |_: &Parts| Err(StatusCode::FORBIDDEN));
    /// ```
    pub fn for_layer<F>(layer: &IdempotencyLayer<St>, authorize: F) -> Self
    where
        F: Fn(&Parts) -> Result<String, StatusCode> + Send + Sync + 'static,
    {
        let (store, config) = layer.shared();
        Self {
            store: store.clone(),
            config: Arc::clone(config),
            authorize: Arc::new(authorize),
        }
    }

    /// The routes, to `nest` under a path of your choice.
    pub fn into_router<S: Clone + Send + Sync + 'static>(self) -> Router<S> {
        let state = Arc::new(self);
        Router::new()
            .route("/records/lookup", post(Self::look_up))
            .route("/records/{digest}", get(inspect::<St>).delete(forget::<St>))
            .route("/claims", get(list::<St>))
            .route("/claims/{digest}", axum::routing::delete(release::<St>))
            // Added before the layer, so that unknown paths are authorized too.
            .fallback(|| async {
                json_response(StatusCode::NOT_FOUND, json!({ "error": "no such route" }))
            })
            .layer(middleware::from_fn_with_state(
                Arc::clone(&state),
                authorize::<St>,
            ))
            .with_state(state)
    }
}

impl<St: fmt::Debug> fmt::Debug for AdminRouter<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminRouter")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// Every request, to any path, is put to `authorize` first.
async fn authorize<St: AdminStore>(
    State(admin): Admin<St>,
    request: Request,
    next: Next,
) -> Response {
    let (mut parts, body) = request.into_parts();
    match (admin.authorize)(&parts) {
        Ok(operator) => {
            parts.extensions.insert(Operator(operator));
            next.run(Request::from_parts(parts, body)).await
        }
        Err(status) => {
            let status = if status.is_client_error() {
                status
            } else {
                StatusCode::FORBIDDEN
            };
            tracing::info!(
                method = %parts.method,
                path = parts.uri.path(),
                status = status.as_u16(),
                "idempotency admin request refused"
            );
            json_response(status, json!({ "error": "not authorized" }))
        }
    }
}

pub(super) type Admin<St> = State<Arc<AdminRouter<St>>>;
type Params = Query<HashMap<String, String>>;

/// The address a route names: the storage key's digest, 64 hex digits (`400` otherwise).
struct Digest(StorageKey);

impl<S: Send + Sync> FromRequestParts<S> for Digest {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        let Path(digest) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        StorageKey::from_hex(&digest)
            .map(Digest)
            .ok_or_else(|| bad_request("the digest is not 64 hex digits"))
    }
}

async fn inspect<St: AdminStore>(
    State(admin): Admin<St>,
    parts: Parts,
    Digest(key): Digest,
) -> Response {
    admin.inspect_key(&parts, "inspect", key).await
}

async fn forget<St: AdminStore>(
    State(admin): Admin<St>,
    parts: Parts,
    Digest(key): Digest,
) -> Response {
    match admin.store.forget(&key).await {
        Ok(forgotten) => {
            admin.log(
                &parts,
                "forget",
                Some(&key),
                if forgotten { "forgotten" } else { "no_record" },
            );
            let status = if forgotten {
                StatusCode::OK
            } else {
                StatusCode::NOT_FOUND
            };
            json_response(
                status,
                json!({ "key_digest": key.to_hex(), "forgotten": forgotten }),
            )
        }
        Err(error) => admin.store_failed(&parts, "forget", Some(&key), &error),
    }
}

async fn release<St: AdminStore>(
    State(admin): Admin<St>,
    parts: Parts,
    Digest(key): Digest,
) -> Response {
    match admin.store.break_claim(&key).await {
        Ok(token) => {
            admin.log(
                &parts,
                "release_claim",
                Some(&key),
                if token.is_some() {
                    "released"
                } else {
                    "no_claim"
                },
            );
            let status = if token.is_some() {
                StatusCode::OK
            } else {
                StatusCode::NOT_FOUND
            };
            json_response(
                status,
                json!({
                    "key_digest": key.to_hex(),
                    "released": token.is_some(),
                    "token": token.map(|t| format!("{:#018x}", t.get())),
                }),
            )
        }
        Err(error) => admin.store_failed(&parts, "release_claim", Some(&key), &error),
    }
}

async fn list<St: AdminStore>(
    State(admin): Admin<St>,
    parts: Parts,
    Query(params): Params,
) -> Response {
    let older_than = match params.get("older_than").map(|s| s.parse::<u64>()) {
        None => Duration::ZERO,
        Some(Ok(seconds)) => Duration::from_secs(seconds),
        Some(Err(_)) => return bad_request("older_than is a whole number of seconds"),
    };
    let limit = match params.get("limit").map(|s| s.parse::<usize>()) {
        None => 100,
        Some(Ok(limit)) if (1..=MAX_LIMIT).contains(&limit) => limit,
        Some(_) => return bad_request("limit is a number from 1 to 1000"),
    };
    let cursor = params.get("cursor").map(|c| ListCursor::new(c.clone()));
    match admin.store.list_claims(older_than, cursor, limit).await {
        Ok(page) => {
            admin.log(&parts, "list_claims", None, "listed");
            let now = SystemTime::now();
            let claims: Vec<Value> = page.claims.iter().map(|c| claim_json(c, now)).collect();
            json_response(
                StatusCode::OK,
                json!({
                    "claims": claims,
                    "next": page.next.as_ref().map(ListCursor::as_str),
                }),
            )
        }
        Err(error) => admin.store_failed(&parts, "list_claims", None, &error),
    }
}

impl<St: AdminStore> AdminRouter<St> {
    async fn inspect_key(&self, parts: &Parts, action: &'static str, key: StorageKey) -> Response {
        match self.store.inspect(&key).await {
            Ok(found) => self.inspected(parts, action, key, found, false),
            Err(error) => self.store_failed(parts, action, Some(&key), &error),
        }
    }

    /// The answer for what `key` holds; `previous`: found under a previous secret.
    pub(super) fn inspected(
        &self,
        parts: &Parts,
        action: &'static str,
        key: StorageKey,
        found: Option<Inspection>,
        previous: bool,
    ) -> Response {
        let now = SystemTime::now();
        let (status, mut body, result) = match &found {
            None => (
                StatusCode::NOT_FOUND,
                json!({ "key_digest": key.to_hex(), "state": "free" }),
                "free",
            ),
            Some(Inspection::InFlight(claim)) => {
                let result = if claim.is_abandoned(now) {
                    "abandoned"
                } else {
                    "in_flight"
                };
                (StatusCode::OK, claim_json(claim, now), result)
            }
            Some(Inspection::Completed(record)) => {
                (StatusCode::OK, record_json(&key, record), "completed")
            }
        };
        if let Some(fields) = body.as_object_mut().filter(|_| previous) {
            fields.insert("secret".to_owned(), Value::from("previous"));
        }
        self.log(parts, action, Some(&key), result);
        json_response(status, body)
    }

    fn log(&self, parts: &Parts, action: &'static str, key: Option<&StorageKey>, result: &str) {
        let operator = parts.extensions.get::<Operator>();
        tracing::info!(
            principal = %operator.map_or("-", |operator| operator.0.as_str()),
            action,
            key_digest = key.map(|key| key.to_hex()).as_deref().unwrap_or("-"),
            result,
            "idempotency admin action"
        );
    }

    pub(super) fn store_failed(
        &self,
        parts: &Parts,
        action: &'static str,
        key: Option<&StorageKey>,
        error: &crate::StoreError,
    ) -> Response {
        self.log(parts, action, key, "store_error");
        tracing::warn!(%error, action, "idempotency admin action failed");
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "error": error.to_string() }),
        )
    }
}
