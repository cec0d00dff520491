//! One wrapper for the test stores: `Wrap<S, H>` passes every operation to the store `S`, and
//! puts it to the hook `H` first (and a claim's reply after), so that a test store writes only
//! what it changes. Tests reach the hook's fields and methods as `store.hook`.

use std::{future::Future, time::Duration};

use tower_idempotency::{
    AdminStore, Claim, ClaimPage, FenceToken, Fingerprint, IdempotencyStore, Inspection,
    ListCursor, Record, StorageKey, StoreError,
};

/// A store operation, as its hook sees it.
#[derive(Clone, Copy, Debug)]
pub enum Op<'a> {
    Claim(&'a StorageKey, &'a Fingerprint),
    TakeOver(&'a StorageKey, &'a Fingerprint),
    Complete,
    Release,
    Renew,
    Wait,
    Inspect,
    Forget,
    BreakClaim,
    ListClaims,
}

/// What a test store changes; every method defaults to changing nothing.
pub trait Hook: Clone + Send + Sync + 'static {
    /// The store's name in metrics and logs.
    const NAME: &'static str = "custom";

    /// Runs before `op` reaches the store; an error fails `op` without reaching it.
    fn before(&self, op: Op<'_>) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = op;
        async { Ok(()) }
    }

    /// What the caller of a claim or take-over (`op`) gets when the store answered `reply`.
    fn reply(&self, op: Op<'_>, reply: Result<Claim, StoreError>) -> Result<Claim, StoreError> {
        let _ = op;
        reply
    }
}

/// `inner` with `hook` in front of it.
#[derive(Clone, Default)]
pub struct Wrap<S, H> {
    pub inner: S,
    pub hook: H,
}

impl<S, H: Default> Wrap<S, H> {
    pub fn over(inner: S) -> Self {
        Self {
            inner,
            hook: H::default(),
        }
    }
}

impl<S: IdempotencyStore, H: Hook> IdempotencyStore for Wrap<S, H> {
    async fn claim_as(
        &self,
        key: &StorageKey,
        token: FenceToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let op = Op::Claim(key, fingerprint);
        self.hook.before(op).await?;
        let reply = self.inner.claim_as(key, token, fingerprint, lease).await;
        self.hook.reply(op, reply)
    }

    async fn complete(
        &self,
        key: &StorageKey,
        token: FenceToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.hook.before(Op::Complete).await?;
        self.inner.complete(key, token, record, ttl).await
    }

    async fn release(&self, key: &StorageKey, token: FenceToken) -> Result<(), StoreError> {
        self.hook.before(Op::Release).await?;
        self.inner.release(key, token).await
    }

    async fn renew(
        &self,
        key: &StorageKey,
        token: FenceToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.hook.before(Op::Renew).await?;
        self.inner.renew(key, token, lease).await
    }

    async fn wait(&self, key: &StorageKey, timeout: Duration) -> Result<(), StoreError> {
        self.hook.before(Op::Wait).await?;
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
        let op = Op::TakeOver(key, fingerprint);
        self.hook.before(op).await?;
        let reply = self
            .inner
            .take_over_as(key, abandoned, token, fingerprint, lease)
            .await;
        self.hook.reply(op, reply)
    }

    fn prepare_handler(
        &self,
        key: &StorageKey,
        token: FenceToken,
        extensions: &mut http::Extensions,
    ) -> bool {
        self.inner.prepare_handler(key, token, extensions)
    }

    const NAME: &'static str = H::NAME;
}

impl<S: AdminStore, H: Hook> AdminStore for Wrap<S, H> {
    async fn inspect(&self, key: &StorageKey) -> Result<Option<Inspection>, StoreError> {
        self.hook.before(Op::Inspect).await?;
        self.inner.inspect(key).await
    }

    async fn forget(&self, key: &StorageKey) -> Result<bool, StoreError> {
        self.hook.before(Op::Forget).await?;
        self.inner.forget(key).await
    }

    async fn break_claim(&self, key: &StorageKey) -> Result<Option<FenceToken>, StoreError> {
        self.hook.before(Op::BreakClaim).await?;
        self.inner.break_claim(key).await
    }

    async fn list_claims(
        &self,
        older_than: Duration,
        cursor: Option<ListCursor>,
        limit: usize,
    ) -> Result<ClaimPage, StoreError> {
        self.hook.before(Op::ListClaims).await?;
        self.inner.list_claims(older_than, cursor, limit).await
    }
}
