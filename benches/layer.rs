//! What the layer costs per request, beside the bare handler in the same run.
//!
//! One criterion group per case (pass-through `GET` and key-less `POST`, first execution,
//! replay, derived-key first execution, a 64-way same-key burst), each with the bare handler
//! (`bare`) and the layer over it on `memory` (`MemoryStore`) and, with the `redis` feature,
//! `redis` (`RedisStore` on a `redis-server` this benchmark starts on a free loopback port and
//! stops at the end) and `cached` (`CachedStore` over that `RedisStore`). The services are
//! driven in process with `oneshot` on a current-thread tokio runtime; response bodies are
//! read to the end. Requests are built outside the timed part.
//!
//! ```sh
//! cargo bench --bench layer                          # bare and MemoryStore
//! cargo bench --bench layer --features redis         # and RedisStore, CachedStore
//! cargo bench --bench layer -- replay                # one group (criterion filter)
//! cargo bench --bench layer -- --measurement-time 5  # longer, steadier runs
//! ```
//!
//! At the end it prints each case's median time per request and its ratio to `bare`, for the
//! results this run measured.

mod common;

use std::{
    fmt,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use criterion::{BatchSize, BenchmarkGroup, Criterion, Throughput, measurement::WallTime};
use http::{Request, Response};
use http_body::Body;
use tokio::runtime::Runtime;
use tower::Service;
use tower_idempotency::MemoryStore;

use common::{Case, ReqBody, Requests, bare, check, layered, run};

/// Each store's bench name; `bare` first.
const TARGETS: [&str; 4] = ["bare", "memory", "redis", "cached"];

/// The capacity of `CachedStore`'s cache in these benchmarks.
#[cfg(feature = "redis")]
const CACHE_BYTES: u64 = 64 * 1024 * 1024;

fn main() {
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
        .configure_from_args();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let started = SystemTime::now();

    #[cfg(feature = "redis")]
    let redis = common::redis_store(&runtime);

    for case in Case::ALL {
        let mut group = criterion.benchmark_group(case.name());
        group.throughput(Throughput::Elements(case.requests() as u64));
        bench(&mut group, &runtime, case, "bare", false, bare());
        let memory = layered(case, MemoryStore::default());
        bench(&mut group, &runtime, case, "memory", true, memory);
        #[cfg(feature = "redis")]
        if let Some((_, store)) = &redis {
            let cached = tower_idempotency::CachedStore::new(store.clone(), CACHE_BYTES);
            bench(
                &mut group,
                &runtime,
                case,
                "redis",
                true,
                layered(case, store.clone()),
            );
            bench(
                &mut group,
                &runtime,
                case,
                "cached",
                true,
                layered(case, cached),
            );
        }
        group.finish();
    }
    criterion.final_summary();
    report(started);
    // The Redis server (if any) stops when `redis` drops, here.
}

/// Benchmarks `service` on `case` as `name` in `group`, after checking that it takes the
/// path the case names.
fn bench<S, B>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    runtime: &Runtime,
    case: Case,
    name: &str,
    is_layered: bool,
    service: S,
) where
    S: Service<Request<ReqBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: fmt::Debug + Send,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: fmt::Debug,
{
    let mut requests = Requests::new();
    runtime.block_on(async {
        // The replay case's first request executes; every later one replays.
        if case == Case::Replay {
            run(&service, requests.next(case)).await;
        }
        for _ in 0..2 {
            check(case, is_layered, &run(&service, requests.next(case)).await);
        }
    });
    group.bench_function(name, |b| {
        b.to_async(runtime).iter_batched(
            || requests.next(case),
            |batch| run(&service, batch),
            BatchSize::SmallInput,
        );
    });
}

/// Prints, per case, the median time per request of each target measured in this run and
/// its ratio to `bare`.
fn report(started: SystemTime) {
    let home = criterion_home();
    let median = |case: Case, target: &str| -> Option<f64> {
        let path = home
            .join(case.name())
            .join(target)
            .join("new/estimates.json");
        let modified = std::fs::metadata(&path).ok()?.modified().ok()?;
        if modified < started {
            return None;
        }
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
        let per_iteration = json.pointer("/median/point_estimate")?.as_f64()?;
        Some(per_iteration / case.requests() as f64)
    };
    println!("\nper request, median of this run (ratio to the bare handler in the same group)");
    print!("{:<26}", "case");
    for target in TARGETS {
        print!("{target:>20}");
    }
    println!();
    for case in Case::ALL {
        let Some(bare) = median(case, "bare") else {
            continue;
        };
        print!("{:<26}", case.name());
        for target in TARGETS {
            match median(case, target) {
                Some(ns) if target == "bare" => print!("{:>20}", format!("{:.2} µs", ns / 1e3)),
                Some(ns) => print!("{:>20}", format!("{:.2} µs {:.2}×", ns / 1e3, ns / bare)),
                None => print!("{:>20}", "-"),
            }
        }
        println!();
    }
}

/// Where criterion writes its results: `$CRITERION_HOME`, else the target directory's
/// `criterion` (this executable lives in `<target>/<profile>/deps/`).
fn criterion_home() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(target).join("criterion");
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.join("criterion")))
        .unwrap_or_else(|| PathBuf::from("target/criterion"))
}
