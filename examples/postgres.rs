//! A transfers API on PostgreSQL whose records commit in the handler's own transaction: the
//! debit, the credit and the stored response commit together, or none does.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!     cargo run --example postgres --features postgres,axum
//! ```
//!
//! ```text
//! $ curl -s localhost:3000/accounts
//! [{"id":1,"balance":1000},{"id":2,"balance":0}]
//! $ curl -si localhost:3000/transfers -H 'Idempotency-Key: t-1' \
//!     -H 'content-type: application/json' -d '{"from":1,"to":2,"amount":250}'
//! HTTP/1.1 201 Created
//! content-type: application/json
//!
//! {"amount":250,"from":1,"id":1,"to":2}
//! $ curl -si localhost:3000/transfers -H 'Idempotency-Key: t-1' \
//!     -H 'content-type: application/json' -d '{"from":1,"to":2,"amount":250}'
//! HTTP/1.1 201 Created
//! content-type: application/json
//! idempotent-replayed: true
//!
//! {"amount":250,"from":1,"id":1,"to":2}
//! $ curl -s localhost:3000/accounts
//! [{"id":1,"balance":750},{"id":2,"balance":250}]
//! ```
//!
//! Kill the server (`kill -9`) while a transfer runs and restart it: the transfer's writes
//! were never committed, and the retry moves the money once. A transfer the accounts cannot
//! cover answers 422, stored like any other response; a failure (5xx) is not stored, so its
//! transaction rolls back and a retry runs again.

use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use sqlx::PgPool;
use tower_idempotency::{IdempotencyLayer, PostgresStore, postgres::HandlerTransaction};

/// A transfer between two accounts.
#[derive(Debug, Deserialize)]
pub struct Transfer {
    from: i64,
    to: i64,
    amount: i64,
}

/// Creates the two accounts (1 holds 1000, 2 holds 0) and the transfers table, if missing.
pub async fn setup(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS accounts (id bigint PRIMARY KEY, balance bigint NOT NULL);
         INSERT INTO accounts VALUES (1, 1000), (2, 0) ON CONFLICT DO NOTHING;
         CREATE TABLE IF NOT EXISTS transfers (
             id bigserial PRIMARY KEY, source bigint NOT NULL, target bigint NOT NULL,
             amount bigint NOT NULL);",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// The routes, without the idempotency layer.
pub fn routes(pool: PgPool) -> Router {
    Router::new()
        .route("/transfers", post(transfer))
        .route("/accounts", get(accounts))
        .with_state(pool)
}

/// The routes under an idempotency layer whose records commit with each transfer.
pub fn app(store: PostgresStore, pool: PgPool) -> Router {
    routes(pool).layer(IdempotencyLayer::new(store.in_handler_transaction()))
}

fn failed(error: sqlx::Error) -> Response {
    // Not stored (5xx): the key is released and the transaction rolled back.
    (StatusCode::SERVICE_UNAVAILABLE, error.to_string()).into_response()
}

async fn transfer(tx: HandlerTransaction, Json(transfer): Json<Transfer>) -> Response {
    if transfer.amount <= 0 || transfer.from == transfer.to {
        return (StatusCode::UNPROCESSABLE_ENTITY, "invalid transfer").into_response();
    }
    let mut tx = match tx.begin().await {
        Ok(tx) => tx,
        Err(error) => return failed(error),
    };
    // Both accounts, locked in id order (no deadlock between opposite transfers).
    let found: Result<Vec<(i64, i64)>, _> = sqlx::query_as(
        "SELECT id, balance FROM accounts WHERE id IN ($1, $2) ORDER BY id FOR UPDATE",
    )
    .bind(transfer.from)
    .bind(transfer.to)
    .fetch_all(&mut *tx)
    .await;
    let found = match found {
        Ok(found) => found,
        Err(error) => return failed(error),
    };
    if found.len() != 2 {
        return (StatusCode::NOT_FOUND, "no such account").into_response();
    }
    let balance = found
        .iter()
        .find(|(id, _)| *id == transfer.from)
        .map_or(0, |(_, balance)| *balance);
    if balance < transfer.amount {
        return (StatusCode::UNPROCESSABLE_ENTITY, "insufficient funds").into_response();
    }
    let moved = async {
        sqlx::query("UPDATE accounts SET balance = balance - $1 WHERE id = $2")
            .bind(transfer.amount)
            .bind(transfer.from)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE accounts SET balance = balance + $1 WHERE id = $2")
            .bind(transfer.amount)
            .bind(transfer.to)
            .execute(&mut *tx)
            .await?;
        sqlx::query_scalar::<_, i64>(
            "INSERT INTO transfers (source, target, amount) VALUES ($1, $2, $3) RETURNING id",
        )
        .bind(transfer.from)
        .bind(transfer.to)
        .bind(transfer.amount)
        .fetch_one(&mut *tx)
        .await
    }
    .await;
    match moved {
        // No commit here: the layer commits, with the record of this response.
        Ok(id) => (
            StatusCode::CREATED,
            Json(serde_json::json!({
                "id": id, "from": transfer.from, "to": transfer.to, "amount": transfer.amount,
            })),
        )
            .into_response(),
        Err(error) => failed(error),
    }
}

async fn accounts(State(pool): State<PgPool>) -> Response {
    let rows: Result<Vec<(i64, i64)>, _> =
        sqlx::query_as("SELECT id, balance FROM accounts ORDER BY id")
            .fetch_all(&pool)
            .await;
    match rows {
        Ok(rows) => Json(
            rows.into_iter()
                .map(|(id, balance)| serde_json::json!({"id": id, "balance": balance}))
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(error) => failed(error),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .map_err(|_| "set DATABASE_URL, e.g. postgres://postgres@127.0.0.1:5432/postgres")?;
    let pool = PgPool::connect(&url).await?;
    let store = PostgresStore::new(pool.clone());
    store.migrate().await?;
    setup(&pool).await?;
    let port = std::env::var("PORT").unwrap_or_else(|_| "3000".into());
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app(store, pool)).await?;
    Ok(())
}
