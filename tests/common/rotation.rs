//! Rotating the secret with the old one kept as a previous secret: a retry of a request
//! completed before the rotation is replayed, a duplicate of one still in flight waits for
//! it; nothing runs twice. Run against every store.

use std::time::Duration;

use http::StatusCode;
use tower_idempotency::{IdempotencyLayer, IdempotencyStore, ProblemKind};

use crate::common::{
    conformance::fresh_key,
    service::{Gate, Handler, Reply, Svc, keyed_post, send, serve, within},
};

const OLD: &[u8] = b"old secret, 32 bytes or more....";
const NEW: &[u8] = b"new secret, 32 bytes or more....";
const PAYLOAD: &str = r#"{"amount":100}"#;

/// A key no other test run uses (stores may be shared).
fn fresh() -> String {
    format!("rotation-{}", &fresh_key().to_hex()[..16])
}

/// Before the rotation: the old secret.
fn before<St: IdempotencyStore>(store: &St, handler: &Handler) -> Svc<St> {
    serve(
        &IdempotencyLayer::new(store.clone()).with_secret(OLD),
        handler,
    )
}

/// After it: the new secret, the old one kept as a previous secret.
fn after<St: IdempotencyStore>(store: &St, handler: &Handler) -> Svc<St> {
    let layer = IdempotencyLayer::new(store.clone())
        .with_secret(NEW)
        .add_previous_secret(OLD);
    serve(&layer, handler)
}

/// A derived-key request (no key header: its key is its fingerprint), from one client.
fn unkeyed(payload: &str) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut request = crate::common::service::post("/charges", payload);
    request
        .headers_mut()
        .insert("authorization", http::HeaderValue::from_static("Bearer c1"));
    request
}

pub async fn a_retry_completed_before_the_rotation_is_replayed<St: IdempotencyStore>(store: St) {
    let handler = Handler::counting();
    let (before, after) = (before(&store, &handler), after(&store, &handler));
    let key = fresh();
    let first = send(&before, keyed_post("/charges", &key, PAYLOAD)).await;
    assert_eq!(first.status, StatusCode::CREATED);

    // Many retries at once after the rotation: every one a replay of the first response.
    let retries: Vec<_> = (0..16)
        .map(|_| tokio::spawn(send(&after, keyed_post("/charges", &key, PAYLOAD))))
        .collect();
    for retry in retries {
        let retry = within(retry).await.expect("the retry");
        assert!(retry.replayed(), "{retry:?}");
        assert_eq!((retry.status, &retry.body), (first.status, &first.body));
    }
    assert_eq!(handler.calls(), 1, "nothing ran again");

    // The key with another payload is still a reused key, under the old secret's fingerprint.
    let other = send(&after, keyed_post("/charges", &key, r#"{"amount":200}"#)).await;
    other.assert_problem(ProblemKind::KeyReused, StatusCode::CONFLICT);

    // A derived key (no key header) is found under the old secret too.
    let first = send(&before, unkeyed(r#"{"amount":7}"#)).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let retry = send(&after, unkeyed(r#"{"amount":7}"#)).await;
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(handler.calls(), 2);

    // A request first made after the rotation runs once, then replays from its new address.
    let new_key = fresh();
    let first = send(&after, keyed_post("/charges", &new_key, PAYLOAD)).await;
    assert!(!first.replayed());
    let retry = send(&after, keyed_post("/charges", &new_key, PAYLOAD)).await;
    assert!(retry.replayed());
    assert_eq!(handler.calls(), 3);

    // Without the previous secret, a retry from before the rotation runs again: what
    // `add_previous_secret` is for.
    let forgetful = serve(
        &IdempotencyLayer::new(store.clone()).with_secret(NEW),
        &handler,
    );
    let old = fresh();
    assert!(
        !send(&before, keyed_post("/charges", &old, PAYLOAD))
            .await
            .replayed()
    );
    assert!(
        !send(&forgetful, keyed_post("/charges", &old, PAYLOAD))
            .await
            .replayed()
    );
    assert_eq!(handler.calls(), 5);
}

pub async fn a_duplicate_of_a_request_in_flight_before_the_rotation_waits_for_it<
    St: IdempotencyStore,
>(
    store: St,
) {
    let gate = Gate::new();
    let handler = Handler::gated(&gate);
    let (before, after) = (before(&store, &handler), after(&store, &handler));
    let key = fresh();
    let first = tokio::spawn(send(&before, keyed_post("/charges", &key, PAYLOAD)));
    within(async {
        while handler.calls() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;

    let duplicates: Vec<_> = (0..16)
        .map(|_| tokio::spawn(send(&after, keyed_post("/charges", &key, PAYLOAD))))
        .collect();
    // Time for every duplicate to claim, look at the old address and start waiting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(handler.calls(), 1, "no duplicate ran beside the first");
    gate.open();

    let first = within(first).await.expect("the first request");
    assert_eq!(first.status, StatusCode::CREATED);
    for duplicate in duplicates {
        let duplicate = within(duplicate).await.expect("a duplicate");
        assert!(duplicate.replayed(), "{duplicate:?}");
        assert_eq!(duplicate.body, first.body);
    }
    assert_eq!(handler.calls(), 1);
}

pub async fn instances_on_either_side_of_a_two_step_rotation_run_a_request_once<
    St: IdempotencyStore,
>(
    store: St,
) {
    // The first step of the rollout: the old secret, the new one as a previous secret; the
    // second: the new secret, the old one as a previous secret. Instances of both steps
    // serve at once, as during a rolling deploy.
    let handler = Handler::sleeping(Duration::from_millis(50));
    let step_one = serve(
        &IdempotencyLayer::new(store.clone())
            .with_secret(OLD)
            .add_previous_secret(NEW),
        &handler,
    );
    let step_two = after(&store, &handler);
    let key = fresh();
    let requests: Vec<_> = (0..12)
        .map(|i| {
            let instance = if i % 2 == 0 { &step_one } else { &step_two };
            tokio::spawn(send(instance, keyed_post("/charges", &key, PAYLOAD)))
        })
        .collect();
    let mut answers: Vec<Reply> = Vec::new();
    for request in requests {
        answers.push(within(request).await.expect("an answer"));
    }
    assert_eq!(
        handler.calls(),
        1,
        "one execution across both kinds of instance"
    );
    let executed = answers
        .iter()
        .find(|a| !a.replayed() && a.problem.is_none());
    let executed = executed.expect("one request executed");
    for answer in &answers {
        // Each waited for the first and replayed it; or, contending too long, was told to
        // retry (409 in flight), never run.
        match answer.problem {
            None => assert_eq!(answer.body, executed.body),
            Some(kind) => assert_eq!(kind, ProblemKind::InFlight),
        }
    }
    for instance in [&step_one, &step_two] {
        let retry = send(instance, keyed_post("/charges", &key, PAYLOAD)).await;
        assert!(retry.replayed(), "{retry:?}");
    }
    assert_eq!(handler.calls(), 1);
}

/// Defines one `#[tokio::test]` per scenario above, each on the store `$make` builds.
#[macro_export]
macro_rules! rotation_suite {
    ($make:expr) => {
        mod rotation {
            use super::*;

            $crate::rotation_suite!(@tests $make;
                a_retry_completed_before_the_rotation_is_replayed,
                a_duplicate_of_a_request_in_flight_before_the_rotation_waits_for_it,
                instances_on_either_side_of_a_two_step_rotation_run_a_request_once,
            );
        }
    };
    (@tests $make:expr; $($scenario:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                let store = ($make).await;
                $crate::common::rotation::$scenario(store).await;
            }
        )*
    };
}
