//! JSON-RPC 2.0 (MCP tool calls): a retry carries a new `id`, so the fingerprint leaves the
//! request's `id` out and a replay answers with the retry's `id`.
//!
//! Only a single request object is treated so. A batch (an array) keeps its ids in the
//! fingerprint, so a batch is replayed only to a retry with the same ids, byte for byte.
//! A notification (no `id`) has no id to leave out, and its fingerprint says so: it never
//! shares a record with a request.
//!
//! Pure logic: no tower or tokio in here.

use std::{fmt, ops::Range};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, header};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{Value, value::RawValue};

/// Blanks a top-level `id` that is a string, a number or null (what JSON-RPC allows), so that
/// retries with new ids share a fingerprint; the member itself stays, so a request is never
/// taken for a notification.
pub(crate) fn blank_id(value: &mut Value) {
    if let Value::Object(map) = value
        && let Some(id) = map.get_mut("id")
        && matches!(id, Value::String(_) | Value::Number(_) | Value::Null)
    {
        *id = Value::Null;
    }
}

/// The response body for a replay to `retry`: `stored` with the value of its top-level `id`
/// replaced by the retry's `id`, as the retry wrote it, and `Content-Length` (if the stored
/// response has one) set to the new length.
///
/// `stored` is returned as it is (no copy) unless both it and `retry` are JSON objects with
/// one top-level `id` each that is a string, number or null, and the two differ.
pub(crate) fn with_retry_id(stored: Bytes, retry: &[u8], headers: &mut HeaderMap) -> Bytes {
    let Some(new) = id_span(retry).and_then(|span| retry.get(span)) else {
        return stored;
    };
    let Some(old) = id_span(&stored) else {
        return stored;
    };
    let Some(old_text) = stored.get(old.clone()) else {
        return stored;
    };
    if old_text == new {
        return stored;
    }
    let mut body = Vec::with_capacity(stored.len() - old.len() + new.len());
    body.extend_from_slice(&stored[..old.start]);
    body.extend_from_slice(new);
    body.extend_from_slice(&stored[old.end..]);
    if headers.contains_key(header::CONTENT_LENGTH) {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    Bytes::from(body)
}

/// Where the value of the top-level `id` member is in `body`, if `body` is one JSON object
/// with exactly one `id` member whose value is a string, a number or null.
pub(crate) fn id_span(body: &[u8]) -> Option<Range<usize>> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let raw = TopLevelId.deserialize(&mut deserializer).ok()??;
    deserializer.end().ok()?;
    let text = raw.get();
    let first = *text.as_bytes().first()?;
    if !(first == b'"' || first == b'-' || first.is_ascii_digit() || text == "null") {
        return None;
    }
    // `raw` borrows from `body`: its offset is where it starts.
    let start = (text.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    let span = start..start + text.len();
    (body.get(span.clone())? == text.as_bytes()).then_some(span)
}

/// Finds the raw value of a top-level object's `id`, refusing a repeated one.
struct TopLevelId;

impl<'de> DeserializeSeed<'de> for TopLevelId {
    type Value = Option<&'de RawValue>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TopLevelId {
    type Value = Option<&'de RawValue>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON-RPC object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
        let mut id = None;
        while let Some(is_id) = access.next_key_seed(IsId)? {
            if !is_id {
                access.next_value::<IgnoredAny>()?;
            } else if id.replace(access.next_value::<&RawValue>()?).is_some() {
                return Err(de::Error::custom("a repeated id"));
            }
        }
        Ok(id)
    }
}

/// Whether a member name (after unescaping) is `id`.
struct IsId;

impl<'de> DeserializeSeed<'de> for IsId {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for IsId {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a member name")
    }

    fn visit_str<E>(self, name: &str) -> Result<bool, E> {
        Ok(name == "id")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id_text(body: &str) -> Option<&str> {
        id_span(body.as_bytes()).map(|span| &body[span])
    }

    #[test]
    fn the_top_level_id_is_found_where_it_is_written() {
        let cases = [
            (r#"{"jsonrpc":"2.0","id":1,"result":{}}"#, Some("1")),
            (
                r#"{"jsonrpc":"2.0","result":{"id":"inner"},"id":"a-1"}"#,
                Some(r#""a-1""#),
            ),
            (r#"{ "id" :  -2.5e3 , "x":[{"id":9}]}"#, Some("-2.5e3")),
            (r#"{"id":null,"error":{"code":-32700}}"#, Some("null")),
            (r#"{"\u0069d":"escaped-name"}"#, Some(r#""escaped-name""#)),
            (
                r#"{"id":"with \"quotes\" and \\ "}"#,
                Some(r#""with \"quotes\" and \\ ""#),
            ),
            ("\n{\"id\":7}\n", Some("7")),
            (r#"{"result":{"id":1}}"#, None),
            (r#"{"id":{"nested":1}}"#, None),
            (r#"{"id":[1]}"#, None),
            (r#"{"id":true}"#, None),
            (r#"{"id":1,"id":2}"#, None),
            (r#"[{"id":1}]"#, None),
            (r#"{"id":1} trailing"#, None),
            (r#"{"id":1"#, None),
            ("event: message\ndata: {\"id\":1}\n\n", None),
            ("", None),
        ];
        for (body, expected) in cases {
            assert_eq!(id_text(body), expected, "{body}");
        }
    }

    #[test]
    fn a_deeply_nested_body_is_skipped_without_overflowing_the_stack() {
        // serde_json skips ignored values without recursing.
        let deep = format!(
            r#"{{"id":1,"x":{}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(id_text(&deep), Some("1"));
        let unclosed = format!(r#"{{"id":1,"x":{}}}"#, "[".repeat(100_000));
        assert_eq!(id_text(&unclosed), None);
    }

    fn rewrite(stored: &str, retry: &str, content_length: bool) -> (String, Option<String>) {
        let mut headers = HeaderMap::new();
        if content_length {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(stored.len()));
        }
        let body = with_retry_id(
            Bytes::from(stored.to_owned()),
            retry.as_bytes(),
            &mut headers,
        );
        let length = headers
            .get(header::CONTENT_LENGTH)
            .map(|v| v.to_str().unwrap().to_owned());
        (String::from_utf8(body.to_vec()).unwrap(), length)
    }

    #[test]
    fn a_replay_answers_with_the_retrys_id_and_nothing_else_changes() {
        let stored = r#"{"jsonrpc":"2.0", "id": 1 ,"result":{"id":1,"content":[{"type":"text","text":"sent"}]}}"#;
        let cases = [
            (
                r#"{"jsonrpc":"2.0","id":2,"method":"tools/call"}"#,
                r#"{"jsonrpc":"2.0", "id": 2 ,"result":{"id":1,"content":[{"type":"text","text":"sent"}]}}"#,
            ),
            (
                r#"{"id":"req-\u00e9","method":"tools/call"}"#,
                r#"{"jsonrpc":"2.0", "id": "req-\u00e9" ,"result":{"id":1,"content":[{"type":"text","text":"sent"}]}}"#,
            ),
            (
                r#"{"method":"tools/call","id":null}"#,
                r#"{"jsonrpc":"2.0", "id": null ,"result":{"id":1,"content":[{"type":"text","text":"sent"}]}}"#,
            ),
            (
                r#"{"id":1.50,"method":"tools/call"}"#,
                r#"{"jsonrpc":"2.0", "id": 1.50 ,"result":{"id":1,"content":[{"type":"text","text":"sent"}]}}"#,
            ),
            // Nothing to answer with: the stored body is replayed as it is.
            (r#"{"method":"notifications/x"}"#, stored),
            (r#"{"id":{"x":1},"method":"m"}"#, stored),
            (r#"[{"id":2,"method":"m"}]"#, stored),
            ("not json", stored),
        ];
        for (retry, expected) in cases {
            let (body, length) = rewrite(stored, retry, true);
            assert_eq!(body, expected, "retry {retry}");
            assert_eq!(length, Some(body.len().to_string()), "retry {retry}");
            let (body, length) = rewrite(stored, retry, false);
            assert_eq!(body, expected, "retry {retry}");
            assert_eq!(length, None, "no Content-Length is added");
        }
    }

    #[test]
    fn stored_bodies_without_one_top_level_id_are_replayed_as_they_are() {
        let retry = r#"{"jsonrpc":"2.0","id":9,"method":"tools/call"}"#;
        for stored in [
            "",
            "plain text",
            r#"[{"jsonrpc":"2.0","id":1,"result":{}}]"#,
            r#"{"jsonrpc":"2.0","result":{"id":1}}"#,
            r#"{"id":1,"id":2}"#,
            "event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":1}\n\n",
        ] {
            assert_eq!(rewrite(stored, retry, true).0, stored);
        }
    }

    #[test]
    fn an_unchanged_id_costs_no_copy() {
        let stored = Bytes::from_static(br#"{"id":5,"result":1}"#);
        let body = with_retry_id(stored.clone(), br#"{"id":5}"#, &mut HeaderMap::new());
        assert_eq!(body.as_ptr(), stored.as_ptr());
    }

    #[test]
    fn blanking_keeps_the_member_and_skips_ids_json_rpc_does_not_allow() {
        let cases = [
            (r#"{"id":7,"m":1}"#, r#"{"id":null,"m":1}"#),
            (r#"{"id":"x"}"#, r#"{"id":null}"#),
            (r#"{"id":null}"#, r#"{"id":null}"#),
            (r#"{"m":1}"#, r#"{"m":1}"#),
            (r#"{"id":{"a":1}}"#, r#"{"id":{"a":1}}"#),
            (r#"[{"id":1}]"#, r#"[{"id":1}]"#),
        ];
        for (input, expected) in cases {
            let mut value: Value = serde_json::from_str(input).unwrap();
            blank_id(&mut value);
            assert_eq!(
                value,
                serde_json::from_str::<Value>(expected).unwrap(),
                "{input}"
            );
        }
    }
}
