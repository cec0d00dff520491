//! An axum router for operators (feature `axum`): look records up, forget one, release a
//! stuck claim, list claims in flight. Mount it behind your own authentication.
//!
//! | request | does |
//! |---|---|
//! | `GET /records/{digest}` | what the store holds under a storage key digest (as logged in the `key_digest` span field) |
//! | `GET /records?method=POST&path=/charges&key=K&scope=acct_1` | the same, found by the request's address: `scope` is what your `with_scope` returns, or `authorization=…` the `Authorization` header for the default scope |
//! | `DELETE /records/{digest}` | forgets a completed record: the next request with its key executes again |
//! | `DELETE /claims/{digest}` | releases a claim, live or abandoned: the next request executes; its owner, if still running, cannot store its response |
//! | `GET /claims?older_than=60&limit=100&cursor=…` | claims made at least `older_than` seconds ago (default 0), a page at a time; `next` is the cursor of the next page |
//!
//! Answers are JSON; times are Unix milliseconds. A free key is `404` with `"state":"free"`;
//! a store error `503`; a bad parameter `400`. Every action is logged at `info` with who
//! asked ([`with_principal`](AdminRouter::with_principal)), the key's digest and what
//! happened, never the key, the scope or credentials given to find it.
//!
//! ```
//! use axum::{Router, routing::post};
//! use tower_idempotency::{IdempotencyLayer, MemoryStore, admin::AdminRouter};
//!
//! #[derive(Clone)]
//! struct Operator(String);
//!
//! let store = MemoryStore::default();
//! let admin = AdminRouter::new(store.clone()).with_principal(|parts: &http::request::Parts| {
//!     // Put there by your operators' authentication layer.
//!     parts.extensions.get::<Operator>().map(|o| o.0.clone()).unwrap_or_default()
//! });
//! let app: Router = Router::new()
//!     .route("/charges", post(|| async { "charged" }))
//!     .layer(IdempotencyLayer::new(store))
//!     // Add your authentication layer to the admin router before nesting it.
//!     .nest("/admin/idempotency", admin.into_router());
//! ```

use std::{
    collections::HashMap,
    fmt,
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::{
    Router,
    extract::{Path, Query, State},
    response::{IntoResponse, Response},
    routing::get,
};
use http::{HeaderValue, Method, StatusCode, header, request::Parts};
use serde_json::{Value, json};

use crate::{
    digest::{Secret, hex},
    inspect::{ClaimInfo, Inspection, ListCursor, LookupScope, RecordInfo},
    key::{IdempotencyKey, StorageKey},
    store::IdempotencyStore,
};

type PrincipalFn = Arc<dyn Fn(&Parts) -> String + Send + Sync>;

/// The most claims one listing page returns.
const MAX_LIMIT: usize = 1000;

/// Builds the admin [`Router`] over a store. See the [module docs](self).
pub struct AdminRouter<St> {
    store: St,
    principal: PrincipalFn,
    secret: Option<Secret>,
}

impl<St: IdempotencyStore> AdminRouter<St> {
    /// Admin routes over `store` (the store the layer uses, or a clone of it).
    pub fn new(store: St) -> Self {
        Self {
            store,
            principal: Arc::new(|_| String::from("unidentified")),
            secret: None,
        }
    }

    /// The secret the layer's digests are keyed with, if it has one
    /// ([`with_secret`](crate::IdempotencyLayer::with_secret)): look-ups by (scope, method,
    /// path, key) compute the address the way the layer does. Default: none.
    ///
    /// ```
    /// # use tower_idempotency::{MemoryStore, admin::AdminRouter};
    /// # let secret_from_your_vault = [7u8; 32];
    /// let admin = AdminRouter::new(MemoryStore::default()).with_secret(secret_from_your_vault);
    /// ```
    pub fn with_secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        self.secret = Some(Secret::new(secret.as_ref()));
        self
    }

    /// Who asked, for the log line of every action: read it from what your authentication
    /// put in the request. Default: `unidentified`.
    ///
    /// ```
    /// # use tower_idempotency::{MemoryStore, admin::AdminRouter};
    /// let admin = AdminRouter::new(MemoryStore::default()).with_principal(|parts: &http::request::Parts| {
    ///     parts.headers.get("x-operator").and_then(|v| v.to_str().ok()).unwrap_or("unknown").to_owned()
    /// });
    /// ```
    pub fn with_principal<F>(mut self, principal: F) -> Self
    where
        F: Fn(&Parts) -> String + Send + Sync + 'static,
    {
        self.principal = Arc::new(principal);
        self
    }

    /// The routes, to `nest` under a path of your choice and put behind your authentication.
    pub fn into_router<S: Clone + Send + Sync + 'static>(self) -> Router<S> {
        let state = Arc::new(self);
        Router::new()
            .route("/records", get(look_up::<St>))
            .route("/records/{digest}", get(inspect::<St>).delete(forget::<St>))
            .route("/claims", get(list::<St>))
            .route("/claims/{digest}", axum::routing::delete(release::<St>))
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

type Admin<St> = State<Arc<AdminRouter<St>>>;
type Params = Query<HashMap<String, String>>;

async fn inspect<St: IdempotencyStore>(
    State(admin): Admin<St>,
    parts: Parts,
    Path(digest): Path<String>,
) -> Response {
    let Some(key) = StorageKey::from_hex(&digest) else {
        return bad_request("the digest is not 64 hex digits");
    };
    admin.inspect_key(&parts, "inspect", key).await
}

async fn look_up<St: IdempotencyStore>(
    State(admin): Admin<St>,
    parts: Parts,
    Query(params): Params,
) -> Response {
    let key = match address(&params, admin.secret.as_ref()) {
        Ok(key) => key,
        Err(message) => return bad_request(message),
    };
    admin.inspect_key(&parts, "look_up", key).await
}

async fn forget<St: IdempotencyStore>(
    State(admin): Admin<St>,
    parts: Parts,
    Path(digest): Path<String>,
) -> Response {
    let Some(key) = StorageKey::from_hex(&digest) else {
        return bad_request("the digest is not 64 hex digits");
    };
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

async fn release<St: IdempotencyStore>(
    State(admin): Admin<St>,
    parts: Parts,
    Path(digest): Path<String>,
) -> Response {
    let Some(key) = StorageKey::from_hex(&digest) else {
        return bad_request("the digest is not 64 hex digits");
    };
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

async fn list<St: IdempotencyStore>(
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

impl<St: IdempotencyStore> AdminRouter<St> {
    async fn inspect_key(&self, parts: &Parts, action: &'static str, key: StorageKey) -> Response {
        match self.store.inspect(&key).await {
            Ok(found) => {
                let (status, body, result) = match &found {
                    None => (
                        StatusCode::NOT_FOUND,
                        json!({ "key_digest": key.to_hex(), "state": "free" }),
                        "free",
                    ),
                    Some(Inspection::InFlight(claim)) => {
                        let now = SystemTime::now();
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
                self.log(parts, action, Some(&key), result);
                json_response(status, body)
            }
            Err(error) => self.store_failed(parts, action, Some(&key), &error),
        }
    }

    fn log(&self, parts: &Parts, action: &'static str, key: Option<&StorageKey>, result: &str) {
        let principal = (self.principal)(parts);
        tracing::info!(
            principal = %principal,
            action,
            key_digest = key.map(|key| key.to_hex()).as_deref().unwrap_or("-"),
            result,
            "idempotency admin action"
        );
    }

    fn store_failed(
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

/// The storage key a client-keyed request had, from the look-up's parameters.
fn address(
    params: &HashMap<String, String>,
    secret: Option<&Secret>,
) -> Result<StorageKey, &'static str> {
    let method = params
        .get("method")
        .ok_or("method is required")
        .and_then(|m| Method::from_bytes(m.as_bytes()).map_err(|_| "method is not a method"))?;
    let path = params.get("path").ok_or("path is required")?;
    let key = params
        .get("key")
        .ok_or("key is required")
        .and_then(|k| IdempotencyKey::parse(k.as_bytes()).map_err(|_| "key is not a valid key"))?;
    let authorization = match params.get("authorization") {
        Some(value) => {
            Some(HeaderValue::from_str(value).map_err(|_| "authorization is not a header value")?)
        }
        None => None,
    };
    let scope = match (params.get("scope"), &authorization) {
        (Some(_), Some(_)) => return Err("give scope or authorization, not both"),
        (Some(scope), None) => LookupScope::Principal(scope.as_bytes()),
        (None, authorization) => LookupScope::Credentials(authorization.as_ref()),
    };
    Ok(StorageKey::of_lookup(secret, scope, &method, path, &key))
}

fn unix_ms(at: SystemTime) -> Value {
    match at.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(since) => json!(u64::try_from(since.as_millis()).unwrap_or(u64::MAX)),
        Err(_) => Value::Null,
    }
}

fn claim_json(claim: &ClaimInfo, now: SystemTime) -> Value {
    json!({
        "key_digest": claim.key().to_hex(),
        "state": "in_flight",
        "abandoned": claim.is_abandoned(now),
        "token": format!("{:#018x}", claim.token().get()),
        "fingerprint": hex(claim.fingerprint().as_bytes()),
        "claimed_at_ms": claim.claimed_at().map_or(Value::Null, unix_ms),
        "age_ms": claim.age(now).map(|age| u64::try_from(age.as_millis()).unwrap_or(u64::MAX)),
        "lease_expires_at_ms": unix_ms(claim.lease_expires_at()),
    })
}

fn record_json(key: &StorageKey, record: &RecordInfo) -> Value {
    json!({
        "key_digest": key.to_hex(),
        "state": "completed",
        "status": record.status().as_u16(),
        "replayable": record.is_replayable(),
        "header_count": record.header_count(),
        "body_len": record.body_len(),
        "fingerprint": hex(record.fingerprint().as_bytes()),
        "created_at_ms": record.created_at().map_or(Value::Null, unix_ms),
        "expires_at_ms": record.expires_at().map_or(Value::Null, unix_ms),
    })
}

fn json_response(status: StatusCode, body: Value) -> Response {
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn bad_request(message: &'static str) -> Response {
    json_response(StatusCode::BAD_REQUEST, json!({ "error": message }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_look_up_needs_a_method_a_path_a_key_and_at_most_one_scope() {
        let base = [("method", "POST"), ("path", "/charges"), ("key", "k-1")];
        type Case<'a> = (&'a [(&'a str, &'a str)], Result<(), &'a str>);
        let cases: [Case<'_>; 7] = [
            (&base, Ok(())),
            (
                &[("method", "POST"), ("path", "/charges")],
                Err("key is required"),
            ),
            (
                &[("path", "/charges"), ("key", "k")],
                Err("method is required"),
            ),
            (&[("method", "POST"), ("key", "k")], Err("path is required")),
            (
                &[("method", "PO ST"), ("path", "/"), ("key", "k")],
                Err("method is not a method"),
            ),
            (
                &[("method", "POST"), ("path", "/"), ("key", "")],
                Err("key is not a valid key"),
            ),
            (
                &[
                    ("method", "POST"),
                    ("path", "/"),
                    ("key", "k"),
                    ("scope", "a"),
                    ("authorization", "b"),
                ],
                Err("give scope or authorization, not both"),
            ),
        ];
        for (pairs, expected) in cases {
            assert_eq!(
                address(&params(pairs), None).map(|_| ()),
                expected,
                "{pairs:?}"
            );
        }
        let key = IdempotencyKey::parse(b"k-1").unwrap();
        let mut scoped = base.to_vec();
        scoped.push(("scope", "acct_1"));
        assert_eq!(
            address(&params(&scoped), None),
            Ok(StorageKey::of_request(
                LookupScope::Principal(b"acct_1"),
                &Method::POST,
                "/charges",
                &key
            ))
        );
        // A layer with a secret keys its addresses: the look-up must too.
        let secret = Secret::new(b"server secret");
        let keyed = address(&params(&scoped), Some(&secret));
        assert_eq!(
            keyed,
            Ok(StorageKey::of_keyed_request(
                b"server secret",
                LookupScope::Principal(b"acct_1"),
                &Method::POST,
                "/charges",
                &key
            ))
        );
        assert_ne!(keyed, address(&params(&scoped), None));
    }

    #[test]
    fn a_keyed_look_up_finds_the_address_the_layer_derives() {
        use crate::{config::Config, key::KeyRef};
        let mut config = Config::default();
        config.fingerprint.secret = Some(Secret::new(b"server secret"));
        let (parts, ()) = http::Request::post("/charges?x=1")
            .header(http::header::AUTHORIZATION, "Bearer alice")
            .body(())
            .unwrap()
            .into_parts();
        let key = IdempotencyKey::parse(b"k-1").unwrap();
        let derived = config.storage_key(&parts, KeyRef::Client(&key));
        let authorization = HeaderValue::from_static("Bearer alice");
        let scope = LookupScope::Credentials(Some(&authorization));
        assert_eq!(
            StorageKey::of_keyed_request(b"server secret", scope, &Method::POST, "/charges", &key),
            derived
        );
        assert_ne!(
            StorageKey::of_request(scope, &Method::POST, "/charges", &key),
            derived
        );
    }
}
