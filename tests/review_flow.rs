//! Review of the state-machine flow against the old async flow (91b2c71): behaviours the old
//! flow had that the rewrite must keep.

mod common;

use std::{
    convert::Infallible,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response, StatusCode};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::{IDEMPOTENCY_KEY, IdempotencyLayer, MemoryStore, ProblemKind, WaitMode};

use common::flaky_store::FlakyStore;
use common::service::{
    BoxFuture, Gate, Handler, Reply, ResBody, Scripted, Step, created, data, eventually, full,
    keyed_post, respond, send, serve, within,
};

/// A service whose first `call` panics before it returns a future (a synchronous panic, as
/// a router or a `service_fn` closure can raise); later calls answer `execution #N`.
#[derive(Clone, Default)]
struct PanicsInCall {
    calls: Arc<AtomicUsize>,
}

impl<B: Send + 'static> Service<Request<B>> for PanicsInCall {
    type Response = Response<ResBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<ResBody>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: Request<B>) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        assert!(
            n != 1,
            "the first call panics before returning its future (this panic is expected)"
        );
        Box::pin(async move { Ok(created(format!("execution #{n}"))) })
    }
}

/// Old flow: `inner.call` ran inside `CatchUnwind` (the `run` async fn), so a synchronous panic
/// in `call` cost a 500 problem and released the key with `RecordResult::Panic`.
#[tokio::test]
async fn a_panic_in_the_inner_services_call_is_a_500_problem_and_releases_the_key() {
    let store = MemoryStore::default();
    let svc = IdempotencyLayer::new(store.clone()).layer(PanicsInCall::default());
    let first = tokio::spawn(svc.clone().oneshot(keyed_post("/charges", "k", "{}"))).await;
    let Ok(Ok(first)) = first else {
        panic!("the request's future panicked instead of answering a 500 problem");
    };
    let first = Reply::read(first).await;
    first.assert_problem(
        ProblemKind::HandlerFailed,
        StatusCode::INTERNAL_SERVER_ERROR,
    );
    eventually("the key is released", || store.in_flight_count() == 0).await;
    let retry = Reply::read(
        svc.oneshot(keyed_post("/charges", "k", "{}"))
            .await
            .unwrap_or_else(|never| match never {}),
    )
    .await;
    assert_eq!(retry.text(), "execution #2");
}

/// Old flow: the wait bound started once the body was read and the key known (`wait_until`
/// computed in `protect` after `read_body`). SPEC §5: a duplicate is held until the first
/// finishes "if the wait exceeds a bound". A slow upload must not eat the wait.
#[tokio::test(start_paused = true)]
async fn the_wait_bound_counts_from_the_claim_not_from_the_start_of_the_upload() {
    let gate = Gate::new();
    let handler = Handler::gated(&gate);
    let layer = IdempotencyLayer::new(MemoryStore::default())
        .with_wait_mode(WaitMode::Wait(Duration::from_secs(5)));
    let svc = serve(&layer, &handler);
    let first = tokio::spawn(send(&svc, keyed_post("/charges", "k", "{}")));
    eventually("the first request runs", || handler.calls() == 1).await;

    // The duplicate's body takes 6 s to arrive; then the first is still in flight.
    let slow = Request::post("/charges")
        .header(IDEMPOTENCY_KEY, "k")
        .body(Scripted::new([
            Step::Sleep(Duration::from_secs(6)),
            data("{}"),
        ]))
        .expect("a valid request");
    let duplicate = tokio::spawn(send(&svc, slow));
    tokio::time::sleep(Duration::from_secs(7)).await;
    gate.open();
    let first = within(first).await.unwrap();
    let duplicate = within(duplicate).await.unwrap();
    assert_eq!(first.text(), "execution #1");
    assert_eq!(
        duplicate.problem, None,
        "the duplicate waited 1 s of its 5 s bound; it must be replayed, not refused"
    );
    assert!(duplicate.replayed());
    assert_eq!(handler.calls(), 1);
}

/// Old `keep_alive`: the first renewal a third of the lease after the handler's first pending
/// poll, then a third after each renewal's answer.
#[tokio::test(start_paused = true)]
async fn renewals_go_out_a_third_of_the_lease_after_the_start_and_after_each_answer() {
    let store = FlakyStore::default();
    *store.hook.renewal_latency.lock().unwrap() = Some(Duration::from_millis(500));
    let handler = Handler::sleeping(Duration::from_millis(5_200));
    let layer = IdempotencyLayer::new(store.clone()).with_lease(Duration::from_secs(3));
    let svc = serve(&layer, &handler);
    let start = Instant::now();
    let reply = send(&svc, keyed_post("/charges", "k", "{}")).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    let sent: Vec<u128> = store
        .hook
        .renewals_sent
        .lock()
        .unwrap()
        .iter()
        .map(|at| at.duration_since(start).as_millis())
        .collect();
    assert_eq!(sent, [1_000, 2_500, 4_000]);
}

/// The first renewal's timer, and every later one, is driven by the flow's own waker: a
/// handler that never wakes the flow itself (it waits on a gate opened much later) still
/// keeps its claim.
#[tokio::test(start_paused = true)]
async fn a_silent_handler_keeps_its_claim_through_many_leases() {
    let gate = Gate::new();
    let handler = Handler::gated(&gate);
    let layer = IdempotencyLayer::new(MemoryStore::default())
        .with_lease(Duration::from_secs(1))
        .with_wait_mode(WaitMode::Reject);
    let svc = serve(&layer, &handler);
    let first = tokio::spawn(send(&svc, keyed_post("/charges", "k", "{}")));
    eventually("the first request runs", || handler.calls() == 1).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let duplicate = send(&svc, keyed_post("/charges", "k", "{}")).await;
    duplicate.assert_problem(ProblemKind::InFlight, StatusCode::CONFLICT);
    gate.open();
    assert_eq!(within(first).await.unwrap().text(), "execution #1");
    assert_eq!(handler.calls(), 1);
}

/// An inner service whose clones share one readiness switch (`poll_ready` is pending while it
/// is off, as behind a saturated concurrency limit). Its first call waits at `first` and
/// answers 500 (not stored: the key is released); later calls answer `execution #N`.
#[derive(Clone)]
struct Switched {
    on: Arc<Mutex<(bool, Vec<std::task::Waker>)>>,
    calls: Arc<AtomicUsize>,
    first: Gate,
}

impl Switched {
    fn new() -> Self {
        Self {
            on: Arc::new(Mutex::new((true, Vec::new()))),
            calls: Arc::default(),
            first: Gate::new(),
        }
    }

    fn set(&self, on: bool) {
        let mut state = self.on.lock().unwrap();
        state.0 = on;
        if on {
            state.1.drain(..).for_each(std::task::Waker::wake);
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl<B: Send + 'static> Service<Request<B>> for Switched {
    type Response = Response<ResBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<ResBody>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        let mut state = self.on.lock().unwrap();
        if state.0 {
            return Poll::Ready(Ok(()));
        }
        state.1.push(cx.waker().clone());
        Poll::Pending
    }

    fn call(&mut self, _request: Request<B>) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let first = self.first.clone();
        Box::pin(async move {
            if n == 1 {
                first.pass().await;
                return Ok(respond(StatusCode::INTERNAL_SERVER_ERROR, full("failed")));
            }
            Ok(created(format!("execution #{n}")))
        })
    }
}

/// A duplicate that acquires the key after waiting, then waits for its inner service to get
/// ready longer than the lease, keeps its claim: another instance's retry meanwhile is told
/// the key is in flight, rather than taking the claim over as abandoned and executing too.
#[tokio::test(start_paused = true)]
async fn a_claim_held_while_the_inner_service_gets_ready_is_renewed() {
    let store = MemoryStore::default();
    let inner = Switched::new();
    let svc = IdempotencyLayer::new(store.clone())
        .with_lease(Duration::from_secs(1))
        .with_wait_mode(WaitMode::Wait(Duration::from_secs(30)))
        .layer(inner.clone());
    let first = tokio::spawn(svc.clone().oneshot(keyed_post("/charges", "k", "{}")));
    eventually("the first request runs", || inner.calls() == 1).await;
    let duplicate = tokio::spawn(svc.clone().oneshot(keyed_post("/charges", "k", "{}")));
    // The duplicate was made ready and now waits for the first; the inner service saturates.
    tokio::time::sleep(Duration::from_millis(50)).await;
    inner.set(false);
    // The first answers 500: the key is released and the duplicate claims it, then waits for
    // its inner service for three leases.
    inner.first.open();
    let first = within(first)
        .await
        .unwrap()
        .unwrap_or_else(|never| match never {});
    assert_eq!(first.status(), StatusCode::INTERNAL_SERVER_ERROR);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(store.in_flight_count(), 1, "the duplicate holds the key");

    let elsewhere = Handler::counting();
    let other_instance = IdempotencyLayer::new(store.clone()).with_wait_mode(WaitMode::Reject);
    let retry = send(
        &serve(&other_instance, &elsewhere),
        keyed_post("/charges", "k", "{}"),
    );
    let retry = within(retry).await;
    retry.assert_problem(ProblemKind::InFlight, StatusCode::CONFLICT);
    assert_eq!(elsewhere.calls(), 0, "the held claim was not taken over");

    inner.set(true);
    let duplicate = within(duplicate)
        .await
        .unwrap()
        .unwrap_or_else(|never| match never {});
    let duplicate = Reply::read(duplicate).await;
    assert_eq!(duplicate.text(), "execution #2");
}
