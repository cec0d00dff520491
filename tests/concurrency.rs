//! Exactly one execution per key under concurrency, waiting, rejecting, leases (SPEC §5), and
//! disconnect safety (SPEC §6).

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use http::StatusCode;
use tokio::sync::mpsc;
use tower_idempotency::{IdempotencyLayer, MemoryStore, ProblemKind, WaitMode};

use common::flaky_store::FlakyStore;
use common::service::{Gate, Handler, Reply, created, eventually, keyed_post, send, serve, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_run_the_handler_once_and_all_get_the_same_body() {
    let handler = Handler::sleeping(Duration::from_millis(50));
    let svc = serve(&IdempotencyLayer::new(MemoryStore::default()), &handler);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let svc = svc.clone();
        tasks.spawn(async move { send(&svc, keyed_post("/charges", "same-key", "{}")).await });
    }
    let replies = within(tasks.join_all()).await;

    assert_eq!(handler.calls(), 1);
    assert_eq!(replies.len(), 100);
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::CREATED);
        assert_eq!(reply.text(), "execution #1");
    }
    let originals = replies.iter().filter(|reply| !reply.replayed()).count();
    assert_eq!(originals, 1, "one execution, 99 replays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_mode_answers_concurrent_duplicates_409_with_retry_after() {
    let gate = Gate::new();
    let handler = Handler::gated(&gate);
    let layer = IdempotencyLayer::new(MemoryStore::default()).with_wait_mode(WaitMode::Reject);
    let svc = serve(&layer, &handler);
    let (tx, mut rx) = mpsc::unbounded_channel();
    for _ in 0..100 {
        let (svc, tx) = (svc.clone(), tx.clone());
        tokio::spawn(async move {
            let reply = send(&svc, keyed_post("/charges", "same-key", "{}")).await;
            let _ = tx.send(reply);
        });
    }
    // While the first request is held at the gate, every other one is refused at once: well
    // before a wait (10 s by default) could have ended.
    let mut rejected = Vec::new();
    let all_rejected = async {
        for _ in 0..99 {
            rejected.push(rx.recv().await.expect("a reply"));
        }
    };
    tokio::time::timeout(Duration::from_secs(5), all_rejected)
        .await
        .expect("duplicates are refused without waiting");
    assert_eq!(handler.calls(), 1);
    for reply in &rejected {
        reply.assert_problem(ProblemKind::InFlight, StatusCode::CONFLICT);
        reply.assert_retry_after();
    }
    gate.open();
    let success = within(rx.recv()).await.expect("the first reply");
    assert_eq!(success.status, StatusCode::CREATED);
    assert!(!success.replayed());
    assert_eq!(handler.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_that_waits_too_long_gets_409_in_flight_with_retry_after() {
    let gate = Gate::new();
    let handler = Handler::gated(&gate);
    // The default wait: 10 s.
    let svc = serve(&IdempotencyLayer::new(MemoryStore::default()), &handler);
    let first = tokio::spawn({
        let svc = svc.clone();
        async move { send(&svc, keyed_post("/charges", "k", "{}")).await }
    });
    eventually("the first request runs", || handler.calls() == 1).await;

    let sent = tokio::time::Instant::now();
    let duplicate = send(&svc, keyed_post("/charges", "k", "{}")).await;
    duplicate.assert_problem(ProblemKind::InFlight, StatusCode::CONFLICT);
    duplicate.assert_retry_after();
    let waited = sent.elapsed();
    assert!(
        waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
        "waited {waited:?}"
    );

    gate.open();
    let first = within(first).await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    let retry = send(&svc, keyed_post("/charges", "k", "{}")).await;
    assert!(
        retry.replayed(),
        "once the first is done, the retry is a replay"
    );
    assert_eq!(handler.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_waiting_duplicate_gets_the_replay_as_soon_as_the_first_finishes() {
    let gate = Gate::new();
    let handler = Handler::gated(&gate);
    let svc = serve(&IdempotencyLayer::new(MemoryStore::default()), &handler);
    let first = tokio::spawn({
        let svc = svc.clone();
        async move { send(&svc, keyed_post("/charges", "k", "{}")).await }
    });
    eventually("the first request runs", || handler.calls() == 1).await;
    let duplicate = tokio::spawn({
        let svc = svc.clone();
        async move { send(&svc, keyed_post("/charges", "k", "{}")).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!duplicate.is_finished(), "the duplicate waits");
    gate.open();
    let (first, duplicate) = (
        within(first).await.unwrap(),
        within(duplicate).await.unwrap(),
    );
    assert!(!first.replayed());
    assert!(duplicate.replayed());
    assert_eq!(duplicate.body, first.body);
    assert_eq!(handler.calls(), 1);
}

#[tokio::test]
async fn a_key_reused_with_another_body_while_in_flight_is_refused_at_once() {
    let gate = Gate::new();
    let handler = Handler::gated(&gate);
    // Waiting is the default: a mismatch must not wait for the first request.
    let svc = serve(&IdempotencyLayer::new(MemoryStore::default()), &handler);
    let first = tokio::spawn({
        let svc = svc.clone();
        async move { send(&svc, keyed_post("/charges", "k", "{\"amount\":1}")).await }
    });
    eventually("the first request runs", || handler.calls() == 1).await;

    let other = tokio::time::timeout(
        Duration::from_secs(5),
        send(&svc, keyed_post("/charges", "k", "{\"amount\":2}")),
    )
    .await
    .expect("a mismatch is answered without waiting for the key");
    other.assert_problem(ProblemKind::KeyReused, StatusCode::CONFLICT);

    gate.open();
    assert_eq!(within(first).await.unwrap().status, StatusCode::CREATED);
    assert_eq!(handler.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_long_handler_keeps_its_claim_by_renewing_its_lease() {
    // Twelve leases long (a paused clock: no real time passes).
    let handler = Handler::sleeping(Duration::from_secs(12));
    let layer = IdempotencyLayer::new(MemoryStore::default())
        .with_lease(Duration::from_secs(1))
        .with_wait_mode(WaitMode::Wait(Duration::from_secs(15)));
    let svc = serve(&layer, &handler);
    let first = tokio::spawn({
        let svc = svc.clone();
        async move { send(&svc, keyed_post("/charges", "k", "{}")).await }
    });
    eventually("the first request runs", || handler.calls() == 1).await;
    // Without renewal the claim would expire after 1 s and this duplicate would execute.
    let duplicate = send(&svc, keyed_post("/charges", "k", "{}")).await;
    let first = within(first).await.unwrap();
    assert_eq!(handler.calls(), 1);
    assert!(!first.replayed());
    assert!(duplicate.replayed());
    assert_eq!(duplicate.text(), "execution #1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_does_not_cancel_the_handler_and_its_retry_is_replayed() {
    let gate = Gate::new();
    let finished = Arc::new(AtomicUsize::new(0));
    let handler = Handler::with_counter({
        let (gate, finished) = (gate.clone(), Arc::clone(&finished));
        move |n, _request| {
            let (gate, finished) = (gate.clone(), Arc::clone(&finished));
            async move {
                gate.pass().await;
                finished.fetch_add(1, Ordering::SeqCst);
                created(format!("execution #{n}"))
            }
        }
    });
    let svc = serve(&IdempotencyLayer::new(MemoryStore::default()), &handler);

    // The client goes away while its handler runs: its response future is dropped.
    let abandoned = send(&svc, keyed_post("/charges", "k", "{}"));
    let started = eventually("the handler runs", || handler.calls() == 1);
    tokio::select! {
        _ = abandoned => panic!("the handler is held at the gate; no response yet"),
        () = started => {}
    }
    gate.open();
    eventually("the handler completes", || {
        finished.load(Ordering::SeqCst) == 1
    })
    .await;

    let retry = send(&svc, keyed_post("/charges", "k", "{}")).await;
    assert!(retry.replayed(), "the abandoned execution was stored");
    assert_eq!(retry.text(), "execution #1");
    assert_eq!(handler.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_client_dropped_by_a_timeout_mid_request_still_gets_a_replay_on_retry() {
    let handler = Handler::sleeping(Duration::from_millis(1_000));
    let svc = serve(&IdempotencyLayer::new(MemoryStore::default()), &handler);
    // The client's own timeout, shorter than the handler: the response future is dropped.
    let attempt = tokio::time::timeout(
        Duration::from_millis(250),
        send(&svc, keyed_post("/charges", "k", "{}")),
    )
    .await;
    assert!(attempt.is_err(), "the client gave up first");
    eventually("the handler was called", || handler.calls() == 1).await;
    let retry = send(&svc, keyed_post("/charges", "k", "{}")).await;
    assert!(retry.replayed());
    assert_eq!(retry.text(), "execution #1");
    assert_eq!(handler.calls(), 1);
}

#[tokio::test]
async fn concurrent_requests_with_different_keys_all_execute() {
    let handler = Handler::sleeping(Duration::from_millis(20));
    let svc = serve(&IdempotencyLayer::new(MemoryStore::default()), &handler);
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..20 {
        let svc = svc.clone();
        tasks
            .spawn(async move { send(&svc, keyed_post("/charges", &format!("k{n}"), "{}")).await });
    }
    let replies: Vec<Reply> = within(tasks.join_all()).await;
    assert!(replies.iter().all(|reply| !reply.replayed()));
    assert_eq!(handler.calls(), 20);
}

#[tokio::test]
async fn a_client_that_has_the_whole_response_and_retries_at_once_is_replayed_even_in_reject_mode()
{
    let whole = Handler::counting();
    let streamed = Handler::with_counter(|n, _request| async move {
        let steps = [
            common::service::data(format!("part one of #{n}, ")),
            common::service::Step::Sleep(Duration::from_millis(20)),
            common::service::data("part two"),
        ];
        common::service::respond(StatusCode::CREATED, common::service::scripted(steps))
    });
    for handler in [whole, streamed] {
        let store = FlakyStore::default();
        store.hook.slow_completions.store(true, Ordering::SeqCst);
        let layer = IdempotencyLayer::new(store).with_wait_mode(WaitMode::Reject);
        let svc = serve(&layer, &handler);
        let first = send(&svc, keyed_post("/charges", "k", "{}")).await;
        assert!(!first.replayed());
        // The whole response has arrived, so its record is stored: no 409 in flight.
        let retry = send(&svc, keyed_post("/charges", "k", "{}")).await;
        assert!(retry.replayed(), "got {} {:?}", retry.status, retry.problem);
        assert_eq!(retry.body, first.body);
        assert_eq!(handler.calls(), 1);
    }
}

#[tokio::test(start_paused = true)]
async fn a_waiting_duplicate_whose_client_leaves_stops_waiting_and_never_runs_the_handler() {
    // The first execution fails transiently (503: not stored, key released); any later one
    // would succeed.
    let gate = Gate::new();
    let handler = Handler::with_counter({
        let gate = gate.clone();
        move |n, _request| {
            let gate = gate.clone();
            async move {
                gate.pass().await;
                if n == 1 {
                    common::service::respond(
                        StatusCode::SERVICE_UNAVAILABLE,
                        common::service::full("try again"),
                    )
                } else {
                    created(format!("execution #{n}"))
                }
            }
        }
    });
    let store = MemoryStore::default();
    let svc = serve(&IdempotencyLayer::new(store.clone()), &handler);
    let first = tokio::spawn(send(&svc, keyed_post("/charges", "k", "{}")));
    eventually("the first request runs", || handler.calls() == 1).await;

    // The duplicate waits for the first, and its client gives up while it waits.
    let gave_up = tokio::time::timeout(
        Duration::from_secs(1),
        send(&svc, keyed_post("/charges", "k", "{}")),
    )
    .await;
    assert!(gave_up.is_err(), "the duplicate was still waiting");

    // The first request releases the key: nobody is left to run the handler for.
    gate.open();
    let first = within(first).await.unwrap();
    assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(handler.calls(), 1, "the handler ran for nobody");
    assert_eq!(store.in_flight_count(), 0);
    assert_eq!(store.record_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_request_whose_client_leaves_while_its_claim_is_on_its_way_runs_nothing_and_frees_the_key()
 {
    let handler = Handler::counting();
    let store = FlakyStore::default();
    store.hook.slow_claims.store(true, Ordering::SeqCst);
    let svc = serve(&IdempotencyLayer::new(store.clone()), &handler);
    let gave_up = tokio::time::timeout(
        common::flaky_store::SLOW / 2,
        send(&svc, keyed_post("/charges", "k", "{}")),
    )
    .await;
    assert!(
        gave_up.is_err(),
        "the client left before its claim came back"
    );
    // The claim lands after the client left: it is given back, not used and not left held.
    tokio::time::sleep(common::flaky_store::SLOW * 2).await;
    assert_eq!(handler.calls(), 0);
    assert_eq!(store.inner.in_flight_count(), 0);

    store.hook.slow_claims.store(false, Ordering::SeqCst);
    let retry = send(&svc, keyed_post("/charges", "k", "{}")).await;
    assert_eq!(retry.text(), "execution #1");
    assert_eq!(handler.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_waiting_duplicate_does_not_hold_the_inner_services_concurrency_permit() {
    let gate = Gate::new();
    let handler = Handler::with_counter({
        let gate = gate.clone();
        move |_n, request: http::Request<bytes::Bytes>| {
            let gate = gate.clone();
            async move {
                if request.uri().path() == "/slow" {
                    gate.pass().await;
                }
                created(request.uri().path().to_owned())
            }
        }
    });
    // Two permits: one for the slow request, one for anybody else.
    let svc = tower::ServiceBuilder::new()
        .layer(IdempotencyLayer::new(MemoryStore::default()))
        .concurrency_limit(2)
        .service(handler.clone());
    let send = |request| {
        let svc = svc.clone();
        async move {
            let response = tower::ServiceExt::oneshot(svc, request).await.unwrap();
            Reply::read(response).await
        }
    };
    let slow = tokio::spawn(send(keyed_post("/slow", "k", "{}")));
    eventually("the slow request runs", || handler.calls() == 1).await;
    let duplicate = tokio::spawn(send(keyed_post("/slow", "k", "{}")));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!duplicate.is_finished(), "the duplicate waits");

    // With the duplicate holding the second permit, this would wait for the gate.
    let other = tokio::time::timeout(
        Duration::from_secs(5),
        send(keyed_post("/fast", "other", "{}")),
    )
    .await
    .expect("another request runs while the duplicate waits");
    assert_eq!(other.text(), "/fast");

    gate.open();
    let slow = within(slow).await.unwrap();
    let duplicate = within(duplicate).await.unwrap();
    assert!(!slow.replayed());
    assert!(duplicate.replayed());
    assert_eq!(handler.calls(), 2);
}
