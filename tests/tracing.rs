//! Tracing: one span per protected request with its outcome, key digest and store latency,
//! debug events for each state change, admin actions at info with who asked; and, in all of
//! the captured output, never a key or a credential.
#![cfg(feature = "moka")]

mod common;

use std::{
    io::Write,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use axum::{Router, body::Body, routing::post};
use http::{Method, Request, StatusCode, request::Parts};
use tower::ServiceExt;
use tower_idempotency::{
    Claim, Fingerprint, IdempotencyKey, IdempotencyLayer, IdempotencyStore, LookupScope,
    MemoryStore, Recovery, StorageKey,
};
use tracing_subscriber::fmt::{MakeWriter, format::FmtSpan};

use common::flaky_store::FlakyStore;

const KEY: &str = "KEY-SECRET-8e03978e";
const TOKEN: &str = "Bearer TOKEN-SECRET-42";

/// Everything the subscriber writes, kept for the assertions.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Self;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

fn charge(key: &str, body: &'static str) -> Request<Body> {
    Request::post("/charges")
        .header("idempotency-key", key)
        .header("authorization", TOKEN)
        .body(Body::from(body))
        .unwrap()
}

async fn send(app: &Router, request: Request<Body>) -> StatusCode {
    app.clone().oneshot(request).await.unwrap().status()
}

fn digest(key: &str) -> StorageKey {
    let authorization = http::HeaderValue::from_static(TOKEN);
    StorageKey::of_request(
        LookupScope::Credentials(Some(&authorization)),
        &Method::POST,
        "/charges",
        &IdempotencyKey::parse(key.as_bytes()).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_and_events_name_requests_by_digest_and_never_show_a_key_or_credentials() {
    let captured = Captured::default();
    tracing_subscriber::fmt()
        .with_writer(captured.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_span_events(FmtSpan::CLOSE)
        .with_ansi(false)
        .init();

    let store = FlakyStore::over(MemoryStore::default());
    let handler = || async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        (StatusCode::CREATED, "charged")
    };
    let layer = IdempotencyLayer::new(store.clone()).with_route_label("payments");
    let app = Router::new()
        .route("/charges", post(handler))
        .layer(layer.clone());
    let careful = Router::new().route("/charges", post(handler)).layer(
        layer
            .clone()
            .with_outcome_unknown(|_: &Parts| Recovery::OutcomeUnknown),
    );

    // Executed, waited on by a duplicate, replayed, refused for another payload.
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, charge(KEY, "{\"amount\":1}")).await }
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(
        send(&app, charge(KEY, "{\"amount\":1}")).await,
        StatusCode::CREATED
    );
    assert_eq!(first.await.unwrap(), StatusCode::CREATED);
    assert_eq!(
        send(&app, charge(KEY, "{\"amount\":1}")).await,
        StatusCode::CREATED
    );
    assert_eq!(
        send(&app, charge(KEY, "{\"amount\":2}")).await,
        StatusCode::CONFLICT
    );
    // An invalid key, a store outage, an abandoned claim.
    assert_eq!(
        send(&app, charge(&format!("{KEY} x"), "{}")).await,
        StatusCode::BAD_REQUEST
    );
    store.hook.down.store(true, Ordering::SeqCst);
    assert_eq!(
        send(&app, charge("KEY-SECRET-down", "{}")).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    store.hook.down.store(false, Ordering::SeqCst);
    let abandoned = "KEY-SECRET-abandoned";
    let fingerprint = Fingerprint::of(&Method::POST, &"/charges".parse().unwrap(), b"{}");
    let claim = store
        .claim(&digest(abandoned), &fingerprint, Duration::from_millis(50))
        .await
        .unwrap();
    assert!(matches!(claim, Claim::Acquired(_)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        send(&careful, charge(abandoned, "{}")).await,
        StatusCode::CONFLICT
    );

    // Admin actions, found by the request's address (the key and credentials in the body).
    #[cfg(feature = "axum")]
    {
        let admin = tower_idempotency::admin::AdminRouter::for_layer(&layer, |parts: &Parts| {
            let operator = parts
                .headers
                .get("x-operator")
                .and_then(|v| v.to_str().ok());
            operator.map(str::to_owned).ok_or(StatusCode::UNAUTHORIZED)
        })
        .into_router::<()>();
        let look_up = format!(
            r#"{{"method":"POST","path":"/charges","key":"{KEY}","headers":{{"authorization":"{TOKEN}"}}}}"#
        );
        for (method, uri, body) in [
            (Method::POST, "/records/lookup".to_owned(), look_up),
            (
                Method::DELETE,
                format!("/records/{}", digest(KEY).to_hex()),
                String::new(),
            ),
            (
                Method::DELETE,
                format!("/claims/{}", digest(abandoned).to_hex()),
                String::new(),
            ),
        ] {
            let request = Request::builder()
                .method(method)
                .uri(uri)
                .header("x-operator", "alice")
                .body(Body::from(body))
                .unwrap();
            let status = admin.clone().oneshot(request).await.unwrap().status();
            assert_eq!(status, StatusCode::OK);
        }
        // Refused, and logged without the query it carried.
        let request = Request::post(format!("/records/lookup?key={KEY}"))
            .body(Body::empty())
            .unwrap();
        let status = admin.clone().oneshot(request).await.unwrap().status();
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }

    let text = captured.text();
    for secret in ["SECRET", "TOKEN"] {
        let leaks: Vec<&str> = text.lines().filter(|line| line.contains(secret)).collect();
        assert!(leaks.is_empty(), "{secret} appears in the logs: {leaks:#?}");
    }
    let digest = digest(KEY).to_hex();
    let expected = [
        format!("key_digest={digest}"),
        "route=\"payments\"".to_owned(),
        "outcome=\"executed\"".to_owned(),
        "outcome=\"waited\"".to_owned(),
        "outcome=\"replayed\"".to_owned(),
        "outcome=\"mismatch\"".to_owned(),
        "outcome=\"rejected\"".to_owned(),
        "outcome=\"store_error\"".to_owned(),
        "outcome=\"outcome_unknown\"".to_owned(),
        "claim_ms=".to_owned(),
        "complete_ms=".to_owned(),
        "wait_ms=".to_owned(),
        "result=\"acquired\"".to_owned(),
        "result=\"in_flight\"".to_owned(),
        "result=\"completed\"".to_owned(),
        "result=\"abandoned\"".to_owned(),
        "idempotency claim abandoned".to_owned(),
        "waiting for it".to_owned(),
    ];
    #[cfg(feature = "axum")]
    assert!(
        text.contains("idempotency admin request refused"),
        "the refusal is logged:\n{text}"
    );
    for needle in expected {
        assert!(text.contains(&needle), "no {needle:?} in the logs:\n{text}");
    }
    #[cfg(feature = "axum")]
    {
        let admin_lines: Vec<&str> = text
            .lines()
            .filter(|line| line.contains("idempotency admin action"))
            .collect();
        assert_eq!(admin_lines.len(), 3, "{admin_lines:#?}");
        for (line, action) in admin_lines
            .iter()
            .zip(["look_up", "forget", "release_claim"])
        {
            assert!(line.contains(" INFO "), "{line}");
            assert!(line.contains("principal=alice"), "{line}");
            assert!(line.contains(&format!("action=\"{action}\"")), "{line}");
        }
        assert!(
            admin_lines[0].contains(&format!("key_digest=\"{digest}\""))
                || admin_lines[0].contains(&digest)
        );
    }
}
