//! [`IdempotencyLayer`]: the configuration, and the `Layer` that applies it.

use std::{fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderName, Method, Response, StatusCode, request, response};
use tower_layer::Layer;

use crate::{
    config::{Config, FailMode, MAX_LEASE, MAX_TTL, MAX_WAIT, MIN_LEASE, MissingKey, WaitMode},
    digest::Secret,
    fingerprint::{BodyFingerprint, FingerprintHeaders},
    key::{KeySource, Scope},
    problem::Problem,
    recovery::Recovery,
    service::Idempotency,
    store::IdempotencyStore,
};

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

    /// The header that carries the key. Default: `Idempotency-Key`.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .with_header_name(http::HeaderName::from_static("x-request-key"));
    /// ```
    pub fn with_header_name(mut self, name: HeaderName) -> Self {
        self.config().header_name = name;
        self
    }

    /// The methods to protect; others pass straight through, with no store round trip and no
    /// body buffering. Default: `POST` and `PATCH`.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// use http::Method;
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .with_methods([Method::POST, Method::PUT, Method::PATCH, Method::DELETE]);
    /// ```
    pub fn with_methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config().methods = methods.into_iter().collect();
        self
    }

    /// Protects one more method. Default set: `POST` and `PATCH`.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).add_method(http::Method::PUT);
    /// ```
    pub fn add_method(mut self, method: Method) -> Self {
        let methods = &mut self.config().methods;
        if !methods.contains(&method) {
            methods.push(method);
        }
        self
    }

    /// What to do with a protected request that carries no key.
    /// Default: [`MissingKey::Fingerprint`] with a 60 s window.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore, MissingKey};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_missing_key(MissingKey::Required);
    /// ```
    ///
    /// # Panics
    ///
    /// If the window of [`MissingKey::Fingerprint`] is zero or longer than
    /// [`MAX_TTL`](crate::MAX_TTL).
    pub fn with_missing_key(mut self, policy: MissingKey) -> Self {
        if let MissingKey::Fingerprint(window) = policy {
            assert!(
                !window.is_zero() && window <= MAX_TTL,
                "IdempotencyLayer::with_missing_key: the MissingKey::Fingerprint window must be \
                 more than zero and at most MAX_TTL ({MAX_TTL:?}), got {window:?}"
            );
        }
        self.config().missing_key = policy;
        self
    }

    /// Where else to look for a key when the key header is absent: another header (webhook
    /// delivery ids), a JSON body field, or a closure. Default: nowhere.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, KeySource, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .with_key_source(KeySource::json_pointer("/id"));
    /// ```
    pub fn with_key_source(mut self, source: KeySource) -> Self {
        self.config().key_source = Some(source);
        self
    }

    /// Whose key it is: the principal a record belongs to, so the same key from another
    /// principal is another record. Set it from your authenticated user or tenant.
    /// Default: the request's `Authorization` header (and `Cookie` for derived keys).
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// #[derive(Clone)]
    /// struct UserId(String);
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_scope(|parts: &http::request::Parts| {
    ///     parts.extensions.get::<UserId>().map(|user| user.0.clone()).unwrap_or_default()
    /// });
    /// ```
    ///
    /// # Warning
    ///
    /// A scope that maps different principals to the same value (`|_| ""`) lets one client
    /// receive a response produced for another by reusing or guessing its key.
    pub fn with_scope<F, R>(mut self, scope: F) -> Self
    where
        F: Fn(&request::Parts) -> R + Send + Sync + 'static,
        R: AsRef<[u8]>,
    {
        self.config().scope = Scope::custom(scope);
        self
    }

    /// How long a completed record is kept and replayed. Default: 24 hours.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_ttl(Duration::from_secs(7 * 24 * 3600));
    /// ```
    ///
    /// # Panics
    ///
    /// If `ttl` is zero (nothing would ever be replayed) or longer than
    /// [`MAX_TTL`](crate::MAX_TTL) (365 days).
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        assert!(
            !ttl.is_zero() && ttl <= MAX_TTL,
            "IdempotencyLayer::with_ttl: the TTL must be more than zero and at most MAX_TTL \
             ({MAX_TTL:?}), got {ttl:?}"
        );
        self.config().ttl = ttl;
        self
    }

    /// How long an in-flight claim lasts without renewal. The owner renews it every third of
    /// this while its handler runs, so it bounds how long a crashed instance's key stays
    /// blocked, not how long a handler may take. Default: 30 s.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_lease(Duration::from_secs(10));
    /// ```
    ///
    /// # Panics
    ///
    /// If `lease` is shorter than [`MIN_LEASE`](crate::MIN_LEASE) (100 ms) or longer than
    /// [`MAX_LEASE`](crate::MAX_LEASE) (1 hour). A lease that ends before its owner can renew
    /// it lets a duplicate take the claim over while the handler runs, and both execute; a
    /// zero lease would end at once.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        assert!(
            (MIN_LEASE..=MAX_LEASE).contains(&lease),
            "IdempotencyLayer::with_lease: the lease must be at least MIN_LEASE ({MIN_LEASE:?}) \
             and at most MAX_LEASE ({MAX_LEASE:?}), got {lease:?}"
        );
        self.config().lease = lease;
        self
    }

    /// What a duplicate does while its key is in flight. Default: [`WaitMode::Wait`] 10 s.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore, WaitMode};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_wait_mode(WaitMode::Reject);
    /// ```
    ///
    /// # Panics
    ///
    /// If [`WaitMode::Wait`] is given more than [`MAX_WAIT`](crate::MAX_WAIT) (1 hour).
    pub fn with_wait_mode(mut self, mode: WaitMode) -> Self {
        if let WaitMode::Wait(wait) = mode {
            assert!(
                wait <= MAX_WAIT,
                "IdempotencyLayer::with_wait_mode: WaitMode::Wait must be at most MAX_WAIT \
                 ({MAX_WAIT:?}), got {wait:?}"
            );
        }
        self.config().wait_mode = mode;
        self
    }

    /// The status for a key reused with another payload: 409 Conflict (default) or 422
    /// Unprocessable Content (the IETF draft's choice).
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .with_mismatch_status(http::StatusCode::UNPROCESSABLE_ENTITY);
    /// ```
    ///
    /// # Panics
    ///
    /// If `status` is neither 409 nor 422: clients tell a reused key apart by these (a 2xx
    /// would look like success, a 5xx like a failure worth retrying with the same key).
    pub fn with_mismatch_status(mut self, status: StatusCode) -> Self {
        assert!(
            status == StatusCode::CONFLICT || status == StatusCode::UNPROCESSABLE_ENTITY,
            "IdempotencyLayer::with_mismatch_status: the status must be 409 Conflict or \
             422 Unprocessable Content, got {status}"
        );
        self.config().mismatch_status = status;
        self
    }

    /// The largest request body read to fingerprint it; larger ones get 413 and nothing runs.
    /// Default: 1 MiB.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_request_body_limit(64 * 1024);
    /// ```
    pub fn with_request_body_limit(mut self, bytes: usize) -> Self {
        self.config().request_body_limit = bytes;
        self
    }

    /// The largest response body kept for replay. A larger response is still delivered, but
    /// its key is recorded as completed-not-replayable: retries get a 409 problem and never
    /// run the handler again. Default: 1 MiB.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_response_body_limit(4 * 1024 * 1024);
    /// ```
    pub fn with_response_body_limit(mut self, bytes: usize) -> Self {
        self.config().response_body_limit = bytes;
        self
    }

    /// Which responses are stored. A refused one releases its key, so a retry executes again.
    /// Default: all but 5xx, 408 and 429 (transient failures).
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// // Stripe's rule: once the handler ran, store whatever it answered.
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_store_when(|_: &http::response::Parts| true);
    /// ```
    pub fn with_store_when<F>(mut self, predicate: F) -> Self
    where
        F: Fn(&response::Parts) -> bool + Send + Sync + 'static,
    {
        self.config().store_when = Arc::new(predicate);
        self
    }

    /// What to do when the store is unavailable. Default: [`FailMode::Closed`] (503).
    ///
    /// ```
    /// # use tower_idempotency::{FailMode, IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_fail_mode(FailMode::Open);
    /// ```
    ///
    /// # Warning
    ///
    /// [`FailMode::Open`] runs handlers unprotected while the store is down.
    pub fn with_fail_mode(mut self, mode: FailMode) -> Self {
        self.config().fail_mode = mode;
        self
    }

    /// Renders the layer's own problem responses. Default: [`Problem::to_response`]
    /// (`application/problem+json`).
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore, Problem};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_problem_response(|problem: &Problem| {
    ///     let mut response = http::Response::new(bytes::Bytes::from(problem.detail().to_owned()));
    ///     *response.status_mut() = problem.status();
    ///     response
    /// });
    /// ```
    pub fn with_problem_response<F>(mut self, render: F) -> Self
    where
        F: Fn(&Problem) -> Response<Bytes> + Send + Sync + 'static,
    {
        self.config().render_problem = Some(Arc::new(render));
        self
    }

    /// How the request body counts in the fingerprint a retry is checked against.
    /// Default: [`BodyFingerprint::raw`], byte for byte.
    ///
    /// ```
    /// # use tower_idempotency::{BodyFingerprint, IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .with_body_fingerprint(BodyFingerprint::canonical_json_excluding(["/pending_webhooks"]));
    /// ```
    ///
    /// # Warning
    ///
    /// Every difference a mode ignores is one a retry may carry and still be replayed: exclude
    /// only fields the sender changes on re-delivery, never ones the handler acts on.
    /// Changing the mode on a running service turns retries of earlier requests into
    /// mismatches (409) until their records expire: their fingerprints were computed the old
    /// way.
    pub fn with_body_fingerprint(mut self, body: BodyFingerprint) -> Self {
        self.config().fingerprint.body = body;
        self
    }

    /// Which request headers count in the fingerprint. Default: [`FingerprintHeaders::none`].
    ///
    /// ```
    /// # use tower_idempotency::{FingerprintHeaders, IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .with_fingerprint_headers(FingerprintHeaders::only([http::header::CONTENT_TYPE]));
    /// ```
    pub fn with_fingerprint_headers(mut self, headers: FingerprintHeaders) -> Self {
        self.config().fingerprint.headers = headers;
        self
    }

    /// Treats request bodies as JSON-RPC 2.0 (the transport of MCP tool calls), whose retries
    /// carry a new `id`: a single request's top-level `id` does not count in its fingerprint
    /// (the body is compared as canonical JSON), and a replay answers with the retry's `id` in
    /// place of the stored response's (everything else byte for byte, `Content-Length`
    /// adjusted). Batches, notifications and responses that are not one JSON object with an
    /// `id` are replayed as they are. Default: off.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, KeySource, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .with_key_source(KeySource::json_pointer("/params/arguments/idempotency_key"))
    ///     .with_json_rpc(true);
    /// ```
    pub fn with_json_rpc(mut self, enabled: bool) -> Self {
        self.config().fingerprint.json_rpc = enabled;
        self
    }

    /// A server secret that keys storage keys and fingerprints (HMAC-SHA-256 instead of
    /// SHA-256), so that a dump of the store cannot be used to confirm a guessed key, or a
    /// guessed body of a request. Use 32 random bytes or more, kept like any other secret.
    /// Default: none (SHA-256).
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// # let secret_from_your_vault = [7u8; 32];
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_secret(secret_from_your_vault);
    /// ```
    ///
    /// Changing the secret (or setting one on a running service) breaks nothing, but records
    /// stored under the old one are no longer found: a retry of a request made before the
    /// change executes again. Change it when retries are unlikely, or wait out the TTL with
    /// the old secret on instances still serving retries.
    pub fn with_secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        self.config().fingerprint.secret = Some(Secret::new(secret.as_ref()));
        self
    }

    /// Adds a header to protected responses that states how many whole seconds the key will
    /// be honoured: the TTL on the first execution, what is left of it on a replay (when the
    /// store can tell). Default: no header.
    ///
    /// ```
    /// # use tower_idempotency::{IDEMPOTENCY_KEY_EXPIRES_IN, IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_expiry_header(IDEMPOTENCY_KEY_EXPIRES_IN);
    /// ```
    pub fn with_expiry_header(mut self, name: HeaderName) -> Self {
        self.config().expiry_header = Some(name);
        self
    }

    /// The `route` label of this layer's metrics and the `route` field of its tracing spans,
    /// to tell apart layers over different routes. Default: `default`.
    ///
    /// A `&'static str`, so that recording costs no allocation, and so that labels stay few:
    /// name a route or a group of routes, never anything per request (a key, a user, a path
    /// with ids in it).
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_route_label("payments");
    /// ```
    pub fn with_route_label(mut self, label: &'static str) -> Self {
        self.config().observer = crate::observe::Observer::new(label);
        self
    }

    /// What to do when a request finds its key claimed by an earlier request whose owner's
    /// lease ended without completion: the owner crashed mid-request, and whether its work
    /// happened is unknown. Default: [`Recovery::RunAgain`], take the claim over and run the
    /// handler again.
    ///
    /// [`Recovery::OutcomeUnknown`] answers `409`
    /// [`ProblemKind::OutcomeUnknown`](crate::ProblemKind::OutcomeUnknown) instead, until an
    /// operator breaks the claim ([`IdempotencyStore::break_claim`], or the admin router) or
    /// the store forgets it. Stores that cannot tell an abandoned claim from a free key
    /// never call the hook.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore, Recovery};
    /// // Money moves on /charges: ask the provider before charging again.
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_outcome_unknown(|parts: &http::request::Parts| {
    ///     if parts.uri.path().starts_with("/charges") { Recovery::OutcomeUnknown } else { Recovery::RunAgain }
    /// });
    /// ```
    pub fn with_outcome_unknown<F>(mut self, hook: F) -> Self
    where
        F: Fn(&request::Parts) -> Recovery + Send + Sync + 'static,
    {
        self.config().on_abandoned = crate::recovery::OnAbandoned::new(Arc::new(hook));
        self
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
