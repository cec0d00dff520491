//! Which requests are protected, and how their keys are found: the key header, the methods,
//! what to do without a key, other key sources, and whose key it is.

use http::{HeaderName, Method, request};

use super::IdempotencyLayer;
use crate::{
    key::{KeySource, Scope},
    layer::config::{MAX_TTL, MissingKey},
    store::IdempotencyStore,
};

impl<St: IdempotencyStore> IdempotencyLayer<St> {
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
    /// Default: [`MissingKey::Fingerprint`] with a 60 s window (a derived key, used only when
    /// the scope tells the sender apart: see [`with_scope`](Self::with_scope)).
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
    ///
    /// Default: every `Authorization`, `Proxy-Authorization`, `Cookie`, `X-Api-Key` and
    /// `Api-Key` value of the request; for a request without a key and without any of them,
    /// the peer's IP address (axum's `ConnectInfo<SocketAddr>` with the `axum` feature, or a
    /// [`PeerAddr`](crate::PeerAddr)); with neither, no key is derived and the request runs
    /// unprotected (counted, warned of once). A custom scope names every request's principal,
    /// so keys are derived for all requests.
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
}
