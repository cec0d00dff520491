//! The byte-bounded cache of completed records that [`MemoryStore`](super::memory::MemoryStore)
//! and [`CachedStore`](super::cached::CachedStore) share: one eviction policy, one weigher,
//! one expiry rule.
//!
//! # Expiry without a timer wheel
//!
//! Each record carries its own deadline, checked when it is read: an expired record is never
//! returned (nor removed by the read: see [`RecordCache::get`]). moka's per-entry expiry is not used. It would remove expired
//! records on time, but it does so in its housekeeping, on whichever request thread runs it:
//! when many records expire together (a burst of traffic a TTL ago, such as derived keys with
//! a 60 s window) one request pays for removing all of them. Measured with the load script,
//! that stalled a server for 0.3–0.6 s (p99 from 3 ms to 300–660 ms). Without it, an expired
//! record that nobody asks for again is pushed out by newer records, least recently used
//! first, like any other: the cache never holds more than its capacity either way, and
//! inserts skip the timer wheel.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use moka::{notification::RemovalCause, ops::compute::Op, policy::EvictionPolicy, sync::Cache};
// Tokio's clock is the system's, but tests can pause and advance it.
use tokio::time::Instant;

use crate::{key::StorageKey, layer::config::MAX_TTL, record::Record};

/// Called whenever moka calls back into the cache (weighing a record, evicting one): tests
/// use it to check that no lock of the store is held while moka runs.
#[cfg(test)]
pub(crate) type Probe = Arc<dyn Fn() + Send + Sync>;

pub(crate) struct RecordCache {
    cache: Cache<StorageKey, Entry, foldhash::fast::RandomState>,
    evictions: Arc<AtomicU64>,
    reported: Arc<crate::observe::EvictionCounter>,
    /// The weight of the records put in, less those that left: what the cache holds, its
    /// writes not yet applied by the housekeeping included.
    weight: Arc<AtomicU64>,
    capacity: u64,
}

// Cheap to clone: the record is shared, not copied.
#[derive(Clone)]
struct Entry {
    record: Record,
    expires_at: Instant,
    stored_at: SystemTime,
}

impl Entry {
    /// How long the record has left, `None` once expired.
    fn left(&self, now: Instant) -> Option<Duration> {
        self.expires_at
            .checked_duration_since(now)
            .filter(|left| !left.is_zero())
    }
}

impl RecordCache {
    /// A cache of `capacity_bytes`, its evictions counted (and, with the `metrics`
    /// feature, reported with the label `store = name`).
    pub(crate) fn new(capacity_bytes: u64, name: &'static str) -> Self {
        Self::build(capacity_bytes, name, || {})
    }

    #[cfg(test)]
    pub(crate) fn with_probe(capacity_bytes: u64, name: &'static str, probe: Probe) -> Self {
        Self::build(capacity_bytes, name, move || probe())
    }

    fn build(
        capacity_bytes: u64,
        name: &'static str,
        probe: impl Fn() + Clone + Send + Sync + 'static,
    ) -> Self {
        let evictions = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&evictions);
        let reported = Arc::new(crate::observe::EvictionCounter::new(name));
        let (weighed, listener_reported) = (probe.clone(), Arc::clone(&reported));
        let weight = Arc::new(AtomicU64::new(0));
        let left = Arc::clone(&weight);
        let cache = Cache::builder()
            .max_capacity(capacity_bytes)
            // Sized for records of a few KiB, so that a filling store does not rehash its
            // table over and over; capped so a large store does not reserve it all up front.
            .initial_capacity(
                usize::try_from(capacity_bytes / 4096)
                    .unwrap_or(0)
                    .min(16_384),
            )
            .weigher(move |_: &StorageKey, entry: &Entry| {
                weighed();
                u32::try_from(entry.record.weight()).unwrap_or(u32::MAX)
            })
            // moka's default TinyLFU admission refuses new keys once the cache is full, and
            // their retries would execute again; LRU always admits the newcomer.
            .eviction_policy(EvictionPolicy::lru())
            // An expired record pushed out is not an eviction: it was of no use any more.
            .eviction_listener(move |_, entry: Entry, cause| {
                probe();
                // Called for every record that leaves, replaced or removed ones included.
                let gone = weight_of(&entry.record);
                let _ = left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                    Some(held.saturating_sub(gone))
                });
                if cause == RemovalCause::Size && entry.left(Instant::now()).is_some() {
                    counter.fetch_add(1, Ordering::Relaxed);
                    listener_reported.increment();
                }
            })
            // Keys are digests: a fast seeded hasher is enough, SipHash is not needed.
            .build_with_hasher(foldhash::fast::RandomState::default());
        Self {
            cache,
            evictions,
            reported,
            weight,
            capacity: capacity_bytes,
        }
    }

    /// The record under `key` and how long it has left; `None` for an expired record.
    pub(crate) fn get(&self, key: &StorageKey) -> Option<(Record, Duration)> {
        // A miss through `get` is queued for the housekeeping (for TinyLFU's frequency
        // sketch, which LRU does not use); a first execution looks up a key that is never
        // here: a plain look-up first keeps that off its path.
        if !self.cache.contains_key(key) {
            return None;
        }
        let entry = self.cache.get(key)?;
        // An expired record is left in place, never removed here: between this read and a
        // removal, a newer record may have been stored under the key (the reader descheduled
        // while another request claimed, ran and completed), and removing it would let the
        // next claim run the handler again. moka has no remove-if-unchanged that holds against
        // a plain insert (`and_compute_with` only excludes other computations), so the expired
        // record stays until the key's next record replaces it or the LRU pushes it out.
        let left = entry.left(Instant::now())?;
        Some((entry.record, left))
    }

    pub(crate) fn insert(&self, key: StorageKey, record: Record, ttl: Duration) {
        self.insert_until(key, record, expires_at(ttl));
    }

    /// Inserts `record` unless the cache holds an unexpired record under `key` already
    /// (records are final: it is the same one), sparing the cache's bookkeeping. An expired
    /// one held is replaced.
    pub(crate) fn insert_new(&self, key: StorageKey, record: Record, ttl: Duration) {
        let held = self.cache.contains_key(&key)
            && self
                .cache
                .get(&key)
                .is_some_and(|entry| entry.left(Instant::now()).is_some());
        if !held {
            self.insert(key, record, ttl);
        }
    }

    pub(crate) fn insert_until(&self, key: StorageKey, record: Record, expires_at: Instant) {
        let stored_at = SystemTime::now();
        self.weight.fetch_add(weight_of(&record), Ordering::Relaxed);
        self.cache.insert(
            key,
            Entry {
                record,
                expires_at,
                stored_at,
            },
        );
    }

    /// Puts `record` under `key` if `still_current()` says so when the cache holds the key's
    /// entry for it: the caller's look that it is the key's newest record, made with no
    /// other write to the key possible in between. Every other write of the key must go
    /// through here too: a plain insert is not held off by it.
    pub(crate) fn promote(
        &self,
        key: StorageKey,
        record: Record,
        expires_at: Instant,
        stored_at: SystemTime,
        still_current: impl FnOnce() -> bool,
    ) {
        self.cache.entry(key).and_compute_with(|_| {
            if still_current() {
                self.weight.fetch_add(weight_of(&record), Ordering::Relaxed);
                Op::Put(Entry {
                    record,
                    expires_at,
                    stored_at,
                })
            } else {
                Op::Nop
            }
        });
    }

    /// The weight of the records held, those on their way in included (the cache itself
    /// counts them at its next housekeeping).
    pub(crate) fn weight(&self) -> u64 {
        self.weight.load(Ordering::Relaxed)
    }

    /// The unexpired record under `key`, when it was stored and when it expires (by the
    /// system clock), for inspection.
    pub(crate) fn inspect(&self, key: &StorageKey) -> Option<(Record, SystemTime, SystemTime)> {
        let entry = self.cache.get(key)?;
        let left = entry.left(Instant::now())?;
        Some((entry.record, entry.stored_at, SystemTime::now() + left))
    }

    /// Removes the unexpired record under `key`; whether there was one.
    pub(crate) fn remove(&self, key: &StorageKey) -> bool {
        self.cache
            .remove(key)
            .is_some_and(|entry| entry.left(Instant::now()).is_some())
    }

    /// Counts a live record pushed out of another table the cache's owner keeps beside it,
    /// as one of this cache's evictions.
    pub(crate) fn count_eviction(&self) {
        self.evictions.fetch_add(1, Ordering::Relaxed);
        self.reported.increment();
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

/// What a record weighs (as the cache's weigher says).
fn weight_of(record: &Record) -> u64 {
    u64::from(u32::try_from(record.weight()).unwrap_or(u32::MAX))
}

/// When a record stored now for `ttl` expires. Capped at [`MAX_TTL`], so that no TTL, however
/// large, overflows the clock.
pub(crate) fn expires_at(ttl: Duration) -> Instant {
    Instant::now() + ttl.min(MAX_TTL)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::{HeaderMap, Method, StatusCode, Uri};

    use super::*;
    use crate::fingerprint::Fingerprint;

    fn record(body: &'static [u8]) -> Record {
        let fingerprint = Fingerprint::of(&Method::POST, &Uri::from_static("/"), b"");
        let body = Bytes::from_static(body);
        Record::response(fingerprint, StatusCode::OK, &HeaderMap::new(), body, None)
    }

    fn key(n: u8) -> StorageKey {
        StorageKey::from_bytes([n; 32])
    }

    #[test]
    fn a_new_record_is_inserted_only_under_a_key_the_cache_does_not_hold() {
        let cache = RecordCache::new(1 << 20, "test");
        let ttl = Duration::from_secs(60);
        cache.insert(key(1), record(b"first"), ttl);
        cache.insert_new(key(1), record(b"second"), ttl);
        let (kept, _) = cache.get(&key(1)).unwrap();
        assert_eq!(kept, record(b"first"));
        cache.insert_new(key(2), record(b"other"), ttl);
        let (other, _) = cache.get(&key(2)).unwrap();
        assert_eq!(other, record(b"other"));
    }

    #[test]
    fn an_unknown_key_is_a_miss_and_an_expired_record_is_not_returned() {
        let cache = RecordCache::new(1 << 20, "test");
        assert!(cache.get(&key(1)).is_none());
        cache.insert_until(key(1), record(b"gone"), Instant::now());
        assert!(cache.get(&key(1)).is_none());
        assert!(cache.inspect(&key(1)).is_none());
    }

    #[test]
    fn an_expired_record_is_replaced_by_the_next_one_learned() {
        let cache = RecordCache::new(1 << 20, "test");
        cache.insert_until(key(1), record(b"old"), Instant::now());
        cache.insert_new(key(1), record(b"new"), Duration::from_secs(60));
        let (kept, _) = cache.get(&key(1)).unwrap();
        assert_eq!(kept, record(b"new"));
    }
}
