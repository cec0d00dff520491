//! A store whose operations can be switched to fail, shared by the failure tests.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use tower_idempotency::{
    Claim, ClaimPage, FenceToken, Fingerprint, IdempotencyStore, Inspection, ListCursor,
    MemoryStore, Record, StorageKey, StoreError, StoreErrorKind,
};

/// A `MemoryStore` whose operations can be made to fail as if the backend were unreachable.
#[derive(Clone, Default)]
pub struct FlakyStore {
    pub inner: MemoryStore,
    /// Every operation fails.
    pub down: Arc<AtomicBool>,
    /// Only `complete` fails.
    pub completions_down: Arc<AtomicBool>,
    /// `complete`, `release` and `renew` fail: an owner cut off from the store after claiming.
    pub writes_down: Arc<AtomicBool>,
    /// Completions land only after a while, as a remote store's do.
    pub slow_completions: Arc<AtomicBool>,
    /// Claims land only after a while, as a remote store's do.
    pub slow_claims: Arc<AtomicBool>,
    /// Claims and take-overs land, but their replies are lost: they fail as unavailable.
    pub claim_replies_lost: Arc<AtomicBool>,
    /// `complete` is refused with an error that retrying cannot fix (not an outage).
    pub completions_refused: Arc<AtomicBool>,
    /// How long a renewal takes to answer, if set.
    pub renewal_latency: Arc<Mutex<Option<Duration>>>,
    /// When each renewal was sent.
    pub renewals_sent: Arc<Mutex<Vec<Instant>>>,
}

/// How long a slow operation takes.
pub const SLOW: Duration = Duration::from_millis(300);

impl FlakyStore {
    pub fn over(inner: MemoryStore) -> Self {
        Self {
            inner,
            ..Self::default()
        }
    }

    /// A claim's reply, or its loss.
    fn reply(&self, claim: Result<Claim, StoreError>) -> Result<Claim, StoreError> {
        if self.claim_replies_lost.load(Ordering::SeqCst) {
            return Err(StoreError::unavailable("simulated lost reply"));
        }
        claim
    }

    fn check(&self, switches: &[&AtomicBool]) -> Result<(), StoreError> {
        let failing = self.down.load(Ordering::SeqCst)
            || switches.iter().any(|switch| switch.load(Ordering::SeqCst));
        if failing {
            return Err(StoreError::unavailable("simulated outage"));
        }
        Ok(())
    }
}

impl IdempotencyStore for FlakyStore {
    async fn claim_as(
        &self,
        key: &StorageKey,
        token: FenceToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.check(&[])?;
        if self.slow_claims.load(Ordering::SeqCst) {
            tokio::time::sleep(SLOW).await;
        }
        let claim = self.inner.claim_as(key, token, fingerprint, lease).await;
        self.reply(claim)
    }

    async fn complete(
        &self,
        key: &StorageKey,
        token: FenceToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.check(&[&self.completions_down, &self.writes_down])?;
        if self.completions_refused.load(Ordering::SeqCst) {
            return Err(StoreError::new(
                StoreErrorKind::Other,
                "simulated refusal: the record is too large for the backend",
            ));
        }
        if self.slow_completions.load(Ordering::SeqCst) {
            tokio::time::sleep(SLOW).await;
        }
        self.inner.complete(key, token, record, ttl).await
    }

    async fn release(&self, key: &StorageKey, token: FenceToken) -> Result<(), StoreError> {
        self.check(&[&self.writes_down])?;
        self.inner.release(key, token).await
    }

    async fn renew(
        &self,
        key: &StorageKey,
        token: FenceToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.renewals_sent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Instant::now());
        let latency = *self
            .renewal_latency
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(latency) = latency {
            tokio::time::sleep(latency).await;
        }
        self.check(&[&self.writes_down])?;
        self.inner.renew(key, token, lease).await
    }

    async fn wait(&self, key: &StorageKey, timeout: Duration) -> Result<(), StoreError> {
        self.check(&[])?;
        self.inner.wait(key, timeout).await
    }

    async fn take_over_as(
        &self,
        key: &StorageKey,
        abandoned: FenceToken,
        token: FenceToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.check(&[])?;
        let claim = self
            .inner
            .take_over_as(key, abandoned, token, fingerprint, lease)
            .await;
        self.reply(claim)
    }

    async fn inspect(&self, key: &StorageKey) -> Result<Option<Inspection>, StoreError> {
        self.check(&[])?;
        self.inner.inspect(key).await
    }

    async fn forget(&self, key: &StorageKey) -> Result<bool, StoreError> {
        self.check(&[&self.writes_down])?;
        self.inner.forget(key).await
    }

    async fn break_claim(&self, key: &StorageKey) -> Result<Option<FenceToken>, StoreError> {
        self.check(&[&self.writes_down])?;
        self.inner.break_claim(key).await
    }

    async fn list_claims(
        &self,
        older_than: Duration,
        cursor: Option<ListCursor>,
        limit: usize,
    ) -> Result<ClaimPage, StoreError> {
        self.check(&[])?;
        self.inner.list_claims(older_than, cursor, limit).await
    }

    const NAME: &'static str = "flaky";
}
