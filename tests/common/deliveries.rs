//! The layer-level suite for senders that re-deliver: webhook providers, automation
//! platforms and AI agents. Every store runs all of it (`delivery_suite!`, one line per
//! store); each check works under a path of its own, so checks may share one store.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, Request, StatusCode, header};
use http_body_util::Full;
use tower_idempotency::{
    BodyFingerprint, FingerprintHeaders, IDEMPOTENCY_KEY_EXPIRES_IN, IdempotencyLayer,
    IdempotencyStore, KeySource, ProblemKind,
};

use crate::common::{
    conformance::fresh_key,
    recording_store::Recording,
    service::{Handler, Reply, body, full, respond, send, serve},
};

/// A path no other check (or earlier run) uses: records are addressed by path.
fn fresh_path(what: &str) -> String {
    format!("/{what}/{}", &fresh_key().to_hex()[..16])
}

/// `POST path` with `headers` and `payload`.
fn delivery(path: &str, headers: &[(&str, &str)], payload: &str) -> Request<Full<Bytes>> {
    let mut request = Request::post(path)
        .body(body(payload.to_owned()))
        .expect("a valid request");
    for (name, value) in headers {
        request.headers_mut().append(
            HeaderName::from_bytes(name.as_bytes()).expect("a valid name"),
            value.parse().expect("a valid value"),
        );
    }
    request
}

/// A Stripe event as first delivered, and as re-delivered: a new signature (fresh timestamp),
/// members in another order, other whitespace, and one less pending delivery.
const STRIPE_FIRST: &str = r#"{"id":"evt_1QXd8f2eZvKYlo2C","object":"event","type":"charge.succeeded","created":1733011200,"pending_webhooks":2,"data":{"object":{"id":"ch_1","amount":1000,"currency":"eur"}}}"#;
const STRIPE_AGAIN: &str = r#"{
  "object": "event",
  "data": { "object": { "currency": "eur", "amount": 1000, "id": "ch_1" } },
  "created": 1733011200,
  "pending_webhooks": 1,
  "type": "charge.succeeded",
  "id": "evt_1QXd8f2eZvKYlo2C"
}"#;

fn stripe_signature(timestamp: u64) -> String {
    format!("t={timestamp},v1=5257a869e7ecebeda32affa62cdca3fa51cad7e77a0e56ff536d0ce8e108d8bd")
}

/// The recipe's settings for Stripe events.
fn stripe_layer<St: IdempotencyStore>(store: St) -> IdempotencyLayer<St> {
    IdempotencyLayer::new(store)
        .with_key_source(KeySource::stripe_event())
        .with_body_fingerprint(BodyFingerprint::canonical_json_excluding([
            "/pending_webhooks",
        ]))
}

pub async fn stripe_redeliveries_with_a_new_signature_and_reordered_keys_replay_under_canonical_json<
    St: IdempotencyStore,
>(
    store: St,
) {
    let handler = Handler::counting();
    let svc = serve(&stripe_layer(store), &handler);
    let path = fresh_path("stripe");
    let first = send(
        &svc,
        delivery(
            &path,
            &[("stripe-signature", &stripe_signature(1))],
            STRIPE_FIRST,
        ),
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(!first.replayed());
    let again = send(
        &svc,
        delivery(
            &path,
            &[("stripe-signature", &stripe_signature(61))],
            STRIPE_AGAIN,
        ),
    )
    .await;
    assert!(again.replayed(), "{again:?}");
    assert_eq!(again.body, first.body);
    assert_eq!(again.header_list(), first.header_list());
    assert_eq!(handler.calls(), 1);
}

pub async fn the_same_redelivery_is_a_key_reuse_under_raw_fingerprints<St: IdempotencyStore>(
    store: St,
) {
    let handler = Handler::counting();
    let layer = IdempotencyLayer::new(store).with_key_source(KeySource::stripe_event());
    let svc = serve(&layer, &handler);
    let path = fresh_path("stripe-raw");
    let first = send(
        &svc,
        delivery(
            &path,
            &[("stripe-signature", &stripe_signature(1))],
            STRIPE_FIRST,
        ),
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED);
    let again = send(
        &svc,
        delivery(
            &path,
            &[("stripe-signature", &stripe_signature(61))],
            STRIPE_AGAIN,
        ),
    )
    .await;
    again.assert_problem(ProblemKind::KeyReused, StatusCode::CONFLICT);
    // A byte-identical re-delivery still replays; only the signature header changed.
    let same_bytes = send(
        &svc,
        delivery(
            &path,
            &[("stripe-signature", &stripe_signature(99))],
            STRIPE_FIRST,
        ),
    )
    .await;
    assert!(same_bytes.replayed());
    assert_eq!(handler.calls(), 1);
}

pub async fn changes_to_excluded_fields_replay_and_other_changes_are_refused<
    St: IdempotencyStore,
>(
    store: St,
) {
    let handler = Handler::counting();
    let layer = IdempotencyLayer::new(store)
        .with_key_source(KeySource::json_pointer("/delivery/id"))
        .with_body_fingerprint(BodyFingerprint::canonical_json_excluding([
            "/delivery/attempt",
            "/sent_at",
        ]));
    let svc = serve(&layer, &handler);
    let path = fresh_path("excluded");
    let event = |attempt: u32, sent_at: &str, amount: u32| {
        format!(
            r#"{{"delivery":{{"id":"dlv_1","attempt":{attempt}}},"sent_at":"{sent_at}","order":{{"amount":{amount}}}}}"#
        )
    };
    let first = send(&svc, delivery(&path, &[], &event(1, "10:00", 500))).await;
    assert_eq!(first.status, StatusCode::CREATED);
    for (what, payload) in [
        ("attempt and time changed", event(2, "10:05", 500)),
        ("attempt changed", event(3, "10:00", 500)),
        (
            "excluded fields missing",
            r#"{"delivery":{"id":"dlv_1"},"order":{"amount":500}}"#.to_owned(),
        ),
    ] {
        let reply = send(&svc, delivery(&path, &[], &payload)).await;
        assert!(reply.replayed(), "{what}: {reply:?}");
        assert_eq!(reply.body, first.body, "{what}");
    }
    let other_amount = send(&svc, delivery(&path, &[], &event(4, "10:20", 501))).await;
    other_amount.assert_problem(ProblemKind::KeyReused, StatusCode::CONFLICT);
    assert_eq!(handler.calls(), 1);
}

pub async fn signature_headers_excluded_by_name_replay_and_included_headers_must_match<
    St: IdempotencyStore,
>(
    store: St,
) {
    // All headers but the sender's per-delivery ones.
    let handler = Handler::counting();
    let layer = IdempotencyLayer::new(store.clone())
        .with_key_source(KeySource::standard_webhooks())
        .with_fingerprint_headers(FingerprintHeaders::all_except([
            HeaderName::from_static("webhook-signature"),
            HeaderName::from_static("webhook-timestamp"),
        ]));
    let svc = serve(&layer, &handler);
    let path = fresh_path("all-except");
    let headers = |signature: &'static str, timestamp: &'static str, kind: &'static str| {
        [
            ("webhook-id", "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"),
            ("webhook-signature", signature),
            ("webhook-timestamp", timestamp),
            ("content-type", kind),
        ]
    };
    let payload = r#"{"type":"invoice.paid","data":{"amount":250}}"#;
    let first = send(
        &svc,
        delivery(
            &path,
            &headers("v1,a", "1733011200", "application/json"),
            payload,
        ),
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED);
    let resent = send(
        &svc,
        delivery(
            &path,
            &headers("v1,b", "1733011500", "application/json"),
            payload,
        ),
    )
    .await;
    assert!(resent.replayed(), "{resent:?}");
    let other_type = send(
        &svc,
        delivery(&path, &headers("v1,c", "1733011800", "text/plain"), payload),
    )
    .await;
    other_type.assert_problem(ProblemKind::KeyReused, StatusCode::CONFLICT);
    assert_eq!(handler.calls(), 1);

    // Only the named headers.
    let handler = Handler::counting();
    let layer = IdempotencyLayer::new(store).with_fingerprint_headers(FingerprintHeaders::only([
        HeaderName::from_static("x-account"),
    ]));
    let svc = serve(&layer, &handler);
    let path = fresh_path("only");
    let keyed = |account: &'static str, trace: &'static str| {
        [
            ("idempotency-key", "k-1"),
            ("x-account", account),
            ("traceparent", trace),
        ]
    };
    let first = send(&svc, delivery(&path, &keyed("acct_1", "00-a-01"), "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let new_trace = send(&svc, delivery(&path, &keyed("acct_1", "00-b-01"), "{}")).await;
    assert!(new_trace.replayed());
    let other_account = send(&svc, delivery(&path, &keyed("acct_2", "00-c-01"), "{}")).await;
    other_account.assert_problem(ProblemKind::KeyReused, StatusCode::CONFLICT);
    assert_eq!(handler.calls(), 1);
}

/// An MCP server's handler: answers a `tools/call` with a JSON-RPC result that echoes the
/// request's `id` and counts executions, with a `Content-Length` of its own.
fn tool_server() -> Handler {
    Handler::with_counter(|n, request: Request<Bytes>| async move {
        let call: serde_json::Value =
            serde_json::from_slice(request.body()).unwrap_or(serde_json::Value::Null);
        let Some(id) = call.get("id") else {
            return respond(StatusCode::ACCEPTED, full(Bytes::new()));
        };
        let text = format!(
            r#"{{"jsonrpc":"2.0","id":{id},"result":{{"content":[{{"type":"text","text":"email sent (execution #{n})"}}],"isError":false}}}}"#
        );
        let mut response = respond(StatusCode::OK, full(text.clone()));
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, text.len().into());
        response
    })
}

fn tool_call(id: &str, idempotency_key: &str, to: &str) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"send_email","arguments":{{"to":"{to}","idempotency_key":"{idempotency_key}"}}}}}}"#
    )
}

/// The recipe's settings for MCP tool calls.
fn agent_layer<St: IdempotencyStore>(store: St) -> IdempotencyLayer<St> {
    IdempotencyLayer::new(store)
        .with_key_source(KeySource::json_pointer("/params/arguments/idempotency_key"))
        .with_json_rpc(true)
}

pub async fn json_rpc_retries_with_a_new_id_get_the_first_response_with_their_own_id<
    St: IdempotencyStore,
>(
    store: St,
) {
    let handler = tool_server();
    let svc = serve(&agent_layer(store), &handler);
    let path = fresh_path("mcp");
    let first = send(
        &svc,
        delivery(&path, &[], &tool_call("1", "mail-1", "a@example.com")),
    )
    .await;
    assert_eq!(first.status, StatusCode::OK);
    let first_text = first.text().to_owned();
    assert!(first_text.contains(r#""id":1,"#), "{first_text}");
    for id in [r#""retry-2""#, "3", "null", "1", r#""caf\u00e9""#, "4.0"] {
        let retry = send(
            &svc,
            delivery(&path, &[], &tool_call(id, "mail-1", "a@example.com")),
        )
        .await;
        assert!(retry.replayed(), "id {id}: {retry:?}");
        assert_eq!(
            retry.text(),
            first_text.replacen(r#""id":1,"#, &format!(r#""id":{id},"#), 1),
            "id {id}: everything but the id is the first response's"
        );
        assert_eq!(
            retry.headers[header::CONTENT_LENGTH],
            retry.body.len().to_string(),
            "id {id}"
        );
        let mut headers = retry.header_list();
        headers.retain(|(name, _)| name != "content-length");
        let mut first_headers = first.header_list();
        first_headers.retain(|(name, _)| name != "content-length");
        assert_eq!(headers, first_headers, "id {id}");
    }
    // The same key with other arguments is another call: refused, not replayed, with a
    // JSON-RPC error carrying the call's id.
    let other = send(
        &svc,
        delivery(&path, &[], &tool_call("9", "mail-1", "b@example.com")),
    )
    .await;
    assert_eq!(other.problem, Some(ProblemKind::KeyReused));
    assert_eq!(other.status, StatusCode::OK);
    let error: serde_json::Value = serde_json::from_slice(&other.body).expect("JSON");
    assert_eq!(error["id"], 9);
    assert_eq!(error["error"]["data"]["status"], 409);
    // A new key runs.
    let next = send(
        &svc,
        delivery(&path, &[], &tool_call("10", "mail-2", "a@example.com")),
    )
    .await;
    assert!(!next.replayed());
    assert!(next.text().contains("execution #2"), "{}", next.text());
    assert_eq!(handler.calls(), 2);
}

pub async fn json_rpc_calls_without_a_key_are_deduplicated_by_their_content_for_the_window<
    St: IdempotencyStore,
>(
    store: St,
) {
    let handler = tool_server();
    let svc = serve(&agent_layer(store), &handler);
    let path = fresh_path("mcp-derived");
    // A derived key is kept for an agent a credential (or a session) names.
    let agent = [("authorization", "Bearer agent-1")];
    let call = |id: &str| {
        format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"get_weather","arguments":{{"city":"Oslo"}}}}}}"#
        )
    };
    let first = send(&svc, delivery(&path, &agent, &call("1"))).await;
    let retry = send(&svc, delivery(&path, &agent, &call("2"))).await;
    assert!(retry.replayed());
    assert_eq!(
        retry.text(),
        first.text().replacen(r#""id":1"#, r#""id":2"#, 1)
    );
    // A notification is not a request with the same content: it runs, and is answered as
    // it was, byte for byte.
    let notification = r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"get_weather","arguments":{"city":"Oslo"}}}"#;
    let told = send(&svc, delivery(&path, &agent, notification)).await;
    assert_eq!(told.status, StatusCode::ACCEPTED);
    assert!(!told.replayed());
    let told_again = send(&svc, delivery(&path, &agent, notification)).await;
    assert!(told_again.replayed());
    assert_eq!(told_again.body, told.body);
    // A batch keeps its ids: the same batch replays byte for byte, new ids run again.
    let batch = |a: u8, b: u8| format!("[{},{}]", call(&a.to_string()), call(&b.to_string()));
    let batch_first = send(&svc, delivery(&path, &agent, &batch(5, 6))).await;
    let batch_same = send(&svc, delivery(&path, &agent, &batch(5, 6))).await;
    assert!(batch_same.replayed());
    assert_eq!(batch_same.body, batch_first.body);
    let batch_new = send(&svc, delivery(&path, &agent, &batch(7, 8))).await;
    assert!(!batch_new.replayed());
    assert_eq!(handler.calls(), 4);
}

pub async fn webhook_header_sources_replay_redeliveries_and_run_new_deliveries<
    St: IdempotencyStore,
>(
    store: St,
) {
    let sources = [
        (
            KeySource::github_delivery(),
            "x-github-delivery",
            "72d3162e-cc78-11e3-81ab-4c9367dc0958",
        ),
        (
            KeySource::shopify_event(),
            "x-shopify-event-id",
            "98880550-7158-44d4-b7cd-2c97c8a091b5",
        ),
        (
            KeySource::standard_webhooks(),
            "webhook-id",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
        ),
    ];
    for (source, name, id) in sources {
        let handler = Handler::counting();
        let layer = IdempotencyLayer::new(store.clone()).with_key_source(source);
        let svc = serve(&layer, &handler);
        let path = fresh_path(name);
        let payload = r#"{"action":"opened","number":1347}"#;
        let first = send(
            &svc,
            delivery(&path, &[(name, id), ("x-attempt", "1")], payload),
        )
        .await;
        assert_eq!(first.status, StatusCode::CREATED, "{name}");
        let again = send(
            &svc,
            delivery(&path, &[(name, id), ("x-attempt", "2")], payload),
        )
        .await;
        assert!(again.replayed(), "{name}: {again:?}");
        assert_eq!(again.body, first.body);
        let other = send(
            &svc,
            delivery(&path, &[(name, "another-delivery")], payload),
        )
        .await;
        assert!(!other.replayed(), "{name}");
        let invalid = send(&svc, delivery(&path, &[(name, "two words")], payload)).await;
        invalid.assert_problem(ProblemKind::InvalidKey, StatusCode::BAD_REQUEST);
        assert_eq!(handler.calls(), 2, "{name}");
    }
}

pub async fn ordered_sources_take_the_first_key_and_idempotency_key_overrides_them<
    St: IdempotencyStore,
>(
    store: St,
) {
    let handler = Handler::counting();
    let layer = IdempotencyLayer::new(store).with_key_source(KeySource::first_of([
        KeySource::standard_webhooks(),
        KeySource::stripe_event(),
    ]));
    let svc = serve(&layer, &handler);
    let path = fresh_path("ordered");
    let event = r#"{"id":"evt_7","amount":1}"#;
    let send_with = |headers: &'static [(&'static str, &'static str)]| {
        send(&svc, delivery(&path, headers, event))
    };
    // Keyed by the body's id.
    let by_event = send_with(&[]).await;
    assert!(by_event.text().ends_with("#1"));
    assert!(send_with(&[]).await.replayed());
    // A webhook-id comes first: another key, so another execution; then it replays.
    let by_header = send_with(&[("webhook-id", "msg_7")]).await;
    assert!(by_header.text().ends_with("#2"), "{by_header:?}");
    assert!(send_with(&[("webhook-id", "msg_7")]).await.replayed());
    // Idempotency-Key overrides both.
    let by_client = send_with(&[("idempotency-key", "client-7"), ("webhook-id", "msg_7")]).await;
    assert!(by_client.text().ends_with("#3"), "{by_client:?}");
    let again = send_with(&[("idempotency-key", "client-7"), ("webhook-id", "msg_other")]).await;
    assert!(again.replayed());
    assert_eq!(again.body, by_client.body);
    assert_eq!(handler.calls(), 3);
}

pub async fn a_secret_changes_storage_keys_and_fingerprints_and_records_still_round_trip<
    St: IdempotencyStore,
>(
    store: St,
) {
    let plain_store = Recording::over(store.clone());
    let keyed_store = Recording::over(store.clone());
    let other_store = Recording::over(store);
    let handler = Handler::counting();
    let plain = serve(&stripe_layer(plain_store.clone()), &handler);
    let keyed = serve(
        &stripe_layer(keyed_store.clone()).with_secret([1u8; 32]),
        &handler,
    );
    let other = serve(
        &stripe_layer(other_store.clone()).with_secret([2u8; 32]),
        &handler,
    );
    let path = fresh_path("secret");

    let first = send(&keyed, delivery(&path, &[], STRIPE_FIRST)).await;
    assert!(first.text().ends_with("#1"));
    let replay = send(&keyed, delivery(&path, &[], STRIPE_AGAIN)).await;
    assert!(replay.replayed(), "a keyed record round-trips: {replay:?}");
    assert_eq!(replay.body, first.body);
    let mismatch = send(
        &keyed,
        delivery(&path, &[], &STRIPE_FIRST.replace("1000", "1001")),
    )
    .await;
    mismatch.assert_problem(ProblemKind::KeyReused, StatusCode::CONFLICT);

    // The same request without the secret, or under another one, is addressed elsewhere: it
    // finds nothing and executes (that is what changing the secret does).
    let unkeyed = send(&plain, delivery(&path, &[], STRIPE_FIRST)).await;
    assert!(unkeyed.text().ends_with("#2"), "{unkeyed:?}");
    let rotated = send(&other, delivery(&path, &[], STRIPE_FIRST)).await;
    assert!(rotated.text().ends_with("#3"), "{rotated:?}");
    // And each keeps its own record.
    assert!(
        send(&keyed, delivery(&path, &[], STRIPE_FIRST))
            .await
            .replayed()
    );
    assert!(
        send(&plain, delivery(&path, &[], STRIPE_FIRST))
            .await
            .replayed()
    );
    assert_eq!(handler.calls(), 3);

    let (plain_key, plain_fingerprint) = plain_store.hook.claims()[0];
    let (keyed_key, keyed_fingerprint) = keyed_store.hook.claims()[0];
    let (other_key, other_fingerprint) = other_store.hook.claims()[0];
    assert_ne!(plain_key, keyed_key);
    assert_ne!(keyed_key, other_key);
    assert_ne!(plain_fingerprint, keyed_fingerprint);
    assert_ne!(keyed_fingerprint, other_fingerprint);
    // Every keyed claim of the same event used one address.
    assert!(
        keyed_store
            .hook
            .claims()
            .iter()
            .all(|(key, _)| *key == keyed_key)
    );
}

pub async fn the_expiry_header_states_the_ttl_then_what_is_left<St: IdempotencyStore>(store: St) {
    let handler = Handler::counting();
    let layer = IdempotencyLayer::new(store.clone())
        .with_ttl(Duration::from_secs(3600))
        .with_expiry_header(IDEMPOTENCY_KEY_EXPIRES_IN);
    let svc = serve(&layer, &handler);
    let path = fresh_path("expiry");
    let seconds = |reply: &Reply| -> Option<u64> {
        reply
            .headers
            .get(IDEMPOTENCY_KEY_EXPIRES_IN)
            .map(|v| v.to_str().unwrap().parse().expect("whole seconds"))
    };
    let first = send(&svc, delivery(&path, &[("idempotency-key", "k")], "{}")).await;
    assert_eq!(seconds(&first), Some(3600));
    let replay = send(&svc, delivery(&path, &[("idempotency-key", "k")], "{}")).await;
    assert!(replay.replayed());
    let left = seconds(&replay).expect("a replay states what is left");
    assert!((3590..=3600).contains(&left), "{left}");
    // A derived key is honoured for the dedupe window (default 60 s).
    let derived = send(&svc, delivery(&path, &[], r#"{"form":1}"#)).await;
    assert_eq!(seconds(&derived), Some(60));
    // Problems state nothing.
    let reused = send(&svc, delivery(&path, &[("idempotency-key", "k")], "{ }")).await;
    reused.assert_problem(ProblemKind::KeyReused, StatusCode::CONFLICT);
    assert_eq!(seconds(&reused), None);
    // Not asked for, not sent (a first execution, then a replay).
    let quiet = serve(&IdempotencyLayer::new(store), &handler);
    for _ in 0..2 {
        let reply = send(&quiet, delivery(&path, &[("idempotency-key", "q")], "{}")).await;
        assert_eq!(seconds(&reply), None);
    }
}

pub async fn a_retry_after_the_ttl_executes_again<St: IdempotencyStore>(store: St) {
    let handler = Handler::counting();
    let layer = IdempotencyLayer::new(store)
        .with_ttl(Duration::from_millis(300))
        .with_expiry_header(IDEMPOTENCY_KEY_EXPIRES_IN);
    let svc = serve(&layer, &handler);
    let path = fresh_path("expired");
    let request = || delivery(&path, &[("idempotency-key", "late")], "{}");
    let first = send(&svc, request()).await;
    assert_eq!(
        first.headers[IDEMPOTENCY_KEY_EXPIRES_IN], "0",
        "300 ms, rounded down"
    );
    assert!(send(&svc, request()).await.replayed());
    tokio::time::sleep(Duration::from_millis(700)).await;
    let late = send(&svc, request()).await;
    assert!(
        !late.replayed(),
        "the record expired: the retry executed again"
    );
    assert!(late.text().ends_with("#2"));
    assert_eq!(handler.calls(), 2);
}

pub async fn numbers_past_what_a_double_holds_are_compared_exactly<St: IdempotencyStore>(
    store: St,
) {
    let handler = Handler::counting();
    let layer = IdempotencyLayer::new(store.clone())
        .with_body_fingerprint(BodyFingerprint::canonical_json());
    let svc = serve(&layer, &handler);
    let path = fresh_path("exact-amounts");
    let keyed = |key: &str, payload: &str| delivery(&path, &[("idempotency-key", key)], payload);
    // (first payload, the retry's, whether the retry is a replay): amounts that differ past
    // 2^64 or past a double's digits are different payloads, never a replay.
    let cases = [
        (
            r#"{"amount":18446744073709551616}"#,
            r#"{"amount":18446744073709551617}"#,
            false,
        ),
        (
            r#"{"amount":1e+23}"#,
            r#"{"amount":1.0000000000000001e+23}"#,
            false,
        ),
        (
            r#"{"amount":0.1}"#,
            r#"{"amount":0.10000000000000000001}"#,
            false,
        ),
        (
            r#"{"amount":18446744073709551616}"#,
            r#"{"amount":18446744073709551616}"#,
            true,
        ),
        (
            r#"{"amount":100,"currency":"eur"}"#,
            r#"{ "currency":"eur", "amount":1E2 }"#,
            true,
        ),
    ];
    for (i, (first, retry, replayed)) in cases.into_iter().enumerate() {
        let key = format!("exact-{i}");
        assert_eq!(
            send(&svc, keyed(&key, first)).await.status,
            StatusCode::CREATED
        );
        let answer = send(&svc, keyed(&key, retry)).await;
        if replayed {
            assert!(answer.replayed(), "{first} then {retry}: {answer:?}");
        } else {
            answer.assert_problem(ProblemKind::KeyReused, StatusCode::CONFLICT);
        }
    }
    assert_eq!(handler.calls(), cases.len());

    // Numeric event ids past 2^64 that differ in their last digit are two keys.
    let events = IdempotencyLayer::new(store).with_key_source(KeySource::json_pointer("/id"));
    let svc = serve(&events, &handler);
    let path = fresh_path("numeric-ids");
    for id in ["18446744073709551616", "18446744073709551617"] {
        let event = format!(r#"{{"id":{id},"type":"paid"}}"#);
        let first = send(&svc, delivery(&path, &[], &event)).await;
        assert!(!first.replayed(), "event {id} runs");
        assert!(send(&svc, delivery(&path, &[], &event)).await.replayed());
    }
    assert_eq!(handler.calls(), cases.len() + 2);
}

/// Sends every request of `requests` at once, and reads every reply.
async fn all_at_once<St: IdempotencyStore>(
    svc: &crate::common::service::Svc<St>,
    requests: Vec<Request<Full<Bytes>>>,
) -> Vec<Reply> {
    let sent: Vec<_> = requests
        .into_iter()
        .map(|request| tokio::spawn(send(svc, request)))
        .collect();
    let mut replies = Vec::with_capacity(sent.len());
    for reply in sent {
        replies.push(reply.await.expect("the request task finished"));
    }
    replies
}

/// A handler whose answer names its execution, so a test tells which one a reply came from.
fn numbered() -> Handler {
    let executions = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    Handler::new(move |request: Request<Bytes>| {
        let n = executions.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        async move {
            let body = format!(
                "execution {n} of {}",
                String::from_utf8_lossy(request.body())
            );
            respond(StatusCode::CREATED, full(body))
        }
    })
}

pub async fn github_hooks_subscribed_to_one_event_each_run_and_each_redelivery_replays<
    St: IdempotencyStore,
>(
    store: St,
) {
    let handler = numbered();
    let layer = IdempotencyLayer::new(store).with_key_source(KeySource::github_delivery());
    let svc = serve(&layer, &handler);
    let path = fresh_path("github-hooks");
    let guid = format!("72d3162e-cc78-11e3-{}", &fresh_key().to_hex()[..12]);
    let payload = r#"{"action":"opened","number":1347}"#;
    // One event, delivered to a repository hook, an organisation hook and two installations
    // of an App (one App hook id): each is a subscriber of its own.
    let subscribers: [&[(&str, &str)]; 4] = [
        &[
            ("x-github-hook-id", "101"),
            ("x-github-hook-installation-target-type", "repository"),
            ("x-github-hook-installation-target-id", "35129377"),
        ],
        &[
            ("x-github-hook-id", "202"),
            ("x-github-hook-installation-target-type", "organization"),
            ("x-github-hook-installation-target-id", "9919"),
        ],
        &[
            ("x-github-hook-id", "303"),
            ("x-github-hook-installation-target-type", "integration"),
            ("x-github-hook-installation-target-id", "111"),
        ],
        &[
            ("x-github-hook-id", "303"),
            ("x-github-hook-installation-target-type", "integration"),
            ("x-github-hook-installation-target-id", "222"),
        ],
    ];
    let deliver = |subscriber: &[(&str, &str)]| {
        let mut headers = vec![("x-github-delivery", guid.as_str())];
        headers.extend_from_slice(subscriber);
        delivery(&path, &headers, payload)
    };
    // Each subscriber's delivery, twice at once (GitHub's retry racing the first attempt).
    let requests = subscribers
        .iter()
        .flat_map(|subscriber| [deliver(subscriber), deliver(subscriber)])
        .collect();
    let replies = all_at_once(&svc, requests).await;
    assert_eq!(handler.calls(), 4, "one execution per hook: {replies:#?}");
    for (n, pair) in replies.chunks(2).enumerate() {
        assert_eq!(pair[0].status, StatusCode::CREATED, "hook {n}: {pair:?}");
        assert_eq!(pair[0].body, pair[1].body, "hook {n}");
        assert_eq!(
            pair.iter().filter(|reply| reply.replayed()).count(),
            1,
            "hook {n}"
        );
    }
    let answers: std::collections::HashSet<_> = replies.iter().map(|r| r.body.clone()).collect();
    assert_eq!(
        answers.len(),
        4,
        "no hook is answered another hook's response"
    );
    // A redelivery (GitHub's "Redeliver" button) to one hook is replayed that hook's answer.
    let again = send(&svc, deliver(subscribers[1])).await;
    assert!(again.replayed());
    assert_eq!(again.body, replies[2].body);
    assert_eq!(handler.calls(), 4);
}

pub async fn shopify_subscriptions_of_one_event_run_once_and_are_never_refused<
    St: IdempotencyStore,
>(
    store: St,
) {
    let handler = numbered();
    let layer = IdempotencyLayer::new(store).with_key_source(KeySource::shopify_event());
    let svc = serve(&layer, &handler);
    let path = fresh_path("shopify-subscriptions");
    let event = format!("98880550-7158-44d4-b7cd-{}", &fresh_key().to_hex()[..12]);
    let deliver = |shop: &str, topic: &str, version: &str, webhook_id: &str, payload: &str| {
        let headers = [
            ("x-shopify-event-id", event.as_str()),
            ("x-shopify-shop-domain", shop),
            ("x-shopify-topic", topic),
            ("x-shopify-api-version", version),
            ("x-shopify-webhook-id", webhook_id),
            ("x-shopify-triggered-at", "2026-12-05T08:00:00.000Z"),
        ];
        delivery(&path, &headers, payload)
    };
    let shop = "shop-1.myshopify.com";
    // Two subscriptions of one topic: another API version, and `include_fields` that keep
    // only some of the order's fields. Delivered at once.
    let full_order =
        r#"{"id":820982911946154508,"email":"jon@example.com","total_price":"403.00"}"#;
    let fields = r#"{"id":820982911946154508,"total_price":"403.00"}"#;
    let replies = all_at_once(
        &svc,
        vec![
            deliver(shop, "orders/create", "2026-10", "w-1", full_order),
            deliver(shop, "orders/create", "2026-07", "w-2", fields),
        ],
    )
    .await;
    assert_eq!(handler.calls(), 1, "one event, one execution: {replies:#?}");
    for reply in &replies {
        assert_eq!(
            reply.status,
            StatusCode::CREATED,
            "never refused: {reply:?}"
        );
        assert_eq!(reply.body, replies[0].body);
    }
    assert_eq!(replies.iter().filter(|r| r.replayed()).count(), 1);
    // Shopify's retry of either subscription's delivery: replayed, whatever its payload.
    let retry = send(
        &svc,
        deliver(shop, "orders/create", "2026-07", "w-2", fields),
    )
    .await;
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(retry.body, replies[0].body);
    assert_eq!(handler.calls(), 1);
    // The same event id under another topic, or for another shop, is handled on its own.
    let topic = send(
        &svc,
        deliver(shop, "orders/paid", "2026-10", "w-3", full_order),
    )
    .await;
    let other_shop = send(
        &svc,
        deliver(
            "shop-2.myshopify.com",
            "orders/create",
            "2026-10",
            "w-4",
            full_order,
        ),
    )
    .await;
    for reply in [&topic, &other_shop] {
        assert_eq!(reply.status, StatusCode::CREATED);
        assert!(!reply.replayed(), "{reply:?}");
    }
    assert_eq!(handler.calls(), 3);
}

pub async fn svix_deliveries_are_deduplicated_by_svix_id<St: IdempotencyStore>(store: St) {
    let handler = numbered();
    let layer = IdempotencyLayer::new(store).with_key_source(KeySource::standard_webhooks());
    let svc = serve(&layer, &handler);
    let path = fresh_path("svix");
    let id = format!("msg_2KWPBgLlAfxdpx2AI54{}", &fresh_key().to_hex()[..8]);
    let payload = r#"{"type":"user.created","data":{"id":"user_29w83sxmDNGwOuEthce5gg56FcC"}}"#;
    // Svix signs each attempt anew: a new timestamp and signature, the same id.
    let attempt = |id: &str, n: u32| {
        let timestamp = (1_733_385_600 + 5 * n).to_string();
        let signature = format!("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1O{n}=");
        delivery(
            &path,
            &[
                ("svix-id", id),
                ("svix-timestamp", &timestamp),
                ("svix-signature", &signature),
            ],
            payload,
        )
    };
    // The first attempt and Svix's retries, some of them racing it.
    let replies = all_at_once(&svc, (0..6).map(|n| attempt(&id, n)).collect()).await;
    assert_eq!(handler.calls(), 1, "{replies:#?}");
    assert_eq!(replies.iter().filter(|r| !r.replayed()).count(), 1);
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::CREATED);
        assert_eq!(reply.body, replies[0].body);
    }
    let later = send(&svc, attempt(&id, 7)).await;
    assert!(later.replayed());
    // Another message runs.
    let other = send(&svc, attempt(&format!("{id}x"), 0)).await;
    assert!(!other.replayed());
    assert_eq!(handler.calls(), 2);
}

/// Defines one `#[tokio::test]` per check of this suite, each on the store that `$make` (an
/// async block) builds.
#[macro_export]
macro_rules! delivery_suite {
    ($make:expr) => {
        $crate::delivery_suite!($make;
            stripe_redeliveries_with_a_new_signature_and_reordered_keys_replay_under_canonical_json,
            the_same_redelivery_is_a_key_reuse_under_raw_fingerprints,
            changes_to_excluded_fields_replay_and_other_changes_are_refused,
            signature_headers_excluded_by_name_replay_and_included_headers_must_match,
            json_rpc_retries_with_a_new_id_get_the_first_response_with_their_own_id,
            json_rpc_calls_without_a_key_are_deduplicated_by_their_content_for_the_window,
            webhook_header_sources_replay_redeliveries_and_run_new_deliveries,
            ordered_sources_take_the_first_key_and_idempotency_key_overrides_them,
            a_secret_changes_storage_keys_and_fingerprints_and_records_still_round_trip,
            the_expiry_header_states_the_ttl_then_what_is_left,
            a_retry_after_the_ttl_executes_again,
            numbers_past_what_a_double_holds_are_compared_exactly,
            github_hooks_subscribed_to_one_event_each_run_and_each_redelivery_replays,
            shopify_subscriptions_of_one_event_run_once_and_are_never_refused,
            svix_deliveries_are_deduplicated_by_svix_id,
        );
    };
    ($make:expr; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let store = ($make).await;
                $crate::common::deliveries::$check(store).await;
            }
        )*
    };
}
