//! Completion in the handler's own transaction (`PostgresStore::in_handler_transaction`),
//! against a real PostgreSQL that the tests start: `examples/postgres.rs`'s transfers API
//! served in process, and in a child process that is SIGKILLed mid-transfer.
#![cfg(all(feature = "postgres", feature = "axum"))]

mod common;
#[allow(dead_code)]
#[path = "../examples/postgres.rs"]
mod example;

use std::{
    future::Future,
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Body,
    http::{Request, StatusCode},
    middleware::{self, Next},
    response::Response,
};
use http_body_util::BodyExt;
use sqlx::{PgPool, postgres::PgPoolOptions};
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, PostgresStore, postgres::HandlerTransaction};

use common::postgres_server::PostgresServer;

/// One server per test binary; each test works in a database of its own.
fn shared_server() -> &'static PostgresServer {
    static SERVER: OnceLock<PostgresServer> = OnceLock::new();
    SERVER.get_or_init(PostgresServer::start)
}

fn pool_at(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(20)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy(url)
        .expect("a valid URL")
}

/// A fresh database `name` on the shared server, with the store's table and the accounts;
/// its URL.
async fn database(name: &str) -> String {
    let server = shared_server();
    let admin = pool_at(&server.url());
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .unwrap();
    let url = format!("postgres://postgres@127.0.0.1:{}/{name}", server.port());
    let pool = pool_at(&url);
    PostgresStore::new(pool.clone()).migrate().await.unwrap();
    example::setup(&pool).await.unwrap();
    url
}

async fn balances(pool: &PgPool) -> (i64, i64, i64) {
    let (a, b): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT balance FROM accounts WHERE id = 1), (SELECT balance FROM accounts WHERE id = 2)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let transfers: i64 = sqlx::query_scalar("SELECT count(*) FROM transfers")
        .fetch_one(pool)
        .await
        .unwrap();
    (a, b, transfers)
}

fn transfer(key: &str, amount: i64) -> Request<Body> {
    Request::post("/transfers")
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Body::from(format!(
            r#"{{"from":1,"to":2,"amount":{amount}}}"#
        )))
        .unwrap()
}

async fn call(app: &Router, request: Request<Body>) -> (StatusCode, bool, String) {
    let response = tokio::time::timeout(Duration::from_secs(30), app.clone().oneshot(request))
        .await
        .expect("answered in time")
        .unwrap();
    let status = response.status();
    let replayed = response.headers().contains_key("idempotent-replayed");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        replayed,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_transfer_and_its_record_commit_together_and_the_retry_is_replayed() {
    let pool = pool_at(&database("tx_commit").await);
    let app = example::app(PostgresStore::new(pool.clone()), pool.clone());
    let first = call(&app, transfer("t-1", 250)).await;
    assert_eq!(first.0, StatusCode::CREATED, "{first:?}");
    let retry = call(&app, transfer("t-1", 250)).await;
    assert!(retry.1, "replayed: {retry:?}");
    assert_eq!(retry.2, first.2);
    assert_eq!(balances(&pool).await, (750, 250, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_tower_service_takes_its_transaction_from_the_request_extensions() {
    use tower::{Layer, service_fn};
    let pool = pool_at(&database("tx_tower").await);
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&runs);
    let handler = service_fn(
        move |request: Request<tower_idempotency::RequestBody<Body>>| {
            counted.fetch_add(1, Ordering::SeqCst);
            let tx = request.extensions().get::<HandlerTransaction>().cloned();
            async move {
                let Some(tx) = tx else {
                    return Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .status(StatusCode::INTERNAL_SERVER_ERROR)
                            .body(Body::from("no transaction"))
                            .unwrap(),
                    );
                };
                let mut tx = tx.begin().await.unwrap();
                sqlx::query("UPDATE accounts SET balance = balance - 5 WHERE id = 1")
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                Ok(Response::builder()
                    .status(StatusCode::CREATED)
                    .body(Body::from("debited 5"))
                    .unwrap())
            }
        },
    );
    let service = IdempotencyLayer::new(PostgresStore::new(pool.clone()).in_handler_transaction())
        .layer(handler);
    let send = |key: &'static str| {
        let service = service.clone();
        async move {
            let response = service.oneshot(transfer(key, 5)).await.unwrap();
            let replayed = response.headers().contains_key("idempotent-replayed");
            let status = response.status();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, replayed, body)
        }
    };
    let first = send("t-tower").await;
    assert_eq!(first.0, StatusCode::CREATED, "{first:?}");
    assert_eq!(balances(&pool).await, (995, 0, 0), "committed by the layer");
    let retry = send("t-tower").await;
    assert!(retry.1, "replayed: {retry:?}");
    assert_eq!(retry.2, first.2);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(balances(&pool).await, (995, 0, 0));
}

#[cfg(feature = "moka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_store_over_it_hands_the_transaction_on_and_replays_from_memory() {
    use tower_idempotency::CachedStore;
    let pool = pool_at(&database("tx_cached").await);
    let store = CachedStore::new(
        PostgresStore::new(pool.clone()).in_handler_transaction(),
        1 << 20,
    );
    let app = example::routes(pool.clone()).layer(IdempotencyLayer::new(store));
    let first = call(&app, transfer("t-cached", 40)).await;
    assert_eq!(first.0, StatusCode::CREATED, "{first:?}");
    let retry = call(&app, transfer("t-cached", 40)).await;
    assert!(retry.1, "replayed: {retry:?}");
    assert_eq!(balances(&pool).await, (960, 40, 1));
}

/// The example's routes with `around` between the layer and the handler.
fn app_with(pool: &PgPool, store: PostgresStore, around: Router) -> Router {
    let _ = pool;
    around.layer(IdempotencyLayer::new(store.in_handler_transaction()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_after_the_writes_rolls_them_back_and_the_retry_runs_once() {
    let pool = pool_at(&database("tx_panic").await);
    let panics = Arc::new(AtomicUsize::new(1));
    let left = Arc::clone(&panics);
    let routes = example::routes(pool.clone()).layer(middleware::from_fn(
        move |request: Request<Body>, next: Next| {
            let left = Arc::clone(&left);
            async move {
                let response = next.run(request).await;
                // After the handler's writes, before the layer's commit.
                if left.fetch_sub(1, Ordering::SeqCst) == 1 {
                    panic!("crashed after the business writes");
                }
                response
            }
        },
    ));
    let app = app_with(&pool, PostgresStore::new(pool.clone()), routes);
    let crashed = call(&app, transfer("t-panic", 100)).await;
    assert_eq!(crashed.0, StatusCode::INTERNAL_SERVER_ERROR, "{crashed:?}");
    assert_eq!(
        balances(&pool).await,
        (1000, 0, 0),
        "rolled back with the claim"
    );
    let retry = call(&app, transfer("t-panic", 100)).await;
    assert_eq!(
        retry.0,
        StatusCode::CREATED,
        "the retry simply runs: {retry:?}"
    );
    assert!(!retry.1);
    let again = call(&app, transfer("t-panic", 100)).await;
    assert!(again.1);
    assert_eq!(balances(&pool).await, (900, 100, 1), "moved exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_lost_while_the_handler_runs_leaves_no_committed_write() {
    let url = database("tx_lease").await;
    let pool = pool_at(&url);
    let admin = pool_at(&url);
    let routes = example::routes(pool.clone()).layer(middleware::from_fn(
        move |request: Request<Body>, next: Next| {
            let admin = admin.clone();
            async move {
                let response = next.run(request).await;
                // Another owner took the claim over meanwhile (a new token).
                sqlx::query(
                    "UPDATE idempotency_records SET token = token + 1 WHERE record IS NULL",
                )
                .execute(&admin)
                .await
                .unwrap();
                response
            }
        },
    ));
    let app = app_with(&pool, PostgresStore::new(pool.clone()), routes);
    let lost = call(&app, transfer("t-lost", 100)).await;
    assert_eq!(
        lost.0,
        StatusCode::SERVICE_UNAVAILABLE,
        "a problem: {lost:?}"
    );
    assert!(
        lost.2.contains("problem") || lost.2.contains("type"),
        "{lost:?}"
    );
    assert_eq!(balances(&pool).await, (1000, 0, 0), "nothing committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_answers_503_frees_the_key_and_commits_nothing() {
    let url = database("tx_commit_fails").await;
    let pool = pool_at(&url);
    // Checked at commit: no transfer of 13.
    sqlx::raw_sql(
        "CREATE FUNCTION no_thirteen() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF NEW.amount = 13 THEN RAISE EXCEPTION 'unlucky'; END IF; RETURN NEW; END $$;
         CREATE CONSTRAINT TRIGGER no_thirteen AFTER INSERT ON transfers
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION no_thirteen();",
    )
    .execute(&pool)
    .await
    .unwrap();
    let app = example::app(PostgresStore::new(pool.clone()), pool.clone());
    let failed = call(&app, transfer("t-13", 13)).await;
    assert_eq!(failed.0, StatusCode::SERVICE_UNAVAILABLE, "{failed:?}");
    assert_eq!(balances(&pool).await, (1000, 0, 0));
    let claims: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_records")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(claims, 0, "the key was freed");
    sqlx::query("DROP TRIGGER no_thirteen ON transfers")
        .execute(&pool)
        .await
        .unwrap();
    let retry = call(&app, transfer("t-13", 13)).await;
    assert_eq!(retry.0, StatusCode::CREATED, "{retry:?}");
    assert_eq!(balances(&pool).await, (987, 13, 1));
}

/// A handler that debits account 1 by one in its transaction, then streams `chunks(run)`
/// chunks of 1 KiB (`run` counts from 0), each after a pause, so none is ready when the
/// handler returns; `runs` counts its runs.
fn streaming_routes(
    runs: &Arc<AtomicUsize>,
    chunks: impl Fn(usize) -> usize + Clone + Send + Sync + 'static,
) -> Router {
    let runs = Arc::clone(runs);
    Router::new().route(
        "/transfers",
        axum::routing::post(move |tx: HandlerTransaction| {
            let run = runs.fetch_add(1, Ordering::SeqCst);
            let chunks = chunks(run);
            async move {
                let mut tx = tx.begin().await.unwrap();
                sqlx::query("UPDATE accounts SET balance = balance - 1 WHERE id = 1")
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                drop(tx);
                Response::builder()
                    .status(StatusCode::CREATED)
                    .header("x-run", run.to_string())
                    .body(Body::new(Drip::new(chunks)))
                    .unwrap()
            }
        }),
    )
}

/// A streamed body: `left` chunks of 1 KiB (each a different letter), each after a pause.
struct Drip {
    left: usize,
    sent: u8,
    pause: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Drip {
    fn new(chunks: usize) -> Self {
        Self {
            left: chunks,
            sent: 0,
            pause: Box::pin(tokio::time::sleep(Duration::from_millis(2))),
        }
    }
}

impl http_body::Body for Drip {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        std::task::ready!(self.pause.as_mut().poll(cx));
        let next = tokio::time::Instant::now() + Duration::from_millis(2);
        self.pause.as_mut().reset(next);
        self.left -= 1;
        let letter = b'a' + self.sent % 26;
        self.sent = self.sent.wrapping_add(1);
        let chunk = bytes::Bytes::from(vec![letter; 1024]);
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(chunk))))
    }
}

/// The whole response: status, headers and body bytes.
async fn whole(
    app: &Router,
    request: Request<Body>,
) -> (StatusCode, axum::http::HeaderMap, bytes::Bytes) {
    let response = tokio::time::timeout(Duration::from_secs(30), app.clone().oneshot(request))
        .await
        .expect("answered in time")
        .unwrap();
    let (head, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (head.status, head.headers, body)
}

async fn records(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM idempotency_records")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_under_the_limit_commits_once_and_is_replayed_byte_for_byte() {
    let pool = pool_at(&database("tx_stream").await);
    let runs = Arc::new(AtomicUsize::new(0));
    let app = streaming_routes(&runs, |_| 40).layer(
        IdempotencyLayer::new(PostgresStore::new(pool.clone()).in_handler_transaction())
            .with_response_body_limit(64 * 1024),
    );
    let first = whole(&app, transfer("t-stream", 1)).await;
    assert_eq!(first.0, StatusCode::CREATED, "{first:?}");
    assert_eq!(first.2.len(), 40 * 1024, "the whole body, after the commit");
    assert_eq!(&first.2[1024..1027], b"bbb");
    assert_eq!(balances(&pool).await, (999, 0, 0), "the debit committed");
    let stored: Option<Vec<u8>> = sqlx::query_scalar("SELECT record FROM idempotency_records")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(stored.is_some(), "the record committed with the debit");
    let retry = whole(&app, transfer("t-stream", 1)).await;
    assert_eq!(retry.0, StatusCode::CREATED);
    assert_eq!(
        retry.1.get("idempotent-replayed").map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    assert_eq!(retry.1.get("x-run"), first.1.get("x-run"));
    assert_eq!(retry.2, first.2, "replayed byte for byte");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
    assert_eq!(balances(&pool).await, (999, 0, 0), "debited once");
}

/// Asserts `reply` is the 409 problem of a key whose response was not kept.
fn assert_not_replayable(reply: &(StatusCode, axum::http::HeaderMap, bytes::Bytes)) {
    assert_eq!(reply.0, StatusCode::CONFLICT, "{reply:?}");
    assert!(
        String::from_utf8_lossy(&reply.2).contains("#variant.NotReplayable"),
        "the not-replayable problem: {reply:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_over_the_limit_commits_with_a_not_replayable_record_and_is_delivered() {
    let pool = pool_at(&database("tx_stream_over").await);
    let runs = Arc::new(AtomicUsize::new(0));
    // 20 KiB streamed past a 16 KiB limit.
    let app = streaming_routes(&runs, |_| 20).layer(
        IdempotencyLayer::new(PostgresStore::new(pool.clone()).in_handler_transaction())
            .with_response_body_limit(16 * 1024),
    );
    let first = whole(&app, transfer("t-over", 1)).await;
    assert_eq!(first.0, StatusCode::CREATED, "{first:?}");
    assert_eq!(first.2.len(), 20 * 1024, "delivered whole, past the limit");
    assert_eq!(&first.2[19 * 1024..19 * 1024 + 3], b"ttt");
    assert_eq!(balances(&pool).await, (999, 0, 0), "the debit committed");
    let retry = whole(&app, transfer("t-over", 1)).await;
    assert_not_replayable(&retry);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
    assert_eq!(balances(&pool).await, (999, 0, 0), "debited once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_writing_outside_its_transaction_past_the_limit_spends_the_key() {
    let pool = pool_at(&database("tx_stream_pool").await);
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&runs);
    let debits = pool.clone();
    // Never begins its transaction: debits through the pool, then streams 20 KiB.
    let routes = Router::new().route(
        "/transfers",
        axum::routing::post(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            let debits = debits.clone();
            async move {
                sqlx::query("UPDATE accounts SET balance = balance - 1 WHERE id = 1")
                    .execute(&debits)
                    .await
                    .unwrap();
                Response::builder()
                    .status(StatusCode::CREATED)
                    .body(Body::new(Drip::new(20)))
                    .unwrap()
            }
        }),
    );
    let app = routes.layer(
        IdempotencyLayer::new(PostgresStore::new(pool.clone()).in_handler_transaction())
            .with_response_body_limit(16 * 1024),
    );
    let first = whole(&app, transfer("t-pool", 1)).await;
    assert_eq!(first.0, StatusCode::CREATED, "{first:?}");
    assert_eq!(first.2.len(), 20 * 1024);
    let retry = whole(&app, transfer("t-pool", 1)).await;
    assert_not_replayable(&retry);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
    assert_eq!(balances(&pool).await, (999, 0, 0), "debited once");
}

/// A body that sends one chunk after a pause, then never ends.
struct Stall(Drip);

impl http_body::Body for Stall {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        match std::task::ready!(std::pin::Pin::new(&mut self.0).poll_frame(cx)) {
            Some(frame) => std::task::Poll::Ready(Some(frame)),
            None => std::task::Poll::Pending,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_ends_whose_client_left_is_dropped_in_time_and_the_key_spent() {
    stalled_body_whose_client_left("tx_stall", Duration::ZERO).await;
}

/// The client leaves while the handler still runs (before its stalled body is returned): the
/// response is dropped as it is settled, so the capture's bound applies all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_ends_whose_client_left_during_the_handler_is_dropped_in_time() {
    stalled_body_whose_client_left("tx_stall_late", Duration::from_millis(900)).await;
}

/// A handler that debits, waits `delay`, then answers a body that never ends; its client gives
/// up after 500 ms. The key must be spent (the debit committed once) within the capture bound,
/// and no connection left idle in the transaction.
async fn stalled_body_whose_client_left(db: &str, delay: Duration) {
    let pool = pool_at(&database(db).await);
    let routes = Router::new().route(
        "/transfers",
        axum::routing::post(move |tx: HandlerTransaction| async move {
            let mut tx = tx.begin().await.unwrap();
            sqlx::query("UPDATE accounts SET balance = balance - 1 WHERE id = 1")
                .execute(&mut *tx)
                .await
                .unwrap();
            drop(tx);
            tokio::time::sleep(delay).await;
            Response::builder()
                .status(StatusCode::CREATED)
                .body(Body::new(Stall(Drip::new(1))))
                .unwrap()
        }),
    );
    let app = routes.layer(
        IdempotencyLayer::new(PostgresStore::new(pool.clone()).in_handler_transaction())
            .with_capture_after_disconnect(Duration::from_millis(300)),
    );
    // The client gives up: its response future is dropped unanswered.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(500),
        app.clone().oneshot(transfer("t-stall", 1)),
    )
    .await;
    assert!(gave_up.is_err(), "nothing answered before the body's end");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let retry = whole(&app, transfer("t-stall", 1)).await;
        if String::from_utf8_lossy(&retry.2).contains("#variant.NotReplayable") {
            assert_not_replayable(&retry);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still in flight 10 s after the client left: {retry:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        balances(&pool).await,
        (999, 0, 0),
        "the debit committed once"
    );
    let idle: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' AND datname = current_database()",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(idle, 0, "no connection left idle in the transaction");
}

/// A streamed body that fails after its first chunk (each after a pause).
struct Failing(Drip);

impl http_body::Body for Failing {
    type Data = bytes::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        match std::task::ready!(std::pin::Pin::new(&mut self.0).poll_frame(cx)) {
            Some(Ok(frame)) => std::task::Poll::Ready(Some(Ok(frame))),
            _ => std::task::Poll::Ready(Some(Err(std::io::Error::other("the body failed")))),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_that_fails_rolls_the_writes_back_and_frees_the_key() {
    let pool = pool_at(&database("tx_stream_fails").await);
    let routes = Router::new().route(
        "/transfers",
        axum::routing::post(|tx: HandlerTransaction| async move {
            let mut tx = tx.begin().await.unwrap();
            sqlx::query("UPDATE accounts SET balance = balance - 1 WHERE id = 1")
                .execute(&mut *tx)
                .await
                .unwrap();
            drop(tx);
            Response::builder()
                .status(StatusCode::CREATED)
                .body(Body::new(Failing(Drip::new(1))))
                .unwrap()
        }),
    );
    let app = app_with(&pool, PostgresStore::new(pool.clone()), routes);
    let failed = whole(&app, transfer("t-fails", 1)).await;
    assert_handler_failed(&failed);
    assert_eq!(balances(&pool).await, (1000, 0, 0), "the debit rolled back");
    assert_eq!(records(&pool).await, 0, "the key is free");
}

/// Asserts `reply` is the 500 problem of a handler that failed (nothing of its response
/// sent).
fn assert_handler_failed(reply: &(StatusCode, axum::http::HeaderMap, bytes::Bytes)) {
    assert_eq!(reply.0, StatusCode::INTERNAL_SERVER_ERROR, "{reply:?}");
    assert_eq!(
        reply.1.get("content-type").map(|v| v.as_bytes()),
        Some(&b"application/problem+json"[..]),
        "{reply:?}"
    );
    assert!(
        String::from_utf8_lossy(&reply.2).contains("#variant.HandlerFailed"),
        "{reply:?}"
    );
}

/// A streamed body that panics after its first chunk (each after a pause).
struct Panicking(Drip);

impl http_body::Body for Panicking {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        match std::task::ready!(std::pin::Pin::new(&mut self.0).poll_frame(cx)) {
            Some(frame) => std::task::Poll::Ready(Some(frame)),
            None => panic!("expected in this test: the body panicked"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_that_panics_answers_500_rolls_back_and_the_retry_runs() {
    let pool = pool_at(&database("tx_stream_panics").await);
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&runs);
    let routes = Router::new().route(
        "/transfers",
        axum::routing::post(move |tx: HandlerTransaction| {
            let run = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut tx = tx.begin().await.unwrap();
                sqlx::query("UPDATE accounts SET balance = balance - 1 WHERE id = 1")
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                drop(tx);
                let body = if run == 0 {
                    Body::new(Panicking(Drip::new(2)))
                } else {
                    Body::new(Drip::new(2))
                };
                Response::builder()
                    .status(StatusCode::CREATED)
                    .body(body)
                    .unwrap()
            }
        }),
    );
    let app = app_with(&pool, PostgresStore::new(pool.clone()), routes);
    let panicked = whole(&app, transfer("t-panics", 1)).await;
    assert_handler_failed(&panicked);
    assert_eq!(balances(&pool).await, (1000, 0, 0), "the debit rolled back");
    assert_eq!(records(&pool).await, 0, "the key is free");
    let retry = whole(&app, transfer("t-panics", 1)).await;
    assert_eq!(retry.0, StatusCode::CREATED, "the retry runs: {retry:?}");
    assert_eq!(retry.2.len(), 2 * 1024);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(balances(&pool).await, (999, 0, 0), "debited once");
}

/// A body fed by a task: the frames sent into it, at the task's pace.
struct Fed(tokio::sync::mpsc::Receiver<Result<bytes::Bytes, std::io::Error>>);

impl http_body::Body for Fed {
    type Data = bytes::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|next| next.map(|next| next.map(http_body::Frame::data)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_fails_while_it_holds_the_transaction_rolls_back_without_waiting_forever() {
    let pool = pool_at(&database("tx_stream_holds").await);
    let routes = Router::new().route(
        "/transfers",
        axum::routing::post(|tx: HandlerTransaction| async move {
            let (frames, rx) = tokio::sync::mpsc::channel(4);
            // The body's producer holds the transaction until the body is dropped.
            tokio::spawn(async move {
                let mut guard = tx.begin().await.unwrap();
                sqlx::query("UPDATE accounts SET balance = balance - 1 WHERE id = 1")
                    .execute(&mut *guard)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = frames.send(Ok(bytes::Bytes::from_static(b"partial"))).await;
                let _ = frames
                    .send(Err(std::io::Error::other("the body failed")))
                    .await;
                frames.closed().await;
                drop(guard);
            });
            Response::builder()
                .status(StatusCode::CREATED)
                .body(Body::new(Fed(rx)))
                .unwrap()
        }),
    );
    let app = routes.layer(IdempotencyLayer::new(
        PostgresStore::new(pool.clone())
            .in_handler_transaction()
            .with_response_timeout(Duration::from_secs(20)),
    ));
    let started = Instant::now();
    let failed = tokio::time::timeout(Duration::from_secs(10), whole(&app, transfer("t-holds", 1)))
        .await
        .expect("answered without waiting for the transaction's guard");
    assert_handler_failed(&failed);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(balances(&pool).await, (1000, 0, 0), "the debit rolled back");
    assert_eq!(records(&pool).await, 0, "the key is free");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_held_past_the_limit_is_waited_for_a_bounded_time_then_rolled_back() {
    let pool = pool_at(&database("tx_stream_held_over").await);
    let routes = Router::new().route(
        "/transfers",
        axum::routing::post(|tx: HandlerTransaction| async move {
            let (frames, rx) = tokio::sync::mpsc::channel(4);
            // The body's producer holds the transaction while it streams 20 KiB, and until
            // the body is dropped.
            tokio::spawn(async move {
                let mut guard = tx.begin().await.unwrap();
                sqlx::query("UPDATE accounts SET balance = balance - 1 WHERE id = 1")
                    .execute(&mut *guard)
                    .await
                    .unwrap();
                for _ in 0..20 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    let chunk = bytes::Bytes::from(vec![b'x'; 1024]);
                    if frames.send(Ok(chunk)).await.is_err() {
                        break;
                    }
                }
                frames.closed().await;
                drop(guard);
            });
            Response::builder()
                .status(StatusCode::CREATED)
                .body(Body::new(Fed(rx)))
                .unwrap()
        }),
    );
    let app = routes.layer(
        IdempotencyLayer::new(
            PostgresStore::new(pool.clone())
                .in_handler_transaction()
                .with_response_timeout(Duration::from_secs(1)),
        )
        .with_response_body_limit(16 * 1024),
    );
    let refused = tokio::time::timeout(Duration::from_secs(10), whole(&app, transfer("t-held", 1)))
        .await
        .expect("answered once the bounded wait ran out");
    assert_eq!(refused.0, StatusCode::SERVICE_UNAVAILABLE, "{refused:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while balances(&pool).await != (1000, 0, 0) {
        assert!(Instant::now() < deadline, "the debit was not rolled back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(records(&pool).await, 0, "the key is free");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_response_is_answered_only_once_its_record_and_writes_committed() {
    let pool = pool_at(&database("tx_stream_after").await);
    let runs = Arc::new(AtomicUsize::new(0));
    let app = streaming_routes(&runs, |_| 40).layer(IdempotencyLayer::new(
        PostgresStore::new(pool.clone()).in_handler_transaction(),
    ));
    let response = tokio::time::timeout(
        Duration::from_secs(30),
        app.clone().oneshot(transfer("t-after", 1)),
    )
    .await
    .expect("answered in time")
    .unwrap();
    // The head is here, the body not read yet: both are committed already.
    assert_eq!(balances(&pool).await, (999, 0, 0), "the debit committed");
    let stored: Option<Vec<u8>> = sqlx::query_scalar("SELECT record FROM idempotency_records")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(stored.is_some(), "the record committed before the answer");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), 40 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_same_key_transfers_over_two_instances_move_the_money_once() {
    let url = database("tx_concurrent").await;
    let pool = pool_at(&url);
    let a = example::app(PostgresStore::new(pool_at(&url)), pool.clone());
    let b = example::app(PostgresStore::new(pool_at(&url)), pool.clone());
    let handles: Vec<_> = (0..200)
        .map(|i| {
            let app = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { call(&app, transfer("t-same", 10)).await })
        })
        .collect();
    let mut replies = Vec::new();
    for handle in handles {
        replies.push(handle.await.unwrap());
    }
    assert_eq!(balances(&pool).await, (990, 10, 1), "moved once");
    let executed = replies
        .iter()
        .filter(|r| r.0 == StatusCode::CREATED && !r.1)
        .count();
    assert_eq!(executed, 1, "one execution");
    for reply in &replies {
        assert_eq!(
            reply.0,
            StatusCode::CREATED,
            "every duplicate got the response: {reply:?}"
        );
        assert_eq!(reply.2, replies[0].2);
    }
}

/// The child process: serves the example (with a pause between the handler and the commit
/// when asked) on `CHILD_PORT` against `CHILD_DATABASE_URL`, prints `listening`, and
/// `written` once a paused transfer's writes are done. Run only by the crash test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run as a child process by the crash test"]
async fn child_serves_the_example() {
    let (Ok(url), Ok(port)) = (
        std::env::var("CHILD_DATABASE_URL"),
        std::env::var("CHILD_PORT"),
    ) else {
        return;
    };
    let pool = pool_at(&url);
    let routes = example::routes(pool.clone()).layer(middleware::from_fn(
        |request: Request<Body>, next: Next| async move {
            let pause = request.headers().contains_key("x-pause-before-commit");
            let response: Response = next.run(request).await;
            if pause {
                println!("written");
                tokio::time::sleep(Duration::from_secs(600)).await;
            }
            response
        },
    ));
    let store = PostgresStore::new(pool.clone());
    let app = routes.layer(
        IdempotencyLayer::new(store.in_handler_transaction())
            .with_lease(Duration::from_millis(600)),
    );
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    println!("listening");
    axum::serve(listener, app).await.unwrap();
}

struct Child {
    process: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Child {
    fn start(url: &str, port: u16) -> Self {
        let mut process = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_serves_the_example",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("CHILD_DATABASE_URL", url)
            .env("CHILD_PORT", port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = process.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let child = Self { process, lines };
        child.expect("listening");
        child
    }

    fn expect(&self, line: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                // libtest prints its own `test … ... ` in front of the first line.
                Ok(got) if got.trim().ends_with(line) => return,
                Ok(_) => {}
                Err(_) => panic!("the child never printed {line:?}"),
            }
        }
    }

    fn kill(mut self) {
        // SIGKILL: nothing is cleaned up, the connections just close.
        self.process.kill().unwrap();
        self.process.wait().unwrap();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// Sends one transfer over HTTP/1.1 to the child; the status and body, or `None` if the
/// connection was cut.
async fn http_transfer(port: u16, key: &str, pause: bool) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = r#"{"from":1,"to":2,"amount":100}"#;
    let pause = if pause {
        "x-pause-before-commit: 1\r\n"
    } else {
        ""
    };
    let request = format!(
        "POST /transfers HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Idempotency-Key: {key}\r\ncontent-type: application/json\r\n{pause}\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_killed_between_the_writes_and_the_commit_moves_the_money_once_on_retry() {
    let url = database("tx_crash").await;
    let pool = pool_at(&url);
    let port = common::postgres_server::free_port();
    let child = Child::start(&url, port);
    let cut = tokio::spawn(async move { http_transfer(port, "t-crash", true).await });
    let child = tokio::task::spawn_blocking(move || {
        child.expect("written");
        child
    })
    .await
    .unwrap();
    tokio::task::spawn_blocking(move || child.kill())
        .await
        .unwrap();
    assert_eq!(cut.await.unwrap(), None, "the client's connection was cut");
    // The writes died with the process's connection.
    let deadline = Instant::now() + Duration::from_secs(10);
    while balances(&pool).await != (1000, 0, 0) {
        assert!(
            Instant::now() < deadline,
            "the killed transaction was rolled back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let child = Child::start(&url, port);
    // The retry: in flight until the dead claim's lease ends, then it runs.
    let deadline = Instant::now() + Duration::from_secs(20);
    let executed = loop {
        let (status, text) = http_transfer(port, "t-crash", false)
            .await
            .expect("an answer");
        if status == 201 {
            break text;
        }
        assert_eq!(status, 409, "in flight until the lease ends: {text}");
        assert!(Instant::now() < deadline, "the retry never ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        !executed
            .to_ascii_lowercase()
            .contains("idempotent-replayed")
    );
    assert_eq!(balances(&pool).await, (900, 100, 1), "moved exactly once");

    // Killed after the commit: the retry is replayed.
    let done = http_transfer(port, "t-after", false)
        .await
        .expect("an answer");
    assert_eq!(done.0, 201);
    tokio::task::spawn_blocking(move || child.kill())
        .await
        .unwrap();
    let child = Child::start(&url, port);
    let retry = http_transfer(port, "t-after", false)
        .await
        .expect("an answer");
    assert_eq!(retry.0, 201);
    assert!(
        retry
            .1
            .to_ascii_lowercase()
            .contains("idempotent-replayed: true"),
        "{}",
        retry.1
    );
    assert_eq!(balances(&pool).await, (800, 200, 2));
    drop(child);
}
