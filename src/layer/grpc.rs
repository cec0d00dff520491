//! gRPC calls: which pass through untouched, and which answers are kept.
//!
//! There is no switch: a request whose `content-type` is `application/grpc` is a gRPC call
//! wherever the layer sits (a gRPC client can read nothing but a gRPC status), so the layer
//! answers it in gRPC and keeps it by its `grpc-status`. A gRPC-Web call
//! (`application/grpc-web…`) passes through untouched: put the layer inside tonic-web's
//! `GrpcWebLayer`, which hands it gRPC calls.

use super::IdempotencyLayer;
use crate::{protocol::grpc::GrpcCode, store::IdempotencyStore};

impl<St: IdempotencyStore> IdempotencyLayer<St> {
    /// The streaming methods of the gRPC services behind the layer, by path
    /// (`/package.Service/Method`): their calls pass through untouched, with no store call
    /// and their request stream never read. Default: none. A path names a call by the path
    /// its client sent (axum's `OriginalUri`) or by the one the layer sees (behind a
    /// router's `nest`, without its prefix).
    ///
    /// The layer cannot see the services' protos, so it takes every other gRPC call
    /// (`POST`, `content-type: application/grpc`) as unary: it reads the request message
    /// whole, protects the call like any request, and keeps the answer by its `grpc-status`
    /// ([`with_grpc_codes_stored`](Self::with_grpc_codes_stored)). Name every client- and
    /// bidirectional-streaming method: the layer would wait for such a request's end, which
    /// a client waiting for an answer first never sends (or name the protected methods
    /// instead, [`with_grpc_protected_methods`](Self::with_grpc_protected_methods)). A
    /// server-streaming method left out is protected, its stream captured and replayed
    /// whole once it ended.
    ///
    /// A call without a key (no `idempotency-key` metadata, nothing found by the key source)
    /// is a new call, as AIP-155 says of a request without a request id: it passes through,
    /// never given a derived key ([`MissingKey::Required`](crate::MissingKey::Required)
    /// refuses it). A key source over the request message
    /// ([`KeySource::grpc_message`](crate::KeySource::grpc_message)) cannot read a
    /// compressed one (a client's `send_compressed`): such a call runs unprotected, counted as
    /// the outcome `grpc_undecoded` and warned of once, or is refused with `INVALID_ARGUMENT`
    /// under `MissingKey::Required`.
    ///
    /// The answers in gRPC:
    ///
    /// - a retry gets the first call's headers, length-prefixed message and trailers (custom
    ///   trailing metadata included) byte for byte, plus the response metadata
    ///   `idempotent-replayed: true`;
    /// - the layer's own rejections are Trailers-Only responses with `grpc-status` and a
    ///   percent-encoded `grpc-message`, never problem+json: `UNAVAILABLE` (with
    ///   `grpc-retry-pushback-ms`) for a call still in flight or the store down, which a
    ///   retry policy retries, the same key then replayed; `FAILED_PRECONDITION` for a key
    ///   reused with another message (or an outcome unknown), which no client retries;
    ///   `INVALID_ARGUMENT` for a missing or invalid key; `RESOURCE_EXHAUSTED` for a request
    ///   over the body limit; `INTERNAL` for a handler that panicked. Each carries
    ///   `idempotency-problem`, the problem's `type` URI.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .with_grpc_streaming_methods(["/payments.v1.Payments/WatchCharges"]);
    /// ```
    pub fn with_grpc_streaming_methods<I, M>(mut self, paths: I) -> Self
    where
        I: IntoIterator<Item = M>,
        M: Into<String>,
    {
        let paths: Vec<Box<str>> = paths.into_iter().map(|m| m.into().into()).collect();
        self.config().grpc.streaming = paths.into();
        self
    }

    /// The gRPC methods the layer protects, by path (`/package.Service/Method`): once set,
    /// a call of any other method passes through untouched, like a streaming one. Default:
    /// not set, every gRPC call is protected unless
    /// [`with_grpc_streaming_methods`](Self::with_grpc_streaming_methods) names it.
    ///
    /// The safer list to keep when only a few methods change state (a charge, a refund): a
    /// streaming method left out of it passes through instead of being read as unary, which
    /// holds a bidirectional call until its deadline. A method in both lists is streaming.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .with_grpc_protected_methods(["/payments.v1.Payments/Charge", "/payments.v1.Payments/Refund"]);
    /// ```
    pub fn with_grpc_protected_methods<I, M>(mut self, paths: I) -> Self
    where
        I: IntoIterator<Item = M>,
        M: Into<String>,
    {
        let paths: Vec<Box<str>> = paths.into_iter().map(|m| m.into().into()).collect();
        self.config().grpc.protected = Some(paths.into());
        self
    }

    /// The gRPC status codes whose answers are kept and replayed. Default: `OK` only: a gRPC
    /// error is an HTTP `200` with its status in the trailers (or in the headers of a
    /// Trailers-Only response: no data, no trailers), and any code not listed releases the
    /// key, so a retry runs the call again. An answer with no `grpc-status` (cut short), or
    /// with one in its headers beside data or trailers (malformed), is never kept. A stream
    /// over the response capture limit is delivered whole and decided by its trailers: a
    /// listed code spends the key (not replayable), any other releases it; one whose client
    /// left and that did not end in time has no status and releases it.
    ///
    /// ```
    /// # use tower_idempotency::{GrpcCode, IdempotencyLayer, MemoryStore};
    /// // A refused charge stays refused: replay it instead of asking the bank again.
    /// let layer = IdempotencyLayer::new(MemoryStore::default())
    ///     .with_grpc_codes_stored([GrpcCode::Ok, GrpcCode::InvalidArgument, GrpcCode::AlreadyExists]);
    /// ```
    ///
    /// # Warning
    ///
    /// A code kept is a code replayed for the whole TTL: only deterministic ones
    /// (`INVALID_ARGUMENT`, `ALREADY_EXISTS`, `FAILED_PRECONDITION`…), never `UNAVAILABLE`,
    /// `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED` or `INTERNAL`.
    pub fn with_grpc_codes_stored(mut self, codes: impl IntoIterator<Item = GrpcCode>) -> Self {
        let codes: Vec<GrpcCode> = codes.into_iter().collect();
        self.config().grpc.stored = codes.into();
        self
    }
}
