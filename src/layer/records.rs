//! What is kept, and for how long: the record's TTL, the claim's lease, how long a duplicate
//! waits, which responses are stored, and the header that states the key's lifetime.

use std::{sync::Arc, time::Duration};

use http::{HeaderName, response};

use super::IdempotencyLayer;
use crate::{
    layer::config::{
        MAX_CAPTURE_AFTER_DISCONNECT, MAX_LEASE, MAX_TTL, MAX_WAIT, MIN_LEASE, WaitMode,
    },
    store::IdempotencyStore,
};

impl<St: IdempotencyStore> IdempotencyLayer<St> {
    /// How long a completed record is kept and replayed. Default: 24 hours.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_ttl(Duration::from_secs(7 * 24 * 3600));
    /// ```
    ///
    /// # Panics
    ///
    /// If `ttl` is zero (nothing would ever be replayed) or longer than
    /// [`MAX_TTL`](crate::MAX_TTL) (365 days).
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        assert!(
            !ttl.is_zero() && ttl <= MAX_TTL,
            "IdempotencyLayer::with_ttl: the TTL must be more than zero and at most MAX_TTL \
             ({MAX_TTL:?}), got {ttl:?}"
        );
        self.config().ttl = ttl;
        self
    }

    /// How long an in-flight claim lasts without renewal. The owner renews it every third of
    /// this while its handler runs, so it bounds how long a crashed instance's key stays
    /// blocked, not how long a handler may take. Default: 30 s.
    ///
    /// A completion that the store could not take (an outage, a failover) is retried only
    /// while the lease lasts: with a replicated Redis, two thirds of it must outlast a
    /// failover plus a completion's retry (the default 30 s covers failovers of up to
    /// 17.5 s with the default timeouts; see `redis::Durability`, feature `redis`).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_lease(Duration::from_secs(10));
    /// ```
    ///
    /// # Panics
    ///
    /// If `lease` is shorter than [`MIN_LEASE`](crate::MIN_LEASE) (100 ms) or longer than
    /// [`MAX_LEASE`](crate::MAX_LEASE) (1 hour). A lease that ends before its owner can renew
    /// it lets a duplicate take the claim over while the handler runs, and both execute; a
    /// zero lease would end at once.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        assert!(
            (MIN_LEASE..=MAX_LEASE).contains(&lease),
            "IdempotencyLayer::with_lease: the lease must be at least MIN_LEASE ({MIN_LEASE:?}) \
             and at most MAX_LEASE ({MAX_LEASE:?}), got {lease:?}"
        );
        self.config().lease = lease;
        self
    }

    /// What a duplicate does while its key is in flight. Default: [`WaitMode::Wait`] 10 s.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore, WaitMode};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_wait_mode(WaitMode::Reject);
    /// ```
    ///
    /// # Panics
    ///
    /// If [`WaitMode::Wait`] is given more than [`MAX_WAIT`](crate::MAX_WAIT) (1 hour).
    pub fn with_wait_mode(mut self, mode: WaitMode) -> Self {
        if let WaitMode::Wait(wait) = mode {
            assert!(
                wait <= MAX_WAIT,
                "IdempotencyLayer::with_wait_mode: WaitMode::Wait must be at most MAX_WAIT \
                 ({MAX_WAIT:?}), got {wait:?}"
            );
        }
        self.config().wait_mode = mode;
        self
    }

    /// The largest response body kept for replay. A larger response is still delivered, but
    /// its key is recorded as completed-not-replayable: retries get a 409 problem and never
    /// run the handler again. Default: 1 MiB.
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_response_body_limit(4 * 1024 * 1024);
    /// ```
    pub fn with_response_body_limit(mut self, bytes: usize) -> Self {
        self.config().response_body_limit = bytes;
        self
    }

    /// How long a streamed response is still captured once its client has gone away.
    /// Default: 60 s.
    ///
    /// A client that leaves does not cancel the work: its response is still read and stored,
    /// so that the retry gets the replay. But a body that never ends (an event stream) would
    /// hold its key in flight for ever, retries waiting and getting `409`. Past this bound the
    /// body is dropped (the handler's stream stops) and the key is spent, as for a response
    /// over the limit: the handler ran and its response was neither delivered whole nor
    /// recorded, so retries get a `409` `NotReplayable` problem and never run it again. Zero
    /// stops the capture as soon as the client is gone.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_capture_after_disconnect(Duration::from_secs(300));
    /// ```
    ///
    /// # Panics
    ///
    /// If `bound` is longer than
    /// [`MAX_CAPTURE_AFTER_DISCONNECT`](crate::MAX_CAPTURE_AFTER_DISCONNECT) (1 hour).
    pub fn with_capture_after_disconnect(mut self, bound: Duration) -> Self {
        assert!(
            bound <= MAX_CAPTURE_AFTER_DISCONNECT,
            "IdempotencyLayer::with_capture_after_disconnect: the bound must be at most \
             MAX_CAPTURE_AFTER_DISCONNECT ({MAX_CAPTURE_AFTER_DISCONNECT:?}), got {bound:?}"
        );
        self.config().capture_after_disconnect = bound;
        self
    }

    /// Which responses are stored. A refused one releases its key, so a retry executes again.
    /// Default: all but 5xx, 408 and 429 (transient failures).
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// // Stripe's rule: once the handler ran, store whatever it answered.
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_store_when(|_: &http::response::Parts| true);
    /// ```
    pub fn with_store_when<F>(mut self, predicate: F) -> Self
    where
        F: Fn(&response::Parts) -> bool + Send + Sync + 'static,
    {
        self.config().store_when = Arc::new(predicate);
        self
    }

    /// Adds a header to protected responses that states how many whole seconds the key will
    /// be honoured: the TTL on the first execution, what is left of it on a replay (when the
    /// store can tell). Default: no header.
    ///
    /// ```
    /// # use tower_idempotency::{IDEMPOTENCY_KEY_EXPIRES_IN, IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_expiry_header(IDEMPOTENCY_KEY_EXPIRES_IN);
    /// ```
    pub fn with_expiry_header(mut self, name: HeaderName) -> Self {
        self.config().expiry_header = Some(name);
        self
    }
}
