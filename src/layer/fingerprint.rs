//! How a retry is told from another request under the same key: what counts in the
//! fingerprint, the secret that keys it, the body read for it, and the status of a mismatch.

use http::StatusCode;

use super::IdempotencyLayer;
use crate::{
    digest::Secret,
    fingerprint::{BodyFingerprint, FingerprintHeaders},
    store::IdempotencyStore,
};

impl<St: IdempotencyStore> IdempotencyLayer<St> {
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

    /// The largest request body read to fingerprint it. Default: 1 MiB.
    ///
    /// A larger body with a key (or with a key source that reads the body) gets 413 and
    /// nothing runs. A larger body without a key runs unprotected, every byte of it handed on
    /// to the handler as it streams (counted as the `oversized` outcome): a layer over a whole
    /// router does not refuse uploads.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_request_body_limit(64 * 1024);
    /// ```
    pub fn with_request_body_limit(mut self, bytes: usize) -> Self {
        self.config().request_body_limit = bytes;
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
}
