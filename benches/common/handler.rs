//! The application every benchmark and the load-test server run, so that "what does the layer
//! cost" is always measured against the same handler: it reads a ~200-byte JSON charge
//! request and answers `201 Created` with a ~300-byte JSON charge (`GET` answers `200` with a
//! canned charge, built the same way).
//!
//! Shared by `benches/*.rs` (as `mod common`) and `examples/bench_server.rs` (by `#[path]`).

use std::{
    convert::Infallible,
    sync::atomic::{AtomicU64, Ordering},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};

/// How many charges the handler created: tells a replay from a second execution.
pub static CREATED: AtomicU64 = AtomicU64::new(0);

/// The request a `GET` is answered from.
const CANNED: &[u8] = br#"{"amount":1000,"currency":"eur","customer":"cus_9s6XKzkNRiz8i3","description":"Two flat whites and a croissant","metadata":{"order_id":"ord_0000000000000000","channel":"web"},"capture":true}"#;

#[derive(Deserialize)]
struct NewCharge {
    amount: u64,
    currency: String,
    customer: String,
    description: String,
    metadata: Metadata,
    capture: bool,
}

#[derive(Deserialize, Serialize)]
struct Metadata {
    order_id: String,
    channel: String,
}

#[derive(Serialize)]
struct Charge {
    id: String,
    object: &'static str,
    amount: u64,
    currency: String,
    customer: String,
    description: String,
    status: &'static str,
    captured: bool,
    created: u64,
    livemode: bool,
    metadata: Metadata,
}

/// A charge request of about 200 bytes; `n` makes it unique (derived keys, fresh bodies).
pub fn charge_request(n: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"amount":1000,"currency":"eur","customer":"cus_9s6XKzkNRiz8i3","description":"Two flat whites and a croissant","metadata":{{"order_id":"ord_{n:016x}","channel":"web"}},"capture":true}}"#
    ))
}

/// The handler's work on a read body: parse the charge, answer with the created charge.
pub fn respond(method: &Method, body: &[u8]) -> Response<Full<Bytes>> {
    let (status, body) = if method == Method::GET {
        (StatusCode::OK, CANNED)
    } else {
        (StatusCode::CREATED, body)
    };
    let Ok(new) = serde_json::from_slice::<NewCharge>(body) else {
        return plain(StatusCode::BAD_REQUEST);
    };
    let n = CREATED.fetch_add(1, Ordering::Relaxed);
    let charge = Charge {
        id: format!("ch_{n:024x}"),
        object: "charge",
        amount: new.amount,
        currency: new.currency,
        customer: new.customer,
        description: new.description,
        status: "succeeded",
        captured: new.capture,
        created: 1_795_487_475 + n,
        livemode: false,
        metadata: new.metadata,
    };
    let Ok(json) = serde_json::to_vec(&charge) else {
        return plain(StatusCode::INTERNAL_SERVER_ERROR);
    };
    let mut response = Response::new(Full::new(Bytes::from(json)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// The handler as a `tower::service_fn` function: reads the body whole, then [`respond`]s.
pub async fn handle<B>(request: Request<B>) -> Result<Response<Full<Bytes>>, Infallible>
where
    B: Body<Data = Bytes>,
{
    let (parts, body) = request.into_parts();
    match body.collect().await {
        Ok(collected) => Ok(respond(&parts.method, &collected.to_bytes())),
        Err(_) => Ok(plain(StatusCode::BAD_REQUEST)),
    }
}

fn plain(status: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}
