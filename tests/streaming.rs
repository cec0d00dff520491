//! Bodies: request size limits, streamed and over-cap responses, trailers, and a client that
//! leaves mid-body (SPEC §6).

mod common;

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, header};
use http_body::Body as _;
use http_body_util::BodyExt;
use tower_idempotency::{IDEMPOTENCY_KEY, IdempotencyLayer, MemoryStore, ProblemKind};

use common::service::{
    Handler, ResBody, Scripted, Step, body, data, full, keyed_post, respond, scripted, send,
    send_raw, serve, value, within,
};

const LIMIT: usize = 1024;

#[tokio::test]
async fn an_over_limit_request_body_is_refused_with_413_and_nothing_runs() {
    let handler = Handler::counting();
    let store = MemoryStore::default();
    let layer = IdempotencyLayer::new(store.clone()).with_request_body_limit(LIMIT);
    let svc = serve(&layer, &handler);

    // Declared by Content-Length.
    let declared = Request::post("/upload")
        .header(IDEMPOTENCY_KEY, "k1")
        .header(header::CONTENT_LENGTH, (LIMIT + 1).to_string())
        .body(body(vec![b'x'; LIMIT + 1]))
        .unwrap();
    let reply = send(&svc, declared).await;
    reply.assert_problem(ProblemKind::BodyTooLarge, StatusCode::PAYLOAD_TOO_LARGE);

    // No Content-Length; the body's exact size is known.
    let sized = keyed_post("/upload", "k2", &"x".repeat(LIMIT + 1));
    let reply = send(&svc, sized).await;
    reply.assert_problem(ProblemKind::BodyTooLarge, StatusCode::PAYLOAD_TOO_LARGE);

    // No Content-Length, no size: a stream that grows past the limit.
    let streamed = Request::post("/upload")
        .header(IDEMPOTENCY_KEY, "k3")
        .body(Scripted::new([
            data(vec![b'x'; 600]),
            Step::Yield,
            data(vec![b'x'; 600]),
        ]))
        .unwrap();
    let reply = send(&svc, streamed).await;
    reply.assert_problem(ProblemKind::BodyTooLarge, StatusCode::PAYLOAD_TOO_LARGE);

    assert_eq!(handler.calls(), 0);
    assert_eq!(store.record_count(), 0);
    assert_eq!(store.in_flight_count(), 0);
}

#[tokio::test]
async fn a_request_body_at_the_limit_is_accepted_and_handed_on_whole() {
    let handler = Handler::new(|request: Request<Bytes>| async move {
        respond(StatusCode::OK, full(request.into_body()))
    });
    let layer = IdempotencyLayer::new(MemoryStore::default()).with_request_body_limit(LIMIT);
    let svc = serve(&layer, &handler);
    let streamed = |key: &str| {
        Request::post("/upload")
            .header(IDEMPOTENCY_KEY, key)
            .body(Scripted::new([
                data(vec![b'a'; 500]),
                Step::Yield,
                data(vec![b'b'; LIMIT - 500]),
            ]))
            .unwrap()
    };
    let reply = send(&svc, streamed("k")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body.len(), LIMIT);
    assert!(reply.body[..500].iter().all(|b| *b == b'a'));
    assert!(reply.body[500..].iter().all(|b| *b == b'b'));
    // The streamed request fingerprints like the same bytes sent whole.
    let whole = [vec![b'a'; 500], vec![b'b'; LIMIT - 500]].concat();
    let same = Request::post("/upload")
        .header(IDEMPOTENCY_KEY, "k")
        .body(body(whole))
        .unwrap();
    assert!(send(&svc, same).await.replayed());
    assert_eq!(handler.calls(), 1);
}

#[tokio::test]
async fn an_unreadable_request_body_is_refused_with_400() {
    let handler = Handler::counting();
    let svc = serve(&IdempotencyLayer::new(MemoryStore::default()), &handler);
    let broken = Request::post("/upload")
        .header(IDEMPOTENCY_KEY, "k")
        .body(Scripted::new([
            data("abc"),
            Step::Error("connection reset"),
        ]))
        .unwrap();
    send(&svc, broken)
        .await
        .assert_problem(ProblemKind::UnreadableBody, StatusCode::BAD_REQUEST);
    assert_eq!(handler.calls(), 0);
}

fn chunks(total: usize, chunk: usize, delay: Duration) -> Vec<Step> {
    let mut steps = Vec::new();
    for (n, start) in (0..total).step_by(chunk).enumerate() {
        if n > 0 {
            steps.push(Step::Sleep(delay));
        }
        let len = chunk.min(total - start);
        steps.push(data(vec![b'a' + (n % 26) as u8; len]));
    }
    steps
}

/// Checks that a response over the capture limit reaches its client whole and that retries
/// get a `NotReplayable` problem without a second execution.
async fn an_over_cap_response_is_delivered_but_not_replayable(
    make_body: impl Fn() -> ResBody + Send + Sync + 'static,
    total: usize,
) {
    let handler = Handler::new(move |_request| {
        let body = make_body();
        async move { respond(StatusCode::CREATED, body) }
    });
    let store = MemoryStore::default();
    let layer = IdempotencyLayer::new(store.clone()).with_response_body_limit(LIMIT);
    let svc = serve(&layer, &handler);

    let first = send(&svc, keyed_post("/export", "k", "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.body.len(), total, "the first client gets it all");
    assert!(!first.replayed());

    for _ in 0..2 {
        let retry = send(&svc, keyed_post("/export", "k", "{}")).await;
        retry.assert_problem(ProblemKind::NotReplayable, StatusCode::CONFLICT);
    }
    assert_eq!(handler.calls(), 1, "never executed a second time");
    assert_eq!(store.record_count(), 1, "the key is spent");
}

#[tokio::test]
async fn an_over_cap_whole_response_is_delivered_and_retries_get_not_replayable() {
    let total = 4 * LIMIT;
    let whole = Bytes::from(vec![b'z'; total]);
    an_over_cap_response_is_delivered_but_not_replayable(move || full(whole.clone()), total).await;
}

#[tokio::test]
async fn an_over_cap_streamed_response_is_delivered_and_retries_get_not_replayable() {
    let total = 3 * LIMIT + 17;
    let steps = chunks(total, 256, Duration::from_millis(5));
    an_over_cap_response_is_delivered_but_not_replayable(move || scripted(steps.clone()), total)
        .await;
}

#[tokio::test]
async fn an_over_cap_response_of_many_ready_chunks_is_delivered_and_not_replayable() {
    let total = 200 * 16;
    let steps: Vec<Step> = (0..200).map(|_| data(vec![b'r'; 16])).collect();
    an_over_cap_response_is_delivered_but_not_replayable(move || scripted(steps.clone()), total)
        .await;
}

#[tokio::test]
async fn a_response_exactly_at_the_cap_is_replayed() {
    let handler = Handler::new(|_request| async {
        respond(
            StatusCode::OK,
            scripted(chunks(LIMIT, 100, Duration::from_millis(2))),
        )
    });
    let layer = IdempotencyLayer::new(MemoryStore::default()).with_response_body_limit(LIMIT);
    let svc = serve(&layer, &handler);
    let first = send(&svc, keyed_post("/export", "k", "{}")).await;
    let replay = send(&svc, keyed_post("/export", "k", "{}")).await;
    assert!(replay.replayed());
    assert_eq!(replay.body.len(), LIMIT);
    assert_eq!(replay.body, first.body);
    assert_eq!(handler.calls(), 1);
}

fn stream_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.append(header::CONTENT_TYPE, value(b"text/event-stream"));
    headers.append(header::SET_COOKIE, value(b"a=1"));
    headers.append(header::SET_COOKIE, value(b"b=2"));
    headers.append("x-raw", value(b"\xfe\xff"));
    headers
}

#[tokio::test]
async fn a_streamed_response_within_the_cap_is_captured_and_replayed_identically() {
    let handler = Handler::new(|_request| async {
        let mut response = respond(
            StatusCode::OK,
            scripted(chunks(900, 100, Duration::from_millis(10))),
        );
        *response.headers_mut() = stream_headers();
        response
    });
    let layer = IdempotencyLayer::new(MemoryStore::default()).with_response_body_limit(LIMIT);
    let svc = serve(&layer, &handler);

    let response = send_raw(&svc, keyed_post("/events", "k", "{}")).await;
    assert_eq!(
        response.body().size_hint().exact(),
        None,
        "the first response streams"
    );
    let first = common::service::Reply::read(response).await;
    let replay = send(&svc, keyed_post("/events", "k", "{}")).await;

    assert_eq!(handler.calls(), 1);
    assert_eq!(first.body.len(), 900);
    assert!(replay.replayed());
    assert_eq!(replay.status, first.status);
    assert_eq!(replay.header_list(), first.header_list());
    assert_eq!(
        first.header_list(),
        common::service::header_list(&stream_headers())
    );
    assert_eq!(replay.body, first.body);
}

fn trailers() -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.append("x-checksum", value(b"sha256=abc"));
    trailers.append("x-row-count", value(b"3"));
    trailers.append("x-row-count", value(b"3 again"));
    trailers
}

async fn trailers_are_replayed(steps: Vec<Step>) {
    let handler = Handler::new(move |_request| {
        let steps = steps.clone();
        async move { respond(StatusCode::OK, scripted(steps)) }
    });
    let svc = serve(&IdempotencyLayer::new(MemoryStore::default()), &handler);
    let first = send(&svc, keyed_post("/export", "k", "{}")).await;
    let replay = send(&svc, keyed_post("/export", "k", "{}")).await;
    assert_eq!(handler.calls(), 1);
    assert!(replay.replayed());
    assert_eq!(first.body, "row1\nrow2\n");
    assert_eq!(replay.body, first.body);
    let expected = common::service::header_list(&trailers());
    assert_eq!(
        first.trailers.as_ref().map(common::service::header_list),
        Some(expected.clone())
    );
    assert_eq!(
        replay.trailers.as_ref().map(common::service::header_list),
        Some(expected)
    );
}

#[tokio::test]
async fn trailers_of_a_ready_response_are_replayed() {
    trailers_are_replayed(vec![
        data("row1\n"),
        data("row2\n"),
        Step::Trailers(trailers()),
    ])
    .await;
}

#[tokio::test]
async fn trailers_of_a_streamed_response_are_replayed() {
    trailers_are_replayed(vec![
        data("row1\n"),
        Step::Sleep(Duration::from_millis(10)),
        data("row2\n"),
        Step::Sleep(Duration::from_millis(10)),
        Step::Trailers(trailers()),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_body_does_not_stop_the_capture_and_the_retry_is_replayed() {
    let handler = Handler::new(|_request| async {
        let steps = [
            data("part-1 "),
            Step::Sleep(Duration::from_millis(30)),
            data("part-2 "),
            Step::Sleep(Duration::from_millis(30)),
            data("part-3"),
        ];
        respond(StatusCode::OK, scripted(steps))
    });
    let svc = serve(&IdempotencyLayer::new(MemoryStore::default()), &handler);

    let response = send_raw(&svc, keyed_post("/export", "k", "{}")).await;
    let mut body = response.into_body();
    let first = within(body.frame()).await.expect("a frame").expect("data");
    assert_eq!(first.into_data().unwrap(), "part-1 ");
    drop(body);

    // The retry waits for the capture to finish, then replays all of it.
    let retry = send(&svc, keyed_post("/export", "k", "{}")).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, "part-1 part-2 part-3");
    assert_eq!(handler.calls(), 1);
}

#[tokio::test]
async fn a_slow_client_still_receives_every_chunk_of_a_long_stream() {
    // More chunks than the layer buffers between the handler and its client.
    let steps: Vec<Step> = (0..64)
        .flat_map(|n| [data(format!("{n:02},")), Step::Yield])
        .collect();
    let expected: String = (0..64).map(|n| format!("{n:02},")).collect();
    let handler = Handler::new(move |_request| {
        let steps = steps.clone();
        async move { respond(StatusCode::OK, scripted(steps)) }
    });
    let svc = serve(&IdempotencyLayer::new(MemoryStore::default()), &handler);
    let response = send_raw(&svc, keyed_post("/export", "k", "{}")).await;
    let mut body = response.into_body();
    let mut received = Vec::new();
    while let Some(frame) = within(body.frame()).await {
        received.extend_from_slice(&frame.unwrap().into_data().unwrap());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(received, expected.as_bytes());
    let replay = send(&svc, keyed_post("/export", "k", "{}")).await;
    assert_eq!(replay.body, expected.as_bytes());
}

/// A handler streaming `total` bytes in 64-byte chunks, yielding between them (so the body is
/// never ready whole).
fn streaming_handler(total: usize) -> Handler {
    Handler::new(move |_request| async move {
        let steps: Vec<Step> = (0..total / 64)
            .flat_map(|n| [data(vec![b'a' + (n % 26) as u8; 64]), Step::Yield])
            .collect();
        respond(StatusCode::OK, scripted(steps))
    })
}

#[tokio::test(start_paused = true)]
async fn a_client_that_never_reads_the_body_does_not_hold_the_key_in_flight() {
    let total = 64 * 200;
    let handler = streaming_handler(total);
    let store = MemoryStore::default();
    let layer = IdempotencyLayer::new(store.clone()).with_response_body_limit(64 * 1024);
    let svc = serve(&layer, &handler);

    // The client has the head and reads nothing more (but keeps the connection).
    let silent = send_raw(&svc, keyed_post("/export", "k", "{}")).await;
    assert_eq!(silent.status(), StatusCode::OK);
    common::service::eventually("the record is stored while the body is unread", || {
        store.record_count() == 1
    })
    .await;
    assert_eq!(store.in_flight_count(), 0);

    // A retry from another connection is replayed at once, whole.
    let retry = send(&svc, keyed_post("/export", "k", "{}")).await;
    assert!(retry.replayed());
    assert_eq!(retry.body.len(), total);

    // The silent client, reading at last, gets the same body.
    let late = within(silent.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(late, retry.body);
    assert_eq!(handler.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_never_reads_an_over_cap_body_does_not_hold_the_key_either() {
    let total = 64 * 200;
    let handler = streaming_handler(total);
    let store = MemoryStore::default();
    let layer = IdempotencyLayer::new(store.clone()).with_response_body_limit(LIMIT);
    let svc = serve(&layer, &handler);

    let silent = send_raw(&svc, keyed_post("/export", "k", "{}")).await;
    common::service::eventually("the key is spent while the body is unread", || {
        store.record_count() == 1 && store.in_flight_count() == 0
    })
    .await;
    let retry = send(&svc, keyed_post("/export", "k", "{}")).await;
    retry.assert_problem(ProblemKind::NotReplayable, StatusCode::CONFLICT);

    // Past the limit, the rest follows at the client's pace, and reaches it whole.
    let late = within(silent.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(late.len(), total);
    assert_eq!(handler.calls(), 1);
}

/// Polls `future` to its end on this thread with no runtime at all (what another executor
/// would do), as long as it never waits for anything but a wake it gave itself.
fn poll_without_a_runtime<F: std::future::Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    for _ in 0..10_000 {
        if let std::task::Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
    }
    panic!("the future waits for something only a runtime provides");
}

#[test]
fn a_streamed_response_polled_outside_a_tokio_runtime_ends_in_an_error_instead_of_a_panic() {
    assert!(tokio::runtime::Handle::try_current().is_err());
    let handler = Handler::new(|_request| async {
        respond(
            StatusCode::OK,
            scripted([data("first "), Step::Yield, data("second")]),
        )
    });
    let store = MemoryStore::default();
    let svc = serve(&IdempotencyLayer::new(store.clone()), &handler);
    let request = keyed_post("/export", "k", "{}");
    let response = poll_without_a_runtime(tower::ServiceExt::oneshot(svc, request))
        .expect("the layer answers");
    assert_eq!(response.status(), StatusCode::OK);
    // Nothing can capture the rest of the body without a runtime: it ends in an error rather
    // than looking complete, and the claim is left to its lease (no record, no panic).
    let read = poll_without_a_runtime(response.into_body().collect());
    assert!(read.is_err(), "a body cut short must not look complete");
    assert_eq!(handler.calls(), 1);
    assert_eq!(store.record_count(), 0);
}

/// A body that never ends: a frame every second, counted as it is produced.
struct Endless {
    tick: tokio::time::Interval,
    produced: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl http_body::Body for Endless {
    type Data = Bytes;
    type Error = common::service::BodyError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::task::ready!(self.tick.poll_tick(cx));
        self.produced
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
            b"data: tick\n\n",
        )))))
    }
}

#[tokio::test(start_paused = true)]
async fn an_endless_stream_whose_client_left_is_cut_after_the_bound_and_its_key_spent() {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };
    let produced = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&produced);
    let handler = Handler::new(move |_request| {
        let produced = Arc::clone(&counter);
        async move {
            let tick = tokio::time::interval(Duration::from_secs(1));
            respond(StatusCode::OK, Endless { tick, produced }.boxed_unsync())
        }
    });
    let store = MemoryStore::default();
    // The default bound: 60 s.
    let layer =
        IdempotencyLayer::new(store.clone()).with_wait_mode(tower_idempotency::WaitMode::Reject);
    let svc = serve(&layer, &handler);

    let response = send_raw(&svc, keyed_post("/events", "k", "{}")).await;
    let mut body = response.into_body();
    within(body.frame()).await.expect("a frame").expect("data");
    drop(body);

    // Within the bound, the capture goes on (the handler's work is not cut short at once).
    tokio::time::sleep(Duration::from_secs(50)).await;
    send(&svc, keyed_post("/events", "k", "{}"))
        .await
        .assert_problem(ProblemKind::InFlight, StatusCode::CONFLICT);
    assert_eq!(store.in_flight_count(), 1);

    // Past it, the body is dropped and the key spent: never a second execution.
    tokio::time::sleep(Duration::from_secs(15)).await;
    common::service::eventually("the capture is cut and the key spent", || {
        store.in_flight_count() == 0 && store.record_count() == 1
    })
    .await;
    let retry = send(&svc, keyed_post("/events", "k", "{}")).await;
    retry.assert_problem(ProblemKind::NotReplayable, StatusCode::CONFLICT);
    let stopped_at = produced.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        produced.load(Ordering::SeqCst),
        stopped_at,
        "the handler's body is no longer read"
    );
    assert!((55..=70).contains(&stopped_at), "{stopped_at} frames");
    assert_eq!(handler.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_zero_bound_cuts_an_endless_stream_as_soon_as_its_client_leaves() {
    use std::sync::{Arc, atomic::AtomicUsize};
    let handler = Handler::new(|_request| async {
        let tick = tokio::time::interval(Duration::from_secs(1));
        let produced = Arc::new(AtomicUsize::new(0));
        respond(StatusCode::OK, Endless { tick, produced }.boxed_unsync())
    });
    let store = MemoryStore::default();
    let layer = IdempotencyLayer::new(store.clone()).with_capture_after_disconnect(Duration::ZERO);
    let svc = serve(&layer, &handler);
    let response = send_raw(&svc, keyed_post("/events", "k", "{}")).await;
    drop(response);
    common::service::eventually("the key is spent", || {
        store.in_flight_count() == 0 && store.record_count() == 1
    })
    .await;
    send(&svc, keyed_post("/events", "k", "{}"))
        .await
        .assert_problem(ProblemKind::NotReplayable, StatusCode::CONFLICT);
    assert_eq!(handler.calls(), 1);
}
