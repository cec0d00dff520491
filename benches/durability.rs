//! What Redis's persistence and replication choices cost a first execution: one claim and
//! one completion on `RedisStore`, one at a time and 16 at once, against redis-servers this
//! benchmark starts on loopback (and stops at the end):
//!
//! - `plain`: no persistence (`--save '' --appendonly no`);
//! - `aof-everysec`, `aof-always`: `appendonly yes` with that `appendfsync`;
//! - `replica-async`: a primary with one replica, `Durability::none()`;
//! - `replica-wait`: the same, `Durability::replicas(1)` (`WAIT 1` pipelined with each write,
//!   on the store's connections for acknowledged writes);
//! - `replica-wait, one connection`: the same on a store made with `new`, whose one
//!   connection carries every `WAIT` (what every store did before those connections).
//!
//! ```text
//! cargo bench --bench durability --features redis
//! ```
//!
//! The data directories are in the system's temporary directory: `aof-always` measures its
//! disk's fsync.

#[path = "../tests/common/redis_server.rs"]
#[allow(dead_code)]
mod redis_server;

use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput};
use redis_server::RedisServer;
use tower_idempotency::{
    Claim, Fingerprint, IdempotencyStore, Record, RedisStore, StorageKey, redis::Durability,
};

fn main() {
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
        .configure_from_args();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    redis_server::require_redis();

    let plain = RedisServer::start();
    let everysec = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "everysec"]);
    let always = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let primary = RedisServer::start();
    let replica =
        RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary.port().to_string()]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !replica
        .cli(&["INFO", "replication"])
        .contains("master_link_status:up")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the replica's link is up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let configs = [
        ("plain", &plain, Durability::none()),
        ("aof-everysec", &everysec, Durability::none()),
        ("aof-always", &always, Durability::none()),
        ("replica-async", &primary, Durability::none()),
        ("replica-wait", &primary, Durability::replicas(1)),
    ];
    for concurrency in [1usize, 16] {
        let mut group = criterion.benchmark_group(format!("first execution x{concurrency}"));
        group.throughput(Throughput::Elements(concurrency as u64));
        for (name, server, durability) in &configs {
            let store = runtime.block_on(async {
                RedisStore::connect(&server.url())
                    .await
                    .expect("connect")
                    .with_durability(*durability)
            });
            // Loads the completion script (the first call is an EVAL).
            runtime.block_on(first_executions(&store, 1));
            group.bench_function(*name, |b| {
                b.to_async(&runtime).iter_batched(
                    || (),
                    |()| first_executions(&store, concurrency),
                    BatchSize::SmallInput,
                );
            });
        }
        // The same as `replica-wait`, on one connection: a store made with `new` has no
        // connections of its own for acknowledged writes, and each `WAIT` holds up the
        // commands behind it.
        let single = runtime.block_on(async {
            let client = redis::Client::open(primary.url()).expect("a client");
            let connection = client.get_connection_manager().await.expect("a connection");
            RedisStore::new(connection, client).with_durability(Durability::replicas(1))
        });
        runtime.block_on(first_executions(&single, 1));
        group.bench_function("replica-wait, one connection", |b| {
            b.to_async(&runtime).iter_batched(
                || (),
                |()| first_executions(&single, concurrency),
                BatchSize::SmallInput,
            );
        });
        group.finish();
    }
    criterion.final_summary();
    drop((plain, everysec, always, replica, primary));
}

/// `n` first executions at once: a claim of a fresh key, then its completion.
async fn first_executions(store: &RedisStore, n: usize) {
    let runs: Vec<_> = (0..n)
        .map(|_| {
            let store = store.clone();
            async move {
                let key = fresh_key();
                let fingerprint = Fingerprint::of(
                    &http::Method::POST,
                    &http::Uri::from_static("/charges"),
                    b"{}",
                );
                let claim = store
                    .claim(&key, &fingerprint, Duration::from_secs(30))
                    .await;
                let Ok(Claim::Acquired(token)) = claim else {
                    panic!("a fresh key is free: {claim:?}");
                };
                let record = Record::response(
                    fingerprint,
                    http::StatusCode::CREATED,
                    &http::HeaderMap::new(),
                    bytes::Bytes::from_static(b"{\"id\":\"ch_1\"}"),
                    None,
                );
                store
                    .complete(&key, token, record, Duration::from_secs(60))
                    .await
                    .expect("a completion");
            }
        })
        .collect();
    for run in runs.into_iter().map(tokio::spawn).collect::<Vec<_>>() {
        run.await.expect("a first execution");
    }
}

fn fresh_key() -> StorageKey {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut bytes = [0; 32];
    bytes[..8].copy_from_slice(&n.to_be_bytes());
    bytes[8..12].copy_from_slice(&std::process::id().to_be_bytes());
    StorageKey::from_bytes(bytes)
}
