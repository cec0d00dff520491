//! `RedisStore` when Redis goes away and comes back: fail-closed 503s with nothing run
//! unprotected, recovery of the same instance without restart, fail-open, waiters that end.
#![cfg(feature = "redis")]

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use http::StatusCode;
use tower_idempotency::{FailMode, IdempotencyLayer, ProblemKind, RedisStore};

use common::{
    redis_server::RedisServer,
    service::{Gate, Handler, Reply, Svc, eventually, keyed_post, send, serve, within},
};

/// Commands fail this fast once Redis is gone.
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(300);

async fn connect(server: &RedisServer) -> RedisStore {
    RedisStore::connect(&server.url())
        .await
        .expect("connect to the test server")
        .with_response_timeout(RESPONSE_TIMEOUT)
}

/// Stops or restarts `server` off the async workers (it waits for the process).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("the blocking step")
}

/// Ports the tests restart servers on are outside the kernel's ephemeral range: an outgoing
/// connection's source port can never take one while its server is down. (Binding port 0,
/// as `free_port` did, picks from inside the range.)
#[test]
fn test_servers_get_ports_outside_the_ephemeral_range_never_twice() {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .expect("Linux's ephemeral port range");
    let bounds: Vec<u16> = range
        .split_whitespace()
        .map(|bound| bound.parse().expect("a port"))
        .collect();
    let (low, high) = (bounds[0], bounds[1]);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..200 {
        let port = common::redis_server::free_port();
        assert!(
            !(low..=high).contains(&port),
            "{port} is inside the ephemeral range {low}-{high}"
        );
        assert!(seen.insert(port), "{port} handed out twice");
    }
}

/// Sends requests with fresh keys, `concurrency` at a time, until `stop` is set (at most
/// `limit` in all), and returns every reply with how long it took.
async fn load(
    instance: &Svc<RedisStore>,
    concurrency: usize,
    limit: usize,
    stop: Arc<AtomicBool>,
) -> Vec<(Reply, Duration)> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (instance, stop, next) = (instance.clone(), Arc::clone(&stop), Arc::clone(&next));
            tokio::spawn(async move {
                let mut replies = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    if n >= limit {
                        break;
                    }
                    let started = Instant::now();
                    let request = keyed_post("/charges", &format!("load-{n}"), "{}");
                    let reply = send(&instance, request).await;
                    replies.push((reply, started.elapsed()));
                }
                replies
            })
        })
        .collect();
    let mut replies = Vec::new();
    for worker in workers {
        replies.extend(within(worker).await.expect("a load worker"));
    }
    replies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_mid_load_fails_closed_and_the_same_instance_recovers_when_it_returns() {
    let mut server = RedisServer::start();
    let handler = Handler::counting();
    let instance = serve(&IdempotencyLayer::new(connect(&server).await), &handler);

    let stop = Arc::new(AtomicBool::new(false));
    let running = tokio::spawn({
        let (instance, stop) = (instance.clone(), Arc::clone(&stop));
        async move { load(&instance, 8, 5_000, stop).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let port = server.port();
    server = blocking(move || {
        server.stop();
        server
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    stop.store(true, Ordering::SeqCst);
    let replies = within(running).await.expect("the load");

    let executed = replies
        .iter()
        .filter(|(reply, _)| reply.status == StatusCode::CREATED)
        .count();
    let refused: Vec<&Reply> = replies
        .iter()
        .map(|(reply, _)| reply)
        .filter(|reply| reply.status != StatusCode::CREATED)
        .collect();
    assert!(executed > 0, "requests succeeded before the stop");
    assert!(
        !refused.is_empty(),
        "requests were refused while Redis was down"
    );
    for reply in &refused {
        reply.assert_problem(
            ProblemKind::StoreUnavailable,
            StatusCode::SERVICE_UNAVAILABLE,
        );
        reply.assert_retry_after();
    }
    assert_eq!(
        handler.calls(),
        executed,
        "the handler ran only for requests that got their own response: nothing ran unprotected"
    );
    let slowest = replies
        .iter()
        .map(|(_, took)| *took)
        .max()
        .unwrap_or_default();
    assert!(
        slowest < Duration::from_secs(3),
        "no request hung: the slowest took {slowest:?}"
    );

    server = blocking(move || {
        server.restart();
        server
    })
    .await;
    assert_eq!(server.port(), port);
    let before = handler.calls();
    let deadline = Instant::now() + Duration::from_secs(15);
    let recovered = loop {
        let reply = send(&instance, keyed_post("/charges", "after-restart", "{}")).await;
        if reply.status == StatusCode::CREATED {
            break reply;
        }
        reply.assert_problem(
            ProblemKind::StoreUnavailable,
            StatusCode::SERVICE_UNAVAILABLE,
        );
        assert!(Instant::now() < deadline, "the instance did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let retry = send(&instance, keyed_post("/charges", "after-restart", "{}")).await;
    assert!(retry.replayed(), "the restarted Redis keeps records again");
    assert_eq!(retry.body, recovered.body);
    assert_eq!(handler.calls(), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_on_a_claim_gets_a_problem_not_a_hang_when_redis_dies() {
    let mut server = RedisServer::start();
    let gate = Gate::new();
    let handler = Handler::gated(&gate);
    let instance = serve(&IdempotencyLayer::new(connect(&server).await), &handler);
    let duplicate_instance = serve(&IdempotencyLayer::new(connect(&server).await), &handler);

    let first = tokio::spawn(send(&instance, keyed_post("/charges", "k", "{}")));
    eventually("the first request runs", || handler.calls() == 1).await;
    let waiting = tokio::spawn(send(&duplicate_instance, keyed_post("/charges", "k", "{}")));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "the duplicate waits");

    let started = Instant::now();
    server = blocking(move || {
        server.stop();
        server
    })
    .await;
    let duplicate = within(waiting).await.expect("the duplicate");
    duplicate.assert_problem(
        ProblemKind::StoreUnavailable,
        StatusCode::SERVICE_UNAVAILABLE,
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the waiter noticed within its poll interval, after {:?}",
        started.elapsed()
    );

    gate.open();
    let first = within(first).await.expect("the first request");
    assert_eq!(
        first.status,
        StatusCode::CREATED,
        "the running request still gets its response"
    );
    assert_eq!(handler.calls(), 1);
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_open_runs_the_handler_while_redis_is_down_and_counts_it() {
    #[cfg(feature = "metrics")]
    let snapshotter = {
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("the only recorder in this test binary");
        snapshotter
    };

    let mut server = RedisServer::start();
    let handler = Handler::counting();
    let instance = serve(
        &IdempotencyLayer::new(connect(&server).await).with_fail_mode(FailMode::Open),
        &handler,
    );
    let protected = send(&instance, keyed_post("/charges", "up", "{}")).await;
    assert_eq!(protected.status, StatusCode::CREATED);

    server = blocking(move || {
        server.stop();
        server
    })
    .await;
    for i in 0..3 {
        let reply = send(
            &instance,
            keyed_post("/charges", &format!("down-{i}"), "{}"),
        )
        .await;
        assert_eq!(reply.status, StatusCode::CREATED);
        assert!(!reply.replayed());
    }
    // A retry is not protected either while the store is down: it runs again.
    let retry = send(&instance, keyed_post("/charges", "down-0", "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(handler.calls(), 5, "one protected run, four unprotected");

    #[cfg(feature = "metrics")]
    {
        let fail_open: u64 = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter_map(|(key, _, _, value)| {
                let key = key.key();
                let counts = key.name() == "idempotency_requests_total"
                    && key
                        .labels()
                        .any(|l| l.key() == "outcome" && l.value() == "fail_open");
                match value {
                    metrics_util::debugging::DebugValue::Counter(n) if counts => Some(n),
                    _ => None,
                }
            })
            .sum();
        assert_eq!(fail_open, 4, "every unprotected run is counted");
    }
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_cut_off_by_a_redis_restart_lands_when_redis_is_back_within_the_lease() {
    // Acknowledged writes survive the restart, as they must for a store of idempotency keys.
    let mut server = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let gate = Gate::new();
    let handler = Handler::gated(&gate);
    let layer = IdempotencyLayer::new(connect(&server).await).with_lease(Duration::from_secs(30));
    let instance = serve(&layer, &handler);

    let first = tokio::spawn(send(&instance, keyed_post("/charges", "k", "{}")));
    eventually("the handler runs", || handler.calls() == 1).await;
    server = blocking(move || {
        server.stop();
        server
    })
    .await;
    // The handler finishes while Redis is down: the record cannot be stored yet.
    gate.open();
    let first = within(first).await.expect("the first request");
    assert_eq!(
        first.status,
        StatusCode::CREATED,
        "the client gets its response"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    server = blocking(move || {
        server.restart();
        server
    })
    .await;
    // A retry waits for the claim, which the background completion now ends with the record.
    let retry = send(&instance, keyed_post("/charges", "k", "{}")).await;
    assert!(retry.replayed(), "got {} {:?}", retry.status, retry.problem);
    assert_eq!(retry.body, first.body);
    assert_eq!(handler.calls(), 1, "the handler ran once");
    drop(server);
}
