//! `CachedStore`: the conformance suite over a cached `MemoryStore`, and the cache's own
//! promises: replays from memory, never past the inner store's expiry.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tower_idempotency::{
    CachedStore, Claim, FenceToken, IdempotencyStore, MemoryStore, StorageKey, StoreError,
};

use common::{
    conformance::{completed_record, fingerprint, fresh_key, sample_record},
    wrap::{Hook, Op, Wrap},
};

conformance_suite!(paused; async { CachedStore::new(MemoryStore::default(), 16 * 1024 * 1024) });

// On the real clock (the operator tools compare against `SystemTime`); `forget` must also drop
// the cache's copies, or the forgotten record would still be replayed.
admin_conformance_suite!(async { CachedStore::new(MemoryStore::default(), 16 * 1024 * 1024) });

#[cfg(feature = "axum")]
operations_suite!(async { CachedStore::new(MemoryStore::default(), 16 * 1024 * 1024) });

const LEASE: Duration = Duration::from_secs(30);

/// Counts the claims that reach the inner store; can hide the expiry it reports.
type Inner = Wrap<MemoryStore, Counter>;

#[derive(Clone)]
struct Counter {
    claims: Arc<AtomicUsize>,
    report_expiry: bool,
}

impl Inner {
    fn new(report_expiry: bool) -> Self {
        Wrap {
            inner: MemoryStore::default(),
            hook: Counter {
                claims: Arc::default(),
                report_expiry,
            },
        }
    }

    fn claims(&self) -> usize {
        self.hook.claims.load(Ordering::SeqCst)
    }
}

impl Hook for Counter {
    async fn before(&self, op: Op<'_>) -> Result<(), StoreError> {
        if let Op::Claim(..) = op {
            self.claims.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    fn reply(&self, op: Op<'_>, reply: Result<Claim, StoreError>) -> Result<Claim, StoreError> {
        match (op, reply) {
            (Op::Claim(..), Ok(Claim::Completed { record, .. })) if !self.report_expiry => {
                Ok(Claim::Completed {
                    record,
                    expires_in: None,
                })
            }
            (_, reply) => reply,
        }
    }
}

async fn complete_directly(store: &impl IdempotencyStore, key: &StorageKey, ttl: Duration) {
    let Claim::Acquired(token) = store.claim(key, &fingerprint("a"), LEASE).await.unwrap() else {
        panic!("a fresh key is free");
    };
    store
        .complete(key, token, sample_record(fingerprint("a")), ttl)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_record_completed_through_the_cache_replays_without_touching_the_inner_store() {
    let inner = Inner::new(true);
    let cached = CachedStore::new(inner.clone(), 1024 * 1024);
    let key = fresh_key();
    complete_directly(&cached, &key, Duration::from_secs(60)).await;
    assert_eq!(inner.claims(), 1);
    for _ in 0..10 {
        let record = completed_record(cached.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
        assert_eq!(record, sample_record(fingerprint("a")));
    }
    assert_eq!(inner.claims(), 1, "replays came from the cache");
}

#[tokio::test]
async fn a_record_pushed_out_of_the_recent_completions_is_learned_again_on_its_first_replay() {
    let inner = Inner::new(true);
    let weight = sample_record(fingerprint("a")).weight() as u64;
    // A quarter of the capacity holds recent completions: room for one here.
    let cached = CachedStore::new(inner.clone(), 4 * weight);
    let (older, newer) = (fresh_key(), fresh_key());
    complete_directly(&cached, &older, Duration::from_secs(60)).await;
    complete_directly(&cached, &newer, Duration::from_secs(60)).await;
    assert_eq!(cached.record_count(), 1);
    assert_eq!(
        cached.evictions(),
        1,
        "the newer completion took the older one's place"
    );
    assert_eq!(inner.claims(), 2);

    completed_record(
        cached
            .claim(&newer, &fingerprint("a"), LEASE)
            .await
            .unwrap(),
    );
    assert_eq!(inner.claims(), 2, "the newer record came from memory");
    completed_record(
        cached
            .claim(&older, &fingerprint("a"), LEASE)
            .await
            .unwrap(),
    );
    assert_eq!(
        inner.claims(),
        3,
        "the older record came from the inner store"
    );
    for key in [&older, &newer, &older, &newer] {
        let record = completed_record(cached.claim(key, &fingerprint("a"), LEASE).await.unwrap());
        assert_eq!(record, sample_record(fingerprint("a")));
    }
    assert_eq!(inner.claims(), 3, "both are kept once asked for");
    assert_eq!(cached.record_count(), 2);
}

#[tokio::test]
async fn a_record_too_large_for_the_recent_completions_is_learned_on_its_first_replay() {
    let inner = Inner::new(true);
    let weight = sample_record(fingerprint("a")).weight() as u64;
    // A quarter of this is less than the record weighs.
    let cached = CachedStore::new(inner.clone(), 2 * weight);
    let key = fresh_key();
    complete_directly(&cached, &key, Duration::from_secs(60)).await;
    assert_eq!(cached.record_count(), 0);
    for _ in 0..3 {
        completed_record(cached.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
    }
    assert_eq!(
        inner.claims(),
        2,
        "asked the inner store once, then kept it"
    );
    assert_eq!(cached.record_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_recent_completion_is_not_replayed_past_its_ttl() {
    let inner = Inner::new(true);
    let cached = CachedStore::new(inner.clone(), 1024 * 1024);
    let key = fresh_key();
    complete_directly(&cached, &key, Duration::from_secs(60)).await;
    tokio::time::advance(Duration::from_secs(61)).await;
    let claim = cached.claim(&key, &fingerprint("a"), LEASE).await.unwrap();
    assert!(matches!(claim, Claim::Acquired(_)), "{claim:?}");
    assert_eq!(inner.claims(), 2, "the inner store was asked");
}

#[tokio::test]
async fn a_record_learned_from_the_inner_store_is_cached_until_the_inner_store_drops_it() {
    let inner = Inner::new(true);
    let cached = CachedStore::new(inner.clone(), 1024 * 1024);
    let key = fresh_key();
    // Completed elsewhere (another instance), with a short life.
    complete_directly(&inner.inner, &key, Duration::from_millis(400)).await;
    completed_record(cached.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
    completed_record(cached.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
    assert_eq!(inner.claims(), 1, "the second replay came from the cache");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let claim = cached.claim(&key, &fingerprint("a"), LEASE).await.unwrap();
    assert!(
        matches!(claim, Claim::Acquired(_)),
        "the cache did not outlive the inner record: {claim:?}"
    );
    assert_eq!(inner.claims(), 2);
}

#[tokio::test]
async fn a_record_of_unknown_lifetime_is_not_cached() {
    let inner = Inner::new(false);
    let cached = CachedStore::new(inner.clone(), 1024 * 1024);
    let key = fresh_key();
    complete_directly(&inner.inner, &key, Duration::from_secs(60)).await;
    for _ in 0..3 {
        completed_record(cached.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
    }
    assert_eq!(inner.claims(), 3);
    assert_eq!(cached.record_count(), 0);
}

#[tokio::test]
async fn a_failed_completion_is_not_cached() {
    let inner = Inner::new(true);
    let cached = CachedStore::new(inner.clone(), 1024 * 1024);
    let key = fresh_key();
    let Claim::Acquired(token) = cached.claim(&key, &fingerprint("a"), LEASE).await.unwrap() else {
        panic!("a fresh key is free");
    };
    let stale = FenceToken::new(token.get() + 1000);
    assert!(
        cached
            .complete(&key, stale, sample_record(fingerprint("a")), LEASE)
            .await
            .is_err()
    );
    assert!(matches!(
        cached.claim(&key, &fingerprint("a"), LEASE).await.unwrap(),
        Claim::InFlight { .. }
    ));
    assert_eq!(cached.record_count(), 0);
}

/// As for `MemoryStore`: no execution while a record (cached or not) is live.
#[tokio::test(flavor = "multi_thread", worker_threads = 16)]
async fn no_claim_acquires_a_key_while_its_record_is_live_under_sixteen_racing_threads() {
    let store = CachedStore::new(MemoryStore::default(), 16 * 1024 * 1024);
    let seen = common::stress::no_claim_acquires_a_key_whose_record_is_live(
        store,
        16,
        (Duration::from_micros(500), Duration::ZERO),
        Duration::from_secs(2),
    )
    .await;
    println!("{seen:?}");
    assert!(
        seen.total > 50,
        "the key was executed again and again: {seen:?}"
    );
    assert_eq!(
        seen.while_live, 0,
        "executions while a record was live: {seen:?}"
    );
}
