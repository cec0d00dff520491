//! Completion in the handler's own transaction
//! ([`PostgresStore::in_handler_transaction`](crate::PostgresStore::in_handler_transaction)):
//! the transaction the handler writes in, and the store's table of the ones open.
//!
//! Once a request holds its claim, the layer asks the store to prepare its handler
//! ([`IdempotencyStore::prepare_handler`](crate::IdempotencyStore::prepare_handler)): the
//! store registers a [`HandlerTransaction`] under the claim (key and token) and puts a handle
//! to it in the request's extensions. The handler begins it on first use and writes in it.
//! Completing the claim takes it back out of the table, writes the record in it, fenced by the
//! claim's token, and commits: the writes and the record commit or roll back together.
//! Releasing the claim (a response not stored, a handler error or panic) drops it, which rolls
//! it back.

use std::{
    collections::HashMap,
    fmt,
    ops::{Deref, DerefMut},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use tokio::sync::{MappedMutexGuard, Mutex as AsyncMutex, MutexGuard};

use crate::{key::StorageKey, store::FenceToken};

type Open = AsyncMutex<Option<Transaction<'static, Postgres>>>;

/// The transaction of a request whose record commits with the handler's writes: taken from
/// the request's extensions (or, with the feature `axum`, as an extractor), begun on first
/// use, committed by the layer together with the record once the handler has returned.
///
/// Only on a layer whose store is
/// [`PostgresStore::in_handler_transaction`](crate::PostgresStore::in_handler_transaction); a
/// request the layer does not protect (no key, a method not protected) has none.
///
/// ```
/// use axum::{http::StatusCode, response::IntoResponse};
/// use tower_idempotency::postgres::HandlerTransaction;
///
/// async fn debit(tx: HandlerTransaction) -> impl IntoResponse {
///     let Ok(mut tx) = tx.begin().await else {
///         return StatusCode::SERVICE_UNAVAILABLE;
///     };
///     let debited = sqlx::query("UPDATE accounts SET balance = balance - 10 WHERE id = 1")
///         .execute(&mut *tx)
///         .await;
///     // No commit here: the layer commits with the record, after this returns.
///     match debited {
///         Ok(_) => StatusCode::CREATED,
///         Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
///     }
/// }
/// ```
#[derive(Clone)]
pub struct HandlerTransaction {
    pool: PgPool,
    open: Arc<Open>,
}

/// A [`HandlerTransaction`], begun: a connection inside the transaction (`&mut *tx` is an
/// sqlx executor). Hold it across the handler's writes; the layer commits after the handler
/// returned, so dropping it commits nothing.
pub struct TransactionGuard<'a> {
    tx: MappedMutexGuard<'a, Transaction<'static, Postgres>>,
}

impl HandlerTransaction {
    /// Begins the transaction on first use (a connection from the store's pool, then
    /// `BEGIN`), and returns it. Later calls return the same transaction; one at a time.
    pub async fn begin(&self) -> Result<TransactionGuard<'_>, sqlx::Error> {
        let mut open = self.open.lock().await;
        if open.is_none() {
            *open = Some(self.pool.begin().await?);
        }
        match MutexGuard::try_map(open, Option::as_mut) {
            Ok(tx) => Ok(TransactionGuard { tx }),
            // Set just above, under the same lock.
            Err(_) => Err(sqlx::Error::PoolClosed),
        }
    }
}

impl Deref for TransactionGuard<'_> {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.tx
    }
}

impl DerefMut for TransactionGuard<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.tx
    }
}

impl fmt::Debug for HandlerTransaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerTransaction").finish_non_exhaustive()
    }
}

impl fmt::Debug for TransactionGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransactionGuard").finish_non_exhaustive()
    }
}

/// The handlers' transactions of one store, by the claim they belong to.
#[derive(Default)]
pub(super) struct Transactions {
    open: Mutex<HashMap<(StorageKey, FenceToken), Arc<Open>>>,
}

impl Transactions {
    /// A transaction for the claim `token` on `key`, registered until taken.
    pub(super) fn prepare(
        &self,
        pool: &PgPool,
        key: StorageKey,
        token: FenceToken,
    ) -> HandlerTransaction {
        let open = Arc::new(AsyncMutex::new(None));
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((key, token), Arc::clone(&open));
        HandlerTransaction {
            pool: pool.clone(),
            open,
        }
    }

    /// Takes the transaction of the claim `token` on `key` out of the table: `None` if there
    /// was none, `Some(None)` if the handler never began it.
    ///
    /// The handler has returned, but a guard it kept (in its response body, or a task of its
    /// own) is waited for, up to `wait`: `Err` if it was still held then (the transaction is
    /// rolled back once its last holder lets go).
    pub(super) async fn take(
        &self,
        key: StorageKey,
        token: FenceToken,
        wait: Duration,
    ) -> Result<Option<Option<Transaction<'static, Postgres>>>, Held> {
        let Some(open) = self
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(key, token))
        else {
            return Ok(None);
        };
        match tokio::time::timeout(wait, open.lock()).await {
            Ok(mut open) => Ok(Some(open.take())),
            Err(_) => Err(Held),
        }
    }
}

/// A handler's transaction still held (a [`TransactionGuard`] not dropped) when the layer
/// came to commit or roll it back.
#[derive(Debug)]
pub(super) struct Held;

impl fmt::Display for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "the handler's transaction was still held (a TransactionGuard not dropped) when \
             the layer came to commit it",
        )
    }
}

impl std::error::Error for Held {}

#[cfg(feature = "axum")]
mod extract {
    use axum::{
        extract::FromRequestParts,
        http::{StatusCode, request::Parts},
    };

    use super::HandlerTransaction;

    /// The handler's transaction, from the request's extensions; a 500 where the route is not
    /// under a layer whose store is
    /// [`PostgresStore::in_handler_transaction`](crate::PostgresStore::in_handler_transaction)
    /// (or the request was not protected).
    impl<S: Send + Sync> FromRequestParts<S> for HandlerTransaction {
        type Rejection = (StatusCode, &'static str);

        async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
            parts.extensions.get::<Self>().cloned().ok_or((
                StatusCode::INTERNAL_SERVER_ERROR,
                "no idempotency transaction: the request is not protected by a layer completing in the handler's transaction",
            ))
        }
    }
}
