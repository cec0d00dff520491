//! The layer's own responses (SPEC §7): every kind of rejection, rendered by default, by a
//! closure and by a `ProblemResponse` type, carries the whole `Problem` in its extensions.

mod common;

use std::{
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use tower_idempotency::{
    IDEMPOTENCY_KEY, IdempotencyLayer, MissingKey, Problem, ProblemKind, ProblemResponse, Recovery,
    WaitMode,
};

use common::flaky_store::FlakyStore;
use common::service::{
    Gate, Handler, Reply, Scripted, Step, eventually, keyed_post, post, send, serve,
};

type Layer = IdempotencyLayer<FlakyStore>;

/// The problems a rendering was asked for, in order.
type Seen = Arc<Mutex<Vec<Problem>>>;

/// Every kind the layer answers with, and its status under the default settings.
const KINDS: [(ProblemKind, StatusCode); 10] = [
    (ProblemKind::MissingKey, StatusCode::BAD_REQUEST),
    (ProblemKind::InvalidKey, StatusCode::BAD_REQUEST),
    (ProblemKind::UnreadableBody, StatusCode::BAD_REQUEST),
    (ProblemKind::BodyTooLarge, StatusCode::PAYLOAD_TOO_LARGE),
    (ProblemKind::InFlight, StatusCode::CONFLICT),
    (ProblemKind::KeyReused, StatusCode::CONFLICT),
    (ProblemKind::NotReplayable, StatusCode::CONFLICT),
    (
        ProblemKind::StoreUnavailable,
        StatusCode::SERVICE_UNAVAILABLE,
    ),
    (
        ProblemKind::HandlerFailed,
        StatusCode::INTERNAL_SERVER_ERROR,
    ),
    (ProblemKind::OutcomeUnknown, StatusCode::CONFLICT),
];

/// A rendering of the application's own: plain text, with a prefix it was configured with.
struct PlainText {
    prefix: &'static str,
    seen: Seen,
}

impl ProblemResponse for PlainText {
    fn problem_response(&self, problem: &Problem) -> Response<Bytes> {
        self.seen.lock().unwrap().push(problem.clone());
        let mut response =
            Response::new(Bytes::from(format!("{}{}", self.prefix, problem.detail())));
        *response.status_mut() = problem.status();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        response
    }
}

/// How one run of the table renders problems.
enum Rendering {
    Default,
    Closure(Seen),
    Type(Seen),
}

impl Rendering {
    fn apply(&self, layer: Layer) -> Layer {
        match self {
            Self::Default => layer,
            Self::Closure(seen) => {
                let seen = Arc::clone(seen);
                layer.with_problem_response(move |problem: &Problem| {
                    seen.lock().unwrap().push(problem.clone());
                    let mut response =
                        Response::new(Bytes::from(format!("closure: {}", problem.title())));
                    *response.status_mut() = problem.status();
                    response
                })
            }
            Self::Type(seen) => layer.with_problem_response(PlainText {
                prefix: "refused: ",
                seen: Arc::clone(seen),
            }),
        }
    }
}

/// Makes a layer rendered by `rendering` answer one request with a `kind` problem, and
/// returns that response.
async fn provoke(kind: ProblemKind, rendering: &Rendering) -> Reply {
    let store = FlakyStore::default();
    let layer =
        |configure: fn(Layer) -> Layer| rendering.apply(configure(Layer::new(store.clone())));
    let plain = |layer: Layer| layer;
    match kind {
        ProblemKind::MissingKey => {
            let svc = serve(
                &layer(|l| l.with_missing_key(MissingKey::Required)),
                &Handler::counting(),
            );
            send(&svc, post("/charges", "{}")).await
        }
        ProblemKind::InvalidKey => {
            let svc = serve(&layer(plain), &Handler::counting());
            send(&svc, keyed_post("/charges", "bad key", "{}")).await
        }
        ProblemKind::UnreadableBody => {
            let svc = serve(&layer(plain), &Handler::counting());
            let request = Request::post("/charges")
                .header(IDEMPOTENCY_KEY, "k")
                .body(Scripted::new([Step::Error("connection reset")]))
                .unwrap();
            send(&svc, request).await
        }
        ProblemKind::BodyTooLarge => {
            let svc = serve(
                &layer(|l| l.with_request_body_limit(4)),
                &Handler::counting(),
            );
            send(&svc, keyed_post("/charges", "k", "12345")).await
        }
        ProblemKind::InFlight => {
            let gate = Gate::new();
            let handler = Handler::gated(&gate);
            let svc = serve(&layer(|l| l.with_wait_mode(WaitMode::Reject)), &handler);
            let first = tokio::spawn(send(&svc, keyed_post("/charges", "k", "{}")));
            eventually("the first request runs", || handler.calls() == 1).await;
            let duplicate = send(&svc, keyed_post("/charges", "k", "{}")).await;
            gate.open();
            assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
            duplicate
        }
        ProblemKind::KeyReused => {
            let svc = serve(&layer(plain), &Handler::counting());
            send(&svc, keyed_post("/charges", "k", "{\"amount\":1}")).await;
            send(&svc, keyed_post("/charges", "k", "{\"amount\":2}")).await
        }
        ProblemKind::NotReplayable => {
            // `execution #1` is longer than four bytes: delivered, not kept.
            let svc = serve(
                &layer(|l| l.with_response_body_limit(4)),
                &Handler::counting(),
            );
            let first = send(&svc, keyed_post("/charges", "k", "{}")).await;
            assert_eq!(first.status, StatusCode::CREATED);
            send(&svc, keyed_post("/charges", "k", "{}")).await
        }
        ProblemKind::StoreUnavailable => {
            let svc = serve(&layer(plain), &Handler::counting());
            store.hook.down.store(true, Ordering::SeqCst);
            send(&svc, keyed_post("/charges", "k", "{}")).await
        }
        ProblemKind::HandlerFailed => {
            let handler = Handler::new(|_request| async {
                panic!("the handler panics (this panic is expected)")
            });
            send(
                &serve(&layer(plain), &handler),
                keyed_post("/charges", "k", "{}"),
            )
            .await
        }
        ProblemKind::OutcomeUnknown => {
            // Instance A claims, then loses the store: its claim is abandoned once the lease
            // ends. Instance B, on the same records, is told to leave such keys alone.
            let lease = Duration::from_secs(1);
            let cut_off = FlakyStore::over(store.inner.clone());
            cut_off.hook.writes_down.store(true, Ordering::SeqCst);
            let a = serve(
                &rendering.apply(Layer::new(cut_off).with_lease(lease)),
                &Handler::counting(),
            );
            assert_eq!(
                send(&a, keyed_post("/charges", "k", "{}")).await.status,
                StatusCode::CREATED
            );
            tokio::time::sleep(lease).await;
            let b = serve(
                &layer(|l| {
                    l.with_outcome_unknown(|_: &http::request::Parts| Recovery::OutcomeUnknown)
                }),
                &Handler::counting(),
            );
            send(&b, keyed_post("/charges", "k", "{}")).await
        }
        other => panic!("no scenario for {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn every_kind_of_rejection_carries_its_problem_by_default() {
    for (kind, status) in KINDS {
        let reply = provoke(kind, &Rendering::Default).await;
        // Kind, status, the body written from the problem in the extensions, Retry-After
        // exactly when it has one.
        reply.assert_problem(kind, status);
        let problem = reply.details.as_ref().expect("the problem");
        assert_eq!(problem.kind(), kind);
        if matches!(kind, ProblemKind::InFlight | ProblemKind::StoreUnavailable) {
            reply.assert_retry_after();
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_closure_renders_every_kind_and_the_problem_stays_in_the_extensions() {
    for (kind, status) in KINDS {
        let seen = Seen::default();
        let reply = provoke(kind, &Rendering::Closure(Arc::clone(&seen))).await;
        assert_eq!(reply.status, status, "{kind:?}");
        assert_eq!(reply.text(), format!("closure: {}", kind.title()));
        assert_eq!(reply.problem, Some(kind));
        let seen = seen.lock().unwrap();
        assert_eq!(
            reply.details.as_ref(),
            seen.last(),
            "{kind:?}: the problem the closure rendered"
        );
        assert_eq!(seen.len(), 1, "{kind:?}: one problem, rendered once");
    }
}

#[tokio::test(start_paused = true)]
async fn a_problem_response_type_renders_every_kind_and_the_problem_stays_in_the_extensions() {
    for (kind, status) in KINDS {
        let seen = Seen::default();
        let reply = provoke(kind, &Rendering::Type(Arc::clone(&seen))).await;
        let seen = seen.lock().unwrap();
        let [problem] = seen.as_slice() else {
            panic!("{kind:?}: one problem, rendered once: {seen:?}");
        };
        assert_eq!(problem.kind(), kind);
        assert_eq!(reply.status, status, "{kind:?}");
        assert_eq!(reply.headers[header::CONTENT_TYPE], "text/plain");
        assert_eq!(reply.text(), format!("refused: {}", problem.detail()));
        assert_eq!(reply.details.as_ref(), Some(problem));
        assert_eq!(reply.problem, Some(kind));
    }
}

#[tokio::test]
async fn a_handlers_response_carries_no_problem() {
    let handler = Handler::counting();
    let seen = Seen::default();
    let layer = Rendering::Type(Arc::clone(&seen)).apply(Layer::new(FlakyStore::default()));
    let svc = serve(&layer, &handler);
    let first = send(&svc, keyed_post("/charges", "k", "{}")).await;
    let replay = send(&svc, keyed_post("/charges", "k", "{}")).await;
    assert!(replay.replayed());
    for reply in [first, replay] {
        assert_eq!(reply.details, None);
        assert_eq!(reply.problem, None);
    }
    assert!(seen.lock().unwrap().is_empty(), "nothing was rendered");
}
