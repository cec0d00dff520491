//! [`CachedStore`]: completed records kept in process memory in front of another store.

use std::{fmt, sync::Arc, time::Duration};

use super::{Claim, FenceToken, IdempotencyStore, record_cache::RecordCache};
use crate::{
    error::StoreError,
    fingerprint::Fingerprint,
    inspect::{ClaimPage, Inspection, ListCursor},
    key::StorageKey,
    record::Record,
};

/// A cache of completed records in front of another store, usually a remote one.
///
/// Completed records never change, so a replay found here costs no round trip at all. The
/// cache learns a record when this process completes it, and when a claim on the inner store
/// returns one together with its remaining lifetime; it keeps it no longer than the inner
/// store does. Claims, leases and waiting go to the inner store: exactly-once is its job.
///
/// The cache is bounded by bytes and evicts the least recently used records.
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
    records: Arc<RecordCache>,
}

impl<St> CachedStore<St> {
    /// Caches up to `capacity_bytes` of records (as weighed by [`Record::weight`]) in front
    /// of `inner`.
    pub fn new(inner: St, capacity_bytes: u64) -> Self {
        Self {
            inner,
            records: Arc::new(RecordCache::new(capacity_bytes, "cached")),
        }
    }

    /// The store behind the cache.
    pub fn inner(&self) -> &St {
        &self.inner
    }

    /// How many records were evicted to stay within capacity (expired ones are not counted).
    pub fn evictions(&self) -> u64 {
        self.records.evictions()
    }

    /// How many records the cache holds (expired ones included until they are read or
    /// pushed out).
    pub fn record_count(&self) -> u64 {
        self.records.len()
    }
}

impl<St> CachedStore<St> {
    /// Caches a completed record the inner store returned, for no longer than it keeps it.
    fn learn(&self, key: &StorageKey, claim: &Claim) {
        if let Claim::Completed {
            record,
            expires_in: Some(left),
        } = claim
        {
            self.records.insert(*key, record.clone(), *left);
        }
    }
}

impl<St: fmt::Debug> fmt::Debug for CachedStore<St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedStore")
            .field("inner", &self.inner)
            .field("capacity_bytes", &self.records.capacity())
            .field("records", &self.records.approximate_len())
            .finish()
    }
}

impl<St: IdempotencyStore> IdempotencyStore for CachedStore<St> {
    async fn claim(
        &self,
        key: &StorageKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        if let Some((record, left)) = self.records.get(key) {
            return Ok(Claim::Completed {
                record,
                expires_in: Some(left),
            });
        }
        let claim = self.inner.claim(key, fingerprint, lease).await?;
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
        self.records.insert(*key, copy, ttl);
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

    // Take-over and the operator's tools go to the inner store, the one that is shared.

    async fn take_over(
        &self,
        key: &StorageKey,
        abandoned: FenceToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let claim = self
            .inner
            .take_over(key, abandoned, fingerprint, lease)
            .await?;
        self.learn(key, &claim);
        Ok(claim)
    }

    async fn inspect(&self, key: &StorageKey) -> Result<Option<Inspection>, StoreError> {
        self.inner.inspect(key).await
    }

    /// Forgets the record in the inner store and in this cache. Other instances' caches
    /// keep replaying their copy until its TTL ends.
    async fn forget(&self, key: &StorageKey) -> Result<bool, StoreError> {
        let forgotten = self.inner.forget(key).await?;
        self.records.remove(key);
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

    const NAME: &'static str = "cached";
}
