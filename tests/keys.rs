//! Keys (SPEC §2), scope (SPEC §3) and key reuse (SPEC §4), through the layer on `MemoryStore`.

mod common;

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, Request, StatusCode, header};
use http_body_util::Full;
use tower_idempotency::{
    IDEMPOTENCY_KEY, IdempotencyLayer, KeySource, MAX_KEY_LEN, MemoryStore, MissingKey, ProblemKind,
};

use common::service::{
    Gate, Handler, body, created, eventually, keyed_post, post, send, serve, value, within,
};

fn with_headers(path: &str, headers: &[(&str, &[u8])], payload: &str) -> Request<Full<Bytes>> {
    let mut request = Request::post(path).body(body(payload.to_owned())).unwrap();
    for (name, bytes) in headers {
        request.headers_mut().append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value(bytes),
        );
    }
    request
}

#[tokio::test]
async fn invalid_keys_are_refused_with_400_and_nothing_runs() {
    let too_long = vec![b'k'; MAX_KEY_LEN + 1];
    let cases: Vec<(&str, Vec<&[u8]>)> = vec![
        ("empty", vec![b""]),
        ("256 bytes", vec![&too_long]),
        ("a tab (control character)", vec![b"key\twith-tab"]),
        ("a space", vec![b"key with space"]),
        ("a quoted space", vec![b"\" \""]),
        ("a quoted key with spaces", vec![b"\"quoted with spaces\""]),
        ("non-ASCII (obs-text)", vec![b"caf\xe9"]),
        ("non-ASCII UTF-8", vec!["cl\u{e9}".as_bytes()]),
        ("an unterminated quoted string", vec![b"\"unterminated"]),
        ("a bad escape in a quoted string", vec![b"\"bad\\escape\""]),
        ("two quoted items", vec![b"\"one\" \"two\""]),
        ("an empty quoted string", vec![b"\"\""]),
        ("a repeated header", vec![b"key-1", b"key-1"]),
        ("a repeated header with two keys", vec![b"key-1", b"key-2"]),
    ];
    let handler = Handler::counting();
    let store = MemoryStore::default();
    let svc = serve(&IdempotencyLayer::new(store.clone()), &handler);
    for (what, values) in cases {
        let headers: Vec<(&str, &[u8])> = values.iter().map(|v| ("idempotency-key", *v)).collect();
        let reply = send(&svc, with_headers("/charges", &headers, "{}")).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{what}");
        reply.assert_problem(ProblemKind::InvalidKey, StatusCode::BAD_REQUEST);
    }
    assert_eq!(handler.calls(), 0);
    assert_eq!(store.record_count(), 0);
}

#[tokio::test]
async fn valid_keys_execute_once_and_replay() {
    let longest = "k".repeat(MAX_KEY_LEN);
    let quoted_longest = format!("\"{}\"", "q".repeat(MAX_KEY_LEN));
    let cases = [
        "8e03978e-40d5-43e8-bc93-6894a57f9324",
        "\"a-structured-field-string\"",
        "\"quoted-\\\"escapes\\\\\"",
        longest.as_str(),
        quoted_longest.as_str(),
        "0123",
        "!#$%&'*+-.^_`|~",
    ];
    for key in cases {
        let handler = Handler::counting();
        let svc = serve(&IdempotencyLayer::new(MemoryStore::default()), &handler);
        let first = send(&svc, keyed_post("/charges", key, "{}")).await;
        assert_eq!(first.status, StatusCode::CREATED, "{key}");
        assert!(
            send(&svc, keyed_post("/charges", key, "{}"))
                .await
                .replayed(),
            "{key}"
        );
        assert_eq!(handler.calls(), 1, "{key}");
    }
}

#[tokio::test]
async fn the_bare_and_quoted_forms_of_a_key_denote_the_same_record() {
    let handler = Handler::counting();
    let svc = serve(&IdempotencyLayer::new(MemoryStore::default()), &handler);
    let uuid = "8e03978e-40d5-43e8-bc93-6894a57f9324";
    let bare = send(&svc, keyed_post("/charges", uuid, "{}")).await;
    let quoted = send(&svc, keyed_post("/charges", &format!("\"{uuid}\""), "{}")).await;
    assert!(!bare.replayed());
    assert!(quoted.replayed());
    assert_eq!(quoted.body, bare.body);
    // And the other way round, on a fresh key.
    let quoted = send(&svc, keyed_post("/charges", "\"other-key\"", "{}")).await;
    let bare = send(&svc, keyed_post("/charges", "other-key", "{}")).await;
    assert!(!quoted.replayed());
    assert!(bare.replayed());
    assert_eq!(handler.calls(), 2);
}

#[tokio::test]
async fn a_custom_key_header_name_is_used() {
    let handler = Handler::counting();
    let layer = IdempotencyLayer::new(MemoryStore::default())
        .with_header_name(HeaderName::from_static("x-request-key"))
        .with_missing_key(MissingKey::Required);
    let svc = serve(&layer, &handler);
    let request = || with_headers("/charges", &[("x-request-key", b"k1")], "{}");
    send(&svc, request()).await;
    assert!(send(&svc, request()).await.replayed());
    // The standard header is no longer the key header.
    send(&svc, keyed_post("/charges", "k1", "{}"))
        .await
        .assert_problem(ProblemKind::MissingKey, StatusCode::BAD_REQUEST);
    assert_eq!(handler.calls(), 1);
}

#[tokio::test]
async fn missing_key_required_refuses_with_400_and_nothing_runs() {
    let handler = Handler::counting();
    let layer =
        IdempotencyLayer::new(MemoryStore::default()).with_missing_key(MissingKey::Required);
    let svc = serve(&layer, &handler);
    let reply = send(&svc, post("/charges", "{}")).await;
    reply.assert_problem(ProblemKind::MissingKey, StatusCode::BAD_REQUEST);
    assert!(reply.headers.get(header::RETRY_AFTER).is_none());
    assert_eq!(handler.calls(), 0);
    // With a key it runs.
    assert_eq!(
        send(&svc, keyed_post("/charges", "k", "{}")).await.status,
        StatusCode::CREATED
    );
    assert_eq!(handler.calls(), 1);
}

#[tokio::test]
async fn missing_key_pass_through_executes_every_time() {
    let handler = Handler::counting();
    let store = MemoryStore::default();
    let layer = IdempotencyLayer::new(store.clone()).with_missing_key(MissingKey::PassThrough);
    let svc = serve(&layer, &handler);
    for n in 1..=3 {
        let reply = send(&svc, post("/charges", "{}")).await;
        assert!(!reply.replayed());
        assert_eq!(reply.text(), format!("execution #{n}"));
    }
    assert_eq!(handler.calls(), 3);
    assert_eq!(store.record_count(), 0);
}

#[tokio::test]
async fn a_double_clicked_form_without_a_key_runs_once() {
    let handler = Handler::counting();
    let svc = serve(&IdempotencyLayer::new(MemoryStore::default()), &handler);
    let first = send(&svc, post("/orders", "item=42&qty=1")).await;
    let second = send(&svc, post("/orders", "item=42&qty=1")).await;
    assert!(!first.replayed());
    assert!(second.replayed());
    assert_eq!(second.body, first.body);
    assert_eq!(handler.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_double_click_without_a_key_runs_once() {
    let gate = Gate::new();
    let handler = Handler::gated(&gate);
    let svc = serve(&IdempotencyLayer::new(MemoryStore::default()), &handler);
    let first = tokio::spawn(send(&svc, post("/orders", "item=42")));
    eventually("the first click runs", || handler.calls() == 1).await;
    let second = tokio::spawn(send(&svc, post("/orders", "item=42")));
    tokio::time::sleep(Duration::from_millis(20)).await;
    gate.open();
    let (first, second) = (within(first).await.unwrap(), within(second).await.unwrap());
    assert_eq!(handler.calls(), 1);
    assert_eq!(first.body, second.body);
    assert!(
        first.replayed() != second.replayed(),
        "one original, one replay"
    );
}

#[tokio::test]
async fn a_derived_key_request_with_another_body_or_query_executes() {
    let handler = Handler::counting();
    let svc = serve(&IdempotencyLayer::new(MemoryStore::default()), &handler);
    send(&svc, post("/orders", "item=42")).await;
    let other_body = send(&svc, post("/orders", "item=43")).await;
    let other_query = send(&svc, post("/orders?coupon=1", "item=42")).await;
    assert!(!other_body.replayed());
    assert!(!other_query.replayed());
    assert_eq!(handler.calls(), 3);
}

#[tokio::test]
async fn derived_keys_are_scoped_by_browser_session_cookie_and_authorization() {
    let handler = Handler::counting();
    let svc = serve(&IdempotencyLayer::new(MemoryStore::default()), &handler);
    let alice = || with_headers("/orders", &[("cookie", b"session=alice")], "item=42");
    let bob = || with_headers("/orders", &[("cookie", b"session=bob")], "item=42");
    let carol = || with_headers("/orders", &[("authorization", b"Bearer carol")], "item=42");
    let a = send(&svc, alice()).await;
    let b = send(&svc, bob()).await;
    let c = send(&svc, carol()).await;
    assert!(!a.replayed() && !b.replayed() && !c.replayed());
    assert_eq!(handler.calls(), 3);
    // Each session's own double click is still caught, with its own response.
    assert_eq!(send(&svc, alice()).await.body, a.body);
    assert_eq!(send(&svc, bob()).await.body, b.body);
    assert_eq!(send(&svc, carol()).await.body, c.body);
    assert_eq!(handler.calls(), 3);
}

#[tokio::test]
async fn a_derived_key_expires_after_its_window() {
    let handler = Handler::counting();
    let window = Duration::from_millis(400);
    let layer = IdempotencyLayer::new(MemoryStore::default())
        .with_missing_key(MissingKey::Fingerprint(window));
    let svc = serve(&layer, &handler);
    send(&svc, post("/orders", "item=42")).await;
    assert!(
        send(&svc, post("/orders", "item=42")).await.replayed(),
        "inside the window"
    );
    tokio::time::sleep(window * 2).await;
    let after = send(&svc, post("/orders", "item=42")).await;
    assert!(
        !after.replayed(),
        "after the window the same request executes again"
    );
    assert_eq!(after.text(), "execution #2");
    assert_eq!(handler.calls(), 2);
}

#[tokio::test]
async fn a_client_key_outlives_the_derived_key_window() {
    let handler = Handler::counting();
    let window = Duration::from_millis(200);
    let layer = IdempotencyLayer::new(MemoryStore::default())
        .with_missing_key(MissingKey::Fingerprint(window));
    let svc = serve(&layer, &handler);
    send(&svc, keyed_post("/charges", "k", "{}")).await;
    tokio::time::sleep(window * 3).await;
    assert!(
        send(&svc, keyed_post("/charges", "k", "{}"))
            .await
            .replayed()
    );
    assert_eq!(handler.calls(), 1);
}

#[tokio::test]
async fn a_key_reused_with_another_body_or_query_is_refused_with_409() {
    let handler = Handler::counting();
    let svc = serve(&IdempotencyLayer::new(MemoryStore::default()), &handler);
    send(
        &svc,
        keyed_post("/charges?currency=eur", "k", "{\"amount\":100}"),
    )
    .await;
    let other_body = send(
        &svc,
        keyed_post("/charges?currency=eur", "k", "{\"amount\":999}"),
    )
    .await;
    other_body.assert_problem(ProblemKind::KeyReused, StatusCode::CONFLICT);
    assert!(other_body.headers.get(header::RETRY_AFTER).is_none());
    let other_query = send(
        &svc,
        keyed_post("/charges?currency=usd", "k", "{\"amount\":100}"),
    )
    .await;
    other_query.assert_problem(ProblemKind::KeyReused, StatusCode::CONFLICT);
    let no_query = send(&svc, keyed_post("/charges", "k", "{\"amount\":100}")).await;
    no_query.assert_problem(ProblemKind::KeyReused, StatusCode::CONFLICT);
    assert_eq!(handler.calls(), 1);
    // The original request still replays.
    let original = send(
        &svc,
        keyed_post("/charges?currency=eur", "k", "{\"amount\":100}"),
    )
    .await;
    assert!(original.replayed());
}

#[tokio::test]
async fn the_mismatch_status_can_be_422() {
    let handler = Handler::counting();
    let layer = IdempotencyLayer::new(MemoryStore::default())
        .with_mismatch_status(StatusCode::UNPROCESSABLE_ENTITY);
    let svc = serve(&layer, &handler);
    send(&svc, keyed_post("/charges", "k", "{\"amount\":100}")).await;
    let reused = send(&svc, keyed_post("/charges", "k", "{\"amount\":999}")).await;
    reused.assert_problem(ProblemKind::KeyReused, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(handler.calls(), 1);
}

#[tokio::test]
async fn the_mismatch_status_applies_to_a_key_reused_while_in_flight() {
    let gate = Gate::new();
    let handler = Handler::gated(&gate);
    let layer = IdempotencyLayer::new(MemoryStore::default())
        .with_mismatch_status(StatusCode::UNPROCESSABLE_ENTITY);
    let svc = serve(&layer, &handler);
    let first = tokio::spawn(send(&svc, keyed_post("/charges", "k", "{\"amount\":1}")));
    eventually("the first request runs", || handler.calls() == 1).await;
    let reused = send(&svc, keyed_post("/charges", "k", "{\"amount\":2}")).await;
    reused.assert_problem(ProblemKind::KeyReused, StatusCode::UNPROCESSABLE_ENTITY);
    gate.open();
    within(first).await.unwrap();
    assert_eq!(handler.calls(), 1);
}

#[tokio::test]
async fn the_same_key_on_another_route_or_method_is_another_record() {
    let handler = Handler::counting();
    let svc = serve(&IdempotencyLayer::new(MemoryStore::default()), &handler);
    let charges = send(&svc, keyed_post("/charges", "k", "{}")).await;
    let refunds = send(&svc, keyed_post("/refunds", "k", "{}")).await;
    let patch = Request::patch("/charges")
        .header(IDEMPOTENCY_KEY, "k")
        .body(body("{}"))
        .unwrap();
    let patched = send(&svc, patch).await;
    for reply in [&charges, &refunds, &patched] {
        assert_eq!(reply.status, StatusCode::CREATED);
        assert!(!reply.replayed());
    }
    assert_eq!(handler.calls(), 3);
    assert_eq!(
        send(&svc, keyed_post("/refunds", "k", "{}")).await.body,
        refunds.body
    );
    assert_eq!(handler.calls(), 3);
}

fn echo_principal() -> Handler {
    Handler::new(|request: Request<Bytes>| async move {
        let who = request
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        created(format!("for {who}"))
    })
}

#[tokio::test]
async fn the_same_key_from_another_principal_executes_separately() {
    let handler = echo_principal();
    let svc = serve(&IdempotencyLayer::new(MemoryStore::default()), &handler);
    let as_user = |user: &str| {
        let mut request = keyed_post("/charges", "shared-key", "{}");
        request.headers_mut().insert(
            header::AUTHORIZATION,
            value(format!("Bearer {user}").as_bytes()),
        );
        request
    };
    let alice = send(&svc, as_user("alice")).await;
    let bob = send(&svc, as_user("bob")).await;
    let anonymous = send(&svc, keyed_post("/charges", "shared-key", "{}")).await;
    assert_eq!(alice.text(), "for Bearer alice");
    assert_eq!(
        bob.text(),
        "for Bearer bob",
        "bob never gets alice's response"
    );
    assert_eq!(anonymous.text(), "for ");
    assert!(!bob.replayed() && !anonymous.replayed());
    assert_eq!(handler.calls(), 3);
    let alice_again = send(&svc, as_user("alice")).await;
    assert!(alice_again.replayed());
    assert_eq!(alice_again.text(), "for Bearer alice");
    assert_eq!(handler.calls(), 3);
}

#[tokio::test]
async fn a_custom_scope_replaces_credentials() {
    let handler = Handler::counting();
    let layer =
        IdempotencyLayer::new(MemoryStore::default()).with_scope(|parts: &http::request::Parts| {
            parts
                .headers
                .get("x-tenant")
                .map(|tenant| tenant.as_bytes().to_vec())
                .unwrap_or_default()
        });
    let svc = serve(&layer, &handler);
    let request = |tenant: &[u8], token: &[u8]| {
        with_headers(
            "/charges",
            &[
                ("idempotency-key", b"k"),
                ("x-tenant", tenant),
                ("authorization", token),
            ],
            "{}",
        )
    };
    let first = send(&svc, request(b"acme", b"Bearer token-1")).await;
    // Same tenant, another token (rotated): the same principal, so a replay.
    let rotated = send(&svc, request(b"acme", b"Bearer token-2")).await;
    assert!(!first.replayed());
    assert!(rotated.replayed());
    // Another tenant with the same token: another principal.
    let other = send(&svc, request(b"globex", b"Bearer token-1")).await;
    assert!(!other.replayed());
    assert_eq!(handler.calls(), 2);
}

#[tokio::test]
async fn a_webhook_delivery_header_is_the_key_when_idempotency_key_is_absent() {
    let handler = Handler::counting();
    let layer = IdempotencyLayer::new(MemoryStore::default())
        .with_key_source(KeySource::header(HeaderName::from_static(
            "x-github-delivery",
        )))
        .with_missing_key(MissingKey::Required);
    let svc = serve(&layer, &handler);
    let delivery = |id: &[u8]| {
        with_headers(
            "/hooks/github",
            &[("x-github-delivery", id)],
            "{\"action\":\"opened\"}",
        )
    };
    let first = send(&svc, delivery(b"72d3162e-cc78-11e3-81ab-4c9367dc0958")).await;
    let redelivery = send(&svc, delivery(b"72d3162e-cc78-11e3-81ab-4c9367dc0958")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(redelivery.replayed());
    // Another delivery of the same payload is another event (a derived key would replay it).
    let another = send(&svc, delivery(b"9a1c-another-delivery")).await;
    assert!(!another.replayed());
    assert_eq!(handler.calls(), 2);
    // An invalid delivery id is an invalid key.
    send(&svc, delivery(b"bad id"))
        .await
        .assert_problem(ProblemKind::InvalidKey, StatusCode::BAD_REQUEST);
    assert_eq!(handler.calls(), 2);
}

#[tokio::test]
async fn a_json_body_field_is_the_key_when_idempotency_key_is_absent() {
    let handler = Handler::counting();
    let layer = IdempotencyLayer::new(MemoryStore::default())
        .with_key_source(KeySource::json_pointer("/id"))
        .with_missing_key(MissingKey::Required);
    let svc = serve(&layer, &handler);
    let event = r#"{"id":"evt_1NG8Du2eZvKYlo2C","type":"charge.succeeded"}"#;
    let first = send(&svc, post("/hooks/stripe", event)).await;
    let retry = send(&svc, post("/hooks/stripe", event)).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(retry.replayed());
    // The same event id with another payload is a reused key, not a new derived key.
    let tampered = r#"{"id":"evt_1NG8Du2eZvKYlo2C","type":"charge.refunded"}"#;
    send(&svc, post("/hooks/stripe", tampered))
        .await
        .assert_problem(ProblemKind::KeyReused, StatusCode::CONFLICT);
    // No such field: the missing-key policy applies.
    send(&svc, post("/hooks/stripe", r#"{"type":"ping"}"#))
        .await
        .assert_problem(ProblemKind::MissingKey, StatusCode::BAD_REQUEST);
    assert_eq!(handler.calls(), 1);
}

#[tokio::test]
async fn a_key_from_a_closure_is_used_when_idempotency_key_is_absent() {
    let handler = Handler::counting();
    let layer = IdempotencyLayer::new(MemoryStore::default())
        .with_key_source(KeySource::from_fn(|parts, _body| {
            parts
                .uri
                .query()?
                .strip_prefix("request_id=")
                .map(str::to_owned)
        }))
        .with_missing_key(MissingKey::Required);
    let svc = serve(&layer, &handler);
    send(&svc, post("/charges?request_id=r-1", "{}")).await;
    assert!(
        send(&svc, post("/charges?request_id=r-1", "{}"))
            .await
            .replayed()
    );
    assert!(
        !send(&svc, post("/charges?request_id=r-2", "{}"))
            .await
            .replayed()
    );
    send(&svc, post("/charges", "{}"))
        .await
        .assert_problem(ProblemKind::MissingKey, StatusCode::BAD_REQUEST);
    assert_eq!(handler.calls(), 2);
}

#[tokio::test]
async fn the_idempotency_key_header_wins_over_a_key_source() {
    let handler = Handler::counting();
    let layer = IdempotencyLayer::new(MemoryStore::default()).with_key_source(KeySource::header(
        HeaderName::from_static("x-github-delivery"),
    ));
    let svc = serve(&layer, &handler);
    let request = |delivery: &[u8]| {
        with_headers(
            "/hooks",
            &[("idempotency-key", b"k"), ("x-github-delivery", delivery)],
            "{}",
        )
    };
    send(&svc, request(b"d-1")).await;
    assert!(send(&svc, request(b"d-2")).await.replayed());
    assert_eq!(handler.calls(), 1);
}

#[tokio::test]
async fn a_request_without_any_key_falls_back_to_the_missing_key_policy_with_a_source() {
    let handler = Handler::counting();
    let layer = IdempotencyLayer::new(MemoryStore::default())
        .with_key_source(KeySource::json_pointer("/id"));
    let svc = serve(&layer, &handler);
    // Not JSON: no key from the source, so the default derives one (double click caught).
    send(&svc, post("/orders", "item=42")).await;
    assert!(send(&svc, post("/orders", "item=42")).await.replayed());
    assert_eq!(handler.calls(), 1);
}
