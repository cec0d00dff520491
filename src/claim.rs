//! What a claim on a store returns: [`Claim`], and the [`FenceToken`] that names a claim.
//!
//! The vocabulary of [`IdempotencyStore`](crate::IdempotencyStore), kept apart from the trait
//! so that the modules the trait's signatures name (`inspect`) and the ones that report on
//! its results (`observe`) need not import the store module that imports them.
//!
//! Pure logic: no tower or tokio in here.

use std::{fmt, time::Duration};

use crate::{fingerprint::Fingerprint, record::Record};

/// What [`IdempotencyStore::claim`](crate::IdempotencyStore::claim) found.
// A transient return value: boxing the record would cost every replay an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key was free and is now claimed by the caller, who must complete, release or renew
    /// it with this token.
    Acquired(FenceToken),
    /// Another request holds the key.
    InFlight {
        /// The fingerprint of the request that holds it.
        fingerprint: Fingerprint,
    },
    /// Another request claimed the key and its lease ended without completion or release:
    /// its owner crashed or lost the store, and whether its work happened is unknown.
    /// Nothing was changed; [`take_over`](crate::IdempotencyStore::take_over) claims the key.
    ///
    /// A store that cannot tell an abandoned claim from a free key reports
    /// [`Claim::Acquired`] instead.
    Abandoned {
        /// The abandoned claim's token.
        token: FenceToken,
        /// The fingerprint of the request that held it.
        fingerprint: Fingerprint,
    },
    /// The key's request completed; here is its record.
    Completed {
        /// The record.
        record: Record,
        /// How long the store keeps it from now, if the store knows: caches in front of the
        /// store keep their copy no longer than this, and not at all when it is `None`.
        expires_in: Option<Duration>,
    },
}

/// Names one claim of a key: the fencing token that fenced operations must present.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct FenceToken(u64);

impl FenceToken {
    /// Wraps a token a store issued.
    pub fn new(token: u64) -> Self {
        Self(token)
    }

    /// The token's value.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Debug for FenceToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FenceToken({:#x})", self.0)
    }
}
