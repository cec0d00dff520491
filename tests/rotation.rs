//! Secret rotation when the store fails while a request looks at its key's earlier address:
//! the request is refused (fail-closed) or runs unprotected (fail-open), never run as if the
//! earlier address were free. The scenarios on every store are in `common/rotation.rs`.

mod common;

use std::sync::atomic::Ordering;

use http::StatusCode;
use tower_idempotency::{FailMode, IdempotencyLayer, MemoryStore, ProblemKind};

use common::{
    flaky_store::{FlakyStore, SLOW},
    service::{Handler, keyed_post, send, serve},
};

/// A rotated layer over a store whose claims are slow; the store goes down while the claim
/// under the current secret is on its way, so that claim lands and the look at the earlier
/// address fails.
async fn probe_fails(mode: FailMode) -> (common::service::Reply, Handler) {
    let store = FlakyStore::over(MemoryStore::default());
    store.hook.slow_claims.store(true, Ordering::SeqCst);
    let layer = IdempotencyLayer::new(store.clone())
        .with_secret(b"new secret, 32 bytes or more....")
        .add_previous_secret(b"old secret, 32 bytes or more....")
        .with_fail_mode(mode);
    let handler = Handler::counting();
    let svc = serve(&layer, &handler);
    let request = tokio::spawn(send(&svc, keyed_post("/charges", "k-1", "{}")));
    // Time is paused: the claim (sent at once) sleeps SLOW; the store goes down half way.
    tokio::time::sleep(SLOW / 2).await;
    store.hook.down.store(true, Ordering::SeqCst);
    let reply = request.await.expect("the request");
    (reply, handler)
}

#[tokio::test(start_paused = true)]
async fn a_store_failing_while_the_earlier_address_is_looked_at_refuses_the_request() {
    let (reply, handler) = probe_fails(FailMode::Closed).await;
    reply.assert_problem(
        ProblemKind::StoreUnavailable,
        StatusCode::SERVICE_UNAVAILABLE,
    );
    assert_eq!(
        handler.calls(),
        0,
        "nothing ran without knowing the earlier address"
    );
}

#[tokio::test(start_paused = true)]
async fn a_store_failing_while_the_earlier_address_is_looked_at_runs_unprotected_when_failing_open()
{
    let (reply, handler) = probe_fails(FailMode::Open).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(handler.calls(), 1);
}
