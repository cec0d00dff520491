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

use std::{future::Future, pin::Pin, task::Poll, time::Duration};

use tokio::time::Instant;
use tracing::Instrument;

use crate::{
    error::{StoreError, StoreErrorKind},
    key::StorageKey,
    observe::{Describe, Observer, Op, RecordResult, Renewal},
    record::Record,
    store::{FenceToken, IdempotencyStore},
};

/// The first pause before a failed completion or release is tried again; it doubles up to
/// [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(25);
const RETRY_MAX: Duration = Duration::from_secs(1);

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
    observer: Option<Observer>,
}

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
            observer: None,
        }
    }

    /// Reports renewals, lost leases and what became of the response to `observer`.
    pub(crate) fn observed(mut self, observer: Observer) -> Self {
        self.observer = Some(observer);
        self
    }

    async fn store_op<F>(&self, op: Op, operation: F) -> F::Output
    where
        F: Future,
        F::Output: Describe,
    {
        match &self.observer {
            Some(observer) => observer.store_op(St::NAME, op, operation).await,
            None => operation.await,
        }
    }

    fn report(&self, report: impl FnOnce(&Observer)) {
        if let Some(observer) = &self.observer {
            report(observer);
        }
    }

    /// Runs `work`, renewing the lease every third of its duration until `work` is done.
    ///
    /// Renewal runs beside the work, never in front of it: the work is polled while a renewal
    /// is on its way to the store.
    pub(crate) async fn keep_alive<F: Future>(&mut self, work: F) -> F::Output {
        tokio::pin!(work);
        // Most handlers are done on their first poll: they need no timer at all.
        if let Some(output) = poll_once(work.as_mut()).await {
            return output;
        }
        let period = self.duration / 3;
        let mut renewing = true;
        loop {
            if !renewing {
                return work.await;
            }
            tokio::select! {
                biased;
                output = &mut work => return output,
                () = tokio::time::sleep_until(Instant::now() + period) => {}
            }
            let sent = Instant::now();
            let renewal = self.store.renew(&self.key, self.token, self.duration);
            let renewal = self.store_op(Op::Renew, renewal);
            tokio::select! {
                biased;
                output = &mut work => return output,
                result = renewal => match result {
                    Ok(()) => {
                        self.live_until = sent + self.duration;
                        self.report(|o| o.renewal(Renewal::Renewed));
                    }
                    Err(error) if error.kind() == StoreErrorKind::LeaseLost => {
                        self.report(|o| {
                            o.renewal(Renewal::Lost);
                            o.lease_lost(false);
                        });
                        renewing = false;
                    }
                    // A failed renewal is retried at the next period; the lease has two
                    // more periods to go.
                    Err(error) => {
                        self.report(|o| o.renewal(Renewal::Failed));
                        tracing::warn!(key = ?self.key, %error, "renewing an idempotency lease failed");
                    }
                },
            }
        }
    }

    /// Stores `record` in place of the claim.
    ///
    /// Returns once the record is stored, or once a first attempt failed: a store that could
    /// not be reached is tried again in the background while the claim may still be live; any
    /// other failure releases the claim, so a retry executes again rather than waiting out
    /// the lease.
    pub(crate) async fn complete(mut self, record: Record, ttl: Duration) {
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
            Err(error) => self.completion_failed(error, record, ttl, stored),
        }
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
                        Err(_) => self.release(RecordResult::StoreError).await,
                    }
                });
            }
            _ => {
                tracing::warn!(key = ?self.key, %error, "storing an idempotency record failed; releasing the key");
                spawn(self.release(RecordResult::StoreError));
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
    /// claim lasts.
    pub(crate) async fn release(mut self, why: RecordResult) {
        self.held = false;
        self.report(|o| o.record(why));
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
                        tracing::warn!(key = ?self.key, %error, "releasing an idempotency key failed; it frees itself when its lease ends");
                    }
                });
            }
            Err(error) => {
                tracing::warn!(key = ?self.key, %error, "releasing an idempotency key failed; it frees itself when its lease ends");
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

/// Runs `work` on the current runtime, in the current span. Without a runtime (it is shutting
/// down) the work is dropped: a claim it would have ended frees itself when its lease ends.
fn spawn(work: impl Future<Output = ()> + Send + 'static) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(work.in_current_span());
    }
}

/// Polls `future` once: `Some(output)` if it was ready.
async fn poll_once<F: Future>(mut future: Pin<&mut F>) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        Poll::Ready(match future.as_mut().poll(cx) {
            Poll::Ready(output) => Some(output),
            Poll::Pending => None,
        })
    })
    .await
}
