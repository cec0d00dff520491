//! Stress checks that race many threads on one key of a real store, in real time.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;
use tower_idempotency::{Claim, IdempotencyStore};

use super::conformance::{fingerprint, fresh_key, sample_record};

/// What one run of [`no_claim_acquires_a_key_whose_record_is_live`] saw.
#[derive(Debug, Default)]
pub struct Acquisitions {
    /// Claims that acquired the key.
    pub total: usize,
    /// Of those, the ones made while the record stored before was still live: each one a
    /// second execution.
    pub while_live: usize,
}

/// `threads` tasks (on a multi-threaded runtime) claim one key over and over for `run`,
/// completing it with a record of `ttl` whenever they acquire it, and count the acquisitions
/// made while the previous record could still be replayed.
///
/// A completer notes, before it completes, when its record expires at the earliest (now plus
/// `ttl`, less the store's clock `resolution`: the store starts the TTL later, so it keeps
/// the record at least that long). Only one claim holds the key at a time, so a later
/// acquirer reads the note of the completion before it; acquiring before that instant means
/// a live record was missed.
pub async fn no_claim_acquires_a_key_whose_record_is_live<S>(
    store: S,
    threads: usize,
    (ttl, resolution): (Duration, Duration),
    run: Duration,
) -> Acquisitions
where
    S: IdempotencyStore + Clone + Send + Sync + 'static,
{
    let key = fresh_key();
    let live_until: Arc<Mutex<Option<Instant>>> = Arc::default();
    let (total, while_live) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let end = Instant::now() + run;
    let mut tasks = Vec::new();
    for _ in 0..threads {
        let (store, live_until) = (store.clone(), Arc::clone(&live_until));
        let (total, while_live) = (Arc::clone(&total), Arc::clone(&while_live));
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                let claim = store
                    .claim(&key, &fingerprint("a"), Duration::from_secs(30))
                    .await
                    .expect("a claim");
                let Claim::Acquired(token) = claim else {
                    tokio::task::yield_now().await;
                    continue;
                };
                let now = Instant::now();
                total.fetch_add(1, Ordering::Relaxed);
                {
                    let mut live = live_until.lock().unwrap_or_else(PoisonError::into_inner);
                    if live.is_some_and(|until| now < until) {
                        while_live.fetch_add(1, Ordering::Relaxed);
                    }
                    *live = Some(Instant::now() + ttl.saturating_sub(resolution));
                }
                store
                    .complete(&key, token, sample_record(fingerprint("a")), ttl)
                    .await
                    .expect("a completion by the claim's owner");
            }
        }));
    }
    for task in tasks {
        task.await.expect("a stress task");
    }
    Acquisitions {
        total: total.load(Ordering::Relaxed),
        while_live: while_live.load(Ordering::Relaxed),
    }
}
