// The README is the crate's front page. docs/rustdoc-links.md, put first here and on each
// page of `guide` below, points the README's and the pages' links to docs/*.md at intra-doc
// paths: the first definition of a Markdown link label wins, and relative links to .md files
// work on GitHub, not on docs.rs. A label a page uses needs a line there (scripts/test.sh
// fails on a .md link left in the built docs). Doc tests of the README and the pages are
// reported under that file's name, at the page's line plus its line count.
#![doc = include_str!("../docs/rustdoc-links.md")]
#![doc = include_str!("../README.md")]
//!
//! ## Where each item is
//!
//! Every public item has one path. At the crate root: what an application names to protect
//! a service (the layer, its service, future and bodies, the settings, key sources, problems,
//! the header names and bounds) and what a store author names to implement
//! [`IdempotencyStore`] and [`AdminStore`] (the traits, [`Claim`], [`FenceToken`], [`Record`],
//! [`Fingerprint`], [`StorageKey`], [`StoreError`], the inspection types), and the stores:
//! `MemoryStore`, `CachedStore`, `RedisStore`, `PostgresStore`. In a module named after its
//! feature: what only that feature's users need, such as a store's settings types, helper
//! types and defaults (`redis`: `Durability`, `SentinelConnection`; `postgres`:
//! `HandlerTransaction`, `Purger`) and the operators' router (`admin`). A store's own
//! bounds are associated constants (`MemoryStore::MIN_CAPACITY_BYTES`).
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
mod store;

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
    protocol::grpc::GrpcCode,
    record::{MAX_RECORD_HEADERS, Record, RecordError},
    store::claim::{Claim, FenceToken},
    store::error::{BoxError, StoreError, StoreErrorKind},
    store::inspect::{ClaimInfo, ClaimPage, Inspection, ListCursor, LookupScope, RecordInfo},
    store::{AdminStore, IdempotencyStore},
};

#[cfg(feature = "postgres")]
pub use crate::store::postgres::{self, connect::PostgresStore};
#[cfg(feature = "redis")]
pub use crate::store::redis::{self, connect::RedisStore};
#[cfg(feature = "moka")]
pub use crate::store::{cached::CachedStore, memory::MemoryStore};

/// Guides: the pages of `docs/` in the repository, each one link away from the crate's front
/// page.
///
/// Documentation only: these modules hold no items, and exist only when the docs are built
/// (`cfg(doc)`) or their examples run (`cfg(doctest)`: the pages' Rust blocks are compiled and
/// run as doc tests, as the README's are).
#[cfg(any(doc, doctest))]
pub mod guide {
    #[doc = include_str!("../docs/rustdoc-links.md")]
    #[doc = include_str!("../docs/how-it-works.md")]
    pub mod how_it_works {}

    #[doc = include_str!("../docs/rustdoc-links.md")]
    #[doc = include_str!("../docs/stores.md")]
    pub mod stores {}

    #[doc = include_str!("../docs/rustdoc-links.md")]
    #[doc = include_str!("../docs/recipes.md")]
    pub mod recipes {}

    #[doc = include_str!("../docs/rustdoc-links.md")]
    #[doc = include_str!("../docs/operating.md")]
    pub mod operating {}

    #[doc = include_str!("../docs/rustdoc-links.md")]
    #[doc = include_str!("../docs/performance.md")]
    pub mod performance {}

    #[doc = include_str!("../docs/rustdoc-links.md")]
    #[doc = include_str!("../docs/reliability.md")]
    pub mod reliability {}

    #[doc = include_str!("../docs/rustdoc-links.md")]
    #[doc = include_str!("../docs/mutation-testing.md")]
    pub mod mutation_testing {}
}
