//! With the `metrics` feature: every metric the README lists, with its labels, recorded by
//! `metrics-util`'s debugging recorder; no label ever carries a key.
#![cfg(all(feature = "metrics", feature = "moka"))]

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::atomic::Ordering,
    time::Duration,
};

use axum::{Router, body::Body, routing::post};
use http::{Method, Request, StatusCode, request::Parts};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower::ServiceExt;
use tower_idempotency::{
    AdminStore, CachedStore, Claim, FailMode, Fingerprint, IdempotencyKey, IdempotencyLayer,
    IdempotencyStore, LookupScope, MemoryStore, Recovery, StorageKey, WaitMode,
};

use common::{
    conformance::{fingerprint, fresh_key, sample_record},
    flaky_store::FlakyStore,
};

/// Every key in this test has it: no label may.
const SECRET: &str = "SECRET";

fn keyed(path: &str, key: &str, body: &'static str) -> Request<Body> {
    Request::post(path)
        .header("idempotency-key", format!("{SECRET}-{key}"))
        .body(Body::from(body))
        .unwrap()
}

fn digest(path: &str, key: &str) -> StorageKey {
    let key = IdempotencyKey::parse(format!("{SECRET}-{key}").as_bytes()).unwrap();
    StorageKey::of_request(LookupScope::Credentials(None), &Method::POST, path, &key)
}

fn routes() -> Router {
    Router::new()
        .route(
            "/charges",
            post(|| async { (StatusCode::CREATED, "charged") }),
        )
        .route(
            "/big",
            post(|| async { (StatusCode::CREATED, "x".repeat(100)) }),
        )
        .route(
            "/fail",
            post(|| async { StatusCode::INTERNAL_SERVER_ERROR }),
        )
        .route(
            "/panic",
            post(|| async {
                if true {
                    panic!("expected in this test");
                }
                StatusCode::OK
            }),
        )
        .route(
            "/slow",
            post(|| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                (StatusCode::CREATED, "slow")
            }),
        )
}

async fn send(app: &Router, request: Request<Body>) -> StatusCode {
    app.clone().oneshot(request).await.unwrap().status()
}

/// name → labels (sorted `key=value` pairs) → counter value or histogram sample count.
type Seen = BTreeMap<String, BTreeMap<String, u64>>;

fn labelled(seen: &Seen, name: &str, labels: &str) -> u64 {
    seen.get(name)
        .and_then(|by| by.get(labels))
        .copied()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_is_recorded_with_its_labels_and_never_a_key() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder in this test binary");

    let store = FlakyStore::default();
    let layer = |route| IdempotencyLayer::new(store.clone()).with_route_label(route);
    let payments = routes().layer(layer("payments"));
    let open = routes().layer(layer("open").with_fail_mode(FailMode::Open));
    let small = routes().layer(layer("small").with_response_body_limit(10));
    let reject = routes().layer(layer("reject").with_wait_mode(WaitMode::Reject));
    let unknown =
        routes().layer(layer("unknown").with_outcome_unknown(|_: &Parts| Recovery::OutcomeUnknown));
    let short_lease = routes().layer(layer("lease").with_lease(tower_idempotency::MIN_LEASE));

    // (app, path, key, body, store down, status)
    let steps = [
        (&payments, "/charges", "k1", "a", false, StatusCode::CREATED),
        (&payments, "/charges", "k1", "a", false, StatusCode::CREATED),
        (
            &payments,
            "/charges",
            "k1",
            "b",
            false,
            StatusCode::CONFLICT,
        ),
        (
            &payments,
            "/charges",
            "",
            "a",
            false,
            StatusCode::BAD_REQUEST,
        ),
        (
            &payments,
            "/charges",
            "k2",
            "a",
            true,
            StatusCode::SERVICE_UNAVAILABLE,
        ),
        (&open, "/charges", "k3", "a", true, StatusCode::CREATED),
        (&small, "/big", "k4", "a", false, StatusCode::CREATED),
        (&small, "/big", "k4", "a", false, StatusCode::CONFLICT),
        (
            &payments,
            "/fail",
            "k5",
            "a",
            false,
            StatusCode::INTERNAL_SERVER_ERROR,
        ),
        (
            &payments,
            "/panic",
            "k6",
            "a",
            false,
            StatusCode::INTERNAL_SERVER_ERROR,
        ),
    ];
    for (app, path, key, body, down, status) in steps {
        store.hook.down.store(down, Ordering::SeqCst);
        let request = if key.is_empty() {
            Request::post(path)
                .header("idempotency-key", "")
                .body(Body::from(body))
                .unwrap()
        } else {
            keyed(path, key, body)
        };
        assert_eq!(send(app, request).await, status, "{path} {key} {body}");
    }
    store.hook.down.store(false, Ordering::SeqCst);

    // A duplicate refused while the first is in flight, and one that waits for it.
    let first = tokio::spawn({
        let app = payments.clone();
        async move { send(&app, keyed("/slow", "k7", "a")).await }
    });
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert_eq!(
        send(&reject, keyed("/slow", "k7", "a")).await,
        StatusCode::CONFLICT
    );
    assert_eq!(
        send(&payments, keyed("/slow", "k7", "a")).await,
        StatusCode::CREATED
    );
    assert_eq!(first.await.unwrap(), StatusCode::CREATED);

    // Abandoned claims: refused as outcome unknown, or run again.
    for (key, app, status) in [
        ("k8", &unknown, StatusCode::CONFLICT),
        ("k9", &payments, StatusCode::CREATED),
    ] {
        let claim = store
            .claim(
                &digest("/charges", key),
                &Fingerprint::of(&Method::POST, &"/charges".parse().unwrap(), b"a"),
                Duration::from_millis(50),
            )
            .await
            .unwrap();
        assert!(matches!(claim, Claim::Acquired(_)));
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(send(app, keyed("/charges", key, "a")).await, status);
    }

    // Renewals while a slow handler runs, then a lease lost: the claim is broken under it.
    assert_eq!(
        send(&short_lease, keyed("/slow", "k10", "a")).await,
        StatusCode::CREATED
    );
    let running = tokio::spawn({
        let app = short_lease.clone();
        async move { send(&app, keyed("/slow", "k11", "a")).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        store
            .break_claim(&digest("/slow", "k11"))
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(running.await.unwrap(), StatusCode::CREATED);

    // Evictions, by store.
    let record = sample_record(fingerprint("a"));
    let memory = MemoryStore::new(MemoryStore::MIN_CAPACITY_BYTES);
    let cached = CachedStore::new(MemoryStore::default(), record.weight() as u64 * 5);
    let to_fill = MemoryStore::MIN_CAPACITY_BYTES / record.weight() as u64;
    for _ in 0..to_fill * 2 {
        for store in [&memory as &dyn Completes, &cached] {
            store.complete_fresh(&record).await;
        }
    }
    assert!(memory.evictions() > 0 && cached.evictions() > 0);

    let mut seen = Seen::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        for label in &labels {
            assert!(
                !label.contains(SECRET),
                "{} has a key in {label}",
                key.name()
            );
        }
        let count = match value {
            DebugValue::Counter(n) => n,
            DebugValue::Histogram(samples) => samples.len() as u64,
            DebugValue::Gauge(_) => continue,
        };
        if count > 0 {
            seen.entry(key.name().to_owned())
                .or_default()
                .insert(labels.join(","), count);
        }
    }

    let requests = |route: &str, outcome: &str| {
        labelled(
            &seen,
            "idempotency_requests_total",
            &format!("route={route},outcome={outcome}"),
        )
    };
    let expected_requests = [
        ("payments", "executed", 5),
        ("payments", "replayed", 1),
        ("payments", "waited", 1),
        ("payments", "mismatch", 1),
        ("payments", "rejected", 1),
        ("payments", "store_error", 1),
        ("open", "fail_open", 1),
        ("small", "executed", 1),
        ("small", "not_replayable", 1),
        ("reject", "in_flight", 1),
        ("unknown", "outcome_unknown", 1),
        ("lease", "executed", 2),
    ];
    for (route, outcome, n) in expected_requests {
        assert_eq!(requests(route, outcome), n, "{route} {outcome}: {seen:#?}");
    }
    let total: u64 = seen["idempotency_requests_total"].values().sum();
    assert_eq!(
        total,
        expected_requests.iter().map(|(_, _, n)| n).sum::<u64>()
    );

    let records = |route: &str, result: &str| {
        labelled(
            &seen,
            "idempotency_records_total",
            &format!("route={route},result={result}"),
        )
    };
    for (route, result, n) in [
        ("payments", "stored", 3),
        ("payments", "predicate", 1),
        ("payments", "panic", 1),
        ("small", "too_large", 1),
        ("lease", "stored", 1),
        ("lease", "lease_lost", 1),
    ] {
        assert_eq!(
            records(route, result),
            n,
            "records {route} {result}: {seen:#?}"
        );
    }

    assert!(
        labelled(
            &seen,
            "idempotency_lease_renewals_total",
            "route=lease,result=renewed"
        ) >= 2
    );
    assert_eq!(
        labelled(
            &seen,
            "idempotency_lease_renewals_total",
            "route=lease,result=lost"
        ),
        1
    );
    assert_eq!(
        labelled(
            &seen,
            "idempotency_leases_lost_total",
            "route=lease,stage=running"
        ),
        1
    );
    assert_eq!(
        labelled(
            &seen,
            "idempotency_leases_lost_total",
            "route=lease,stage=completing"
        ),
        1
    );
    assert_eq!(
        labelled(
            &seen,
            "idempotency_abandoned_claims_total",
            "route=unknown,action=outcome_unknown"
        ),
        1
    );
    assert_eq!(
        labelled(
            &seen,
            "idempotency_abandoned_claims_total",
            "route=payments,action=run_again"
        ),
        1
    );
    assert_eq!(
        labelled(&seen, "idempotency_wait_duration_seconds", "route=payments"),
        1
    );
    assert!(labelled(&seen, "idempotency_store_evictions_total", "store=memory") > 0);
    assert!(labelled(&seen, "idempotency_store_evictions_total", "store=cached") > 0);

    let ops: BTreeSet<String> = seen["idempotency_store_duration_seconds"]
        .keys()
        .filter(|labels| labels.starts_with("route=payments,store=flaky,"))
        .cloned()
        .collect();
    for op in ["claim", "take_over", "complete", "release", "wait"] {
        assert!(
            ops.contains(&format!("route=payments,store=flaky,op={op}")),
            "{op} latency is recorded: {ops:?}"
        );
    }
    assert!(
        labelled(
            &seen,
            "idempotency_store_duration_seconds",
            "route=lease,store=flaky,op=renew"
        ) >= 2
    );
}

/// Completes a fresh key directly, for any store (object-safe, for the loop above).
trait Completes {
    fn complete_fresh<'a>(
        &'a self,
        record: &'a tower_idempotency::Record,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>>;
}

impl<St: IdempotencyStore> Completes for St {
    fn complete_fresh<'a>(
        &'a self,
        record: &'a tower_idempotency::Record,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>> {
        Box::pin(async move {
            let key = fresh_key();
            let Ok(Claim::Acquired(token)) = self
                .claim(&key, &fingerprint("a"), Duration::from_secs(30))
                .await
            else {
                panic!("a fresh key is free");
            };
            self.complete(&key, token, record.clone(), Duration::from_secs(60))
                .await
                .unwrap();
        })
    }
}
