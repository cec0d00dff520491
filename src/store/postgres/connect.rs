//! [`PostgresStore`] itself and making one: the application's pool, the settings, creating
//! the table, and bounding each statement.

use std::{fmt, future::Future, sync::Arc, time::Duration};

use sqlx::PgPool;

use super::{
    error::{store_error, timed_out},
    notify::Notifier,
    schema::{self, Statements, Table},
    transaction::Transactions,
};
use crate::store::error::StoreError;

/// The default bound on each statement, waiting for a pooled connection included: 2 s.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// The default bound on waiting for a notification before looking again: 1 s.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How long a claim whose lease ended without completion is kept, by default, to be reported
/// as abandoned: 24 h.
pub const DEFAULT_ABANDONED_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

/// What the clones of one store share.
pub(super) struct Shared {
    pub(super) settings: Settings,
    pub(super) statements: Statements,
    pub(super) notifier: Notifier,
    pub(super) transactions: Transactions,
}

#[derive(Clone)]
pub(super) struct Settings {
    pub(super) table: Table,
    pub(super) response_timeout: Duration,
    pub(super) poll_interval: Duration,
    pub(super) abandoned_retention: Duration,
    pub(super) in_handler_transaction: bool,
}

impl Shared {
    fn new(settings: Settings, pool: &PgPool) -> Self {
        Self {
            statements: Statements::new(&settings.table),
            notifier: Notifier::new(
                pool.clone(),
                settings.table.channel().to_owned(),
                settings.response_timeout,
            ),
            settings,
            transactions: Transactions::default(),
        }
    }
}

/// A store in PostgreSQL: the records live in the database the application already trusts,
/// shared by every instance of a service.
///
/// - **One table**, [`DEFAULT_TABLE`](super::DEFAULT_TABLE) unless [`with_table`](Self::with_table) names another,
///   created by [`migrate`](Self::migrate) (or by the SQL [`migration`](Self::migration)
///   returns, for applications that run their own migrations).
/// - **One statement per operation**, atomic by itself: the claim is an
///   `INSERT … ON CONFLICT … DO UPDATE … WHERE` (a free or expired key, or the abandoned claim
///   being taken over) that returns, in the same round trip, what holds the key otherwise:
///   claim-or-replay in one round trip. Completing, releasing and renewing are one statement
///   each, fenced by the claim's token.
/// - **The database's clock** judges leases and expiry (`statement_timestamp()`), never the
///   instances' clocks.
/// - **Waiting by notification** across instances (`LISTEN`/`NOTIFY`, one listener
///   connection per store), bounded by the claim's lease and a poll in case a notification is
///   lost.
/// - **No TTL in PostgreSQL**: an expired row is ignored by every read and replaced by the
///   next claim; [`purge_expired`](Self::purge_expired) deletes expired rows in bounded
///   batches (by an index on the expiry), and [`spawn_purger`](Self::spawn_purger) does it in
///   the background.
/// - Every statement is bounded by a response timeout
///   ([`with_response_timeout`](Self::with_response_timeout)), so a dead database yields
///   errors quickly (the layer answers 503), not hung requests; the pool reconnects by itself.
///
/// `PostgresStore` is a cheap `Clone` handle: clones share the pool and the listener.
///
/// ```
/// use axum::{Router, routing::post};
/// use tower_idempotency::{IdempotencyLayer, PostgresStore};
///
/// # async fn run(pool: sqlx::PgPool) -> Result<(), tower_idempotency::StoreError> {
/// let store = PostgresStore::new(pool);
/// store.migrate().await?;
/// let app: Router = Router::new()
///     .route("/charges", post(|| async { "charged" }))
///     .layer(IdempotencyLayer::new(store));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    pub(super) pool: PgPool,
    pub(super) shared: Arc<Shared>,
}

impl PostgresStore {
    /// A store on the application's pool, in the table [`DEFAULT_TABLE`](super::DEFAULT_TABLE). Nothing is sent to
    /// the database until the first request (or [`migrate`](Self::migrate)).
    pub fn new(pool: PgPool) -> Self {
        let settings = Settings {
            table: Table::default(),
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            poll_interval: DEFAULT_POLL_INTERVAL,
            abandoned_retention: DEFAULT_ABANDONED_RETENTION,
            in_handler_transaction: false,
        };
        let shared = Arc::new(Shared::new(settings, &pool));
        Self { pool, shared }
    }

    fn reconfigured(self, change: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = self.shared.settings.clone();
        change(&mut settings);
        let shared = Arc::new(Shared::new(settings, &self.pool));
        Self {
            pool: self.pool,
            shared,
        }
    }

    /// The table that holds the records and claims. Default: `idempotency_records`
    /// ([`DEFAULT_TABLE`](super::DEFAULT_TABLE)).
    ///
    /// ```
    /// # fn f(store: tower_idempotency::PostgresStore) -> tower_idempotency::PostgresStore {
    /// store.with_table("payments.idempotency_keys")
    /// # }
    /// ```
    ///
    /// # Panics
    ///
    /// Unless `table` is `name` or `schema.name`, each ASCII lower-case letters, digits and
    /// `_` and not starting with a digit, 50 bytes at most in all: the name is written into
    /// SQL, and indexes and the notification channel are named after it.
    pub fn with_table(self, table: &str) -> Self {
        let Some(table) = Table::parse(table) else {
            panic!(
                "PostgresStore::with_table: {table:?} is not a plain lower-case table name (`name` or `schema.name`, at most 50 bytes)"
            );
        };
        self.reconfigured(|settings| settings.table = table)
    }

    /// How long a statement may take, waiting for a pooled connection included, before it
    /// fails with [`StoreErrorKind::Unavailable`](crate::StoreErrorKind::Unavailable).
    /// Default: 2 s ([`DEFAULT_RESPONSE_TIMEOUT`]). It also bounds each attempt to open the
    /// listener connection.
    ///
    /// A statement that timed out may still have run: a claim is then released in the
    /// background (its token is known), a completion is left to expire with its lease.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # fn f(store: tower_idempotency::PostgresStore) -> tower_idempotency::PostgresStore {
    /// store.with_response_timeout(Duration::from_millis(500))
    /// # }
    /// ```
    ///
    /// # Panics
    ///
    /// If `timeout` is zero: every statement would fail.
    pub fn with_response_timeout(self, timeout: Duration) -> Self {
        assert!(
            !timeout.is_zero(),
            "PostgresStore::with_response_timeout: a zero timeout fails every statement"
        );
        self.reconfigured(|settings| settings.response_timeout = timeout)
    }

    /// How long a waiting duplicate trusts notifications before it looks at the claim again,
    /// in case one was lost. Default: 1 s ([`DEFAULT_POLL_INTERVAL`]).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # fn f(store: tower_idempotency::PostgresStore) -> tower_idempotency::PostgresStore {
    /// store.with_poll_interval(Duration::from_millis(250))
    /// # }
    /// ```
    ///
    /// # Panics
    ///
    /// If `interval` is zero: a waiter would query without pause.
    pub fn with_poll_interval(self, interval: Duration) -> Self {
        assert!(
            !interval.is_zero(),
            "PostgresStore::with_poll_interval: a zero interval polls without pause"
        );
        self.reconfigured(|settings| settings.poll_interval = interval)
    }

    /// How long a claim whose lease ended without completion stays, reported as
    /// [`Claim::Abandoned`](crate::Claim::Abandoned), before its key is free again.
    /// Default: 24 h ([`DEFAULT_ABANDONED_RETENTION`]).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # fn f(store: tower_idempotency::PostgresStore) -> tower_idempotency::PostgresStore {
    /// store.with_abandoned_retention(Duration::from_secs(3600))
    /// # }
    /// ```
    pub fn with_abandoned_retention(self, retention: Duration) -> Self {
        self.reconfigured(|settings| settings.abandoned_retention = retention)
    }

    /// Writes each record in its handler's own transaction. Off by default; on, for every
    /// layer given this store (or its clones): make one store per mode.
    ///
    /// The handler takes a [`HandlerTransaction`](super::HandlerTransaction) (an axum
    /// extractor with the feature `axum`; from the request's extensions otherwise), writes in
    /// it and returns its response, without committing. The layer then writes the record in
    /// that transaction, fenced by the claim's token, and commits, before it answers:
    ///
    /// - the handler's writes and the record commit together, or neither does;
    /// - a crash or panic before the commit rolls both back: the claim is known to have had
    ///   no effect, so a claim whose lease ended is taken over by the next request at once
    ///   (no [`Claim::Abandoned`](crate::Claim::Abandoned), no "outcome unknown");
    /// - a lost lease fails the fenced write: the transaction rolls back and the client gets
    ///   a 503 problem, never a second committed effect;
    /// - a failed commit answers a 503 problem and frees the key;
    /// - the response must be whole before the commit: a streamed body (one not ready at
    ///   once) is read to its end first, up to the layer's response limit
    ///   ([`with_response_body_limit`](crate::IdempotencyLayer::with_response_body_limit)),
    ///   and sent once committed;
    /// - past the limit, whether the body was ready at once or streamed, the key is spent as
    ///   without this setting: a not-replayable record commits with the handler's writes,
    ///   the response is delivered (the rest of a streamed body after the commit) and a
    ///   retry gets the 409 problem, never a second run. Rolling back instead would fail
    ///   every such request the same way until the limit or the handler changes, and free
    ///   the key of a handler whose effects outside the database happened;
    /// - a streamed body that fails or panics before its end rolls the writes back, frees
    ///   the key and answers a 500 problem (nothing of the response was sent);
    /// - a client that leaves while the body is being read stops it after
    ///   [`with_capture_after_disconnect`](crate::IdempotencyLayer::with_capture_after_disconnect):
    ///   the body is dropped and a not-replayable record commits with the writes, which
    ///   bounds how long a stalled body holds the key, a connection and its row locks while
    ///   a client waits for nothing;
    /// - a [`TransactionGuard`](super::TransactionGuard) still held when the layer commits
    ///   is waited for up to the response timeout, then the transaction rolls back (503).
    ///
    /// A handler that never begins its transaction is completed as without this setting.
    ///
    /// Each running handler holds a connection of the pool for its transaction; the store's
    /// own statements (claims, renewals) need others. Size the pool for both: a pool held
    /// entirely by handlers makes claims wait, and fail with a 503 after the response
    /// timeout.
    ///
    /// # Warning
    ///
    /// Only what the handler writes in the transaction is covered. An effect outside the
    /// database (a call to a card network, an email) is not rolled back by a crash, and with
    /// this setting a crashed claim is taken over without asking: keep such handlers on a
    /// store without it, where [`Recovery`](crate::Recovery) decides what a retry of an
    /// abandoned claim does.
    ///
    /// ```
    /// # fn f(store: tower_idempotency::PostgresStore) -> tower_idempotency::PostgresStore {
    /// store.in_handler_transaction()
    /// # }
    /// ```
    pub fn in_handler_transaction(self) -> Self {
        self.reconfigured(|settings| settings.in_handler_transaction = true)
    }

    /// The SQL that creates the store's table and indexes if they are missing: what
    /// [`migrate`](Self::migrate) runs, for applications that keep their own migrations.
    ///
    /// ```
    /// # fn f(store: tower_idempotency::PostgresStore) {
    /// assert!(store.migration().starts_with("CREATE TABLE IF NOT EXISTS idempotency_records"));
    /// # }
    /// ```
    pub fn migration(&self) -> String {
        schema::create(&self.shared.settings.table)
    }

    /// Creates the store's table and its indexes if they are missing
    /// ([`migration`](Self::migration)'s SQL). Safe to run on every start, by every instance
    /// at once: the statements run in one transaction under an advisory lock named after the
    /// table (concurrent `CREATE … IF NOT EXISTS` may otherwise fail).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let table = &self.shared.settings.table;
        let sql = format!(
            "SELECT pg_advisory_xact_lock(hashtext('tower_idempotency:{table}'));\n{}",
            self.migration()
        );
        sqlx::raw_sql(&sql)
            .execute(&self.pool)
            .await
            .map_err(store_error)?;
        Ok(())
    }

    /// The pool the store runs on.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Runs `operation` against the database, bounded by the response timeout.
    pub(super) async fn bounded<T>(
        &self,
        operation: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, StoreError> {
        let timeout = self.shared.settings.response_timeout;
        match tokio::time::timeout(timeout, operation).await {
            Ok(result) => result.map_err(store_error),
            Err(_) => Err(timed_out(timeout)),
        }
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let settings = &self.shared.settings;
        f.debug_struct("PostgresStore")
            .field("table", &settings.table)
            .field("response_timeout", &settings.response_timeout)
            .field("poll_interval", &settings.poll_interval)
            .field("abandoned_retention", &settings.abandoned_retention)
            .field("in_handler_transaction", &settings.in_handler_transaction)
            .finish_non_exhaustive()
    }
}
