//! Failures: panicking handlers, broken response bodies, store outages (SPEC §8), abandoned
//! claims (SPEC §5), and the layer's own problem responses (SPEC §7).

mod common;

use std::{
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use tokio::time::Instant;

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::BodyExt;
use tower_idempotency::{
    FailMode, IdempotencyLayer, MemoryStore, MissingKey, Problem, ProblemKind, WaitMode,
};

use common::flaky_store::FlakyStore;
use common::service::{
    Gate, Handler, Reply, Step, created, data, eventually, keyed_post, post, respond, scripted,
    send, send_raw, serve, within,
};

#[tokio::test]
async fn a_store_outage_fails_closed_with_503_and_recovers_by_itself() {
    let handler = Handler::counting();
    let store = FlakyStore::default();
    let svc = serve(&IdempotencyLayer::new(store.clone()), &handler);

    store.hook.down.store(true, Ordering::SeqCst);
    for _ in 0..2 {
        let reply = send(&svc, keyed_post("/charges", "k", "{}")).await;
        reply.assert_problem(
            ProblemKind::StoreUnavailable,
            StatusCode::SERVICE_UNAVAILABLE,
        );
        reply.assert_retry_after();
    }
    assert_eq!(handler.calls(), 0, "nothing runs unprotected");

    store.hook.down.store(false, Ordering::SeqCst);
    let first = send(&svc, keyed_post("/charges", "k", "{}")).await;
    let retry = send(&svc, keyed_post("/charges", "k", "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(retry.replayed());
    assert_eq!(handler.calls(), 1);
}

#[tokio::test]
async fn a_store_outage_fails_open_by_executing_unprotected_and_recovers_by_itself() {
    let handler = Handler::counting();
    let store = FlakyStore::default();
    let layer = IdempotencyLayer::new(store.clone()).with_fail_mode(FailMode::Open);
    let svc = serve(&layer, &handler);

    store.hook.down.store(true, Ordering::SeqCst);
    for n in 1..=2 {
        let reply = send(&svc, keyed_post("/charges", "k", "{}")).await;
        assert_eq!(reply.status, StatusCode::CREATED);
        assert!(!reply.replayed());
        assert_eq!(reply.text(), format!("execution #{n}"));
    }
    assert_eq!(store.inner.record_count(), 0);

    store.hook.down.store(false, Ordering::SeqCst);
    let protected = send(&svc, keyed_post("/charges", "k", "{}")).await;
    let retry = send(&svc, keyed_post("/charges", "k", "{}")).await;
    assert!(!protected.replayed());
    assert!(retry.replayed());
    assert_eq!(retry.text(), "execution #3");
    assert_eq!(handler.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_completion_that_fails_while_the_store_is_unreachable_lands_once_it_is_back() {
    let handler = Handler::counting();
    let store = FlakyStore::default();
    let lease = Duration::from_secs(30);
    let layer = IdempotencyLayer::new(store.clone())
        .with_lease(lease)
        .with_wait_mode(WaitMode::Reject);
    let svc = serve(&layer, &handler);
    store.hook.completions_down.store(true, Ordering::SeqCst);
    let first = send(&svc, keyed_post("/charges", "k", "{}")).await;
    assert_eq!(
        first.status,
        StatusCode::CREATED,
        "the client still gets its response"
    );
    // The handler ran: the key stays claimed rather than letting a retry run it again.
    tokio::time::sleep(lease / 2).await;
    let meanwhile = send(&svc, keyed_post("/charges", "k", "{}")).await;
    meanwhile.assert_problem(ProblemKind::InFlight, StatusCode::CONFLICT);
    assert_eq!(store.inner.in_flight_count(), 1);

    store.hook.completions_down.store(false, Ordering::SeqCst);
    eventually("the record lands", || store.inner.record_count() == 1).await;
    let retry = send(&svc, keyed_post("/charges", "k", "{}")).await;
    assert!(retry.replayed());
    assert_eq!(retry.text(), "execution #1");
    assert_eq!(handler.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_completion_that_cannot_land_within_the_lease_frees_the_key_when_the_lease_ends() {
    let handler = Handler::counting();
    let store = FlakyStore::default();
    let lease = Duration::from_secs(30);
    let svc = serve(
        &IdempotencyLayer::new(store.clone()).with_lease(lease),
        &handler,
    );
    store.hook.completions_down.store(true, Ordering::SeqCst);
    let sent = tokio::time::Instant::now();
    let first = send(&svc, keyed_post("/charges", "k", "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    tokio::time::sleep(lease).await;
    assert_eq!(store.inner.in_flight_count(), 0, "the claim ran out");
    assert_eq!(store.inner.record_count(), 0);

    let retry = send(&svc, keyed_post("/charges", "k", "{}")).await;
    assert!(!retry.replayed());
    assert_eq!(retry.text(), "execution #2");
    assert!(sent.elapsed() >= lease, "never before the lease ran out");
    assert_eq!(handler.calls(), 2);
}

#[tokio::test]
async fn a_completion_refused_for_another_reason_releases_the_key_at_once() {
    let handler = Handler::counting();
    let store = FlakyStore::default();
    let svc = serve(&IdempotencyLayer::new(store.clone()), &handler);
    store.hook.completions_refused.store(true, Ordering::SeqCst);
    let first = send(&svc, keyed_post("/charges", "k", "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    eventually("the key is released", || store.inner.in_flight_count() == 0).await;
    store
        .hook
        .completions_refused
        .store(false, Ordering::SeqCst);
    let retry = send(&svc, keyed_post("/charges", "k", "{}")).await;
    assert!(!retry.replayed());
    assert_eq!(retry.text(), "execution #2");
    assert_eq!(handler.calls(), 2);
}

#[tokio::test]
async fn duplicates_of_a_key_in_flight_fail_closed_when_the_store_goes_down() {
    let gate = Gate::new();
    let handler = Handler::gated(&gate);
    let store = FlakyStore::default();
    let svc = serve(&IdempotencyLayer::new(store.clone()), &handler);
    let first = tokio::spawn(send(&svc, keyed_post("/charges", "k", "{}")));
    eventually("the first request runs", || handler.calls() == 1).await;
    store.hook.down.store(true, Ordering::SeqCst);
    let duplicate = send(&svc, keyed_post("/charges", "k", "{}")).await;
    duplicate.assert_problem(
        ProblemKind::StoreUnavailable,
        StatusCode::SERVICE_UNAVAILABLE,
    );
    store.hook.down.store(false, Ordering::SeqCst);
    gate.open();
    within(first).await.unwrap();
    assert_eq!(handler.calls(), 1);
}

// An abandoned claim is one whose owner stopped renewing it without completing or releasing
// it: a crashed instance, or one cut off from the store. Neither can be had by holding a
// handler forever: the owner's task is alive and renews the lease, which is the point of
// renewal (and `tokio::time::pause` would not make a renewing lease expire either). Nor can a
// test claim the key on the store directly, as the storage key is a digest computed inside
// the layer. So instance A claims through a store handle that then loses the store (its
// completion, release and renewals fail), while instance B shares the same `MemoryStore`.
#[tokio::test(start_paused = true)]
async fn an_abandoned_claim_expires_after_its_lease_and_the_key_executes_again() {
    let shared = MemoryStore::default();
    let lease = Duration::from_secs(5);
    let started = Arc::new(Mutex::new(Vec::new()));
    let handler = Handler::with_counter({
        let started = Arc::clone(&started);
        move |n, _request| {
            started.lock().unwrap().push(Instant::now());
            async move { created(format!("execution #{n}")) }
        }
    });
    let cut_off = FlakyStore::over(shared.clone());
    cut_off.hook.writes_down.store(true, Ordering::SeqCst);
    let instance_a = serve(
        &IdempotencyLayer::new(cut_off.clone()).with_lease(lease),
        &handler,
    );
    let instance_b = serve(
        &IdempotencyLayer::new(shared.clone())
            .with_lease(lease)
            .with_wait_mode(WaitMode::Wait(Duration::from_secs(10))),
        &handler,
    );

    let sent = Instant::now();
    let a = send(&instance_a, keyed_post("/charges", "k", "{}")).await;
    assert_eq!(a.status, StatusCode::CREATED);
    assert_eq!(shared.record_count(), 0, "A could not store its response");

    let b = send(&instance_b, keyed_post("/charges", "k", "{}")).await;
    assert_eq!(b.status, StatusCode::CREATED);
    assert!(!b.replayed());
    assert_eq!(b.text(), "execution #2");
    assert_eq!(handler.calls(), 2);
    let started = started.lock().unwrap().clone();
    assert!(
        started[1] >= sent + lease,
        "B executed only once A's lease had run out ({:?} after A was sent)",
        started[1] - sent
    );

    let c = send(&instance_b, keyed_post("/charges", "k", "{}")).await;
    assert!(c.replayed());
    assert_eq!(c.text(), "execution #2");
    assert_eq!(handler.calls(), 2);
}

fn panicking_once() -> Handler {
    Handler::with_counter(|n, _request| async move {
        assert!(
            n != 1,
            "the first execution panics (this panic is expected)"
        );
        created(format!("execution #{n}"))
    })
}

#[tokio::test]
async fn a_panicking_handler_gives_a_500_problem_and_releases_the_key() {
    let handler = panicking_once();
    let store = MemoryStore::default();
    let svc = serve(&IdempotencyLayer::new(store.clone()), &handler);
    let failed = send(&svc, keyed_post("/charges", "k", "{}")).await;
    failed.assert_problem(
        ProblemKind::HandlerFailed,
        StatusCode::INTERNAL_SERVER_ERROR,
    );

    let retry = send(&svc, keyed_post("/charges", "k", "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(!retry.replayed());
    assert_eq!(retry.text(), "execution #2");
    assert_eq!(handler.calls(), 2);
    assert!(
        send(&svc, keyed_post("/charges", "k", "{}"))
            .await
            .replayed()
    );
}

#[tokio::test]
async fn a_panicking_handler_releases_the_key_in_reject_mode_too() {
    let handler = panicking_once();
    let store = MemoryStore::default();
    let layer = IdempotencyLayer::new(store.clone()).with_wait_mode(WaitMode::Reject);
    let svc = serve(&layer, &handler);
    let failed = send(&svc, keyed_post("/charges", "k", "{}")).await;
    assert_eq!(failed.problem, Some(ProblemKind::HandlerFailed));
    // The release runs in the background: give it a moment, but never a whole lease.
    eventually("the key is released", || store.in_flight_count() == 0).await;
    let retry = send(&svc, keyed_post("/charges", "k", "{}")).await;
    assert_eq!(retry.text(), "execution #2");
}

/// First execution: a head, a chunk, then `failure` once the head is on its way; later
/// executions answer normally.
fn breaking_mid_body(failure: Step) -> Handler {
    Handler::with_counter(move |n, _request| {
        let failure = failure.clone();
        async move {
            if n == 1 {
                let steps = [
                    data("partial "),
                    Step::Sleep(Duration::from_millis(30)),
                    failure,
                ];
                respond(StatusCode::OK, scripted(steps))
            } else {
                respond(StatusCode::OK, scripted([data("complete body")]))
            }
        }
    })
}

async fn a_broken_body_reaches_the_client_as_an_error_and_the_key_is_released(failure: Step) {
    let handler = breaking_mid_body(failure);
    let svc = serve(&IdempotencyLayer::new(MemoryStore::default()), &handler);
    let response = send_raw(&svc, keyed_post("/export", "k", "{}")).await;
    assert_eq!(response.status(), StatusCode::OK, "the head was sent");
    let mut body = response.into_body();
    let first = within(body.frame()).await.expect("a frame").expect("data");
    assert_eq!(first.into_data().unwrap(), "partial ");
    let broken = within(body.frame())
        .await
        .expect("the body does not just end");
    assert!(broken.is_err(), "the client's body fails");

    let retry = send(&svc, keyed_post("/export", "k", "{}")).await;
    assert!(!retry.replayed(), "a broken response is never replayed");
    assert_eq!(retry.text(), "complete body");
    assert_eq!(handler.calls(), 2);
}

#[tokio::test]
async fn a_response_body_that_errors_mid_stream_fails_the_client_body_and_releases_the_key() {
    a_broken_body_reaches_the_client_as_an_error_and_the_key_is_released(Step::Error(
        "disk on fire",
    ))
    .await;
}

#[tokio::test]
async fn a_response_body_that_panics_mid_stream_fails_the_client_body_and_releases_the_key() {
    a_broken_body_reaches_the_client_as_an_error_and_the_key_is_released(Step::Panic(
        "the body panics (this panic is expected)",
    ))
    .await;
}

#[tokio::test]
async fn a_response_body_that_fails_at_once_is_an_error_and_releases_the_key() {
    let handler = Handler::with_counter(|n, _request| async move {
        let steps = if n == 1 {
            vec![data("partial "), Step::Error("broken at once")]
        } else {
            vec![data("complete body")]
        };
        respond(StatusCode::OK, scripted(steps))
    });
    let svc = serve(&IdempotencyLayer::new(MemoryStore::default()), &handler);
    let response = send_raw(&svc, keyed_post("/export", "k", "{}")).await;
    let mut body = response.into_body();
    let first = within(body.frame()).await.expect("a frame").expect("data");
    assert_eq!(
        first.into_data().unwrap(),
        "partial ",
        "what was produced reaches the client"
    );
    let broken = within(body.frame())
        .await
        .expect("the body does not just end");
    assert!(broken.is_err(), "the client's body fails");
    let retry = send(&svc, keyed_post("/export", "k", "{}")).await;
    assert_eq!(retry.text(), "complete body");
    assert_eq!(handler.calls(), 2);
}

#[tokio::test]
async fn with_problem_response_replaces_problem_bodies_and_keeps_the_kind() {
    let handler = Handler::counting();
    let layer = IdempotencyLayer::new(MemoryStore::default())
        .with_missing_key(MissingKey::Required)
        .with_problem_response(|problem: &Problem| {
            let mut response = Response::new(Bytes::from(format!(
                "custom: {} / {}",
                problem.title(),
                problem.status().as_u16()
            )));
            *response.status_mut() = problem.status();
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
            response
        });
    let svc = serve(&layer, &handler);

    let missing = send(&svc, post("/charges", "{}")).await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert_eq!(missing.headers[header::CONTENT_TYPE], "text/plain");
    assert_eq!(
        missing.text(),
        format!("custom: {} / 400", ProblemKind::MissingKey.title())
    );
    assert_eq!(missing.problem, Some(ProblemKind::MissingKey));

    send(&svc, keyed_post("/charges", "k", "{\"a\":1}")).await;
    let reused = send(&svc, keyed_post("/charges", "k", "{\"a\":2}")).await;
    assert_eq!(reused.status, StatusCode::CONFLICT);
    assert!(reused.text().starts_with("custom: "));
    assert_eq!(reused.problem, Some(ProblemKind::KeyReused));

    let invalid = send(&svc, keyed_post("/charges", "bad key", "{}")).await;
    assert_eq!(invalid.problem, Some(ProblemKind::InvalidKey));
    assert!(invalid.text().starts_with("custom: "));
    assert_eq!(handler.calls(), 1);
}

#[tokio::test]
async fn problem_kinds_are_in_the_extensions_of_default_problems() {
    let handler = Handler::counting();
    let svc = serve(&IdempotencyLayer::new(MemoryStore::default()), &handler);
    let invalid: Reply = send(&svc, keyed_post("/charges", "", "{}")).await;
    assert_eq!(invalid.problem, Some(ProblemKind::InvalidKey));
    let ok = send(&svc, keyed_post("/charges", "k", "{}")).await;
    assert_eq!(
        ok.problem, None,
        "a handler's response carries no problem kind"
    );
    let replay = send(&svc, keyed_post("/charges", "k", "{}")).await;
    assert_eq!(replay.problem, None, "nor does its replay");
}
