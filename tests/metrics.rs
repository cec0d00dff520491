//! With the `metrics` feature: one counter per request outcome, and store latency.
#![cfg(feature = "metrics")]

mod common;

use std::{collections::HashMap, sync::atomic::Ordering};

use axum::{Router, body::Body, routing::post};
use http::{Request, StatusCode};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::ServiceExt;
use tower_idempotency::{FailMode, IdempotencyLayer};

use common::flaky_store::FlakyStore;

fn post_with(key: &str, body: &'static str) -> Request<Body> {
    Request::post("/charges")
        .header("idempotency-key", key)
        .body(Body::from(body))
        .unwrap()
}

#[tokio::test]
async fn every_outcome_is_counted_and_store_latency_is_recorded() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder in this test binary");

    let store = FlakyStore::default();
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

    // (layer, key, body, whether the store is down, the status expected)
    let steps = [
        (&closed, "k1", "a", false, StatusCode::CREATED),
        (&closed, "k1", "a", false, StatusCode::CREATED),
        (&closed, "k1", "b", false, StatusCode::CONFLICT),
        (&closed, "", "a", false, StatusCode::BAD_REQUEST),
        (&closed, "k2", "a", true, StatusCode::SERVICE_UNAVAILABLE),
        (&open, "k3", "a", true, StatusCode::CREATED),
        (&open, "k4", "a", true, StatusCode::CREATED),
    ];
    for (app, key, body, down, status) in steps {
        store.down.store(down, Ordering::SeqCst);
        let response = send(app, post_with(key, body)).await.unwrap();
        assert_eq!(response.status(), status, "key {key:?}, body {body:?}");
    }

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
