//! An axum router for operators (feature `axum`): look records up, forget one, release a
//! stuck claim, list claims in flight.
//!
//! It is built from the layer it serves ([`AdminRouter::for_layer`]), so its look-ups derive
//! addresses with the layer's own secret and scope rules, and it cannot be built without an
//! authorization decision: every request, to any path, is first put to your `authorize`
//! closure, which returns the operator's name (for the log) or the status to deny it with.
//!
//! | request | does |
//! |---|---|
//! | `GET /records/{digest}` | what the store holds under a storage key digest (as logged in the `key_digest` span field) |
//! | `POST /records/lookup` | the same, found by the request's address, given as a JSON body: `{"method":"POST","path":"/charges","key":"K","scope":"acct_1"}` when the layer has a `with_scope` (what it returns), or `{…,"headers":{"authorization":"Bearer …"}}` with the request's credential headers for the default scope. Never in the URL: access logs and `TraceLayer` record URLs, so a query string is refused |
//! | `DELETE /records/{digest}` | forgets a completed record: the next request with its key executes again |
//! | `DELETE /claims/{digest}` | releases a claim, live or abandoned: the next request executes; its owner, if still running, cannot store its response |
//! | `GET /claims?older_than=60&limit=100&cursor=…` | claims made at least `older_than` seconds ago (default 0), a page at a time; `next` is the cursor of the next page |
//!
//! Answers are JSON; times are Unix milliseconds. A free key is `404` with `"state":"free"`;
//! a store error `503`; a bad parameter `400`; a request `authorize` refused, the status it
//! chose. Every action is logged at `info` with the operator `authorize` named, the key's
//! digest and what happened, never the key, the scope or credentials given to find it.
//!
//! A predicate over the request head, rather than a tower layer the router would demand:
//! axum applications authenticate in a middleware that puts the caller in the request's
//! extensions, and the predicate reads it there (or checks a header itself); it also names
//! the operator for the log in the same place, and it applies to every path, unknown ones
//! included, so nothing about the routes is learnt without it.
//!
//! ```
//! use axum::{Router, routing::post};
//! use http::{StatusCode, request::Parts};
//! use tower_idempotency::{IdempotencyLayer, MemoryStore, admin::AdminRouter};
//!
//! /// Put in the request's extensions by your operators' authentication middleware.
//! #[derive(Clone)]
//! struct Operator { name: String, on_call: bool }
//!
//! let layer = IdempotencyLayer::new(MemoryStore::default());
//! let admin = AdminRouter::for_layer(&layer, |parts: &Parts| {
//!     match parts.extensions.get::<Operator>() {
//!         Some(operator) if operator.on_call => Ok(operator.name.clone()),
//!         Some(_) => Err(StatusCode::FORBIDDEN),
//!         None => Err(StatusCode::UNAUTHORIZED),
//!     }
//! });
//! let app: Router = Router::new()
//!     .route("/charges", post(|| async { "charged" }))
//!     .layer(layer)
//!     .nest("/admin/idempotency", admin.into_router());
//! ```

mod json;
mod lookup;
mod router;

pub use self::router::AdminRouter;
