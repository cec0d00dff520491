#![doc = include_str!("../README.md")]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]
#![deny(unreachable_pub)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "axum")]
pub mod admin;
mod body;
mod canonical;
mod capture;
mod catch_unwind;
mod chunks;
mod claim;
mod config;
mod digest;
mod error;
mod expiry;
mod fingerprint;
mod future;
mod grpc;
// The fuzz targets' entry points; compiled for tests too, so that CI (stable, no cargo-fuzz)
// builds and runs them.
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzzing;
mod inspect;
mod jsonrpc;
mod key;
mod layer;
mod lease;
mod observe;
mod plan;
mod problem;
mod ready;
mod record;
mod recovery;
mod reject;
mod replay;
mod service;
pub mod store;
mod stream;
mod task;

pub use crate::{
    body::{RequestBody, ResponseBody},
    claim::{Claim, FenceToken},
    config::{
        FailMode, IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, MAX_CAPTURE_AFTER_DISCONNECT, MAX_LEASE,
        MAX_TTL, MAX_WAIT, MIN_LEASE, MissingKey, Recovery, WaitMode,
    },
    error::{BoxError, StoreError, StoreErrorKind},
    expiry::IDEMPOTENCY_KEY_EXPIRES_IN,
    fingerprint::{BodyFingerprint, Fingerprint, FingerprintHeaders},
    future::ResponseFuture,
    grpc::{GrpcCode, grpc_message},
    inspect::{ClaimInfo, ClaimPage, Inspection, ListCursor, LookupScope, RecordInfo},
    key::{IdempotencyKey, KeyError, KeySource, MAX_KEY_LEN, PeerAddr, StorageKey},
    layer::IdempotencyLayer,
    problem::{Problem, ProblemKind, ProblemResponse},
    record::{MAX_RECORD_HEADERS, Record, RecordError},
    service::Idempotency,
    store::{AdminStore, IdempotencyStore},
};

#[cfg(feature = "postgres")]
pub use crate::store::postgres::PostgresStore;
#[cfg(feature = "redis")]
pub use crate::store::redis::{Durability, RedisStore};
#[cfg(feature = "moka")]
pub use crate::store::{cached::CachedStore, memory::MemoryStore};
