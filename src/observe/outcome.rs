//! What is reported: how a request ended, which store operation ran, what became of a
//! response, how a renewal went, what was done with an abandoned claim. Each is a label of
//! the metrics and a field of the spans.

use crate::problem::ProblemKind;

/// How a protected request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The handler ran under a claim.
    Executed,
    /// The stored response was replayed at once.
    Replayed,
    /// The stored response was replayed after waiting for the first request.
    Waited,
    /// Refused: another request with the key is in flight.
    InFlight,
    /// Refused: the key was used with another payload.
    Mismatch,
    /// Refused: the first response was too large to keep.
    NotReplayable,
    /// Refused: bad key or body (400, 413).
    Rejected,
    /// Refused: the store failed (fail-closed 503).
    StoreError,
    /// The store failed and the handler ran unprotected.
    FailOpen,
    /// Refused: an abandoned claim's outcome is unknown until an operator resolves it
    /// (label `outcome_unknown`).
    Abandoned,
    /// No key, and nothing to scope a derived one by (no credential, no peer address): ran
    /// unprotected.
    Unscoped,
    /// No key, and a body over the request-body limit: ran unprotected, its body handed on
    /// whole.
    Oversized,
    /// A gRPC call whose key was to come from its request message, and whose body is not one
    /// uncompressed message (a client's `send_compressed`): ran unprotected (label
    /// `grpc_undecoded`).
    GrpcUndecoded,
}

impl Outcome {
    // Listed for the metric handles, built once per label.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) const ALL: [Self; 13] = [
        Self::Executed,
        Self::Replayed,
        Self::Waited,
        Self::InFlight,
        Self::Mismatch,
        Self::NotReplayable,
        Self::Rejected,
        Self::StoreError,
        Self::FailOpen,
        Self::Abandoned,
        Self::Unscoped,
        Self::Oversized,
        Self::GrpcUndecoded,
    ];

    /// The outcome of a request the layer answered with this problem.
    pub(crate) fn of_problem(kind: ProblemKind) -> Option<Self> {
        Some(match kind {
            ProblemKind::InFlight => Self::InFlight,
            ProblemKind::KeyReused => Self::Mismatch,
            ProblemKind::NotReplayable => Self::NotReplayable,
            ProblemKind::StoreUnavailable => Self::StoreError,
            ProblemKind::OutcomeUnknown => Self::Abandoned,
            // The request was counted as executed when its handler started.
            ProblemKind::HandlerFailed => return None,
            _ => Self::Rejected,
        })
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Executed => "executed",
            Self::Replayed => "replayed",
            Self::Waited => "waited",
            Self::InFlight => "in_flight",
            Self::Mismatch => "mismatch",
            Self::NotReplayable => "not_replayable",
            Self::Rejected => "rejected",
            Self::StoreError => "store_error",
            Self::FailOpen => "fail_open",
            Self::Abandoned => "outcome_unknown",
            Self::Unscoped => "unscoped",
            Self::Oversized => "oversized",
            Self::GrpcUndecoded => "grpc_undecoded",
        }
    }
}

/// A store operation, as timed and labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Claim,
    TakeOver,
    Complete,
    Release,
    Renew,
    Wait,
}

impl Op {
    // Listed for the metric handles, built once per label.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) const ALL: [Self; 6] = [
        Self::Claim,
        Self::TakeOver,
        Self::Complete,
        Self::Release,
        Self::Renew,
        Self::Wait,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Claim => "claim",
            Self::TakeOver => "take_over",
            Self::Complete => "complete",
            Self::Release => "release",
            Self::Renew => "renew",
            Self::Wait => "wait",
        }
    }
}

/// What became of a response that ran under a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecordResult {
    /// Stored for replay.
    Stored,
    /// Over the response limit: stored as completed-not-replayable.
    TooLarge,
    /// Not stored: the store-when predicate refused it (5xx, 408, 429 by default).
    Predicate,
    /// Not stored: the inner service returned an error.
    HandlerError,
    /// Not stored: the response body failed.
    BodyError,
    /// Not stored: the handler panicked.
    Panic,
    /// Not stored: the store refused or failed the write.
    StoreError,
    /// Not stored: the lease was lost before completion.
    LeaseLost,
    /// Not run: the client left while its claim was on its way, so the claim was given back
    /// without starting the handler.
    ClientGone,
}

impl RecordResult {
    // Listed for the metric handles, built once per label.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) const ALL: [Self; 9] = [
        Self::Stored,
        Self::TooLarge,
        Self::Predicate,
        Self::HandlerError,
        Self::BodyError,
        Self::Panic,
        Self::StoreError,
        Self::LeaseLost,
        Self::ClientGone,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Stored => "stored",
            Self::TooLarge => "too_large",
            Self::Predicate => "predicate",
            Self::HandlerError => "handler_error",
            Self::BodyError => "body_error",
            Self::Panic => "panic",
            Self::StoreError => "store_error",
            Self::LeaseLost => "lease_lost",
            Self::ClientGone => "client_gone",
        }
    }
}

/// How a lease renewal went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Renewal {
    Renewed,
    /// Failed for now (store unavailable); retried at the next period.
    Failed,
    /// The lease is gone: another request may run the key.
    Lost,
}

impl Renewal {
    // Listed for the metric handles, built once per label.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) const ALL: [Self; 3] = [Self::Renewed, Self::Failed, Self::Lost];

    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Renewed => "renewed",
            Self::Failed => "failed",
            Self::Lost => "lost",
        }
    }
}

/// What the layer did with a claim whose owner's lease ended without completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AbandonedAction {
    RunAgain,
    OutcomeUnknown,
}

impl AbandonedAction {
    // Listed for the metric handles, built once per label.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) const ALL: [Self; 2] = [Self::RunAgain, Self::OutcomeUnknown];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::RunAgain => "run_again",
            Self::OutcomeUnknown => "outcome_unknown",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_snake_case_words() {
        let labels: Vec<&str> = Outcome::ALL
            .iter()
            .map(|o| o.as_str())
            .chain(Op::ALL.iter().map(|o| o.as_str()))
            .chain(RecordResult::ALL.iter().map(|r| r.as_str()))
            .collect();
        for label in &labels {
            assert!(
                label.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{label}"
            );
        }
        let outcomes: std::collections::HashSet<_> =
            Outcome::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(outcomes.len(), Outcome::ALL.len());
    }
}
