//! A store that remembers the addresses and fingerprints the layer claims, over any store.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tower_idempotency::{
    Claim, ClaimPage, FenceToken, Fingerprint, IdempotencyStore, Inspection, ListCursor, Record,
    StorageKey, StoreError,
};

/// Passes every operation to `inner`, and records each claim's key and fingerprint.
#[derive(Clone)]
pub struct Recording<St> {
    pub inner: St,
    claims: Arc<Mutex<Vec<(StorageKey, Fingerprint)>>>,
}

impl<St> Recording<St> {
    pub fn over(inner: St) -> Self {
        Self {
            inner,
            claims: Arc::default(),
        }
    }

    /// The (key, fingerprint) of every claim so far, in order.
    pub fn claims(&self) -> Vec<(StorageKey, Fingerprint)> {
        self.claims
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl<St: IdempotencyStore> IdempotencyStore for Recording<St> {
    async fn claim_as(
        &self,
        key: &StorageKey,
        token: FenceToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.claims
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((*key, *fingerprint));
        self.inner.claim_as(key, token, fingerprint, lease).await
    }

    async fn complete(
        &self,
        key: &StorageKey,
        token: FenceToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.inner.complete(key, token, record, ttl).await
    }

    async fn release(&self, key: &StorageKey, token: FenceToken) -> Result<(), StoreError> {
        self.inner.release(key, token).await
    }

    async fn renew(
        &self,
        key: &StorageKey,
        token: FenceToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.inner.renew(key, token, lease).await
    }

    async fn wait(&self, key: &StorageKey, timeout: Duration) -> Result<(), StoreError> {
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
        self.inner
            .take_over_as(key, abandoned, token, fingerprint, lease)
            .await
    }

    async fn inspect(&self, key: &StorageKey) -> Result<Option<Inspection>, StoreError> {
        self.inner.inspect(key).await
    }

    async fn forget(&self, key: &StorageKey) -> Result<bool, StoreError> {
        self.inner.forget(key).await
    }

    async fn break_claim(&self, key: &StorageKey) -> Result<Option<FenceToken>, StoreError> {
        self.inner.break_claim(key).await
    }

    async fn list_claims(
        &self,
        older_than: Duration,
        cursor: Option<ListCursor>,
        limit: usize,
    ) -> Result<ClaimPage, StoreError> {
        self.inner.list_claims(older_than, cursor, limit).await
    }
}
