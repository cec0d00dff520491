//! The eviction count of the byte-bounded caches of records.

/// Counts a byte-bounded cache's evictions with the `metrics` feature
/// (`idempotency_store_evictions_total{store}`). Only the moka-backed stores evict.
pub(crate) struct EvictionCounter {
    #[cfg(feature = "metrics")]
    counter: std::sync::OnceLock<::metrics::Counter>,
    #[cfg(feature = "metrics")]
    store: &'static str,
}

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
