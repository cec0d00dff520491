//! The table [`PostgresStore`](super::PostgresStore) keeps its rows in, and the statements it
//! runs on it: each one statement, atomic by itself, judged by the database's clock.
//!
//! Pure text: no sqlx, no tokio. The table's name is checked here once, and every statement is
//! written out for it when the store is made.
//!
//! Time is `statement_timestamp()`: the database's clock when the statement arrived. Unlike
//! `now()` it moves on inside a transaction, which matters when a record is completed in the
//! handler's own (long) transaction; unlike `clock_timestamp()` it is stable within the
//! statement, so a comparison with it can use an index.

use std::fmt;

/// The default table name: `idempotency_records`.
pub const DEFAULT_TABLE: &str = "idempotency_records";

/// A table name that is safe to write into SQL unquoted: `name` or `schema.name`, each part
/// ASCII lower-case letters, digits and `_`, not starting with a digit, at most 50 bytes in all
/// (index names and the notification channel add a suffix to it within PostgreSQL's 63).
#[derive(Clone, PartialEq, Eq)]
pub(super) struct Table(String);

impl Table {
    pub(super) fn parse(name: &str) -> Option<Self> {
        let part_ok = |part: &str| {
            let mut bytes = part.bytes();
            bytes
                .next()
                .is_some_and(|first| first.is_ascii_lowercase() || first == b'_')
                && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        let mut parts = name.split('.');
        let ok = name.len() <= 50
            && match (parts.next(), parts.next(), parts.next()) {
                (Some(table), None, None) => part_ok(table),
                (Some(schema), Some(table), None) => part_ok(schema) && part_ok(table),
                _ => false,
            };
        ok.then(|| Self(name.to_owned()))
    }

    /// The name without its schema: the stem of the index names.
    fn bare(&self) -> &str {
        self.0.rsplit('.').next().unwrap_or(&self.0)
    }

    /// The channel waiters listen on: the table's name, which is unique in its database.
    pub(super) fn channel(&self) -> &str {
        &self.0
    }
}

impl Default for Table {
    /// [`DEFAULT_TABLE`], which [`Table::parse`] accepts (a test says so).
    fn default() -> Self {
        Self(DEFAULT_TABLE.to_owned())
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// The SQL that creates the table and its indexes, if missing: what
/// [`PostgresStore::migrate`](super::PostgresStore::migrate) runs.
pub(super) fn create(table: &Table) -> String {
    let bare = table.bare();
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (
    key          bytea       PRIMARY KEY,
    token        bigint      NOT NULL,
    fingerprint  bytea       NOT NULL,
    claimed_at   timestamptz NOT NULL,
    lease_until  timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    completed_at timestamptz,
    record       bytea
);
CREATE INDEX IF NOT EXISTS {bare}_expires_at ON {table} (expires_at);
CREATE INDEX IF NOT EXISTS {bare}_in_flight ON {table} (key) WHERE record IS NULL;
"
    )
}

/// `$n` milliseconds as an interval.
macro_rules! ms {
    ($n:literal) => {
        concat!("($", $n, "::float8 * interval '1 millisecond')")
    };
}

/// A timestamp as Unix milliseconds.
macro_rules! epoch_ms {
    ($column:literal) => {
        concat!("(extract(epoch FROM ", $column, ") * 1000)::bigint")
    };
}

/// Every statement the store runs, written out for one table.
#[derive(Debug)]
pub(super) struct Statements {
    /// `$1` key, `$2` token, `$3` fingerprint, `$4` lease (ms), `$5` retention of an abandoned
    /// claim (ms), `$6` the abandoned claim's token to take over, or NULL, `$7` whether any
    /// claim whose lease ended is taken over (completion in the handler's transaction: such a
    /// claim had no effect).
    ///
    /// Returns one row: `state` 0 when the key is now claimed with `$2`; otherwise what holds
    /// it: 1 a record (`record`, `left_ms` of its TTL), 2 a live claim (`left_ms` of its
    /// lease), 3 an abandoned claim. No row at all when the key changed between the insert's
    /// look and the statement's snapshot (a concurrent claim committed meanwhile): ask again.
    pub(super) claim: String,
    /// `$1` key, `$2` token, `$3` the encoded record, `$4` TTL (ms), `$5` channel. A row when
    /// the live claim `$2` was replaced by the record.
    pub(super) complete: String,
    /// `$1` key, `$2` token, `$3` channel. A row when the claim `$2` was removed.
    pub(super) release: String,
    /// `$1` key, `$2` token, `$3` lease (ms), `$4` retention (ms). A row when the live claim
    /// `$2` was extended.
    pub(super) renew: String,
    /// `$1` key. What a waiter needs: `left_ms` of a live claim's lease; no row when the key
    /// holds no live claim.
    pub(super) watch: String,
    /// `$1` key. The whole row, if it has not expired, with the database's time.
    pub(super) inspect: String,
    /// `$1` key. A row, `live`, when a record was removed.
    pub(super) forget: String,
    /// `$1` key, `$2` channel. The token of the claim removed, if any.
    pub(super) break_claim: String,
    /// `$1` the key after which to start, `$2` how many claims to look at, `$3` minimum age (ms).
    pub(super) list: String,
    /// `$1` the most rows to delete.
    pub(super) purge: String,
}

impl Statements {
    pub(super) fn new(table: &Table) -> Self {
        Self {
            claim: format!(
                "WITH claimed AS (
    INSERT INTO {table} AS held (key, token, fingerprint, claimed_at, lease_until, expires_at)
    VALUES ($1, $2, $3, statement_timestamp(), statement_timestamp() + {lease},
            statement_timestamp() + {lease} + {retention})
    ON CONFLICT (key) DO UPDATE SET token = excluded.token, fingerprint = excluded.fingerprint,
        claimed_at = excluded.claimed_at, lease_until = excluded.lease_until,
        expires_at = excluded.expires_at, completed_at = NULL, record = NULL
    WHERE held.expires_at <= statement_timestamp()
       OR (held.record IS NULL AND (held.token = $6 OR $7)
           AND held.lease_until <= statement_timestamp())
    RETURNING 0
)
SELECT 0::int4 AS state, NULL::bigint AS token, NULL::bytea AS fingerprint,
       NULL::bytea AS record, NULL::bigint AS left_ms
FROM claimed
UNION ALL
SELECT CASE WHEN record IS NOT NULL THEN 1
            WHEN lease_until > statement_timestamp() THEN 2 ELSE 3 END,
       token, fingerprint, record,
       {left}
FROM {table}
WHERE key = $1 AND expires_at > statement_timestamp() AND NOT EXISTS (SELECT 1 FROM claimed)",
                lease = ms!(4),
                retention = ms!(5),
                left = epoch_ms!(
                    "(CASE WHEN record IS NOT NULL THEN expires_at ELSE lease_until END) - statement_timestamp()"
                ),
            ),
            complete: format!(
                "WITH done AS (
    UPDATE {table} SET record = $3, completed_at = statement_timestamp(),
        expires_at = statement_timestamp() + {ttl}
    WHERE key = $1 AND token = $2 AND record IS NULL AND lease_until > statement_timestamp()
    RETURNING key
)
SELECT 1::int4 FROM done, pg_notify($5, encode(done.key, 'hex'))",
                ttl = ms!(4),
            ),
            release: format!(
                "WITH gone AS (
    DELETE FROM {table} WHERE key = $1 AND token = $2 AND record IS NULL RETURNING key
)
SELECT 1::int4 FROM gone, pg_notify($3, encode(gone.key, 'hex'))"
            ),
            renew: format!(
                "UPDATE {table} SET lease_until = statement_timestamp() + {lease},
    expires_at = statement_timestamp() + {lease} + {retention}
WHERE key = $1 AND token = $2 AND record IS NULL AND lease_until > statement_timestamp()
RETURNING 1::int4",
                lease = ms!(3),
                retention = ms!(4),
            ),
            watch: format!(
                "SELECT {left} FROM {table}
WHERE key = $1 AND record IS NULL AND lease_until > statement_timestamp()",
                left = epoch_ms!("lease_until - statement_timestamp()"),
            ),
            inspect: format!(
                "SELECT token, fingerprint, record, {claimed}, {lease}, {completed}, {expires}, {now}
FROM {table} WHERE key = $1 AND expires_at > statement_timestamp()",
                claimed = epoch_ms!("claimed_at"),
                lease = epoch_ms!("lease_until"),
                completed = epoch_ms!("completed_at"),
                expires = epoch_ms!("expires_at"),
                now = epoch_ms!("statement_timestamp()"),
            ),
            forget: format!(
                "DELETE FROM {table} WHERE key = $1 AND record IS NOT NULL
RETURNING expires_at > statement_timestamp()"
            ),
            break_claim: format!(
                "WITH gone AS (
    DELETE FROM {table}
    WHERE key = $1 AND record IS NULL AND expires_at > statement_timestamp()
    RETURNING key, token
)
SELECT gone.token FROM gone, pg_notify($2, encode(gone.key, 'hex'))"
            ),
            list: format!(
                "SELECT key, token, fingerprint, {claimed}, {lease},
       expires_at > statement_timestamp()
           AND claimed_at <= statement_timestamp() - {age} AS listed
FROM (SELECT * FROM {table} WHERE record IS NULL AND key > $1 ORDER BY key LIMIT $2) AS page
ORDER BY key",
                claimed = epoch_ms!("claimed_at"),
                lease = epoch_ms!("lease_until"),
                age = ms!(3),
            ),
            purge: format!(
                "WITH expired AS (
    SELECT key FROM {table} WHERE expires_at <= statement_timestamp()
    ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED
)
DELETE FROM {table} AS row USING expired WHERE row.key = expired.key"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers_or_refused() {
        let cases = [
            ("idempotency_records", true),
            ("payments.idempotency", true),
            ("_t1", true),
            ("t", true),
            ("", false),
            ("1abc", false),
            ("Records", false),
            ("records;drop table x", false),
            ("a.b.c", false),
            (".t", false),
            ("t.", false),
            ("\"quoted\"", false),
            ("tab le", false),
            ("é", false),
            (&"x".repeat(50), true),
            (&"x".repeat(51), false),
        ];
        for (name, ok) in cases {
            assert_eq!(Table::parse(name).is_some(), ok, "{name:?}");
        }
    }

    #[test]
    fn the_default_table_is_a_valid_name() {
        assert_eq!(Table::parse(DEFAULT_TABLE), Some(Table::default()));
    }

    #[test]
    fn indexes_are_named_after_the_bare_table() {
        let sql = create(&Table::parse("payments.keys").unwrap());
        assert!(sql.contains("CREATE TABLE IF NOT EXISTS payments.keys ("));
        assert!(sql.contains("keys_expires_at ON payments.keys (expires_at)"));
        assert!(sql.contains("keys_in_flight ON payments.keys (key) WHERE record IS NULL"));
    }

    #[test]
    fn every_statement_names_the_table_and_no_other() {
        let statements = Statements::new(&Table::parse("my_keys").unwrap());
        let all = [
            &statements.claim,
            &statements.complete,
            &statements.release,
            &statements.renew,
            &statements.watch,
            &statements.inspect,
            &statements.forget,
            &statements.break_claim,
            &statements.list,
            &statements.purge,
        ];
        for sql in all {
            assert!(sql.contains("my_keys"), "{sql}");
            assert!(!sql.contains(DEFAULT_TABLE), "{sql}");
            assert!(
                !sql.contains("now()"),
                "the statement's own clock only: {sql}"
            );
        }
    }
}
