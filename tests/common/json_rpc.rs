//! The JSON-RPC (MCP streamable HTTP) suite, end to end through an `axum::Router`: an MCP
//! server made by hand after the SDKs' wire format (rmcp's SSE framing, its priming event,
//! its `Mcp-Session-Id`), behind the layer in JSON-RPC mode. Every store runs all of it
//! (`json_rpc_suite!`, one line per store); each check works under a path of its own.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{Router, body::Body, routing::post};
use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, header};
use serde_json::{Value, json};
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, IdempotencyStore, KeySource, ProblemKind, WaitMode};

use crate::common::{
    conformance::fresh_key,
    recording_store::Recording,
    service::{Reply, Step, data, scripted, within},
};

/// What the hand-made MCP server counted.
#[derive(Clone, Default)]
pub struct Counts {
    /// `initialize` requests: each opens a session of its own.
    pub initialized: Arc<AtomicUsize>,
    /// Tool executions.
    pub calls: Arc<AtomicUsize>,
    /// Every other message.
    pub others: Arc<AtomicUsize>,
}

impl Counts {
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

/// The priming event rmcp opens a request's SSE stream with.
pub const PRIMING: &str = "id: 0\nretry: 3000\ndata: \n\n";

/// An MCP server: `initialize` opens a session; `tools/call` runs the tool (counted), its
/// arguments choosing the framing of its answer: `json`, `sse` (a priming event, a progress
/// notification and the response, streamed), `cancelled` (the stream ends after its priming
/// event, as rmcp's does when the client cancels), `error` (a JSON-RPC error), `bad-id` (a
/// response whose `id` JSON-RPC does not allow); `sleep_ms` makes it slow.
pub async fn mcp_server(counts: Counts, headers: HeaderMap, body: Bytes) -> http::Response<Body> {
    let message: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let id = message.get("id").cloned();
    let method = message["method"].as_str().unwrap_or_default();
    let json_response = |value: Value| {
        http::Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(value.to_string()))
            .expect("a response")
    };
    match (method, id) {
        ("initialize", Some(id)) => {
            let n = counts.initialized.fetch_add(1, Ordering::SeqCst) + 1;
            let mut response = json_response(json!({
                "jsonrpc": "2.0", "id": id,
                "result": {"protocolVersion": "2025-06-18", "capabilities": {"tools": {}},
                           "serverInfo": {"name": "hand-made", "version": "1"}}
            }));
            response.headers_mut().insert(
                "mcp-session-id",
                format!("session-{n}").parse().expect("a value"),
            );
            response
        }
        ("tools/call", Some(id)) => {
            let n = counts.calls.fetch_add(1, Ordering::SeqCst) + 1;
            let arguments = &message["params"]["arguments"];
            if let Some(ms) = arguments["sleep_ms"].as_u64() {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let session = headers
                .get("mcp-session-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none");
            let result = json!({"content": [{"type": "text", "text": format!("run #{n} in {session}")}], "isError": false});
            let response = json!({"jsonrpc": "2.0", "id": id, "result": result});
            let sse = |events: Vec<Step>| {
                http::Response::builder()
                    .header(header::CONTENT_TYPE, "text/event-stream")
                    .header(header::CACHE_CONTROL, "no-cache")
                    .body(Body::new(scripted(events)))
                    .expect("a response")
            };
            match arguments["framing"].as_str().unwrap_or("json") {
                "sse" => {
                    let progress = json!({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": id, "progress": 1}});
                    sse(vec![
                        data(PRIMING),
                        Step::Sleep(Duration::from_millis(20)),
                        data(format!("event: message\ndata: {progress}\nid: 1\n\n")),
                        Step::Sleep(Duration::from_millis(20)),
                        data(format!("event: message\ndata: {response}\nid: 2\n\n")),
                    ])
                }
                "cancelled" => sse(vec![data(PRIMING), Step::Sleep(Duration::from_millis(20))]),
                "error" => json_response(json!({
                    "jsonrpc": "2.0", "id": id,
                    "error": {"code": -32603, "message": format!("transient failure #{n}")}
                })),
                "bad-id" => json_response(json!({"jsonrpc": "2.0", "id": [id], "result": result})),
                _ => json_response(response),
            }
        }
        (_, Some(id)) => {
            counts.others.fetch_add(1, Ordering::SeqCst);
            json_response(json!({"jsonrpc": "2.0", "id": id, "result": {"tools": []}}))
        }
        (_, None) => {
            counts.others.fetch_add(1, Ordering::SeqCst);
            http::Response::builder()
                .status(StatusCode::ACCEPTED)
                .body(Body::empty())
                .expect("a response")
        }
    }
}

/// The MCP server under `path`, behind `layer`.
pub fn app<St: IdempotencyStore>(
    layer: IdempotencyLayer<St>,
    path: &str,
    counts: &Counts,
) -> Router {
    let counts = counts.clone();
    Router::new()
        .route(
            path,
            post(move |headers: HeaderMap, body: Bytes| mcp_server(counts.clone(), headers, body)),
        )
        .layer(layer)
}

/// A path no other check (or earlier run) uses: records are addressed by path.
fn fresh_path() -> String {
    format!("/mcp/{}", &fresh_key().to_hex()[..16])
}

/// `POST path` with `body` and `headers`, as an MCP client sends it.
pub fn mcp_post(path: &str, headers: &[(&str, &str)], body: &str) -> Request<Body> {
    let mut request = Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "application/json, text/event-stream");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request
        .body(Body::from(body.to_owned()))
        .expect("a request")
}

pub async fn call(router: &Router, request: Request<Body>) -> Reply {
    let response = within(router.clone().oneshot(request))
        .await
        .expect("infallible");
    Reply::read(response).await
}

/// A `tools/call` of `send` with these arguments, the `_meta` an SDK sends (a progress token
/// equal to the id, a fresh trace context).
pub fn tool_call(id: &str, arguments: Value) -> String {
    json!({
        "jsonrpc": "2.0", "id": serde_json::from_str::<Value>(id).expect("an id"),
        "method": "tools/call",
        "params": {
            "name": "send", "arguments": arguments,
            "_meta": {"progressToken": id, "traceparent": format!("00-{}-01", fresh_key().to_hex())}
        }
    })
    .to_string()
}

/// A `tools/call` of `send` with these arguments and no `_meta`: its retries differ only by
/// their id.
pub fn bare_call(id: &str, arguments: Value) -> String {
    let id: Value = serde_json::from_str(id).expect("an id");
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": "send", "arguments": arguments}})
        .to_string()
}

const INITIALIZE: &str = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"rmcp","version":"0.1"}}}"#;

fn body_json(reply: &Reply) -> Value {
    serde_json::from_slice(&reply.body).unwrap_or_else(|_| panic!("JSON: {}", reply.text()))
}

/// The JSON-RPC messages of a reply, JSON or SSE.
fn messages(reply: &Reply) -> Vec<Value> {
    if reply.headers[header::CONTENT_TYPE] == "text/event-stream" {
        reply
            .text()
            .split("\n\n")
            .filter_map(|event| {
                let data: Vec<&str> = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect();
                serde_json::from_str(&data.join("\n")).ok()
            })
            .collect()
    } else {
        vec![body_json(reply)]
    }
}

/// The one JSON-RPC response among a reply's messages.
fn response_of(reply: &Reply) -> Value {
    let mut responses: Vec<Value> = messages(reply)
        .into_iter()
        .filter(|m| m.get("result").is_some() || m.get("error").is_some())
        .collect();
    assert_eq!(responses.len(), 1, "one response in {}", reply.text());
    responses.remove(0)
}

/// The JSON-RPC layer of the README's agent recipe.
fn agent_layer<St: IdempotencyStore>(store: St) -> IdempotencyLayer<St> {
    IdempotencyLayer::new(store).with_json_rpc(true)
}

pub async fn initialize_and_other_unprotected_messages_pass_through_without_a_store_call<
    St: IdempotencyStore,
>(
    store: St,
) {
    let store = Recording::over(store);
    let counts = Counts::default();
    let path = fresh_path();
    let router = app(agent_layer(store.clone()), &path, &counts);
    // Every client of one SDK sends the same `initialize`: each gets a session of its own.
    let (a, b) = tokio::join!(
        call(&router, mcp_post(&path, &[], INITIALIZE)),
        call(&router, mcp_post(&path, &[], INITIALIZE)),
    );
    let sessions = [&a, &b].map(|reply| reply.headers["mcp-session-id"].clone());
    assert_ne!(sessions[0], sessions[1], "two clients, two sessions");
    assert!(!a.replayed() && !b.replayed());
    assert_eq!(counts.initialized.load(Ordering::SeqCst), 2);
    let session = sessions[0].to_str().expect("text");
    for body in [
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
        r#"{"jsonrpc":"2.0","id":2,"method":"ping"}"#,
        r#"{"jsonrpc":"2.0","id":3,"method":"resources/read","params":{"uri":"file:///a"}}"#,
        r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":1}}"#,
    ] {
        // A key that is not valid does not matter to a message that is not protected.
        for headers in [
            &[("mcp-session-id", session)][..],
            &[("mcp-session-id", session), ("idempotency-key", "")],
        ] {
            let reply = call(&router, mcp_post(&path, headers, body)).await;
            assert!(!reply.replayed(), "{body}");
            assert!(reply.problem.is_none(), "{body}: {:?}", reply.problem);
        }
    }
    assert_eq!(
        counts.others.load(Ordering::SeqCst),
        12,
        "every message reached the server"
    );
    assert!(
        store.hook.claims().is_empty(),
        "no store call for a message that is not protected"
    );
}

pub async fn tool_calls_are_scoped_by_session_and_a_derived_key_needs_an_agent<
    St: IdempotencyStore,
>(
    store: St,
) {
    let counts = Counts::default();
    let path = fresh_path();
    let router = app(agent_layer(store), &path, &counts);
    let args = json!({"to": "ada@example.com"});
    let in_session = |session: &'static str, id: &str| {
        mcp_post(
            &path,
            &[
                ("authorization", "Bearer shared-key"),
                ("mcp-session-id", session),
            ],
            &tool_call(id, args.clone()),
        )
    };
    let first = call(&router, in_session("s-1", "1")).await;
    assert_eq!(response_of(&first)["id"], 1);
    // A retry in the session, with a new id and new `_meta`, is answered from the first.
    let retry = call(&router, in_session("s-1", "2")).await;
    assert!(retry.replayed());
    assert_eq!(response_of(&retry)["id"], 2);
    assert_eq!(response_of(&retry)["result"], response_of(&first)["result"]);
    // Another agent with the same credential and arguments, in its own session, runs.
    let other = call(&router, in_session("s-2", "1")).await;
    assert!(!other.replayed());
    assert_eq!(counts.calls(), 2);
    // No credential and no session: nothing names the agent, so no key is derived; agents on
    // one host each run.
    for id in ["1", "1", "2"] {
        let anonymous = call(&router, mcp_post(&path, &[], &tool_call(id, args.clone()))).await;
        assert!(!anonymous.replayed());
        assert_eq!(
            response_of(&anonymous)["id"],
            serde_json::from_str::<Value>(id).unwrap()
        );
    }
    assert_eq!(counts.calls(), 5);
    // A client key is honoured without a credential: the client chose it.
    let keyed = |id: &str| {
        mcp_post(
            &path,
            &[("idempotency-key", "k-1")],
            &tool_call(id, args.clone()),
        )
    };
    call(&router, keyed("7")).await;
    let keyed_retry = call(&router, keyed("8")).await;
    assert!(
        keyed_retry.replayed(),
        "a retry whose `_meta` changed is still the same call"
    );
    assert_eq!(response_of(&keyed_retry)["id"], 8);
    assert_eq!(counts.calls(), 6);
}

pub async fn many_concurrent_retries_of_a_call_execute_it_once<St: IdempotencyStore>(store: St) {
    let counts = Counts::default();
    let path = fresh_path();
    let router = app(agent_layer(store), &path, &counts);
    let args = json!({"to": "ada@example.com", "framing": "sse", "sleep_ms": 100});
    let retries = (0..16).map(|id| {
        let request = mcp_post(
            &path,
            &[("mcp-session-id", "s-1")],
            &tool_call(&id.to_string(), args.clone()),
        );
        let router = router.clone();
        tokio::spawn(async move { (id, call(&router, request).await) })
    });
    for retry in retries {
        let (id, reply) = retry.await.expect("no panic");
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let response = response_of(&reply);
        assert_eq!(
            response["id"],
            id,
            "each retry gets its own id: {}",
            reply.text()
        );
        assert!(
            response["result"]["content"][0]["text"]
                .as_str()
                .unwrap()
                .starts_with("run #1 ")
        );
    }
    assert_eq!(counts.calls(), 1);
}

pub async fn sse_replays_answer_with_the_retrys_id_and_nothing_else_changes<
    St: IdempotencyStore,
>(
    store: St,
) {
    let counts = Counts::default();
    let path = fresh_path();
    let router = app(agent_layer(store), &path, &counts);
    let session = [("mcp-session-id", "s-1")];
    let args = json!({"to": "ada@example.com", "framing": "sse"});
    let first = call(
        &router,
        mcp_post(&path, &session, &bare_call("1", args.clone())),
    )
    .await;
    assert_eq!(first.headers[header::CONTENT_TYPE], "text/event-stream");
    for id in [r#""retry-2""#, "3", "1", r#""caf\u00e9""#] {
        let retry = call(
            &router,
            mcp_post(&path, &session, &bare_call(id, args.clone())),
        )
        .await;
        assert!(retry.replayed(), "{id}");
        // The id as the retry wrote it (`bare_call` writes it as serde_json does).
        let written = serde_json::from_str::<Value>(id).unwrap().to_string();
        let expected = first.text().replace(
            r#"{"id":1,"jsonrpc":"2.0","result""#,
            &format!(r#"{{"id":{written},"jsonrpc":"2.0","result""#),
        );
        assert_eq!(
            retry.text(),
            expected,
            "only the response's id is the retry's"
        );
        assert_eq!(
            response_of(&retry)["id"],
            serde_json::from_str::<Value>(id).unwrap()
        );
    }
    // A kept response whose id cannot be rewritten is never replayed with another's id.
    let bad = json!({"to": "ada@example.com", "framing": "bad-id"});
    call(
        &router,
        mcp_post(&path, &session, &bare_call("1", bad.clone())),
    )
    .await;
    let refused = call(&router, mcp_post(&path, &session, &bare_call("2", bad))).await;
    assert_eq!(refused.problem, Some(ProblemKind::NotReplayable));
    let error = body_json(&refused);
    assert_eq!(error["id"], 2, "{error}");
    assert!(error.get("result").is_none());
    assert_eq!(counts.calls(), 2);
}

pub async fn errors_and_calls_left_unanswered_are_not_kept<St: IdempotencyStore + Clone>(
    store: St,
) {
    let counts = Counts::default();
    let path = fresh_path();
    let router = app(agent_layer(store.clone()), &path, &counts);
    let session = [("mcp-session-id", "s-1")];
    for framing in ["error", "cancelled"] {
        let args = json!({"to": "ada@example.com", "framing": framing});
        let before = counts.calls();
        for id in ["1", "2"] {
            let reply = call(
                &router,
                mcp_post(&path, &session, &bare_call(id, args.clone())),
            )
            .await;
            assert!(!reply.replayed(), "{framing}: a retry runs the call again");
        }
        assert_eq!(counts.calls(), before + 2, "{framing}");
    }
    // Kept when the application says errors are final.
    let path = fresh_path();
    let router = app(
        agent_layer(store).with_json_rpc_errors_stored(true),
        &path,
        &counts,
    );
    let args = json!({"to": "ada@example.com", "framing": "error"});
    let first = call(
        &router,
        mcp_post(&path, &session, &bare_call("1", args.clone())),
    )
    .await;
    let retry = call(&router, mcp_post(&path, &session, &bare_call("2", args))).await;
    assert!(retry.replayed());
    assert_eq!(body_json(&retry)["id"], 2);
    assert_eq!(body_json(&retry)["error"], body_json(&first)["error"]);
}

pub async fn rejections_are_json_rpc_errors_carrying_the_requests_id<St: IdempotencyStore>(
    store: St,
) {
    let counts = Counts::default();
    let path = fresh_path();
    let layer = agent_layer(store)
        .with_key_source(KeySource::json_pointer("/params/arguments/idempotency_key"))
        .with_wait_mode(WaitMode::Reject)
        .with_request_body_limit(4096);
    let router = app(layer, &path, &counts);
    let session = [("mcp-session-id", "s-1")];
    let expect_error = |reply: &Reply, id: Value, kind: ProblemKind, status: StatusCode| {
        assert_eq!(reply.problem, Some(kind), "{}", reply.text());
        assert_eq!(reply.status, status, "{kind:?}");
        assert_eq!(reply.headers[header::CONTENT_TYPE], "application/json");
        let error = body_json(reply);
        assert_eq!(error["jsonrpc"], "2.0");
        assert_eq!(error["id"], id, "{kind:?}");
        assert!(error["error"]["code"].is_i64());
        assert_eq!(error["error"]["data"]["type"], kind.type_uri());
    };
    // 409 in flight: a duplicate while the first runs.
    let slow = json!({"idempotency_key": "k-1", "sleep_ms": 300});
    let first = {
        let (router, request) = (
            router.clone(),
            mcp_post(&path, &session, &tool_call("1", slow.clone())),
        );
        tokio::spawn(async move { call(&router, request).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let duplicate = call(
        &router,
        mcp_post(&path, &session, &tool_call(r#""dup""#, slow.clone())),
    )
    .await;
    expect_error(
        &duplicate,
        json!("dup"),
        ProblemKind::InFlight,
        StatusCode::OK,
    );
    assert!(duplicate.headers.contains_key(header::RETRY_AFTER));
    first.await.expect("no panic");
    // 409 key reused with other arguments.
    let other = json!({"idempotency_key": "k-1", "to": "someone else"});
    let reused = call(&router, mcp_post(&path, &session, &tool_call("5", other))).await;
    expect_error(&reused, json!(5), ProblemKind::KeyReused, StatusCode::OK);
    // 400 invalid key in the header of a tool call.
    let invalid = call(
        &router,
        mcp_post(
            &path,
            &[("idempotency-key", "")],
            &tool_call("6", json!({})),
        ),
    )
    .await;
    expect_error(&invalid, json!(6), ProblemKind::InvalidKey, StatusCode::OK);
    // 413: the body was not read, so its id is unknown: the transport's HTTP error.
    let large = json!({"idempotency_key": "k-2", "text": "x".repeat(8192)});
    let too_large = call(&router, mcp_post(&path, &session, &tool_call("7", large))).await;
    expect_error(
        &too_large,
        Value::Null,
        ProblemKind::BodyTooLarge,
        StatusCode::PAYLOAD_TOO_LARGE,
    );
    assert_eq!(counts.calls(), 1);
}

pub async fn bodies_that_are_not_json_rpc_2_0_are_plain_requests<St: IdempotencyStore>(store: St) {
    let counts = Counts::default();
    let path = fresh_path();
    let router = app(agent_layer(store), &path, &counts);
    let key = [("idempotency-key", "order-key")];
    let first = call(&router, mcp_post(&path, &key, r#"{"id":"order-1"}"#)).await;
    assert!(first.problem.is_none());
    let other = call(&router, mcp_post(&path, &key, r#"{"id":"order-2"}"#)).await;
    assert_eq!(
        other.problem,
        Some(ProblemKind::KeyReused),
        "another order, not the same payload"
    );
    assert_eq!(other.status, StatusCode::CONFLICT);
    assert_eq!(
        other.headers[header::CONTENT_TYPE],
        "application/problem+json"
    );
    let same = call(&router, mcp_post(&path, &key, r#"{"id":"order-1"}"#)).await;
    assert!(same.replayed());
    assert_eq!(same.body, first.body, "byte for byte: no id rewritten");
}

/// Defines one `#[tokio::test]` per check of this suite, each on the store that `$make` (an
/// async block) builds.
#[macro_export]
macro_rules! json_rpc_suite {
    ($make:expr) => {
        $crate::json_rpc_suite!($make;
            initialize_and_other_unprotected_messages_pass_through_without_a_store_call,
            tool_calls_are_scoped_by_session_and_a_derived_key_needs_an_agent,
            many_concurrent_retries_of_a_call_execute_it_once,
            sse_replays_answer_with_the_retrys_id_and_nothing_else_changes,
            errors_and_calls_left_unanswered_are_not_kept,
            rejections_are_json_rpc_errors_carrying_the_requests_id,
            bodies_that_are_not_json_rpc_2_0_are_plain_requests,
        );
    };
    ($make:expr; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let store = ($make).await;
                $crate::common::json_rpc::$check(store).await;
            }
        )*
    };
}
