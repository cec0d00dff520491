//! Turning what sqlx and PostgreSQL answer into [`StoreError`]s of the right kind.

use std::{fmt, time::Duration};

use crate::store::error::{StoreError, StoreErrorKind};

/// An error sqlx reported, by kind: the server or the pool out of reach, or a failure that
/// is not transient, or a failure of the database to keep a promise (serialization, deadlock)
/// that the next attempt does not meet.
pub(super) fn store_error(error: sqlx::Error) -> StoreError {
    let unavailable = match &error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(database) => database.code().is_some_and(|code| transient(&code)),
        _ => false,
    };
    let kind = if unavailable {
        StoreErrorKind::Unavailable
    } else {
        StoreErrorKind::Other
    };
    StoreError::new(kind, error)
}

/// Whether an SQLSTATE names a condition that passes: the connection (class 08), the server
/// shutting down or starting (57P01-57P03), too many connections (53300), a serialization
/// failure or deadlock (40001, 40P01), or a statement cancelled by its timeout (57014).
fn transient(code: &str) -> bool {
    code.starts_with("08")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01" | "57014"
        )
}

pub(super) fn timed_out(after: Duration) -> StoreError {
    StoreError::unavailable(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("postgres did not answer within {after:?}"),
    ))
}

/// What a row of ours held that this version cannot read.
#[derive(Debug)]
pub(super) enum Unexpected {
    /// A key, fingerprint or token column of the wrong length.
    Column(&'static str),
    /// A statement returned a shape it never returns.
    Reply,
}

impl fmt::Display for Unexpected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Column(column) => {
                write!(f, "the column `{column}` holds a value of the wrong size")
            }
            Self::Reply => f.write_str("postgres answered in a shape this version never asks for"),
        }
    }
}

impl std::error::Error for Unexpected {}

pub(super) fn corrupt(column: &'static str) -> StoreError {
    StoreError::corrupt(Unexpected::Column(column))
}

pub(super) fn unexpected() -> StoreError {
    StoreError::new(StoreErrorKind::Other, Unexpected::Reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_that_pass_are_unavailable_and_others_are_not() {
        let cases = [
            ("08006", true),
            ("08001", true),
            ("57P01", true),
            ("57P03", true),
            ("53300", true),
            ("40001", true),
            ("40P01", true),
            ("57014", true),
            ("23505", false),
            ("42P01", false),
            ("22P02", false),
            ("", false),
        ];
        for (code, expected) in cases {
            assert_eq!(transient(code), expected, "SQLSTATE {code:?}");
        }
    }

    #[test]
    fn transport_failures_are_unavailable() {
        let cases = [
            (sqlx::Error::PoolTimedOut, StoreErrorKind::Unavailable),
            (sqlx::Error::PoolClosed, StoreErrorKind::Unavailable),
            (
                sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
                StoreErrorKind::Unavailable,
            ),
            (sqlx::Error::RowNotFound, StoreErrorKind::Other),
            (
                sqlx::Error::ColumnNotFound("record".into()),
                StoreErrorKind::Other,
            ),
        ];
        for (error, kind) in cases {
            let what = error.to_string();
            assert_eq!(store_error(error).kind(), kind, "{what}");
        }
    }
}
