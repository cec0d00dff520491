//! [`MemoryStore`]: the embedded store for a single instance.

use std::{
    collections::HashMap,
    fmt, mem,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use tokio::{sync::Notify, time::Instant};

use super::{
    Claim, FenceToken, IdempotencyStore,
    record_cache::{self, RecordCache},
};
use crate::{
    config::{MAX_LEASE, MAX_TTL},
    error::StoreError,
    fingerprint::Fingerprint,
    inspect::{ClaimInfo, ClaimPage, Inspection, ListCursor, RecordInfo},
    key::StorageKey,
    record::Record,
};

/// How long a claim whose lease ended without completion is remembered (to be reported as
/// [`Claim::Abandoned`]) before the maps may drop it.
const ABANDONED_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

/// The capacity of [`MemoryStore::default`]: 64 MiB of records.
pub const DEFAULT_CAPACITY_BYTES: u64 = 64 * 1024 * 1024;

/// The smallest capacity [`MemoryStore::new`] accepts: 64 KiB, room for a few dozen small
/// records. A store with less keeps next to nothing, so retries would execute again; a
/// capacity read from configuration in the wrong unit (64 for 64 MiB) is caught here.
pub const MIN_CAPACITY_BYTES: u64 = 64 * 1024;

/// Claims are spread over this many independently locked maps, so requests for different
/// keys do not contend.
const SHARDS: usize = 64;

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
///   record is never replayed, and is dropped when read or pushed out by newer records. So
///   many records expiring at once never stall a request that happens to clean them up.
/// - **No lock is held while the cache works.** moka may evict records inline, in whichever
///   call runs its housekeeping; that call is never made under a lock other requests wait
///   on. A replay takes no lock at all.
/// - **Waiters are notified**, not polled: a duplicate waiting on a claim wakes the moment it
///   is completed or released, or when its lease runs out.
///
/// TTLs longer than [`MAX_TTL`] and leases longer than
/// [`MAX_LEASE`] are clamped to them.
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
    next_token: AtomicU64,
}

// How claims and completions stay exactly-once without a moka call under a lock
// ---------------------------------------------------------------------------
// The invariant: a claim that does not acquire a key sees its claim in flight or its record;
// a claim that acquires it saw neither, and there was no record to see. `complete` moves a
// claim in three steps: under the shard's lock, `InFlight` becomes `Completing(record)`; the
// record goes into moka, no lock held; under the lock again, the `Completing` entry leaves
// and the shard's `settled` counter is bumped (Release). `claim` loads the counter (Acquire),
// looks in moka with no lock held (a replay ends here), then locks the shard: a live claim is
// in flight, a `Completing` entry is the record, and on nothing (or an expired claim) it
// acquires only if the counter has not moved since its load, else it looks again.
//
// Why no record is missed: say completion X stored record R and a claim C acquired without
// seeing it. X's `Completing` entry left either before C locked the shard or after.
// - Before, and C's counter did not move: the bump of X was already there when C loaded the
//   counter, so X's moka insert happened before C's moka get, which saw R.
// - After: had X's `Completing` entry been there when C locked, C would have seen it; so X
//   turned its claim into it after C unlocked, and X's claim was in the map while C held the
//   lock. Live, C saw it in flight; expired, C took it over and X's fence check failed: X
//   stored nothing. Either way, no R to miss.

/// One shard of the claims: keys in flight or completing, and the count of completions that
/// settled (left the map once their record was in the cache).
struct Shard {
    claims: Mutex<Claims>,
    settled: AtomicU64,
}

/// Keys are digests: a fast seeded hasher is enough.
type Claims = HashMap<StorageKey, Slot, foldhash::fast::RandomState>;

enum Slot {
    InFlight(InFlight),
    /// Completed, its record on its way into the cache: claims see the record.
    Completing {
        token: FenceToken,
        record: Record,
        expires_at: Instant,
    },
}

struct InFlight {
    token: FenceToken,
    fingerprint: Fingerprint,
    expires_at: Instant,
    claimed_at: SystemTime,
    // Created by the first waiter: most claims never have one.
    waiters: Option<Arc<Notify>>,
}

impl InFlight {
    fn is_live(&self, now: Instant) -> bool {
        self.expires_at > now
    }

    fn wake_waiters(self) {
        if let Some(waiters) = self.waiters {
            waiters.notify_waiters();
        }
    }
}

impl Slot {
    /// The claim in flight under `token`, live or not.
    fn in_flight(&self, token: FenceToken) -> Option<&InFlight> {
        match self {
            Self::InFlight(claim) if claim.token == token => Some(claim),
            _ => None,
        }
    }

    fn is_live_claim(&self, now: Instant) -> bool {
        matches!(self, Self::InFlight(claim) if claim.is_live(now))
    }
}

impl MemoryStore {
    /// A store holding up to `capacity_bytes` of records (as weighed by
    /// [`Record::weight`]).
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
            inner: Arc::new(Inner {
                records,
                shards,
                next_token: AtomicU64::new(1),
            }),
        }
    }

    /// How many records were evicted to stay within capacity (expired ones are not counted).
    pub fn evictions(&self) -> u64 {
        self.inner.records.evictions()
    }

    /// How many completed records the store holds (expired ones included until they are
    /// read or pushed out).
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
        // Keys are SHA-256 digests: any byte of them is uniformly spread.
        &self.inner.shards[usize::from(key.as_bytes()[0]) % SHARDS]
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

impl MemoryStore {
    /// Claims `key` (free, or held by a claim being taken over) in the shard `claims` holds
    /// locked.
    fn acquire(
        &self,
        mut claims: MutexGuard<'_, Claims>,
        key: &StorageKey,
        fingerprint: &Fingerprint,
        lease: Duration,
        now: Instant,
    ) -> Claim {
        let token = FenceToken::new(self.inner.next_token.fetch_add(1, Ordering::Relaxed));
        let replaced = claims.insert(
            *key,
            Slot::InFlight(InFlight {
                token,
                fingerprint: *fingerprint,
                expires_at: now + lease.min(MAX_LEASE),
                claimed_at: SystemTime::now(),
                waiters: None,
            }),
        );
        // Claims whose owner vanished without releasing (only when no runtime was left to
        // release them) are dropped once in a while, after being remembered as abandoned for
        // a day, so the maps stay bounded by requests in flight.
        if claims.len() >= 64 && claims.len().is_power_of_two() {
            claims.retain(|_, slot| {
                !matches!(slot, Slot::InFlight(claim) if claim.expires_at + ABANDONED_RETENTION <= now)
            });
        }
        drop(claims);
        if let Some(Slot::InFlight(replaced)) = replaced {
            replaced.wake_waiters();
        }
        Claim::Acquired(token)
    }
}

/// What a key's slot means to a new request: a claim in flight, a claim abandoned once its
/// lease ended, or a record on its way into the cache.
fn held(slot: &Slot, now: Instant) -> Claim {
    match slot {
        Slot::InFlight(claim) if claim.is_live(now) => Claim::InFlight {
            fingerprint: claim.fingerprint,
        },
        Slot::InFlight(claim) => Claim::Abandoned {
            token: claim.token,
            fingerprint: claim.fingerprint,
        },
        Slot::Completing {
            record, expires_at, ..
        } => Claim::Completed {
            record: record.clone(),
            expires_in: expires_at
                .checked_duration_since(now)
                .filter(|left| !left.is_zero()),
        },
    }
}

fn claim_info(key: &StorageKey, claim: &InFlight, now: Instant) -> ClaimInfo {
    let wall = SystemTime::now();
    let lease_expires_at = match claim.expires_at.checked_duration_since(now) {
        Some(left) => wall + left,
        None => wall - now.duration_since(claim.expires_at),
    };
    ClaimInfo::new(
        *key,
        claim.token,
        claim.fingerprint,
        Some(claim.claimed_at),
        lease_expires_at,
    )
}

fn new_shards() -> Arc<[Shard]> {
    (0..SHARDS)
        .map(|_| Shard {
            claims: Mutex::default(),
            settled: AtomicU64::new(0),
        })
        .collect()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // No code panics while holding these locks; should one ever, the maps stay consistent
    // (every update is a single insert, replace or remove), so the poison flag carries no
    // meaning.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Removes a `Completing` entry once its record is in the cache (or the insert panicked:
/// nothing else would ever remove it), and tells claims that the shard settled.
struct Settle<'a> {
    shard: &'a Shard,
    key: StorageKey,
    token: FenceToken,
}

impl Drop for Settle<'_> {
    fn drop(&mut self) {
        let mut claims = lock(&self.shard.claims);
        if matches!(claims.get(&self.key), Some(Slot::Completing { token, .. }) if *token == self.token)
        {
            claims.remove(&self.key);
            // Release: the record's insert into the cache happens before any claim that
            // loads this count (Acquire) looks in the cache.
            self.shard.settled.fetch_add(1, Ordering::Release);
        }
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

impl IdempotencyStore for MemoryStore {
    async fn claim(
        &self,
        key: &StorageKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let shard = self.shard(key);
        loop {
            let settled = shard.settled.load(Ordering::Acquire);
            // No lock for a replay: a record in the cache is final.
            if let Some(completed) = self.completed(key) {
                return Ok(completed);
            }
            let now = Instant::now();
            let claims = lock(&shard.claims);
            if let Some(slot) = claims.get(key) {
                return Ok(held(slot, now));
            }
            if shard.settled.load(Ordering::Acquire) != settled {
                // A completion settled since the look in the cache: look again.
                continue;
            }
            return Ok(self.acquire(claims, key, fingerprint, lease, now));
        }
    }

    async fn complete(
        &self,
        key: &StorageKey,
        token: FenceToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let shard = self.shard(key);
        let expires_at = record_cache::expires_at(ttl);
        let claim = {
            let mut claims = lock(&shard.claims);
            match claims.get_mut(key) {
                Some(slot)
                    if slot
                        .in_flight(token)
                        .is_some_and(|c| c.is_live(Instant::now())) =>
                {
                    let completing = Slot::Completing {
                        token,
                        record: record.clone(),
                        expires_at,
                    };
                    mem::replace(slot, completing)
                }
                _ => return Err(StoreError::lease_lost()),
            }
        };
        let settle = Settle {
            shard,
            key: *key,
            token,
        };
        self.inner.records.insert_until(*key, record, expires_at);
        drop(settle);
        // Woken once the record is in the cache: their claims find it without a lock.
        if let Slot::InFlight(claim) = claim {
            claim.wake_waiters();
        }
        Ok(())
    }

    async fn release(&self, key: &StorageKey, token: FenceToken) -> Result<(), StoreError> {
        let claim = {
            let mut claims = lock(&self.shard(key).claims);
            match claims.get(key) {
                // An expired claim that nobody took over is still ours to remove.
                Some(slot) if slot.in_flight(token).is_some() => claims.remove(key),
                _ => return Err(StoreError::lease_lost()),
            }
        };
        if let Some(Slot::InFlight(claim)) = claim {
            claim.wake_waiters();
        }
        Ok(())
    }

    async fn renew(
        &self,
        key: &StorageKey,
        token: FenceToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let mut claims = lock(&self.shard(key).claims);
        let now = Instant::now();
        match claims.get_mut(key) {
            Some(Slot::InFlight(claim)) if claim.token == token && claim.is_live(now) => {
                claim.expires_at = now + lease.min(MAX_LEASE);
                Ok(())
            }
            _ => Err(StoreError::lease_lost()),
        }
    }

    async fn wait(&self, key: &StorageKey, timeout: Duration) -> Result<(), StoreError> {
        let deadline = Instant::now() + timeout.min(MAX_TTL);
        let shard = self.shard(key);
        let (waiters, token, expires_at) = {
            let mut claims = lock(&shard.claims);
            let Some(Slot::InFlight(claim)) = claims.get_mut(key) else {
                return Ok(());
            };
            let waiters = claim.waiters.get_or_insert_with(Default::default);
            (Arc::clone(waiters), claim.token, claim.expires_at)
        };
        let notified = waiters.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // The claim may have ended between the lock above and `enable`: `notify_waiters`
        // only wakes futures enabled before it, so look once more now that this one is.
        if lock(&shard.claims)
            .get(key)
            .and_then(|slot| slot.in_flight(token))
            .is_none()
        {
            return Ok(());
        }
        tokio::select! {
            () = notified => {}
            () = tokio::time::sleep_until(deadline.min(expires_at)) => {}
        }
        Ok(())
    }

    // Take-over and the operator's tools: each runs under the key's shard lock, as one step.

    async fn take_over(
        &self,
        key: &StorageKey,
        abandoned: FenceToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        {
            let now = Instant::now();
            let claims = lock(&self.shard(key).claims);
            match claims.get(key) {
                Some(Slot::InFlight(claim)) if claim.token == abandoned && !claim.is_live(now) => {
                    return Ok(self.acquire(claims, key, fingerprint, lease, now));
                }
                Some(slot) => return Ok(held(slot, now)),
                None => {}
            }
        }
        // Broken or released meanwhile: the key is free, or completed by another claim; an
        // ordinary claim tells which, without missing a record on its way.
        self.claim(key, fingerprint, lease).await
    }

    async fn inspect(&self, key: &StorageKey) -> Result<Option<Inspection>, StoreError> {
        {
            let claims = lock(&self.shard(key).claims);
            match claims.get(key) {
                Some(Slot::InFlight(claim)) => {
                    let info = claim_info(key, claim, Instant::now());
                    return Ok(Some(Inspection::InFlight(info)));
                }
                Some(Slot::Completing { .. }) | None => {}
            }
        }
        // A record on its way is in the cache once its completion returns; moka is asked
        // with no lock held.
        Ok(self
            .inner
            .records
            .inspect(key)
            .map(|(record, stored_at, expires_at)| {
                Inspection::Completed(RecordInfo::of(&record, Some(stored_at), Some(expires_at)))
            }))
    }

    async fn forget(&self, key: &StorageKey) -> Result<bool, StoreError> {
        // A key claimed or completing is not forgotten: its claim is the owner's to end.
        if lock(&self.shard(key).claims).contains_key(key) {
            return Ok(false);
        }
        Ok(self.inner.records.remove(key))
    }

    async fn break_claim(&self, key: &StorageKey) -> Result<Option<FenceToken>, StoreError> {
        let claim = {
            let mut claims = lock(&self.shard(key).claims);
            // A completing key is not a claim any more: its record is on its way.
            if !matches!(claims.get(key), Some(Slot::InFlight(_))) {
                return Ok(None);
            }
            claims.remove(key)
        };
        Ok(match claim {
            Some(Slot::InFlight(claim)) => {
                let token = claim.token;
                claim.wake_waiters();
                Some(token)
            }
            _ => None,
        })
    }

    async fn list_claims(
        &self,
        older_than: Duration,
        cursor: Option<ListCursor>,
        limit: usize,
    ) -> Result<ClaimPage, StoreError> {
        // The cursor is the last key listed: claims are listed in key order.
        let after = match &cursor {
            Some(cursor) => Some(StorageKey::from_hex(cursor.as_str()).ok_or_else(|| {
                StoreError::new(crate::StoreErrorKind::Other, "not a MemoryStore cursor")
            })?),
            None => None,
        };
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut found = Vec::new();
        for shard in self.inner.shards.iter() {
            let claims = lock(&shard.claims);
            found.extend(
                claims
                    .iter()
                    .filter(|(key, _)| after.is_none_or(|after| **key > after))
                    .filter_map(|(key, slot)| match slot {
                        Slot::InFlight(claim) => Some((key, claim)),
                        Slot::Completing { .. } => None,
                    })
                    .filter(|(_, claim)| {
                        wall.duration_since(claim.claimed_at).unwrap_or_default() >= older_than
                    })
                    .map(|(key, claim)| claim_info(key, claim, now)),
            );
        }
        found.sort_by_key(|claim| *claim.key());
        let limit = limit.max(1);
        let next = (found.len() > limit).then(|| ListCursor::new(found[limit - 1].key().to_hex()));
        found.truncate(limit);
        Ok(ClaimPage {
            claims: found,
            next,
        })
    }

    const NAME: &'static str = "memory";
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    use super::*;

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
