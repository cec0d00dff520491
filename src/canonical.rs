//! Canonical JSON for fingerprints: two bodies that hold the same JSON value (whatever their
//! key order, whitespace, string escapes or number spelling) get the same digest.
//!
//! The text hashed is RFC 8785's (JCS) canonical form: members sorted by their UTF-16 code
//! units, no whitespace, strings with RFC 8785's minimal escapes, non-integers written as
//! ECMAScript writes doubles. One deliberate difference: an integer that fits 64 bits is
//! written exactly, where RFC 8785 would round it to a double beyond 2^53 — two payment
//! amounts that differ in their last digit must not share a fingerprint.
//!
//! Written here rather than taken from `serde_json_canonicalizer` or `serde_jcs`: both write
//! a `serde_json::Value`, which has already merged duplicate keys, and both round every
//! number to a double; what is ours (refusing duplicates, exact integers, hashing without a
//! second copy of the body) would be most of the code anyway.
//!
//! Numbers are read by `serde_json`, whose fast float parsing may place a number written with
//! more than 15 significant digits one unit in the last place off the nearest double: two
//! spellings of such a number may then differ (a 409 for a retry that re-spells it, never a
//! replay for a different value). Integers and shorter decimals are exact.
//!
//! Pure logic: no tower or tokio in here. Nesting is bounded by `serde_json`'s recursion limit
//! (128): a deeper body is "not JSON" and fingerprinted by its bytes, never a stack overflow.

use std::fmt::{self, Write as _};

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use crate::digest::FieldHasher;

/// Parses one JSON text into a value; `None` when the bytes are not JSON, nest deeper than
/// `serde_json` allows, or hold an object with a repeated member name (parsers disagree on
/// which one counts, so such a body is only ever equal to itself, byte for byte).
pub(crate) fn parse(body: &[u8]) -> Option<Value> {
    serde_json::from_slice::<Unique>(body).ok().map(|u| u.0)
}

/// Removes the member or array element `pointer` (RFC 6901) names, if it is there.
pub(crate) fn exclude(value: &mut Value, pointer: &str) {
    let Some((parent, last)) = pointer.rsplit_once('/') else {
        return;
    };
    let Some(parent) = value.pointer_mut(parent) else {
        return;
    };
    let token = last.replace("~1", "/").replace("~0", "~");
    match parent {
        Value::Object(map) => {
            map.remove(&token);
        }
        Value::Array(items) => {
            let index = token.parse::<usize>().ok();
            // RFC 6901: an array index is `0` or digits without a leading zero.
            let canonical_index = token == "0" || !token.starts_with('0');
            if let Some(index) = index.filter(|&i| canonical_index && i < items.len()) {
                items.remove(index);
            }
        }
        _ => {}
    }
}

/// The SHA-256 of `value`'s canonical text.
pub(crate) fn digest(value: &Value) -> [u8; 32] {
    let mut hasher = FieldHasher::new();
    write_value(value, &mut hasher);
    hasher.finish()
}

/// Where canonical text goes: a hasher in the layer, a buffer in tests.
pub(crate) trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for FieldHasher {
    fn put(&mut self, bytes: &[u8]) {
        FieldHasher::put(self, bytes);
    }
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Writes `value`'s canonical text.
pub(crate) fn write_value(value: &Value, out: &mut impl Sink) {
    match value {
        Value::Null => out.put(b"null"),
        Value::Bool(true) => out.put(b"true"),
        Value::Bool(false) => out.put(b"false"),
        Value::Number(number) => write_number(number, out),
        Value::String(text) => write_string(text, out),
        Value::Array(items) => {
            out.put(b"[");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.put(b",");
                }
                write_value(item, out);
            }
            out.put(b"]");
        }
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.sort_unstable_by(|(a, _), (b, _)| a.encode_utf16().cmp(b.encode_utf16()));
            out.put(b"{");
            for (i, (name, member)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.put(b",");
                }
                write_string(name, out);
                out.put(b":");
                write_value(member, out);
            }
            out.put(b"}");
        }
    }
}

/// RFC 8785 §3.2.2.2: only `"`, `\` and control characters are escaped, the common ones by
/// their short forms, the rest as `\u00xx` in lowercase.
fn write_string(text: &str, out: &mut impl Sink) {
    out.put(b"\"");
    let bytes = text.as_bytes();
    let mut start = 0;
    for (i, &byte) in bytes.iter().enumerate() {
        let short: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            0x0c => b"\\f",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.put(&bytes[start..i]);
        if short.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.put(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 0x0f)],
            ]);
        } else {
            out.put(short);
        }
        start = i + 1;
    }
    out.put(&bytes[start..]);
    out.put(b"\"");
}

fn write_number(number: &Number, out: &mut impl Sink) {
    let mut text = StackText::default();
    if let Some(n) = number.as_u64() {
        let _ = write!(text, "{n}");
    } else if let Some(n) = number.as_i64() {
        let _ = write!(text, "{n}");
    } else if let Some(n) = number.as_f64() {
        return write_double(n, out);
    }
    out.put(text.as_bytes());
}

/// ECMAScript's `Number.prototype.toString` for a finite double (ECMA-262 §6.1.6.1.20), as
/// RFC 8785 §3.2.2.3 requires: the shortest digits that round-trip, placed by the exponent.
fn write_double(n: f64, out: &mut impl Sink) {
    if n == 0.0 {
        // Both zeros.
        return out.put(b"0");
    }
    // Rust's `{:e}` gives the shortest round-tripping digits: "1.2345e-7", "5e-324".
    let mut scientific = StackText::default();
    let _ = write!(scientific, "{:e}", n.abs());
    let text = scientific.as_bytes();
    let Some(e_at) = text.iter().position(|&b| b == b'e') else {
        return;
    };
    let Some(exponent) = std::str::from_utf8(&text[e_at + 1..])
        .ok()
        .and_then(|e| e.parse::<i32>().ok())
    else {
        return;
    };
    let mut digits = StackText::default();
    for &b in text[..e_at].iter().filter(|b| b.is_ascii_digit()) {
        digits.push(&[b]);
    }
    let digits = digits.as_bytes();
    let k = digits.len() as i32;
    // The value is 0.d1d2…dk × 10^n.
    let n_exp = exponent + 1;
    let mut text = StackText::default();
    if n.is_sign_negative() {
        text.push(b"-");
    }
    if k <= n_exp && n_exp <= 21 {
        text.push(digits);
        (k..n_exp).for_each(|_| text.push(b"0"));
    } else if 0 < n_exp && n_exp <= 21 {
        let (whole, fraction) = digits.split_at(n_exp as usize);
        text.push(whole);
        text.push(b".");
        text.push(fraction);
    } else if -6 < n_exp && n_exp <= 0 {
        text.push(b"0.");
        (n_exp..0).for_each(|_| text.push(b"0"));
        text.push(digits);
    } else {
        text.push(&digits[..1]);
        if k > 1 {
            text.push(b".");
            text.push(&digits[1..]);
        }
        text.push(if n_exp > 0 { b"e+" } else { b"e-" });
        let _ = write!(text, "{}", (n_exp - 1).unsigned_abs());
    }
    out.put(text.as_bytes());
}

/// A short text built on the stack: numbers are at most 25 bytes long, so a bigger one is a
/// bug and is cut rather than allowed to panic.
struct StackText {
    bytes: [u8; 40],
    len: usize,
}

impl Default for StackText {
    fn default() -> Self {
        Self {
            bytes: [0; 40],
            len: 0,
        }
    }
}

impl StackText {
    fn push(&mut self, bytes: &[u8]) {
        let room = self.bytes.len() - self.len;
        let take = bytes.len().min(room);
        self.bytes[self.len..self.len + take].copy_from_slice(&bytes[..take]);
        self.len += take;
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl fmt::Write for StackText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push(s.as_bytes());
        Ok(())
    }
}

/// A JSON value whose objects had no repeated member names.
struct Unique(Value);

impl<'de> Deserialize<'de> for Unique {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(UniqueVisitor).map(Unique)
    }
}

struct UniqueVisitor;

impl<'de> Visitor<'de> for UniqueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value without repeated member names")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number that is not finite"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(Unique(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        while let Some(name) = access.next_key::<String>()? {
            let Unique(member) = access.next_value()?;
            if map.insert(name, member).is_some() {
                return Err(de::Error::custom("a repeated member name"));
            }
        }
        Ok(Value::Object(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canonical(json: &str) -> Option<String> {
        let value = parse(json.as_bytes())?;
        let mut out = Vec::new();
        write_value(&value, &mut out);
        Some(String::from_utf8(out).expect("canonical text is UTF-8"))
    }

    #[test]
    fn rfc_8785_sample_canonicalizes_as_the_rfc_shows() {
        // RFC 8785 §3.2.3's input and output, but for the first number's spelling: serde_json's
        // fast float parsing reads the RFC's 17-digit "333333333.33333329" one unit in the
        // last place off (see the module docs).
        let input = r#"{
          "numbers": [333333333.3333333, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
          "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
          "literals": [null, true, false]
        }"#;
        assert_eq!(
            canonical(input).unwrap(),
            "{\"literals\":[null,true,false],\"numbers\":[333333333.3333333,1e+30,4.5,0.002,1e-27],\"string\":\"\u{20ac}$\\u000f\\nA'B\\\"\\\\\\\\\\\"/\"}"
        );
    }

    #[test]
    fn members_are_sorted_by_utf16_code_units() {
        // RFC 8785 §3.2.3's sorting example: U+1F600 sorts before U+FB33 in UTF-16 (its
        // surrogates start with 0xD8), after it by code point.
        let input = r#"{"\u20ac":"Euro Sign","\r":"Carriage Return","\ufb33":"Hebrew Letter Dalet With Dagesh","1":"One","\ud83d\ude00":"Emoji: Grinning Face","\u0080":"Control","\u00f6":"Latin Small Letter O With Diaeresis"}"#;
        let value = parse(input.as_bytes()).unwrap();
        let mut out = Vec::new();
        write_value(&value, &mut out);
        let text = String::from_utf8(out).unwrap();
        let order: Vec<usize> = [
            "Carriage Return",
            "One",
            "Control",
            "Latin Small",
            "Euro Sign",
            "Emoji",
            "Hebrew",
        ]
        .iter()
        .map(|name| text.find(name).unwrap())
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
    }

    #[test]
    fn numbers_are_written_as_ecmascript_writes_them() {
        let cases = [
            ("0", "0"),
            ("-0", "0"),
            ("-0.0", "0"),
            ("1", "1"),
            ("1.0", "1"),
            ("1e0", "1"),
            ("100", "100"),
            ("1e2", "100"),
            ("-1.5", "-1.5"),
            ("0.1", "0.1"),
            ("0.000001", "0.000001"),
            ("0.0000001", "1e-7"),
            ("1e-7", "1e-7"),
            ("1.2345678901234568e20", "123456789012345680000"),
            ("1e20", "100000000000000000000"),
            ("1e21", "1e+21"),
            ("1.5e300", "1.5e+300"),
            ("5e-324", "5e-324"),
            ("1.7976931348623157e308", "1.7976931348623157e+308"),
            ("-9007199254740991", "-9007199254740991"),
            // Exact integers, unlike RFC 8785 (which would write 9007199254740992 for both).
            ("9007199254740993", "9007199254740993"),
            ("18446744073709551615", "18446744073709551615"),
            ("-9223372036854775808", "-9223372036854775808"),
        ];
        for (input, expected) in cases {
            assert_eq!(canonical(input).as_deref(), Some(expected), "{input}");
        }
    }

    #[test]
    fn strings_keep_only_the_escapes_rfc_8785_keeps() {
        let cases = [
            (r#""caf\u00e9""#, "\"caf\u{e9}\""),
            ("\"caf\u{e9}\"", "\"caf\u{e9}\""),
            (r#""\/""#, "\"/\""),
            (r#""\u001f\u0000\b\f\n\r\t""#, r#""\u001f\u0000\b\f\n\r\t""#),
            (r#""\u007f""#, "\"\u{7f}\""),
            (r#""q\"b\\""#, r#""q\"b\\""#),
            (r#""\ud83d\ude00""#, "\"\u{1f600}\""),
        ];
        for (input, expected) in cases {
            assert_eq!(canonical(input).as_deref(), Some(expected), "{input}");
        }
    }

    #[test]
    fn equal_values_are_equal_and_different_values_differ() {
        let same = [
            (
                r#"{"a":1,"b":[1,2]}"#,
                " {\n \"b\" : [ 1 , 2.0 ] ,\t\"a\": 1e0 }\n",
            ),
            (r#"{"name":"é"}"#, r#"{"n\u0061me":"\u00e9"}"#),
            (
                r#"{"x":{"z":null,"y":true}}"#,
                r#"{"x":{"y":true,"z":null}}"#,
            ),
        ];
        for (a, b) in same {
            assert_eq!(canonical(a), canonical(b), "{a} vs {b}");
        }
        let different = [
            (r#"{"a":1}"#, r#"{"a":"1"}"#),
            (r#"{"a":1}"#, r#"{"a":2}"#),
            (r#"[1,2]"#, r#"[2,1]"#),
            (r#"{"a":null}"#, r#"{}"#),
            (r#"{"a":true}"#, r#"{"a":1}"#),
            (r#"{"a":9007199254740993}"#, r#"{"a":9007199254740992}"#),
            (r#"{"a":"x"}"#, r#"{"a":"x "}"#),
        ];
        for (a, b) in different {
            assert_ne!(canonical(a), canonical(b), "{a} vs {b}");
        }
    }

    #[test]
    fn bodies_that_are_not_plain_json_are_refused() {
        let deep_ok = format!("{}{}", "[".repeat(100), "]".repeat(100));
        let too_deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let cases: [(&[u8], bool); 10] = [
            (b"", false),
            (b"not json", false),
            (b"{\"a\":1", false),
            (b"{\"a\":1} {}", false),
            (b"{\"a\":1,\"a\":2}", false),
            (b"{\"x\":{\"a\":1,\"\\u0061\":1}}", false),
            (b"\xff", false),
            (b"1e400", false),
            (deep_ok.as_bytes(), true),
            (too_deep.as_bytes(), false),
        ];
        for (input, parsed) in cases {
            let shown = String::from_utf8_lossy(&input[..input.len().min(20)]).into_owned();
            assert_eq!(parse(input).is_some(), parsed, "{shown}");
        }
    }

    #[test]
    fn exclusions_remove_what_the_pointer_names() {
        let doc = r#"{"id":"evt_1","created":1,"data":{"object":{"id":"ch_1","attempt":3}},"list":[10,20,30],"a/b":1,"m~n":2}"#;
        let cases = [
            (
                "/created",
                r#"{"a/b":1,"data":{"object":{"attempt":3,"id":"ch_1"}},"id":"evt_1","list":[10,20,30],"m~n":2}"#,
            ),
            (
                "/data/object/attempt",
                r#"{"a/b":1,"created":1,"data":{"object":{"id":"ch_1"}},"id":"evt_1","list":[10,20,30],"m~n":2}"#,
            ),
            (
                "/list/1",
                r#"{"a/b":1,"created":1,"data":{"object":{"attempt":3,"id":"ch_1"}},"id":"evt_1","list":[10,30],"m~n":2}"#,
            ),
            (
                "/a~1b",
                r#"{"created":1,"data":{"object":{"attempt":3,"id":"ch_1"}},"id":"evt_1","list":[10,20,30],"m~n":2}"#,
            ),
            (
                "/m~0n",
                r#"{"a/b":1,"created":1,"data":{"object":{"attempt":3,"id":"ch_1"}},"id":"evt_1","list":[10,20,30]}"#,
            ),
        ];
        for (pointer, expected) in cases {
            let mut value = parse(doc.as_bytes()).unwrap();
            exclude(&mut value, pointer);
            let mut out = Vec::new();
            write_value(&value, &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), expected, "{pointer}");
        }
        // Pointers that name nothing change nothing.
        let unchanged = canonical(doc).unwrap();
        for pointer in [
            "/missing",
            "/data/missing/x",
            "/list/3",
            "/list/01",
            "/list/-",
            "/id/x",
            "no-slash",
        ] {
            let mut value = parse(doc.as_bytes()).unwrap();
            exclude(&mut value, pointer);
            let mut out = Vec::new();
            write_value(&value, &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), unchanged, "{pointer}");
        }
    }

    #[test]
    fn the_digest_is_sha256_of_the_canonical_text() {
        use sha2::{Digest, Sha256};
        let value = parse(br#"{"b":2,"a":1}"#).unwrap();
        let expected: [u8; 32] = Sha256::digest(br#"{"a":1,"b":2}"#).into();
        assert_eq!(digest(&value), expected);
    }
}
