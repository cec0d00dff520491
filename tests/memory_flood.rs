//! A flood of 1 000 000 distinct keys through the layer into `MemoryStore::new(64 MiB)`: the
//! process's resident memory stays within a bound of the store's capacity, and the newest
//! keys still replay.
//!
//! Its own test binary, with this one test, so that the process's RSS is the store's and the
//! flood's alone. A million requests take ~15 s in a release build and ~2.5 min in a debug
//! one: the test runs in release (`cargo test --release --test memory_flood`, as
//! `scripts/test.sh` does) and is ignored in debug builds.

mod common;

use std::time::{Duration, Instant};

use http::{HeaderValue, header};
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

use common::service::{Handler, Reply, created, keyed_post, serve};

const KEYS: u64 = 1_000_000;
const CAPACITY: u64 = 64 * 1024 * 1024;
/// Keys that must replay after the flood: the newest ones (the store holds about 73 000
/// records of this response).
const NEWEST: u64 = 5_000;
/// The bound on the process's peak RSS, as a multiple of the capacity. Measured: 1.69× on
/// 2026-12-05, 1.51× on 2026-12-01 (docs/performance.md, Memory flood): the records, weighed to the capacity, plus what the
/// allocator spends around their many small allocations; the rest is headroom for other
/// allocators and machines.
const RSS_BOUND: f64 = 2.0;

/// A charge request of about 200 bytes, unique to `n`.
fn charge(n: u64) -> String {
    format!(
        r#"{{"amount":1000,"currency":"eur","customer":"cus_9s6XKzkNRiz8i3","description":"Two flat whites and a croissant","metadata":{{"order_id":"ord_{n:016x}","channel":"web"}},"capture":true}}"#
    )
}

/// The handler: a `201` JSON charge of about 300 bytes, numbered by its execution.
fn payments() -> Handler {
    Handler::with_counter(|n, _request| async move {
        let mut response = created(format!(
            r#"{{"id":"ch_{n:024x}","object":"charge","amount":1000,"currency":"eur","customer":"cus_9s6XKzkNRiz8i3","description":"Two flat whites and a croissant","status":"succeeded","captured":true,"created":{},"livemode":false,"metadata":{{"channel":"web"}}}}"#,
            1_795_487_475 + n
        ));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    })
}

fn key(n: u64) -> String {
    format!("flood-{n:07}")
}

/// `VmRSS` or `VmHWM` (peak RSS) of this process, in bytes, from `/proc/self/status`.
fn proc_status(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    kib * 1024
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[cfg_attr(
    debug_assertions,
    ignore = "a million requests: run in release (`cargo test --release --test memory_flood`)"
)]
#[tokio::test(flavor = "current_thread")]
async fn a_million_keys_keep_rss_within_a_bound_of_the_capacity_and_the_newest_replay() {
    let store = MemoryStore::new(CAPACITY);
    let handler = payments();
    let service = serve(&IdempotencyLayer::new(store.clone()), &handler);
    let baseline = proc_status("VmRSS");
    let started = Instant::now();
    let mut highest = baseline;
    for n in 0..KEYS {
        let request = keyed_post("/v1/charges", &key(n), &charge(n));
        let response = service.clone().oneshot(request).await.unwrap();
        let reply = Reply::read(response).await;
        assert_eq!(reply.status, 201, "key {n}: {reply:?}");
        assert!(!reply.replayed(), "key {n} is fresh");
        if n % 10_000 == 0 {
            highest = highest.max(proc_status("VmRSS"));
        }
    }
    let flood = started.elapsed();
    assert_eq!(handler.calls() as u64, KEYS);
    let peak = proc_status("VmHWM").max(highest);
    let (kept, evicted) = (store.record_count(), store.evictions());
    println!(
        "{KEYS} keys in {flood:.1?} ({:.1} µs each): {kept} records kept, {evicted} evicted; \
         RSS before {:.1} MiB, now {:.1} MiB, peak {:.1} MiB = {:.2}× the {:.0} MiB capacity \
         (growth {:.2}×)",
        flood.as_secs_f64() * 1e6 / KEYS as f64,
        mib(baseline),
        mib(proc_status("VmRSS")),
        mib(peak),
        peak as f64 / CAPACITY as f64,
        mib(CAPACITY),
        (peak - baseline) as f64 / CAPACITY as f64,
    );

    assert!(
        evicted >= KEYS - kept,
        "the store made room by evicting ({kept} kept, {evicted} evicted)"
    );
    assert!(
        kept >= 2 * NEWEST,
        "the store holds a fair share of its capacity ({kept} records)"
    );
    for n in KEYS - NEWEST..KEYS {
        let request = keyed_post("/v1/charges", &key(n), &charge(n));
        let response =
            tokio::time::timeout(Duration::from_secs(5), service.clone().oneshot(request))
                .await
                .expect("a replay is quick")
                .unwrap();
        let reply = Reply::read(response).await;
        assert!(
            reply.replayed(),
            "key {n}, among the newest, replays: {reply:?}"
        );
    }
    assert_eq!(handler.calls() as u64, KEYS, "no replay ran the handler");
    let bound = RSS_BOUND * CAPACITY as f64;
    assert!(
        (peak as f64) <= bound,
        "peak RSS {:.1} MiB is over {RSS_BOUND}× the {:.0} MiB capacity ({:.1} MiB)",
        mib(peak),
        mib(CAPACITY),
        bound / (1024.0 * 1024.0)
    );
}
