//! A store written outside the crate, over a `Mutex<HashMap>`, with the public API only: its
//! core (`IdempotencyStore`) passes the core conformance suite and protects an axum `Router`
//! (built by a function that knows only the core trait); its operator tools (`AdminStore`,
//! apart at the end) pass the admin conformance suite.

mod common;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use axum::{Router, body::Body, routing::post};
use http::{Request, StatusCode};
use tokio::{sync::Notify, time::Instant};
use tower::ServiceExt;
use tower_idempotency::{
    AdminStore, CachedStore, Claim, ClaimInfo, ClaimPage, FenceToken, Fingerprint,
    IDEMPOTENT_REPLAYED, IdempotencyLayer, IdempotencyStore, Inspection, ListCursor, Record,
    RecordInfo, Recovery, StorageKey, StoreError, StoreErrorKind,
};

/// A claim (with the time it was made) or a record, each with the time it ends.
enum Entry {
    Claim(FenceToken, Fingerprint, Instant, Instant),
    Record(Record, Instant),
}

/// Entries end at `until`, by tokio's clock. One `Notify` wakes every waiter on any completion
/// or release: the trait allows spurious wake-ups. An ended entry is only ever replaced, never
/// purged, so the map grows with every key: a real store must bound its memory.
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
            Some(Entry::Claim(held, .., until))
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
            Some(Entry::Claim(_, fingerprint, _, until)) if *until > now => Some(Claim::InFlight {
                fingerprint: *fingerprint,
            }),
            Some(Entry::Claim(token, fingerprint, ..)) if Some(*token) != abandoned => {
                Some(Claim::Abandoned {
                    token: *token,
                    fingerprint: *fingerprint,
                })
            }
            _ => None,
        };
        held.unwrap_or_else(|| {
            entries.insert(*key, Entry::Claim(token, *fingerprint, now, now + lease));
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
            if let Some(Entry::Claim(.., until)) = entries.get_mut(key) {
                *until = Instant::now() + lease;
            }
        })
    }

    async fn wait(&self, key: &StorageKey, timeout: Duration) -> Result<(), StoreError> {
        let mut changed = std::pin::pin!(self.changed.notified());
        changed.as_mut().enable(); // before looking, so that no wake-up is missed
        let until = match self.entries().get(key) {
            Some(Entry::Claim(.., until)) if *until > Instant::now() => *until,
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
admin_conformance_suite!(async { MapStore::default() });

/// A router over `store` whose handler counts its runs and answers with the count. Generic
/// over the core trait alone, so the compiler checks that serving requests needs no more.
fn app<St: IdempotencyStore>(store: St, calls: &Arc<AtomicUsize>) -> Router {
    let calls = Arc::clone(calls);
    let handler = move || async move {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
        (StatusCode::CREATED, format!("charge {n}"))
    };
    Router::new().route("/charges", post(handler)).layer(
        // Compiles without `AdminStore`: the setting needs only the core trait.
        IdempotencyLayer::new(store)
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
    let app = app(MapStore::default(), &calls);
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
    let app = app(MapStore::default(), &calls);
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

#[tokio::test]
async fn a_cached_store_over_it_replays_from_its_cache() {
    let (store, calls) = (MapStore::default(), Arc::default());
    let app = app(CachedStore::new(store.clone(), 1024 * 1024), &calls);
    assert!(!charge(&app, "k-1").await.1);
    // Emptied behind the cache's back: only the cache's copy can answer the retry.
    store.entries().clear();
    assert_eq!(
        charge(&app, "k-1").await,
        (StatusCode::CREATED, true, "charge 1".to_owned())
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

// The operator tools, apart from the core: what the admin router needs.

/// `at`, by tokio's clock, as the system's time (the admin suite runs on the real clock).
fn system_time(at: Instant) -> SystemTime {
    let now = (Instant::now(), SystemTime::now());
    match at.checked_duration_since(now.0) {
        Some(ahead) => now.1 + ahead,
        None => now.1 - (now.0 - at),
    }
}

fn claim_info(key: &StorageKey, entry: &Entry) -> Option<ClaimInfo> {
    let Entry::Claim(token, fingerprint, claimed, until) = entry else {
        return None;
    };
    let (claimed, until) = (system_time(*claimed), system_time(*until));
    Some(ClaimInfo::new(
        *key,
        *token,
        *fingerprint,
        Some(claimed),
        until,
    ))
}

impl AdminStore for MapStore {
    async fn inspect(&self, key: &StorageKey) -> Result<Option<Inspection>, StoreError> {
        Ok(match self.entries().get(key) {
            Some(Entry::Record(record, until)) if *until > Instant::now() => Some(
                Inspection::Completed(RecordInfo::of(record, None, Some(system_time(*until)))),
            ),
            Some(entry) => claim_info(key, entry).map(Inspection::InFlight),
            None => None,
        })
    }

    async fn forget(&self, key: &StorageKey) -> Result<bool, StoreError> {
        let mut entries = self.entries();
        let Some(Entry::Record(_, until)) = entries.get(key) else {
            return Ok(false);
        };
        let live = *until > Instant::now();
        entries.remove(key);
        Ok(live)
    }

    async fn break_claim(&self, key: &StorageKey) -> Result<Option<FenceToken>, StoreError> {
        let mut entries = self.entries();
        let Some(Entry::Claim(token, ..)) = entries.get(key) else {
            return Ok(None);
        };
        let token = *token;
        entries.remove(key);
        drop(entries);
        self.changed.notify_waiters();
        Ok(Some(token))
    }

    /// In key order, the cursor being the last key listed. Each page scans the whole map: a
    /// real store bounds the work per page (`MemoryStore` keeps its keys in ordered shards).
    async fn list_claims(
        &self,
        older_than: Duration,
        cursor: Option<ListCursor>,
        limit: usize,
    ) -> Result<ClaimPage, StoreError> {
        let after = match cursor {
            Some(cursor) => Some(StorageKey::from_hex(cursor.as_str()).ok_or_else(|| {
                StoreError::new(StoreErrorKind::Other, "not a cursor of this store")
            })?),
            None => None,
        };
        let now = Instant::now();
        let old =
            |entry: &Entry| matches!(entry, Entry::Claim(_, _, at, _) if now - *at >= older_than);
        let mut claims: Vec<ClaimInfo> = self
            .entries()
            .iter()
            .filter(|(key, entry)| after.is_none_or(|after| **key > after) && old(entry))
            .filter_map(|(key, entry)| claim_info(key, entry))
            .collect();
        claims.sort_by_key(|claim| *claim.key());
        let limit = limit.max(1);
        let next =
            (claims.len() > limit).then(|| ListCursor::new(claims[limit - 1].key().to_hex()));
        claims.truncate(limit);
        Ok(ClaimPage { claims, next })
    }
}
