//! The layer's own rejections of a gRPC call, as gRPC statuses: Trailers-Only responses
//! (HTTP 200, `content-type: application/grpc`, `grpc-status` and `grpc-message` in the
//! headers, no body), which every gRPC client reads as the call's status.
//!
//! The codes are chosen for what a client's retry policy does with them (gRFC A6, AIP-194:
//! `UNAVAILABLE` is the code clients retry, as the request was not processed; the others are
//! not retried automatically):
//!
//! | problem | code | why |
//! |---|---|---|
//! | in flight | `UNAVAILABLE` + pushback | this request was not processed; the same call, retried with its key after the pushback, gets the first call's answer. `ABORTED` would tell the client to restart a read-modify-write at a higher level, i.e. a new call |
//! | store unavailable | `UNAVAILABLE` + pushback | nothing ran; a retry with the same key is safe |
//! | key reused with another request | `FAILED_PRECONDITION` | the key is bound to another payload: state, not the request alone, makes it wrong, and a retry changes nothing. Never `ALREADY_EXISTS`: create-if-absent clients take it as success |
//! | outcome unknown, not replayable | `FAILED_PRECONDITION` | "do not retry until the system state is fixed" (an operator, or the record expiring) |
//! | missing or invalid key, unreadable body | `INVALID_ARGUMENT` | the call itself is wrong |
//! | request too large | `RESOURCE_EXHAUSTED` | what gRPC answers a message over the receive limit |
//! | handler panicked | `INTERNAL` | the key is released; a retry runs again |
//!
//! Transient problems carry `grpc-retry-pushback-ms` (a retry policy waits that long); every
//! rejection carries `idempotency-problem`, the problem's `type` URI, so a client tells the
//! rejections apart without parsing the message.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, header};

use super::{Problem, ProblemKind};
use crate::protocol::grpc::{
    GRPC_MESSAGE, GRPC_RETRY_PUSHBACK_MS, GRPC_STATUS, GrpcCode, percent_encode,
};

/// The metadata naming which rule a rejected call broke: the problem's `type` URI.
pub(crate) const IDEMPOTENCY_PROBLEM: HeaderName = HeaderName::from_static("idempotency-problem");

/// The gRPC status code of a problem (see the module's table for why).
pub(crate) fn code(kind: ProblemKind) -> GrpcCode {
    match kind {
        ProblemKind::MissingKey | ProblemKind::InvalidKey | ProblemKind::UnreadableBody => {
            GrpcCode::InvalidArgument
        }
        ProblemKind::BodyTooLarge => GrpcCode::ResourceExhausted,
        ProblemKind::InFlight | ProblemKind::StoreUnavailable => GrpcCode::Unavailable,
        ProblemKind::KeyReused | ProblemKind::NotReplayable | ProblemKind::OutcomeUnknown => {
            GrpcCode::FailedPrecondition
        }
        ProblemKind::HandlerFailed => GrpcCode::Internal,
    }
}

impl Problem {
    /// The problem as a gRPC Trailers-Only response.
    pub(crate) fn to_grpc_response(&self) -> Response<Bytes> {
        let mut response = Response::new(Bytes::new());
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(
            GRPC_STATUS,
            HeaderValue::from(u16::from(code(self.kind()).as_u8())),
        );
        let message = percent_encode(&format!("{}: {}", self.title(), self.detail()));
        // Percent-encoding leaves printable ASCII only, which a header value always takes.
        if let Ok(message) = HeaderValue::from_str(&message) {
            headers.insert(GRPC_MESSAGE, message);
        }
        headers.insert(
            IDEMPOTENCY_PROBLEM,
            HeaderValue::from_static(self.type_uri()),
        );
        if let Some(after) = self.retry_after() {
            let millis = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
            headers.insert(GRPC_RETRY_PUSHBACK_MS, HeaderValue::from(millis));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use http::StatusCode;

    use super::*;
    use crate::protocol::grpc::{self, percent_decode};

    fn problems() -> [Problem; 11] {
        [
            Problem::missing_key(&HeaderName::from_static("idempotency-key")),
            Problem::invalid_key(&crate::key::IdempotencyKey::parse(b"").unwrap_err()),
            Problem::unreadable_body(),
            Problem::body_too_large(1024),
            Problem::in_flight(),
            Problem::key_reused(StatusCode::CONFLICT),
            Problem::key_reused(StatusCode::UNPROCESSABLE_ENTITY),
            Problem::not_replayable(StatusCode::OK, 1024),
            Problem::store_unavailable(),
            Problem::handler_failed(),
            Problem::outcome_unknown(),
        ]
    }

    #[test]
    fn every_rejection_is_a_trailers_only_response_with_its_status() {
        for problem in &problems() {
            let response = problem.to_grpc_response();
            assert_eq!(response.status(), StatusCode::OK, "{problem}");
            assert!(response.body().is_empty(), "Trailers-Only: no message");
            let headers = response.headers();
            assert_eq!(headers[header::CONTENT_TYPE], "application/grpc");
            assert_eq!(
                grpc::status(headers, 0, None),
                Some(code(problem.kind())),
                "{problem}"
            );
            let message = percent_decode(headers[GRPC_MESSAGE].as_bytes());
            assert_eq!(
                message,
                format!("{}: {}", problem.title(), problem.detail())
            );
            assert_eq!(headers[IDEMPOTENCY_PROBLEM], problem.type_uri());
            assert_eq!(
                headers.contains_key(GRPC_RETRY_PUSHBACK_MS),
                problem.retry_after().is_some(),
                "{problem}"
            );
        }
    }

    #[test]
    fn the_codes_are_the_ones_clients_retry_correctly() {
        for (problem, expected, pushback) in [
            (Problem::in_flight(), GrpcCode::Unavailable, Some("1000")),
            (
                Problem::store_unavailable(),
                GrpcCode::Unavailable,
                Some("2000"),
            ),
            (
                Problem::key_reused(StatusCode::CONFLICT),
                GrpcCode::FailedPrecondition,
                None,
            ),
            (
                Problem::outcome_unknown(),
                GrpcCode::FailedPrecondition,
                None,
            ),
            (
                Problem::missing_key(&HeaderName::from_static("idempotency-key")),
                GrpcCode::InvalidArgument,
                None,
            ),
            (
                Problem::body_too_large(1),
                GrpcCode::ResourceExhausted,
                None,
            ),
            (Problem::handler_failed(), GrpcCode::Internal, None),
        ] {
            let response = problem.to_grpc_response();
            assert_eq!(code(problem.kind()), expected, "{problem}");
            assert_eq!(
                response
                    .headers()
                    .get(GRPC_RETRY_PUSHBACK_MS)
                    .map(|v| v.to_str().unwrap()),
                pushback,
                "{problem}"
            );
        }
        // A client must never read a refused call as done.
        for problem in &problems() {
            assert_ne!(code(problem.kind()), GrpcCode::Ok);
            assert_ne!(code(problem.kind()), GrpcCode::AlreadyExists);
        }
    }
}
