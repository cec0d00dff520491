//! What to do with a claim whose owner's lease ended without completion: the owner crashed
//! (or lost the store) mid-request, and whether its work happened is unknown. The choice
//! ([`Recovery`](crate::Recovery)) is a setting, in `config`; this is the check the request
//! flow runs.

use http::request::Parts;

use crate::{
    fingerprint::Fingerprint,
    layer::config::{Config, Recovery},
    observe::AbandonedAction,
    problem::Problem,
};

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
