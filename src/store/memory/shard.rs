//! The claims of a [`MemoryStore`](super::MemoryStore): keys in flight or completing, spread over independently
//! locked shards, and what a slot means to a new request.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use tokio::{sync::Notify, time::Instant};

use crate::{
    fingerprint::Fingerprint,
    key::StorageKey,
    record::Record,
    store::claim::{Claim, FenceToken},
    store::inspect::ClaimInfo,
};

/// Claims are spread over this many independently locked maps, so requests for different
/// keys do not contend.
pub(super) const SHARDS: usize = 64;
/// How many values of a key's first byte each shard holds.
pub(super) const BYTES_PER_SHARD: usize = 256 / SHARDS;

/// The shard of `key`: a range of first bytes, so shards in order hold keys in order (for
/// listing). Keys are SHA-256 digests: their first byte is uniformly spread.
pub(super) fn shard_index(key: &StorageKey) -> usize {
    usize::from(key.as_bytes()[0]) / BYTES_PER_SHARD
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
pub(super) struct Shard {
    pub(super) claims: Mutex<Claims>,
    pub(super) settled: AtomicU64,
}

/// Keys are digests: a fast seeded hasher is enough.
pub(super) type Claims = HashMap<StorageKey, Slot, foldhash::fast::RandomState>;

pub(super) enum Slot {
    InFlight(InFlight),
    /// Completed, its record on its way into the cache: claims see the record.
    Completing {
        token: FenceToken,
        record: Record,
        expires_at: Instant,
    },
}

pub(super) struct InFlight {
    pub(super) token: FenceToken,
    pub(super) fingerprint: Fingerprint,
    pub(super) expires_at: Instant,
    pub(super) claimed_at: SystemTime,
    // Created by the first waiter: most claims never have one.
    pub(super) waiters: Option<Arc<Notify>>,
}

impl InFlight {
    pub(super) fn is_live(&self, now: Instant) -> bool {
        self.expires_at > now
    }

    pub(super) fn wake_waiters(self) {
        if let Some(waiters) = self.waiters {
            waiters.notify_waiters();
        }
    }
}

impl Slot {
    /// The claim in flight under `token`, live or not.
    pub(super) fn in_flight(&self, token: FenceToken) -> Option<&InFlight> {
        match self {
            Self::InFlight(claim) if claim.token == token => Some(claim),
            _ => None,
        }
    }

    pub(super) fn is_live_claim(&self, now: Instant) -> bool {
        matches!(self, Self::InFlight(claim) if claim.is_live(now))
    }
}

/// What a key's slot means to a new request: a claim in flight, a claim abandoned once its
/// lease ended, or a record on its way into the cache.
pub(super) fn held(slot: &Slot, now: Instant) -> Claim {
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

pub(super) fn claim_info(key: &StorageKey, claim: &InFlight, now: Instant) -> ClaimInfo {
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

pub(super) fn new_shards() -> Arc<[Shard]> {
    (0..SHARDS)
        .map(|_| Shard {
            claims: Mutex::default(),
            settled: AtomicU64::new(0),
        })
        .collect()
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // No code panics while holding these locks; should one ever, the maps stay consistent
    // (every update is a single insert, replace or remove), so the poison flag carries no
    // meaning.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Removes a `Completing` entry once its record is in the cache (or the insert panicked:
/// nothing else would ever remove it), and tells claims that the shard settled.
pub(super) struct Settle<'a> {
    pub(super) shard: &'a Shard,
    pub(super) key: StorageKey,
    pub(super) token: FenceToken,
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
