//! [`IdempotencyKey`]: a client's key, parsed from the key header and validated; and
//! [`KeyError`], why one is refused.

use std::fmt;

use http::{HeaderMap, HeaderName, HeaderValue};

/// The longest key accepted, in bytes (the IETF draft and Stripe both cap keys at 255).
pub const MAX_KEY_LEN: usize = 255;

/// A validated idempotency key, as the client sent it (unquoted if it came as a Structured
/// Field string).
///
/// Keys are never stored in clear: the store only sees a [`StorageKey`](crate::StorageKey)
/// digest.
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
    pub(super) fn parse_bare(value: &[u8]) -> Result<Self, KeyError> {
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
        // What it does show: that it is a key, and how long.
        assert_eq!(format!("{key:?}"), "IdempotencyKey(14 bytes)");
    }

    #[test]
    fn keys_are_equal_and_hash_alike_exactly_when_their_text_is() {
        fn hash_of(key: &IdempotencyKey) -> u64 {
            use std::hash::{Hash, Hasher};
            // SipHash with fixed keys: the same text always gives the same value.
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            key.hash(&mut hasher);
            hasher.finish()
        }
        let parse = |value: &[u8]| IdempotencyKey::parse(value).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(&IDEMPOTENCY_KEY, HeaderValue::from_static("order-1"));
        let from_header = IdempotencyKey::from_headers(&headers, &IDEMPOTENCY_KEY)
            .unwrap()
            .unwrap();
        // The same text, held as a header value, as a bare or a quoted key.
        for same in [parse(b"order-1"), parse(b"\"order-1\""), from_header] {
            assert_eq!(same, parse(b"order-1"));
            assert_eq!(hash_of(&same), hash_of(&parse(b"order-1")));
        }
        for other in [&b"order-2"[..], b"Order-1", b"order-10", b"order-"] {
            let other = parse(other);
            assert_ne!(other, parse(b"order-1"), "{other:?}");
            assert_ne!(hash_of(&other), hash_of(&parse(b"order-1")));
        }
    }

    #[test]
    fn each_refusal_says_why_in_words() {
        let cases = [
            (KeyError::Empty, "the idempotency key is empty"),
            (
                KeyError::TooLong { len: 300 },
                "the idempotency key is 300 bytes long; at most 255 are allowed",
            ),
            (
                KeyError::InvalidCharacter,
                "the idempotency key may only hold visible ASCII characters",
            ),
            (
                KeyError::MalformedQuoted,
                "the idempotency key starts with '\"' but is not a valid Structured Field string",
            ),
            (
                KeyError::Repeated,
                "the idempotency key header was sent more than once",
            ),
            (
                KeyError::NotAString,
                "the idempotency key in the request is not a string or a number",
            ),
        ];
        for (error, text) in cases {
            assert_eq!(error.to_string(), text);
        }
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
