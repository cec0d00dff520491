//! [`MemoryStore`]: the embedded store for a single instance.
//!
//! `shard` holds the claims and the invariant that keeps them exactly-once; `fifo` the
//! records completed and not asked for since; `store` the
//! [`IdempotencyStore`](crate::IdempotencyStore) operations over them and the cache of records
//! asked for again.

mod fifo;
mod handle;
mod list;
mod shard;
mod store;

pub use self::handle::MemoryStore;
