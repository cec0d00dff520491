//! With the `metrics` feature: one counter per request outcome, and store latency.
#![cfg(feature = "metrics")]

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Router, body::Body, routing::post};
use http::{Request, StatusCode};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::ServiceExt;
use tower_idempotency::{
    Claim, FailMode, FenceToken, Fingerprint, IdempotencyLayer, IdempotencyStore, MemoryStore,
    Record, StorageKey, StoreError,
};

/// A `MemoryStore` that can be switched off, failing as an unreachable store does.
#[derive(Clone, Default)]
struct Switchable {
    store: MemoryStore,
    down: Arc<AtomicBool>,
}

impl Switchable {
    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::unavailable(std::io::Error::other(
                "store is down",
            )));
        }
        Ok(())
    }
}

impl IdempotencyStore for Switchable {
    async fn claim(
        &self,
        key: &StorageKey,
        fp: &Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.check()?;
        self.store.claim(key, fp, lease).await
    }
    async fn complete(
        &self,
        key: &StorageKey,
        token: FenceToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.check()?;
        self.store.complete(key, token, record, ttl).await
    }
    async fn release(&self, key: &StorageKey, token: FenceToken) -> Result<(), StoreError> {
        self.check()?;
        self.store.release(key, token).await
    }
    async fn renew(
        &self,
        key: &StorageKey,
        token: FenceToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.check()?;
        self.store.renew(key, token, lease).await
    }
    async fn wait(&self, key: &StorageKey, timeout: Duration) -> Result<(), StoreError> {
        self.check()?;
        self.store.wait(key, timeout).await
    }
}

fn post_with(key: Option<&str>, body: &'static str) -> Request<Body> {
    let mut request = Request::post("/charges");
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.body(Body::from(body)).unwrap()
}

#[tokio::test]
async fn every_outcome_is_counted_and_store_latency_is_recorded() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder in this test binary");

    let store = Switchable::default();
    let app = |mode| {
        Router::new()
            .route(
                "/charges",
                post(|| async { (StatusCode::CREATED, "charged") }),
            )
            .layer(IdempotencyLayer::new(store.clone()).with_fail_mode(mode))
    };
    let closed = app(FailMode::Closed);
    let open = app(FailMode::Open);
    let send = |app: &Router, request| app.clone().oneshot(request);

    assert_eq!(
        send(&closed, post_with(Some("k1"), "a"))
            .await
            .unwrap()
            .status(),
        StatusCode::CREATED
    );
    assert_eq!(
        send(&closed, post_with(Some("k1"), "a"))
            .await
            .unwrap()
            .status(),
        StatusCode::CREATED
    );
    assert_eq!(
        send(&closed, post_with(Some("k1"), "b"))
            .await
            .unwrap()
            .status(),
        StatusCode::CONFLICT
    );
    assert_eq!(
        send(&closed, post_with(Some(""), "a"))
            .await
            .unwrap()
            .status(),
        StatusCode::BAD_REQUEST
    );
    store.down.store(true, Ordering::SeqCst);
    assert_eq!(
        send(&closed, post_with(Some("k2"), "a"))
            .await
            .unwrap()
            .status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        send(&open, post_with(Some("k3"), "a"))
            .await
            .unwrap()
            .status(),
        StatusCode::CREATED
    );
    assert_eq!(
        send(&open, post_with(Some("k4"), "a"))
            .await
            .unwrap()
            .status(),
        StatusCode::CREATED
    );

    let mut outcomes = HashMap::new();
    let mut latency_ops = Vec::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        match (key.name(), value) {
            ("idempotency_requests_total", DebugValue::Counter(n)) => {
                let outcome = key
                    .labels()
                    .find(|l| l.key() == "outcome")
                    .map(|l| l.value().to_owned());
                outcomes.insert(outcome.unwrap_or_default(), n);
            }
            ("idempotency_store_duration_seconds", DebugValue::Histogram(samples)) => {
                let op = key
                    .labels()
                    .find(|l| l.key() == "op")
                    .map(|l| l.value().to_owned());
                latency_ops.push((op.unwrap_or_default(), samples.len()));
            }
            _ => {}
        }
    }
    let expected: HashMap<String, u64> = [
        ("executed", 1),
        ("replayed", 1),
        ("mismatch", 1),
        ("rejected", 1),
        ("store_error", 1),
        ("fail_open", 2),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(outcomes, expected);
    latency_ops.sort();
    let claims = latency_ops
        .iter()
        .find(|(op, _)| op == "claim")
        .map(|(_, n)| *n);
    let completes = latency_ops
        .iter()
        .find(|(op, _)| op == "complete")
        .map(|(_, n)| *n);
    // Six of the seven requests reached the store (the bad key did not); one completed.
    assert_eq!(claims, Some(6));
    assert_eq!(completes, Some(1));
}
