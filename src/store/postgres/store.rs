//! [`PostgresStore`]'s [`IdempotencyStore`] and [`AdminStore`] implementations: claim-or-replay,
//! the fenced statements, waiting, and the operator's tools.

use std::{pin::pin, time::Duration};

use bytes::Bytes;
use sqlx::{Row, postgres::PgRow};
use tokio::time::Instant;

use super::{
    connect::PostgresStore,
    error::{corrupt, unexpected},
};
use crate::{
    fingerprint::Fingerprint,
    key::StorageKey,
    layer::config::{MAX_LEASE, MAX_TTL},
    record::Record,
    store::error::{StoreError, StoreErrorKind},
    store::inspect::{ClaimPage, Inspection, ListCursor},
    store::{AdminStore, Claim, FenceToken, IdempotencyStore},
};

/// A waiter looks again this long after a lease's end (the database's clock and ours tick
/// apart by the round trip).
const EXPIRY_SLACK: Duration = Duration::from_millis(5);

/// How many times a claim asks again when the key changed under it (see
/// [`Statements::claim`](super::schema::Statements)); each time means another claim committed
/// meanwhile, so more is a sign of something else.
const CLAIM_ATTEMPTS: usize = 3;

/// A failure of a completion in the handler's transaction: the transaction is rolled back.
fn rolled_back(source: StoreError) -> StoreError {
    StoreError::new(StoreErrorKind::RolledBack, source)
}

/// A token as PostgreSQL's `bigint` (the same 64 bits).
pub(super) fn token_sql(token: FenceToken) -> i64 {
    i64::from_be_bytes(token.get().to_be_bytes())
}

/// A `bigint` token read back.
pub(super) fn token_of(value: i64) -> FenceToken {
    FenceToken::new(u64::from_be_bytes(value.to_be_bytes()))
}

/// A duration as whole milliseconds, at most `max` ([`MAX_TTL`] or [`MAX_LEASE`]).
pub(super) fn millis(duration: Duration, max: Duration) -> i64 {
    i64::try_from(duration.min(max).as_millis()).unwrap_or(i64::MAX)
}

/// A `bytea` column of exactly 32 bytes.
pub(super) fn bytes32(row: &PgRow, column: &'static str) -> Result<[u8; 32], StoreError> {
    let value: Vec<u8> = row.try_get(column).map_err(|_| corrupt(column))?;
    <[u8; 32]>::try_from(value.as_slice()).map_err(|_| corrupt(column))
}

/// Milliseconds from the database as a duration: none when negative.
pub(super) fn left(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

impl PostgresStore {
    /// Claims `key` under `token`, or takes over the abandoned claim `abandoned`: one
    /// statement. A claim whose reply is lost is released by the caller, which chose its token.
    async fn claim_with(
        &self,
        key: &StorageKey,
        token: FenceToken,
        fingerprint: &Fingerprint,
        lease: Duration,
        abandoned: Option<FenceToken>,
    ) -> Result<Claim, StoreError> {
        let lease = millis(lease, MAX_LEASE);
        let retention = millis(self.shared.settings.abandoned_retention, MAX_TTL);
        for _ in 0..CLAIM_ATTEMPTS {
            let query = sqlx::query(&self.shared.statements.claim)
                .bind(&key.as_bytes()[..])
                .bind(token_sql(token))
                .bind(&fingerprint.as_bytes()[..])
                .bind(lease)
                .bind(retention)
                .bind(abandoned.map(token_sql))
                .bind(self.shared.settings.in_handler_transaction);
            let row = match self.bounded(query.fetch_optional(&self.pool)).await {
                Ok(Some(row)) => row,
                // Another claim committed between the insert's look at the key and the
                // statement's snapshot: ask again, with a fresh snapshot.
                Ok(None) => continue,
                Err(error) => return Err(error),
            };
            return held_by(&row, token);
        }
        Err(unexpected())
    }

    /// Runs a fenced statement: `Ok` when it changed the claim's row, `LeaseLost` otherwise.
    async fn fenced<'q>(
        &self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<(), StoreError> {
        match self.bounded(query.fetch_optional(&self.pool)).await? {
            Some(_) => Ok(()),
            None => Err(StoreError::lease_lost()),
        }
    }

    /// Writes the record in the handler's transaction `tx`, fenced by `token`, and commits:
    /// any failure rolls the handler's writes back with it
    /// ([`StoreErrorKind::RolledBack`]).
    async fn complete_in(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
        key: &StorageKey,
        token: FenceToken,
        record: &Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let query = self.completion(key, token, record.encode(), ttl);
        match self.bounded(query.fetch_optional(&mut *tx)).await {
            Ok(Some(_)) => {}
            Ok(None) => return Err(rolled_back(StoreError::lease_lost())),
            Err(error) => return Err(rolled_back(error)),
        }
        self.bounded(tx.commit()).await.map_err(rolled_back)?;
        self.shared.notifier.wake(key);
        Ok(())
    }

    /// The statement that replaces the live claim `token` with `record`.
    pub(super) fn completion<'q>(
        &'q self,
        key: &StorageKey,
        token: FenceToken,
        encoded: Vec<u8>,
        ttl: Duration,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        sqlx::query(&self.shared.statements.complete)
            .bind(key.as_bytes().to_vec())
            .bind(token_sql(token))
            .bind(encoded)
            .bind(millis(ttl, MAX_TTL))
            .bind(self.shared.settings.table.channel())
    }
}

/// What the claim statement's row says.
fn held_by(row: &PgRow, token: FenceToken) -> Result<Claim, StoreError> {
    let state: i32 = row.try_get("state").map_err(|_| unexpected())?;
    if state == 0 {
        return Ok(Claim::Acquired(token));
    }
    let fingerprint = Fingerprint::from_bytes(bytes32(row, "fingerprint")?);
    match state {
        1 => {
            let record: Vec<u8> = row.try_get("record").map_err(|_| corrupt("record"))?;
            let left_ms: i64 = row.try_get("left_ms").map_err(|_| unexpected())?;
            Ok(Claim::Completed {
                record: Record::decode(Bytes::from(record))?,
                expires_in: Some(left(left_ms)),
            })
        }
        2 => Ok(Claim::InFlight { fingerprint }),
        3 => {
            let held: i64 = row.try_get("token").map_err(|_| corrupt("token"))?;
            Ok(Claim::Abandoned {
                token: token_of(held),
                fingerprint,
            })
        }
        _ => Err(unexpected()),
    }
}

impl IdempotencyStore for PostgresStore {
    async fn claim_as(
        &self,
        key: &StorageKey,
        token: FenceToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.claim_with(key, token, fingerprint, lease, None).await
    }

    async fn complete(
        &self,
        key: &StorageKey,
        token: FenceToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        if self.shared.settings.in_handler_transaction {
            let wait = self.shared.settings.response_timeout;
            match self.shared.transactions.take(*key, token, wait).await {
                Ok(Some(Some(tx))) => return self.complete_in(tx, key, token, &record, ttl).await,
                Ok(_) => {}
                // Never completed outside a transaction that may still commit nothing.
                Err(held) => return Err(rolled_back(StoreError::unavailable(held))),
            }
        }
        let query = self.completion(key, token, record.encode(), ttl);
        self.fenced(query).await?;
        self.shared.notifier.wake(key);
        Ok(())
    }

    async fn release(&self, key: &StorageKey, token: FenceToken) -> Result<(), StoreError> {
        let wait = self.shared.settings.response_timeout;
        if self.shared.settings.in_handler_transaction
            && let Ok(Some(Some(tx))) = self.shared.transactions.take(*key, token, wait).await
        {
            // The handler's writes are undone; a rollback that does not arrive is the
            // server's, when the connection closes.
            let _ = self.bounded(tx.rollback()).await;
        }
        let query = sqlx::query(&self.shared.statements.release)
            .bind(&key.as_bytes()[..])
            .bind(token_sql(token))
            .bind(self.shared.settings.table.channel());
        self.fenced(query).await?;
        self.shared.notifier.wake(key);
        Ok(())
    }

    async fn renew(
        &self,
        key: &StorageKey,
        token: FenceToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let query = sqlx::query(&self.shared.statements.renew)
            .bind(&key.as_bytes()[..])
            .bind(token_sql(token))
            .bind(millis(lease, MAX_LEASE))
            .bind(millis(self.shared.settings.abandoned_retention, MAX_TTL));
        self.fenced(query).await
    }

    async fn wait(&self, key: &StorageKey, timeout: Duration) -> Result<(), StoreError> {
        let deadline = Instant::now() + timeout.min(MAX_TTL);
        let poll = self.shared.settings.poll_interval;
        let mut watch = self
            .shared
            .notifier
            .watch(*key, self.shared.settings.response_timeout.min(poll))
            .await;
        loop {
            // Registered before looking: an end notified from now on wakes this wait.
            let mut notified = pin!(watch.notify.notified());
            notified.as_mut().enable();
            let query = sqlx::query_scalar::<_, i64>(&self.shared.statements.watch)
                .bind(&key.as_bytes()[..]);
            let Some(left_ms) = self.bounded(query.fetch_optional(&self.pool)).await? else {
                // Free, completed, or its lease has ended.
                return Ok(());
            };
            let looked_at = Instant::now();
            let lease_end = looked_at.checked_add(left(left_ms).saturating_add(EXPIRY_SLACK));
            let wake_at = [looked_at.checked_add(poll), lease_end]
                .into_iter()
                .flatten()
                .fold(deadline, Instant::min);
            tokio::select! {
                () = notified => return Ok(()),
                // The listener is back: an end may have been missed, look again.
                Ok(()) = watch.epoch.changed() => {}
                () = tokio::time::sleep_until(wake_at) => {}
            }
            if Instant::now() >= deadline {
                return Ok(());
            }
        }
    }

    async fn take_over_as(
        &self,
        key: &StorageKey,
        abandoned: FenceToken,
        token: FenceToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.claim_with(key, token, fingerprint, lease, Some(abandoned))
            .await
    }

    fn prepare_handler(
        &self,
        key: &StorageKey,
        token: FenceToken,
        extensions: &mut http::Extensions,
    ) -> bool {
        if !self.shared.settings.in_handler_transaction {
            return false;
        }
        extensions.insert(self.shared.transactions.prepare(&self.pool, *key, token));
        true
    }

    const NAME: &'static str = "postgres";
}

impl AdminStore for PostgresStore {
    async fn inspect(&self, key: &StorageKey) -> Result<Option<Inspection>, StoreError> {
        self.inspect_key(key).await
    }

    async fn forget(&self, key: &StorageKey) -> Result<bool, StoreError> {
        let query =
            sqlx::query_scalar::<_, bool>(&self.shared.statements.forget).bind(&key.as_bytes()[..]);
        Ok(self
            .bounded(query.fetch_optional(&self.pool))
            .await?
            .unwrap_or(false))
    }

    async fn break_claim(&self, key: &StorageKey) -> Result<Option<FenceToken>, StoreError> {
        let query = sqlx::query_scalar::<_, i64>(&self.shared.statements.break_claim)
            .bind(&key.as_bytes()[..])
            .bind(self.shared.settings.table.channel());
        let token = self
            .bounded(query.fetch_optional(&self.pool))
            .await?
            .map(token_of);
        if token.is_some() {
            self.shared.notifier.wake(key);
        }
        Ok(token)
    }

    async fn list_claims(
        &self,
        older_than: Duration,
        cursor: Option<ListCursor>,
        limit: usize,
    ) -> Result<ClaimPage, StoreError> {
        self.list(older_than, cursor, limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_survive_the_trip_through_bigint() {
        for token in [0, 1, u64::MAX, u64::MAX / 2, 1 << 63, 0xdead_beef_cafe_f00d] {
            let token = FenceToken::new(token);
            assert_eq!(token_of(token_sql(token)), token);
        }
    }

    #[test]
    fn durations_become_milliseconds_within_the_bound() {
        let cases = [
            (Duration::ZERO, MAX_TTL, 0),
            (Duration::from_micros(1_500), MAX_TTL, 1),
            (Duration::from_secs(86_400), MAX_TTL, 86_400_000),
            (Duration::MAX, MAX_TTL, 31_536_000_000),
            (Duration::MAX, MAX_LEASE, 3_600_000),
        ];
        for (duration, max, expected) in cases {
            assert_eq!(
                millis(duration, max),
                expected,
                "{duration:?} up to {max:?}"
            );
        }
    }

    #[test]
    fn negative_time_left_is_none() {
        assert_eq!(left(-5), Duration::ZERO);
        assert_eq!(left(i64::MIN), Duration::ZERO);
        assert_eq!(left(1500), Duration::from_millis(1500));
    }
}
