//! A store written outside the crate, over a `Mutex<HashMap>`: it implements the core trait
//! only (no `AdminStore`), passes the core conformance suite, and protects an axum `Router`.

mod common;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{Router, body::Body, routing::post};
use http::{Request, StatusCode};
use tokio::{sync::Notify, time::Instant};
use tower::ServiceExt;
use tower_idempotency::{
    Claim, FenceToken, Fingerprint, IDEMPOTENT_REPLAYED, IdempotencyLayer, IdempotencyStore,
    Record, Recovery, StorageKey, StoreError,
};

/// A claim or a record, each with the time it ends.
enum Entry {
    Claim(FenceToken, Fingerprint, Instant),
    Record(Record, Instant),
}

/// Entries end at `until`, by tokio's clock. One `Notify` wakes every waiter on any completion
/// or release: the trait allows spurious wake-ups.
#[derive(Clone, Default)]
struct MapStore {
    entries: Arc<Mutex<HashMap<StorageKey, Entry>>>,
    changed: Arc<Notify>,
}

type Entries = HashMap<StorageKey, Entry>;

impl MapStore {
    fn entries(&self) -> MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` if `key` holds the claim `token` (and, if `live`, its lease has not ended).
    fn fenced(
        &self,
        key: &StorageKey,
        token: FenceToken,
        live: bool,
        f: impl FnOnce(&mut Entries),
    ) -> Result<(), StoreError> {
        let mut entries = self.entries();
        match entries.get(key) {
            Some(Entry::Claim(held, _, until))
                if *held == token && (!live || *until > Instant::now()) =>
            {
                f(&mut entries);
                Ok(())
            }
            _ => Err(StoreError::lease_lost()),
        }
    }

    /// Claims `key` as `token` unless something holds it; an abandoned claim is taken over
    /// only if it is the one named `abandoned`.
    fn claim_unless_held(
        &self,
        key: &StorageKey,
        token: FenceToken,
        fingerprint: &Fingerprint,
        lease: Duration,
        abandoned: Option<FenceToken>,
    ) -> Claim {
        let now = Instant::now();
        let mut entries = self.entries();
        let held = match entries.get(key) {
            Some(Entry::Record(record, until)) if *until > now => Some(Claim::Completed {
                record: record.clone(),
                expires_in: Some(*until - now),
            }),
            Some(Entry::Claim(_, fingerprint, until)) if *until > now => Some(Claim::InFlight {
                fingerprint: *fingerprint,
            }),
            Some(Entry::Claim(token, fingerprint, _)) if Some(*token) != abandoned => {
                Some(Claim::Abandoned {
                    token: *token,
                    fingerprint: *fingerprint,
                })
            }
            _ => None,
        };
        held.unwrap_or_else(|| {
            entries.insert(*key, Entry::Claim(token, *fingerprint, now + lease));
            Claim::Acquired(token)
        })
    }
}

impl IdempotencyStore for MapStore {
    async fn claim_as(
        &self,
        key: &StorageKey,
        token: FenceToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        Ok(self.claim_unless_held(key, token, fingerprint, lease, None))
    }

    async fn complete(
        &self,
        key: &StorageKey,
        token: FenceToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let until = Instant::now() + ttl;
        self.fenced(key, token, true, |entries| {
            drop(entries.insert(*key, Entry::Record(record, until)))
        })?;
        self.changed.notify_waiters();
        Ok(())
    }

    async fn release(&self, key: &StorageKey, token: FenceToken) -> Result<(), StoreError> {
        self.fenced(key, token, false, |entries| drop(entries.remove(key)))?;
        self.changed.notify_waiters();
        Ok(())
    }

    async fn renew(
        &self,
        key: &StorageKey,
        token: FenceToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.fenced(key, token, true, |entries| {
            if let Some(Entry::Claim(_, _, until)) = entries.get_mut(key) {
                *until = Instant::now() + lease;
            }
        })
    }

    async fn wait(&self, key: &StorageKey, timeout: Duration) -> Result<(), StoreError> {
        let mut changed = std::pin::pin!(self.changed.notified());
        changed.as_mut().enable(); // before looking, so that no wake-up is missed
        let until = match self.entries().get(key) {
            Some(Entry::Claim(_, _, until)) if *until > Instant::now() => *until,
            _ => return Ok(()),
        };
        let _woken = tokio::time::timeout_at(until.min(Instant::now() + timeout), changed).await;
        Ok(())
    }

    async fn take_over_as(
        &self,
        key: &StorageKey,
        abandoned: FenceToken,
        token: FenceToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        Ok(self.claim_unless_held(key, token, fingerprint, lease, Some(abandoned)))
    }
}

conformance_suite!(async { MapStore::default() });

/// A router whose handler counts its runs and answers with the count.
fn app(calls: &Arc<AtomicUsize>) -> Router {
    let calls = Arc::clone(calls);
    let handler = move || async move {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
        (StatusCode::CREATED, format!("charge {n}"))
    };
    Router::new().route("/charges", post(handler)).layer(
        // Compiles without `AdminStore`: the setting needs only the core trait.
        IdempotencyLayer::new(MapStore::default())
            .with_outcome_unknown(|_: &http::request::Parts| Recovery::RunAgain),
    )
}

/// The status, whether it was replayed, and the body.
async fn charge(app: &Router, key: &str) -> (StatusCode, bool, String) {
    let request = Request::post("/charges")
        .header("idempotency-key", key)
        .body(Body::from(r#"{"amount":100}"#))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let replayed = response
        .headers()
        .get(IDEMPOTENT_REPLAYED)
        .is_some_and(|v| v == "true");
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), 1024)
        .await
        .unwrap();
    (
        status,
        replayed,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test]
async fn a_retry_is_replayed_without_running_the_handler_again() {
    let calls = Arc::default();
    let app = app(&calls);
    let first = charge(&app, "k-1").await;
    assert_eq!(first, (StatusCode::CREATED, false, "charge 1".to_owned()));
    assert_eq!(
        charge(&app, "k-1").await,
        (StatusCode::CREATED, true, "charge 1".to_owned())
    );
    assert_eq!(
        charge(&app, "k-2").await,
        (StatusCode::CREATED, false, "charge 2".to_owned())
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_run_the_handler_once() {
    let calls = Arc::default();
    let app = app(&calls);
    let mut duplicates = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let app = app.clone();
        duplicates.spawn(async move { charge(&app, "same").await });
    }
    let mut replayed = 0;
    for (status, was_replayed, body) in duplicates.join_all().await {
        assert_eq!((status, body.as_str()), (StatusCode::CREATED, "charge 1"));
        replayed += usize::from(was_replayed);
    }
    assert_eq!((calls.load(Ordering::SeqCst), replayed), (1, 31));
}
