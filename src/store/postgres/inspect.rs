//! The operator's tools on [`PostgresStore`]: looking a key up, listing claims page by page,
//! and purging expired rows.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use sqlx::Row;

use super::{
    connect::PostgresStore,
    error::{corrupt, unexpected},
    store::{bytes32, millis, token_of},
};
use crate::{
    fingerprint::Fingerprint,
    key::StorageKey,
    layer::config::MAX_TTL,
    record::Record,
    store::error::StoreError,
    store::inspect::{ClaimInfo, ClaimPage, Inspection, ListCursor, RecordInfo},
};

/// The most rows one call of [`PostgresStore::purge_expired`] deletes.
pub const MAX_PURGE_BATCH: usize = 10_000;

/// The most batches one round of the background purger deletes before it sleeps again.
const PURGE_ROUNDS: usize = 100;

/// Unix milliseconds from the database as a time.
fn at(ms: i64) -> SystemTime {
    let since = Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    SystemTime::UNIX_EPOCH
        .checked_add(since)
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

impl PostgresStore {
    pub(super) async fn inspect_key(
        &self,
        key: &StorageKey,
    ) -> Result<Option<Inspection>, StoreError> {
        let query = sqlx::query(&self.shared.statements.inspect).bind(&key.as_bytes()[..]);
        let Some(row) = self.bounded(query.fetch_optional(&self.pool)).await? else {
            return Ok(None);
        };
        let ms = |index: usize| {
            row.try_get::<Option<i64>, _>(index)
                .map_err(|_| unexpected())
        };
        let record: Option<Vec<u8>> = row.try_get(2).map_err(|_| corrupt("record"))?;
        if let Some(record) = record {
            let record = Record::decode(Bytes::from(record))?;
            return Ok(Some(Inspection::Completed(RecordInfo::of(
                &record,
                ms(5)?.map(at),
                ms(6)?.map(at),
            ))));
        }
        let token: i64 = row.try_get(0).map_err(|_| corrupt("token"))?;
        let fingerprint = Fingerprint::from_bytes(bytes32(&row, "fingerprint")?);
        let claimed_at = ms(3)?.map(at);
        let lease_until = ms(4)?.map(at).ok_or_else(unexpected)?;
        Ok(Some(Inspection::InFlight(ClaimInfo::new(
            *key,
            token_of(token),
            fingerprint,
            claimed_at,
            lease_until,
        ))))
    }

    /// One page of claims, in key order from `cursor` (the hex of the last key looked at):
    /// one index range scan of at most `limit` claims.
    pub(super) async fn list(
        &self,
        older_than: Duration,
        cursor: Option<ListCursor>,
        limit: usize,
    ) -> Result<ClaimPage, StoreError> {
        let after = match &cursor {
            None => Vec::new(),
            Some(cursor) => StorageKey::from_hex(cursor.as_str())
                .ok_or_else(unexpected)?
                .as_bytes()
                .to_vec(),
        };
        let limit = limit.clamp(1, MAX_PURGE_BATCH);
        let query = sqlx::query(&self.shared.statements.list)
            .bind(after)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .bind(millis(older_than, MAX_TTL));
        let rows = self.bounded(query.fetch_all(&self.pool)).await?;
        let mut claims = Vec::with_capacity(rows.len());
        let mut last = None;
        for row in &rows {
            let key = StorageKey::from_bytes(bytes32(row, "key")?);
            last = Some(key);
            let listed: bool = row.try_get("listed").map_err(|_| unexpected())?;
            if !listed {
                continue;
            }
            let token: i64 = row.try_get("token").map_err(|_| corrupt("token"))?;
            let claimed_at: i64 = row.try_get(3).map_err(|_| unexpected())?;
            let lease_until: i64 = row.try_get(4).map_err(|_| unexpected())?;
            claims.push(ClaimInfo::new(
                key,
                token_of(token),
                Fingerprint::from_bytes(bytes32(row, "fingerprint")?),
                Some(at(claimed_at)),
                at(lease_until),
            ));
        }
        let next = match last {
            Some(last) if rows.len() == limit => Some(ListCursor::new(last.to_hex())),
            _ => None,
        };
        Ok(ClaimPage { claims, next })
    }

    /// Deletes at most `batch` rows (capped at [`MAX_PURGE_BATCH`]) that have expired:
    /// records past their TTL and abandoned claims past their retention. Returns how many it
    /// deleted; fewer than `batch` means none is left. One statement, an index range scan
    /// on the expiry (it never scans the table), skipping rows locked by others.
    ///
    /// Expired rows are never returned by the store's reads, and a claim replaces one in
    /// place: purging only gives the space back.
    ///
    /// ```
    /// # async fn run(store: tower_idempotency::PostgresStore) -> Result<(), tower_idempotency::StoreError> {
    /// while store.purge_expired(1000).await? == 1000 {}
    /// # Ok(()) }
    /// ```
    pub async fn purge_expired(&self, batch: usize) -> Result<u64, StoreError> {
        let batch = batch.clamp(1, MAX_PURGE_BATCH);
        let query = sqlx::query(&self.shared.statements.purge)
            .bind(i64::try_from(batch).unwrap_or(i64::MAX));
        Ok(self
            .bounded(query.execute(&self.pool))
            .await?
            .rows_affected())
    }

    /// Purges expired rows in the background every `every`, in batches of `batch` (at most
    /// 100 batches a round), until the returned [`Purger`] is dropped. Off unless started:
    /// an application that purges otherwise (a cron job calling
    /// [`purge_expired`](Self::purge_expired)) needs none. Run it on one instance or on all:
    /// concurrent purgers skip each other's rows.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # async fn run(store: tower_idempotency::PostgresStore) {
    /// let purger = store.spawn_purger(Duration::from_secs(60), 1000);
    /// # drop(purger); }
    /// ```
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, or if `every` is zero.
    pub fn spawn_purger(&self, every: Duration, batch: usize) -> Purger {
        assert!(
            !every.is_zero(),
            "PostgresStore::spawn_purger: a zero interval purges without pause"
        );
        let store = self.clone();
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                for _ in 0..PURGE_ROUNDS {
                    match store.purge_expired(batch).await {
                        Ok(purged) if purged >= batch.clamp(1, MAX_PURGE_BATCH) as u64 => {}
                        Ok(_) => break,
                        Err(error) => {
                            tracing::warn!(%error, "purging expired idempotency records failed");
                            break;
                        }
                    }
                }
            }
        });
        Purger {
            task: task.abort_handle(),
        }
    }
}

/// The background purger of a [`PostgresStore`] ([`PostgresStore::spawn_purger`]): it stops
/// when this is dropped.
#[derive(Debug)]
#[must_use = "the purger stops when dropped"]
pub struct Purger {
    task: tokio::task::AbortHandle,
}

impl Drop for Purger {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_milliseconds_become_times_without_panicking() {
        let cases = [
            (0, SystemTime::UNIX_EPOCH),
            (-1, SystemTime::UNIX_EPOCH),
            (i64::MIN, SystemTime::UNIX_EPOCH),
            (1_500, SystemTime::UNIX_EPOCH + Duration::from_millis(1_500)),
        ];
        for (ms, expected) in cases {
            assert_eq!(at(ms), expected, "{ms}");
        }
        // The far future is a time, whatever the platform can hold.
        let _ = at(i64::MAX);
    }
}
