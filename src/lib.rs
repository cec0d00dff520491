#![doc = include_str!("../README.md")]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]
#![deny(unreachable_pub)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "axum")]
pub mod admin;
mod fingerprint;
mod flow;
// The fuzz targets' entry points; compiled for tests too, so that CI (stable, no cargo-fuzz)
// builds and runs them.
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzzing;
mod key;
mod layer;
mod observe;
mod problem;
mod protocol;
mod record;
pub mod store;

pub use crate::{
    fingerprint::{BodyFingerprint, Fingerprint, FingerprintHeaders},
    flow::body::{RequestBody, ResponseBody},
    flow::expiry::IDEMPOTENCY_KEY_EXPIRES_IN,
    flow::future::ResponseFuture,
    flow::service::Idempotency,
    key::{IdempotencyKey, KeyError, KeySource, MAX_KEY_LEN, PeerAddr, StorageKey},
    layer::IdempotencyLayer,
    layer::config::{
        FailMode, IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, MAX_CAPTURE_AFTER_DISCONNECT, MAX_LEASE,
        MAX_TTL, MAX_WAIT, MIN_LEASE, MissingKey, Recovery, WaitMode,
    },
    problem::{Problem, ProblemKind, ProblemResponse},
    protocol::grpc::{GrpcCode, grpc_message},
    record::{MAX_RECORD_HEADERS, Record, RecordError},
    store::IdempotencyStore,
    store::claim::{Claim, FenceToken},
    store::error::{BoxError, StoreError, StoreErrorKind},
    store::inspect::{ClaimInfo, ClaimPage, Inspection, ListCursor, LookupScope, RecordInfo},
};

#[cfg(feature = "postgres")]
pub use crate::store::postgres::PostgresStore;
#[cfg(feature = "redis")]
pub use crate::store::redis::{Durability, RedisStore};
#[cfg(feature = "moka")]
pub use crate::store::{cached::CachedStore, memory::MemoryStore};
