//! Error types: opaque structs with a kind, the underlying cause kept as `source`.

use std::fmt;

/// A type-erased error, the currency of body and backend errors.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An error reported by an [`IdempotencyStore`](crate::IdempotencyStore).
///
/// The [`kind`](StoreError::kind) tells the layer what to do; the original backend error
/// stays reachable through [`std::error::Error::source`].
#[derive(Debug)]
pub struct StoreError {
    kind: StoreErrorKind,
    source: Option<BoxError>,
}

/// What went wrong in a store operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// The store could not be reached or did not answer in time.
    Unavailable,
    /// A stored value could not be decoded: corrupt bytes or an unknown format version.
    Corrupt,
    /// The caller's lease is gone: its claim expired, was released, or another owner holds the
    /// key now. The operation was refused and nothing was written.
    LeaseLost,
    /// Any other failure the backend reported.
    Other,
    /// The record was to be written in the handler's own transaction, and that transaction
    /// did not commit (the fenced write found the lease lost, or the commit failed): the
    /// handler's writes are undone with it. The layer answers a 503 problem in place of the
    /// handler's response and frees the key, so a retry executes again.
    RolledBack,
}

impl StoreError {
    /// Creates an error of `kind` caused by `source`.
    pub fn new(kind: StoreErrorKind, source: impl Into<BoxError>) -> Self {
        Self {
            kind,
            source: Some(source.into()),
        }
    }

    /// The store could not be reached; `source` is the transport error.
    pub fn unavailable(source: impl Into<BoxError>) -> Self {
        Self::new(StoreErrorKind::Unavailable, source)
    }

    /// A stored value could not be decoded; `source` says why.
    pub fn corrupt(source: impl Into<BoxError>) -> Self {
        Self::new(StoreErrorKind::Corrupt, source)
    }

    /// The caller no longer holds the lease it names.
    pub fn lease_lost() -> Self {
        Self {
            kind: StoreErrorKind::LeaseLost,
            source: None,
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            StoreErrorKind::Unavailable => "idempotency store unavailable",
            StoreErrorKind::Corrupt => "idempotency store returned a corrupt record",
            StoreErrorKind::LeaseLost => "idempotency lease lost",
            StoreErrorKind::Other => "idempotency store error",
            StoreErrorKind::RolledBack => {
                "the handler's transaction did not commit; its writes and record were rolled back"
            }
        };
        match &self.source {
            Some(source) => write!(f, "{what}: {source}"),
            None => f.write_str(what),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<crate::record::RecordError> for StoreError {
    fn from(error: crate::record::RecordError) -> Self {
        Self::corrupt(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn store_errors_keep_their_source_and_kind() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let error = StoreError::unavailable(io);
        assert_eq!(error.kind(), StoreErrorKind::Unavailable);
        assert_eq!(
            error.source().map(ToString::to_string).as_deref(),
            Some("refused")
        );
        assert_eq!(error.to_string(), "idempotency store unavailable: refused");
    }

    #[test]
    fn lease_lost_has_no_source() {
        let error = StoreError::lease_lost();
        assert_eq!(error.kind(), StoreErrorKind::LeaseLost);
        assert!(error.source().is_none());
    }
}
