//! [`PostgresStore`](crate::PostgresStore): records in the application's own PostgreSQL
//! database (feature `postgres`).
//!
//! # Layout in PostgreSQL
//!
//! One table ([`DEFAULT_TABLE`] unless named otherwise), one row per key, created by
//! [`PostgresStore::migrate`](crate::PostgresStore::migrate):
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS idempotency_records (
//!     key          bytea       PRIMARY KEY,  -- the 32-byte storage key (a digest)
//!     token        bigint      NOT NULL,     -- the fence token of the claim
//!     fingerprint  bytea       NOT NULL,     -- the claiming request's fingerprint
//!     claimed_at   timestamptz NOT NULL,
//!     lease_until  timestamptz NOT NULL,     -- the claim's lease ends
//!     expires_at   timestamptz NOT NULL,     -- the row stops counting (TTL, or retention)
//!     completed_at timestamptz,
//!     record       bytea                     -- the record; NULL while in flight
//! );
//! CREATE INDEX IF NOT EXISTS idempotency_records_expires_at
//!     ON idempotency_records (expires_at);
//! CREATE INDEX IF NOT EXISTS idempotency_records_in_flight
//!     ON idempotency_records (key) WHERE record IS NULL;
//! ```
//!
//! A row holds either a claim in flight (`record` NULL) until `lease_until`, kept after that
//! until `expires_at` (the lease plus [`PostgresStore::with_abandoned_retention`]) so that a
//! request finding it learns that its owner stopped without completing
//! ([`Claim::Abandoned`](crate::Claim::Abandoned)); or a completed record in
//! [`Record::encode`](crate::Record::encode)'s versioned binary form, until its TTL's end
//! (`expires_at`). A row past `expires_at` is free: every read ignores it and the next claim
//! replaces it. Purging ([`PostgresStore::purge_expired`]) only gives the space back.
//!
//! # Round trips
//!
//! Every operation is one statement (see `schema.rs`), so one round trip once the
//! connection has prepared it (sqlx prepares each statement once per pooled connection, which
//! costs one more round trip the first time). The claim is an `INSERT … ON CONFLICT (key) DO
//! UPDATE … WHERE` the key is free, expired, or held by the abandoned claim being taken
//! over, in a CTE whose other branch reads what holds the key otherwise: claim-or-replay in
//! one round trip, and a replay writes nothing. In the rare case that another claim commits
//! between the insert's look at the key and the statement's snapshot, the statement returns
//! nothing and is sent again.
//!
//! # Waiting
//!
//! Completing, releasing and breaking a claim send `NOTIFY` on the table's channel with the
//! key, in the same statement. Each store keeps one `LISTEN` connection (`notify.rs`),
//! opened on its first wait. A wait looks at the claim (one statement), then sleeps until a
//! notification, the claim's lease's end, or the poll interval.
//!
//! # Completion in the handler's transaction
//!
//! With [`PostgresStore::in_handler_transaction`], the handler writes in a
//! [`HandlerTransaction`] and the layer writes the record in it and commits (`transaction.rs`).
//!
//! [`PostgresStore::in_handler_transaction`]: crate::PostgresStore::in_handler_transaction
//! [`PostgresStore::purge_expired`]: crate::PostgresStore::purge_expired
//! [`PostgresStore::with_abandoned_retention`]: crate::PostgresStore::with_abandoned_retention

// Files:
// `connect.rs` the struct, its settings and `migrate`; `schema.rs` the table and every
// statement; `store.rs` the `IdempotencyStore` and
// `AdminStore` implementations;
// `notify.rs` the listener; `inspect.rs` look-ups, listings and purging; `transaction.rs`
// the handlers' transactions; `error.rs` sqlx errors as `StoreError`s.

pub(crate) mod connect;
mod error;
mod inspect;
mod notify;
mod schema;
mod store;
mod transaction;

pub use self::{
    connect::{DEFAULT_ABANDONED_RETENTION, DEFAULT_POLL_INTERVAL, DEFAULT_RESPONSE_TIMEOUT},
    inspect::{MAX_PURGE_BATCH, Purger},
    schema::DEFAULT_TABLE,
    transaction::{HandlerTransaction, TransactionGuard},
};
