//! Reads the top-level members of a JSON-RPC message (or of each message of a batch) without
//! building a tree: its version, its method, where its `id` is, and whether it carries a
//! `result` or an `error`.
//!
//! A member name is compared after unescaping (`"\u0069d"` is `id`), as the server's own
//! parser will; a repeated member makes the whole body unreadable, never one reading or the
//! other.

use std::{borrow::Cow, fmt, ops::Range};

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// The top-level members of one JSON object that tell what JSON-RPC message it is.
#[derive(Debug, Default)]
pub(crate) struct Members<'a> {
    /// `"jsonrpc": "2.0"`, exactly.
    pub(crate) version_2: bool,
    pub(crate) method: Option<Cow<'a, str>>,
    /// The raw text of `id`, whatever its type.
    pub(crate) id: Option<&'a RawValue>,
    pub(crate) result: bool,
    pub(crate) error: bool,
}

impl Members<'_> {
    /// A JSON-RPC 2.0 response: a `result` or an `error`, and no `method`.
    pub(crate) fn is_response(&self) -> bool {
        self.version_2 && self.method.is_none() && (self.result || self.error)
    }
}

/// A body read as JSON-RPC: one object, or a batch (an array of objects).
#[derive(Debug)]
pub(crate) enum Scanned<'a> {
    One(Members<'a>),
    Batch(Vec<Members<'a>>),
}

/// Reads `body` as one JSON object or an array of them; `None` if it is anything else, is
/// not JSON, or repeats a member that tells a message apart.
pub(crate) fn scan(body: &[u8]) -> Option<Scanned<'_>> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let scanned = Body.deserialize(&mut deserializer).ok()?;
    deserializer.end().ok()?;
    Some(scanned)
}

/// Reads `body` as one JSON object; `None` for anything else.
pub(crate) fn scan_one(body: &[u8]) -> Option<Members<'_>> {
    match scan(body)? {
        Scanned::One(members) => Some(members),
        Scanned::Batch(_) => None,
    }
}

/// Where `raw` (borrowed from `body`) is in `body`, if it is an id JSON-RPC allows: a string,
/// a number or null.
pub(crate) fn id_span(body: &[u8], raw: &RawValue) -> Option<Range<usize>> {
    let text = raw.get();
    let first = *text.as_bytes().first()?;
    if !(first == b'"' || first == b'-' || first.is_ascii_digit() || text == "null") {
        return None;
    }
    let start = (text.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    let span = start..start + text.len();
    (body.get(span.clone())? == text.as_bytes()).then_some(span)
}

struct Body;

impl<'de> DeserializeSeed<'de> for Body {
    type Value = Scanned<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Body {
    type Value = Scanned<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON-RPC message or batch")
    }

    fn visit_map<A: MapAccess<'de>>(self, access: A) -> Result<Self::Value, A::Error> {
        Object.visit_map(access).map(Scanned::One)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
        let mut batch = Vec::new();
        while let Some(members) = access.next_element_seed(Object)? {
            batch.push(members);
        }
        Ok(Scanned::Batch(batch))
    }
}

/// One object's members.
struct Object;

impl<'de> DeserializeSeed<'de> for Object {
    type Value = Members<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Object {
    type Value = Members<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON-RPC object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
        let mut members = Members::default();
        let (mut version, mut result, mut error) = (None, false, false);
        while let Some(name) = access.next_key_seed(NameOf)? {
            let repeated = match name {
                Name::JsonRpc => version.replace(access.next_value_seed(Text)?).is_some(),
                Name::Method => members
                    .method
                    .replace(access.next_value_seed(Text)?)
                    .is_some(),
                Name::Id => members.id.replace(access.next_value()?).is_some(),
                Name::Result => std::mem::replace(&mut result, true) | skip(&mut access)?,
                Name::Error => std::mem::replace(&mut error, true) | skip(&mut access)?,
                Name::Other => skip(&mut access)?,
            };
            if repeated {
                return Err(de::Error::custom("a repeated member"));
            }
        }
        members.version_2 = version.as_deref() == Some("2.0");
        (members.result, members.error) = (result, error);
        Ok(members)
    }
}

/// Skips a member's value (serde_json skips without recursing); never "repeated".
fn skip<'de, A: MapAccess<'de>>(access: &mut A) -> Result<bool, A::Error> {
    access.next_value::<IgnoredAny>()?;
    Ok(false)
}

/// The member names that tell a JSON-RPC message apart.
enum Name {
    JsonRpc,
    Method,
    Id,
    Result,
    Error,
    Other,
}

struct NameOf;

impl<'de> DeserializeSeed<'de> for NameOf {
    type Value = Name;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Name, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for NameOf {
    type Value = Name;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a member name")
    }

    fn visit_str<E>(self, name: &str) -> Result<Name, E> {
        Ok(match name {
            "jsonrpc" => Name::JsonRpc,
            "method" => Name::Method,
            "id" => Name::Id,
            "result" => Name::Result,
            "error" => Name::Error,
            _ => Name::Other,
        })
    }
}

/// A string value, borrowed unless it has escapes; anything else is an error.
struct Text;

impl<'de> DeserializeSeed<'de> for Text {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Text {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(text))
    }

    fn visit_str<E>(self, text: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(text.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (version 2.0, method, raw id, result, error)
    type Read = (bool, Option<String>, Option<String>, bool, bool);

    fn one(body: &str) -> Option<Read> {
        let members = scan_one(body.as_bytes())?;
        Some((
            members.version_2,
            members.method.map(Cow::into_owned),
            members.id.map(|raw| raw.get().to_owned()),
            members.result,
            members.error,
        ))
    }

    #[test]
    fn the_members_that_tell_a_message_apart_are_read_as_a_json_parser_reads_them() {
        let s = |text: &str| Some(text.to_owned());
        let cases = [
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"id":9}}"#,
                Some((true, s("tools/call"), s("1"), false, false)),
            ),
            (
                r#"{"\u006aeonrpc":"2.0","jsonrpc":"2.0","m\u0065thod":"tools\/call","id":"a"}"#,
                Some((true, s("tools/call"), s(r#""a""#), false, false)),
            ),
            (
                r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700}}"#,
                Some((true, None, s("null"), false, true)),
            ),
            (
                r#"{"result":{"method":"x"},"id":{"a":1},"jsonrpc":"2.0"}"#,
                Some((true, None, s(r#"{"a":1}"#), true, false)),
            ),
            (
                r#"{"jsonrpc":"1.0","method":"m"}"#,
                Some((false, s("m"), None, false, false)),
            ),
            (
                r#"{"id":"order-1"}"#,
                Some((false, None, s(r#""order-1""#), false, false)),
            ),
            // Unreadable: a repeated member, a method or version that is not a string.
            (r#"{"jsonrpc":"2.0","method":"a","method":"b"}"#, None),
            (r#"{"jsonrpc":"2.0","id":1,"id":2}"#, None),
            (r#"{"jsonrpc":"2.0","result":1,"result":2}"#, None),
            (r#"{"jsonrpc":2.0,"method":"m"}"#, None),
            (r#"{"jsonrpc":"2.0","method":["tools/call"]}"#, None),
            (r#"{"jsonrpc":"2.0","method":"m"} trailing"#, None),
            (r#"[{"jsonrpc":"2.0","method":"m"}]"#, None),
            ("event: message\ndata: {}\n\n", None),
            ("", None),
        ];
        for (body, expected) in cases {
            assert_eq!(one(body), expected, "{body}");
        }
    }

    #[test]
    fn a_batch_is_read_message_by_message() {
        let body = br#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"tools/call"}]"#;
        let Some(Scanned::Batch(batch)) = scan(body) else {
            panic!("a batch")
        };
        let methods: Vec<_> = batch.iter().map(|m| m.method.as_deref()).collect();
        assert_eq!(methods, [Some("ping"), Some("tools/call")]);
        for unreadable in [&br#"[1]"#[..], br#"[{"method":"a","method":"b"}]"#, b"[{}"] {
            assert!(scan(unreadable).is_none());
        }
    }

    #[test]
    fn ids_json_rpc_does_not_allow_have_no_span() {
        for (body, span) in [
            (r#"{"id":1}"#, Some("1")),
            (r#"{"id":-2.5e3}"#, Some("-2.5e3")),
            (r#"{"id":"x"}"#, Some(r#""x""#)),
            (r#"{"id":null}"#, Some("null")),
            (r#"{"id":true}"#, None),
            (r#"{"id":{"a":1}}"#, None),
            (r#"{"id":[1]}"#, None),
        ] {
            let members = scan_one(body.as_bytes()).expect("an object");
            let found = members
                .id
                .and_then(|raw| id_span(body.as_bytes(), raw))
                .map(|range| &body[range]);
            assert_eq!(found, span, "{body}");
        }
    }

    #[test]
    fn a_deeply_nested_body_is_skipped_without_overflowing_the_stack() {
        let deep = format!(
            r#"{{"id":1,"x":{}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert!(scan_one(deep.as_bytes()).is_some_and(|m| m.id.is_some()));
        let unclosed = format!(r#"{{"id":1,"x":{}}}"#, "[".repeat(100_000));
        assert!(scan_one(unclosed.as_bytes()).is_none());
        // A batch nested too deep to be one is unreadable, not a crash.
        let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(scan(nested.as_bytes()).is_none());
    }
}
