//! The connections a store's acknowledged writes are sent on ([`Lanes`]).
//!
//! Redis runs a connection's commands in order, and `WAIT` blocks the connection that sent it
//! until the replicas have acknowledged: on the store's one multiplexed connection, every
//! request would wait behind every other request's `WAIT`, one replica round trip after
//! another. A write that waits for its acknowledgement therefore goes, with its `WAIT`, in
//! the same pipeline as before (one round trip), on one of a few connections of its own,
//! taken in turn; one acknowledgement from a replica releases the `WAIT`s of all of them at
//! once. Everything else (replays, releases, renewals, writes sent while the replicas are
//! short) stays on the store's connection, and so is held up by no `WAIT`, but for the
//! release of a claim that got no reply (below). Acknowledged writes that share a lane still
//! queue behind each other's `WAIT`.
//!
//! The lanes are opened in the background, all at once, when the first acknowledged write
//! asks for one; until then (and while an attempt is under way) writes use the store's
//! connection, so opening them never adds to a request's time. Those that opened are kept.
//!
//! A claim whose reply did not come in time may still be queued on its lane; its release must
//! follow it there ([`remember_unanswered`](Lanes::remember_unanswered)), or it could run
//! first, find nothing, and leave the late claim holding its key for a whole lease.

use std::{
    collections::BTreeMap,
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, OnceLock, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use ::redis::RedisResult;

use crate::{key::StorageKey, store::FenceToken};

/// How many connections a store opens for the writes that wait for their acknowledgement.
pub(super) const LANES: usize = 4;

/// After a failed attempt to open them, writes keep to the store's own connection this long
/// before the next attempt.
const REOPEN_AFTER: Duration = Duration::from_secs(1);

/// At most this many unanswered claims' lanes are remembered for their release.
const UNANSWERED_CAP: usize = 1024;

/// An unanswered claim's lane is forgotten after this long (its release comes at once).
const UNANSWERED_KEPT: Duration = Duration::from_secs(60);

/// Opens one more connection like the store's own.
pub(super) type Opener<C> =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = RedisResult<C>> + Send>> + Send + Sync>;

/// Whether the lanes are being opened, and when the last attempt failed.
#[derive(Default)]
struct Opening {
    under_way: bool,
    failed_at: Option<Instant>,
}

/// The connections for acknowledged writes, opened with the first of them.
pub(super) struct Lanes<C> {
    opener: Option<Opener<C>>,
    open: OnceLock<Vec<C>>,
    next: AtomicUsize,
    opening: Mutex<Opening>,
    /// The connection each unanswered claim was sent on, by key and token.
    unanswered: Mutex<BTreeMap<(StorageKey, u64), (C, Instant)>>,
}

impl<C: Clone + Send + Sync + 'static> Lanes<C> {
    /// Lanes that `opener` opens, or none (every write then shares the store's connection:
    /// a store built on a connection it cannot copy, [`RedisStore::new`](crate::RedisStore::new)).
    pub(super) fn new(opener: Option<Opener<C>>) -> Self {
        Self {
            opener,
            open: OnceLock::new(),
            next: AtomicUsize::new(0),
            opening: Mutex::new(Opening::default()),
            unanswered: Mutex::new(BTreeMap::new()),
        }
    }

    /// The connection for the next acknowledged write: the next lane, once they are open;
    /// `fallback` until then. The first call (and one a second after a failed attempt)
    /// starts opening them in the background, each connection bounded by `bound`.
    pub(super) fn pick(self: &Arc<Self>, fallback: &C, bound: Duration) -> C {
        if let Some(lane) = self.next_lane() {
            return lane;
        }
        let Some(opener) = &self.opener else {
            return fallback.clone();
        };
        {
            let mut opening = self.opening.lock().unwrap_or_else(PoisonError::into_inner);
            // Another write opened them since, or is opening them, or did so and failed a
            // moment ago.
            if let Some(lane) = self.next_lane() {
                return lane;
            }
            if opening.under_way
                || opening
                    .failed_at
                    .is_some_and(|at| at.elapsed() < REOPEN_AFTER)
            {
                return fallback.clone();
            }
            opening.under_way = true;
        }
        let (lanes, opener) = (Arc::clone(self), Arc::clone(opener));
        tokio::spawn(async move { lanes.open_all(&opener, bound).await });
        fallback.clone()
    }

    /// Opens [`LANES`] connections at once, each bounded by `bound`, and keeps those that
    /// opened.
    async fn open_all(&self, opener: &Opener<C>, bound: Duration) {
        let mut attempts = tokio::task::JoinSet::new();
        for _ in 0..LANES {
            attempts.spawn(tokio::time::timeout(bound, opener()));
        }
        let mut opened = Vec::with_capacity(LANES);
        let mut failures = Vec::new();
        while let Some(attempt) = attempts.join_next().await {
            match attempt {
                Ok(Ok(Ok(lane))) => opened.push(lane),
                Ok(Ok(Err(error))) => failures.push(error.to_string()),
                Ok(Err(_)) => failures.push(format!("timed out after {bound:?}")),
                Err(error) => failures.push(error.to_string()),
            }
        }
        if !failures.is_empty() {
            tracing::debug!(
                ?failures,
                opened = opened.len(),
                "RedisStore: some connections for acknowledged writes did not open"
            );
        }
        let mut opening = self.opening.lock().unwrap_or_else(PoisonError::into_inner);
        opening.under_way = false;
        if opened.is_empty() {
            opening.failed_at = Some(Instant::now());
        } else {
            opening.failed_at = None;
            let _ = self.open.set(opened);
        }
    }

    fn next_lane(&self) -> Option<C> {
        let lanes = self.open.get()?;
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        lanes.get(n % lanes.len().max(1)).cloned()
    }

    /// Remembers `connection` as the one a claim of `key` by `token` was sent on, its reply
    /// not come in time: the claim may still be queued there.
    pub(super) fn remember_unanswered(&self, key: &StorageKey, token: FenceToken, connection: C) {
        let mut unanswered = self
            .unanswered
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if unanswered.len() >= UNANSWERED_CAP {
            unanswered.retain(|_, (_, at)| at.elapsed() < UNANSWERED_KEPT);
        }
        if unanswered.len() < UNANSWERED_CAP {
            unanswered.insert((*key, token.get()), (connection, Instant::now()));
        }
    }

    /// The connection an unanswered claim of `key` by `token` was sent on, forgotten now.
    pub(super) fn take_unanswered(&self, key: &StorageKey, token: FenceToken) -> Option<C> {
        self.unanswered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(*key, token.get()))
            .map(|(connection, _)| connection)
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

    /// Lets the background opening run to its end (the opener answers at once).
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn lanes_open_in_the_background_with_the_first_write_and_are_taken_in_turn() {
        let opened = Arc::new(AtomicUsize::new(0));
        let lanes = Arc::new(Lanes::new(Some(counting_opener(Arc::clone(&opened)))));
        assert_eq!(lanes.open_count(), 0);
        let bound = Duration::from_secs(1);
        assert_eq!(lanes.pick(&0, bound), 0, "the store's connection meanwhile");
        settle().await;
        let mut picked: Vec<usize> = (0..2 * LANES).map(|_| lanes.pick(&0, bound)).collect();
        assert_eq!(opened.load(Ordering::SeqCst), LANES, "opened once");
        assert_eq!(lanes.open_count(), LANES);
        picked.sort_unstable();
        let mut expected: Vec<usize> = (1..=LANES).chain(1..=LANES).collect();
        expected.sort_unstable();
        assert_eq!(picked, expected, "each lane in turn, never the fallback");
    }

    fn refusing() -> Pin<Box<dyn Future<Output = RedisResult<usize>> + Send>> {
        Box::pin(async {
            Err(::redis::RedisError::from((
                ::redis::ErrorKind::Io,
                "refused",
            )))
        })
    }

    #[tokio::test]
    async fn without_an_opener_or_when_opening_fails_writes_keep_to_the_store_connection() {
        let bound = Duration::from_secs(1);
        let none: Arc<Lanes<usize>> = Arc::new(Lanes::new(None));
        assert_eq!(none.pick(&7, bound), 7);
        assert_eq!(none.open_count(), 0);

        let attempts = Arc::new(AtomicUsize::new(0));
        let opener: Opener<usize> = {
            let attempts = Arc::clone(&attempts);
            Arc::new(move || {
                attempts.fetch_add(1, Ordering::SeqCst);
                refusing()
            })
        };
        let failing = Arc::new(Lanes::new(Some(opener)));
        for _ in 0..10 {
            assert_eq!(failing.pick(&7, bound), 7);
            settle().await;
        }
        assert_eq!(
            attempts.load(Ordering::SeqCst),
            LANES,
            "one attempt (all lanes at once), then none until REOPEN_AFTER has passed"
        );
        assert_eq!(failing.open_count(), 0);
    }

    #[tokio::test]
    async fn the_lanes_that_open_are_kept_when_others_fail() {
        let attempts = Arc::new(AtomicUsize::new(0));
        let opener: Opener<usize> = {
            let attempts = Arc::clone(&attempts);
            Arc::new(move || {
                let n = attempts.fetch_add(1, Ordering::SeqCst);
                if n.is_multiple_of(2) {
                    Box::pin(async move { Ok(n + 1) })
                } else {
                    refusing()
                }
            })
        };
        let lanes = Arc::new(Lanes::new(Some(opener)));
        assert_eq!(lanes.pick(&0, Duration::from_secs(1)), 0);
        settle().await;
        assert_eq!(lanes.open_count(), LANES / 2);
        assert_ne!(lanes.pick(&0, Duration::from_secs(1)), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_opening_that_hangs_holds_up_no_write_and_is_bounded() {
        let attempts = Arc::new(AtomicUsize::new(0));
        let hanging: Opener<usize> = {
            let attempts = Arc::clone(&attempts);
            Arc::new(move || {
                attempts.fetch_add(1, Ordering::SeqCst);
                Box::pin(std::future::pending::<RedisResult<usize>>())
            })
        };
        let lanes = Arc::new(Lanes::new(Some(hanging)));
        let bound = Duration::from_millis(300);
        let started = tokio::time::Instant::now();
        assert_eq!(lanes.pick(&7, bound), 7);
        settle().await;
        // While the opening hangs, writes use the store's connection at once, and start no
        // second opening.
        for _ in 0..5 {
            assert_eq!(lanes.pick(&7, bound), 7);
        }
        assert_eq!(started.elapsed(), Duration::ZERO, "no write waited");
        assert_eq!(attempts.load(Ordering::SeqCst), LANES);
        tokio::time::sleep(bound + Duration::from_millis(10)).await;
        let opening = lanes.opening.lock().unwrap_or_else(PoisonError::into_inner);
        assert!(!opening.under_way, "the attempt ended at its bound");
        assert!(opening.failed_at.is_some());
    }

    #[test]
    fn an_unanswered_claims_connection_is_given_back_once_for_its_release() {
        let lanes: Lanes<usize> = Lanes::new(None);
        let key = StorageKey::from_bytes([1; 32]);
        lanes.remember_unanswered(&key, FenceToken::new(5), 3);
        assert_eq!(
            lanes.take_unanswered(&key, FenceToken::new(6)),
            None,
            "another token"
        );
        assert_eq!(lanes.take_unanswered(&key, FenceToken::new(5)), Some(3));
        assert_eq!(
            lanes.take_unanswered(&key, FenceToken::new(5)),
            None,
            "forgotten"
        );
        for n in 0..2 * UNANSWERED_CAP as u64 {
            lanes.remember_unanswered(&key, FenceToken::new(n), 1);
        }
        assert_eq!(
            lanes.unanswered.lock().map(|map| map.len()).unwrap_or(0),
            UNANSWERED_CAP,
            "bounded"
        );
    }
}
