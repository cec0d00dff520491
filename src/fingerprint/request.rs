//! [`Fingerprint`], the modes that choose which parts of a request count ([`BodyFingerprint`],
//! [`FingerprintHeaders`]), and the rule that computes it from the layer's settings.

use std::{fmt, sync::Arc};

use http::{HeaderMap, HeaderName, Method, Uri, header};

use super::canonical;
use super::digest::{FieldHasher, Secret};
use crate::protocol::jsonrpc::{self, Rpc};

/// A SHA-256 digest of a request's method, path, query and body.
///
/// A record remembers the fingerprint of the request that created it; a retry whose
/// fingerprint differs reuses the key for another payload and is refused (SPEC §4). By
/// default the body counts byte for byte and headers not at all (clients legitimately change
/// `Date`, tracing and auth headers on retry); [`BodyFingerprint`] and [`FingerprintHeaders`]
/// change that, and a server secret makes it an HMAC.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Computes the fingerprint of a request.
    ///
    /// ```
    /// use http::{Method, Uri};
    /// use tower_idempotency::Fingerprint;
    ///
    /// let uri = Uri::from_static("/charges?currency=eur");
    /// let a = Fingerprint::of(&Method::POST, &uri, br#"{"amount":100}"#);
    /// let b = Fingerprint::of(&Method::POST, &uri, br#"{"amount":200}"#);
    /// assert_ne!(a, b);
    /// ```
    pub fn of(method: &Method, uri: &Uri, body: &[u8]) -> Self {
        Self::compute(
            &FingerprintRule::default(),
            method,
            uri,
            &HeaderMap::new(),
            body,
            &Rpc::Plain,
        )
    }

    /// Computes the fingerprint of a request under `rule`, its body read as `rpc` says. The
    /// default rule (raw body, no headers, no secret) hashes exactly what [`of`](Self::of)
    /// always has: records stored by earlier versions still match.
    pub(crate) fn compute(
        rule: &FingerprintRule,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
        rpc: &Rpc,
    ) -> Self {
        Self::compute_keyed(rule, rule.secret.as_ref(), method, uri, headers, body, rpc)
    }

    /// As [`compute`](Self::compute), keyed by `secret` in place of the rule's own (a
    /// previous secret, to find a record stored before the secret was changed).
    pub(crate) fn compute_keyed(
        rule: &FingerprintRule,
        secret: Option<&Secret>,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
        rpc: &Rpc,
    ) -> Self {
        let mut hasher = FieldHasher::for_secret(secret);
        hasher.field(b'm', method.as_str().as_bytes());
        hasher.field(b'p', uri.path().as_bytes());
        hasher.field(b'q', uri.query().map_or(&b""[..], str::as_bytes));
        match rule.canonical_digest(body, rpc) {
            Some(canonical) => hasher.field(b'j', &canonical),
            None => hasher.field(b'b', body),
        }
        // The query's presence is a field of its own: `/a?` and `/a` are different URIs.
        hasher.put(&[u8::from(uri.query().is_some())]);
        rule.headers.hash(headers, &mut hasher);
        Self(hasher.finish())
    }

    /// Wraps a digest read back from a store.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// How a request body counts in its fingerprint.
///
/// ```
/// use tower_idempotency::BodyFingerprint;
///
/// // A Stripe event re-delivered with its members in another order, and a new count of
/// // pending deliveries, is the same event.
/// let body = BodyFingerprint::canonical_json_excluding(["/pending_webhooks"]);
/// ```
#[derive(Clone, Default)]
pub struct BodyFingerprint(BodyRepr);

#[derive(Clone, Default)]
enum BodyRepr {
    #[default]
    Raw,
    CanonicalJson {
        excluded: Arc<[Box<str>]>,
    },
}

impl BodyFingerprint {
    /// Byte for byte: any difference is another payload. The default, and the fastest (the
    /// body is hashed as it is, never parsed).
    pub fn raw() -> Self {
        Self(BodyRepr::Raw)
    }

    /// The JSON value, not its spelling: member order, insignificant whitespace, string
    /// escapes and the way a number is written (`1`, `1.0`, `1e0`) do not count. The text
    /// hashed is RFC 8785's canonical form, except that integers are compared exactly (RFC
    /// 8785 rounds them to doubles past 2^53).
    ///
    /// A body that is not JSON (or nests deeper than 128 levels, or repeats a member name in
    /// one object) is fingerprinted byte for byte. Parsing costs time and memory in
    /// proportion to the body, which the request body limit bounds. A non-integer written
    /// with more than 15 significant digits may read one unit in the last place off (the JSON
    /// parser's fast path), so a retry that spells it differently is a mismatch (409).
    pub fn canonical_json() -> Self {
        Self::canonical_json_excluding(std::iter::empty::<&str>())
    }

    /// Like [`canonical_json`](Self::canonical_json), with the members or array elements
    /// these RFC 6901 JSON Pointers name left out: values a sender changes on every delivery,
    /// such as a delivery attempt counter (`/attempt`) or a Stripe event's
    /// `/pending_webhooks`. A retry that differs only there is the same payload.
    ///
    /// # Panics
    ///
    /// If a pointer does not start with `/`: the empty pointer would leave the whole body
    /// out, and anything else names nothing.
    pub fn canonical_json_excluding<I, P>(pointers: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<String>,
    {
        let excluded: Vec<Box<str>> = pointers
            .into_iter()
            .map(|pointer| {
                let pointer = pointer.into();
                assert!(
                    pointer.starts_with('/'),
                    "a JSON Pointer to exclude must start with '/', got {pointer:?}"
                );
                pointer.into_boxed_str()
            })
            .collect();
        Self(BodyRepr::CanonicalJson {
            excluded: excluded.into(),
        })
    }
}

impl fmt::Debug for BodyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            BodyRepr::Raw => f.write_str("Raw"),
            BodyRepr::CanonicalJson { excluded } => f
                .debug_struct("CanonicalJson")
                .field("excluded", excluded)
                .finish(),
        }
    }
}

/// Which request headers count in its fingerprint.
///
/// ```
/// use http::HeaderName;
/// use tower_idempotency::FingerprintHeaders;
///
/// let tenant = FingerprintHeaders::only([HeaderName::from_static("x-tenant")]);
/// let all_but_signature = FingerprintHeaders::all_except([
///     HeaderName::from_static("stripe-signature"),
///     http::header::USER_AGENT,
/// ]);
/// ```
#[derive(Clone, Default)]
pub struct FingerprintHeaders(HeadersRepr);

#[derive(Clone, Default)]
enum HeadersRepr {
    #[default]
    None,
    Only(Arc<[HeaderName]>),
    AllExcept(Arc<[HeaderName]>),
}

/// Headers that describe one transfer of the request, never its content.
const TRANSFER_HEADERS: [HeaderName; 7] = [
    header::CONNECTION,
    header::CONTENT_LENGTH,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
];

impl FingerprintHeaders {
    /// No header counts: the default. Clients legitimately change `Date`, tracing and
    /// authorization headers between retries, and webhook senders sign each delivery anew.
    pub fn none() -> Self {
        Self(HeadersRepr::None)
    }

    /// These headers count (their values in order, and whether they are there at all): a
    /// retry that changes one is another payload.
    pub fn only(names: impl IntoIterator<Item = HeaderName>) -> Self {
        Self(HeadersRepr::Only(sorted(names)))
    }

    /// Every header counts except these and those that describe one transfer
    /// (`Content-Length`, `Transfer-Encoding`, `Connection`, `Keep-Alive`, `TE`, `Trailer`,
    /// `Upgrade`).
    ///
    /// # Warning
    ///
    /// Every header a retry changes makes it a mismatch (409): list the signature, timestamp
    /// and delivery-attempt headers your sender sets anew, and tracing or proxy headers your
    /// infrastructure adds.
    pub fn all_except(names: impl IntoIterator<Item = HeaderName>) -> Self {
        let mut names: Vec<HeaderName> = names.into_iter().collect();
        names.extend(TRANSFER_HEADERS);
        Self(HeadersRepr::AllExcept(sorted(names)))
    }

    fn hash(&self, headers: &HeaderMap, hasher: &mut FieldHasher) {
        match &self.0 {
            HeadersRepr::None => {}
            HeadersRepr::Only(names) => {
                for name in names.iter() {
                    hash_header(headers, name, hasher);
                }
            }
            HeadersRepr::AllExcept(excluded) => {
                let mut names: Vec<&HeaderName> = headers
                    .keys()
                    .filter(|name| {
                        excluded
                            .binary_search_by(|e| e.as_str().cmp(name.as_str()))
                            .is_err()
                    })
                    .collect();
                names.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
                for name in names {
                    hash_header(headers, name, hasher);
                }
            }
        }
    }
}

fn sorted(names: impl IntoIterator<Item = HeaderName>) -> Arc<[HeaderName]> {
    let mut names: Vec<HeaderName> = names.into_iter().collect();
    names.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    names.into()
}

fn hash_header(headers: &HeaderMap, name: &HeaderName, hasher: &mut FieldHasher) {
    hasher.field(b'h', name.as_str().as_bytes());
    for value in headers.get_all(name) {
        hasher.field(b'v', value.as_bytes());
    }
}

impl fmt::Debug for FingerprintHeaders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            HeadersRepr::None => f.write_str("None"),
            HeadersRepr::Only(names) => f.debug_tuple("Only").field(names).finish(),
            HeadersRepr::AllExcept(names) => f.debug_tuple("AllExcept").field(names).finish(),
        }
    }
}

/// Everything that decides a request's fingerprint besides the request: the layer's settings.
#[derive(Clone, Debug, Default)]
pub(crate) struct FingerprintRule {
    pub(crate) body: BodyFingerprint,
    pub(crate) headers: FingerprintHeaders,
    pub(crate) secret: Option<Secret>,
    /// Secrets used before `secret`, newest first: records stored under them are still found.
    pub(crate) previous_secrets: Vec<Secret>,
}

impl FingerprintRule {
    /// The digest of the body's canonical JSON, when the rule asks for one (or the body is a
    /// JSON-RPC request) and the body is JSON; `None` means the body counts byte for byte.
    fn canonical_digest(&self, body: &[u8], rpc: &Rpc) -> Option<[u8; 32]> {
        let excluded: &[Box<str>] = match &self.body.0 {
            BodyRepr::Raw if !rpc.is_json_rpc() => return None,
            BodyRepr::Raw => &[],
            BodyRepr::CanonicalJson { excluded } => excluded,
        };
        let mut value = canonical::parse(body)?;
        jsonrpc::prepare(&mut value, rpc);
        for pointer in excluded {
            canonical::exclude(&mut value, pointer);
        }
        Some(canonical::digest(&value))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Fingerprint({}…)",
            &crate::fingerprint::digest::hex(&self.0)[..12]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(method: Method, uri: &str, body: &[u8]) -> Fingerprint {
        Fingerprint::of(&method, &uri.parse().unwrap(), body)
    }

    #[test]
    fn each_part_of_the_request_changes_the_fingerprint() {
        let base = fp(Method::POST, "/charges?a=1", b"{}");
        let cases = [
            (
                "same request",
                fp(Method::POST, "/charges?a=1", b"{}"),
                true,
            ),
            ("method", fp(Method::PATCH, "/charges?a=1", b"{}"), false),
            ("path", fp(Method::POST, "/refunds?a=1", b"{}"), false),
            ("query", fp(Method::POST, "/charges?a=2", b"{}"), false),
            ("no query", fp(Method::POST, "/charges", b"{}"), false),
            ("body", fp(Method::POST, "/charges?a=1", b"{ }"), false),
            ("empty body", fp(Method::POST, "/charges?a=1", b""), false),
            (
                "authority is ignored",
                fp(Method::POST, "http://h/charges?a=1", b"{}"),
                true,
            ),
        ];
        for (what, other, equal) in cases {
            assert_eq!(base == other, equal, "{what}");
        }
    }

    #[test]
    fn field_boundaries_are_unambiguous() {
        assert_ne!(
            fp(Method::POST, "/a?b", b"c"),
            fp(Method::POST, "/a?bc", b"")
        );
        assert_ne!(fp(Method::POST, "/a?", b""), fp(Method::POST, "/a", b""));
        assert_ne!(fp(Method::POST, "/ab", b""), fp(Method::POST, "/a", b"b"));
    }

    #[test]
    fn fingerprints_are_stable_across_versions() {
        // Stored records carry fingerprints: a change to how they are computed would turn
        // every retry after an upgrade into a 409.
        let fp = Fingerprint::of(&Method::POST, &"/charges?a=1".parse().unwrap(), b"{}");
        assert_eq!(
            crate::fingerprint::digest::hex(fp.as_bytes()),
            "2007476a50d446cc42cc5d0b124506f84ff0d05b4c1c1ed040bb4d1402c3035c"
        );
    }

    #[test]
    fn the_digest_round_trips_through_bytes() {
        let a = fp(Method::POST, "/", b"x");
        assert_eq!(Fingerprint::from_bytes(*a.as_bytes()), a);
    }

    #[test]
    fn debug_forms_name_the_mode_and_abbreviate_the_digest() {
        let fingerprint = Fingerprint::from_bytes([0xab; 32]);
        assert_eq!(format!("{fingerprint:?}"), "Fingerprint(abababababab…)");
        let cases = [
            (format!("{:?}", BodyFingerprint::raw()), "Raw"),
            (
                format!(
                    "{:?}",
                    BodyFingerprint::canonical_json_excluding(["/attempt"])
                ),
                r#"CanonicalJson { excluded: ["/attempt"] }"#,
            ),
            (format!("{:?}", FingerprintHeaders::none()), "None"),
            (
                format!(
                    "{:?}",
                    FingerprintHeaders::only([
                        HeaderName::from_static("x-tenant"),
                        HeaderName::from_static("x-region"),
                    ])
                ),
                r#"Only(["x-region", "x-tenant"])"#,
            ),
            (
                format!("{:?}", FingerprintHeaders::all_except([header::USER_AGENT])),
                r#"AllExcept(["connection", "content-length", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "user-agent"])"#,
            ),
        ];
        for (debug, expected) in cases {
            assert_eq!(debug, expected);
        }
    }

    /// A rule, and whether the layer is in JSON-RPC mode.
    #[derive(Debug, Default)]
    struct Mode {
        rule: FingerprintRule,
        json_rpc: bool,
    }

    fn rule(body: BodyFingerprint, headers: FingerprintHeaders, json_rpc: bool) -> Mode {
        let rule = FingerprintRule {
            body,
            headers,
            secret: None,
            previous_secrets: Vec::new(),
        };
        Mode { rule, json_rpc }
    }

    fn under(mode: &Mode, headers: &[(&str, &str)], body: &str) -> Fingerprint {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        let uri = "/hooks?v=1".parse().unwrap();
        let body = bytes::Bytes::from(body.to_owned());
        // A body the JSON-RPC mode lets through is never fingerprinted: read as plain here.
        let rpc = mode
            .json_rpc
            .then(|| jsonrpc::classify(&body, &jsonrpc::Settings::default()))
            .flatten()
            .unwrap_or_default();
        Fingerprint::compute(&mode.rule, &Method::POST, &uri, &map, &body, &rpc)
    }

    #[test]
    fn the_default_rule_is_the_raw_fingerprint_whatever_the_headers() {
        let raw = Mode::default();
        let expected = Fingerprint::of(&Method::POST, &"/hooks?v=1".parse().unwrap(), b"{}");
        assert_eq!(under(&raw, &[], "{}"), expected);
        assert_eq!(
            under(&raw, &[("stripe-signature", "t=1,v1=ab")], "{}"),
            expected
        );
        // Raw mode never parses: a JSON spelling difference is another payload.
        assert_ne!(
            under(&raw, &[], r#"{"a":1,"b":2}"#),
            under(&raw, &[], r#"{"b":2,"a":1}"#)
        );
    }

    #[test]
    fn body_modes_table() {
        let raw = rule(BodyFingerprint::raw(), FingerprintHeaders::none(), false);
        let canonical = rule(
            BodyFingerprint::canonical_json(),
            FingerprintHeaders::none(),
            false,
        );
        let excluding = rule(
            BodyFingerprint::canonical_json_excluding(["/created", "/data/attempt"]),
            FingerprintHeaders::none(),
            false,
        );
        let json_rpc = rule(BodyFingerprint::raw(), FingerprintHeaders::none(), true);
        let first = r#"{"id":"evt_1","created":100,"data":{"amount":1000,"attempt":1}}"#;
        // (what, second body, same under raw, canonical, excluding, json_rpc)
        let cases = [
            ("identical", first, [true, true, true, true]),
            (
                "reordered and re-spaced",
                "{ \"data\": {\"attempt\":1, \"amount\":1e3}, \"created\":100, \"id\":\"evt_1\" }",
                [false, true, true, false],
            ),
            (
                "an excluded field changed",
                r#"{"id":"evt_1","created":200,"data":{"amount":1000,"attempt":2}}"#,
                [false, false, true, false],
            ),
            (
                "an excluded field missing",
                r#"{"id":"evt_1","data":{"amount":1000}}"#,
                [false, false, true, false],
            ),
            (
                "the amount changed",
                r#"{"id":"evt_1","created":100,"data":{"amount":1001,"attempt":1}}"#,
                [false, false, false, false],
            ),
            // Not JSON-RPC 2.0 (no `"jsonrpc": "2.0"`): a plain body, its `id` is content.
            (
                "the id changed",
                r#"{"id":"evt_2","created":100,"data":{"amount":1000,"attempt":1}}"#,
                [false, false, false, false],
            ),
            ("not JSON", "id=evt_1", [false, false, false, false]),
        ];
        let rules = [&raw, &canonical, &excluding, &json_rpc];
        for (what, second, expected) in cases {
            for (rule, same) in rules.iter().zip(expected) {
                assert_eq!(
                    under(rule, &[], first) == under(rule, &[], second),
                    same,
                    "{what} under {rule:?}"
                );
            }
        }
    }

    #[test]
    fn non_json_bodies_count_byte_for_byte_in_json_modes() {
        let canonical = rule(
            BodyFingerprint::canonical_json(),
            FingerprintHeaders::none(),
            false,
        );
        assert_eq!(
            under(&canonical, &[], "a=1&b=2"),
            under(&canonical, &[], "a=1&b=2")
        );
        assert_ne!(
            under(&canonical, &[], "a=1&b=2"),
            under(&canonical, &[], "b=2&a=1")
        );
        // A body that repeats a member counts by its bytes, so it only matches itself.
        let repeated = r#"{"amount":1,"amount":100}"#;
        assert_eq!(
            under(&canonical, &[], repeated),
            under(&canonical, &[], repeated)
        );
        assert_ne!(
            under(&canonical, &[], repeated),
            under(&canonical, &[], r#"{"amount":100}"#)
        );
    }

    #[test]
    fn json_rpc_leaves_a_single_requests_id_and_meta_out_but_not_its_presence() {
        let json_rpc = rule(BodyFingerprint::raw(), FingerprintHeaders::none(), true);
        let call = |id: &str, meta: &str| {
            let body = format!(
                r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"send"{meta}}}}}"#
            );
            under(&json_rpc, &[], &body)
        };
        assert_eq!(call("1", ""), call(r#""retry-2""#, ""));
        assert_eq!(call("1", ""), call("null", ""));
        // What SDKs put in `_meta` changes on every attempt: a progress token (the request
        // id) and, with OpenTelemetry, a fresh trace context.
        assert_eq!(
            call("1", r#","_meta":{"progressToken":1}"#),
            call(
                "2",
                r#","_meta":{"progressToken":2,"traceparent":"00-ab-01"}"#
            )
        );
        assert_eq!(call("1", ""), call("2", r#","_meta":{}"#));
        let notification = r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"send"}}"#;
        assert_ne!(call("1", ""), under(&json_rpc, &[], notification));
        // A batch keeps its ids.
        let batch = |id: u8| {
            under(
                &json_rpc,
                &[],
                &format!(r#"[{{"jsonrpc":"2.0","id":{id},"method":"tools/call"}}]"#),
            )
        };
        assert_ne!(batch(1), batch(2));
        // Exclusions apply on top.
        let both = rule(
            BodyFingerprint::canonical_json_excluding(["/params/attempt"]),
            FingerprintHeaders::none(),
            true,
        );
        let attempt = |id: u8| {
            format!(
                r#"{{"jsonrpc":"2.0","method":"tools/call","id":{id},"params":{{"attempt":{id}}}}}"#
            )
        };
        assert_eq!(
            under(&both, &[], &attempt(1)),
            under(&both, &[], &attempt(2))
        );
        // Only JSON-RPC 2.0 is JSON-RPC: a REST body's `id` is its content.
        assert_ne!(
            under(&json_rpc, &[], r#"{"id":"order-1"}"#),
            under(&json_rpc, &[], r#"{"id":"order-2"}"#)
        );
        assert_ne!(
            under(&json_rpc, &[], r#"{"id":1,"method":"tools/call"}"#),
            under(&json_rpc, &[], r#"{"id":2,"method":"tools/call"}"#)
        );
    }

    type Headers<'a> = &'a [(&'a str, &'a str)];

    #[test]
    fn header_modes_table() {
        let none = rule(BodyFingerprint::raw(), FingerprintHeaders::none(), false);
        let only = rule(
            BodyFingerprint::raw(),
            FingerprintHeaders::only([HeaderName::from_static("x-tenant"), header::CONTENT_TYPE]),
            false,
        );
        let all_except = rule(
            BodyFingerprint::raw(),
            FingerprintHeaders::all_except([HeaderName::from_static("stripe-signature")]),
            false,
        );
        let first: &[(&str, &str)] = &[
            ("content-type", "application/json"),
            ("x-tenant", "acme"),
            ("stripe-signature", "t=1,v1=aa"),
            ("content-length", "2"),
        ];
        // (what, second headers, same under none, only, all_except)
        let cases: [(&str, Headers<'_>, [bool; 3]); 8] = [
            ("identical", first, [true, true, true]),
            (
                "another order",
                &[
                    ("stripe-signature", "t=1,v1=aa"),
                    ("content-length", "2"),
                    ("x-tenant", "acme"),
                    ("content-type", "application/json"),
                ],
                [true, true, true],
            ),
            (
                "a new signature",
                &[
                    ("content-type", "application/json"),
                    ("x-tenant", "acme"),
                    ("stripe-signature", "t=2,v1=bb"),
                    ("content-length", "2"),
                ],
                [true, true, true],
            ),
            (
                "another length (transfer header)",
                &[
                    ("content-type", "application/json"),
                    ("x-tenant", "acme"),
                    ("stripe-signature", "t=1,v1=aa"),
                    ("content-length", "3"),
                ],
                [true, true, true],
            ),
            (
                "another tenant",
                &[
                    ("content-type", "application/json"),
                    ("x-tenant", "other"),
                    ("stripe-signature", "t=1,v1=aa"),
                    ("content-length", "2"),
                ],
                [true, false, false],
            ),
            (
                "the tenant missing",
                &[
                    ("content-type", "application/json"),
                    ("stripe-signature", "t=1,v1=aa"),
                    ("content-length", "2"),
                ],
                [true, false, false],
            ),
            (
                "the tenant empty",
                &[
                    ("content-type", "application/json"),
                    ("x-tenant", ""),
                    ("stripe-signature", "t=1,v1=aa"),
                    ("content-length", "2"),
                ],
                [true, false, false],
            ),
            (
                "one more header",
                &[
                    ("content-type", "application/json"),
                    ("x-tenant", "acme"),
                    ("stripe-signature", "t=1,v1=aa"),
                    ("content-length", "2"),
                    ("user-agent", "curl"),
                ],
                [true, true, false],
            ),
        ];
        for (what, second, expected) in cases {
            for (rule, same) in [&none, &only, &all_except].into_iter().zip(expected) {
                assert_eq!(
                    under(rule, first, "{}") == under(rule, second, "{}"),
                    same,
                    "{what} under {rule:?}"
                );
            }
        }
        // Repeated values count in their order.
        let twice = |a: &str, b: &str| under(&all_except, &[("x-tag", a), ("x-tag", b)], "{}");
        assert_ne!(twice("1", "2"), twice("2", "1"));
        // A header's presence alone is not its absence.
        assert_ne!(
            under(&only, &[], "{}"),
            under(&only, &[("x-tenant", "")], "{}")
        );
    }

    #[test]
    fn a_secret_keys_the_fingerprint() {
        let plain = Mode::default();
        let keyed = |secret: &[u8]| Mode {
            rule: FingerprintRule {
                secret: Some(Secret::new(secret)),
                ..FingerprintRule::default()
            },
            json_rpc: false,
        };
        let a = keyed(b"secret a");
        assert_ne!(under(&plain, &[], "{}"), under(&a, &[], "{}"));
        assert_ne!(under(&a, &[], "{}"), under(&keyed(b"secret b"), &[], "{}"));
        assert_eq!(under(&a, &[], "{}"), under(&keyed(b"secret a"), &[], "{}"));
        assert_ne!(under(&a, &[], "{}"), under(&a, &[], "{ }"));
    }

    #[test]
    #[should_panic(expected = "must start with '/'")]
    fn an_exclusion_that_is_not_a_pointer_to_a_member_is_refused() {
        let _ = BodyFingerprint::canonical_json_excluding([""]);
    }
}
