//! A store whose operations can be switched to fail, shared by the failure tests.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use tower_idempotency::{Claim, MemoryStore, StoreError, StoreErrorKind};

use super::wrap::{Hook, Op, Wrap};

/// A `MemoryStore` whose operations can be made to fail as if the backend were unreachable.
pub type FlakyStore = Wrap<MemoryStore, Switches>;

/// What fails, and what is slow.
#[derive(Clone, Default)]
pub struct Switches {
    /// Every operation fails.
    pub down: Arc<AtomicBool>,
    /// Only `complete` fails.
    pub completions_down: Arc<AtomicBool>,
    /// `complete`, `release` and `renew` fail: an owner cut off from the store after claiming.
    pub writes_down: Arc<AtomicBool>,
    /// Completions land only after a while, as a remote store's do.
    pub slow_completions: Arc<AtomicBool>,
    /// Claims land only after a while, as a remote store's do.
    pub slow_claims: Arc<AtomicBool>,
    /// Claims and take-overs land, but their replies are lost: they fail as unavailable.
    pub claim_replies_lost: Arc<AtomicBool>,
    /// `complete` is refused with an error that retrying cannot fix (not an outage).
    pub completions_refused: Arc<AtomicBool>,
    /// How long a renewal takes to answer, if set.
    pub renewal_latency: Arc<Mutex<Option<Duration>>>,
    /// When each renewal was sent.
    pub renewals_sent: Arc<Mutex<Vec<Instant>>>,
}

/// How long a slow operation takes.
pub const SLOW: Duration = Duration::from_millis(300);

impl Switches {
    fn check(&self, switches: &[&AtomicBool]) -> Result<(), StoreError> {
        let failing = self.down.load(Ordering::SeqCst)
            || switches.iter().any(|switch| switch.load(Ordering::SeqCst));
        if failing {
            return Err(StoreError::unavailable("simulated outage"));
        }
        Ok(())
    }
}

impl Hook for Switches {
    const NAME: &'static str = "flaky";

    async fn before(&self, op: Op<'_>) -> Result<(), StoreError> {
        match op {
            Op::Claim(..) => {
                self.check(&[])?;
                if self.slow_claims.load(Ordering::SeqCst) {
                    tokio::time::sleep(SLOW).await;
                }
            }
            Op::Complete => {
                self.check(&[&self.completions_down, &self.writes_down])?;
                if self.completions_refused.load(Ordering::SeqCst) {
                    return Err(StoreError::new(
                        StoreErrorKind::Other,
                        "simulated refusal: the record is too large for the backend",
                    ));
                }
                if self.slow_completions.load(Ordering::SeqCst) {
                    tokio::time::sleep(SLOW).await;
                }
            }
            Op::Renew => {
                self.renewals_sent
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Instant::now());
                let latency = *self
                    .renewal_latency
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if let Some(latency) = latency {
                    tokio::time::sleep(latency).await;
                }
                self.check(&[&self.writes_down])?;
            }
            Op::Release | Op::Forget | Op::BreakClaim => self.check(&[&self.writes_down])?,
            Op::TakeOver(..) | Op::Wait | Op::Inspect | Op::ListClaims => self.check(&[])?,
        }
        Ok(())
    }

    /// A claim's reply, or its loss.
    fn reply(&self, _: Op<'_>, claim: Result<Claim, StoreError>) -> Result<Claim, StoreError> {
        if self.claim_replies_lost.load(Ordering::SeqCst) {
            return Err(StoreError::unavailable("simulated lost reply"));
        }
        claim
    }
}
