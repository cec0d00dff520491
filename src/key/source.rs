//! [`KeySource`]: where to find a key when the request has no key header.

use std::{collections::HashMap, fmt, sync::Arc};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, request::Parts};
use serde_json::value::RawValue;

use super::{IdempotencyKey, KeyError, delivery::Delivery};

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
    Header(HeaderName, Delivery),
    JsonPointer(Box<str>),
    Fn(KeyFn),
    First(Arc<[KeySource]>),
}

type KeyFn = Arc<dyn Fn(&Parts, &Bytes) -> Option<String> + Send + Sync>;

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
        Self::delivery_header(name, Delivery::Plain)
    }

    /// A header that holds a webhook provider's delivery id, with what the id means.
    pub(crate) fn delivery_header(name: HeaderName, delivery: Delivery) -> Self {
        Self(SourceRepr::Header(name, delivery))
    }

    /// A field of a JSON body, by RFC 6901 JSON Pointer, e.g. `/id` for a Stripe event.
    ///
    /// A body that is not JSON, or has no such field, has no key; a field that is neither a
    /// string nor a number is an invalid key (400). A number is taken as its digits as sent
    /// (`18446744073709551617`, never a double's `1.8446744073709552e19`).
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

    /// A closure over a unary gRPC call's request message (the body without its 5-byte
    /// length prefix): AIP-155's `request_id`, decoded with the message's own type. A body
    /// that is not one uncompressed message (a compressed flag of 0, a 4-byte big-endian
    /// length, that many bytes and nothing after them) has no key: a compressed message, a
    /// stream of several or a frame cut short.
    ///
    /// ```
    /// use prost::Message;
    /// use tower_idempotency::KeySource;
    ///
    /// #[derive(Clone, PartialEq, Message)]
    /// struct CreateChargeRequest {
    ///     #[prost(int64, tag = "1")]
    ///     amount: i64,
    ///     #[prost(string, tag = "2")]
    ///     request_id: String,
    /// }
    ///
    /// let request_id = KeySource::grpc_message(|message| {
    ///     let request = CreateChargeRequest::decode(message).ok()?;
    ///     // AIP-155: an empty request_id is no request id.
    ///     (!request.request_id.is_empty()).then_some(request.request_id)
    /// });
    /// ```
    pub fn grpc_message<F>(f: F) -> Self
    where
        F: Fn(&[u8]) -> Option<String> + Send + Sync + 'static,
    {
        Self::from_fn(move |_parts, body| crate::protocol::grpc::grpc_message(body).and_then(&f))
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
    pub(crate) fn find_in_head(
        &self,
        headers: &HeaderMap,
    ) -> Option<Result<Option<Found>, KeyError>> {
        match &self.0 {
            SourceRepr::Header(name, delivery) => Some(header_key(headers, name, *delivery)),
            SourceRepr::First(sources) => {
                for source in sources.iter() {
                    match source.find_in_head(headers)? {
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
    pub(crate) fn find(&self, parts: &Parts, body: &Bytes) -> Result<Option<Found>, KeyError> {
        let plain = |key: Option<IdempotencyKey>| key.map(Found::plain);
        match &self.0 {
            SourceRepr::Header(name, delivery) => header_key(&parts.headers, name, *delivery),
            SourceRepr::JsonPointer(pointer) => json_pointer_key(body, pointer).map(plain),
            SourceRepr::Fn(f) => f(parts, body)
                .map(|value| IdempotencyKey::parse_bare(value.as_bytes()))
                .transpose()
                .map(plain),
            SourceRepr::First(sources) => {
                for source in sources.iter() {
                    if let Some(found) = source.find(parts, body)? {
                        return Ok(Some(found));
                    }
                }
                Ok(None)
            }
        }
    }

    /// [`find_in_head`](Self::find_in_head), the key alone.
    #[cfg(test)]
    pub(crate) fn extract_from_headers(
        &self,
        headers: &HeaderMap,
    ) -> Option<Result<Option<IdempotencyKey>, KeyError>> {
        let found = self.find_in_head(headers)?;
        Some(found.map(|found| found.map(|found| found.key)))
    }

    /// [`find`](Self::find), the key alone.
    #[cfg(test)]
    pub(crate) fn extract(
        &self,
        parts: &Parts,
        body: &Bytes,
    ) -> Result<Option<IdempotencyKey>, KeyError> {
        Ok(self.find(parts, body)?.map(|found| found.key))
    }
}

/// A key a source found, and what kind of delivery it names.
#[derive(Debug, Clone)]
pub(crate) struct Found {
    pub(crate) key: IdempotencyKey,
    pub(crate) delivery: Delivery,
}

impl Found {
    /// A key with nothing more to it.
    pub(crate) fn plain(key: IdempotencyKey) -> Self {
        Self {
            key,
            delivery: Delivery::Plain,
        }
    }
}

fn header_key(
    headers: &HeaderMap,
    name: &HeaderName,
    delivery: Delivery,
) -> Result<Option<Found>, KeyError> {
    let key = header_value_as_key(headers, name)?;
    Ok(key.map(|key| Found { key, delivery }))
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
    let Some(found) = raw_at(body, pointer) else {
        return Ok(None);
    };
    let text = found.get();
    match text.as_bytes().first() {
        None | Some(b'n') => Ok(None),
        Some(b'"') => match serde_json::from_str::<String>(text) {
            Ok(text) => IdempotencyKey::parse_bare(text.as_bytes()).map(Some),
            Err(_) => Ok(None),
        },
        // A number is its digits as sent: read as a double, ids past 2^64 that differ in
        // their last digits would share a key.
        Some(b'-' | b'0'..=b'9') => IdempotencyKey::parse_bare(text.as_bytes()).map(Some),
        Some(_) => Err(KeyError::NotAString),
    }
}

/// The JSON text RFC 6901 `pointer` names in `body`, as it was sent; `None` when the body is
/// not JSON or has no such value. Walked level by level over raw values (each level read by
/// `serde_json`, whose `Value::pointer` would have turned the number found into a double).
fn raw_at<'a>(body: &'a [u8], pointer: &str) -> Option<&'a RawValue> {
    let mut value: &RawValue = serde_json::from_slice(body).ok()?;
    if pointer.is_empty() {
        return Some(value);
    }
    for token in pointer.strip_prefix('/')?.split('/') {
        let token = token.replace("~1", "/").replace("~0", "~");
        value = match value.get().as_bytes().first()? {
            b'{' => {
                let members: HashMap<String, &RawValue> = serde_json::from_str(value.get()).ok()?;
                members.get(&token).copied()?
            }
            b'[' => {
                // RFC 6901: `0`, or digits without a leading zero.
                if token.starts_with('0') && token != "0"
                    || !token.bytes().all(|b| b.is_ascii_digit())
                {
                    return None;
                }
                let items: Vec<&RawValue> = serde_json::from_str(value.get()).ok()?;
                items.get(token.parse::<usize>().ok()?).copied()?
            }
            _ => return None,
        };
    }
    Some(value)
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            SourceRepr::Header(name, Delivery::Plain) => {
                f.debug_tuple("Header").field(name).finish()
            }
            SourceRepr::Header(name, delivery) => {
                f.debug_tuple("Header").field(name).field(delivery).finish()
            }
            SourceRepr::JsonPointer(pointer) => {
                f.debug_tuple("JsonPointer").field(pointer).finish()
            }
            SourceRepr::Fn(_) => f.write_str("Fn(..)"),
            SourceRepr::First(sources) => f.debug_tuple("First").field(sources).finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use http::{Method, Request};

    use super::*;

    const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

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
    fn a_numeric_key_is_its_digits_as_sent_never_a_rounded_double() {
        let head = parts(Method::POST, "/hook", &[]);
        let cases = [
            ("/id", r#"{"id":42}"#, Some("42")),
            ("/id", r#"{"id":-7}"#, Some("-7")),
            (
                "/id",
                r#"{"id":18446744073709551615}"#,
                Some("18446744073709551615"),
            ),
            (
                "/id",
                r#"{"id":18446744073709551616}"#,
                Some("18446744073709551616"),
            ),
            (
                "/id",
                r#"{"id":18446744073709551617}"#,
                Some("18446744073709551617"),
            ),
            (
                "/id",
                r#"{"id":-9223372036854775809}"#,
                Some("-9223372036854775809"),
            ),
            (
                "/id",
                r#"{"id":1.0000000000000001e+23}"#,
                Some("1.0000000000000001e+23"),
            ),
            (
                "/id",
                r#"{ "id" : 12345678901234567890123 }"#,
                Some("12345678901234567890123"),
            ),
            (
                "/data/0/n",
                r#"{"data":[{"n":18446744073709551616}]}"#,
                Some("18446744073709551616"),
            ),
            ("/a~1b/m~0n", r#"{"a/b":{"m~n":"x"}}"#, Some("x")),
            ("/list/01", r#"{"list":["a","b"]}"#, None),
            ("/list/1", r#"{"list":["a","b"]}"#, Some("b")),
            ("", r#""whole""#, Some("whole")),
        ];
        for (pointer, body, expected) in cases {
            let got = KeySource::json_pointer(pointer).extract(&head, &json_body(body));
            let got = got.map(|key| key.map(|key| key.as_str().to_owned()));
            assert_eq!(got, Ok(expected.map(str::to_owned)), "{pointer} in {body}");
        }
        // A deeply nested body is walked only along the pointer: no stack overflow.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let got = KeySource::json_pointer("/0/0").extract(&head, &json_body(&deep));
        assert_eq!(got, Err(KeyError::NotAString));
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
}
