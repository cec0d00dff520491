#![doc = include_str!("../README.md")]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]
#![deny(unreachable_pub)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
mod config;
mod error;
mod execute;
mod fingerprint;
mod future;
// The fuzz targets' entry points; compiled for tests too, so that CI (stable, no cargo-fuzz)
// builds and runs them.
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzzing;
mod key;
mod layer;
mod lease;
mod observe;
mod problem;
mod record;
mod service;
pub mod store;

pub use crate::{
    body::{RequestBody, ResponseBody},
    config::{
        FailMode, IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, MAX_LEASE, MAX_TTL, MAX_WAIT, MIN_LEASE,
        MissingKey, WaitMode,
    },
    error::{BoxError, StoreError, StoreErrorKind},
    fingerprint::Fingerprint,
    future::ResponseFuture,
    key::{IdempotencyKey, KeyError, KeySource, MAX_KEY_LEN, StorageKey},
    layer::IdempotencyLayer,
    problem::{Problem, ProblemKind},
    record::{MAX_RECORD_HEADERS, Record, RecordError},
    service::Idempotency,
    store::{Claim, FenceToken, IdempotencyStore},
};

#[cfg(feature = "redis")]
pub use crate::store::redis::RedisStore;
#[cfg(feature = "moka")]
pub use crate::store::{cached::CachedStore, memory::MemoryStore};
