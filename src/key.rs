//! Idempotency keys: parsing and validation, other key sources, scopes, and the digest a
//! store is addressed by.
//!
//! Pure logic: no tower or tokio in here, so the rules are tested by tables.

use std::{fmt, sync::Arc};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, header, request::Parts};

use crate::{digest::FieldHasher, fingerprint::Fingerprint};

/// The longest key accepted, in bytes (the IETF draft and Stripe both cap keys at 255).
pub const MAX_KEY_LEN: usize = 255;

/// A validated idempotency key, as the client sent it (unquoted if it came as a Structured
/// Field string).
///
/// Keys are never stored in clear: the store only sees a [`StorageKey`] digest.
#[derive(Clone)]
pub struct IdempotencyKey(KeyRepr);

#[derive(Clone)]
enum KeyRepr {
    /// A bare header value, shared with the request rather than copied.
    Header(HeaderValue),
    Owned(Box<str>),
}

impl IdempotencyKey {
    /// Parses a header value.
    ///
    /// A value that starts with `"` is an RFC 8941 Structured Field string (the IETF draft's
    /// form, parameters ignored); any other value is taken as it is (Stripe's form: a UUID that
    /// starts with a digit is not an sf-token). Either way the key must be 1 to
    /// [`MAX_KEY_LEN`] bytes of visible ASCII: a quoted key follows the bare key's rule
    /// once unquoted, so `" "` or `"a b"` are refused like `a b`.
    ///
    /// ```
    /// use tower_idempotency::IdempotencyKey;
    ///
    /// let bare = IdempotencyKey::parse(b"8e03978e-40d5-43e8-bc93-6894a57f9324").unwrap();
    /// let quoted = IdempotencyKey::parse(b"\"8e03978e-40d5-43e8-bc93-6894a57f9324\"").unwrap();
    /// assert_eq!(bare, quoted);
    /// assert!(IdempotencyKey::parse(b"").is_err());
    /// ```
    pub fn parse(value: &[u8]) -> Result<Self, KeyError> {
        if value.first() == Some(&b'"') {
            return Self::parse_quoted(value);
        }
        Self::parse_bare(value)
    }

    /// Validates a key taken as it is, from a header or another source.
    fn parse_bare(value: &[u8]) -> Result<Self, KeyError> {
        Ok(Self(KeyRepr::Owned(check_bare(value)?.into())))
    }

    fn parse_quoted(value: &[u8]) -> Result<Self, KeyError> {
        let item = sfv::Parser::new(value)
            .parse::<sfv::Item>()
            .map_err(|_| KeyError::MalformedQuoted)?;
        let sfv::BareItem::String(text) = item.bare_item else {
            return Err(KeyError::MalformedQuoted);
        };
        // An sf-string may hold spaces; a key may not, whichever form it came in.
        Ok(Self(KeyRepr::Owned(
            check_bare(text.as_str().as_bytes())?.into(),
        )))
    }

    /// Reads the key from `headers[name]`: `Ok(None)` when absent, an error when invalid or
    /// repeated (a client that sends two keys has a bug, and picking one would hide it).
    pub fn from_headers(headers: &HeaderMap, name: &HeaderName) -> Result<Option<Self>, KeyError> {
        let mut values = headers.get_all(name).iter();
        let Some(value) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(KeyError::Repeated);
        }
        if value.as_bytes().first() == Some(&b'"') {
            return Self::parse_quoted(value.as_bytes()).map(Some);
        }
        check_bare(value.as_bytes())?;
        Ok(Some(Self(KeyRepr::Header(value.clone()))))
    }

    /// The key's text.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            // Checked to be visible ASCII when the key was made.
            KeyRepr::Header(value) => value.to_str().unwrap_or_default(),
            KeyRepr::Owned(text) => text,
        }
    }
}

/// A bare key's text: 1 to [`MAX_KEY_LEN`] bytes of visible ASCII.
fn check_bare(value: &[u8]) -> Result<&str, KeyError> {
    check_len(value.len())?;
    if !value.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(KeyError::InvalidCharacter);
    }
    std::str::from_utf8(value).map_err(|_| KeyError::InvalidCharacter)
}

impl PartialEq for IdempotencyKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for IdempotencyKey {}

impl std::hash::Hash for IdempotencyKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

fn check_len(len: usize) -> Result<(), KeyError> {
    match len {
        0 => Err(KeyError::Empty),
        len if len > MAX_KEY_LEN => Err(KeyError::TooLong { len }),
        _ => Ok(()),
    }
}

impl fmt::Debug for IdempotencyKey {
    // Keys act as bearer tokens for a stored response: never print them whole.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdempotencyKey({} bytes)", self.as_str().len())
    }
}

/// Why a key was refused (a 400 problem).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// The key is empty.
    Empty,
    /// The key is longer than [`MAX_KEY_LEN`] bytes.
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The key holds a byte that is not visible ASCII.
    InvalidCharacter,
    /// The key starts with `"` but is not a valid Structured Field string.
    MalformedQuoted,
    /// The key header appears more than once.
    Repeated,
    /// A key source found a value that is neither a string nor a number.
    NotAString,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("the idempotency key is empty"),
            Self::TooLong { len } => write!(
                f,
                "the idempotency key is {len} bytes long; at most {MAX_KEY_LEN} are allowed"
            ),
            Self::InvalidCharacter => {
                f.write_str("the idempotency key may only hold visible ASCII characters")
            }
            Self::MalformedQuoted => f.write_str(
                "the idempotency key starts with '\"' but is not a valid Structured Field string",
            ),
            Self::Repeated => f.write_str("the idempotency key header was sent more than once"),
            Self::NotAString => {
                f.write_str("the idempotency key in the request is not a string or a number")
            }
        }
    }
}

impl std::error::Error for KeyError {}

/// Where to find a key when the request has no key header: for senders that never send
/// `Idempotency-Key`, such as webhook deliveries.
///
/// Values from these sources are taken as they are and validated like a bare header key.
/// Ready ones name the field each webhook provider keeps across re-deliveries:
/// [`stripe_event`](Self::stripe_event), [`github_delivery`](Self::github_delivery),
/// [`shopify_event`](Self::shopify_event), [`standard_webhooks`](Self::standard_webhooks);
/// [`first_of`](Self::first_of) asks several in order.
#[derive(Clone)]
pub struct KeySource(SourceRepr);

#[derive(Clone)]
enum SourceRepr {
    Header(HeaderName),
    JsonPointer(Box<str>),
    Fn(KeyFn),
    First(Arc<[KeySource]>),
}

type KeyFn = Arc<dyn Fn(&Parts, &Bytes) -> Option<String> + Send + Sync>;
type ScopeFn = Arc<dyn Fn(&Parts, &mut KeyHasher) + Send + Sync>;

impl KeySource {
    /// Another header holds the key, e.g. `X-GitHub-Delivery` or `X-Shopify-Webhook-Id`.
    ///
    /// ```
    /// use http::HeaderName;
    /// use tower_idempotency::KeySource;
    ///
    /// let github = KeySource::header(HeaderName::from_static("x-github-delivery"));
    /// ```
    pub fn header(name: HeaderName) -> Self {
        Self(SourceRepr::Header(name))
    }

    /// A field of a JSON body, by RFC 6901 JSON Pointer, e.g. `/id` for a Stripe event.
    ///
    /// A body that is not JSON, or has no such field, has no key; a field that is neither a
    /// string nor a number is an invalid key (400).
    ///
    /// ```
    /// use tower_idempotency::KeySource;
    ///
    /// let stripe_event = KeySource::json_pointer("/id");
    /// ```
    pub fn json_pointer(pointer: impl Into<String>) -> Self {
        Self(SourceRepr::JsonPointer(pointer.into().into_boxed_str()))
    }

    /// A closure over the request head and its (already read) body.
    ///
    /// ```
    /// use tower_idempotency::KeySource;
    ///
    /// let from_query = KeySource::from_fn(|parts, _body| {
    ///     parts.uri.query()?.strip_prefix("request_id=").map(str::to_owned)
    /// });
    /// ```
    pub fn from_fn<F>(f: F) -> Self
    where
        F: Fn(&Parts, &Bytes) -> Option<String> + Send + Sync + 'static,
    {
        Self(SourceRepr::Fn(Arc::new(f)))
    }

    /// Several sources, asked in order: the first that finds a key (or an invalid one, which
    /// is refused with 400 rather than skipped) decides.
    ///
    /// ```
    /// use http::HeaderName;
    /// use tower_idempotency::KeySource;
    ///
    /// // The sender's own request id when it sets one, else the event's id.
    /// let source = KeySource::first_of([
    ///     KeySource::header(HeaderName::from_static("x-request-id")),
    ///     KeySource::stripe_event(),
    /// ]);
    /// ```
    ///
    /// The layer's key header (`Idempotency-Key`) is always looked at before any source, so a
    /// client that sends one overrides them all.
    pub fn first_of(sources: impl IntoIterator<Item = KeySource>) -> Self {
        Self(SourceRepr::First(sources.into_iter().collect()))
    }

    /// Looks the key up from the headers only; `None` when the body is needed.
    pub(crate) fn extract_from_headers(
        &self,
        headers: &HeaderMap,
    ) -> Option<Result<Option<IdempotencyKey>, KeyError>> {
        match &self.0 {
            SourceRepr::Header(name) => Some(header_value_as_key(headers, name)),
            SourceRepr::First(sources) => {
                for source in sources.iter() {
                    match source.extract_from_headers(headers)? {
                        Ok(None) => {}
                        decided => return Some(decided),
                    }
                }
                Some(Ok(None))
            }
            _ => None,
        }
    }

    /// Looks the key up in the head and body.
    pub(crate) fn extract(
        &self,
        parts: &Parts,
        body: &Bytes,
    ) -> Result<Option<IdempotencyKey>, KeyError> {
        match &self.0 {
            SourceRepr::Header(name) => header_value_as_key(&parts.headers, name),
            SourceRepr::JsonPointer(pointer) => json_pointer_key(body, pointer),
            SourceRepr::Fn(f) => f(parts, body)
                .map(|value| IdempotencyKey::parse_bare(value.as_bytes()))
                .transpose(),
            SourceRepr::First(sources) => {
                for source in sources.iter() {
                    if let Some(key) = source.extract(parts, body)? {
                        return Ok(Some(key));
                    }
                }
                Ok(None)
            }
        }
    }
}

fn header_value_as_key(
    headers: &HeaderMap,
    name: &HeaderName,
) -> Result<Option<IdempotencyKey>, KeyError> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(KeyError::Repeated);
    }
    IdempotencyKey::parse_bare(value.as_bytes()).map(Some)
}

fn json_pointer_key(body: &[u8], pointer: &str) -> Result<Option<IdempotencyKey>, KeyError> {
    let Ok(document) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Ok(None);
    };
    match document.pointer(pointer) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(text)) => {
            IdempotencyKey::parse_bare(text.as_bytes()).map(Some)
        }
        Some(serde_json::Value::Number(number)) => {
            IdempotencyKey::parse_bare(number.to_string().as_bytes()).map(Some)
        }
        Some(_) => Err(KeyError::NotAString),
    }
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            SourceRepr::Header(name) => f.debug_tuple("Header").field(name).finish(),
            SourceRepr::JsonPointer(pointer) => {
                f.debug_tuple("JsonPointer").field(pointer).finish()
            }
            SourceRepr::Fn(_) => f.write_str("Fn(..)"),
            SourceRepr::First(sources) => f.debug_tuple("First").field(sources).finish(),
        }
    }
}

/// Whose key it is: the part of a record's address that separates one principal's keys
/// from another's.
#[derive(Clone)]
pub(crate) enum Scope {
    /// The request's credentials: `Authorization`, and `Cookie` for derived keys.
    Credentials,
    /// The application's own notion of a principal.
    Custom(ScopeFn),
}

impl Scope {
    pub(crate) fn custom<F, R>(f: F) -> Self
    where
        F: Fn(&Parts) -> R + Send + Sync + 'static,
        R: AsRef<[u8]>,
    {
        Self::Custom(Arc::new(move |parts, hasher| {
            hasher.field(b's', f(parts).as_ref());
        }))
    }

    fn hash(&self, parts: &Parts, derived: bool, hasher: &mut KeyHasher) {
        match self {
            Self::Credentials => {
                for value in &parts.headers.get_all(header::AUTHORIZATION) {
                    hasher.field(b'a', value.as_bytes());
                }
                // Derived keys are guessable (anyone can compute the digest of a body), so
                // browser sessions must separate them too.
                if derived {
                    for value in &parts.headers.get_all(header::COOKIE) {
                        hasher.field(b'c', value.as_bytes());
                    }
                }
            }
            Self::Custom(f) => f(parts, hasher),
        }
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Credentials => f.write_str("Credentials"),
            Self::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// The hasher a storage key is derived with.
pub(crate) type KeyHasher = FieldHasher;

/// Which key a request carries.
#[derive(Debug, Clone, Copy)]
pub(crate) enum KeyRef<'a> {
    /// Sent by the client (header or another key source).
    Client(&'a IdempotencyKey),
    /// Derived from the request itself (no key sent).
    Derived(&'a Fingerprint),
}

/// The address of a record in a store: a SHA-256 digest of (scope, method, path, key), so the
/// same key on another route or from another principal is another record, and neither keys
/// nor credentials are ever stored in clear.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct StorageKey([u8; 32]);

impl std::hash::Hash for StorageKey {
    // The digest is uniformly spread already: eight of its bytes are plenty for a hash table,
    // and four times cheaper to feed to the table's keyed hasher than all 32. The hasher stays
    // keyed, so keys ground to collide in a table cannot be chosen from outside.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut prefix = [0; 8];
        prefix.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(prefix));
    }
}

impl StorageKey {
    #[cfg(test)]
    pub(crate) fn derive(scope: &Scope, method: &Method, parts: &Parts, key: KeyRef<'_>) -> Self {
        Self::derive_with(KeyHasher::new(), scope, method, parts, key)
    }

    /// Derives the address with `hasher`: plain SHA-256, or HMAC-SHA-256 under a secret.
    pub(crate) fn derive_with(
        mut hasher: KeyHasher,
        scope: &Scope,
        method: &Method,
        parts: &Parts,
        key: KeyRef<'_>,
    ) -> Self {
        hasher.field(b'd', b"tower-idempotency storage key v1");
        let derived = matches!(key, KeyRef::Derived(_));
        scope.hash(parts, derived, &mut hasher);
        hasher.field(b'm', method.as_str().as_bytes());
        hasher.field(b'p', parts.uri.path().as_bytes());
        match key {
            KeyRef::Client(key) => hasher.field(b'k', key.as_str().as_bytes()),
            KeyRef::Derived(fingerprint) => hasher.field(b'f', fingerprint.as_bytes()),
        }
        Self(hasher.finish())
    }

    /// Wraps a digest, for stores that read keys back.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The digest as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

impl fmt::Debug for StorageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorageKey({}…)", &self.to_hex()[..12])
    }
}

// The Redis store still takes it from here.
pub(crate) use crate::digest::hex;

/// The key as an RFC 8941 sf-string: quoted, `"` and `\\` escaped.
#[cfg(any(test, fuzzing))]
fn quoted(key: &str) -> Vec<u8> {
    let mut out = vec![b'"'];
    for byte in key.bytes() {
        if byte == b'"' || byte == b'\\' {
            out.push(b'\\');
        }
        out.push(byte);
    }
    out.push(b'"');
    out
}

/// What the `key` fuzz target and its proptest twins check: parsing never panics; a parsed
/// key is 1 to [`MAX_KEY_LEN`] bytes of visible ASCII, the same key in quoted form (and in
/// bare form, unless it starts with `"`), and the same read from a header. Panics when that
/// is broken.
#[cfg(any(test, fuzzing))]
pub(crate) fn check_parse(input: &[u8]) {
    const NAME: HeaderName = HeaderName::from_static("idempotency-key");
    let parsed = IdempotencyKey::parse(input);
    if let Ok(value) = HeaderValue::from_bytes(input) {
        let mut headers = HeaderMap::new();
        headers.insert(NAME, value);
        let from_headers = IdempotencyKey::from_headers(&headers, &NAME);
        assert_eq!(from_headers, parsed.clone().map(Some));
    }
    if let Ok(key) = parsed {
        let text = key.as_str();
        assert!((1..=MAX_KEY_LEN).contains(&text.len()));
        assert!(text.bytes().all(|b| b.is_ascii_graphic()), "{text:?}");
        assert_eq!(IdempotencyKey::parse(&quoted(text)), Ok(key.clone()));
        if !text.starts_with('"') {
            assert_eq!(IdempotencyKey::parse(text.as_bytes()), Ok(key));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderValue, Request};

    const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

    #[test]
    fn key_parsing_table() {
        let long_ok = "k".repeat(255);
        let long_bad = "k".repeat(256);
        let quoted_long_bad = format!("\"{}\"", "k".repeat(256));
        let cases: &[(&[u8], Result<&str, KeyError>)] = &[
            (
                b"8e03978e-40d5-43e8-bc93-6894a57f9324",
                Ok("8e03978e-40d5-43e8-bc93-6894a57f9324"),
            ),
            (b"\"8e03978e-40d5\"", Ok("8e03978e-40d5")),
            (b"\"with space\"", Err(KeyError::InvalidCharacter)),
            (b"\" \"", Err(KeyError::InvalidCharacter)),
            (b"\"trailing \"", Err(KeyError::InvalidCharacter)),
            (b"\"  \"", Err(KeyError::InvalidCharacter)),
            (b"\"esc\\\\aped\"", Ok("esc\\aped")),
            (b"\"esc\\\"aped\"", Ok("esc\"aped")),
            (b"\"k\";param=1", Ok("k")),
            (b"0123", Ok("0123")),
            (b"a\"b", Ok("a\"b")),
            (b"", Err(KeyError::Empty)),
            (b"\"\"", Err(KeyError::Empty)),
            (long_ok.as_bytes(), Ok(long_ok.as_str())),
            (long_bad.as_bytes(), Err(KeyError::TooLong { len: 256 })),
            (
                quoted_long_bad.as_bytes(),
                Err(KeyError::TooLong { len: 256 }),
            ),
            (b"with space", Err(KeyError::InvalidCharacter)),
            (b"tab\there", Err(KeyError::InvalidCharacter)),
            (b"nul\0", Err(KeyError::InvalidCharacter)),
            (b"del\x7f", Err(KeyError::InvalidCharacter)),
            ("caf\u{e9}".as_bytes(), Err(KeyError::InvalidCharacter)),
            (b"\xff\xfe", Err(KeyError::InvalidCharacter)),
            (b"\"unterminated", Err(KeyError::MalformedQuoted)),
            (b"\"bad\\escape\"", Err(KeyError::MalformedQuoted)),
            (b"\"two\" \"items\"", Err(KeyError::MalformedQuoted)),
            ("\"caf\u{e9}\"".as_bytes(), Err(KeyError::MalformedQuoted)),
        ];
        for (input, expected) in cases {
            let check = |got: Result<IdempotencyKey, KeyError>| match (expected, got) {
                (Ok(text), Ok(key)) => assert_eq!(key.as_str(), *text, "input {input:?}"),
                (Err(want), Err(err)) => assert_eq!(*want, err, "input {input:?}"),
                (want, got) => panic!("input {input:?}: want {want:?}, got {got:?}"),
            };
            check(IdempotencyKey::parse(input));
            // The same rules when the key comes from a request's headers.
            if let Ok(value) = HeaderValue::from_bytes(input) {
                let mut headers = HeaderMap::new();
                headers.insert(&IDEMPOTENCY_KEY, value);
                let from_headers = IdempotencyKey::from_headers(&headers, &IDEMPOTENCY_KEY);
                check(from_headers.map(|key| key.expect("the header is there")));
            }
        }
    }

    #[test]
    fn a_repeated_key_header_is_refused_and_an_absent_one_is_none() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            IdempotencyKey::from_headers(&headers, &IDEMPOTENCY_KEY),
            Ok(None)
        );
        headers.append(&IDEMPOTENCY_KEY, HeaderValue::from_static("a"));
        assert_eq!(
            IdempotencyKey::from_headers(&headers, &IDEMPOTENCY_KEY)
                .map(|k| k.map(|k| k.as_str().to_owned())),
            Ok(Some("a".to_owned()))
        );
        headers.append(&IDEMPOTENCY_KEY, HeaderValue::from_static("a"));
        assert_eq!(
            IdempotencyKey::from_headers(&headers, &IDEMPOTENCY_KEY),
            Err(KeyError::Repeated)
        );
    }

    #[test]
    fn debug_output_never_shows_the_key() {
        let key = IdempotencyKey::parse(b"secret-key-123").unwrap();
        assert!(!format!("{key:?}").contains("secret"));
    }

    fn parts(method: Method, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn json_body(text: &str) -> Bytes {
        Bytes::copy_from_slice(text.as_bytes())
    }

    #[test]
    fn key_sources_table() {
        let head = parts(
            Method::POST,
            "/hook?request_id=q-1",
            &[("x-github-delivery", "gh-1")],
        );
        type Case = (
            KeySource,
            &'static str,
            Result<Option<&'static str>, KeyError>,
        );
        let cases: Vec<Case> = vec![
            (
                KeySource::header(HeaderName::from_static("x-github-delivery")),
                "",
                Ok(Some("gh-1")),
            ),
            (
                KeySource::header(HeaderName::from_static("x-other")),
                "",
                Ok(None),
            ),
            (
                KeySource::json_pointer("/id"),
                r#"{"id":"evt_1"}"#,
                Ok(Some("evt_1")),
            ),
            (
                KeySource::json_pointer("/data/n"),
                r#"{"data":{"n":42}}"#,
                Ok(Some("42")),
            ),
            (KeySource::json_pointer("/id"), r#"{"other":1}"#, Ok(None)),
            (KeySource::json_pointer("/id"), r#"{"id":null}"#, Ok(None)),
            (KeySource::json_pointer("/id"), "not json", Ok(None)),
            (
                KeySource::json_pointer("/id"),
                r#"{"id":{"x":1}}"#,
                Err(KeyError::NotAString),
            ),
            (
                KeySource::json_pointer("/id"),
                r#"{"id":""}"#,
                Err(KeyError::Empty),
            ),
            (
                KeySource::json_pointer("/id"),
                r#"{"id":"a b"}"#,
                Err(KeyError::InvalidCharacter),
            ),
            (
                KeySource::from_fn(|p, _| {
                    p.uri
                        .query()?
                        .strip_prefix("request_id=")
                        .map(str::to_owned)
                }),
                "",
                Ok(Some("q-1")),
            ),
            (KeySource::from_fn(|_, _| None), "", Ok(None)),
        ];
        for (source, body, expected) in cases {
            let got = source.extract(&head, &json_body(body));
            let got = got.map(|key| key.map(|key| key.as_str().to_owned()));
            let expected = expected.map(|key| key.map(str::to_owned));
            assert_eq!(got, expected, "{source:?} over {body:?}");
        }
    }

    #[test]
    fn only_header_sources_answer_without_the_body() {
        let head = parts(Method::POST, "/", &[]);
        assert!(
            KeySource::header(IDEMPOTENCY_KEY)
                .extract_from_headers(&head.headers)
                .is_some()
        );
        assert!(
            KeySource::json_pointer("/id")
                .extract_from_headers(&head.headers)
                .is_none()
        );
    }

    fn storage_key(scope: &Scope, parts: &Parts, key: &str) -> StorageKey {
        let key = IdempotencyKey::parse(key.as_bytes()).unwrap();
        StorageKey::derive(scope, &parts.method, parts, KeyRef::Client(&key))
    }

    #[test]
    fn the_storage_key_separates_route_method_principal_and_key() {
        let scope = Scope::Credentials;
        let base = parts(
            Method::POST,
            "/charges",
            &[("authorization", "Bearer alice")],
        );
        let same = parts(
            Method::POST,
            "/charges?x=1",
            &[("authorization", "Bearer alice")],
        );
        let route = parts(
            Method::POST,
            "/refunds",
            &[("authorization", "Bearer alice")],
        );
        let method = parts(
            Method::PATCH,
            "/charges",
            &[("authorization", "Bearer alice")],
        );
        let principal = parts(Method::POST, "/charges", &[("authorization", "Bearer bob")]);
        let anonymous = parts(Method::POST, "/charges", &[]);
        let k = storage_key(&scope, &base, "k1");
        assert_eq!(
            k,
            storage_key(&scope, &same, "k1"),
            "the query is not part of the address"
        );
        assert_ne!(k, storage_key(&scope, &base, "k2"));
        assert_ne!(k, storage_key(&scope, &route, "k1"));
        assert_ne!(k, storage_key(&scope, &method, "k1"));
        assert_ne!(k, storage_key(&scope, &principal, "k1"));
        assert_ne!(k, storage_key(&scope, &anonymous, "k1"));
    }

    #[test]
    fn storage_keys_are_stable_across_versions() {
        // Stores are addressed by these digests: a change to how they are computed would
        // orphan every stored record (and let every retry after an upgrade execute again).
        let head = parts(
            Method::POST,
            "/charges",
            &[("authorization", "Bearer alice")],
        );
        assert_eq!(
            storage_key(&Scope::Credentials, &head, "k1").to_hex(),
            "1ff42507437fb8f75ea7b329e75da3deeff644911e4f06e49b1fac19f6412f81"
        );
    }

    #[test]
    fn cookies_scope_derived_keys_but_not_client_keys() {
        let scope = Scope::Credentials;
        let alice = parts(Method::POST, "/", &[("cookie", "session=alice")]);
        let bob = parts(Method::POST, "/", &[("cookie", "session=bob")]);
        assert_eq!(
            storage_key(&scope, &alice, "k"),
            storage_key(&scope, &bob, "k")
        );
        let fingerprint = Fingerprint::of(&Method::POST, &alice.uri, b"");
        let derived =
            |p: &Parts| StorageKey::derive(&scope, &p.method, p, KeyRef::Derived(&fingerprint));
        assert_ne!(derived(&alice), derived(&bob));
    }

    #[test]
    fn a_custom_scope_replaces_credentials() {
        let scope = Scope::custom(|parts: &Parts| {
            parts
                .headers
                .get("x-tenant")
                .map(|v| v.as_bytes().to_vec())
                .unwrap_or_default()
        });
        let a = parts(
            Method::POST,
            "/",
            &[("x-tenant", "a"), ("authorization", "x")],
        );
        let a2 = parts(
            Method::POST,
            "/",
            &[("x-tenant", "a"), ("authorization", "y")],
        );
        let b = parts(Method::POST, "/", &[("x-tenant", "b")]);
        assert_eq!(storage_key(&scope, &a, "k"), storage_key(&scope, &a2, "k"));
        assert_ne!(storage_key(&scope, &a, "k"), storage_key(&scope, &b, "k"));
    }

    #[test]
    fn client_and_derived_keys_never_share_an_address() {
        let scope = Scope::Credentials;
        let head = parts(Method::POST, "/", &[]);
        let fingerprint = Fingerprint::of(&Method::POST, &head.uri, b"");
        let hex_key = IdempotencyKey::parse(hex(fingerprint.as_bytes()).as_bytes()).unwrap();
        assert_ne!(
            StorageKey::derive(&scope, &head.method, &head, KeyRef::Client(&hex_key)),
            StorageKey::derive(&scope, &head.method, &head, KeyRef::Derived(&fingerprint)),
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_key_bytes_never_panic(input in proptest::collection::vec(proptest::arbitrary::any::<u8>(), 0..300)) {
            check_parse(&input);
        }

        #[test]
        fn near_valid_keys_parse_by_the_same_rule_in_either_form(
            key in "[ -~]{0,260}",
            quote in proptest::bool::ANY,
            params in "(;[a-z]{1,3}=[0-9]{1,2}){0,2}",
        ) {
            let input = if quote {
                [quoted(&key), params.into_bytes()].concat()
            } else {
                key.clone().into_bytes()
            };
            check_parse(&input);
            // Quoted or not, a key is accepted exactly when it is 1 to 255 visible ASCII bytes.
            let valid = (1..=MAX_KEY_LEN).contains(&key.len())
                && key.bytes().all(|b| b.is_ascii_graphic());
            if quote || !key.starts_with('"') {
                proptest::prop_assert_eq!(IdempotencyKey::parse(&input).is_ok(), valid, "{:?}", input);
            }
        }
    }
}
