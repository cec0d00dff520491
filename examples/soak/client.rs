//! The client: the load, then the check of every key once the store's server (Redis or
//! PostgreSQL) is stable, then the report.

use std::{
    collections::HashMap,
    net::SocketAddr,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use rand::{Rng, SeedableRng, rngs::SmallRng};

use crate::{
    BoxError, env, env_or,
    facts::Events,
    net::{self, Charge, Cut, Outcome},
    report, unix_ms,
};

/// Settings, from the environment (see `scripts/soak.sh`).
pub struct Settings {
    /// The instances: (name, address).
    pub targets: Vec<(String, SocketAddr)>,
    /// Where the instances keep their records: Redis, or PostgreSQL (`DATABASE_URL`).
    pub records: Records,
    pub duration: Duration,
    pub workers: usize,
    pub seed: u64,
    /// Where the script logs `kill <unix ms>` and `up <unix ms>` lines.
    pub events: String,
    /// How many outages the script causes (the client waits for their end before checking).
    pub outages: usize,
    /// The lease the instances use: claims left behind by a failure expire within it.
    pub lease: Duration,
}

impl Settings {
    fn from_env() -> Result<Self, BoxError> {
        let targets = env("TARGETS")?
            .split(',')
            .map(|target| {
                let (name, addr) = target
                    .split_once('=')
                    .ok_or("TARGETS is name=host:port,name=host:port")?;
                Ok((name.to_owned(), addr.parse()?))
            })
            .collect::<Result<Vec<_>, BoxError>>()?;
        if targets.len() != 2 {
            return Err("TARGETS names two instances".into());
        }
        Ok(Self {
            targets,
            records: match std::env::var("DATABASE_URL") {
                Ok(url) => Records::Postgres(url),
                Err(_) => Records::Redis(env("REDIS_URL")?),
            },
            duration: Duration::from_millis(env_or("DURATION_MS", 300_000)?),
            workers: env_or("WORKERS", 16)?,
            seed: env_or("SEED", unix_ms())?,
            events: env("EVENTS")?,
            outages: env_or("OUTAGES", 2)?,
            lease: Duration::from_secs(30),
        })
    }
}

/// The server holding the instances' records, by its URL.
pub enum Records {
    Redis(String),
    Postgres(#[cfg_attr(not(feature = "postgres"), allow(dead_code))] String),
}

impl Records {
    /// What the report calls the store's server, and the process the script kills.
    pub fn names(&self) -> (&'static str, &'static str) {
        match self {
            Self::Redis(_) => ("Redis", "redis-server"),
            Self::Postgres(_) => ("PostgreSQL", "postgres"),
        }
    }
}

/// Counts the claims in flight in the records' server.
enum Claims {
    Redis(redis::aio::MultiplexedConnection),
    #[cfg(feature = "postgres")]
    Postgres(sqlx::PgPool),
}

impl Claims {
    async fn connect(records: &Records) -> Result<Self, BoxError> {
        match records {
            Records::Redis(url) => Ok(Self::Redis(
                redis::Client::open(url.as_str())?
                    .get_multiplexed_async_connection()
                    .await?,
            )),
            #[cfg(feature = "postgres")]
            Records::Postgres(url) => Ok(Self::Postgres(sqlx::PgPool::connect(url).await?)),
            #[cfg(not(feature = "postgres"))]
            Records::Postgres(_) => {
                Err("DATABASE_URL is set: build with the feature `postgres`".into())
            }
        }
    }

    /// How many keys hold a claim in flight (not completed, lease not over).
    async fn count(&mut self) -> Result<usize, BoxError> {
        match self {
            Self::Redis(redis) => claims_in_redis(redis).await,
            #[cfg(feature = "postgres")]
            Self::Postgres(pool) => {
                let claims: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM idempotency_records \
                     WHERE record IS NULL AND lease_until > now()",
                )
                .fetch_one(&*pool)
                .await?;
                Ok(usize::try_from(claims)?)
            }
        }
    }
}

/// Why a request was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The first request for a key.
    First,
    /// A retry after a failure (a cut, a connection error, a 503, a 409 in flight).
    Retry,
    /// A retry of a key that already succeeded: must be replayed.
    Voluntary,
    /// The key with another payload: must be refused (409 `KeyReused`).
    Mismatch,
    /// The final check, once Redis is stable.
    Check,
}

/// One request and what it got.
#[derive(Clone, Debug)]
pub struct Attempt {
    /// The `x-attempt` label: `{order}/{n}`.
    pub label: String,
    pub target: usize,
    pub kind: Kind,
    pub cut: Option<Cut>,
    /// Unix ms.
    pub sent: u64,
    pub received: u64,
    pub outcome: Outcome,
}

/// A key and every request the client sent for it.
pub struct KeyRun {
    pub order: String,
    /// `Some` for an explicit `Idempotency-Key`, `None` for a derived key.
    pub key: Option<String>,
    pub body: Bytes,
    pub attempts: Vec<Attempt>,
}

impl KeyRun {
    pub fn succeeded(&self) -> bool {
        self.attempts
            .iter()
            .any(|attempt| attempt.kind != Kind::Check && attempt.outcome.is_success())
    }
}

fn charge_body(order: &str, amount: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"order":"{order}","amount":{amount},"currency":"eur"}}"#
    ))
}

/// One request for `run`'s key, as `kind`, cut as `cut`.
async fn attempt(
    settings: &Settings,
    run: &KeyRun,
    tag: impl std::fmt::Display,
    target: usize,
    kind: Kind,
    cut: Option<Cut>,
    quoted: bool,
) -> Attempt {
    let label = format!("{}/{tag}", run.order);
    let quoted_key = run.key.as_ref().map(|key| {
        if quoted {
            format!("\"{key}\"")
        } else {
            key.clone()
        }
    });
    let mismatched;
    let body = if kind == Kind::Mismatch {
        mismatched = charge_body(&run.order, 1);
        &mismatched
    } else {
        &run.body
    };
    let charge = Charge {
        key: quoted_key.as_deref(),
        attempt: &label,
        body,
    };
    let addr = settings.targets[target].1;
    let sent = unix_ms();
    let outcome = match cut {
        Some(how) => net::cut(addr, &charge, how).await,
        None => net::send(addr, &charge).await,
    };
    Attempt {
        label,
        target,
        kind,
        cut,
        sent,
        received: unix_ms(),
        outcome,
    }
}

/// A cut chosen at random: dropped at once, after up to 150 ms, or once the response starts.
fn random_cut(rng: &mut SmallRng) -> Cut {
    match rng.random_range(0..3) {
        0 => Cut::AfterSend(Duration::ZERO),
        1 => Cut::AfterSend(Duration::from_millis(rng.random_range(1..=150))),
        _ => Cut::WhileReading,
    }
}

/// The life of one key: its first request (to one instance, or to both at once), retries
/// until a success, then maybe a voluntary retry and a mismatched reuse.
async fn drive_key(
    settings: &Settings,
    rng: &mut SmallRng,
    run_id: &str,
    index: u64,
    retry_until: Instant,
) -> KeyRun {
    let order = format!("{run_id}-{index:07}");
    let explicit = rng.random_bool(0.85);
    let mut run = KeyRun {
        key: explicit.then(|| format!("key-{order}")),
        body: charge_body(&order, 1000 + index % 1000),
        order,
        attempts: Vec::new(),
    };
    let cut = |rng: &mut SmallRng, p: f64| rng.random_bool(p).then(|| random_cut(rng));
    if rng.random_bool(0.2) {
        // A duplicate sent to both instances at the same moment.
        let (cut_a, cut_b) = (cut(rng, 0.15), cut(rng, 0.15));
        let (quoted_a, quoted_b) = (rng.random_bool(0.25), rng.random_bool(0.25));
        let (a, b) = tokio::join!(
            attempt(settings, &run, 1, 0, Kind::First, cut_a, quoted_a),
            attempt(settings, &run, 2, 1, Kind::First, cut_b, quoted_b),
        );
        run.attempts.extend([a, b]);
    } else {
        let (target, how, quoted) = (
            rng.random_range(0..2),
            cut(rng, 0.15),
            rng.random_bool(0.25),
        );
        let first = attempt(settings, &run, 1, target, Kind::First, how, quoted).await;
        run.attempts.push(first);
    }
    let mut backoff = Duration::from_millis(100);
    while !run.succeeded() && run.attempts.len() < 30 && Instant::now() < retry_until {
        if let Some(Outcome::Answer {
            status: 400..=499,
            problem,
            ..
        }) = run.attempts.last().map(|attempt| &attempt.outcome)
            && problem.as_deref() != Some("InFlight")
        {
            break; // A client error: retrying the same request cannot help.
        }
        let jitter = rng.random_range(0.5..1.5);
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
        let (target, how, quoted) = (rng.random_range(0..2), cut(rng, 0.1), rng.random_bool(0.25));
        let n = run.attempts.len() + 1;
        let retry = attempt(settings, &run, n, target, Kind::Retry, how, quoted).await;
        run.attempts.push(retry);
    }
    if run.succeeded() && Instant::now() < retry_until {
        if rng.random_bool(0.2) {
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
            let (target, quoted) = (rng.random_range(0..2), rng.random_bool(0.25));
            let n = run.attempts.len() + 1;
            let again = attempt(settings, &run, n, target, Kind::Voluntary, None, quoted).await;
            run.attempts.push(again);
        }
        if explicit && rng.random_bool(0.05) {
            let target = rng.random_range(0..2);
            let n = run.attempts.len() + 1;
            let reuse = attempt(settings, &run, n, target, Kind::Mismatch, None, false).await;
            run.attempts.push(reuse);
        }
    }
    run
}

/// How many keys in Redis hold an in-flight claim (a marker starts with `TIF`).
async fn claims_in_redis(redis: &mut redis::aio::MultiplexedConnection) -> Result<usize, BoxError> {
    let mut cursor = 0u64;
    let mut claims = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("idempotency:*")
            .arg("COUNT")
            .arg(1000)
            .query_async(redis)
            .await?;
        if !keys.is_empty() {
            let values: Vec<Option<Vec<u8>>> =
                redis::cmd("MGET").arg(&keys).query_async(redis).await?;
            claims += values
                .iter()
                .filter(|value| value.as_deref().is_some_and(|v| v.starts_with(b"TIF")))
                .count();
        }
        if next == 0 {
            return Ok(claims);
        }
        cursor = next;
    }
}

pub async fn run() -> Result<ExitCode, BoxError> {
    let settings = Arc::new(Settings::from_env()?);
    let run_id = format!("{:08x}", settings.seed as u32);
    let started = Instant::now();
    let started_ms = unix_ms();
    let load_end = started + settings.duration;
    // Keys still failing when the load ends get a little longer, then the check decides.
    let retry_until = load_end + Duration::from_secs(5);
    println!(
        "soak client: {:?} of load on {} workers, seed {}",
        settings.duration, settings.workers, settings.seed
    );

    let next = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..settings.workers {
        let (settings, next, run_id) = (Arc::clone(&settings), Arc::clone(&next), run_id.clone());
        workers.spawn(async move {
            let mut rng = SmallRng::seed_from_u64(settings.seed ^ (worker as u64 + 1) << 32);
            let mut runs = Vec::new();
            while Instant::now() < load_end {
                let index = next.fetch_add(1, Ordering::Relaxed);
                runs.push(drive_key(&settings, &mut rng, &run_id, index, retry_until).await);
            }
            runs
        });
    }
    let mut runs: Vec<KeyRun> = workers.join_all().await.into_iter().flatten().collect();
    runs.sort_by(|a, b| a.order.cmp(&b.order));
    let load_time = started.elapsed();
    println!("load done after {load_time:.1?}: {} keys", runs.len());

    // Once the script is done with the store's server, nothing runs and no claim is left, check each key.
    let events =
        Events::wait_for(&settings.events, settings.outages, Duration::from_secs(120)).await?;
    let mut claims = Claims::connect(&settings.records).await?;
    let quiet = Instant::now();
    loop {
        let mut running = 0;
        for (_, addr) in &settings.targets {
            running += net::executions(*addr).await?.0;
        }
        if running == 0 {
            break;
        }
        if quiet.elapsed() > Duration::from_secs(30) {
            return Err(format!("{running} executions still running 30 s after the load").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let quiet = quiet.elapsed();
    let claims_at_end = claims.count().await?;
    // Claims left behind by a failure must expire with their lease.
    let waiting = Instant::now();
    let mut claims_left = claims_at_end;
    while claims_left > 0 && waiting.elapsed() < settings.lease + Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        claims_left = claims.count().await?;
    }
    let claims_wait = (claims_left == 0).then(|| waiting.elapsed());
    let mut executed: HashMap<String, Vec<(usize, String)>> = HashMap::new();
    for (target, (_, addr)) in settings.targets.iter().enumerate() {
        for (order, attempt) in net::executions(*addr).await?.1 {
            executed.entry(order).or_default().push((target, attempt));
        }
    }

    let checking = Instant::now();
    let runs = check_every_key(&settings, runs).await;
    let check_time = checking.elapsed();

    let verdict = report::analyse(report::Input {
        settings: &settings,
        runs: &runs,
        executed: &executed,
        events: &events,
        started_ms,
        load_time,
        quiet,
        claims_at_end,
        claims_wait,
        check_time,
    });
    Ok(if verdict.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Sends each key's request once more (32 at a time), to a random instance: a replay means
/// its record is stored.
async fn check_every_key(settings: &Arc<Settings>, runs: Vec<KeyRun>) -> Vec<KeyRun> {
    const AT_ONCE: usize = 32;
    let mut chunks: Vec<Vec<KeyRun>> = (0..AT_ONCE).map(|_| Vec::new()).collect();
    for (i, run) in runs.into_iter().enumerate() {
        chunks[i % AT_ONCE].push(run);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (i, chunk) in chunks.into_iter().enumerate() {
        let settings = Arc::clone(settings);
        tasks.spawn(async move {
            let mut rng = SmallRng::seed_from_u64(settings.seed ^ i as u64);
            let mut checked = Vec::with_capacity(chunk.len());
            for mut run in chunk {
                let target = rng.random_range(0..2);
                let check =
                    attempt(&settings, &run, "check", target, Kind::Check, None, false).await;
                run.attempts.push(check);
                checked.push(run);
            }
            checked
        });
    }
    let mut runs: Vec<KeyRun> = tasks.join_all().await.into_iter().flatten().collect();
    runs.sort_by(|a, b| a.order.cmp(&b.order));
    runs
}
