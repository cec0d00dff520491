//! [`MemoryStore`]: the embedded store for a single instance.

use std::{
    collections::HashMap,
    fmt,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use tokio::{sync::Notify, time::Instant};

use super::{Claim, FenceToken, IdempotencyStore, record_cache::RecordCache};
use crate::{
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
/// - **Waiters are notified**, not polled: a duplicate waiting on a claim wakes the moment it
///   is completed or released, or when its lease runs out.
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
    claims: Box<[Mutex<Claims>]>,
    next_token: AtomicU64,
}

/// One shard of the claims in flight. Keys are digests: a fast seeded hasher is enough.
type Claims = HashMap<StorageKey, InFlight, foldhash::fast::RandomState>;

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

impl MemoryStore {
    /// A store holding up to `capacity_bytes` of records (as weighed by
    /// [`Record::weight`]).
    ///
    /// ```
    /// use tower_idempotency::MemoryStore;
    ///
    /// let store = MemoryStore::new(256 * 1024 * 1024);
    /// ```
    pub fn new(capacity_bytes: u64) -> Self {
        let claims = (0..SHARDS).map(|_| Mutex::default()).collect();
        Self {
            inner: Arc::new(Inner {
                records: RecordCache::new(capacity_bytes, "memory"),
                claims,
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
            .claims
            .iter()
            .map(|shard| lock(shard).values().filter(|c| c.is_live(now)).count())
            .sum()
    }

    fn shard(&self, key: &StorageKey) -> MutexGuard<'_, Claims> {
        // Keys are SHA-256 digests: any byte of them is uniformly spread.
        lock(&self.inner.claims[usize::from(key.as_bytes()[0]) % SHARDS])
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

    /// Claims `key`, free or abandoned, in the shard `claims` holds locked.
    fn claim_free(
        &self,
        mut claims: MutexGuard<'_, Claims>,
        key: &StorageKey,
        fingerprint: &Fingerprint,
        lease: Duration,
        now: Instant,
    ) -> Claim {
        let token = FenceToken::new(self.inner.next_token.fetch_add(1, Ordering::Relaxed));
        let expired = claims.insert(
            *key,
            InFlight {
                token,
                fingerprint: *fingerprint,
                expires_at: now + lease,
                claimed_at: SystemTime::now(),
                waiters: None,
            },
        );
        // Claims whose owner vanished without releasing (only when no runtime was left to
        // release them) are dropped once in a while, after being remembered as abandoned for
        // a day, so the maps stay bounded by requests in flight.
        if claims.len() >= 64 && claims.len().is_power_of_two() {
            claims.retain(|_, claim| claim.expires_at + ABANDONED_RETENTION > now);
        }
        drop(claims);
        if let Some(expired) = expired {
            expired.wake_waiters();
        }
        Claim::Acquired(token)
    }

    /// Runs `f` on the live claim `token` of `key`, or reports the lease lost.
    fn fenced<T>(
        &self,
        key: &StorageKey,
        token: FenceToken,
        f: impl FnOnce(&mut Claims) -> T,
    ) -> Result<T, StoreError> {
        let mut claims = self.shard(key);
        match claims.get(key) {
            Some(claim) if claim.token == token && claim.is_live(Instant::now()) => {
                Ok(f(&mut claims))
            }
            _ => Err(StoreError::lease_lost()),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // No code panics while holding these locks; should one ever, the maps stay consistent
    // (every update is a single insert or remove), so the poison flag carries no meaning.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a claim on a key means to a new request: in flight, or abandoned once its lease ended.
fn held(claim: &InFlight, now: Instant) -> Claim {
    if claim.is_live(now) {
        Claim::InFlight {
            fingerprint: claim.fingerprint,
        }
    } else {
        Claim::Abandoned {
            token: claim.token,
            fingerprint: claim.fingerprint,
        }
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
        let now = Instant::now();
        // One lookup of the record, under the shard's lock: completions insert under it too,
        // so a concurrent claim sees the claim or the record, never neither. (A lock-free look
        // first would save replays an uncontended lock, but cost every first execution a
        // second miss in a large table: a cache miss or more each.)
        let claims = self.shard(key);
        if let Some(claim) = claims.get(key) {
            return Ok(held(claim, now));
        }
        if let Some(completed) = self.completed(key) {
            return Ok(completed);
        }
        Ok(self.claim_free(claims, key, fingerprint, lease, now))
    }

    async fn complete(
        &self,
        key: &StorageKey,
        token: FenceToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let claim = self.fenced(key, token, |claims| {
            // Insert before removing the claim, under the lock: a concurrent claim sees one
            // or the other, never neither.
            self.inner.records.insert(*key, record, ttl);
            claims.remove(key)
        })?;
        if let Some(claim) = claim {
            claim.wake_waiters();
        }
        Ok(())
    }

    async fn release(&self, key: &StorageKey, token: FenceToken) -> Result<(), StoreError> {
        let claim = {
            let mut claims = self.shard(key);
            match claims.get(key) {
                // An expired claim that nobody took over is still ours to remove.
                Some(claim) if claim.token == token => claims.remove(key),
                _ => return Err(StoreError::lease_lost()),
            }
        };
        if let Some(claim) = claim {
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
        self.fenced(key, token, |claims| {
            if let Some(claim) = claims.get_mut(key) {
                claim.expires_at = Instant::now() + lease;
            }
        })
    }

    async fn wait(&self, key: &StorageKey, timeout: Duration) -> Result<(), StoreError> {
        let deadline = Instant::now() + timeout;
        let (waiters, token, expires_at) = {
            let mut claims = self.shard(key);
            let Some(claim) = claims.get_mut(key) else {
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
        if !matches!(self.shard(key).get(key), Some(claim) if claim.token == token) {
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
        let now = Instant::now();
        let claims = self.shard(key);
        match claims.get(key) {
            Some(claim) if claim.token == abandoned && !claim.is_live(now) => {}
            Some(claim) => return Ok(held(claim, now)),
            None => {
                if let Some(completed) = self.completed(key) {
                    return Ok(completed);
                }
            }
        }
        Ok(self.claim_free(claims, key, fingerprint, lease, now))
    }

    async fn inspect(&self, key: &StorageKey) -> Result<Option<Inspection>, StoreError> {
        let claims = self.shard(key);
        if let Some(claim) = claims.get(key) {
            return Ok(Some(Inspection::InFlight(claim_info(
                key,
                claim,
                Instant::now(),
            ))));
        }
        Ok(self
            .inner
            .records
            .inspect(key)
            .map(|(record, stored_at, expires_at)| {
                Inspection::Completed(RecordInfo::of(&record, Some(stored_at), Some(expires_at)))
            }))
    }

    async fn forget(&self, key: &StorageKey) -> Result<bool, StoreError> {
        let claims = self.shard(key);
        // Completions insert under this lock: nothing lands between the check and the removal.
        if claims.contains_key(key) {
            return Ok(false);
        }
        Ok(self.inner.records.remove(key))
    }

    async fn break_claim(&self, key: &StorageKey) -> Result<Option<FenceToken>, StoreError> {
        let claim = self.shard(key).remove(key);
        Ok(claim.map(|claim| {
            let token = claim.token;
            claim.wake_waiters();
            token
        }))
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
        for shard in &self.inner.claims {
            let shard = lock(shard);
            found.extend(
                shard
                    .iter()
                    .filter(|(key, _)| after.is_none_or(|after| **key > after))
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
