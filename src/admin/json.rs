//! The admin router's answers: JSON bodies, never cached.

use std::time::SystemTime;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde_json::{Value, json};

use crate::{
    fingerprint::digest::hex,
    key::StorageKey,
    store::inspect::{ClaimInfo, RecordInfo},
};

pub(super) fn unix_ms(at: SystemTime) -> Value {
    match at.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(since) => json!(u64::try_from(since.as_millis()).unwrap_or(u64::MAX)),
        Err(_) => Value::Null,
    }
}

pub(super) fn claim_json(claim: &ClaimInfo, now: SystemTime) -> Value {
    json!({
        "key_digest": claim.key().to_hex(),
        "state": "in_flight",
        "abandoned": claim.is_abandoned(now),
        "token": format!("{:#018x}", claim.token().get()),
        "fingerprint": hex(claim.fingerprint().as_bytes()),
        "claimed_at_ms": claim.claimed_at().map_or(Value::Null, unix_ms),
        "age_ms": claim.age(now).map(|age| u64::try_from(age.as_millis()).unwrap_or(u64::MAX)),
        "lease_expires_at_ms": unix_ms(claim.lease_expires_at()),
    })
}

pub(super) fn record_json(key: &StorageKey, record: &RecordInfo) -> Value {
    json!({
        "key_digest": key.to_hex(),
        "state": "completed",
        "status": record.status().as_u16(),
        "replayable": record.is_replayable(),
        "header_count": record.header_count(),
        "body_len": record.body_len(),
        "fingerprint": hex(record.fingerprint().as_bytes()),
        "created_at_ms": record.created_at().map_or(Value::Null, unix_ms),
        "expires_at_ms": record.expires_at().map_or(Value::Null, unix_ms),
    })
}

pub(super) fn json_response(status: StatusCode, body: Value) -> Response {
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

pub(super) fn bad_request(message: &'static str) -> Response {
    json_response(StatusCode::BAD_REQUEST, json!({ "error": message }))
}
