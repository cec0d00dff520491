//! How soon a held duplicate gets its replay: the time from the first request's response
//! being complete (its record stored) to each waiting duplicate's replay being sent, under a
//! 64-way burst (one first request, 63 duplicates held while it runs).
//!
//! Two set-ups: in process (`MemoryStore`, both requests through one layer) and, with the
//! `redis` feature, across two instances (the first request through one `RedisStore`, the
//! duplicates through another with its own connections, sharing a `redis-server` this
//! benchmark starts on a free loopback port and stops at the end): there the wake-up crosses
//! Redis pub/sub.
//!
//! ```sh
//! cargo bench --bench release_latency                    # in process
//! cargo bench --bench release_latency --features redis   # and across two instances
//! ROUNDS=500 cargo bench --bench release_latency --features redis
//! ```
//!
//! It prints the distribution over every duplicate of every round (p50, p90, p99, max).
//! Latencies, not throughput: each round waits until all duplicates are held before it lets
//! the first request finish.

#[cfg(feature = "redis")]
#[path = "../tests/common/redis_server.rs"]
#[allow(dead_code)]
mod redis_server;

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::{sync::watch, task::JoinSet, time::Instant};
use tower::{Layer, ServiceExt, service_fn};
use tower_idempotency::{
    IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, IdempotencyLayer, IdempotencyStore, MemoryStore,
    RequestBody,
};

/// Requests per round: the first and its duplicates.
const BURST: usize = 64;
/// How long a round lets its duplicates reach the wait before the first request finishes.
const SETTLE: Duration = Duration::from_millis(30);

fn main() {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|rounds| rounds.parse().ok())
        .unwrap_or(200);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    println!(
        "held-duplicate release latency, {rounds} rounds of 1 + {} duplicates",
        BURST - 1
    );
    println!(
        "{:<44} {:>9} {:>9} {:>9} {:>9}",
        "set-up", "p50", "p90", "p99", "max"
    );
    let memory = MemoryStore::default();
    let latencies = runtime.block_on(measure(memory.clone(), memory, rounds));
    report("in process (MemoryStore)", latencies);

    #[cfg(feature = "redis")]
    {
        let server = redis_server::RedisServer::start();
        let connect = || async {
            tower_idempotency::RedisStore::connect(&server.url())
                .await
                .expect("connect to the benchmark's redis-server")
        };
        let latencies = runtime.block_on(async {
            let (first, second) = (connect().await, connect().await);
            measure(first, second, rounds).await
        });
        report("across two instances (RedisStore, pub/sub)", latencies);
    }
}

/// Runs `rounds` bursts: the first request through a layer over `first`, its duplicates
/// through one over `second`. Returns every duplicate's latency.
async fn measure<St: IdempotencyStore>(first: St, second: St, rounds: usize) -> Vec<Duration> {
    let nonce = std::process::id();
    let mut latencies = Vec::with_capacity(rounds * (BURST - 1));
    for round in 0..rounds {
        let (gate, _) = watch::channel(false);
        let gate = Arc::new(gate);
        let calls = Arc::new(AtomicUsize::new(0));
        let handler = {
            let (gate, calls) = (Arc::clone(&gate), Arc::clone(&calls));
            service_fn(move |_request: Request<RequestBody<Full<Bytes>>>| {
                calls.fetch_add(1, Ordering::SeqCst);
                let mut open = gate.subscribe();
                async move {
                    let _ = open.wait_for(|open| *open).await;
                    let body = Full::new(Bytes::from_static(br#"{"id":"ch_1","amount":1000}"#));
                    Ok::<_, Infallible>(Response::new(body))
                }
            })
        };
        let owner = IdempotencyLayer::new(first.clone()).layer(handler.clone());
        let other = IdempotencyLayer::new(second.clone()).layer(handler);
        let key = format!("release-{nonce}-{round}");
        let request = || {
            Request::post("/charges")
                .header(IDEMPOTENCY_KEY, key.as_str())
                .body(Full::new(Bytes::from_static(br#"{"amount":1000}"#)))
                .expect("a valid request")
        };

        let first_done = tokio::spawn({
            let request = request();
            async move {
                let response = owner.oneshot(request).await.expect("infallible");
                let _ = response.into_body().collect().await;
                Instant::now()
            }
        });
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut duplicates = JoinSet::new();
        for _ in 1..BURST {
            let (other, request) = (other.clone(), request());
            duplicates.spawn(async move {
                let response = other.oneshot(request).await.expect("infallible");
                let replayed = response.headers().contains_key(IDEMPOTENT_REPLAYED);
                let _ = response.into_body().collect().await;
                (Instant::now(), replayed)
            });
        }
        tokio::time::sleep(SETTLE).await;
        gate.send_replace(true);
        let released = first_done.await.expect("the first request");
        for (sent, replayed) in duplicates.join_all().await {
            assert!(replayed, "every duplicate is a replay");
            latencies.push(sent.saturating_duration_since(released));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one execution per round");
    }
    latencies
}

fn report(setup: &str, mut latencies: Vec<Duration>) {
    latencies.sort_unstable();
    let at = |q: f64| {
        let index = ((latencies.len() as f64 - 1.0) * q).round() as usize;
        latencies.get(index).copied().unwrap_or_default()
    };
    let ms = |d: Duration| format!("{:.3} ms", d.as_secs_f64() * 1000.0);
    println!(
        "{setup:<44} {:>9} {:>9} {:>9} {:>9}",
        ms(at(0.5)),
        ms(at(0.9)),
        ms(at(0.99)),
        ms(at(1.0))
    );
}
