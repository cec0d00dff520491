//! What happened to each protected request, reported in one place: a `tracing` span per
//! protected request with debug events for each state change, and with the `metrics` feature
//! counters and histograms labelled by the layer's route label. Neither ever carries a raw
//! key, a credential or a body: a request is named by its storage key's digest.
//!
//! Metric handles are built once per layer, the first time they are needed (so after the
//! application installed its recorder), with `&'static str` labels: recording costs an
//! atomic operation and no allocation.

#[cfg(feature = "redis")]
mod acknowledgement;
#[cfg(feature = "moka")]
mod eviction;
#[cfg(feature = "metrics")]
mod metrics;
mod observer;
mod outcome;

#[cfg(feature = "redis")]
pub(crate) use self::acknowledgement::ShortfallCounter;
#[cfg(feature = "moka")]
pub(crate) use self::eviction::EvictionCounter;
pub(crate) use self::{
    observer::{DEFAULT_ROUTE, Describe, Observer, Timed, WaitClock},
    outcome::{AbandonedAction, Op, Outcome, RecordResult, Renewal},
};
