//! What to do with a claim whose owner's lease ended without completion: the owner crashed
//! (or lost the store) mid-request, and whether its work happened is unknown.

use std::{fmt, sync::Arc};

use http::request::Parts;

use crate::{config::Config, fingerprint::Fingerprint, observe::AbandonedAction, problem::Problem};

/// The application's choice for a request that finds its key's claim abandoned
/// ([`IdempotencyLayer::with_outcome_unknown`](crate::IdempotencyLayer::with_outcome_unknown)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Take the claim over and run the handler again (the default): right when running twice
    /// is harmless, or when the handler itself asks its downstream whether the work happened
    /// (a payment provider's own idempotency key).
    RunAgain,
    /// Answer `409` [`ProblemKind::OutcomeUnknown`](crate::ProblemKind::OutcomeUnknown) and
    /// leave the claim as it is, until an operator resolves it: breaks the claim so the next
    /// retry runs (the work did not happen), or lets it expire.
    OutcomeUnknown,
}

pub(crate) type RecoveryFn = Arc<dyn Fn(&Parts) -> Recovery + Send + Sync>;

/// The hook, or the default (run again).
#[derive(Clone, Default)]
pub(crate) struct OnAbandoned(Option<RecoveryFn>);

impl OnAbandoned {
    pub(crate) fn new(hook: RecoveryFn) -> Self {
        Self(Some(hook))
    }

    pub(crate) fn decide(&self, parts: &Parts) -> Recovery {
        self.0
            .as_ref()
            .map_or(Recovery::RunAgain, |hook| hook(parts))
    }
}

/// A request found its key's claim abandoned, taken with fingerprint `held`: `Ok` to take the
/// claim over and run again, or the problem to answer (another payload, or the application
/// asked for an operator to resolve it).
pub(crate) fn on_abandoned(
    config: &Config,
    parts: &Parts,
    held: &Fingerprint,
    fingerprint: &Fingerprint,
) -> Result<(), Problem> {
    if held != fingerprint {
        return Err(Problem::key_reused(config.mismatch_status));
    }
    if config.on_abandoned.decide(parts) == Recovery::OutcomeUnknown {
        config.observer.abandoned(AbandonedAction::OutcomeUnknown);
        return Err(Problem::outcome_unknown());
    }
    config.observer.abandoned(AbandonedAction::RunAgain);
    Ok(())
}

impl fmt::Debug for OnAbandoned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Hook(..)"
        } else {
            "RunAgain"
        })
    }
}
