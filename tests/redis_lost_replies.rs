//! `RedisStore` behind the layer when a claim's reply is lost: the claim (or take-over) landed
//! in Redis, its answer never came back, and Redis was unreachable for a while after. The
//! request is refused (503), and the claim it may have left is released, fenced by its token,
//! in the background, retried until Redis answers: the key is free again long before the
//! lease ends, and a newer owner's claim is never freed.
//!
//! The reply is lost on a [`LossyLink`] between the store and a real `redis-server`: every
//! command reaches the server, the answer to one of them does not come back, then the link is
//! down (as Redis is, after a SIGKILL right behind its append-only file) until `up`.
#![cfg(feature = "redis")]

mod common;

use std::time::{Duration, Instant};

use http::StatusCode;
use tower_idempotency::{
    Claim, Fingerprint, IdempotencyLayer, IdempotencyStore, ProblemKind, Recovery, RedisStore,
    StorageKey,
};

use common::{
    lossy_link::LossyLink,
    redis_server::{RedisServer, command_counts},
    service::{Gate, Handler, eventually, keyed_post, send, serve, within},
};

/// Commands fail this fast once Redis is gone.
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(300);

/// The lease of the claims under test: a key left claimed stays blocked this long.
const LEASE: Duration = Duration::from_secs(20);

/// How long the link stays down after the lost reply: a release sent meanwhile fails.
const DOWN: Duration = Duration::from_millis(1_200);

/// Within this after the link is back, the lost claim must be released: a quarter of the lease
/// (the release's retries back off to one a second, and the client reconnects with a backoff
/// of its own).
const RELEASED_WITHIN: Duration = Duration::from_secs(5);

async fn connect(url: &str) -> RedisStore {
    RedisStore::connect(url)
        .await
        .expect("connect to the test server")
        .with_response_timeout(RESPONSE_TIMEOUT)
}

/// The keys the server holds.
fn keys(server: &RedisServer) -> Vec<String> {
    let mut keys: Vec<String> = server
        .cli(&["--no-raw", "KEYS", "*"])
        .lines()
        .filter_map(|line| {
            let quoted = line.split_once(") ").map_or(line, |(_, key)| key);
            let key = quoted.trim().trim_matches('"');
            (!key.is_empty() && key != "(empty array)").then(|| key.to_owned())
        })
        .collect();
    keys.sort();
    keys
}

/// Waits (bounded by `within`) until the server holds exactly `expected`.
async fn until_keys(server: &RedisServer, expected: &[String], within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if keys(server) == expected {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "the server still holds {:?} after {within:?}, expected {expected:?}",
            keys(server)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The scripts the server ran (`EVALSHA`, and `EVAL` when it did not know one yet).
fn scripts_run(server: &RedisServer) -> u64 {
    let counts = command_counts(server.port());
    ["evalsha", "eval"]
        .iter()
        .filter_map(|name| counts.get(*name))
        .sum()
}

/// Starts `store`'s subscriber for notifications (a claim that finds a key in flight starts
/// it) and waits until Redis counts it: what it says on connecting is not the reply a test
/// means to lose.
async fn subscribed(server: &RedisServer, store: &RedisStore) {
    let key = StorageKey::from_bytes([0x5a; 32]);
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    let Ok(Claim::Acquired(token)) = store.claim(&key, &fingerprint, LEASE).await else {
        panic!("a fresh key is free");
    };
    let found = store.claim(&key, &fingerprint, LEASE).await;
    assert!(matches!(found, Ok(Claim::InFlight { .. })), "{found:?}");
    let started = Instant::now();
    while !server
        .cli(&["PUBSUB", "NUMSUB", "idempotency:notifications"])
        .lines()
        .any(|line| line.trim() == "1")
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the store's subscriber never subscribed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    store
        .release(&key, token)
        .await
        .expect("the warm-up claim's release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_reply_is_lost_is_released_long_before_its_lease_ends() {
    let server = RedisServer::start();
    let link = LossyLink::to(server.port()).await;
    let handler = Handler::counting();
    let layer = IdempotencyLayer::new(connect(&link.redis_url()).await).with_lease(LEASE);
    let instance = serve(&layer, &handler);
    let warm = send(&instance, keyed_post("/charges", "warm", "{}")).await;
    assert_eq!(warm.status, StatusCode::CREATED);
    let record = keys(&server);
    assert_eq!(record.len(), 1, "the warm-up's record");

    link.lose_next_reply();
    let started = Instant::now();
    let lost = send(&instance, keyed_post("/charges", "lost", "{}")).await;
    lost.assert_problem(
        ProblemKind::StoreUnavailable,
        StatusCode::SERVICE_UNAVAILABLE,
    );
    assert!(link.is_down(), "the claim's reply was the one lost");
    let held = keys(&server);
    assert_eq!(held.len(), 2, "the claim landed all the same: {held:?}");
    assert_eq!(handler.calls(), 1, "the refused request did not run");

    tokio::time::sleep(DOWN).await;
    link.up();
    let took = until_keys(&server, &record, RELEASED_WITHIN).await;
    eprintln!("released {took:?} after the link came back");
    assert!(
        started.elapsed() < LEASE / 2,
        "released {took:?} after the link came back, {:?} after the claim",
        started.elapsed()
    );

    let retry = send(&instance, keyed_post("/charges", "lost", "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{:?}", retry.problem);
    assert!(!retry.replayed());
    assert_eq!(handler.calls(), 2, "the retry ran, once");
    let again = send(&instance, keyed_post("/charges", "lost", "{}")).await;
    assert!(again.replayed());
    assert_eq!(handler.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_over_whose_reply_is_lost_is_released_long_before_its_lease_ends() {
    let server = RedisServer::start();
    // Instance A claims the key and runs; its claim is then made abandoned under it (as if
    // its lease had run out while it was cut off from Redis).
    let gate = Gate::new();
    let a_handler = Handler::gated(&gate);
    let a = serve(
        &IdempotencyLayer::new(connect(&server.url()).await).with_lease(LEASE),
        &a_handler,
    );
    let running = tokio::spawn(send(&a, keyed_post("/charges", "k", "{}")));
    eventually("A's handler runs", || a_handler.calls() == 1).await;
    let claimed = keys(&server);
    assert_eq!(claimed.len(), 1);
    // A marker's lease has ended once the key's time to live is down to the retention.
    let retention = Duration::from_secs(24 * 60 * 60).as_millis().to_string();
    server.cli(&["PEXPIRE", &claimed[0], &retention]);

    // Instance B finds it abandoned and takes it over; the take-over's reply is lost.
    let link = LossyLink::to(server.port()).await;
    let hook_link = std::sync::Arc::new(link);
    let b_store = connect(&hook_link.redis_url()).await;
    subscribed(&server, &b_store).await;
    let b_handler = Handler::counting();
    let b = serve(
        &IdempotencyLayer::new(b_store)
            .with_lease(LEASE)
            .with_outcome_unknown({
                let link = std::sync::Arc::clone(&hook_link);
                move |_: &http::request::Parts| {
                    // Decided right before the take-over is sent.
                    link.lose_next_reply();
                    Recovery::RunAgain
                }
            }),
        &b_handler,
    );
    let before = scripts_run(&server);
    let started = Instant::now();
    let lost = send(&b, keyed_post("/charges", "k", "{}")).await;
    lost.assert_problem(
        ProblemKind::StoreUnavailable,
        StatusCode::SERVICE_UNAVAILABLE,
    );
    assert!(
        hook_link.is_down(),
        "the take-over's reply was the one lost"
    );
    assert!(scripts_run(&server) > before, "the take-over reached Redis");
    assert_eq!(keys(&server), claimed, "B's claim holds the key");
    assert_eq!(b_handler.calls(), 0);

    tokio::time::sleep(DOWN).await;
    hook_link.up();
    let took = until_keys(&server, &[], RELEASED_WITHIN).await;
    eprintln!("released {took:?} after the link came back");
    assert!(
        started.elapsed() < LEASE / 2,
        "released {took:?} after the link came back"
    );

    // A finds its claim gone: the client still gets its response, which is not stored.
    gate.open();
    let a_reply = within(running).await.expect("A's request");
    assert_eq!(a_reply.status, StatusCode::CREATED);
    let retry = send(&b, keyed_post("/charges", "k", "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{:?}", retry.problem);
    assert_eq!(b_handler.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releasing_a_lost_claim_never_frees_a_newer_owners_claim() {
    let server = RedisServer::start();
    let link = LossyLink::to(server.port()).await;
    let lossy = serve(
        &IdempotencyLayer::new(connect(&link.redis_url()).await).with_lease(LEASE),
        &Handler::counting(),
    );
    link.lose_next_reply();
    let lost = send(&lossy, keyed_post("/charges", "k", "{}")).await;
    lost.assert_problem(
        ProblemKind::StoreUnavailable,
        StatusCode::SERVICE_UNAVAILABLE,
    );
    let claimed = keys(&server);
    assert_eq!(claimed.len(), 1, "the lost claim landed");

    // While the link is down, an operator removes the claim and another instance claims the
    // key and runs.
    server.cli(&["DEL", &claimed[0]]);
    let gate = Gate::new();
    let handler = Handler::gated(&gate);
    let newer = serve(
        &IdempotencyLayer::new(connect(&server.url()).await).with_lease(LEASE),
        &handler,
    );
    let running = tokio::spawn(send(&newer, keyed_post("/charges", "k", "{}")));
    eventually("the newer owner runs", || handler.calls() == 1).await;
    let marker = server.cli(&["GET", &claimed[0]]);

    // The lost claim's release goes out, and is refused: the key holds another claim.
    let before = scripts_run(&server);
    link.up();
    let deadline = Instant::now() + Duration::from_secs(5);
    while scripts_run(&server) == before {
        assert!(Instant::now() < deadline, "the release was never sent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        server.cli(&["GET", &claimed[0]]),
        marker,
        "the newer owner's claim is untouched"
    );

    gate.open();
    let first = within(running).await.expect("the newer owner's request");
    assert_eq!(first.status, StatusCode::CREATED);
    let retry = send(&lossy, keyed_post("/charges", "k", "{}")).await;
    assert!(retry.replayed(), "the newer owner's record is stored");
    assert_eq!(retry.body, first.body);
    assert_eq!(handler.calls(), 1);
}
