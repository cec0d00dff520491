//! One app receiving Stripe-style events, GitHub deliveries and an AI agent's MCP tool calls,
//! each route protected by one layer line, behind its signature check.
//!
//! ```sh
//! cargo run --example webhooks      # http://127.0.0.1:3000 (PORT overrides)
//! ```
//!
//! Signatures use the demo secrets `whsec_demo` (Stripe's scheme: HMAC-SHA-256 of
//! `timestamp.body` in `Stripe-Signature`) and `gh_demo` (GitHub's: HMAC-SHA-256 of the body
//! in `X-Hub-Signature-256`). From another terminal (output from a real run):
//!
//! ```text
//! $ stripe_sign() { t=$(date +%s); printf 't=%s,v1=%s' "$t" "$(printf '%s.%s' "$t" "$1" | openssl dgst -sha256 -hmac whsec_demo | awk '{print $NF}')"; }
//! $ EVENT='{"id":"evt_1QXd8f2eZvKYlo2C","object":"event","type":"checkout.session.completed","pending_webhooks":2,"data":{"object":{"id":"cs_1","amount_total":4200}}}'
//! $ curl -i localhost:3000/stripe/webhook -H "Stripe-Signature: $(stripe_sign "$EVENT")" -H 'Content-Type: application/json' -d "$EVENT"
//! HTTP/1.1 200 OK
//! content-type: application/json
//! idempotency-key-expires-in: 259200
//! content-length: 68
//! date: Tue, 01 Dec 2026 04:03:10 GMT
//!
//! {"execution":1,"fulfilled":"cs_1","received":"evt_1QXd8f2eZvKYlo2C"}
//!
//! $ # Stripe re-delivers: a fresh signature, members in another order, one less pending delivery
//! $ AGAIN='{"type":"checkout.session.completed","data":{"object":{"amount_total":4200,"id":"cs_1"}},"pending_webhooks":1,"object":"event","id":"evt_1QXd8f2eZvKYlo2C"}'
//! $ curl -i localhost:3000/stripe/webhook -H "Stripe-Signature: $(stripe_sign "$AGAIN")" -H 'Content-Type: application/json' -d "$AGAIN"
//! HTTP/1.1 200 OK
//! content-type: application/json
//! idempotency-key-expires-in: 259198
//! idempotent-replayed: true
//! content-length: 68
//! date: Tue, 01 Dec 2026 04:03:11 GMT
//!
//! {"execution":1,"fulfilled":"cs_1","received":"evt_1QXd8f2eZvKYlo2C"}
//!
//! $ # An unsigned request never reaches the layer, so it cannot claim (or read) the event's key
//! $ curl -i localhost:3000/stripe/webhook -H 'Stripe-Signature: t=1,v1=00' -H 'Content-Type: application/json' -d "$EVENT"
//! HTTP/1.1 400 Bad Request
//! content-type: text/plain; charset=utf-8
//! content-length: 18
//! date: Tue, 01 Dec 2026 04:03:11 GMT
//!
//! invalid signature
//!
//! $ gh_sign() { printf 'sha256=%s' "$(printf '%s' "$1" | openssl dgst -sha256 -hmac gh_demo | awk '{print $NF}')"; }
//! $ PUSH='{"ref":"refs/heads/main","after":"6dcb09b5b57875f334f61aebed695e2e4193db5e"}'
//! $ for attempt in 1 2; do curl -s localhost:3000/github/webhook -H 'X-GitHub-Event: push' \
//!     -H 'X-GitHub-Delivery: 72d3162e-cc78-11e3-81ab-4c9367dc0958' -H "X-Hub-Signature-256: $(gh_sign "$PUSH")" \
//!     -d "$PUSH" -w " replayed=%header{idempotent-replayed}\n"; done
//! {"build":"b-1","event":"push","execution":1} replayed=
//! {"build":"b-1","event":"push","execution":1} replayed=true
//!
//! $ # An agent calls a tool, times out, and calls it again with a new JSON-RPC id
//! $ CALL='"method":"tools/call","params":{"name":"send_email","arguments":{"to":"ada@example.com","idempotency_key":"mail-7f3a"}}'
//! $ curl -i localhost:3000/mcp -H 'Content-Type: application/json' -d '{"jsonrpc":"2.0","id":1,'"$CALL"'}'
//! HTTP/1.1 200 OK
//! content-type: application/json
//! content-length: 121
//! date: Tue, 01 Dec 2026 04:03:11 GMT
//!
//! {"id":1,"jsonrpc":"2.0","result":{"content":[{"text":"email #1 sent to ada@example.com","type":"text"}],"isError":false}}
//!
//! $ curl -i localhost:3000/mcp -H 'Content-Type: application/json' -d '{"jsonrpc":"2.0","id":"retry-2",'"$CALL"'}'
//! HTTP/1.1 200 OK
//! content-type: application/json
//! idempotent-replayed: true
//! content-length: 129
//! date: Tue, 01 Dec 2026 04:03:11 GMT
//!
//! {"id":"retry-2","jsonrpc":"2.0","result":{"content":[{"text":"email #1 sent to ada@example.com","type":"text"}],"isError":false}}
//! ```

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Json, Router,
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::post,
};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tower_idempotency::{
    BodyFingerprint, IDEMPOTENCY_KEY_EXPIRES_IN, IdempotencyLayer, KeySource, MemoryStore,
};

const STRIPE_SECRET: &[u8] = b"whsec_demo";
const GITHUB_SECRET: &[u8] = b"gh_demo";
/// Stripe's libraries refuse signatures older than five minutes.
const STRIPE_TOLERANCE: Duration = Duration::from_secs(300);
const HOURS: u64 = 60 * 60;

/// How many times each handler really ran.
#[derive(Clone, Default)]
struct Executions(Arc<AtomicUsize>);

impl Executions {
    fn next(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
}

async fn stripe_event(State(runs): State<Executions>, Json(event): Json<Value>) -> Json<Value> {
    // Fulfil the order once per event, whatever the number of deliveries.
    let run = runs.next();
    tracing::info!(event = %event["id"], run, "fulfilling order");
    Json(
        json!({ "received": event["id"], "fulfilled": event["data"]["object"]["id"], "execution": run }),
    )
}

async fn github_push(State(runs): State<Executions>, headers: HeaderMap) -> Json<Value> {
    let run = runs.next();
    let event = headers.get("x-github-event").and_then(|v| v.to_str().ok());
    tracing::info!(?event, run, "starting a build");
    Json(json!({ "build": format!("b-{run}"), "event": event, "execution": run }))
}

/// A minimal MCP endpoint: one tool, `send_email`, answered with `application/json`.
async fn mcp(State(runs): State<Executions>, Json(call): Json<Value>) -> Response {
    let Some(id) = call.get("id").cloned() else {
        // A notification: accepted, nothing to answer.
        return StatusCode::ACCEPTED.into_response();
    };
    let result = match call["method"].as_str() {
        Some("tools/call") if call["params"]["name"] == "send_email" => {
            let run = runs.next();
            let to = call["params"]["arguments"]["to"]
                .as_str()
                .unwrap_or("nobody");
            tracing::info!(to, run, "sending an email");
            json!({ "content": [{ "type": "text", "text": format!("email #{run} sent to {to}") }], "isError": false })
        }
        _ => {
            let error = json!({ "code": -32601, "message": "method not found" });
            return Json(json!({ "jsonrpc": "2.0", "id": id, "error": error })).into_response();
        }
    };
    Json(json!({ "jsonrpc": "2.0", "id": id, "result": result })).into_response()
}

fn hmac_hex(secret: &[u8], parts: &[&[u8]]) -> Option<String> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).ok()?;
    for part in parts {
        mac.update(part);
    }
    let digest = mac.finalize().into_bytes();
    Some(digest.iter().map(|b| format!("{b:02x}")).collect())
}

/// Stripe's scheme: `Stripe-Signature: t=<unix seconds>,v1=<hex HMAC of "t.body">`.
fn stripe_signed(headers: &HeaderMap, body: &[u8]) -> bool {
    let Some(signature) = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let field = |name: &str| {
        signature
            .split(',')
            .find_map(|item| item.strip_prefix(name)?.strip_prefix('='))
    };
    let (Some(t), Some(v1)) = (field("t"), field("v1")) else {
        return false;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let fresh = t
        .parse::<u64>()
        .is_ok_and(|t| now.abs_diff(t) <= STRIPE_TOLERANCE.as_secs());
    // A real check compares in constant time (`Mac::verify_slice`); kept short here.
    fresh && hmac_hex(STRIPE_SECRET, &[t.as_bytes(), b".", body]).as_deref() == Some(v1)
}

/// GitHub's scheme: `X-Hub-Signature-256: sha256=<hex HMAC of the body>`.
fn github_signed(headers: &HeaderMap, body: &[u8]) -> bool {
    let signature = headers
        .get("x-hub-signature-256")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("sha256="));
    signature.is_some() && hmac_hex(GITHUB_SECRET, &[body]).as_deref() == signature
}

/// Verifies a signature before anything else sees the request: an unsigned request never
/// reaches the idempotency layer, so it cannot claim a key (or be replayed someone's
/// response).
async fn verify(check: fn(&HeaderMap, &[u8]) -> bool, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 1024 * 1024).await else {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    };
    if !check(&parts.headers, &body) {
        return (StatusCode::BAD_REQUEST, "invalid signature\n").into_response();
    }
    next.run(Request::from_parts(parts, Body::from(body))).await
}

fn app() -> Router {
    // Stripe retries an event for up to three days: honour its id at least that long.
    let stripe = Router::new()
        .route("/stripe/webhook", post(stripe_event))
        .with_state(Executions::default())
        .layer(
            IdempotencyLayer::new(MemoryStore::default())
                .with_key_source(KeySource::stripe_event())
                .with_body_fingerprint(BodyFingerprint::canonical_json_excluding([
                    "/pending_webhooks",
                ]))
                .with_ttl(Duration::from_secs(72 * HOURS))
                .with_expiry_header(IDEMPOTENCY_KEY_EXPIRES_IN),
        )
        .layer(middleware::from_fn(|request, next| {
            verify(stripe_signed, request, next)
        }));

    // GitHub lets you redeliver deliveries from the past three days.
    let github = Router::new()
        .route("/github/webhook", post(github_push))
        .with_state(Executions::default())
        .layer(
            IdempotencyLayer::new(MemoryStore::default())
                .with_key_source(KeySource::github_delivery())
                .with_ttl(Duration::from_secs(72 * HOURS)),
        )
        .layer(middleware::from_fn(|request, next| {
            verify(github_signed, request, next)
        }));

    // An agent retries a tool call after a timeout, with a new JSON-RPC id.
    let agent = Router::new()
        .route("/mcp", post(mcp))
        .with_state(Executions::default())
        .layer(
            IdempotencyLayer::new(MemoryStore::default())
                .with_key_source(KeySource::json_pointer("/params/arguments/idempotency_key"))
                .with_json_rpc(true)
                .with_ttl(Duration::from_secs(24 * HOURS)),
        );

    Router::new().merge(stripe).merge(github).merge(agent)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "webhooks=info,tower_idempotency=debug".into()),
        )
        .init();
    let port = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3000);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!("listening on http://{addr}");
    axum::serve(listener, app()).await
}
