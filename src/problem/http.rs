//! [`Problem`] and [`ProblemKind`] as RFC 9457 `application/problem+json` responses, and
//! [`ProblemResponse`], the strategy that renders them.

use std::{borrow::Cow, fmt, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

/// Which rule a request broke; the `type` of its problem.
///
/// The layer puts the kind into the extensions of every response it produces itself, beside
/// the whole [`Problem`], so outer layers and tests can tell them apart without parsing the
/// body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProblemKind {
    /// The request has no key and the layer requires one (400).
    MissingKey,
    /// The key is empty, too long, not visible ASCII, malformed or repeated (400).
    InvalidKey,
    /// The request body could not be read (400).
    UnreadableBody,
    /// The request body is over the configured limit (413).
    BodyTooLarge,
    /// Another request with the same key is still being processed (409, `Retry-After`).
    InFlight,
    /// The key was used before with another method, path, query or body (409 or 422).
    KeyReused,
    /// The first request with this key completed, but its response was too large to keep (or
    /// was a stream cut short, still running long after its client left), so it cannot be
    /// replayed (409). It is never executed a second time.
    NotReplayable,
    /// The idempotency store is unavailable, so the request cannot be protected (503,
    /// `Retry-After`).
    StoreUnavailable,
    /// The handler panicked (500); or, completing in the handler's own transaction
    /// (`PostgresStore::in_handler_transaction`, feature `postgres`),
    /// its streamed body failed or panicked before the commit, and the transaction was rolled
    /// back. The key is released: a retry executes again.
    HandlerFailed,
    /// An earlier request with this key was claimed and its owner's lease ended without
    /// completion (it crashed mid-request): whether its work happened is unknown, and the
    /// application chose not to run it again until an operator resolves it (409). Only with
    /// [`Recovery::OutcomeUnknown`](crate::Recovery::OutcomeUnknown).
    OutcomeUnknown,
}

impl ProblemKind {
    /// The problem `type` URI: this variant's documentation.
    pub fn type_uri(self) -> &'static str {
        macro_rules! uri {
            ($variant:literal) => {
                concat!(
                    "https://docs.rs/tower-idempotency/latest/tower_idempotency/enum.ProblemKind.html#variant.",
                    $variant
                )
            };
        }
        match self {
            Self::MissingKey => uri!("MissingKey"),
            Self::InvalidKey => uri!("InvalidKey"),
            Self::UnreadableBody => uri!("UnreadableBody"),
            Self::BodyTooLarge => uri!("BodyTooLarge"),
            Self::InFlight => uri!("InFlight"),
            Self::KeyReused => uri!("KeyReused"),
            Self::NotReplayable => uri!("NotReplayable"),
            Self::StoreUnavailable => uri!("StoreUnavailable"),
            Self::HandlerFailed => uri!("HandlerFailed"),
            Self::OutcomeUnknown => uri!("OutcomeUnknown"),
        }
    }

    /// A short, fixed summary of the problem.
    pub fn title(self) -> &'static str {
        match self {
            Self::MissingKey => "Idempotency key missing",
            Self::InvalidKey => "Idempotency key invalid",
            Self::UnreadableBody => "Request body unreadable",
            Self::BodyTooLarge => "Request body too large",
            Self::InFlight => "Request with this idempotency key in progress",
            Self::KeyReused => "Idempotency key reused with another request",
            Self::NotReplayable => "Original response cannot be replayed",
            Self::StoreUnavailable => "Idempotency store unavailable",
            Self::HandlerFailed => "Request handler failed",
            Self::OutcomeUnknown => "Outcome of an earlier request with this key unknown",
        }
    }
}

/// A problem response the layer is about to send: kind, status, detail and, for transient
/// problems, when to retry.
///
/// Render it yourself with a [`ProblemResponse`] given to
/// [`IdempotencyLayer::with_problem_response`](crate::IdempotencyLayer::with_problem_response),
/// or let [`Problem::to_response`] write `application/problem+json` (the default).
///
/// However it is rendered, the layer puts the whole problem (and its [`ProblemKind`]) into the
/// extensions of every response it produces itself, so a handler's caller or an outer layer
/// can read it without parsing the body:
///
/// ```
/// use http::{Request, Response, StatusCode};
/// use tower::{Layer, ServiceExt, service_fn};
/// use tower_idempotency::{IdempotencyLayer, MemoryStore, Problem, ProblemKind};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let handler = service_fn(|_request: Request<_>| async {
///     Ok::<_, std::convert::Infallible>(Response::new(String::from("charged")))
/// });
/// let service = IdempotencyLayer::new(MemoryStore::default()).layer(handler);
///
/// let request = Request::post("/charges")
///     .header("idempotency-key", "not a valid key")
///     .body(String::from("{}"))
///     .unwrap();
/// let response = service.oneshot(request).await.unwrap();
///
/// let problem = response.extensions().get::<Problem>().expect("the layer's own response");
/// assert_eq!(problem.kind(), ProblemKind::InvalidKey);
/// assert_eq!(problem.status(), StatusCode::BAD_REQUEST);
/// assert_eq!(response.status(), problem.status());
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    kind: ProblemKind,
    status: StatusCode,
    detail: Cow<'static, str>,
    retry_after: Option<Duration>,
}

/// How long a client should wait before retrying an in-flight key.
pub(crate) const IN_FLIGHT_RETRY_AFTER: Duration = Duration::from_secs(1);
/// How long a client should wait before retrying while the store is down.
pub(crate) const UNAVAILABLE_RETRY_AFTER: Duration = Duration::from_secs(2);

impl Problem {
    pub(crate) fn new(
        kind: ProblemKind,
        status: StatusCode,
        detail: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            kind,
            status,
            detail: detail.into(),
            retry_after: None,
        }
    }

    pub(crate) fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    pub(crate) fn missing_key(header: &http::HeaderName) -> Self {
        Self::new(
            ProblemKind::MissingKey,
            StatusCode::BAD_REQUEST,
            format!("this request must carry an idempotency key in the {header} header"),
        )
    }

    /// A gRPC call whose key was to be read from its request message, which is not one
    /// uncompressed message (a compressed one, most often): its key cannot be read.
    pub(crate) fn grpc_message_unreadable(header: &http::HeaderName) -> Self {
        Self::new(
            ProblemKind::MissingKey,
            StatusCode::BAD_REQUEST,
            format!(
                "the idempotency key could not be read from this call's request message, which \
                 is compressed or not one message: send it uncompressed, or send the key in \
                 the {header} metadata"
            ),
        )
    }

    pub(crate) fn invalid_key(error: &crate::key::KeyError) -> Self {
        Self::new(
            ProblemKind::InvalidKey,
            StatusCode::BAD_REQUEST,
            error.to_string(),
        )
    }

    pub(crate) fn unreadable_body() -> Self {
        Self::new(
            ProblemKind::UnreadableBody,
            StatusCode::BAD_REQUEST,
            "the request body could not be read to the end",
        )
    }

    pub(crate) fn body_too_large(limit: usize) -> Self {
        Self::new(
            ProblemKind::BodyTooLarge,
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than {limit} bytes; nothing was executed"),
        )
    }

    pub(crate) fn in_flight() -> Self {
        Self::new(
            ProblemKind::InFlight,
            StatusCode::CONFLICT,
            "a request with this idempotency key is still being processed; retry later",
        )
        .with_retry_after(IN_FLIGHT_RETRY_AFTER)
    }

    pub(crate) fn key_reused(status: StatusCode) -> Self {
        Self::new(
            ProblemKind::KeyReused,
            status,
            "this idempotency key was already used with another method, path, query or body; \
             nothing was executed",
        )
    }

    pub(crate) fn not_replayable(original: StatusCode, limit: usize) -> Self {
        Self::new(
            ProblemKind::NotReplayable,
            StatusCode::CONFLICT,
            format!(
                "the request with this idempotency key completed with status {}, but its response \
                 was larger than {limit} bytes (or had more than {} header fields, or was a \
                 stream cut short after its client left) and was not kept; it will not be \
                 executed again",
                original.as_u16(),
                crate::record::MAX_RECORD_HEADERS,
            ),
        )
    }

    pub(crate) fn store_unavailable() -> Self {
        Self::new(
            ProblemKind::StoreUnavailable,
            StatusCode::SERVICE_UNAVAILABLE,
            "the idempotency store is unavailable, so the request cannot be protected; \
             nothing was executed",
        )
        .with_retry_after(UNAVAILABLE_RETRY_AFTER)
    }

    pub(crate) fn handler_failed() -> Self {
        Self::new(
            ProblemKind::HandlerFailed,
            StatusCode::INTERNAL_SERVER_ERROR,
            "the request handler failed; the idempotency key was released and a retry will \
             execute again",
        )
    }

    pub(crate) fn outcome_unknown() -> Self {
        Self::new(
            ProblemKind::OutcomeUnknown,
            StatusCode::CONFLICT,
            "an earlier request with this idempotency key stopped before it completed, and \
             whether it took effect is unknown; it will not be executed again until the \
             operator resolves it",
        )
    }

    /// Which rule was broken.
    pub fn kind(&self) -> ProblemKind {
        self.kind
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The problem `type` URI.
    pub fn type_uri(&self) -> &'static str {
        self.kind.type_uri()
    }

    /// The short summary.
    pub fn title(&self) -> &'static str {
        self.kind.title()
    }

    /// What happened to this request, for humans.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// When the client may retry (sent as `Retry-After`), for transient problems.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The RFC 9457 JSON body.
    ///
    /// ```
    /// # use tower_idempotency::{Problem, ProblemKind};
    /// # fn show(problem: &Problem) {
    /// let json: serde_json::Value = serde_json::from_str(&problem.to_json()).unwrap();
    /// assert_eq!(json["status"], problem.status().as_u16());
    /// # }
    /// ```
    pub fn to_json(&self) -> String {
        let detail = serde_json::Value::from(self.detail.as_ref()).to_string();
        format!(
            r#"{{"type":"{}","title":"{}","status":{},"detail":{}}}"#,
            self.kind.type_uri(),
            self.kind.title(),
            self.status.as_u16(),
            detail,
        )
    }

    /// The default rendering: `application/problem+json`, `Cache-Control: no-store`, and
    /// `Retry-After` when set.
    pub fn to_response(&self) -> Response<Bytes> {
        let mut response = Response::new(Bytes::from(self.to_json()));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(after) = self.retry_after {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs(after)),
            );
        }
        response
    }
}

/// Whole seconds, rounded up: `Retry-After: 0` would invite a tight loop.
pub(super) fn retry_after_secs(after: Duration) -> u64 {
    after.as_secs() + u64::from(after.subsec_nanos() > 0)
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.kind.title(),
            self.status,
            self.detail
        )
    }
}

/// Renders the problem responses the layer produces itself: the strategy given to
/// [`IdempotencyLayer::with_problem_response`](crate::IdempotencyLayer::with_problem_response).
///
/// Closures `Fn(&Problem) -> Response<Bytes>` implement it; a type of your own does too, when
/// the rendering carries settings or is shared by several layers. The default writes
/// [`Problem::to_response`]: `application/problem+json`, `Cache-Control: no-store` and
/// `Retry-After` when the problem has one.
///
/// Whatever it returns, the layer then puts the [`Problem`] and its [`ProblemKind`] into the
/// response's extensions (replacing any it holds), so they are there for outer layers
/// whichever rendering ran.
///
/// ```
/// use bytes::Bytes;
/// use http::{HeaderValue, Response, header};
/// use tower_idempotency::{IdempotencyLayer, MemoryStore, Problem, ProblemResponse};
///
/// /// The application's own error envelope, with a link to its documentation.
/// struct ApiError {
///     docs: &'static str,
/// }
///
/// impl ProblemResponse for ApiError {
///     fn problem_response(&self, problem: &Problem) -> Response<Bytes> {
///         let body = serde_json::json!({
///             "error": { "message": problem.detail(), "docs": self.docs },
///         });
///         let mut response = Response::new(Bytes::from(body.to_string()));
///         *response.status_mut() = problem.status();
///         response
///             .headers_mut()
///             .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
///         if let Some(after) = problem.retry_after() {
///             response.headers_mut().insert(header::RETRY_AFTER, after.as_secs().max(1).into());
///         }
///         response
///     }
/// }
///
/// let layer = IdempotencyLayer::new(MemoryStore::default())
///     .with_problem_response(ApiError { docs: "https://example.com/docs/idempotency" });
/// ```
pub trait ProblemResponse {
    /// The response for `problem`. Its status should be [`Problem::status`]: clients and
    /// outer layers tell the problems apart by it.
    fn problem_response(&self, problem: &Problem) -> Response<Bytes>;
}

impl<F> ProblemResponse for F
where
    F: Fn(&Problem) -> Response<Bytes>,
{
    fn problem_response(&self, problem: &Problem) -> Response<Bytes> {
        self(problem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_is_an_rfc_9457_problem() {
        let problem = Problem::new(
            ProblemKind::KeyReused,
            StatusCode::UNPROCESSABLE_ENTITY,
            "quotes \" and\nnewlines are escaped",
        );
        let json: serde_json::Value = serde_json::from_str(&problem.to_json()).unwrap();
        assert_eq!(json["type"], ProblemKind::KeyReused.type_uri());
        assert_eq!(json["title"], ProblemKind::KeyReused.title());
        assert_eq!(json["status"], 422);
        assert_eq!(json["detail"], "quotes \" and\nnewlines are escaped");
        assert_eq!(json.as_object().unwrap().len(), 4);
    }

    #[test]
    fn responses_carry_content_type_no_store_and_retry_after() {
        let problem = Problem::new(ProblemKind::InFlight, StatusCode::CONFLICT, "busy")
            .with_retry_after(Duration::from_millis(1500));
        let response = problem.to_response();
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        assert_eq!(response.headers()["cache-control"], "no-store");
        assert_eq!(response.headers()["retry-after"], "2");
        let plain =
            Problem::new(ProblemKind::MissingKey, StatusCode::BAD_REQUEST, "x").to_response();
        assert!(plain.headers().get("retry-after").is_none());
    }

    #[test]
    fn every_kind_has_its_own_type_and_title() {
        let kinds = [
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
        ];
        let types: std::collections::HashSet<_> = kinds.iter().map(|k| k.type_uri()).collect();
        let titles: std::collections::HashSet<_> = kinds.iter().map(|k| k.title()).collect();
        assert_eq!(types.len(), kinds.len());
        assert_eq!(titles.len(), kinds.len());
    }
}
