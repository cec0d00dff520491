//! The layer's own rejections of a JSON-RPC request, as JSON-RPC error responses.
//!
//! The error's `data` is the problem's RFC 9457 body, so a client tells the rejections apart
//! as it would over plain HTTP. The HTTP status: 200 when the request's `id` is known (the
//! MCP streamable HTTP transport carries JSON-RPC errors in 200 responses, and clients match
//! them to their call by `id`); the problem's own status otherwise (the transport's answer to
//! input it cannot accept: an HTTP error with a JSON-RPC error that has no `id`).

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use super::http::retry_after_secs;
use super::{Problem, ProblemKind};

/// The JSON-RPC error code of a problem: JSON-RPC's own for a request that is not valid
/// (-32600) and for an internal failure (-32603), and codes of the implementation-defined
/// server error range for the rest.
pub(crate) fn code(kind: ProblemKind) -> i32 {
    match kind {
        ProblemKind::MissingKey
        | ProblemKind::InvalidKey
        | ProblemKind::UnreadableBody
        | ProblemKind::BodyTooLarge => -32600,
        ProblemKind::InFlight => -32080,
        ProblemKind::KeyReused => -32081,
        ProblemKind::NotReplayable => -32082,
        ProblemKind::StoreUnavailable => -32083,
        ProblemKind::OutcomeUnknown => -32084,
        ProblemKind::HandlerFailed => -32603,
    }
}

impl Problem {
    /// A JSON-RPC retry whose kept response carries no JSON-RPC response that could be given
    /// the retry's `id`.
    pub(crate) fn unanswerable() -> Self {
        Self::new(
            ProblemKind::NotReplayable,
            StatusCode::CONFLICT,
            "the request with this idempotency key completed, but its kept response carries no \
             JSON-RPC response that could be answered with this request's id; it will not be \
             executed again",
        )
    }

    /// The problem as a JSON-RPC error response to the request whose `id` is `id` (raw JSON
    /// text, as the request wrote it), with `Cache-Control: no-store` and `Retry-After` when
    /// set.
    pub(crate) fn to_json_rpc_response(&self, id: Option<&[u8]>) -> Response<Bytes> {
        error_response(self, id)
    }
}

fn error_response(problem: &Problem, id: Option<&[u8]>) -> Response<Bytes> {
    let (id, status) = match id {
        Some(id) => (id, StatusCode::OK),
        None => (&b"null"[..], problem.status()),
    };
    let title = serde_json::Value::from(problem.title()).to_string();
    let mut body = Vec::with_capacity(128 + id.len() + problem.detail().len());
    body.extend_from_slice(br#"{"jsonrpc":"2.0","id":"#);
    body.extend_from_slice(id);
    body.extend_from_slice(
        format!(
            r#","error":{{"code":{},"message":{title},"data":{}}}}}"#,
            code(problem.kind()),
            problem.to_json()
        )
        .as_bytes(),
    );
    let mut response = Response::new(Bytes::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(after) = problem.retry_after() {
        headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from(retry_after_secs(after)),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::Value;

    use super::*;

    #[test]
    fn every_rejection_is_a_json_rpc_error_carrying_the_requests_id() {
        let problems = [
            Problem::missing_key(&http::HeaderName::from_static("idempotency-key")),
            Problem::unreadable_body(),
            Problem::body_too_large(1024),
            Problem::in_flight(),
            Problem::key_reused(StatusCode::CONFLICT),
            Problem::key_reused(StatusCode::UNPROCESSABLE_ENTITY),
            Problem::not_replayable(StatusCode::OK, 1024),
            Problem::store_unavailable(),
            Problem::handler_failed(),
            Problem::outcome_unknown(),
        ];
        for problem in &problems {
            for (id, status) in [
                (Some(&br#""call-\"7\"""#[..]), StatusCode::OK),
                (Some(b"42"), StatusCode::OK),
                (None, problem.status()),
            ] {
                let response = error_response(problem, id);
                assert_eq!(response.status(), status, "{problem}");
                assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
                assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
                assert_eq!(
                    response.headers().contains_key(header::RETRY_AFTER),
                    problem.retry_after().is_some()
                );
                let body: Value = serde_json::from_slice(response.body()).expect("JSON");
                assert_eq!(body["jsonrpc"], "2.0");
                let expected_id: Value = serde_json::from_slice(id.unwrap_or(b"null")).unwrap();
                assert_eq!(body["id"], expected_id, "{problem}");
                assert_eq!(body["error"]["code"], code(problem.kind()));
                assert_eq!(body["error"]["message"], problem.title());
                assert_eq!(body["error"]["data"]["type"], problem.type_uri());
                assert_eq!(body["error"]["data"]["status"], problem.status().as_u16());
                assert_eq!(body["error"]["data"]["detail"], problem.detail());
                assert!(body.get("result").is_none());
            }
        }
        let waited = Problem::in_flight().with_retry_after(Duration::from_millis(1500));
        assert_eq!(
            error_response(&waited, Some(b"1")).headers()[header::RETRY_AFTER],
            "2"
        );
    }

    #[test]
    fn the_codes_are_json_rpc_s_own_or_in_the_server_error_range() {
        for kind in [
            ProblemKind::MissingKey,
            ProblemKind::InvalidKey,
            ProblemKind::UnreadableBody,
            ProblemKind::BodyTooLarge,
            ProblemKind::InFlight,
            ProblemKind::KeyReused,
            ProblemKind::NotReplayable,
            ProblemKind::StoreUnavailable,
            ProblemKind::HandlerFailed,
            ProblemKind::OutcomeUnknown,
        ] {
            let code = code(kind);
            assert!(
                code == -32600 || code == -32603 || (-32099..=-32000).contains(&code),
                "{kind:?}: {code}"
            );
        }
    }
}
