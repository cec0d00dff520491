//! [`CachedStore`]: completed records kept in process memory in front of another store.

use std::{fmt, sync::Arc, time::Duration};

// Tokio's clock is the system's, but tests can pause and advance it.
use tokio::time::Instant;

use super::{
    AdminStore, Claim, FenceToken, IdempotencyStore,
    recent::{Inserted, Recent},
    record_cache::{self, RecordCache},
};
use crate::{
    fingerprint::Fingerprint,
    key::StorageKey,
    record::Record,
    store::error::StoreError,
    store::inspect::{ClaimPage, Inspection, ListCursor},
};

/// A cache of completed records in front of another store, usually a remote one.
///
/// Completed records never change, so a replay found here costs no round trip at all.
/// Claims, leases and waiting go to the inner store: exactly-once is its job.
///
/// # What it keeps
///
/// Most completed requests are never retried, so the cache keeps records in two parts, which
/// together never weigh more than `capacity_bytes`:
///
/// - **Records this process completed** go to a small table of recent completions (1 MiB, or
///   a quarter of the capacity if that is less), with one slot per key where a newer record
///   takes the place of an older one. Storing one there costs a first execution one
///   uncontended lock and no allocation on top of the inner store's completion, so a
///   response nobody asks for again costs next to nothing. The table is small on purpose: it
///   serves duplicates held while the first request ran, and retries that come soon after;
///   keeping more records for longer slowed every first execution (their memory goes cold
///   before it is freed). A record too large for what the table has left is not kept there.
/// - **Records asked for again** (a replay, or a duplicate held while the first request ran)
///   move to a least-recently-used cache (the rest of the capacity): from the table of recent
///   completions, or from the inner store when a claim there returns one together with its
///   remaining lifetime. Every later replay of them is served from memory.
///
/// So the first replay of a record completed here is served from memory while the record is
/// still among the recent completions; once newer completions took its slot, the first replay
/// asks the inner store once (as it would on any other instance), and the later ones are
/// served from memory. The cache keeps a record no longer than the inner store does.
///
/// `CachedStore` is a cheap `Clone` handle: clones share the cache.
///
/// ```
/// use tower_idempotency::{CachedStore, IdempotencyLayer, MemoryStore};
///
/// # let remote = MemoryStore::default();
/// // `remote` would be a `RedisStore` shared by many instances.
/// let layer = IdempotencyLayer::new(CachedStore::new(remote, 32 * 1024 * 1024));
/// ```
///
/// # Caveat
///
/// A record deleted from the inner store before its TTL (by hand, or by Redis evicting under
/// `maxmemory`) is still replayed by instances that cached it, until its TTL ends.
#[derive(Clone)]
pub struct CachedStore<St> {
    inner: St,
    caches: Arc<Caches>,
}

struct Caches {
    /// Records asked for again.
    replayed: RecordCache,
    /// Records this process completed, not asked for since.
    recent: Recent,
}

/// The most the table of recent completions holds: 1 MiB, 256 slots. With 16 MiB, the load
/// script measured 9–11 % more server CPU per first execution than `RedisStore` alone (each
/// completion freeing a record long gone cold); with 1 MiB, a median of 1 % (README,
/// Performance).
const RECENT_MAX_BYTES: u64 = 1 << 20;
/// The share of a smaller capacity that holds recent completions: one part in this many.
const RECENT_SHARE: u64 = 4;

impl<St> CachedStore<St> {
    /// Caches up to `capacity_bytes` of records (as weighed by [`Record::weight`]) in front
    /// of `inner`.
    pub fn new(inner: St, capacity_bytes: u64) -> Self {
        let recent = (capacity_bytes / RECENT_SHARE).min(RECENT_MAX_BYTES);
        Self {
            inner,
            caches: Arc::new(Caches {
                replayed: RecordCache::new(capacity_bytes - recent, "cached"),
                recent: Recent::new(recent),
            }),
        }
    }

    /// The store behind the cache.
    pub fn inner(&self) -> &St {
        &self.inner
    }

    /// How many live records were pushed out to stay within capacity (expired ones are not
    /// counted): by other records asked for again, or from the table of recent completions
    /// by newer ones.
    pub fn evictions(&self) -> u64 {
        self.caches.replayed.evictions()
    }

    /// How many records the cache holds (expired ones included until they are replaced or
    /// pushed out; the table of recent completions drops them when read).
    pub fn record_count(&self) -> u64 {
        self.caches.replayed.len() + self.caches.recent.len()
    }
}

impl<St> CachedStore<St> {
    /// The record under `key` if this process holds it, as a claim would return it.
    fn cached(&self, key: &StorageKey) -> Option<Claim> {
        let Caches { replayed, recent } = &*self.caches;
        // The recent completions first: should the other cache still hold an older record of
        // the key (the inner store lost it, and the key executed again), the newer one wins.
        let (record, left) = match recent.take(key) {
            Some((record, expires_at)) => {
                let left = expires_at
                    .checked_duration_since(Instant::now())
                    .filter(|left| !left.is_zero())?;
                // Asked for again: worth the LRU cache's bookkeeping now.
                replayed.insert_until(*key, record.clone(), expires_at);
                (record, left)
            }
            None => replayed.get(key)?,
        };
        Some(Claim::Completed {
            record,
            expires_in: Some(left),
        })
    }

    /// Caches a completed record the inner store returned, for no longer than it keeps it.
    fn learn(&self, key: &StorageKey, claim: &Claim) {
        if let Claim::Completed {
            record,
            expires_in: Some(left),
        } = claim
        {
            // Duplicates woken together each fetch the record: the first one keeps it.
            self.caches.replayed.insert_new(*key, record.clone(), *left);
        }
    }
}

impl<St: fmt::Debug> fmt::Debug for CachedStore<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedStore")
            .field("inner", &self.inner)
            .field(
                "capacity_bytes",
                &(self.caches.replayed.capacity() + self.caches.recent.budget()),
            )
            .field(
                "records",
                &(self.caches.replayed.approximate_len() + self.caches.recent.len()),
            )
            .finish()
    }
}

impl<St: IdempotencyStore> IdempotencyStore for CachedStore<St> {
    async fn claim_as(
        &self,
        key: &StorageKey,
        token: FenceToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        if let Some(completed) = self.cached(key) {
            return Ok(completed);
        }
        let claim = self.inner.claim_as(key, token, fingerprint, lease).await?;
        self.learn(key, &claim);
        Ok(claim)
    }

    async fn complete(
        &self,
        key: &StorageKey,
        token: FenceToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let copy = record.clone();
        self.inner.complete(key, token, record, ttl).await?;
        let caches = &*self.caches;
        let held = caches
            .recent
            .insert(*key, copy, record_cache::expires_at(ttl));
        if held == (Inserted::Held { pushed_out: true }) {
            caches.replayed.count_eviction();
        }
        Ok(())
    }

    async fn release(&self, key: &StorageKey, token: FenceToken) -> Result<(), StoreError> {
        self.inner.release(key, token).await
    }

    async fn renew(
        &self,
        key: &StorageKey,
        token: FenceToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.inner.renew(key, token, lease).await
    }

    async fn wait(&self, key: &StorageKey, timeout: Duration) -> Result<(), StoreError> {
        self.inner.wait(key, timeout).await
    }

    // Take-over goes to the inner store, the one that is shared.

    async fn take_over_as(
        &self,
        key: &StorageKey,
        abandoned: FenceToken,
        token: FenceToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let claim = self
            .inner
            .take_over_as(key, abandoned, token, fingerprint, lease)
            .await?;
        self.learn(key, &claim);
        Ok(claim)
    }

    fn prepare_handler(
        &self,
        key: &StorageKey,
        token: FenceToken,
        extensions: &mut http::Extensions,
    ) -> bool {
        self.inner.prepare_handler(key, token, extensions)
    }

    const NAME: &'static str = "cached";
}

/// The operator tools when the inner store has them: each goes to the inner store, and `forget`
/// also drops this cache's copy.
impl<St: AdminStore> AdminStore for CachedStore<St> {
    async fn inspect(&self, key: &StorageKey) -> Result<Option<Inspection>, StoreError> {
        self.inner.inspect(key).await
    }

    /// Forgets the record in the inner store and in this cache. Other instances' caches
    /// keep replaying their copy until its TTL ends.
    async fn forget(&self, key: &StorageKey) -> Result<bool, StoreError> {
        let forgotten = self.inner.forget(key).await?;
        self.caches.recent.remove(key);
        self.caches.replayed.remove(key);
        Ok(forgotten)
    }

    async fn break_claim(&self, key: &StorageKey) -> Result<Option<FenceToken>, StoreError> {
        self.inner.break_claim(key).await
    }

    async fn list_claims(
        &self,
        older_than: Duration,
        cursor: Option<ListCursor>,
        limit: usize,
    ) -> Result<ClaimPage, StoreError> {
        self.inner.list_claims(older_than, cursor, limit).await
    }
}
