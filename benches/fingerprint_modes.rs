//! What each fingerprint mode costs per request, beside the default (raw body, no secret) in
//! the same run: a replay of a ~450-byte Stripe-style event through the layer on
//! `MemoryStore`, driven in process with `oneshot` (the replay path reads, fingerprints and
//! addresses the request, and answers from the store; the handler never runs). The JSON-RPC
//! mode replays an MCP `tools/call` of about the same size, with the `_meta` an SDK sends.
//!
//! ```sh
//! cargo bench --bench fingerprint_modes
//! ```
//!
//! It ends with each mode's heap allocations per replay (a counting global allocator): a
//! deterministic figure beside the timings, which a shared machine makes noisy.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    convert::Infallible,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use bytes::Bytes;
use criterion::{BatchSize, Criterion};
use http::{HeaderName, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt, service_fn};
use tower_idempotency::{
    BodyFingerprint, FingerprintHeaders, IdempotencyLayer, IdempotencyStore, KeySource, MemoryStore,
};

/// Counts allocations (a `realloc` counts as one).
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; counting has no effect
// on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on as it is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as for `alloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as for `alloc`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const EVENT: &str = r#"{"id":"evt_1QXd8f2eZvKYlo2C","object":"event","api_version":"2024-06-20","created":1733011200,"type":"charge.succeeded","livemode":false,"pending_webhooks":1,"request":{"id":"req_8bXg9QbQWmZqLr","idempotency_key":"8e03978e-40d5-43e8-bc93-6894a57f9324"},"data":{"object":{"id":"ch_3QXd8e2eZvKYlo2C0","object":"charge","amount":1000,"amount_captured":1000,"currency":"eur","customer":"cus_R3xYz","description":"Order 1042","paid":true,"status":"succeeded","metadata":{"order_id":"1042"}}}}"#;

/// An MCP tool call of about the event's size, keyed by an argument.
const TOOL_CALL: &str = r#"{"jsonrpc":"2.0","id":17,"method":"tools/call","params":{"name":"create_charge","arguments":{"idempotency_key":"8e03978e-40d5-43e8-bc93-6894a57f9324","amount":1000,"currency":"eur","customer":"cus_R3xYz","description":"Order 1042","metadata":{"order_id":"1042","channel":"agent","note":"replay of a charge created by an agent"}},"_meta":{"progressToken":17,"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}}}"#;

fn request(body: &'static str) -> Request<Full<Bytes>> {
    Request::post("/stripe/webhook")
        .header("content-type", "application/json")
        .header(
            "stripe-signature",
            "t=1733011200,v1=5257a869e7ecebeda32affa62cdca3fa51cad7e77a0e56ff536d0ce8e108d8bd",
        )
        .header(
            "user-agent",
            "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
        )
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("a valid request")
}

fn modes() -> Vec<(&'static str, IdempotencyLayer<MemoryStore>, &'static str)> {
    let base =
        || IdempotencyLayer::new(MemoryStore::default()).with_key_source(KeySource::stripe_event());
    let tools = || {
        IdempotencyLayer::new(MemoryStore::default())
            .with_key_source(KeySource::json_pointer("/params/arguments/idempotency_key"))
    };
    vec![
        ("raw (default)", base(), EVENT),
        ("secret (HMAC)", base().with_secret([7u8; 32]), EVENT),
        (
            "canonical JSON",
            base().with_body_fingerprint(BodyFingerprint::canonical_json()),
            EVENT,
        ),
        (
            "canonical JSON, 1 field excluded",
            base().with_body_fingerprint(BodyFingerprint::canonical_json_excluding([
                "/pending_webhooks",
            ])),
            EVENT,
        ),
        (
            "headers all but the signature",
            base().with_fingerprint_headers(FingerprintHeaders::all_except([
                HeaderName::from_static("stripe-signature"),
            ])),
            EVENT,
        ),
        ("tool call, raw", tools(), TOOL_CALL),
        (
            "tool call, JSON-RPC",
            tools().with_json_rpc(true),
            TOOL_CALL,
        ),
    ]
}

async fn send<St: IdempotencyStore>(
    layer: &IdempotencyLayer<St>,
    body: &'static str,
) -> StatusCode {
    let svc = layer.layer(service_fn(|_request| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
            b"{\"ok\":true}",
        ))))
    }));
    let response = match svc.oneshot(request(body)).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let status = response.status();
    let _ = response.into_body().collect().await;
    status
}

fn main() {
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
        .configure_from_args();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let mut group = criterion.benchmark_group("replay by fingerprint mode");
    let mut allocations = Vec::new();
    for (name, layer, body) in modes() {
        // The first request executes and stores; every timed one is a replay.
        assert_eq!(runtime.block_on(send(&layer, body)), StatusCode::OK);
        const COUNTED: u64 = 1000;
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for _ in 0..COUNTED {
            runtime.block_on(send(&layer, body));
        }
        let counted = ALLOCATIONS.load(Ordering::Relaxed) - before;
        allocations.push((name, counted as f64 / COUNTED as f64));
        group.bench_function(name, |b| {
            b.iter_batched(
                || (),
                |()| runtime.block_on(send(&layer, body)),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
    criterion.final_summary();
    println!("\n{:<36}{:>14}", "mode", "allocs/replay");
    for (name, per_request) in allocations {
        println!("{name:<36}{per_request:>14.2}");
    }
}
