//! `RedisStore` under the shapes of issue 15: many threads racing one key whose record keeps
//! expiring, and an endless stream whose client left, against a real `redis-server`.
#![cfg(feature = "redis")]

mod common;

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::StatusCode;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tower_idempotency::{IdempotencyLayer, ProblemKind, RedisStore, WaitMode};

use common::{
    redis_server::RedisServer,
    service::{BodyError, Handler, keyed_post, respond, send, send_raw, serve, within},
};

async fn connect(server: &RedisServer) -> RedisStore {
    RedisStore::connect(&server.url())
        .await
        .expect("connect to the test server")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 16)]
async fn no_claim_acquires_a_key_while_its_record_is_live_under_sixteen_racing_threads() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    // Redis keeps time to the millisecond.
    let ttl = (Duration::from_millis(2), Duration::from_millis(1));
    let seen = common::stress::no_claim_acquires_a_key_whose_record_is_live(
        store,
        16,
        ttl,
        Duration::from_secs(2),
    )
    .await;
    println!("{seen:?}");
    assert!(
        seen.total > 20,
        "the key was executed again and again: {seen:?}"
    );
    assert_eq!(
        seen.while_live, 0,
        "executions while a record was live: {seen:?}"
    );
}

/// A body that never ends: a frame every 20 ms.
struct Endless(tokio::time::Interval);

impl Body for Endless {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        std::task::ready!(self.0.poll_tick(cx));
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"data: tick\n\n")))))
    }
}

#[tokio::test]
async fn an_endless_stream_whose_client_left_is_cut_after_the_bound_and_its_key_spent() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let handler = Handler::new(|_request| async {
        let tick = tokio::time::interval(Duration::from_millis(20));
        respond(StatusCode::OK, Endless(tick).boxed_unsync())
    });
    let layer = IdempotencyLayer::new(store)
        .with_lease(Duration::from_millis(300))
        .with_wait_mode(WaitMode::Reject)
        .with_capture_after_disconnect(Duration::from_millis(800));
    let svc = serve(&layer, &handler);

    let response = send_raw(&svc, keyed_post("/events", "k", "{}")).await;
    let mut body = response.into_body();
    within(body.frame()).await.expect("a frame").expect("data");
    drop(body);

    // Within the bound, the capture goes on, its lease renewed past its 300 ms.
    tokio::time::sleep(Duration::from_millis(500)).await;
    send(&svc, keyed_post("/events", "k", "{}"))
        .await
        .assert_problem(ProblemKind::InFlight, StatusCode::CONFLICT);

    // Past it, the key is spent: never a second execution.
    let deadline = tokio::time::Instant::now() + common::service::PATIENCE;
    loop {
        let retry = send(&svc, keyed_post("/events", "k", "{}")).await;
        if retry.problem == Some(ProblemKind::NotReplayable) {
            retry.assert_problem(ProblemKind::NotReplayable, StatusCode::CONFLICT);
            break;
        }
        retry.assert_problem(ProblemKind::InFlight, StatusCode::CONFLICT);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the key is still in flight long after the bound"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(handler.calls(), 1);
}
