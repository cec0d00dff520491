//! The byte-bounded cache of completed records that [`MemoryStore`](super::memory::MemoryStore)
//! and [`CachedStore`](super::cached::CachedStore) share: one eviction policy, one weigher,
//! one expiry rule.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use moka::{Expiry, notification::RemovalCause, policy::EvictionPolicy, sync::Cache};

use crate::{key::StorageKey, record::Record};

pub(crate) struct RecordCache {
    cache: Cache<StorageKey, Arc<Entry>>,
    evictions: Arc<AtomicU64>,
    capacity: u64,
}

struct Entry {
    record: Record,
    ttl: Duration,
    expires_at: Instant,
}

struct PerEntryTtl;

impl Expiry<StorageKey, Arc<Entry>> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _: &StorageKey,
        entry: &Arc<Entry>,
        _: Instant,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }

    fn expire_after_update(
        &self,
        _: &StorageKey,
        entry: &Arc<Entry>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }
}

impl RecordCache {
    pub(crate) fn new(capacity_bytes: u64) -> Self {
        let evictions = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&evictions);
        let cache = Cache::builder()
            .max_capacity(capacity_bytes)
            .weigher(|_: &StorageKey, entry: &Arc<Entry>| {
                u32::try_from(entry.record.weight()).unwrap_or(u32::MAX)
            })
            // moka's default TinyLFU admission refuses new keys once the cache is full, and
            // their retries would execute again; LRU always admits the newcomer.
            .eviction_policy(EvictionPolicy::lru())
            .expire_after(PerEntryTtl)
            .eviction_listener(move |_, _, cause| {
                if cause == RemovalCause::Size {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        Self {
            cache,
            evictions,
            capacity: capacity_bytes,
        }
    }

    /// The record under `key` and how long it has left.
    pub(crate) fn get(&self, key: &StorageKey) -> Option<(Record, Duration)> {
        let entry = self.cache.get(key)?;
        let left = entry.expires_at.checked_duration_since(Instant::now())?;
        Some((entry.record.clone(), left))
    }

    pub(crate) fn insert(&self, key: StorageKey, record: Record, ttl: Duration) {
        let expires_at = Instant::now() + ttl;
        self.cache.insert(
            key,
            Arc::new(Entry {
                record,
                ttl,
                expires_at,
            }),
        );
    }

    pub(crate) fn evictions(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.evictions.load(Ordering::Relaxed)
    }

    pub(crate) fn len(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }

    /// The entry count without housekeeping first (for `Debug`).
    pub(crate) fn approximate_len(&self) -> u64 {
        self.cache.entry_count()
    }

    pub(crate) fn capacity(&self) -> u64 {
        self.capacity
    }
}
