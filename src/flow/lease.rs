//! The in-flight claim as a value: renewed while its handler runs, and completed, released,
//! or (on drop) released in the background.
//!
//! This is the shape of tower's concurrency permit: every path that does not complete the
//! claim gives it back, so a key is never left blocked for a lease after an error, a panic
//! or a dropped connection.
//!
//! A completion that fails because the store is unreachable is not given up at once: the
//! handler has run, and releasing the key would let a retry run it again. It is retried in
//! the background for as long as the claim may still be live (the store keeps it for the
//! lease from its last renewal), so a store that comes back within the lease gets the record
//! and the retry its replay. Only then, or on any other failure, is the key released.
//!
//! A claim whose reply was lost is a lease too: the claimant chose its token, so it releases
//! it, fenced and retried the same way ([`Lease::release_unanswered`]).

use std::{
    future::Future,
    pin::{Pin, pin},
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::{Instant, Sleep};

use crate::{
    flow::task::spawn,
    key::StorageKey,
    observe::{Observer, Op, RecordResult, Renewal as Renewed, Timed},
    record::Record,
    store::error::{StoreError, StoreErrorKind},
    store::{FenceToken, IdempotencyStore},
};

/// The first pause before a failed completion or release is tried again; it doubles up to
/// [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(25);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// Whether the handler's response still stands once its claim is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub(crate) enum Kept {
    /// It does: answer it.
    Response,
    /// It does not: it was written in the handler's own transaction, which was rolled back
    /// ([`StoreErrorKind::RolledBack`]); the key is freed, the client gets a problem.
    Void,
    /// It does not: it was to commit in the handler's own transaction, but its streamed body
    /// failed or panicked before it was whole; the transaction was rolled back, the key is
    /// freed, the client gets a 500 problem (nothing of the response was sent).
    BodyFailed,
}

/// Whether the claim a release gives back is known to hold the key.
#[derive(Clone, Copy)]
enum Claimed {
    /// It was acquired.
    Known,
    /// Its reply was lost: it may never have landed.
    Unknown,
}

/// A claim held by this process.
pub(crate) struct Lease<St: IdempotencyStore> {
    store: St,
    key: StorageKey,
    token: FenceToken,
    duration: Duration,
    /// Until when the store keeps the claim, as far as this process knows: the lease counted
    /// from when the claim, or its last successful renewal, was sent.
    live_until: Instant,
    held: bool,
    /// The store writes the record in the handler's own transaction
    /// ([`IdempotencyStore::prepare_handler`]): the response must be whole before it.
    in_transaction: bool,
    observer: Option<Observer>,
}

/// Renewing a [`Lease`] beside the work it guards: a field of the state that runs the work.
/// Kept apart from the lease so the lease stays `Sync` (a renewal on its way is not).
#[derive(Default)]
pub(crate) struct Renewal {
    /// Set once the lease was lost: renewing it again is pointless.
    stopped: bool,
    /// Started at the work's first pending poll: work done at once needs no timer at all.
    timer: Option<Pin<Box<Sleep>>>,
    pending: Option<(Renewing, Instant)>,
}

/// A renewal on its way to the store.
type Renewing = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;

impl<St: IdempotencyStore> Lease<St> {
    /// The claim `token` on `key`, for `duration` from `claimed_at` (when the claim was sent).
    pub(crate) fn new(
        store: St,
        key: StorageKey,
        token: FenceToken,
        duration: Duration,
        claimed_at: Instant,
    ) -> Self {
        Self {
            store,
            key,
            token,
            duration,
            live_until: claimed_at + duration,
            held: true,
            in_transaction: false,
            observer: None,
        }
    }

    /// Reports renewals, lost leases and what became of the response to `observer`.
    pub(crate) fn observed(mut self, observer: Observer) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Hands the claim to the store before the handler runs, with the request's extensions
    /// ([`IdempotencyStore::prepare_handler`]).
    pub(crate) fn prepare_handler(&mut self, extensions: &mut http::Extensions) {
        self.in_transaction = self
            .store
            .prepare_handler(&self.key, self.token, extensions);
    }

    /// Whether the record is written in the handler's own transaction: the response must be
    /// whole before the record is.
    pub(crate) fn in_transaction(&self) -> bool {
        self.in_transaction
    }

    fn store_op<F>(&self, op: Op, operation: F) -> Timed<'_, F> {
        Timed::new(self.observer.as_ref(), St::NAME, op, operation)
    }

    fn report(&self, report: impl FnOnce(&Observer)) {
        if let Some(observer) = &self.observer {
            report(observer);
        }
    }

    /// Runs `work`, renewing the lease beside it until it is done.
    pub(crate) async fn keep_alive<F: Future>(&mut self, work: F) -> F::Output {
        let mut work = pin!(work);
        let mut renewal = Renewal::default();
        std::future::poll_fn(|cx| {
            if let Poll::Ready(output) = work.as_mut().poll(cx) {
                return Poll::Ready(output);
            }
            renewal.poll(self, cx);
            Poll::Pending
        })
        .await
    }

    /// Sends a renewal of the lease.
    fn renew(&self) -> Renewing {
        let (store, key, token, duration) =
            (self.store.clone(), self.key, self.token, self.duration);
        let observer = self.observer.clone();
        Box::pin(async move {
            // Made in the call: bound first, the box would hold it twice.
            Timed::new(
                observer.as_ref(),
                St::NAME,
                Op::Renew,
                store.renew(&key, token, duration),
            )
            .await
        })
    }

    /// Notes the answer to a renewal sent at `sent`; returns whether renewing goes on.
    fn renewed(&mut self, result: Result<(), StoreError>, sent: Instant) -> bool {
        match result {
            Ok(()) => {
                self.live_until = sent + self.duration;
                self.report(|o| o.renewal(Renewed::Renewed));
            }
            Err(error) if error.kind() == StoreErrorKind::LeaseLost => {
                self.report(|o| {
                    o.renewal(Renewed::Lost);
                    o.lease_lost(false);
                });
                return false;
            }
            // A failed renewal is retried at the next period; the lease has two more
            // periods to go.
            Err(error) => {
                self.report(|o| o.renewal(Renewed::Failed));
                tracing::warn!(key = ?self.key, %error, "renewing an idempotency lease failed");
            }
        }
        true
    }

    /// Stores `record` in place of the claim.
    ///
    /// Returns once the record is stored, or once a first attempt failed: a store that could
    /// not be reached is tried again in the background while the claim may still be live; any
    /// other failure releases the claim, so a retry executes again rather than waiting out
    /// the lease. A completion in the handler's own transaction that was rolled back frees the
    /// key and voids the response.
    pub(crate) async fn complete(mut self, record: Record, ttl: Duration) -> Kept {
        self.held = false;
        let stored = if record.is_replayable() {
            RecordResult::Stored
        } else {
            RecordResult::TooLarge
        };
        let completion = self
            .store
            .complete(&self.key, self.token, record.clone(), ttl);
        match self.store_op(Op::Complete, completion).await {
            Ok(()) => self.report(|o| o.record(stored)),
            Err(error) if error.kind() == StoreErrorKind::RolledBack => {
                tracing::warn!(key = ?self.key, %error, "the handler's transaction was rolled back; its response is void and the key released");
                // Never retried: a retry outside the transaction would store a record
                // whose writes were undone.
                let _ = self.release(RecordResult::StoreError).await;
                return Kept::Void;
            }
            Err(error) => self.completion_failed(error, record, ttl, stored),
        }
        Kept::Response
    }

    fn completion_failed(
        self,
        error: StoreError,
        record: Record,
        ttl: Duration,
        stored: RecordResult,
    ) {
        match error.kind() {
            StoreErrorKind::LeaseLost => self.completion_lease_lost(),
            StoreErrorKind::Unavailable => {
                tracing::warn!(key = ?self.key, %error, "storing an idempotency record failed; trying again while the claim lasts");
                spawn(async move {
                    let key = self.key;
                    let (store, token) = (self.store.clone(), self.token);
                    let completed = self
                        .retry(Op::Complete, error, || {
                            let (store, record) = (store.clone(), record.clone());
                            async move { store.complete(&key, token, record, ttl).await }
                        })
                        .await;
                    match completed.map_err(|error| error.kind()) {
                        Ok(()) => {
                            tracing::info!(?key, "idempotency record stored after a retry");
                            self.report(|o| o.record(stored));
                        }
                        Err(StoreErrorKind::LeaseLost) => self.completion_lease_lost(),
                        Err(StoreErrorKind::Unavailable) => {
                            // Releasing needs the store too; the claim frees itself instead.
                            tracing::error!(
                                ?key,
                                "storing an idempotency record failed until its claim ran out; a retry of this key will execute again"
                            );
                            self.report(|o| o.record(RecordResult::StoreError));
                        }
                        Err(_) => {
                            let _ = self.release(RecordResult::StoreError).await;
                        }
                    }
                });
            }
            _ => {
                tracing::warn!(key = ?self.key, %error, "storing an idempotency record failed; releasing the key");
                spawn(async move {
                    let _ = self.release(RecordResult::StoreError).await;
                });
            }
        }
    }

    fn completion_lease_lost(&self) {
        tracing::warn!(key = ?self.key, "idempotency lease lost before completion; the response was not stored");
        self.report(|o| {
            o.record(RecordResult::LeaseLost);
            o.lease_lost(true);
        });
    }

    /// Gives the key back, the response not stored for this reason (`why`): the next request
    /// with the key executes. A store that could not be reached is tried again while the
    /// claim lasts. The response stands.
    pub(crate) async fn release(mut self, why: RecordResult) -> Kept {
        self.held = false;
        self.report(|o| o.record(why));
        self.give_back(Claimed::Known).await;
        Kept::Response
    }

    /// Releases, in the background, a claim (or take-over) whose reply never came: it may
    /// have landed, and would then block its key for a whole lease (and be reported as
    /// abandoned after it) with nobody to end it. Fenced by its token, so it frees nothing but
    /// that claim; a store that could not be reached is tried again while the claim may
    /// last, as a completion is. The usual answer, that no such claim holds the key, is no
    /// news.
    pub(crate) fn release_unanswered(mut self) {
        self.held = false;
        spawn(self.give_back(Claimed::Unknown));
    }

    /// Releases the claim; a store that could not be reached is tried again (in the
    /// background) while the claim lasts.
    async fn give_back(self, claimed: Claimed) {
        let release = self.store.release(&self.key, self.token);
        match self.store_op(Op::Release, release).await {
            Ok(()) => {}
            Err(error) if error.kind() == StoreErrorKind::LeaseLost => {}
            Err(error) if error.kind() == StoreErrorKind::Unavailable => {
                spawn(async move {
                    let (store, key, token) = (self.store.clone(), self.key, self.token);
                    let released = self
                        .retry(Op::Release, error, || {
                            let store = store.clone();
                            async move { store.release(&key, token).await }
                        })
                        .await;
                    if let Err(error) = released
                        && error.kind() != StoreErrorKind::LeaseLost
                    {
                        self.release_failed(&error, claimed);
                    }
                });
            }
            Err(error) => self.release_failed(&error, claimed),
        }
    }

    fn release_failed(&self, error: &StoreError, claimed: Claimed) {
        match claimed {
            Claimed::Known => {
                tracing::warn!(key = ?self.key, %error, "releasing an idempotency key failed; it frees itself when its lease ends");
            }
            // Most such claims never landed: one line each through a long outage would drown
            // the ones that matter.
            Claimed::Unknown => {
                tracing::debug!(key = ?self.key, %error, "releasing a claim whose reply was lost failed; if it landed, it frees itself when its lease ends");
            }
        }
    }

    /// Tries `operation` again, with growing pauses, while the store may still hold the
    /// claim and the store stays unreachable (`failed` is the first attempt's error). The last
    /// error is returned if it never lands.
    async fn retry<F, Fut>(
        &self,
        op: Op,
        failed: StoreError,
        operation: F,
    ) -> Result<(), StoreError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(), StoreError>>,
    {
        let mut last = failed;
        let mut pause = RETRY_FIRST;
        loop {
            if Instant::now() + pause >= self.live_until {
                return Err(last);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RETRY_MAX);
            match self.store_op(op, operation()).await {
                Err(error) if error.kind() == StoreErrorKind::Unavailable => last = error,
                done => return done,
            }
        }
    }
}

impl Renewal {
    /// Keeps `lease` alive beside work that is still pending: a renewal goes out every third
    /// of the lease and its answer is noted. Call it whenever the work returns `Pending`:
    /// renewal runs beside the work, never in front of it.
    pub(crate) fn poll<St: IdempotencyStore>(
        &mut self,
        lease: &mut Lease<St>,
        cx: &mut Context<'_>,
    ) {
        let period = lease.duration / 3;
        while !self.stopped {
            if let Some((renewal, sent)) = self.pending.as_mut() {
                let Poll::Ready(result) = renewal.as_mut().poll(cx) else {
                    return;
                };
                self.stopped = !lease.renewed(result, *sent);
                self.pending = None;
                if let Some(timer) = self.timer.as_mut() {
                    timer.as_mut().reset(Instant::now() + period);
                }
                continue;
            }
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(period)));
            if timer.as_mut().poll(cx).is_pending() {
                return;
            }
            self.pending = Some((lease.renew(), Instant::now()));
        }
    }
}

impl<St: IdempotencyStore> Drop for Lease<St> {
    fn drop(&mut self) {
        // Reached when the task running the handler unwinds from a panic, or is cancelled.
        if !self.held {
            return;
        }
        let store = self.store.clone();
        let (key, token) = (self.key, self.token);
        spawn(async move {
            let _ = store.release(&key, token).await;
        });
    }
}
