//! gRPC over HTTP/2: which requests are gRPC calls, which calls pass through, which answers
//! are kept (by `grpc-status`), the length-prefixed message of a unary call, and
//! `grpc-message`'s percent-encoding. (The layer's own rejections as Trailers-Only responses
//! are [`problem::grpc`](crate::problem).)
//!
//! A gRPC call is a `POST` whose `content-type` is `application/grpc` (or
//! `application/grpc+proto`, `application/grpc;…`). gRPC-Web (`application/grpc-web…`)
//! frames its status into the body and its clients read neither a problem nor a
//! Trailers-Only head: it passes through untouched (the layer belongs inside tonic-web's
//! `GrpcWebLayer`, which turns such calls into gRPC ones). The layer cannot see the
//! service's proto, so it cannot tell a unary method from a streaming one: every call is
//! taken as unary unless its path is one of the streaming methods the application names
//! ([`with_grpc_streaming_methods`](crate::IdempotencyLayer::with_grpc_streaming_methods)),
//! which pass through untouched.
//!
//! Pure logic: no tower or tokio in here.

use std::{fmt, sync::Arc};

use http::{HeaderMap, HeaderName, Method, header};

/// `grpc-status`: the call's status code, in the trailers (or in the headers of a
/// Trailers-Only response).
pub(crate) const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// `grpc-message`: the status message, percent-encoded.
pub(crate) const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// `grpc-retry-pushback-ms`: how long a client's retry policy waits before its next attempt
/// (gRFC A6).
pub(crate) const GRPC_RETRY_PUSHBACK_MS: HeaderName =
    HeaderName::from_static("grpc-retry-pushback-ms");

/// A gRPC status code, as `grpc-status` carries it (the codes of the gRPC core
/// `StatusCode` list, without depending on a gRPC library).
///
/// ```
/// use tower_idempotency::GrpcCode;
///
/// assert_eq!(GrpcCode::AlreadyExists.as_u8(), 6);
/// assert_eq!(GrpcCode::from_u8(14), Some(GrpcCode::Unavailable));
/// assert_eq!(GrpcCode::from_u8(17), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GrpcCode {
    /// `OK` (0): success.
    Ok,
    /// `CANCELLED` (1).
    Cancelled,
    /// `UNKNOWN` (2).
    Unknown,
    /// `INVALID_ARGUMENT` (3).
    InvalidArgument,
    /// `DEADLINE_EXCEEDED` (4).
    DeadlineExceeded,
    /// `NOT_FOUND` (5).
    NotFound,
    /// `ALREADY_EXISTS` (6).
    AlreadyExists,
    /// `PERMISSION_DENIED` (7).
    PermissionDenied,
    /// `RESOURCE_EXHAUSTED` (8).
    ResourceExhausted,
    /// `FAILED_PRECONDITION` (9).
    FailedPrecondition,
    /// `ABORTED` (10).
    Aborted,
    /// `OUT_OF_RANGE` (11).
    OutOfRange,
    /// `UNIMPLEMENTED` (12).
    Unimplemented,
    /// `INTERNAL` (13).
    Internal,
    /// `UNAVAILABLE` (14).
    Unavailable,
    /// `DATA_LOSS` (15).
    DataLoss,
    /// `UNAUTHENTICATED` (16).
    Unauthenticated,
}

const CODES: [GrpcCode; 17] = [
    GrpcCode::Ok,
    GrpcCode::Cancelled,
    GrpcCode::Unknown,
    GrpcCode::InvalidArgument,
    GrpcCode::DeadlineExceeded,
    GrpcCode::NotFound,
    GrpcCode::AlreadyExists,
    GrpcCode::PermissionDenied,
    GrpcCode::ResourceExhausted,
    GrpcCode::FailedPrecondition,
    GrpcCode::Aborted,
    GrpcCode::OutOfRange,
    GrpcCode::Unimplemented,
    GrpcCode::Internal,
    GrpcCode::Unavailable,
    GrpcCode::DataLoss,
    GrpcCode::Unauthenticated,
];

impl GrpcCode {
    /// The number `grpc-status` carries.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// The code numbered `code`, if gRPC defines one.
    pub fn from_u8(code: u8) -> Option<Self> {
        CODES.get(usize::from(code)).copied()
    }

    /// The code a `grpc-status` value spells: ASCII digits, no sign, no padding.
    pub(crate) fn parse(value: &[u8]) -> Option<Self> {
        match value {
            [digit] if digit.is_ascii_digit() => Self::from_u8(digit - b'0'),
            [b'1', digit] if digit.is_ascii_digit() => Self::from_u8(10 + (digit - b'0')),
            _ => None,
        }
    }
}

/// The gRPC settings of a layer.
#[derive(Clone)]
pub(crate) struct Settings {
    /// The paths (`/package.Service/Method`) of streaming methods: they pass through.
    pub(crate) streaming: Arc<[Box<str>]>,
    /// When set, the only methods protected: every other call passes through.
    pub(crate) protected: Option<Arc<[Box<str>]>>,
    /// The codes whose answers are kept for replay.
    pub(crate) stored: Arc<[GrpcCode]>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            streaming: Arc::new([]),
            protected: None,
            stored: Arc::new([GrpcCode::Ok]),
        }
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grpc")
            .field("streaming", &self.streaming)
            .field("protected", &self.protected)
            .field("stored", &self.stored)
            .finish()
    }
}

/// What a request is to gRPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Call {
    /// A call the layer takes as unary: protected, answered in gRPC.
    Unary,
    /// A call of a streaming method the application named, or of a method left out of the
    /// protected ones it named: it passes through untouched.
    Streaming,
    /// A gRPC-Web call: it passes through untouched.
    Web,
}

/// Whether a `content-type` of `value` is gRPC-Web: `application/grpc-web` or
/// `application/grpc-web-text`, alone or with a `+format` or parameters.
fn is_grpc_web(value: &[u8]) -> bool {
    essence_is(value, b"application/grpc-web") || essence_is(value, b"application/grpc-web-text")
}

/// Whether a `content-type` of `value` is `essence`, alone or followed by a `+format` or
/// parameters (ASCII case ignored).
fn essence_is(value: &[u8], essence: &[u8]) -> bool {
    value.len() >= essence.len()
        && value[..essence.len()].eq_ignore_ascii_case(essence)
        && matches!(value.get(essence.len()), None | Some(b'+' | b';'))
}

/// What a request with `method`, `paths` and `headers` is to gRPC; `None` when it is not a
/// gRPC call. `paths` are the path the client sent and the one the layer sees (a router's
/// `nest` strips a prefix from it): a streaming method is named by either.
pub(crate) fn classify(
    method: &Method,
    paths: [&str; 2],
    headers: &HeaderMap,
    settings: &Settings,
) -> Option<Call> {
    if method != Method::POST {
        return None;
    }
    // gRPC: `content-type: application/grpc`, alone or with a `+format` or parameters. Looked
    // up once: every protected request comes this way.
    let content_type = headers.get(header::CONTENT_TYPE)?.as_bytes();
    if is_grpc_web(content_type) {
        return Some(Call::Web);
    }
    if !essence_is(content_type, b"application/grpc") {
        return None;
    }
    let named = |methods: &[Box<str>]| methods.iter().any(|m| paths.contains(&&**m));
    let unlisted = settings
        .protected
        .as_ref()
        .is_some_and(|protected| !named(protected));
    if unlisted || named(&settings.streaming) {
        Some(Call::Streaming)
    } else {
        Some(Call::Unary)
    }
}

/// The status of a gRPC response with `headers`, a body of `body_len` bytes and `trailers`:
/// `grpc-status` in its headers only for a Trailers-Only response (no data, no trailers),
/// else in its trailers alone. `None` when the place the protocol puts it holds none, or a
/// value that is not a code, or when the headers hold one beside data or trailers (a
/// malformed answer that clients read differently: tonic acts on the head's status): an
/// answer cut short or malformed, never kept.
pub(crate) fn status(
    headers: &HeaderMap,
    body_len: usize,
    trailers: Option<&HeaderMap>,
) -> Option<GrpcCode> {
    let value = match trailers {
        None if body_len == 0 => headers.get(GRPC_STATUS)?,
        _ if headers.contains_key(GRPC_STATUS) => return None,
        None => return None,
        Some(trailers) => trailers.get(GRPC_STATUS)?,
    };
    GrpcCode::parse(value.as_bytes())
}

/// Whether a gRPC response with `headers`, a body of `body_len` bytes and `trailers` is kept
/// for replay: its [`status`] is one of the stored codes.
pub(crate) fn kept(
    headers: &HeaderMap,
    body_len: usize,
    trailers: Option<&HeaderMap>,
    settings: &Settings,
) -> bool {
    status(headers, body_len, trailers).is_some_and(|code| settings.stored.contains(&code))
}

/// The message of a unary call's body: one length-prefixed message (a compressed flag of 0,
/// a 4-byte big-endian length, that many bytes) and nothing after it. `None` for anything
/// else: a compressed message, a stream of several, or a frame cut short.
pub(crate) fn grpc_message(body: &[u8]) -> Option<&[u8]> {
    let (&[flag, a, b, c, d], message) = body.split_first_chunk::<5>()?;
    let len = usize::try_from(u32::from_be_bytes([a, b, c, d])).ok()?;
    (flag == 0 && message.len() == len).then_some(message)
}

/// `grpc-message`'s encoding: bytes outside printable ASCII (0x20–0x7E) and `%` are written
/// `%XX`; UTF-8 text goes byte by byte.
pub(crate) fn percent_encode(message: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(message.len());
    for &byte in message.as_bytes() {
        if (0x20..=0x7E).contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xF)]));
        }
    }
    out
}

/// The text a `grpc-message` value encodes (what a client does; the tests' check of
/// [`percent_encode`]). As the gRPC spec asks of a receiver, a `%` not
/// followed by two hex digits is taken as it is, and bytes that are not UTF-8 are replaced.
#[cfg(test)]
pub(crate) fn percent_decode(value: &[u8]) -> String {
    let hex = |byte: u8| char::from(byte).to_digit(16);
    let mut out = Vec::with_capacity(value.len());
    let mut rest = value;
    while let Some((&byte, tail)) = rest.split_first() {
        if let (b'%', [high, low, after @ ..]) = (byte, tail)
            && let (Some(high), Some(low)) = (hex(*high), hex(*low))
        {
            // Two hex digits make at most 0xFF.
            out.push(u8::try_from(high * 16 + low).unwrap_or(u8::MAX));
            rest = after;
            continue;
        }
        out.push(byte);
        rest = tail;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn content_type(value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
        headers
    }

    /// Whether a `POST` with `headers` is a (unary) gRPC call.
    fn is_grpc(headers: &HeaderMap) -> bool {
        let path = "/pay.Payments/Charge";
        classify(&Method::POST, [path, path], headers, &Settings::default()) == Some(Call::Unary)
    }

    #[test]
    fn only_grpc_content_types_are_grpc_calls() {
        for (value, grpc) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("application/grpc+json", true),
            ("application/grpc;charset=utf-8", true),
            ("Application/GRPC", true),
            ("application/grpc-web", false),
            ("application/grpc-web+proto", false),
            ("application/grpcx", false),
            ("application/json", false),
            ("application/gr", false),
            ("", false),
        ] {
            assert_eq!(is_grpc(&content_type(value)), grpc, "{value:?}");
        }
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn calls_are_unary_unless_named_streaming_and_only_posts_are_calls() {
        let settings = Settings {
            streaming: Arc::from([Box::from("/pay.Payments/Watch")]),
            ..Settings::default()
        };
        let grpc = content_type("application/grpc");
        let json = content_type("application/json");
        let web = content_type("application/grpc-web+proto");
        let web_text = content_type("application/grpc-web-text");
        let shouted = content_type("Application/GRPC+proto");
        let untyped = HeaderMap::new();
        for (method, path, headers, call) in [
            (
                Method::POST,
                "/pay.Payments/Charge",
                &grpc,
                Some(Call::Unary),
            ),
            (
                Method::POST,
                "/pay.Payments/Watch",
                &grpc,
                Some(Call::Streaming),
            ),
            (
                Method::POST,
                "/pay.Payments/Watch/",
                &grpc,
                Some(Call::Unary),
            ),
            (Method::GET, "/pay.Payments/Charge", &grpc, None),
            (Method::POST, "/pay.Payments/Charge", &json, None),
            (Method::POST, "/pay.Payments/Charge", &web, Some(Call::Web)),
            (
                Method::POST,
                "/pay.Payments/Charge",
                &web_text,
                Some(Call::Web),
            ),
            (Method::GET, "/pay.Payments/Charge", &web, None),
            (
                Method::POST,
                "/pay.Payments/Charge",
                &shouted,
                Some(Call::Unary),
            ),
            (Method::POST, "/pay.Payments/Charge", &untyped, None),
        ] {
            assert_eq!(
                classify(&method, [path, path], headers, &settings),
                call,
                "{method} {path}"
            );
        }
        // With the protected methods named, every other call passes through; a streaming
        // method named stays streaming.
        let allowlist = Settings {
            protected: Some(Arc::from([
                Box::from("/pay.Payments/Charge"),
                Box::from("/pay.Payments/Watch"),
            ])),
            ..settings.clone()
        };
        for (path, call) in [
            ("/pay.Payments/Charge", Call::Unary),
            ("/pay.Payments/Refund", Call::Streaming),
            ("/pay.Payments/Watch", Call::Streaming),
        ] {
            assert_eq!(
                classify(&Method::POST, [path, path], &grpc, &allowlist),
                Some(call),
                "{path}"
            );
        }
        // Behind a router that strips a prefix, the method is named by the path the client
        // sent, or by the one the layer sees.
        for paths in [
            ["/pay.Payments/Watch", "/Watch"],
            ["/grpc/pay.Payments/Watch", "/pay.Payments/Watch"],
        ] {
            assert_eq!(
                classify(&Method::POST, paths, &grpc, &settings),
                Some(Call::Streaming),
                "{paths:?}"
            );
        }
    }

    #[test]
    fn codes_round_trip_and_status_values_parse_strictly() {
        for (number, code) in CODES.iter().enumerate() {
            let number = u8::try_from(number).unwrap();
            assert_eq!(code.as_u8(), number);
            assert_eq!(GrpcCode::from_u8(number), Some(*code));
            assert_eq!(GrpcCode::parse(number.to_string().as_bytes()), Some(*code));
        }
        for bad in [
            &b""[..],
            b"17",
            b"20",
            b"-1",
            b"+1",
            b"00",
            b"01",
            b" 0",
            b"0 ",
            b"x",
            b"100",
        ] {
            assert_eq!(GrpcCode::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_status_is_read_from_trailers_else_from_a_trailers_only_head() {
        let with = |code: &'static str| {
            let mut map = HeaderMap::new();
            map.insert(GRPC_STATUS, HeaderValue::from_static(code));
            map
        };
        let none = HeaderMap::new();
        for (headers, body_len, trailers, status) in [
            (&none, 7, Some(with("0")), Some(GrpcCode::Ok)),
            (&none, 0, Some(with("6")), Some(GrpcCode::AlreadyExists)),
            // Trailers-Only: the status is in the head, there is no data and no trailers.
            (&with("3"), 0, None, Some(GrpcCode::InvalidArgument)),
            (&with("0"), 0, None, Some(GrpcCode::Ok)),
            // A status in the head beside data or trailers is malformed: a client may act on
            // either, so the answer is never kept.
            (&with("0"), 0, Some(with("13")), None),
            (&with("13"), 7, Some(with("0")), None),
            (&with("0"), 0, Some(HeaderMap::new()), None),
            (&with("0"), 7, None, None),
            // Data and no trailers: the call was cut short.
            (&none, 7, None, None),
            (&none, 0, None, None),
            (&none, 7, Some(HeaderMap::new()), None),
            (&none, 7, Some(with("ok")), None),
        ] {
            assert_eq!(
                super::status(headers, body_len, trailers.as_ref()),
                status,
                "{headers:?} {body_len} {trailers:?}"
            );
        }
    }

    #[test]
    fn only_the_stored_codes_are_kept() {
        let trailers = |code: &'static str| {
            let mut map = HeaderMap::new();
            map.insert(GRPC_STATUS, HeaderValue::from_static(code));
            map
        };
        let head = HeaderMap::new();
        let default = Settings::default();
        let also_exists = Settings {
            stored: Arc::from([GrpcCode::Ok, GrpcCode::AlreadyExists]),
            ..Settings::default()
        };
        for (code, by_default, with_exists) in [
            ("0", true, true),
            ("6", false, true),
            ("3", false, false),
            ("14", false, false),
            ("13", false, false),
        ] {
            let trailers = trailers(code);
            assert_eq!(
                kept(&head, 5, Some(&trailers), &default),
                by_default,
                "{code}"
            );
            assert_eq!(
                kept(&head, 5, Some(&trailers), &also_exists),
                with_exists,
                "{code}"
            );
        }
        assert!(
            !kept(&head, 5, None, &default),
            "no status: an answer cut short"
        );
    }

    #[test]
    fn a_unary_body_is_exactly_one_uncompressed_message() {
        let framed = |flag: u8, len: u32, payload: &[u8]| {
            let mut body = vec![flag];
            body.extend_from_slice(&len.to_be_bytes());
            body.extend_from_slice(payload);
            body
        };
        let two = [framed(0, 1, b"a"), framed(0, 1, b"b")].concat();
        for (body, message) in [
            (framed(0, 3, b"abc"), Some(&b"abc"[..])),
            (framed(0, 0, b""), Some(&b""[..])),
            (framed(1, 3, b"abc"), None),
            (framed(0, 4, b"abc"), None),
            (framed(0, 2, b"abc"), None),
            (framed(0, u32::MAX, b"abc"), None),
            (two, None),
            (vec![0, 0, 0, 0], None),
            (Vec::new(), None),
        ] {
            assert_eq!(grpc_message(&body), message, "{body:?}");
        }
    }

    #[test]
    fn messages_are_percent_encoded_and_decoded_as_the_spec_says() {
        for (text, encoded) in [
            (
                "plain text, with: punctuation!",
                "plain text, with: punctuation!",
            ),
            ("100% sure", "100%25 sure"),
            ("line\nbreak\ttab", "line%0Abreak%09tab"),
            ("déjà vu", "d%C3%A9j%C3%A0 vu"),
            ("~ and \u{7f}", "~ and %7F"),
            ("", ""),
        ] {
            assert_eq!(percent_encode(text), encoded);
            assert_eq!(percent_decode(encoded.as_bytes()), text);
            assert!(HeaderValue::from_str(&percent_encode(text)).is_ok());
        }
        // A receiver takes a malformed escape as it is.
        assert_eq!(percent_decode(b"50%"), "50%");
        assert_eq!(percent_decode(b"%zz%4"), "%zz%4");
        assert_eq!(percent_decode(b"%e9"), "\u{fffd}");
    }

    proptest::proptest! {
        #[test]
        fn any_text_survives_percent_encoding_as_a_header_value(text in ".*") {
            let encoded = percent_encode(&text);
            proptest::prop_assert!(HeaderValue::from_str(&encoded).is_ok());
            proptest::prop_assert_eq!(percent_decode(encoded.as_bytes()), text);
        }
    }
}
