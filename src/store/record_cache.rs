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
    cache: Cache<StorageKey, Entry, foldhash::fast::RandomState>,
    evictions: Arc<AtomicU64>,
    capacity: u64,
}

// Cheap to clone: the record is shared, not copied.
#[derive(Clone)]
struct Entry {
    record: Record,
    ttl: Duration,
    expires_at: Instant,
}

struct PerEntryTtl;

impl Expiry<StorageKey, Entry> for PerEntryTtl {
    fn expire_after_create(&self, _: &StorageKey, entry: &Entry, _: Instant) -> Option<Duration> {
        Some(entry.ttl)
    }

    fn expire_after_update(
        &self,
        _: &StorageKey,
        entry: &Entry,
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
            // Sized for records of a few KiB, so that a filling store does not rehash its
            // table over and over; capped so a large store does not reserve it all up front.
            .initial_capacity(
                usize::try_from(capacity_bytes / 4096)
                    .unwrap_or(0)
                    .min(16_384),
            )
            .weigher(|_: &StorageKey, entry: &Entry| {
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
            // Keys are digests: a fast seeded hasher is enough, SipHash is not needed.
            .build_with_hasher(foldhash::fast::RandomState::default());
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
        Some((entry.record, left))
    }

    pub(crate) fn insert(&self, key: StorageKey, record: Record, ttl: Duration) {
        let expires_at = Instant::now() + ttl;
        self.cache.insert(
            key,
            Entry {
                record,
                ttl,
                expires_at,
            },
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
