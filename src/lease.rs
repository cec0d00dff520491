//! The in-flight claim as a value: renewed while its handler runs, and completed, released,
//! or (on drop) released in the background.
//!
//! This is the shape of tower's concurrency permit: every path that does not complete the
//! claim gives it back, so a key is never left blocked for a lease after an error, a panic
//! or a dropped connection.

use std::{future::Future, pin::Pin, task::Poll, time::Duration};

use tokio::time::Instant;

use crate::{
    error::StoreErrorKind,
    key::StorageKey,
    observe::{Describe, Observer, Op, RecordResult, Renewal},
    record::Record,
    store::{FenceToken, IdempotencyStore},
};

/// A claim held by this process.
pub(crate) struct Lease<St: IdempotencyStore> {
    store: St,
    key: StorageKey,
    token: FenceToken,
    duration: Duration,
    held: bool,
    observer: Option<Observer>,
}

impl<St: IdempotencyStore> Lease<St> {
    pub(crate) fn new(store: St, key: StorageKey, token: FenceToken, duration: Duration) -> Self {
        Self {
            store,
            key,
            token,
            duration,
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
    pub(crate) async fn keep_alive<F: Future>(&self, work: F) -> F::Output {
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
            let renewal = self.store.renew(&self.key, self.token, self.duration);
            let renewal = self.store_op(Op::Renew, renewal);
            tokio::select! {
                biased;
                output = &mut work => return output,
                result = renewal => match result {
                    Ok(()) => self.report(|o| o.renewal(Renewal::Renewed)),
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

    /// Stores `record` in place of the claim. A failed write releases the claim instead, so
    /// a retry executes again rather than waiting out the lease.
    pub(crate) async fn complete(mut self, record: Record, ttl: Duration) {
        self.held = false;
        let stored = if record.is_replayable() {
            RecordResult::Stored
        } else {
            RecordResult::TooLarge
        };
        let completion = self.store.complete(&self.key, self.token, record, ttl);
        match self.store_op(Op::Complete, completion).await {
            Ok(()) => self.report(|o| o.record(stored)),
            Err(error) if error.kind() == StoreErrorKind::LeaseLost => self.report(|o| {
                o.record(RecordResult::LeaseLost);
                o.lease_lost(true);
            }),
            Err(error) => {
                self.report(|o| o.record(RecordResult::StoreError));
                tracing::warn!(key = ?self.key, %error, "storing an idempotency record failed; releasing the key");
                let _ = self.store.release(&self.key, self.token).await;
            }
        }
    }

    /// Gives the key back, the response not stored for this reason: the next request with
    /// the key executes.
    pub(crate) async fn release(mut self, why: RecordResult) {
        self.held = false;
        self.report(|o| o.record(why));
        let release = self.store.release(&self.key, self.token);
        if let Err(error) = self.store_op(Op::Release, release).await
            && error.kind() != StoreErrorKind::LeaseLost
        {
            tracing::warn!(key = ?self.key, %error, "releasing an idempotency key failed; it frees itself when its lease ends");
        }
    }
}

impl<St: IdempotencyStore> Drop for Lease<St> {
    fn drop(&mut self) {
        // Reached when the task running the handler unwinds from a panic, or is cancelled.
        if !self.held {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = self.store.clone();
        let (key, token) = (self.key, self.token);
        runtime.spawn(async move {
            let _ = store.release(&key, token).await;
        });
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
