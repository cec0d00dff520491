//! [`MemoryStore`]: the embedded store for a single instance.
//!
//! `shard` holds the claims and the invariant that keeps them exactly-once; `store` the
//! [`IdempotencyStore`](crate::IdempotencyStore) operations over them and the cache of records.

mod list;
mod shard;
mod store;

use std::{fmt, sync::Arc};

use tokio::time::Instant;

use self::shard::{Shard, lock, new_shards, shard_index};
use super::{Claim, record_cache::RecordCache};
use crate::key::StorageKey;

/// The capacity of [`MemoryStore::default`]: 64 MiB of records.
pub const DEFAULT_CAPACITY_BYTES: u64 = 64 * 1024 * 1024;

/// The smallest capacity [`MemoryStore::new`] accepts: 64 KiB, room for a few dozen small
/// records. A store with less keeps next to nothing, so retries would execute again; a
/// capacity read from configuration in the wrong unit (64 for 64 MiB) is caught here.
pub const MIN_CAPACITY_BYTES: u64 = 64 * 1024;

/// An in-process store: completed records in a [moka] cache bounded by bytes, with a
/// per-record TTL; in-flight claims beside it.
///
/// - **Claims in flight are never evicted.** They live outside the cache, in sharded maps
///   bounded by the number of requests in flight, and leave only when completed, released,
///   or taken over after their lease expired.
/// - **A new record is always admitted.** The cache evicts the least recently used records,
///   never the newcomer (moka's default TinyLFU admission would refuse new keys once full,
///   and their retries would execute again). Evictions are counted: [`evictions`](Self::evictions).
/// - **Expiry costs nothing up front.** A record's TTL is checked when it is read; an expired
///   record is never replayed; it stays until its key's next record replaces it or newer
///   records push it out (a read never removes it: it might remove a newer record). So
///   many records expiring at once never stall a request that happens to clean them up.
/// - **No lock is held while the cache works.** moka may evict records inline, in whichever
///   call runs its housekeeping; that call is never made under a lock other requests wait
///   on. A replay takes no lock at all.
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
    inner: Arc<Inner>,
}

struct Inner {
    records: RecordCache,
    shards: Arc<[Shard]>,
}

impl MemoryStore {
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
    /// If `capacity_bytes` is less than [`MIN_CAPACITY_BYTES`] (64 KiB): such a store would
    /// keep next to nothing, and retries would execute again.
    pub fn new(capacity_bytes: u64) -> Self {
        assert!(
            capacity_bytes >= MIN_CAPACITY_BYTES,
            "MemoryStore::new: the capacity must be at least MIN_CAPACITY_BYTES \
             ({MIN_CAPACITY_BYTES} bytes), got {capacity_bytes}"
        );
        Self::with_records(RecordCache::new(capacity_bytes, "memory"), new_shards())
    }

    fn with_records(records: RecordCache, shards: Arc<[Shard]>) -> Self {
        Self {
            inner: Arc::new(Inner { records, shards }),
        }
    }

    /// How many records were evicted to stay within capacity (expired ones are not counted).
    pub fn evictions(&self) -> u64 {
        self.inner.records.evictions()
    }

    /// How many completed records the store holds (expired ones included until they are
    /// replaced or pushed out).
    pub fn record_count(&self) -> u64 {
        self.inner.records.len()
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

    fn shard(&self, key: &StorageKey) -> &Shard {
        &self.inner.shards[shard_index(key)]
    }

    fn completed(&self, key: &StorageKey) -> Option<Claim> {
        self.inner
            .records
            .get(key)
            .map(|(record, left)| Claim::Completed {
                record,
                expires_in: Some(left),
            })
    }
}

impl Default for MemoryStore {
    /// A store of [`DEFAULT_CAPACITY_BYTES`] (64 MiB).
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY_BYTES)
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("capacity_bytes", &self.inner.records.capacity())
            .field("records", &self.inner.records.approximate_len())
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
            RecordCache::with_probe(MIN_CAPACITY_BYTES, "memory", probe),
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
