//! [`Observer`]: one layer's reporting, to `tracing` (a span per protected request and debug
//! events) and, with the `metrics` feature, to its metric handles; [`Timed`]: a store
//! operation timed and reported as it ends.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use pin_project_lite::pin_project;
use tracing::{Span, field};

#[cfg(feature = "metrics")]
use super::metrics;
use super::{AbandonedAction, Op, Outcome, RecordResult, Renewal};
use crate::{
    key::StorageKey,
    store::claim::Claim,
    store::error::{StoreError, StoreErrorKind},
};

/// The route label of a layer that was not given one.
pub(crate) const DEFAULT_ROUTE: &str = "default";

/// A layer's reporting: its route label and, with the `metrics` feature, its metric
/// handles. A cheap `Clone`.
#[derive(Clone)]
pub(crate) struct Observer {
    inner: Arc<Inner>,
}

struct Inner {
    route: &'static str,
    /// Whether the layer warned of a request it could not scope (once per layer).
    warned_unscoped: AtomicBool,
    /// Whether the layer warned of a gRPC message it could not read a key from (once per
    /// layer).
    warned_undecoded: AtomicBool,
    #[cfg(feature = "metrics")]
    metrics: metrics::Handles,
}

impl Observer {
    pub(crate) fn new(route: &'static str) -> Self {
        Self {
            inner: Arc::new(Inner {
                route,
                warned_unscoped: AtomicBool::new(false),
                warned_undecoded: AtomicBool::new(false),
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
        self.count(outcome);
    }

    /// Reports how a request that has no span of its own ended (one passed through from its
    /// head): logged and counted, and no span of the application's written to.
    pub(crate) fn passed_through(&self, outcome: Outcome) {
        self.count(outcome);
    }

    fn count(&self, outcome: Outcome) {
        match outcome {
            Outcome::StoreError | Outcome::FailOpen => {
                tracing::warn!(outcome = outcome.as_str(), "idempotency store failed");
            }
            Outcome::GrpcUndecoded if !warned_once(&self.inner.warned_undecoded) => {
                tracing::warn!(
                    route = self.inner.route,
                    outcome = outcome.as_str(),
                    "a gRPC call's key was to be read from its request message, which is not \
                     one uncompressed message (a client's send_compressed?): it runs \
                     unprotected (logged once per layer); send the key as idempotency-key \
                     metadata, or do not compress the requests of protected methods"
                );
            }
            Outcome::Unscoped if !self.warned_unscoped() => {
                tracing::warn!(
                    route = self.inner.route,
                    outcome = outcome.as_str(),
                    "a request without a key, a credential or a peer address runs unprotected \
                     (logged once per layer): serve with the peer's address (axum: \
                     into_make_service_with_connect_info::<SocketAddr>() and the `axum` \
                     feature; hyper: a PeerAddr extension) or name the principal with_scope"
                );
            }
            _ => tracing::debug!(outcome = outcome.as_str(), "idempotency outcome"),
        }
        #[cfg(feature = "metrics")]
        self.inner.metrics.outcome(outcome);
    }

    /// Whether the layer warned of an unscoped request already; the first to ask is told no.
    fn warned_unscoped(&self) -> bool {
        warned_once(&self.inner.warned_unscoped)
    }

    /// `operation`, timed when a span or metrics want it, and reported at debug level with
    /// the state it found or made ([`Timed`]).
    pub(crate) fn store_op<F>(&self, store: &'static str, op: Op, operation: F) -> Timed<'_, F> {
        Timed::new(Some(self), store, op, operation)
    }

    /// Reports a timed store operation that took `elapsed` (in `span`) and came to `output`.
    fn store_op_ended(
        &self,
        store: &'static str,
        op: Op,
        span: &Span,
        elapsed: Duration,
        output: &impl Describe,
    ) {
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

/// Whether a warning given once per layer was given already; the first to ask is told no.
fn warned_once(warned: &AtomicBool) -> bool {
    // Read first: after the warning, requests never write to the shared flag.
    warned.load(Ordering::Relaxed) || warned.swap(true, Ordering::Relaxed)
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
        StoreErrorKind::RolledBack => "rolled_back",
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

pin_project! {
    /// A store operation, timed when a span or metrics want it, and reported at debug level
    /// with the state it found or made ([`Observer::store_op`]).
    ///
    /// A future of its own rather than an `async fn`: an async function keeps the future it
    /// is given twice, as its argument and as what it awaits (rust-lang/rust#62958), and the
    /// store's futures are the largest the flow holds and moves: a completion's boxed future
    /// was three times the store's (one `async fn` wrapping another).
    pub(crate) struct Timed<'a, F> {
        #[pin]
        operation: F,
        observer: Option<&'a Observer>,
        store: &'static str,
        op: Op,
        timing: Timing,
    }
}

/// Whether and since when an operation is timed.
enum Timing {
    /// Not polled yet: the span it runs in is known at its first poll.
    Unstarted,
    /// Reported by nobody (no observer; no span and no metrics), or reported already.
    Untimed,
    Started(Span, Instant),
}

impl<'a, F> Timed<'a, F> {
    /// `operation` on `store`, reported to `observer` if there is one.
    pub(crate) fn new(
        observer: Option<&'a Observer>,
        store: &'static str,
        op: Op,
        operation: F,
    ) -> Self {
        let timing = match observer {
            Some(_) => Timing::Unstarted,
            None => Timing::Untimed,
        };
        Self {
            operation,
            observer,
            store,
            op,
            timing,
        }
    }
}

impl<F> Future for Timed<'_, F>
where
    F: Future,
    F::Output: Describe,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        if let Timing::Unstarted = this.timing {
            let span = Span::current();
            *this.timing = if !span.is_disabled() || cfg!(feature = "metrics") {
                Timing::Started(span, Instant::now())
            } else {
                Timing::Untimed
            };
        }
        let output = ready!(this.operation.poll(cx));
        let timing = std::mem::replace(this.timing, Timing::Untimed);
        if let (Some(observer), Timing::Started(span, started)) = (this.observer, timing) {
            observer.store_op_ended(this.store, *this.op, &span, started.elapsed(), &output);
        }
        Poll::Ready(output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_is_written_as_the_storage_key_hex() {
        let key = StorageKey::from_bytes(core::array::from_fn(|i| i as u8));
        assert_eq!(Digest(&key).to_string(), key.to_hex());
    }

    /// What a subscriber printed while `run` ran in a span (debug level, no colours).
    fn logged(run: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buffer(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                let mut buffer = self.0.lock().unwrap_or_else(|e| e.into_inner());
                buffer.extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request", claim_ms = field::Empty);
            span.in_scope(run);
        });
        let bytes = buffer.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Polls `future` once, with a waker that does nothing.
    fn poll_once<F: Future>(future: Pin<&mut F>) -> Poll<F::Output> {
        future.poll(&mut Context::from_waker(std::task::Waker::noop()))
    }

    /// The milliseconds the one store event in `log` reports.
    fn elapsed_ms(log: &str) -> Vec<f64> {
        log.lines()
            .filter(|line| line.contains("idempotency store"))
            .filter_map(|line| line.split("elapsed_ms=").nth(1))
            .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
            .collect()
    }

    #[test]
    fn a_store_operation_is_timed_from_its_first_poll() {
        let observer = Observer::new("test");
        let log = logged(|| {
            let operation = std::future::ready(Ok::<(), StoreError>(()));
            let mut timed = std::pin::pin!(observer.store_op("memory", Op::Claim, operation));
            std::thread::sleep(Duration::from_millis(60));
            assert!(poll_once(timed.as_mut()).is_ready());
        });
        let reported = elapsed_ms(&log);
        assert_eq!(reported.len(), 1, "one event: {log}");
        assert!(reported[0] < 50.0, "timed from its creation: {log}");
    }

    #[test]
    fn a_store_operation_is_reported_once_when_it_ends() {
        let observer = Observer::new("test");
        let log = logged(|| {
            let mut pending_once = true;
            let operation = std::future::poll_fn(move |_| {
                if std::mem::take(&mut pending_once) {
                    Poll::Pending
                } else {
                    Poll::Ready(Ok::<(), StoreError>(()))
                }
            });
            let mut timed = std::pin::pin!(observer.store_op("memory", Op::Claim, operation));
            assert!(poll_once(timed.as_mut()).is_pending());
            std::thread::sleep(Duration::from_millis(20));
            assert!(poll_once(timed.as_mut()).is_ready());
        });
        let reported = elapsed_ms(&log);
        assert_eq!(reported.len(), 1, "one event: {log}");
        assert!(reported[0] >= 20.0, "timed across its polls: {log}");
    }
}
