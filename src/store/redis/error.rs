//! Turning what Redis answers into [`StoreError`]s of the right kind.

use std::{fmt, time::Duration};

use ::redis::{ErrorKind, RedisError, ServerErrorKind};

use crate::store::error::{StoreError, StoreErrorKind};

pub(super) fn timed_out(after: Duration) -> StoreError {
    StoreError::unavailable(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("redis did not answer within {after:?}"),
    ))
}

/// A failed claim's error: as [`store_error`], but a syntax error is a server older than 7.0,
/// which does not take `NX` together with `GET`.
pub(super) fn claim_error(error: RedisError) -> StoreError {
    let syntax = error.kind() == ErrorKind::Server(ServerErrorKind::ResponseError)
        && error
            .detail()
            .is_some_and(|detail| detail.to_ascii_lowercase().starts_with("syntax error"));
    if syntax {
        return StoreError::new(StoreErrorKind::Other, NeedsRedis7(error));
    }
    store_error(error)
}

pub(super) fn store_error(error: RedisError) -> StoreError {
    // A key of another type (a hash, a list) under one of ours: foreign data, like bad bytes.
    if error.code() == Some("WRONGTYPE") {
        return StoreError::corrupt(error);
    }
    let unavailable = error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_cluster_error()
        || matches!(
            error.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ReadOnly
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::ClusterDown
                )
        )
        || error.code() == Some("BUSY");
    let kind = if unavailable {
        StoreErrorKind::Unavailable
    } else {
        StoreErrorKind::Other
    };
    StoreError::new(kind, error)
}

/// A reply the store's scripts never give.
#[derive(Debug)]
pub(super) enum Unexpected {
    /// The key holds bytes that are neither a marker nor a record of this crate.
    Foreign,
    /// A reply of a shape the script does not return.
    Reply,
    /// A stored or reported time out of any clock's range.
    Time,
}

impl fmt::Display for Unexpected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Foreign => "the key holds a value that is not an idempotency record or claim",
            Self::Reply => "unexpected reply from redis",
            Self::Time => "a time out of range in an idempotency record, claim or reply",
        })
    }
}

impl std::error::Error for Unexpected {}

/// A server that refused `SET … NX … GET`: older than Redis 7.0.
#[derive(Debug)]
struct NeedsRedis7(RedisError);

impl fmt::Display for NeedsRedis7 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The server's reply is the source, for reporters that walk the chain.
        f.write_str(
            "RedisStore requires Redis 7.0 or newer: the server refused SET with both NX and GET",
        )
    }
}

impl std::error::Error for NeedsRedis7 {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use ::redis::Value;

    use super::*;

    #[test]
    fn a_server_older_than_7_is_told_apart_by_its_syntax_error() {
        // What Redis 6.2 answers to `SET key value NX PX 30000 GET`.
        let reply = ::redis::parse_redis_value(b"-ERR syntax error\r\n")
            .and_then(Value::extract_error)
            .err();
        let Some(refused) = reply else {
            panic!("an error reply parses as an error");
        };
        let error = claim_error(refused);
        assert_eq!(error.kind(), StoreErrorKind::Other);
        let message = error.to_string();
        assert!(message.contains("Redis 7.0 or newer"), "{message}");
        let reply = std::error::Error::source(&error)
            .and_then(std::error::Error::source)
            .map(ToString::to_string);
        assert!(
            reply
                .as_deref()
                .is_some_and(|reply| reply.contains("syntax error")),
            "the server's reply is kept as the source: {reply:?}"
        );

        let other = ::redis::parse_redis_value(b"-WRONGTYPE Operation against a key\r\n")
            .and_then(Value::extract_error)
            .err();
        let Some(other) = other else {
            panic!("an error reply parses as an error");
        };
        let error = claim_error(other);
        assert_eq!(error.kind(), StoreErrorKind::Corrupt);
        assert!(!error.to_string().contains("7.0"));
    }
}
