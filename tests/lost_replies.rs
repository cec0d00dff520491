//! A claim whose reply is lost, on `MemoryStore` behind a store that loses replies
//! (`FlakyStore`): the claim landed, the request is refused (or, failing open, runs
//! unprotected), and the claim is released by its token in the background, retried while the
//! store stays unreachable, so the key is free again once the store is back, long before the
//! lease ends. (The same against a real `redis-server`: `tests/redis_lost_replies.rs`.)

mod common;

use std::{sync::atomic::Ordering, time::Duration};

use http::StatusCode;
use tower_idempotency::{AdminStore, FailMode, IdempotencyLayer, ProblemKind};

use common::{
    flaky_store::FlakyStore,
    service::{Handler, keyed_post, send, serve},
};

const LEASE: Duration = Duration::from_secs(30);

/// How many claims the store holds.
async fn claims(store: &FlakyStore) -> usize {
    let mut count = 0;
    let mut cursor = None;
    loop {
        let page = store
            .inner
            .list_claims(Duration::ZERO, cursor, 100)
            .await
            .expect("a page");
        count += page.claims.len();
        match page.next {
            Some(next) => cursor = Some(next),
            None => return count,
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_claim_whose_reply_is_lost_is_released_once_the_store_is_back() {
    for fail_mode in [FailMode::Closed, FailMode::Open] {
        let store = FlakyStore::default();
        let handler = Handler::counting();
        let layer = IdempotencyLayer::new(store.clone())
            .with_lease(LEASE)
            .with_fail_mode(fail_mode);
        let svc = serve(&layer, &handler);

        // The claim lands, its reply is lost, and the store is unreachable for 2 s after.
        store.hook.claim_replies_lost.store(true, Ordering::SeqCst);
        store.hook.writes_down.store(true, Ordering::SeqCst);
        let lost = send(&svc, keyed_post("/charges", "k", "{}")).await;
        store.hook.claim_replies_lost.store(false, Ordering::SeqCst);
        let unprotected = match fail_mode {
            FailMode::Closed => {
                lost.assert_problem(
                    ProblemKind::StoreUnavailable,
                    StatusCode::SERVICE_UNAVAILABLE,
                );
                0
            }
            FailMode::Open => {
                assert_eq!(lost.status, StatusCode::CREATED);
                1
            }
        };
        assert_eq!(handler.calls(), unprotected);
        assert_eq!(claims(&store).await, 1, "the claim landed ({fail_mode:?})");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(claims(&store).await, 1, "releasing needs the store");

        store.hook.writes_down.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        assert_eq!(
            claims(&store).await,
            0,
            "released within the retries' longest pause ({fail_mode:?})"
        );

        // Retries, many at once: the handler runs once more, the rest are replayed.
        let retries: Vec<_> = (0..16)
            .map(|_| tokio::spawn(send(&svc, keyed_post("/charges", "k", "{}"))))
            .collect();
        let mut executed = 0;
        for retry in retries {
            let reply = retry.await.expect("a retry");
            assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.problem);
            executed += usize::from(!reply.replayed());
        }
        assert_eq!(executed, 1);
        assert_eq!(handler.calls(), unprotected + 1, "{fail_mode:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_lost_claim_left_unreleased_frees_its_key_no_later_than_its_lease() {
    // The store stays unreachable past the lease: the retries stop, and the claim expires.
    let store = FlakyStore::default();
    let lease = Duration::from_secs(3);
    let svc = serve(
        &IdempotencyLayer::new(store.clone()).with_lease(lease),
        &Handler::counting(),
    );
    store.hook.claim_replies_lost.store(true, Ordering::SeqCst);
    store.hook.writes_down.store(true, Ordering::SeqCst);
    let lost = send(&svc, keyed_post("/charges", "k", "{}")).await;
    lost.assert_problem(
        ProblemKind::StoreUnavailable,
        StatusCode::SERVICE_UNAVAILABLE,
    );
    tokio::time::sleep(lease * 3).await;
    store.hook.claim_replies_lost.store(false, Ordering::SeqCst);
    store.hook.writes_down.store(false, Ordering::SeqCst);
    // Abandoned now (its owner never completed it): the default recovery runs it again.
    let retry = send(&svc, keyed_post("/charges", "k", "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{:?}", retry.problem);
}
