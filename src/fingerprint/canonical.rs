//! Canonical JSON for fingerprints: two bodies that hold the same JSON value (whatever their
//! key order, whitespace, string escapes or number spelling) get the same digest.
//!
//! The text hashed is RFC 8785's (JCS) canonical form: members sorted by their UTF-16 code
//! units, no whitespace, strings with RFC 8785's minimal escapes, non-integers written as
//! ECMAScript writes doubles. One deliberate difference: numbers are compared exactly, never
//! rounded to a double first, so two payment amounts that differ in their last digit never
//! share a fingerprint. An integer that fits 64 bits is written with all its digits (RFC 8785
//! would round it beyond 2^53); a body holding a number that a double cannot keep exactly (an
//! integer past 64 bits, a decimal with more digits than the shortest spelling of its double,
//! such as RFC 8785's own `333333333.33333329`) is not canonicalized at all but fingerprinted
//! byte for byte (see `number`). `serde_json::Value` cannot hold such a number without
//! `serde_json`'s `arbitrary_precision`, a feature that would change every `Value` in the
//! application using this crate (features are unified); and no double-based JSON writer sends
//! one, so the cost is a 409 for a retry that re-spells such a body, never a replay for
//! another value. Doubles are read correctly rounded (`serde_json`'s `float_roundtrip`).
//!
//! Written here rather than taken from `serde_json_canonicalizer` or `serde_jcs`: both write
//! a `serde_json::Value`, which has already merged duplicate keys, and both round every
//! number to a double; what is ours (refusing duplicates, exact numbers, hashing without a
//! second copy of the body) would be most of the code anyway.
//!
//! Pure logic: no tower or tokio in here. Nesting is bounded by `serde_json`'s recursion limit
//! (128): a deeper body is "not JSON" and fingerprinted by its bytes, never a stack overflow.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use crate::fingerprint::digest::FieldHasher;

mod number;

/// Parses one JSON text into a value; `None` when the bytes are not JSON, nest deeper than
/// `serde_json` allows, hold an object with a repeated member name (parsers disagree on
/// which one counts), or hold a number a double would merge with its neighbours (see
/// [`number`]): such a body is only ever equal to itself, byte for byte.
pub(crate) fn parse(body: &[u8]) -> Option<Value> {
    let value = serde_json::from_slice::<Unique>(body).ok()?.0;
    number::all_exact(body).then_some(value)
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
        Value::Number(number) => number::write(number, out),
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

    /// What the fingerprint compares for `body`: its canonical text, or its bytes.
    fn compared(body: &str) -> String {
        canonical(body).map_or_else(|| format!("bytes {body}"), |text| format!("json {text}"))
    }

    /// RFC 8785 §3.2.2's sample object and, in §3.2.3, its canonical form.
    const RFC_SAMPLE: &str = r#"{
      "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
      "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
      "literals": [null, true, false]
    }"#;
    const RFC_SAMPLE_CANONICAL: &str = "{\"literals\":[null,true,false],\"numbers\":[333333333.3333333,1e+30,4.5,0.002,1e-27],\"string\":\"\u{20ac}$\\u000f\\nA'B\\\"\\\\\\\\\\\"/\"}";

    #[test]
    fn rfc_8785_sample_canonicalizes_as_the_rfc_shows() {
        // The sample's first number is spelled with more digits than its double keeps
        // (333333333.33333329 is not 333333333.3333333, the double's shortest spelling): RFC
        // 8785 rounds it, this crate compares it exactly, so the sample as written is compared
        // byte for byte (see the module docs). Spelled as a double-based writer sends it, the
        // sample canonicalizes exactly as the RFC shows; and the RFC's output is canonical.
        assert_eq!(canonical(RFC_SAMPLE), None);
        let shortest = RFC_SAMPLE.replace("333333333.33333329", "333333333.3333333");
        assert_eq!(canonical(&shortest).as_deref(), Some(RFC_SAMPLE_CANONICAL));
        assert_eq!(
            canonical(RFC_SAMPLE_CANONICAL).as_deref(),
            Some(RFC_SAMPLE_CANONICAL)
        );
    }

    #[test]
    fn rfc_8785_appendix_b_numbers_are_written_as_the_rfc_shows() {
        // RFC 8785 Appendix B: IEEE 754 bits, and the JSON text ECMAScript writes for them.
        let vectors: [(u64, &str); 24] = [
            (0x0000000000000000, "0"),
            (0x8000000000000000, "0"),
            (0x0000000000000001, "5e-324"),
            (0x8000000000000001, "-5e-324"),
            (0x7fefffffffffffff, "1.7976931348623157e+308"),
            (0xffefffffffffffff, "-1.7976931348623157e+308"),
            (0x4340000000000000, "9007199254740992"),
            (0xc340000000000000, "-9007199254740992"),
            (0x4430000000000000, "295147905179352830000"),
            (0x44b52d02c7e14af5, "9.999999999999997e+22"),
            (0x44b52d02c7e14af6, "1e+23"),
            (0x44b52d02c7e14af7, "1.0000000000000001e+23"),
            (0x444b1ae4d6e2ef4e, "999999999999999700000"),
            (0x444b1ae4d6e2ef4f, "999999999999999900000"),
            (0x444b1ae4d6e2ef50, "1e+21"),
            (0x3eb0c6f7a0b5ed8c, "9.999999999999997e-7"),
            (0x3eb0c6f7a0b5ed8d, "0.000001"),
            (0x41b3de4355555553, "333333333.3333332"),
            (0x41b3de4355555554, "333333333.33333325"),
            (0x41b3de4355555555, "333333333.3333333"),
            (0x41b3de4355555556, "333333333.3333334"),
            (0x41b3de4355555557, "333333333.33333343"),
            (0xbecbf647612f3696, "-0.0000033333333333333333"),
            (0x43143ff3c1cb0959, "1424953923781206.2"),
        ];
        for (bits, expected) in vectors {
            let double = f64::from_bits(bits);
            let mut written = Vec::new();
            number::write_double(double, &mut written);
            assert_eq!(String::from_utf8_lossy(&written), expected, "{bits:#018x}");
            // Sent as JSON, the text is read back as that double and written the same way.
            assert_eq!(
                canonical(expected).as_deref(),
                Some(expected),
                "{bits:#018x}"
            );
            assert_eq!(expected.parse::<f64>().map(f64::abs), Ok(double.abs()));
        }
        // Appendix B's NaN (0x7fffffffffffffff) and Infinity (0x7ff0000000000000) have no
        // JSON text: nothing that reads as them is JSON.
        for not_finite in ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"] {
            assert_eq!(canonical(not_finite), None, "{not_finite}");
        }
    }

    #[test]
    fn numbers_are_compared_exactly_never_through_a_double() {
        // (a, b, same value): two bodies with different values never share what is compared;
        // two spellings of one value a double keeps exactly share it.
        let cases = [
            (
                r#"{"amount":18446744073709551616}"#,
                r#"{"amount":18446744073709551617}"#,
                false,
            ),
            (
                r#"{"amount":-9223372036854775809}"#,
                r#"{"amount":-9223372036854775810}"#,
                false,
            ),
            (
                r#"{"id":123456789012345678901234567890}"#,
                r#"{"id":123456789012345678901234567891}"#,
                false,
            ),
            ("1.0000000000000001e+23", "1e+23", false),
            ("0.10000000000000000001", "0.1", false),
            ("0.1000000000000000055511151231257827", "0.1", false),
            ("1424953923781206.25", "1424953923781206.2", false),
            ("333333333.33333329", "333333333.3333333", false),
            ("9007199254740993", "9007199254740992", false),
            ("9007199254740993.0", "9007199254740992", false),
            ("100", "1E2", true),
            ("100", "100.000", true),
            ("4.50", "4.5", true),
            ("0.002", "2e-3", true),
            ("0", "-0", true),
            ("0", "0e999999999999999999999", true),
            ("100000000000000000000", "1e20", true),
            ("1e+23", "1E23", true),
        ];
        for (a, b, same) in cases {
            assert_eq!(compared(a) == compared(b), same, "{a} vs {b}");
            let (a, b) = (format!("[{a}, \"x\"]"), format!("[{b},\"x\"]"));
            assert_eq!(compared(&a) == compared(&b), same, "{a} vs {b}");
        }
        // Digits inside strings are not numbers.
        assert!(canonical(r#"{"a":"18446744073709551616.33333333333333333"}"#).is_some());
        assert!(canonical(r#"{"a\"1e99999":1}"#).is_some());
    }

    proptest::proptest! {
        #[test]
        fn every_double_is_written_once_and_read_back_as_itself(bits in proptest::num::u64::ANY) {
            let double = f64::from_bits(bits);
            proptest::prop_assume!(double.is_finite());
            let mut written = Vec::new();
            number::write_double(double, &mut written);
            let text = String::from_utf8(written).unwrap();
            proptest::prop_assert_eq!(text.parse::<f64>().map(f64::abs), Ok(double.abs()));
            proptest::prop_assert_eq!(canonical(&text), Some(text.clone()));
        }
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
