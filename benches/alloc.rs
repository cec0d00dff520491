//! Deterministic costs per request, beside the bare handler: heap allocations (count and
//! bytes, through a counting global allocator), handler executions and, with the `redis`
//! feature, Redis round trips (counted where the store sends them) and the commands the
//! server ran (`INFO commandstats`, which counts those scripts run inside them alike). Same
//! cases and services as `benches/layer.rs`.
//!
//! ```sh
//! cargo bench --bench alloc                        # bare and MemoryStore
//! cargo bench --bench alloc --features redis       # and RedisStore, CachedStore
//! ALLOC_ITERS=5000 cargo bench --bench alloc       # more requests per case (default 2000)
//! ```
//!
//! Beside the layer's targets (`bare`, `memory`, `redis`, `cached`), `naive-moka` and
//! `naive-redis` are the load script's naive baselines (`benches/common/naive.rs`: a response
//! cache by raw key, no claim, no fingerprint) on the two cases they cover, first execution
//! and replay.
//!
//! `ALLOC_ONLY=memory:replay` runs one target and case only, which makes the binary a small
//! driver for `valgrind --tool=callgrind` (instructions per request: the difference between
//! two runs with different `ALLOC_ITERS`, divided by the difference in requests).
//! `ALLOC_CACHE_BYTES` sets `CachedStore`'s capacity (default 64 MiB) and `ALLOC_MEMORY_BYTES`
//! `MemoryStore`'s (default 64 MiB); a small one (say `1048576`) measures a full store, which
//! pushes a record out for every one it takes in (the steady state of a busy server).

mod common;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::BTreeMap,
    fmt,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tokio::runtime::Runtime;
use tower::{Layer, Service};
use tower_idempotency::MemoryStore;

use common::{
    Case, ReqBody, Requests, bare, check,
    handler::CREATED,
    layered,
    naive::{self, NaiveLayer},
    run,
};

/// Counts every allocation (a `realloc` counts as one) and the bytes asked for.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static ALLOCATED_BYTES: AtomicU64 = AtomicU64::new(0);

fn counted(bytes: usize) {
    ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    ALLOCATED_BYTES.fetch_add(bytes as u64, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to the system allocator; counting has no effect
// on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        counted(layout.size());
        // SAFETY: the caller's contract for `alloc` is passed on as it is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        counted(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        counted(new_size);
        // SAFETY: the caller's contract for `realloc` is passed on as it is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc` is passed on as it is.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// What one target cost on one case, per request.
struct Costs {
    allocations: f64,
    bytes: f64,
    executions: f64,
    commands: String,
}

fn main() {
    let iterations: u64 = std::env::var("ALLOC_ITERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000);
    let only = std::env::var("ALLOC_ONLY").ok();
    let memory_bytes: u64 = std::env::var("ALLOC_MEMORY_BYTES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(MemoryStore::DEFAULT_CAPACITY_BYTES);
    #[cfg(feature = "redis")]
    let cache_bytes: u64 = std::env::var("ALLOC_CACHE_BYTES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(64 << 20);
    let wanted = |target: &str, case: Case| {
        only.as_deref()
            .is_none_or(|only| only == format!("{target}:{}", case.name()))
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");

    #[cfg(feature = "redis")]
    let redis = if Case::ALL.iter().any(|case| {
        wanted("redis", *case) || wanted("cached", *case) || wanted("naive-redis", *case)
    }) {
        counted::with_store(&runtime)
    } else {
        None
    };

    println!(
        "{:<26}{:<8}{:>12}{:>12}{:>14}{:>12}  redis/request",
        "case", "target", "allocs/req", "Δ vs bare", "bytes/req", "handler/req"
    );
    for case in Case::ALL {
        let mut bare_allocations = None;
        let mut row = |target: &str, costs: Costs| {
            let delta = match bare_allocations {
                None => {
                    bare_allocations = Some(costs.allocations);
                    String::from("-")
                }
                Some(bare) => format!("{:+.2}", costs.allocations - bare),
            };
            println!(
                "{:<26}{:<8}{:>12.2}{:>12}{:>14.1}{:>12.3}  {}",
                case.name(),
                target,
                costs.allocations,
                delta,
                costs.bytes,
                costs.executions,
                costs.commands
            );
        };
        if wanted("bare", case) || only.is_none() {
            row(
                "bare",
                measure(&runtime, case, false, bare(), iterations, None),
            );
        }
        if wanted("memory", case) {
            let service = layered(case, MemoryStore::new(memory_bytes));
            row(
                "memory",
                measure(&runtime, case, true, service, iterations, None),
            );
        }
        // The load script's naive baselines, on the cases they cover (they derive no key and
        // hold no claim).
        #[cfg(any(feature = "moka", feature = "redis"))]
        let naive_case = matches!(case, Case::FirstExecution | Case::Replay);
        #[cfg(feature = "moka")]
        if naive_case && wanted("naive-moka", case) {
            let service = NaiveLayer(naive::Moka::new(memory_bytes)).layer(bare());
            let costs = measure(&runtime, case, true, service, iterations, None);
            row("naive-moka", costs);
        }
        #[cfg(feature = "redis")]
        if let Some((server, store)) = &redis {
            if wanted("redis", case) {
                let service = layered(case, store.clone());
                let costs = measure(&runtime, case, true, service, iterations, Some(server));
                row("redis", costs);
            }
            if wanted("cached", case) {
                let cached = tower_idempotency::CachedStore::new(store.clone(), cache_bytes);
                let service = layered(case, cached);
                let costs = measure(&runtime, case, true, service, iterations, Some(server));
                row("cached", costs);
            }
            if naive_case
                && wanted("naive-redis", case)
                && let Some(connection) = counted::naive(&runtime, server)
            {
                let service = NaiveLayer(naive::Redis(connection)).layer(bare());
                let costs = measure(&runtime, case, true, service, iterations, Some(server));
                row("naive-redis", costs);
            }
        }
    }
}

#[cfg(feature = "redis")]
type Server = counted::Server;
#[cfg(not(feature = "redis"))]
type Server = std::convert::Infallible;

/// A `RedisStore` whose connection counts what it sends: its round trips.
#[cfg(feature = "redis")]
mod counted {
    use std::sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    };

    use redis::{
        Cmd, Pipeline, RedisFuture, Value,
        aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    };
    use tower_idempotency::RedisStore;

    use crate::common::redis_server::RedisServer;

    /// The server, and how many commands the store sent it.
    pub(crate) struct Server {
        pub(crate) redis: RedisServer,
        pub(crate) sent: Arc<AtomicU64>,
    }

    #[derive(Clone)]
    pub(crate) struct Counted {
        inner: ConnectionManager,
        sent: Arc<AtomicU64>,
    }

    impl ConnectionLike for Counted {
        fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
            self.sent.fetch_add(1, Ordering::Relaxed);
            self.inner.req_packed_command(cmd)
        }

        fn req_packed_commands<'a>(
            &'a mut self,
            pipeline: &'a Pipeline,
            offset: usize,
            count: usize,
        ) -> RedisFuture<'a, Vec<Value>> {
            self.sent.fetch_add(1, Ordering::Relaxed);
            self.inner.req_packed_commands(pipeline, offset, count)
        }

        fn get_db(&self) -> i64 {
            self.inner.get_db()
        }
    }

    /// A connection for the naive baseline to `server`, counted alike, made as the load
    /// script's server makes it (`get_connection_manager`: redis-rs's defaults, its response
    /// timeout included).
    /// `None` (with a note on standard error) if it cannot connect.
    pub(crate) fn naive(runtime: &tokio::runtime::Runtime, server: &Server) -> Option<Counted> {
        let connected = redis::Client::open(server.redis.url())
            .and_then(|client| runtime.block_on(client.get_connection_manager()));
        match connected {
            Ok(inner) => Some(Counted {
                inner,
                sent: Arc::clone(&server.sent),
            }),
            Err(error) => {
                eprintln!("skipping the naive Redis measurements: {error}");
                None
            }
        }
    }

    /// A `redis-server` of our own and a counted store on it; `None` (with a note on
    /// standard error) if there is no `redis-server` to run.
    pub(crate) fn with_store(
        runtime: &tokio::runtime::Runtime,
    ) -> Option<(Server, RedisStore<Counted>)> {
        let redis = crate::common::redis_server()?;
        let connected = redis::Client::open(redis.url()).and_then(|client| {
            // As `RedisStore::connect` makes it: the store bounds every command itself, and a
            // response timeout of the connection's own would be a second timer per command.
            let config = ConnectionManagerConfig::new().set_response_timeout(None);
            let inner =
                runtime.block_on(ConnectionManager::new_with_config(client.clone(), config))?;
            Ok((client, inner))
        });
        match connected {
            Ok((client, inner)) => {
                let sent = Arc::new(AtomicU64::new(0));
                let connection = Counted {
                    inner,
                    sent: Arc::clone(&sent),
                };
                Some((Server { redis, sent }, RedisStore::new(connection, client)))
            }
            Err(error) => {
                eprintln!("skipping the Redis measurements: {error}");
                None
            }
        }
    }
}

/// Runs `iterations` iterations of `case` on `service` (after a warm-up) and counts what
/// they cost, requests being built outside the count.
fn measure<S, B>(
    runtime: &Runtime,
    case: Case,
    is_layered: bool,
    service: S,
    iterations: u64,
    server: Option<&Server>,
) -> Costs
where
    S: Service<Request<ReqBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: fmt::Debug + Send,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: fmt::Debug,
{
    let mut requests = Requests::new();
    runtime.block_on(async {
        if case == Case::Replay {
            run(&service, requests.next(case)).await;
        }
        for _ in 0..2 {
            check(case, is_layered, &run(&service, requests.next(case)).await);
        }
        for _ in 0..100 {
            run(&service, requests.next(case)).await;
        }
        // Completions of the warm-up run after their responses: let them land.
        tokio::time::sleep(Duration::from_millis(50)).await;
    });
    let commands_before = commands(server);
    let executions_before = CREATED.load(Ordering::Relaxed);
    let (mut allocations, mut bytes) = (0, 0);
    runtime.block_on(async {
        for _ in 0..iterations {
            let batch = requests.next(case);
            let (a, b) = snapshot();
            drop(run(&service, batch).await);
            let (a2, b2) = snapshot();
            allocations += a2 - a;
            bytes += b2 - b;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    });
    let requests = (iterations * case.requests() as u64) as f64;
    let executions = (CREATED.load(Ordering::Relaxed) - executions_before) as f64;
    Costs {
        allocations: allocations as f64 / requests,
        bytes: bytes as f64 / requests,
        executions: executions / requests,
        commands: commands_since(server, commands_before, requests),
    }
}

fn snapshot() -> (u64, u64) {
    (
        ALLOCATIONS.load(Ordering::Relaxed),
        ALLOCATED_BYTES.load(Ordering::Relaxed),
    )
}

/// How many commands the store sent so far, and how many times the server ran each command
/// (nothing without a Redis server).
fn commands(server: Option<&Server>) -> (u64, BTreeMap<String, u64>) {
    #[cfg(feature = "redis")]
    if let Some(server) = server {
        let sent = server.sent.load(Ordering::Relaxed);
        return (
            sent,
            common::redis_server::command_counts(server.redis.port()),
        );
    }
    let _ = server;
    (0, BTreeMap::new())
}

/// The Redis round trips since `before`, per request, then every command the server ran
/// (those sent, and those scripts ran inside them: `INFO commandstats` counts both).
fn commands_since(
    server: Option<&Server>,
    before: (u64, BTreeMap<String, u64>),
    requests: f64,
) -> String {
    if server.is_none() {
        return String::new();
    }
    let (sent, ran) = commands(server);
    let ran: Vec<String> = ran
        .into_iter()
        .filter_map(|(name, calls)| {
            let delta = calls - before.1.get(&name).copied().unwrap_or(0);
            (delta > 0).then(|| format!("{name} {:.2}", delta as f64 / requests))
        })
        .collect();
    format!(
        "{:.2} round trips; server ran: {}",
        (sent - before.0) as f64 / requests,
        ran.join(", ")
    )
}
