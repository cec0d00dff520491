//! [`MemoryStore`] itself: the handle, its constructors and counters, and the moves of a
//! record between the recent completions and the cache of records asked for again.

use std::{fmt, sync::Arc};

use tokio::time::Instant;

use super::{
    fifo::Fifo,
    shard::{Shard, lock, new_shards, shard_index},
};
use crate::store::{Claim, record_cache::RecordCache};
use crate::{key::StorageKey, record::Record};

/// An in-process store: completed records bounded by bytes, with a per-record TTL; in-flight
/// claims beside them.
///
/// A completed record is first held in a queue of recent completions, oldest pushed out
/// first, which costs a first execution one short lock and no allocation; a record asked for
/// again moves to a [moka] cache of records, least recently used pushed out first, which
/// holds up to half the capacity (the recent completions have the rest, and all of it while
/// the cache is empty). Most records are never asked for again: they never pay for the
/// cache's bookkeeping.
///
/// - **Claims in flight are never evicted.** They live outside the cache, in sharded maps
///   bounded by the number of requests in flight, and leave only when completed, released,
///   or taken over after their lease expired.
/// - **A new record is always admitted** (if it weighs at most half the capacity). The oldest
///   records make room for it, never the newcomer (moka's default TinyLFU admission would
///   refuse new keys once full, and their retries would execute again). Evictions are
///   counted: [`evictions`](Self::evictions).
/// - **Expiry costs nothing up front.** A record's TTL is checked when it is read; an expired
///   record is never replayed; it stays until its key's next record replaces it or newer
///   records push it out (a read never removes it: it might remove a newer record). So
///   many records expiring at once never stall a request that happens to clean them up.
/// - **No lock is held while the cache works.** moka may evict records inline, in whichever
///   call runs its housekeeping; that call is never made under a lock other requests wait
///   on. A replay takes one short lock (the recent completions' look-up), no claim's.
/// - **Waiters are notified**, not polled: a duplicate waiting on a claim wakes the moment it
///   is completed or released, or when its lease runs out.
///
/// TTLs longer than [`MAX_TTL`](crate::MAX_TTL) and leases longer than
/// [`MAX_LEASE`](crate::MAX_LEASE) are clamped to them.
///
/// `MemoryStore` is a cheap `Clone` handle: clones share the same records. It serves one
/// process; instances behind a load balancer need a shared store.
///
/// [moka]: https://docs.rs/moka
#[derive(Clone)]
pub struct MemoryStore {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    /// Records asked for again.
    pub(super) records: RecordCache,
    /// Records completed and not asked for since.
    pub(super) recent: Fifo,
    capacity: u64,
    pub(super) shards: Arc<[Shard]>,
}

/// The share of the capacity the cache of records asked for again may take: one part in this
/// many (the recent completions always have the rest).
const REPLAYED_SHARE: u64 = 2;

impl MemoryStore {
    /// The capacity of [`MemoryStore::default`]: 64 MiB of records.
    pub const DEFAULT_CAPACITY_BYTES: u64 = 64 * 1024 * 1024;

    /// The smallest capacity [`MemoryStore::new`] accepts: 64 KiB, room for a few dozen small
    /// records. A store with less keeps next to nothing, so retries would execute again; a
    /// capacity read from configuration in the wrong unit (64 for 64 MiB) is caught here.
    pub const MIN_CAPACITY_BYTES: u64 = 64 * 1024;

    /// A store holding up to `capacity_bytes` of records (as weighed by
    /// [`Record::weight`](crate::Record::weight)).
    ///
    /// ```
    /// use tower_idempotency::MemoryStore;
    ///
    /// let store = MemoryStore::new(256 * 1024 * 1024);
    /// ```
    ///
    /// # Panics
    ///
    /// If `capacity_bytes` is less than [`MIN_CAPACITY_BYTES`](Self::MIN_CAPACITY_BYTES)
    /// (64 KiB): such a store would keep next to nothing, and retries would execute again.
    pub fn new(capacity_bytes: u64) -> Self {
        assert!(
            capacity_bytes >= Self::MIN_CAPACITY_BYTES,
            "MemoryStore::new: the capacity must be at least MemoryStore::MIN_CAPACITY_BYTES \
             ({} bytes), got {capacity_bytes}",
            Self::MIN_CAPACITY_BYTES
        );
        let records = RecordCache::new(capacity_bytes / REPLAYED_SHARE, "memory");
        Self::with_records(records, capacity_bytes, new_shards())
    }

    fn with_records(records: RecordCache, capacity: u64, shards: Arc<[Shard]>) -> Self {
        Self {
            inner: Arc::new(Inner {
                records,
                recent: Fifo::new(),
                capacity,
                shards,
            }),
        }
    }

    /// How many records were evicted to stay within capacity (expired ones are not counted).
    pub fn evictions(&self) -> u64 {
        self.inner.records.evictions()
    }

    /// How many completed records the store holds (expired ones included until they are
    /// replaced or pushed out).
    pub fn record_count(&self) -> u64 {
        self.inner.records.len() + self.inner.recent.len()
    }

    /// How many keys are claimed by requests in flight.
    pub fn in_flight_count(&self) -> usize {
        let now = Instant::now();
        self.inner
            .shards
            .iter()
            .map(|shard| {
                lock(&shard.claims)
                    .values()
                    .filter(|slot| slot.is_live_claim(now))
                    .count()
            })
            .sum()
    }

    pub(super) fn shard(&self, key: &StorageKey) -> &Shard {
        &self.inner.shards[shard_index(key)]
    }

    /// Holds a completed record among the recent completions, the oldest records making
    /// room for it in what the cache of records asked for again leaves of the capacity.
    pub(super) fn keep(&self, key: StorageKey, record: Record, expires_at: Instant) {
        let Inner {
            records,
            recent,
            capacity,
            ..
        } = &*self.inner;
        // The cache's share is bounded, so that a count gone wrong could never starve the
        // recent completions; it may go past its share until its next housekeeping.
        let room = capacity - records.weight().min(capacity / REPLAYED_SHARE);
        let inserted = recent.insert(key, record, expires_at, room);
        for _ in 0..inserted.pushed_out {
            records.count_eviction();
        }
    }

    /// The unexpired record under `key`, as a claim returns it; a record found among the
    /// recent completions moves to the cache of records asked for again.
    pub(super) fn completed(&self, key: &StorageKey) -> Option<Claim> {
        let Inner {
            records, recent, ..
        } = &*self.inner;
        // The recent completions first: a record moves from there to the cache, and is in
        // the cache before it leaves them, so a look that misses it there finds it next.
        // (A look the other way round could miss it in both while it moves.)
        if let Some(found) = recent.get(key) {
            let left = found
                .expires_at
                .checked_duration_since(Instant::now())
                .filter(|left| !left.is_zero())?;
            let serial = found.serial;
            // Put only while the recent completions still hold it: had it left them since
            // (pushed out, or replaced by a newer record once expired), putting it would
            // revive a record pushed out, or put an older record beside the newer one.
            records.promote(
                *key,
                found.record.clone(),
                found.expires_at,
                found.stored_at,
                || recent.holds(key, serial),
            );
            recent.remove_if(key, serial);
            return Some(Claim::Completed {
                record: found.record,
                expires_in: Some(left),
            });
        }
        records.get(key).map(|(record, left)| Claim::Completed {
            record,
            expires_in: Some(left),
        })
    }
}

impl Default for MemoryStore {
    /// A store of [`DEFAULT_CAPACITY_BYTES`](Self::DEFAULT_CAPACITY_BYTES) (64 MiB).
    fn default() -> Self {
        Self::new(Self::DEFAULT_CAPACITY_BYTES)
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("capacity_bytes", &self.inner.capacity)
            .field(
                "records",
                &(self.inner.records.approximate_len() + self.inner.recent.len()),
            )
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::Duration,
    };

    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    use super::*;
    use crate::{
        fingerprint::Fingerprint,
        record::Record,
        store::{IdempotencyStore, record_cache},
    };

    const LEASE: Duration = Duration::from_secs(30);

    fn record(n: usize) -> Record {
        let fingerprint = Fingerprint::from_bytes([7; 32]);
        let body = Bytes::from(vec![b'x'; 100 + n % 1000]);
        Record::response(fingerprint, StatusCode::OK, &HeaderMap::new(), body, None)
    }

    fn key(n: usize) -> StorageKey {
        let mut bytes = [0; 32];
        bytes[..8].copy_from_slice(&(n as u64).to_le_bytes());
        StorageKey::from_bytes(bytes)
    }

    async fn complete(store: &MemoryStore, n: usize) {
        let fingerprint = Fingerprint::from_bytes([7; 32]);
        let Claim::Acquired(token) = store.claim(&key(n), &fingerprint, LEASE).await.unwrap()
        else {
            panic!("a fresh key is free");
        };
        let ttl = Duration::from_secs(60);
        store
            .complete(&key(n), token, record(n), ttl)
            .await
            .unwrap();
    }

    async fn replays(store: &MemoryStore, n: usize) -> bool {
        let fingerprint = Fingerprint::from_bytes([7; 32]);
        let claim = store.claim(&key(n), &fingerprint, LEASE).await.unwrap();
        matches!(claim, Claim::Completed { .. })
    }

    #[tokio::test]
    async fn a_record_asked_for_again_moves_to_the_cache_and_outlives_a_flood_of_new_keys() {
        let store = MemoryStore::new(MemoryStore::MIN_CAPACITY_BYTES * 4);
        complete(&store, 0).await;
        assert_eq!(store.inner.recent.len(), 1);
        assert!(replays(&store, 0).await);
        assert_eq!(
            store.inner.recent.len(),
            0,
            "moved out of the recent completions"
        );
        assert_eq!(store.inner.records.len(), 1, "into the cache");
        for n in 1..5_000 {
            complete(&store, n).await;
        }
        assert!(store.evictions() > 4_000, "{}", store.evictions());
        assert!(
            replays(&store, 0).await,
            "a flood of new keys leaves the cache alone"
        );
        assert!(replays(&store, 4_999).await);
        assert!(replays(&store, 4_999).await, "replayed from the cache now");
        assert!(
            !replays(&store, 1).await,
            "the oldest new keys were pushed out"
        );
    }

    #[tokio::test]
    async fn the_records_held_never_weigh_more_than_the_capacity() {
        let capacity = MemoryStore::MIN_CAPACITY_BYTES * 4;
        let store = MemoryStore::new(capacity);
        for n in 0..6_000 {
            complete(&store, n).await;
            // Every third record is asked for again: the cache fills to its share too.
            if n % 3 == 0 {
                assert!(replays(&store, n).await);
            }
            if n % 100 == 0 {
                store.record_count(); // the cache's housekeeping, so its weight is current
                let held = store.inner.recent.bytes() + store.inner.records.weight();
                assert!(held <= capacity, "{held} bytes held after {n} records");
            }
        }
        let replayed = store.inner.records.weight();
        assert!(
            replayed > capacity / 2 - 2_000,
            "the cache took its share: {replayed}"
        );
        assert!(store.inner.recent.bytes() >= capacity / 2 - 2_000);
    }

    #[tokio::test]
    async fn no_shard_lock_is_held_while_the_cache_weighs_or_evicts() {
        let shards = new_shards();
        let (calls, locked) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let probe: record_cache::Probe = {
            let (shards, calls, locked) =
                (Arc::clone(&shards), Arc::clone(&calls), Arc::clone(&locked));
            // Everything runs on this one thread: a shard locked now is locked by our caller.
            Arc::new(move || {
                calls.fetch_add(1, Ordering::Relaxed);
                if shards.iter().any(|shard| shard.claims.try_lock().is_err()) {
                    locked.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let store = MemoryStore::with_records(
            RecordCache::with_probe(MemoryStore::MIN_CAPACITY_BYTES / 2, "memory", probe),
            MemoryStore::MIN_CAPACITY_BYTES,
            shards,
        );
        let fingerprint = Fingerprint::from_bytes([7; 32]);
        for n in 0..2_000 {
            let Claim::Acquired(token) = store.claim(&key(n), &fingerprint, LEASE).await.unwrap()
            else {
                panic!("a fresh key is free");
            };
            store
                .complete(&key(n), token, record(n), Duration::from_secs(60))
                .await
                .unwrap();
            // A replay, and a look at a key long evicted.
            store.claim(&key(n), &fingerprint, LEASE).await.unwrap();
            store.claim(&key(n / 2), &fingerprint, LEASE).await.unwrap();
        }
        assert!(
            store.evictions() > 1_000,
            "the cache evicted: {}",
            store.evictions()
        );
        assert!(calls.load(Ordering::Relaxed) > 3_000);
        assert_eq!(
            locked.load(Ordering::Relaxed),
            0,
            "moka called back while a shard was locked"
        );
    }
}
