//! [`RedisStore`](crate::RedisStore): one store shared by every instance of a service
//! (feature `redis`).
//!
//! # Layout in Redis
//!
//! One key per record, `{prefix}{hex digest}` (default prefix `idempotency:`), so keys spread
//! over the slots of a Redis Cluster and every operation touches exactly one key. The key
//! holds either
//!
//! - an **in-flight marker** (61 bytes, format version 2: magic `TIF`, version, flags, the
//!   owner's fence token, the request fingerprint, when it was claimed, and the retention of
//!   an abandoned claim) expiring `lease + retention` after its claim or last renewal, or
//! - a **completed envelope** (magic `TIC`, version, the key's expiry as Unix milliseconds
//!   by Redis's clock, the TTL, then the record in [`Record::encode`](crate::Record::encode)'s versioned binary
//!   form), with the record TTL as its expiry.
//!
//! A claim's lease has ended once the key's remaining time (`PTTL`, Redis's clock) is down to
//! the retention ([`RedisStore::with_abandoned_retention`], 24 h by default). The marker
//! stays that long after its lease, so that a request finding it learns that the owner
//! stopped without completing ([`Claim::Abandoned`](crate::Claim::Abandoned)) rather than finding the key free.
//!
//! **Changed in this version** (marker format 1 → 2): format 1 markers expired with their
//! lease (`PX lease`), so nothing was left of an abandoned claim. This version still reads
//! format 1 markers (claims made by an older instance during a rolling deploy keep their
//! meaning); an older instance reading a format 2 marker reports it corrupt (503 for that
//! key until the claim ends), so deploy while traffic on in-flight keys is low, or all at
//! once.
//!
//! # Round trips
//!
//! Claim-or-replay is one native command, `SET key marker NX PX expiry GET`: a nil reply
//! means the claim is ours, a value is what holds the key. It is as cheap for Redis as a
//! plain `GET`, which a replay amounts to. Only when the value is a marker does the claim
//! take a second round trip: a script (`held.lua`) that judges by Redis's clock whether that
//! claim's lease has ended (it may have, since the marker outlives it) and claims the key if
//! it is free by then. Complete, release and renew are one Lua script each (`EVALSHA`),
//! fenced by the claim's token. Taking over an abandoned claim is the same script as the
//! claim's second step, fenced by the abandoned claim's token. The first call of a script on
//! a server that does not know it costs one more command (`EVAL`, which also caches it
//! there).
//!
//! A claim does not learn the key's remaining lifetime from Redis: it reads it from the
//! envelope, against the local clock (see [`RedisStore`] on clocks).
//!
//! # Inspection
//!
//! Looking a key up is one read-only script (its value, `PTTL` and `TIME`); forgetting a
//! record and breaking a claim are one script each, which change the key only if it holds
//! what they remove. Listing claims scans the prefix with `SCAN … MATCH {prefix}* COUNT n`
//! (cursor-based, a bounded number of keys per page) on the server, or on each primary of a
//! Redis Cluster in turn (found with `CLUSTER NODES`, reached with the store's connection
//! settings); the cursor names the primary and its `SCAN` cursor.
//!
//! # Waiting
//!
//! The claim that finds a live claim flags it (the script that judged it does, in the same
//! round trip); when a flagged claim is completed, released or broken, the script publishes
//! the key on the store's channel (`{prefix}notifications`), so claims that nobody found in
//! flight publish nothing. Each store keeps one subscriber connection, opened on the first
//! claim found in flight or the first wait and shared by all its waiters, that wakes the
//! waiters of that key (waiters on the instance that completed are woken at once, without the
//! message).
//!
//! A duplicate that waits on another instance's request so takes three round trips in all:
//! the claim (`SET … NX GET`, which returns the marker), the script judging and flagging it,
//! then, once woken, the claim again, which returns the record. The wait itself asks nothing
//! of Redis: the claim registered for the key's end before the script flagged it, so an end
//! published before the wait begins still ends it at once. The wait looks at the claim (one
//! more script) only when there may be news it missed: when the claim's lease runs out (its
//! owner may be gone), whenever the subscription is re-established (messages may have been
//! lost meanwhile) and, as a last resort, after a bounded poll interval.
//!
//! # High availability
//!
//! - **Replicas acknowledged** ([`RedisStore::with_durability`]): a claim and a completion
//!   are followed, in the same pipeline (one round trip; on a cluster, to the key's own
//!   node), by `WAIT n timeout` (and `WAITAOF 1 0 timeout` with local fsync). A claim
//!   acknowledged short is refused (503) and released; a completion acknowledged short is
//!   kept, counted and logged: see [`Durability`]. Redis runs a client's commands in order
//!   and `WAIT` holds the connection's later commands until it returns, so with a replica
//!   that lags, every command of the store waits behind it.
//! - **Sentinel** ([`RedisStore::connect_sentinel`]): the connection and the notification
//!   subscriber ask the Sentinels for the primary, again after a failure: see
//!   [`SentinelConnection`].
//! - **Eviction guard**: `connect`, `connect_cluster` and `connect_sentinel` read
//!   `maxmemory-policy` and warn if Redis may evict claims and records, or if it refuses
//!   `CONFIG GET` (the check is then skipped); neither fails.
//!
//! [`RedisStore`]: crate::RedisStore
//! [`RedisStore::connect_sentinel`]: crate::RedisStore::connect_sentinel
//! [`RedisStore::with_abandoned_retention`]: crate::RedisStore::with_abandoned_retention
//! [`RedisStore::with_durability`]: crate::RedisStore::with_durability

// Files:
// `store.rs` the `IdempotencyStore` and
// `AdminStore` implementations;
// `connect.rs` constructors, settings and the response timeout; `script.rs` the Lua scripts
// (the `.lua` files beside it) and running them; `codec.rs` the marker and envelope bytes;
// `notify.rs` waiting and pub/sub wake-ups; `error.rs` Redis errors as
// `StoreError`s; `inspect.rs` the operator's look-ups and listings;
// `durability.rs` the `Durability` setting and the verdict on `WAIT`'s replies;
// `acknowledge.rs` sending a write with its `WAIT` and acting on the verdict;
// `key.rs` a storage key's name in Redis; `eviction.rs` the eviction guard; `sentinel.rs`
// `SentinelConnection` and the constructors that make one; `resolver.rs` asking the Sentinels
// for the primary.

mod acknowledge;
mod codec;
pub(crate) mod connect;
mod durability;
mod error;
mod eviction;
mod inspect;
mod key;
mod lanes;
mod notify;
mod resolver;
mod script;
mod sentinel;
mod store;

#[cfg(any(test, fuzzing))]
pub(crate) use self::codec::{check_envelope, check_marker};
pub use self::connect::{
    DEFAULT_ABANDONED_RETENTION, DEFAULT_POLL_INTERVAL, DEFAULT_PREFIX, DEFAULT_RESPONSE_TIMEOUT,
};
pub use self::durability::{DEFAULT_ACK_TIMEOUT, Durability};
pub use self::sentinel::SentinelConnection;
