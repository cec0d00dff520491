//! The soak test `scripts/soak.sh` runs: two instances of a payments API, each its own
//! process with its own `RedisStore`, on one redis-server that the script kills and restarts
//! while a client drives them (`MODE=postgres`: a `PostgresStore` each, on one PostgreSQL,
//! with `DATABASE_URL` in place of `REDIS_URL` and the feature `postgres`). See
//! `scripts/soak.sh` for the whole run and what it checks.
//!
//! ```sh
//! cargo build --release --example soak --features "redis axum"
//! NAME=a PORT=3001 REDIS_URL=redis://127.0.0.1:6379 target/release/examples/soak server
//! TARGETS=a=127.0.0.1:3001,b=127.0.0.1:3002 REDIS_URL=… EVENTS=events.log \
//!     DURATION_MS=20000 target/release/examples/soak client
//! ```
//!
//! - `server`: `POST /charges` behind the layer simulates a payment (0–100 ms) and counts
//!   its executions per order; `GET /executions` (not protected) lists them.
//! - `client`: the load (mixed keys, retries, duplicates sent to both instances at once,
//!   connections cut mid-request), then the check of every key, and the report.

mod client;
mod facts;
mod net;
mod report;
mod server;

use std::process::ExitCode;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> ExitCode {
    let outcome = match std::env::args().nth(1).as_deref() {
        Some("server") => server::run().await,
        Some("client") => client::run().await,
        _ => Err(
            "usage: soak server|client (settings in the environment: see scripts/soak.sh)".into(),
        ),
    };
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("soak: {error}");
            ExitCode::from(2)
        }
    }
}

/// A required environment variable.
fn env(name: &str) -> Result<String, BoxError> {
    std::env::var(name).map_err(|_| format!("{name} is not set").into())
}

/// An optional environment variable parsed as `T`, or `default`.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T, BoxError> {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .map_err(|_| format!("{name}={value:?} is not valid").into()),
        Err(_) => Ok(default),
    }
}

/// Milliseconds since the Unix epoch: the clock the script's event log uses too.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}
