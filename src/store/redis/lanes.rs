//! The connections a store's acknowledged writes are sent on ([`Lanes`]).
//!
//! Redis runs a connection's commands in order, and `WAIT` blocks the connection that sent it
//! until the replicas have acknowledged: on the store's one multiplexed connection, every
//! request would wait behind every other request's `WAIT`, one replica round trip after
//! another. A write that waits for its acknowledgement therefore goes, with its `WAIT`, in
//! the same pipeline as before (one round trip), on one of a few connections of its own,
//! taken in turn; one acknowledgement from a replica releases the `WAIT`s of all of them at
//! once. Everything else (replays, releases, renewals, writes sent while the replicas are
//! short) stays on the store's connection.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use ::redis::RedisResult;

/// How many connections a store opens for the writes that wait for their acknowledgement.
pub(super) const LANES: usize = 4;

/// After a failed attempt to open them, writes keep to the store's own connection this long
/// before the next attempt.
const REOPEN_AFTER: Duration = Duration::from_secs(1);

/// Opens one more connection like the store's own.
pub(super) type Opener<C> =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = RedisResult<C>> + Send>> + Send + Sync>;

/// The connections for acknowledged writes, opened with the first of them.
pub(super) struct Lanes<C> {
    opener: Option<Opener<C>>,
    open: OnceLock<Vec<C>>,
    next: AtomicUsize,
    /// Serialises the opening; holds when the last attempt failed.
    opening: tokio::sync::Mutex<Option<Instant>>,
}

impl<C: Clone> Lanes<C> {
    /// Lanes that `opener` opens, or none (every write then shares the store's connection:
    /// a store built on a connection it cannot copy, [`RedisStore::new`](super::RedisStore::new)).
    pub(super) fn new(opener: Option<Opener<C>>) -> Self {
        Self {
            opener,
            open: OnceLock::new(),
            next: AtomicUsize::new(0),
            opening: tokio::sync::Mutex::new(None),
        }
    }

    /// The connection for the next acknowledged write: the next lane, once they are open;
    /// opening them (bounded by `bound`) if they are not; `fallback` if they cannot be.
    pub(super) async fn pick(&self, fallback: &C, bound: Duration) -> C {
        if let Some(lane) = self.next_lane() {
            return lane;
        }
        let Some(opener) = &self.opener else {
            return fallback.clone();
        };
        let mut failed = self.opening.lock().await;
        // Another write may have opened them while this one waited.
        if let Some(lane) = self.next_lane() {
            return lane;
        }
        if failed.is_some_and(|at| at.elapsed() < REOPEN_AFTER) {
            return fallback.clone();
        }
        let opening = async {
            let mut lanes = Vec::with_capacity(LANES);
            for _ in 0..LANES {
                lanes.push(opener().await?);
            }
            RedisResult::Ok(lanes)
        };
        match tokio::time::timeout(bound, opening).await {
            Ok(Ok(lanes)) => {
                *failed = None;
                let _ = self.open.set(lanes);
                self.next_lane().unwrap_or_else(|| fallback.clone())
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, "RedisStore: opening the connections for acknowledged writes failed; using the store's own for now");
                *failed = Some(Instant::now());
                fallback.clone()
            }
            Err(_) => {
                tracing::debug!(
                    "RedisStore: opening the connections for acknowledged writes timed out; using the store's own for now"
                );
                *failed = Some(Instant::now());
                fallback.clone()
            }
        }
    }

    fn next_lane(&self) -> Option<C> {
        let lanes = self.open.get()?;
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        lanes.get(n % lanes.len().max(1)).cloned()
    }

    /// How many lanes are open (0 before the first acknowledged write).
    #[cfg(test)]
    fn open_count(&self) -> usize {
        self.open.get().map_or(0, Vec::len)
    }
}

impl<C> fmt::Debug for Lanes<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lanes")
            .field("can_open", &self.opener.is_some())
            .field("open", &self.open.get().map_or(0, Vec::len))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens connections numbered 1, 2, …
    fn counting_opener(opened: Arc<AtomicUsize>) -> Opener<usize> {
        Arc::new(move || {
            let opened = Arc::clone(&opened);
            Box::pin(async move { Ok(opened.fetch_add(1, Ordering::SeqCst) + 1) })
        })
    }

    #[tokio::test]
    async fn lanes_open_with_the_first_write_and_are_taken_in_turn() {
        let opened = Arc::new(AtomicUsize::new(0));
        let lanes = Lanes::new(Some(counting_opener(Arc::clone(&opened))));
        assert_eq!(lanes.open_count(), 0);
        let bound = Duration::from_secs(1);
        let mut picked = Vec::new();
        for _ in 0..2 * LANES {
            picked.push(lanes.pick(&0, bound).await);
        }
        assert_eq!(opened.load(Ordering::SeqCst), LANES, "opened once");
        assert_eq!(lanes.open_count(), LANES);
        let expected: Vec<usize> = (1..=LANES).chain(1..=LANES).collect();
        assert_eq!(picked, expected, "each lane in turn, never the fallback");
    }

    #[tokio::test]
    async fn without_an_opener_or_when_opening_fails_writes_keep_to_the_store_connection() {
        let bound = Duration::from_secs(1);
        let none: Lanes<usize> = Lanes::new(None);
        assert_eq!(none.pick(&7, bound).await, 7);
        assert_eq!(none.open_count(), 0);

        let attempts = Arc::new(AtomicUsize::new(0));
        let opener: Opener<usize> = {
            let attempts = Arc::clone(&attempts);
            Arc::new(move || {
                attempts.fetch_add(1, Ordering::SeqCst);
                Box::pin(async {
                    Err(::redis::RedisError::from((
                        ::redis::ErrorKind::Io,
                        "refused",
                    )))
                })
            })
        };
        let failing = Lanes::new(Some(opener));
        for _ in 0..10 {
            assert_eq!(failing.pick(&7, bound).await, 7);
        }
        assert_eq!(
            attempts.load(Ordering::SeqCst),
            1,
            "one attempt, then none until REOPEN_AFTER has passed"
        );
        assert_eq!(failing.open_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_opening_that_hangs_is_bounded() {
        let hanging: Opener<usize> =
            Arc::new(|| Box::pin(std::future::pending::<RedisResult<usize>>()));
        let lanes = Lanes::new(Some(hanging));
        let started = tokio::time::Instant::now();
        assert_eq!(lanes.pick(&7, Duration::from_millis(300)).await, 7);
        assert_eq!(started.elapsed(), Duration::from_millis(300));
    }
}
