//! What happened to each protected request, reported in one place: a `tracing` event always,
//! and with the `metrics` feature a counter per outcome and a histogram of store latency.
//! Neither ever carries a raw key or a body.

use std::future::Future;

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
}

impl Outcome {
    /// The outcome of a request the layer answered with this problem.
    pub(crate) fn of_problem(kind: ProblemKind) -> Self {
        match kind {
            ProblemKind::InFlight => Self::InFlight,
            ProblemKind::KeyReused => Self::Mismatch,
            ProblemKind::NotReplayable => Self::NotReplayable,
            ProblemKind::StoreUnavailable => Self::StoreError,
            // The request was counted as executed when its handler started.
            ProblemKind::HandlerFailed => Self::Executed,
            _ => Self::Rejected,
        }
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
        }
    }
}

/// Reports how a request ended.
pub(crate) fn outcome(outcome: Outcome) {
    match outcome {
        Outcome::StoreError | Outcome::FailOpen => {
            tracing::warn!(outcome = outcome.as_str(), "idempotency store failed");
        }
        _ => tracing::debug!(outcome = outcome.as_str(), "idempotency"),
    }
    #[cfg(feature = "metrics")]
    metrics::counter!("idempotency_requests_total", "outcome" => outcome.as_str()).increment(1);
}

/// Runs a store operation, timing it when metrics are on.
pub(crate) async fn store_op<F: Future>(op: &'static str, operation: F) -> F::Output {
    #[cfg(feature = "metrics")]
    {
        let started = std::time::Instant::now();
        let output = operation.await;
        metrics::histogram!("idempotency_store_duration_seconds", "op" => op)
            .record(started.elapsed().as_secs_f64());
        output
    }
    #[cfg(not(feature = "metrics"))]
    {
        let _ = op;
        operation.await
    }
}
