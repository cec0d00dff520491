//! [`IdempotencyStore`] and [`AdminStore`] for [`MemoryStore`]: claiming a key, and every
//! operation under its key's shard lock, with the cache of records asked with no lock held.

use std::{
    mem,
    sync::{Arc, MutexGuard, atomic::Ordering},
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

use super::{
    MemoryStore,
    shard::{Claims, InFlight, Settle, Slot, claim_info, held, lock},
};
use crate::{
    fingerprint::Fingerprint,
    key::StorageKey,
    layer::config::{MAX_LEASE, MAX_TTL},
    record::Record,
    store::claim::{Claim, FenceToken},
    store::error::StoreError,
    store::inspect::{ClaimPage, Inspection, ListCursor, RecordInfo},
    store::{AdminStore, IdempotencyStore, record_cache},
};

/// How long a claim whose lease ended without completion is remembered (to be reported as
/// [`Claim::Abandoned`]) before the maps may drop it.
const ABANDONED_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

impl MemoryStore {
    /// Claims `key` as `token` (free, or held by a claim being taken over) in the shard
    /// `claims` holds locked.
    fn acquire(
        mut claims: MutexGuard<'_, Claims>,
        key: &StorageKey,
        token: FenceToken,
        fingerprint: &Fingerprint,
        lease: Duration,
        now: Instant,
    ) -> Claim {
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

impl IdempotencyStore for MemoryStore {
    async fn claim_as(
        &self,
        key: &StorageKey,
        token: FenceToken,
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
            return Ok(Self::acquire(claims, key, token, fingerprint, lease, now));
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
        self.keep(*key, record, expires_at);
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

    async fn take_over_as(
        &self,
        key: &StorageKey,
        abandoned: FenceToken,
        token: FenceToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        {
            let now = Instant::now();
            let claims = lock(&self.shard(key).claims);
            match claims.get(key) {
                Some(Slot::InFlight(claim)) if claim.token == abandoned && !claim.is_live(now) => {
                    return Ok(Self::acquire(claims, key, token, fingerprint, lease, now));
                }
                Some(slot) => return Ok(held(slot, now)),
                None => {}
            }
        }
        // Broken or released meanwhile: the key is free, or completed by another claim; an
        // ordinary claim tells which, without missing a record on its way.
        self.claim_as(key, token, fingerprint, lease).await
    }

    const NAME: &'static str = "memory";
}

impl AdminStore for MemoryStore {
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
        // A record on its way is held once its completion returns; moka is asked with no
        // lock held.
        let now = Instant::now();
        let found = match self.inner.recent.get(key) {
            Some(found) => found
                .expires_at
                .checked_duration_since(now)
                .filter(|left| !left.is_zero())
                .map(|left| (found.record, found.stored_at, SystemTime::now() + left)),
            None => self.inner.records.inspect(key),
        };
        Ok(found.map(|(record, stored_at, expires_at)| {
            Inspection::Completed(RecordInfo::of(&record, Some(stored_at), Some(expires_at)))
        }))
    }

    async fn forget(&self, key: &StorageKey) -> Result<bool, StoreError> {
        // A key claimed or completing is not forgotten: its claim is the owner's to end.
        if lock(&self.shard(key).claims).contains_key(key) {
            return Ok(false);
        }
        let recent = self.inner.recent.remove(key);
        Ok(self.inner.records.remove(key) | recent)
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
        self.list(older_than, cursor.as_ref(), limit)
    }
}
