//! What a claim on a store returns: [`Claim`], and the [`FenceToken`] that names a claim.
//!
//! The vocabulary of [`IdempotencyStore`](crate::IdempotencyStore), kept apart from the trait
//! so that the modules the trait's signatures name (`inspect`) and the ones that report on
//! its results (`observe`) need not import the store module that imports them.
//!
//! Pure logic: no tower or tokio in here.

use std::{
    fmt,
    hash::{BuildHasher, Hasher, RandomState},
    sync::{
        LazyLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

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
    /// Every store must report it (never [`Claim::Acquired`]) for as long as it keeps the
    /// abandoned claim: the layer lets the application choose between running the request
    /// again and answering `409` outcome-unknown
    /// ([`with_outcome_unknown`](crate::IdempotencyLayer::with_outcome_unknown)).
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
///
/// The claimant chooses it ([`generate`](Self::generate)) and sends it with the claim, so a
/// claim whose reply was lost (the command may have landed) can still be released by its
/// token.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct FenceToken(u64);

/// What [`FenceToken::generate`] hashes: a counter, keyed at random once per process.
static TOKENS: LazyLock<(RandomState, AtomicU64)> =
    LazyLock::new(|| (RandomState::new(), AtomicU64::new(0)));

impl FenceToken {
    /// Wraps a token value.
    pub fn new(token: u64) -> Self {
        Self(token)
    }

    /// A new token for a claim: a counter hashed with a key drawn at random once per
    /// process, so tokens do not repeat (short of a 64-bit collision), neither within a
    /// process nor between processes sharing a store, and cannot be guessed from one another.
    ///
    /// ```
    /// use tower_idempotency::FenceToken;
    ///
    /// assert_ne!(FenceToken::generate(), FenceToken::generate());
    /// ```
    pub fn generate() -> Self {
        let (seed, next) = &*TOKENS;
        let mut hasher = seed.build_hasher();
        hasher.write_u64(next.fetch_add(1, Ordering::Relaxed));
        Self(hasher.finish())
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

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn generated_tokens_do_not_repeat_across_threads() {
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    (0..10_000)
                        .map(|_| FenceToken::generate())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut seen = HashSet::new();
        for thread in threads {
            let Ok(tokens) = thread.join() else {
                panic!("a thread panicked");
            };
            for token in tokens {
                assert!(seen.insert(token), "{token:?} repeated");
            }
        }
    }
}
