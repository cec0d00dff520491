//! What is stored and replayed (SPEC §2 methods, §6), through the layer on `MemoryStore`.

mod common;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, header};
use tower_idempotency::{IdempotencyLayer, MemoryStore};

use common::service::{Handler, created, full, keyed_post, respond, send, serve, value};

/// Headers that are easy to lose: a repeated `Set-Cookie`, a non-UTF-8 value, an order that
/// is not alphabetical.
fn tricky_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.append("x-zeta", value(b"first"));
    headers.append(header::SET_COOKIE, value(b"session=abc; Path=/; HttpOnly"));
    headers.append(header::CONTENT_TYPE, value(b"application/octet-stream"));
    headers.append("x-raw", value(b"caf\xe9 \xff\x80 bytes"));
    headers.append(header::SET_COOKIE, value(b"theme=dark; Path=/"));
    headers.append("x-alpha", value(b"last"));
    headers
}

const BINARY_BODY: &[u8] = b"{\"id\":\"ch_1\"}\x00\x01\xfe\xff\r\n";

fn tricky_handler() -> Handler {
    Handler::with_counter(|n, _request| async move {
        let mut response = respond(StatusCode::ACCEPTED, full(Bytes::from_static(BINARY_BODY)));
        *response.headers_mut() = tricky_headers();
        response
            .headers_mut()
            .append("x-execution", value(n.to_string().as_bytes()));
        response
    })
}

#[tokio::test]
async fn a_replay_is_the_first_response_byte_for_byte_plus_the_replayed_header() {
    let handler = tricky_handler();
    let svc = serve(&IdempotencyLayer::new(MemoryStore::default()), &handler);

    let first = send(&svc, keyed_post("/charges", "key-1", "{\"amount\":100}")).await;
    let replay = send(&svc, keyed_post("/charges", "key-1", "{\"amount\":100}")).await;

    assert_eq!(handler.calls(), 1);
    assert_eq!(first.status, StatusCode::ACCEPTED);
    assert!(!first.replayed(), "the first response is not a replay");
    let mut expected = tricky_headers();
    expected.append("x-execution", value(b"1"));
    assert_eq!(first.header_list(), common::service::header_list(&expected));

    assert!(replay.replayed());
    assert_eq!(replay.status, first.status);
    assert_eq!(replay.header_list(), first.header_list());
    assert_eq!(replay.headers.get_all(header::SET_COOKIE).iter().count(), 2);
    assert_eq!(
        replay.headers["x-raw"].as_bytes(),
        b"caf\xe9 \xff\x80 bytes"
    );
    assert_eq!(replay.body, first.body);
    assert_eq!(&replay.body[..], BINARY_BODY);
    assert_eq!(replay.problem, None);
}

#[tokio::test]
async fn every_retry_gets_the_same_replay() {
    let handler = Handler::counting();
    let svc = serve(&IdempotencyLayer::new(MemoryStore::default()), &handler);
    let first = send(&svc, keyed_post("/charges", "key-1", "x")).await;
    for _ in 0..5 {
        let replay = send(&svc, keyed_post("/charges", "key-1", "x")).await;
        assert!(replay.replayed());
        assert_eq!(replay.body, first.body);
    }
    assert_eq!(handler.calls(), 1);
}

#[tokio::test]
async fn the_handler_receives_the_request_body_the_client_sent() {
    let handler =
        Handler::new(|request: Request<Bytes>| async move { created(request.into_body()) });
    let svc = serve(&IdempotencyLayer::new(MemoryStore::default()), &handler);
    let reply = send(&svc, keyed_post("/echo", "k", "{\"amount\":42}")).await;
    assert_eq!(reply.text(), "{\"amount\":42}");
}

#[tokio::test]
async fn a_different_key_executes_again() {
    let handler = Handler::counting();
    let svc = serve(&IdempotencyLayer::new(MemoryStore::default()), &handler);
    let a = send(&svc, keyed_post("/charges", "key-a", "x")).await;
    let b = send(&svc, keyed_post("/charges", "key-b", "x")).await;
    assert_eq!(handler.calls(), 2);
    assert!(!a.replayed() && !b.replayed());
    assert_eq!(a.text(), "execution #1");
    assert_eq!(b.text(), "execution #2");
}

#[tokio::test]
async fn get_passes_through_untouched_with_no_store_entry() {
    let handler = Handler::counting();
    let store = MemoryStore::default();
    let svc = serve(&IdempotencyLayer::new(store.clone()), &handler);
    for n in 1..=2 {
        let request = Request::get("/charges")
            .header("idempotency-key", "key-1")
            .body(common::service::body(""))
            .unwrap();
        let reply = send(&svc, request).await;
        assert_eq!(reply.status, StatusCode::CREATED);
        assert!(!reply.replayed());
        assert_eq!(reply.text(), format!("execution #{n}"));
    }
    assert_eq!(handler.calls(), 2);
    assert_eq!(store.record_count(), 0);
    assert_eq!(store.in_flight_count(), 0);
}

#[tokio::test]
async fn unprotected_methods_are_not_even_checked_for_a_valid_key() {
    let handler = Handler::counting();
    let svc = serve(&IdempotencyLayer::new(MemoryStore::default()), &handler);
    for method in [Method::GET, Method::PUT, Method::DELETE] {
        let request = Request::builder()
            .method(method)
            .uri("/charges")
            .header("idempotency-key", "")
            .body(common::service::body(""))
            .unwrap();
        assert_eq!(send(&svc, request).await.status, StatusCode::CREATED);
    }
    assert_eq!(handler.calls(), 3);
}

fn request(method: Method, key: &str) -> Request<http_body_util::Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri("/things/1")
        .header("idempotency-key", key)
        .body(common::service::body("payload"))
        .unwrap()
}

#[tokio::test]
async fn patch_is_protected_by_default() {
    let handler = Handler::counting();
    let svc = serve(&IdempotencyLayer::new(MemoryStore::default()), &handler);
    send(&svc, request(Method::PATCH, "k")).await;
    assert!(send(&svc, request(Method::PATCH, "k")).await.replayed());
    assert_eq!(handler.calls(), 1);
}

#[tokio::test]
async fn add_method_protects_one_more_method() {
    let handler = Handler::counting();
    let store = MemoryStore::default();
    let layer = IdempotencyLayer::new(store.clone()).add_method(Method::PUT);
    let svc = serve(&layer, &handler);
    send(&svc, request(Method::PUT, "k")).await;
    assert!(send(&svc, request(Method::PUT, "k")).await.replayed());
    send(&svc, request(Method::POST, "k")).await;
    assert!(send(&svc, request(Method::POST, "k")).await.replayed());
    assert_eq!(handler.calls(), 2, "PUT added, POST still protected");
    assert_eq!(store.record_count(), 2);
}

#[tokio::test]
async fn with_methods_replaces_the_protected_set() {
    let handler = Handler::counting();
    let layer =
        IdempotencyLayer::new(MemoryStore::default()).with_methods([Method::DELETE, Method::PUT]);
    let svc = serve(&layer, &handler);
    send(&svc, request(Method::DELETE, "k")).await;
    assert!(send(&svc, request(Method::DELETE, "k")).await.replayed());
    send(&svc, request(Method::PUT, "k")).await;
    assert!(send(&svc, request(Method::PUT, "k")).await.replayed());
    assert_eq!(handler.calls(), 2);
    for _ in 0..2 {
        assert!(!send(&svc, request(Method::POST, "k")).await.replayed());
    }
    assert_eq!(handler.calls(), 4, "POST is no longer protected");
}

fn failing_with(status: StatusCode) -> Handler {
    Handler::with_counter(move |n, _request| async move {
        if n == 1 {
            respond(status, full(format!("attempt {n} failed")))
        } else {
            created(format!("attempt {n} succeeded"))
        }
    })
}

#[tokio::test]
async fn transient_failures_release_the_key_so_a_retry_executes_again() {
    for status in [
        StatusCode::INTERNAL_SERVER_ERROR,
        StatusCode::BAD_GATEWAY,
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::REQUEST_TIMEOUT,
        StatusCode::TOO_MANY_REQUESTS,
    ] {
        let handler = failing_with(status);
        let store = MemoryStore::default();
        let svc = serve(&IdempotencyLayer::new(store.clone()), &handler);
        let first = send(&svc, keyed_post("/charges", "k", "x")).await;
        assert_eq!(first.status, status);
        assert_eq!(first.text(), "attempt 1 failed");
        let retry = send(&svc, keyed_post("/charges", "k", "x")).await;
        assert_eq!(retry.status, StatusCode::CREATED, "retry after {status}");
        assert!(!retry.replayed());
        assert_eq!(retry.text(), "attempt 2 succeeded");
        let again = send(&svc, keyed_post("/charges", "k", "x")).await;
        assert!(again.replayed(), "the success is stored after {status}");
        assert_eq!(handler.calls(), 2, "after {status}");
        assert_eq!(store.record_count(), 1);
    }
}

#[tokio::test]
async fn client_errors_are_stored_and_replayed() {
    for status in [
        StatusCode::BAD_REQUEST,
        StatusCode::NOT_FOUND,
        StatusCode::CONFLICT,
        StatusCode::UNPROCESSABLE_ENTITY,
    ] {
        let handler = failing_with(status);
        let svc = serve(&IdempotencyLayer::new(MemoryStore::default()), &handler);
        send(&svc, keyed_post("/charges", "k", "x")).await;
        let retry = send(&svc, keyed_post("/charges", "k", "x")).await;
        assert!(retry.replayed(), "{status} is stored");
        assert_eq!(retry.status, status);
        assert_eq!(handler.calls(), 1);
    }
}

#[tokio::test]
async fn store_when_always_stores_and_replays_a_500() {
    let handler = failing_with(StatusCode::INTERNAL_SERVER_ERROR);
    let layer = IdempotencyLayer::new(MemoryStore::default())
        .with_store_when(|_: &http::response::Parts| true);
    let svc = serve(&layer, &handler);
    let first = send(&svc, keyed_post("/charges", "k", "x")).await;
    let retry = send(&svc, keyed_post("/charges", "k", "x")).await;
    assert_eq!(handler.calls(), 1);
    assert!(retry.replayed());
    assert_eq!(retry.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(retry.body, first.body);
}

#[tokio::test]
async fn a_store_filled_past_its_capacity_still_replays_its_most_recent_keys() {
    const BODY: usize = 2_000;
    // Each record weighs about its body plus a little: room for about 50 of them (and more
    // than `MemoryStore`'s smallest capacity).
    let store = MemoryStore::new(50 * (BODY as u64 + 200));
    let handler = Handler::new(|_request| async { created(vec![b'r'; BODY]) });
    let svc = serve(&IdempotencyLayer::new(store.clone()), &handler);
    let keys: Vec<String> = (0..300).map(|n| format!("key-{n}")).collect();
    for key in &keys {
        send(&svc, keyed_post("/charges", key, "x")).await;
    }
    assert_eq!(handler.calls(), 300);
    assert!(store.evictions() > 0, "the store was over capacity");
    for key in &keys[keys.len() - 10..] {
        let reply = send(&svc, keyed_post("/charges", key, "x")).await;
        assert!(reply.replayed(), "{key} is among the most recent");
        assert_eq!(reply.body.len(), BODY);
    }
    assert_eq!(handler.calls(), 300);
}

#[tokio::test]
async fn a_response_with_more_headers_than_a_record_keeps_is_delivered_and_not_replayable() {
    use tower_idempotency::{MAX_RECORD_HEADERS, ProblemKind};
    // Just over the cap, and past what `HeaderMap::with_capacity` takes (which panicked).
    for count in [MAX_RECORD_HEADERS + 1, 40_000] {
        let handler = Handler::with_counter(move |_, _request| async move {
            let mut response = created("{}");
            for _ in 0..count {
                response
                    .headers_mut()
                    .append(header::SET_COOKIE, value(b"a=1"));
            }
            response
        });
        let store = MemoryStore::default();
        let svc = serve(&IdempotencyLayer::new(store.clone()), &handler);
        let first = send(&svc, keyed_post("/charges", "k", "{}")).await;
        assert_eq!(first.status, StatusCode::CREATED, "{count}");
        assert_eq!(first.header_list().len(), count, "delivered whole");
        let retry = send(&svc, keyed_post("/charges", "k", "{}")).await;
        retry.assert_problem(ProblemKind::NotReplayable, StatusCode::CONFLICT);
        assert_eq!(handler.calls(), 1, "{count}: never executed a second time");
        assert_eq!(store.record_count(), 1, "{count}: the key is spent");
    }
}
