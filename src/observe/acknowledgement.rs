//! Writes that Redis acknowledged less than a store's durability setting asks.

/// Counts a store's writes acknowledged short of its durability setting with the `metrics`
/// feature (`idempotency_store_acknowledgement_shortfalls_total{store,op}`, `op` being
/// `claim` or `complete`).
pub(crate) struct ShortfallCounter {
    #[cfg(feature = "metrics")]
    claim: std::sync::OnceLock<::metrics::Counter>,
    #[cfg(feature = "metrics")]
    complete: std::sync::OnceLock<::metrics::Counter>,
    #[cfg(feature = "metrics")]
    store: &'static str,
}

impl ShortfallCounter {
    pub(crate) fn new(store: &'static str) -> Self {
        #[cfg(not(feature = "metrics"))]
        let _ = store;
        Self {
            #[cfg(feature = "metrics")]
            claim: std::sync::OnceLock::new(),
            #[cfg(feature = "metrics")]
            complete: std::sync::OnceLock::new(),
            #[cfg(feature = "metrics")]
            store,
        }
    }

    /// A claim refused for want of acknowledgement.
    pub(crate) fn claim(&self) {
        #[cfg(feature = "metrics")]
        self.claim
            .get_or_init(|| {
                ::metrics::counter!(
                    "idempotency_store_acknowledgement_shortfalls_total",
                    "store" => self.store,
                    "op" => "claim"
                )
            })
            .increment(1);
    }

    /// A completion kept without the acknowledgement asked for.
    pub(crate) fn complete(&self) {
        #[cfg(feature = "metrics")]
        self.complete
            .get_or_init(|| {
                ::metrics::counter!(
                    "idempotency_store_acknowledgement_shortfalls_total",
                    "store" => self.store,
                    "op" => "complete"
                )
            })
            .increment(1);
    }
}
