//! How a retry is told from another request under the same key: what counts in the
//! fingerprint, the secret that keys it, the body read for it, and the status of a mismatch.

use http::StatusCode;

use super::IdempotencyLayer;
use crate::{
    fingerprint::digest::Secret,
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

    /// Treats the route as JSON-RPC 2.0 (the MCP streamable HTTP transport). Default: off.
    ///
    /// - Only calls of the protected methods ([`with_json_rpc_methods`](Self::with_json_rpc_methods),
    ///   `tools/call` by default) are protected; every other JSON-RPC message (`initialize`,
    ///   notifications, `ping`, `tools/list`, `resources/read`…) reaches the handler untouched,
    ///   its body read but no store called. Only a body with `"jsonrpc": "2.0"` is JSON-RPC:
    ///   any other is a plain request, protected as on any route.
    /// - A call's `id` and `params._meta` (per-request progress tokens and trace context) do
    ///   not count in its fingerprint or derived key (the body is compared as canonical
    ///   JSON). A batch keeps its ids.
    /// - The `Mcp-Session-Id` header is part of the default scope, and a call without a key
    ///   gets a derived one only when a credential (`Authorization`, `Cookie`) or a session
    ///   names its agent; otherwise it runs unprotected.
    /// - A response is kept only if it answers the call: a JSON-RPC response, in JSON or in
    ///   an SSE stream, and no `error` unless [`with_json_rpc_errors_stored`](Self::with_json_rpc_errors_stored).
    /// - A replay answers with the retry's `id` in place of the stored one in every JSON-RPC
    ///   response of the body (JSON or SSE), everything else byte for byte and
    ///   `Content-Length` adjusted; a kept response that cannot carry it is refused to the
    ///   retry, never replayed with another call's `id`.
    /// - The layer's own rejections of a call are JSON-RPC errors carrying its `id`, with
    ///   HTTP status 200 (the problem's own status when the `id` is unknown), their `data`
    ///   the RFC 9457 problem.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, KeySource, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .with_key_source(KeySource::json_pointer("/params/arguments/idempotency_key"))
    ///     .with_json_rpc(true);
    /// ```
    pub fn with_json_rpc(mut self, enabled: bool) -> Self {
        self.config().json_rpc.enabled = enabled;
        self
    }

    /// The JSON-RPC methods whose calls are protected in JSON-RPC mode; calls of any other
    /// method pass through. Default: `tools/call` (MCP's one side-effecting call).
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .with_json_rpc(true)
    ///     .with_json_rpc_methods(["tools/call", "orders/create"]);
    /// ```
    pub fn with_json_rpc_methods<I, M>(mut self, methods: I) -> Self
    where
        I: IntoIterator<Item = M>,
        M: Into<String>,
    {
        let methods: Vec<Box<str>> = methods.into_iter().map(|m| m.into().into()).collect();
        self.config().json_rpc.methods = methods.into();
        self
    }

    /// Whether a JSON-RPC response with an `error` member is kept and replayed in JSON-RPC
    /// mode. Default: `false`: the key is released, so a retry runs the call again (a
    /// transient `-32603` would otherwise be replayed for the whole TTL).
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .with_json_rpc(true)
    ///     .with_json_rpc_errors_stored(true);
    /// ```
    ///
    /// # Warning
    ///
    /// An error kept is an error replayed: only for errors that say the call must not be
    /// made again.
    pub fn with_json_rpc_errors_stored(mut self, stored: bool) -> Self {
        self.config().json_rpc.store_errors = stored;
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
    /// stored under the old one are no longer found, and a retry of a request made before the
    /// change would execute again: give the old secret to
    /// [`add_previous_secret`](Self::add_previous_secret) until its records have expired.
    ///
    /// # Panics
    ///
    /// If `secret` is empty: an empty HMAC key is no secret at all, and is what an unset
    /// environment variable reads as.
    pub fn with_secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        let secret = secret.as_ref();
        assert!(
            !secret.is_empty(),
            "IdempotencyLayer::with_secret: the secret is empty (use 32 random bytes or more)"
        );
        self.config().fingerprint.secret = Some(Secret::new(secret));
        self
    }

    /// A secret used before the current one ([`with_secret`](Self::with_secret)), still
    /// honoured for records stored under it:
    /// rotating the secret then neither executes again a request completed before the
    /// rotation nor runs one beside its first attempt still in flight. Call it once for each
    /// secret still within the records' TTL, newest first. Default: none.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// # let (new_secret, old_secret) = ([8u8; 32], [7u8; 32]);
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .with_secret(new_secret)
    ///     .add_previous_secret(old_secret);
    /// ```
    ///
    /// A request claims its key's address under the current secret, as always; the claim
    /// held, it looks at each previous secret's address with the store's claim (given back
    /// at once when free): a completed record there is replayed, a request in flight there is
    /// waited for (or 409, as [`with_wait_mode`](Self::with_wait_mode) says), and only when
    /// none is found does the handler run. Requests under the current secret queue behind
    /// the claim meanwhile, so within instances that share these settings nothing runs twice.
    /// This costs a claim and a release per previous secret on each first execution, and
    /// the claims on a retry replayed from an earlier address (the record stays there); a
    /// replay under the current address costs nothing more. Remove previous secrets once the
    /// TTL has passed.
    ///
    /// During a rolling deploy, instances on the old settings do not look at the new
    /// address: a request whose attempts reach an old and a new instance at once can run on
    /// both, and a retry on an old instance does not find a record a new one stored. Roll out
    /// in two steps to keep exactly-once throughout: first the new secret as a previous one
    /// (`with_secret(old).add_previous_secret(new)`), then, once every instance runs that,
    /// `with_secret(new).add_previous_secret(old)`: each instance then claims its own address
    /// and looks at the other's, so two instances never both run one request.
    ///
    /// # Panics
    ///
    /// If `secret` is empty, as [`with_secret`](Self::with_secret) does.
    pub fn add_previous_secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        let secret = secret.as_ref();
        assert!(
            !secret.is_empty(),
            "IdempotencyLayer::add_previous_secret: the secret is empty"
        );
        self.config()
            .fingerprint
            .previous_secrets
            .push(Secret::new(secret));
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
