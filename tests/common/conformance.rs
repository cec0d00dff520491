//! The store conformance suite: the contract of `IdempotencyStore`, checked against a real
//! store, in two parts. Every store runs the core (`conformance_suite!`): what the layer needs
//! to protect requests. A store implementing `AdminStore` also runs the operator tools' part
//! (`admin_conformance_suite!`, on the real clock). Each check uses keys of its own, so checks
//! may share one store.
//!
//! It is in the repository, not in the published package: a store written elsewhere copies
//! this file to its own `tests/common/conformance.rs` (the macros call
//! `crate::common::conformance`).
//!
//! Time is tokio's: checks sleep with `tokio::time::sleep` and measure with
//! `tokio::time::Instant`. Stores that keep time by tokio's clock (`MemoryStore`,
//! `CachedStore`) run the suite on a paused clock (`conformance_suite!(paused; …)`), where a
//! sleep advances the clock at once and waits are measured exactly; Redis keeps its own time,
//! so its runs sleep for real.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use tower_idempotency::{
    AdminStore, Claim, ClaimInfo, FenceToken, Fingerprint, IdempotencyStore, Inspection, Record,
    StorageKey, StoreErrorKind,
};

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

/// A key no other check (or earlier run against the same server) uses.
pub fn fresh_key() -> StorageKey {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut bytes = [0; 32];
    bytes[..8].copy_from_slice(&n.to_be_bytes());
    bytes[8..16].copy_from_slice(&nanos.to_be_bytes());
    bytes[16..20].copy_from_slice(&std::process::id().to_be_bytes());
    // Spread keys over every shard / slot.
    bytes[0] ^= (nanos as u8).wrapping_mul(31) ^ (n as u8).wrapping_mul(97);
    StorageKey::from_bytes(bytes)
}

pub fn fingerprint(body: &str) -> Fingerprint {
    Fingerprint::of(
        &Method::POST,
        &Uri::from_static("/charges"),
        body.as_bytes(),
    )
}

/// A record with what is easy to lose: repeated headers, non-UTF-8 values, a binary body.
pub fn sample_record(fingerprint: Fingerprint) -> Record {
    let mut headers = HeaderMap::new();
    headers.append("content-type", HeaderValue::from_static("application/json"));
    headers.append("set-cookie", HeaderValue::from_static("a=1; Path=/"));
    headers.append("x-raw", HeaderValue::from_bytes(b"\xe9t\xe9 \xff").unwrap());
    headers.append("set-cookie", HeaderValue::from_static("b=2; Path=/"));
    Record::response(
        fingerprint,
        StatusCode::CREATED,
        &headers,
        Bytes::from_static(b"{\"id\":\"ch_1\"}\x00\xff"),
        None,
    )
}

fn acquired(claim: Claim) -> tower_idempotency::FenceToken {
    match claim {
        Claim::Acquired(token) => token,
        other => panic!("expected the claim to be acquired, got {other:?}"),
    }
}

/// The record of a completed claim (whatever expiry the store reports).
pub fn completed_record(claim: Claim) -> Record {
    match claim {
        Claim::Completed { record, .. } => record,
        other => panic!("expected a completed record, got {other:?}"),
    }
}

fn header_pairs(map: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    map.iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect()
}

pub async fn a_free_key_is_claimed_once_and_then_reported_in_flight<S: IdempotencyStore>(
    store: &S,
) {
    let key = fresh_key();
    let token = acquired(store.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
    let again = store.claim(&key, &fingerprint("b"), LEASE).await.unwrap();
    assert_eq!(
        again,
        Claim::InFlight {
            fingerprint: fingerprint("a")
        },
        "the holder's fingerprint is reported"
    );
    store.release(&key, token).await.unwrap();
}

pub async fn a_completed_key_returns_its_record_unchanged<S: IdempotencyStore>(store: &S) {
    let key = fresh_key();
    let token = acquired(store.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
    let record = sample_record(fingerprint("a"));
    store
        .complete(&key, token, record.clone(), TTL)
        .await
        .unwrap();
    for _ in 0..2 {
        match store.claim(&key, &fingerprint("a"), LEASE).await.unwrap() {
            Claim::Completed {
                record: found,
                expires_in,
            } => {
                if let Some(left) = expires_in {
                    assert!(
                        left <= TTL && left > TTL / 2,
                        "reported expiry {left:?} for a TTL of {TTL:?}"
                    );
                }
                assert_eq!(found, record);
                assert_eq!(
                    header_pairs(found.headers().unwrap()),
                    header_pairs(record.headers().unwrap())
                );
            }
            other => panic!("expected the record, got {other:?}"),
        }
    }
    // Another fingerprint still gets the record: judging it is the layer's business.
    assert!(matches!(
        store.claim(&key, &fingerprint("b"), LEASE).await.unwrap(),
        Claim::Completed { .. }
    ));
}

pub async fn not_replayable_records_are_kept_as_such<S: IdempotencyStore>(store: &S) {
    let key = fresh_key();
    let token = acquired(store.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
    let record = Record::not_replayable(fingerprint("a"), StatusCode::OK);
    store
        .complete(&key, token, record.clone(), TTL)
        .await
        .unwrap();
    assert_eq!(
        completed_record(store.claim(&key, &fingerprint("a"), LEASE).await.unwrap()),
        record
    );
}

pub async fn large_records_round_trip<S: IdempotencyStore>(store: &S) {
    let key = fresh_key();
    let token = acquired(store.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
    let body: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    let mut headers = HeaderMap::new();
    for i in 0..100 {
        headers.append(
            "x-many",
            HeaderValue::from_str(&format!("value-{i}")).unwrap(),
        );
    }
    let record = Record::response(
        fingerprint("a"),
        StatusCode::OK,
        &headers,
        Bytes::from(body),
        None,
    );
    store
        .complete(&key, token, record.clone(), TTL)
        .await
        .unwrap();
    assert_eq!(
        completed_record(store.claim(&key, &fingerprint("a"), LEASE).await.unwrap()),
        record
    );
}

pub async fn completion_is_fenced_by_the_token<S: IdempotencyStore>(store: &S) {
    let key = fresh_key();
    let token = acquired(store.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
    let stale = tower_idempotency::FenceToken::new(token.get().wrapping_add(12345));
    let refused = store
        .complete(&key, stale, sample_record(fingerprint("a")), TTL)
        .await;
    assert_eq!(
        refused.map_err(|e| e.kind()),
        Err(StoreErrorKind::LeaseLost)
    );
    // Nothing was written: the key is still in flight.
    assert!(matches!(
        store.claim(&key, &fingerprint("a"), LEASE).await.unwrap(),
        Claim::InFlight { .. }
    ));
    store
        .complete(&key, token, sample_record(fingerprint("a")), TTL)
        .await
        .unwrap();
    // A completed key cannot be completed, released or renewed again.
    let again = store
        .complete(
            &key,
            token,
            Record::not_replayable(fingerprint("a"), StatusCode::OK),
            TTL,
        )
        .await;
    assert_eq!(again.map_err(|e| e.kind()), Err(StoreErrorKind::LeaseLost));
    assert_eq!(
        store.release(&key, token).await.map_err(|e| e.kind()),
        Err(StoreErrorKind::LeaseLost)
    );
    assert_eq!(
        store.renew(&key, token, LEASE).await.map_err(|e| e.kind()),
        Err(StoreErrorKind::LeaseLost)
    );
    assert_eq!(
        completed_record(store.claim(&key, &fingerprint("a"), LEASE).await.unwrap()),
        sample_record(fingerprint("a"))
    );
}

pub async fn a_released_key_can_be_claimed_again_with_a_new_token<S: IdempotencyStore>(store: &S) {
    let key = fresh_key();
    let first = acquired(store.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
    store.release(&key, first).await.unwrap();
    let second = acquired(store.claim(&key, &fingerprint("b"), LEASE).await.unwrap());
    assert_ne!(first, second, "a new claim gets a new token");
    // The first owner's token no longer works on the second claim.
    assert_eq!(
        store.release(&key, first).await.map_err(|e| e.kind()),
        Err(StoreErrorKind::LeaseLost)
    );
    assert_eq!(
        store.renew(&key, first, LEASE).await.map_err(|e| e.kind()),
        Err(StoreErrorKind::LeaseLost)
    );
    assert!(matches!(
        store.claim(&key, &fingerprint("b"), LEASE).await.unwrap(),
        Claim::InFlight { .. }
    ));
    store.release(&key, second).await.unwrap();
}

/// The caller chooses a claim's token, so that a claim whose reply is lost can be released by
/// it: a store acquires under that token, and a release by a token that never claimed the key
/// (the claim did not land) changes nothing.
pub async fn a_claim_is_acquired_under_the_token_the_caller_chose<S: IdempotencyStore>(store: &S) {
    let key = fresh_key();
    let chosen = FenceToken::generate();
    assert_eq!(
        store
            .claim_as(&key, chosen, &fingerprint("a"), LEASE)
            .await
            .unwrap(),
        Claim::Acquired(chosen)
    );
    let never_landed = FenceToken::generate();
    assert_eq!(
        store
            .release(&key, never_landed)
            .await
            .map_err(|e| e.kind()),
        Err(StoreErrorKind::LeaseLost),
        "a release by a token that never claimed the key is refused"
    );
    assert!(matches!(
        store.claim(&key, &fingerprint("a"), LEASE).await.unwrap(),
        Claim::InFlight { .. }
    ));
    store.release(&key, chosen).await.unwrap();
    // The same for a take-over of an abandoned claim.
    let lease = Duration::from_millis(300);
    let abandoned = acquired(store.claim(&key, &fingerprint("a"), lease).await.unwrap());
    tokio::time::sleep(lease * 2).await;
    let Claim::Abandoned { token, .. } = store.claim(&key, &fingerprint("a"), LEASE).await.unwrap()
    else {
        panic!("the claim is abandoned once its lease ended");
    };
    assert_eq!(token, abandoned);
    let taker = FenceToken::generate();
    assert_eq!(
        store
            .take_over_as(&key, abandoned, taker, &fingerprint("a"), LEASE)
            .await
            .unwrap(),
        Claim::Acquired(taker)
    );
    assert_eq!(
        store.release(&key, abandoned).await.map_err(|e| e.kind()),
        Err(StoreErrorKind::LeaseLost)
    );
    store.release(&key, taker).await.unwrap();
}

pub async fn an_abandoned_claim_expires_after_its_lease_and_its_owner_is_fenced_out<
    S: IdempotencyStore,
>(
    store: &S,
) {
    let key = fresh_key();
    let lease = Duration::from_millis(300);
    let stale = acquired(store.claim(&key, &fingerprint("a"), lease).await.unwrap());
    assert!(matches!(
        store.claim(&key, &fingerprint("a"), lease).await.unwrap(),
        Claim::InFlight { .. }
    ));
    tokio::time::sleep(lease + Duration::from_millis(200)).await;
    // The store reports the abandoned claim rather than a free key, and changes nothing.
    for _ in 0..2 {
        assert_eq!(
            store.claim(&key, &fingerprint("b"), LEASE).await.unwrap(),
            Claim::Abandoned {
                token: stale,
                fingerprint: fingerprint("a")
            }
        );
    }
    // Only the abandoned claim's own token takes it over.
    let wrong = tower_idempotency::FenceToken::new(stale.get().wrapping_add(1));
    assert!(matches!(
        store
            .take_over(&key, wrong, &fingerprint("a"), LEASE)
            .await
            .unwrap(),
        Claim::Abandoned { token, .. } if token == stale
    ));
    let fresh = acquired(
        store
            .take_over(&key, stale, &fingerprint("a"), LEASE)
            .await
            .unwrap(),
    );
    assert_ne!(fresh, stale);
    assert!(
        matches!(
            store
                .take_over(&key, stale, &fingerprint("a"), LEASE)
                .await
                .unwrap(),
            Claim::InFlight { .. }
        ),
        "a claim taken over is live: it cannot be taken over again"
    );
    assert_eq!(
        store.release(&key, stale).await.map_err(|e| e.kind()),
        Err(StoreErrorKind::LeaseLost)
    );
    let refused = store
        .complete(&key, stale, sample_record(fingerprint("stale")), TTL)
        .await;
    assert_eq!(
        refused.map_err(|e| e.kind()),
        Err(StoreErrorKind::LeaseLost)
    );
    store
        .complete(&key, fresh, sample_record(fingerprint("a")), TTL)
        .await
        .unwrap();
    assert_eq!(
        completed_record(store.claim(&key, &fingerprint("a"), LEASE).await.unwrap()),
        sample_record(fingerprint("a")),
        "the stale owner did not overwrite the newer record"
    );
}

pub async fn renewal_keeps_a_claim_past_its_first_lease<S: IdempotencyStore>(store: &S) {
    let key = fresh_key();
    let lease = Duration::from_millis(400);
    let token = acquired(store.claim(&key, &fingerprint("a"), lease).await.unwrap());
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        store.renew(&key, token, lease).await.unwrap();
    }
    // 800 ms after the claim, twice its lease, it is still held.
    assert!(matches!(
        store.claim(&key, &fingerprint("a"), lease).await.unwrap(),
        Claim::InFlight { .. }
    ));
    store
        .complete(&key, token, sample_record(fingerprint("a")), TTL)
        .await
        .unwrap();
}

pub async fn an_expired_lease_cannot_be_renewed<S: IdempotencyStore>(store: &S) {
    let key = fresh_key();
    let lease = Duration::from_millis(200);
    let token = acquired(store.claim(&key, &fingerprint("a"), lease).await.unwrap());
    tokio::time::sleep(lease + Duration::from_millis(200)).await;
    assert_eq!(
        store.renew(&key, token, lease).await.map_err(|e| e.kind()),
        Err(StoreErrorKind::LeaseLost)
    );
}

pub async fn records_expire_after_their_ttl<S: IdempotencyStore>(store: &S) {
    let key = fresh_key();
    let token = acquired(store.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
    store
        .complete(
            &key,
            token,
            sample_record(fingerprint("a")),
            Duration::from_millis(300),
        )
        .await
        .unwrap();
    assert!(matches!(
        store.claim(&key, &fingerprint("a"), LEASE).await.unwrap(),
        Claim::Completed { .. }
    ));
    tokio::time::sleep(Duration::from_millis(700)).await;
    let token = acquired(store.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
    store.release(&key, token).await.unwrap();
}

pub async fn concurrent_claims_acquire_exactly_once<S: IdempotencyStore>(store: &S) {
    let key = fresh_key();
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.claim(&key, &fingerprint("a"), LEASE).await })
        })
        .collect();
    let mut acquired_count = 0;
    let mut in_flight = 0;
    for task in tasks {
        match task.await.unwrap().unwrap() {
            Claim::Acquired(_) => acquired_count += 1,
            Claim::InFlight { .. } => in_flight += 1,
            other => panic!("nothing was completed or abandoned: {other:?}"),
        }
    }
    assert_eq!((acquired_count, in_flight), (1, 63));
}

/// How long a waiter may take to notice a change it was notified of. Generous: this checks
/// that waiting is woken, not how fast.
const PROMPT: Duration = Duration::from_millis(500);

pub async fn a_waiter_wakes_when_the_claim_completes<S: IdempotencyStore>(store: &S) {
    let key = fresh_key();
    let token = acquired(store.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            store.wait(&key, Duration::from_secs(20)).await.unwrap();
            started.elapsed()
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    store
        .complete(&key, token, sample_record(fingerprint("a")), TTL)
        .await
        .unwrap();
    let waited = waiter.await.unwrap();
    assert!(
        waited < PROMPT + Duration::from_millis(100),
        "woke after {waited:?}, not on completion"
    );
    assert!(matches!(
        store.claim(&key, &fingerprint("a"), LEASE).await.unwrap(),
        Claim::Completed { .. }
    ));
}

pub async fn a_waiter_wakes_when_the_claim_is_released<S: IdempotencyStore>(store: &S) {
    let key = fresh_key();
    let token = acquired(store.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            store.wait(&key, Duration::from_secs(20)).await.unwrap();
            started.elapsed()
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    store.release(&key, token).await.unwrap();
    let waited = waiter.await.unwrap();
    assert!(
        waited < PROMPT + Duration::from_millis(100),
        "woke after {waited:?}, not on release"
    );
}

pub async fn many_waiters_all_wake<S: IdempotencyStore>(store: &S) {
    let key = fresh_key();
    let token = acquired(store.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
    let waiters: Vec<_> = (0..32)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                store.wait(&key, Duration::from_secs(20)).await.unwrap();
                started.elapsed()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    store
        .complete(&key, token, sample_record(fingerprint("a")), TTL)
        .await
        .unwrap();
    for waiter in waiters {
        let waited = waiter.await.unwrap();
        assert!(
            waited < PROMPT + Duration::from_millis(100),
            "a waiter woke after {waited:?}"
        );
    }
}

pub async fn a_wait_ends_at_its_timeout<S: IdempotencyStore>(store: &S) {
    let key = fresh_key();
    let token = acquired(store.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
    let started = Instant::now();
    store.wait(&key, Duration::from_millis(200)).await.unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(150),
        "returned early, after {waited:?}"
    );
    assert!(waited < Duration::from_secs(5), "overslept: {waited:?}");
    store.release(&key, token).await.unwrap();
}

pub async fn a_wait_ends_when_an_abandoned_lease_expires<S: IdempotencyStore>(store: &S) {
    let key = fresh_key();
    let lease = Duration::from_millis(300);
    let _abandoned = acquired(store.claim(&key, &fingerprint("a"), lease).await.unwrap());
    let started = Instant::now();
    store.wait(&key, Duration::from_secs(20)).await.unwrap();
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(3),
        "a waiter on an abandoned claim waited {waited:?}"
    );
    assert!(matches!(
        store.claim(&key, &fingerprint("a"), LEASE).await.unwrap(),
        Claim::Abandoned { .. }
    ));
}

pub async fn waiting_on_a_free_or_completed_key_returns_at_once<S: IdempotencyStore>(store: &S) {
    let free = fresh_key();
    let started = Instant::now();
    store.wait(&free, Duration::from_secs(20)).await.unwrap();
    let completed = fresh_key();
    let token = acquired(
        store
            .claim(&completed, &fingerprint("a"), LEASE)
            .await
            .unwrap(),
    );
    store
        .complete(&completed, token, sample_record(fingerprint("a")), TTL)
        .await
        .unwrap();
    store
        .wait(&completed, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(started.elapsed() < PROMPT, "waited {:?}", started.elapsed());
}

pub async fn an_owner_may_release_its_own_expired_claim<S: IdempotencyStore>(store: &S) {
    let key = fresh_key();
    let lease = Duration::from_millis(200);
    let token = acquired(store.claim(&key, &fingerprint("a"), lease).await.unwrap());
    tokio::time::sleep(lease + Duration::from_millis(200)).await;
    store.release(&key, token).await.unwrap();
    let again = acquired(store.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
    store.release(&key, again).await.unwrap();
}

pub async fn inspect_tells_free_in_flight_abandoned_and_completed_keys_apart<S: AdminStore>(
    store: &S,
) {
    let key = fresh_key();
    assert_eq!(store.inspect(&key).await.unwrap(), None, "a free key");

    let before = SystemTime::now() - Duration::from_secs(1);
    let lease = Duration::from_millis(400);
    let token = acquired(store.claim(&key, &fingerprint("a"), lease).await.unwrap());
    let Some(Inspection::InFlight(claim)) = store.inspect(&key).await.unwrap() else {
        panic!("a claimed key is in flight");
    };
    let after = SystemTime::now() + Duration::from_secs(1);
    assert_eq!((*claim.key(), claim.token()), (key, token));
    assert_eq!(*claim.fingerprint(), fingerprint("a"));
    if let Some(at) = claim.claimed_at() {
        assert!(at >= before && at <= after, "claimed at {at:?}");
    }
    assert!(!claim.is_abandoned(SystemTime::now()));
    assert!(claim.lease_expires_at() <= after + lease);

    tokio::time::sleep(lease + Duration::from_millis(200)).await;
    let Some(Inspection::InFlight(claim)) = store.inspect(&key).await.unwrap() else {
        panic!("an abandoned claim is still reported");
    };
    assert!(claim.is_abandoned(SystemTime::now()), "{claim:?}");
    let token = acquired(
        store
            .take_over(&key, claim.token(), &fingerprint("a"), LEASE)
            .await
            .unwrap(),
    );
    let record = sample_record(fingerprint("a"));
    store
        .complete(&key, token, record.clone(), TTL)
        .await
        .unwrap();
    let Some(Inspection::Completed(info)) = store.inspect(&key).await.unwrap() else {
        panic!("a completed key is completed");
    };
    assert_eq!(*info.fingerprint(), fingerprint("a"));
    assert_eq!(info.status(), StatusCode::CREATED);
    assert!(info.is_replayable());
    assert_eq!(info.header_count(), 4);
    assert_eq!(info.body_len(), record.body().map_or(0, Bytes::len));
    if let Some(created) = info.created_at() {
        assert!(created >= before && created <= SystemTime::now() + Duration::from_secs(1));
    }
    if let Some(expires) = info.expires_at() {
        let ttl_end = SystemTime::now() + TTL;
        assert!(
            expires <= ttl_end + Duration::from_secs(1)
                && expires >= ttl_end - Duration::from_secs(60),
            "expires {expires:?}"
        );
    }
    // Inspecting changed nothing.
    assert_eq!(
        completed_record(store.claim(&key, &fingerprint("a"), LEASE).await.unwrap()),
        record
    );
}

pub async fn forget_removes_a_completed_record_and_nothing_else<S: AdminStore>(store: &S) {
    let free = fresh_key();
    assert!(!store.forget(&free).await.unwrap(), "nothing to forget");

    let key = fresh_key();
    let token = acquired(store.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
    assert!(
        !store.forget(&key).await.unwrap(),
        "a claim in flight is left alone"
    );
    assert!(matches!(
        store.claim(&key, &fingerprint("a"), LEASE).await.unwrap(),
        Claim::InFlight { .. }
    ));
    store
        .complete(&key, token, sample_record(fingerprint("a")), TTL)
        .await
        .unwrap();
    assert!(store.forget(&key).await.unwrap());
    assert_eq!(store.inspect(&key).await.unwrap(), None);
    // Forgotten, the key executes again.
    let again = acquired(store.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
    assert!(!store.forget(&key).await.unwrap());
    store.release(&key, again).await.unwrap();

    // The same for a record replayed before it is forgotten (a cache may hold it elsewhere).
    let replayed = fresh_key();
    let token = acquired(
        store
            .claim(&replayed, &fingerprint("a"), LEASE)
            .await
            .unwrap(),
    );
    let record = sample_record(fingerprint("a"));
    store
        .complete(&replayed, token, record.clone(), TTL)
        .await
        .unwrap();
    let replay = store
        .claim(&replayed, &fingerprint("a"), LEASE)
        .await
        .unwrap();
    assert_eq!(completed_record(replay), record);
    assert!(store.forget(&replayed).await.unwrap());
    let again = acquired(
        store
            .claim(&replayed, &fingerprint("a"), LEASE)
            .await
            .unwrap(),
    );
    store.release(&replayed, again).await.unwrap();
}

pub async fn break_claim_frees_a_live_or_abandoned_claim_and_fences_its_owner<S: AdminStore>(
    store: &S,
) {
    assert_eq!(store.break_claim(&fresh_key()).await.unwrap(), None);

    let key = fresh_key();
    let token = acquired(store.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            store.wait(&key, Duration::from_secs(20)).await.unwrap();
            started.elapsed()
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(store.break_claim(&key).await.unwrap(), Some(token));
    let waited = waiter.await.unwrap();
    assert!(
        waited < PROMPT + Duration::from_millis(100),
        "a waiter woke after {waited:?}, not when the claim was broken"
    );
    let refused = store
        .complete(&key, token, sample_record(fingerprint("a")), TTL)
        .await;
    assert_eq!(
        refused.map_err(|e| e.kind()),
        Err(StoreErrorKind::LeaseLost)
    );
    let next = acquired(store.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
    assert_ne!(next, token);
    store
        .complete(&key, next, sample_record(fingerprint("a")), TTL)
        .await
        .unwrap();
    assert_eq!(
        store.break_claim(&key).await.unwrap(),
        None,
        "a record is left alone"
    );
    assert!(matches!(
        store.claim(&key, &fingerprint("a"), LEASE).await.unwrap(),
        Claim::Completed { .. }
    ));

    let abandoned = fresh_key();
    let lease = Duration::from_millis(200);
    let token = acquired(
        store
            .claim(&abandoned, &fingerprint("a"), lease)
            .await
            .unwrap(),
    );
    tokio::time::sleep(lease + Duration::from_millis(200)).await;
    assert_eq!(store.break_claim(&abandoned).await.unwrap(), Some(token));
    let free = acquired(
        store
            .claim(&abandoned, &fingerprint("a"), LEASE)
            .await
            .unwrap(),
    );
    store.release(&abandoned, free).await.unwrap();
}

/// Every claim the store lists from the start, page by page (bounded).
pub async fn list_all<S: AdminStore>(
    store: &S,
    older_than: Duration,
    limit: usize,
) -> Vec<ClaimInfo> {
    let mut all = Vec::new();
    let mut cursor = None;
    for _ in 0..100_000 {
        let page = store.list_claims(older_than, cursor, limit).await.unwrap();
        assert!(
            page.claims.len() <= limit.max(1) * 2,
            "a page of {} for a limit of {limit}",
            page.claims.len()
        );
        all.extend(page.claims);
        cursor = page.next;
        if cursor.is_none() {
            return all;
        }
    }
    panic!("the listing never ended");
}

pub async fn claims_older_than_a_threshold_are_listed_page_by_page<S: AdminStore>(store: &S) {
    let mut old = Vec::new();
    for _ in 0..5 {
        let key = fresh_key();
        let token = acquired(store.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
        old.push((key, token));
    }
    let abandoned = fresh_key();
    let abandoned_token = acquired(
        store
            .claim(&abandoned, &fingerprint("a"), Duration::from_millis(100))
            .await
            .unwrap(),
    );
    let completed = fresh_key();
    let token = acquired(
        store
            .claim(&completed, &fingerprint("a"), LEASE)
            .await
            .unwrap(),
    );
    store
        .complete(&completed, token, sample_record(fingerprint("a")), TTL)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let young = fresh_key();
    let young_token = acquired(store.claim(&young, &fingerprint("a"), LEASE).await.unwrap());

    let listed = list_all(store, Duration::from_millis(400), 2).await;
    let keys: std::collections::HashSet<StorageKey> = listed.iter().map(|c| *c.key()).collect();
    for (key, token) in &old {
        let claim = listed.iter().find(|c| c.key() == key);
        assert_eq!(
            claim.map(|c| c.token()),
            Some(*token),
            "an old claim is listed with its owner's token"
        );
    }
    let found = listed.iter().find(|c| *c.key() == abandoned);
    assert!(
        found.is_some_and(|c| c.is_abandoned(SystemTime::now()) && c.token() == abandoned_token),
        "an abandoned claim is listed as such: {found:?}"
    );
    assert!(
        !keys.contains(&young),
        "a claim younger than the threshold is not listed"
    );
    assert!(!keys.contains(&completed), "records are not claims");
    let everything = list_all(store, Duration::ZERO, 1000).await;
    assert!(everything.iter().any(|c| *c.key() == young));

    for (key, token) in old.into_iter().chain([(young, young_token)]) {
        store.release(&key, token).await.unwrap();
    }
    store.break_claim(&abandoned).await.unwrap();
}

/// Defines one `#[tokio::test]` per core conformance check, each on the store that `$make` (an
/// async block) builds: on a multi-threaded runtime with the real clock, or, with `paused;`
/// first, on a paused clock (all but the check of concurrent claims, which needs threads and
/// no clock).
#[macro_export]
macro_rules! conformance_suite {
    (paused; $make:expr) => {
        $crate::conformance_suite!(@checks [tokio::test(start_paused = true)] $make;
            a_free_key_is_claimed_once_and_then_reported_in_flight,
            a_completed_key_returns_its_record_unchanged,
            not_replayable_records_are_kept_as_such,
            large_records_round_trip,
            completion_is_fenced_by_the_token,
            a_released_key_can_be_claimed_again_with_a_new_token,
            a_claim_is_acquired_under_the_token_the_caller_chose,
            an_abandoned_claim_expires_after_its_lease_and_its_owner_is_fenced_out,
            renewal_keeps_a_claim_past_its_first_lease,
            an_expired_lease_cannot_be_renewed,
            records_expire_after_their_ttl,
            a_waiter_wakes_when_the_claim_completes,
            a_waiter_wakes_when_the_claim_is_released,
            many_waiters_all_wake,
            a_wait_ends_at_its_timeout,
            a_wait_ends_when_an_abandoned_lease_expires,
            waiting_on_a_free_or_completed_key_returns_at_once,
            an_owner_may_release_its_own_expired_claim,
        );
        $crate::conformance_suite!(@checks [tokio::test(flavor = "multi_thread", worker_threads = 2)] $make;
            concurrent_claims_acquire_exactly_once,
        );
    };
    (@checks [$test:meta] $make:expr; $($check:ident),* $(,)?) => {
        $(
            #[$test]
            async fn $check() {
                let store = ($make).await;
                $crate::common::conformance::$check(&store).await;
            }
        )*
    };
    ($make:expr) => {
        $crate::conformance_suite!(@checks [tokio::test(flavor = "multi_thread", worker_threads = 2)] $make;
            a_free_key_is_claimed_once_and_then_reported_in_flight,
            a_completed_key_returns_its_record_unchanged,
            not_replayable_records_are_kept_as_such,
            large_records_round_trip,
            completion_is_fenced_by_the_token,
            a_released_key_can_be_claimed_again_with_a_new_token,
            a_claim_is_acquired_under_the_token_the_caller_chose,
            an_abandoned_claim_expires_after_its_lease_and_its_owner_is_fenced_out,
            renewal_keeps_a_claim_past_its_first_lease,
            an_expired_lease_cannot_be_renewed,
            records_expire_after_their_ttl,
            concurrent_claims_acquire_exactly_once,
            a_waiter_wakes_when_the_claim_completes,
            a_waiter_wakes_when_the_claim_is_released,
            many_waiters_all_wake,
            a_wait_ends_at_its_timeout,
            a_wait_ends_when_an_abandoned_lease_expires,
            waiting_on_a_free_or_completed_key_returns_at_once,
            an_owner_may_release_its_own_expired_claim,
        );
    };
}

/// Defines one `#[tokio::test]` per check of the operator tools (`AdminStore`), each on the
/// store that `$make` (an async block) builds, on a multi-threaded runtime with the real clock.
#[macro_export]
macro_rules! admin_conformance_suite {
    ($make:expr) => {
        $crate::conformance_suite!(@checks [tokio::test(flavor = "multi_thread", worker_threads = 2)] $make;
            inspect_tells_free_in_flight_abandoned_and_completed_keys_apart,
            forget_removes_a_completed_record_and_nothing_else,
            break_claim_frees_a_live_or_abandoned_claim_and_fences_its_owner,
            claims_older_than_a_threshold_are_listed_page_by_page,
        );
    };
}
