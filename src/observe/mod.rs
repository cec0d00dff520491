//! What happened to each protected request, reported in one place: a `tracing` span per
//! protected request with debug events for each state change, and with the `metrics` feature
//! counters and histograms labelled by the layer's route label. Neither ever carries a raw
//! key, a credential or a body: a request is named by its storage key's digest.
//!
//! Metric handles are built once per layer, the first time they are needed (so after the
//! application installed its recorder), with `&'static str` labels: recording costs an
//! atomic operation and no allocation.

#[cfg(feature = "metrics")]
mod metrics;

use std::{fmt, future::Future, sync::Arc};

use tracing::{Span, field};

use crate::{
    error::{StoreError, StoreErrorKind},
    key::StorageKey,
    problem::ProblemKind,
    store::Claim,
};

/// The route label of a layer that was not given one.
pub(crate) const DEFAULT_ROUTE: &str = "default";

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
}

impl Outcome {
    // Listed for the metric handles, built once per label.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) const ALL: [Self; 10] = [
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

/// A layer's reporting: its route label and, with the `metrics` feature, its metric
/// handles. A cheap `Clone`.
#[derive(Clone)]
pub(crate) struct Observer {
    inner: Arc<Inner>,
}

struct Inner {
    route: &'static str,
    #[cfg(feature = "metrics")]
    metrics: metrics::Handles,
}

impl Observer {
    pub(crate) fn new(route: &'static str) -> Self {
        Self {
            inner: Arc::new(Inner {
                route,
                #[cfg(feature = "metrics")]
                metrics: metrics::Handles::new(route),
            }),
        }
    }

    pub(crate) fn route(&self) -> &'static str {
        self.inner.route
    }

    /// The span of one protected request. Its fields are filled in as the request goes.
    pub(crate) fn request_span(&self, method: &http::Method) -> Span {
        tracing::info_span!(
            "idempotency",
            route = self.inner.route,
            method = %method,
            key_digest = field::Empty,
            outcome = field::Empty,
            claim_ms = field::Empty,
            take_over_ms = field::Empty,
            complete_ms = field::Empty,
            release_ms = field::Empty,
            renew_ms = field::Empty,
            wait_ms = field::Empty,
        )
    }

    /// Names the current request by its storage key's digest (never the key itself).
    pub(crate) fn key(&self, key: &StorageKey) {
        Span::current().record("key_digest", field::display(Digest(key)));
    }

    /// Reports how a request ended.
    pub(crate) fn outcome(&self, outcome: Outcome) {
        Span::current().record("outcome", outcome.as_str());
        match outcome {
            Outcome::StoreError | Outcome::FailOpen => {
                tracing::warn!(outcome = outcome.as_str(), "idempotency store failed");
            }
            _ => tracing::debug!(outcome = outcome.as_str(), "idempotency outcome"),
        }
        #[cfg(feature = "metrics")]
        self.inner.metrics.outcome(outcome);
    }

    /// Runs a store operation, timing it when a span or metrics want it, and reports the
    /// state it found or made at debug level.
    pub(crate) async fn store_op<F>(&self, store: &'static str, op: Op, operation: F) -> F::Output
    where
        F: Future,
        F::Output: Describe,
    {
        let span = Span::current();
        let timed = !span.is_disabled() || cfg!(feature = "metrics");
        if !timed {
            return operation.await;
        }
        let started = std::time::Instant::now();
        let output = operation.await;
        let elapsed = started.elapsed();
        let ms = elapsed.as_secs_f64() * 1000.0;
        let field = match op {
            Op::Claim => "claim_ms",
            Op::TakeOver => "take_over_ms",
            Op::Complete => "complete_ms",
            Op::Release => "release_ms",
            Op::Renew => "renew_ms",
            Op::Wait => "wait_ms",
        };
        span.record(field, ms);
        tracing::debug!(
            store,
            op = op.as_str(),
            result = output.describe(),
            elapsed_ms = ms,
            "idempotency store"
        );
        #[cfg(feature = "metrics")]
        self.inner.metrics.store_op(store, op, elapsed);
        #[cfg(not(feature = "metrics"))]
        let _ = store;
        output
    }

    /// Counts what became of a response that ran under a claim.
    pub(crate) fn record(&self, result: RecordResult) {
        if result != RecordResult::Stored {
            tracing::debug!(
                result = result.as_str(),
                "idempotency record not stored for replay"
            );
        }
        #[cfg(feature = "metrics")]
        self.inner.metrics.record(result);
    }

    /// Counts a lease renewal.
    pub(crate) fn renewal(&self, renewal: Renewal) {
        #[cfg(feature = "metrics")]
        self.inner.metrics.renewal(renewal);
        #[cfg(not(feature = "metrics"))]
        let _ = renewal;
    }

    /// Reports a lost lease: while the handler ran (`completing` false) or at completion.
    pub(crate) fn lease_lost(&self, completing: bool) {
        if completing {
            tracing::warn!("idempotency lease lost before completion; the response was not stored");
        } else {
            tracing::warn!(
                "idempotency lease lost while the handler ran; its response will not be stored"
            );
        }
        #[cfg(feature = "metrics")]
        self.inner.metrics.lease_lost(completing);
    }

    /// Reports a claim whose owner's lease ended without completion, and what is done.
    pub(crate) fn abandoned(&self, action: AbandonedAction) {
        tracing::warn!(
            action = action.as_str(),
            "idempotency claim abandoned: its owner's lease ended without completion"
        );
        #[cfg(feature = "metrics")]
        self.inner.metrics.abandoned(action);
    }

    /// Starts timing a request's wait for a duplicate in flight; the time is reported when
    /// the returned clock is dropped, if it was started.
    pub(crate) fn wait_clock(&self) -> WaitClock {
        WaitClock {
            #[cfg(feature = "metrics")]
            observer: self.clone(),
            started: None,
        }
    }
}

impl fmt::Debug for Observer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observer")
            .field("route", &self.inner.route)
            .finish_non_exhaustive()
    }
}

/// The time one request spent waiting on a duplicate in flight.
pub(crate) struct WaitClock {
    #[cfg(feature = "metrics")]
    observer: Observer,
    started: Option<std::time::Instant>,
}

impl WaitClock {
    /// Marks the start of waiting (the first wait only).
    pub(crate) fn start(&mut self) {
        if self.started.is_none() {
            tracing::debug!("idempotency key in flight; waiting for it");
            self.started = Some(std::time::Instant::now());
        }
    }
}

impl Drop for WaitClock {
    fn drop(&mut self) {
        #[cfg(feature = "metrics")]
        if let Some(started) = self.started {
            self.observer.inner.metrics.waited(started.elapsed());
        }
    }
}

/// Counts a byte-bounded cache's evictions with the `metrics` feature
/// (`idempotency_store_evictions_total{store}`). Only the moka-backed stores evict.
#[cfg_attr(not(feature = "moka"), allow(dead_code))]
pub(crate) struct EvictionCounter {
    #[cfg(feature = "metrics")]
    counter: std::sync::OnceLock<::metrics::Counter>,
    #[cfg(feature = "metrics")]
    store: &'static str,
}

#[cfg_attr(not(feature = "moka"), allow(dead_code))]
impl EvictionCounter {
    pub(crate) fn new(store: &'static str) -> Self {
        #[cfg(not(feature = "metrics"))]
        let _ = store;
        Self {
            #[cfg(feature = "metrics")]
            counter: std::sync::OnceLock::new(),
            #[cfg(feature = "metrics")]
            store,
        }
    }

    pub(crate) fn increment(&self) {
        #[cfg(feature = "metrics")]
        self.counter
            .get_or_init(
                || ::metrics::counter!("idempotency_store_evictions_total", "store" => self.store),
            )
            .increment(1);
    }
}

/// A store operation's result, in a word, for the debug event.
pub(crate) trait Describe {
    fn describe(&self) -> &'static str;
}

impl Describe for Result<Claim, StoreError> {
    fn describe(&self) -> &'static str {
        match self {
            Ok(Claim::Acquired(_)) => "acquired",
            Ok(Claim::InFlight { .. }) => "in_flight",
            Ok(Claim::Abandoned { .. }) => "abandoned",
            Ok(Claim::Completed { .. }) => "completed",
            Err(error) => error_word(error),
        }
    }
}

impl Describe for Result<(), StoreError> {
    fn describe(&self) -> &'static str {
        match self {
            Ok(()) => "ok",
            Err(error) => error_word(error),
        }
    }
}

fn error_word(error: &StoreError) -> &'static str {
    match error.kind() {
        StoreErrorKind::LeaseLost => "lease_lost",
        StoreErrorKind::Unavailable => "unavailable",
        StoreErrorKind::Corrupt => "corrupt",
        _ => "error",
    }
}

/// A storage key's digest as hex, written without an allocation.
struct Digest<'a>(&'a StorageKey);

impl fmt::Display for Digest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0.as_bytes() {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
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

    #[test]
    fn a_digest_is_written_as_the_storage_key_hex() {
        let key = StorageKey::from_bytes(core::array::from_fn(|i| i as u8));
        assert_eq!(Digest(&key).to_string(), key.to_hex());
    }
}
