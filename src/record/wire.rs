//! A record's versioned binary encoding.
//!
//! Hand-written because it is small, ours, and must keep what generic formats lose or bloat:
//! header order, repeated names and non-UTF-8 value bytes, without base64. Decoding never
//! panics: stored bytes can be overwritten by anyone with access to the store.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::response::{Inner, Outcome};
use super::{MAX_RECORD_HEADERS, Record, RecordError};
use crate::fingerprint::Fingerprint;

/// The first bytes of every encoded record; a value that starts otherwise is not ours.
const MAGIC: &[u8; 3] = b"TIR";
/// The encoding's version; decoders refuse versions they do not know.
const VERSION: u8 = 1;

const KIND_RESPONSE: u8 = 0;
const KIND_NOT_REPLAYABLE: u8 = 1;

impl Record {
    /// Encodes the record: magic, version, kind, fingerprint, status, then LEB128
    /// length-prefixed headers, body and trailers.
    ///
    /// ```
    /// # use bytes::Bytes;
    /// # use http::{HeaderMap, Method, StatusCode, Uri};
    /// use tower_idempotency::{Fingerprint, Record};
    ///
    /// let fingerprint = Fingerprint::of(&Method::POST, &Uri::from_static("/"), b"");
    /// let record = Record::response(fingerprint, StatusCode::CREATED, &HeaderMap::new(), Bytes::from("{}"), None);
    /// let decoded = Record::decode(Bytes::from(record.encode())).unwrap();
    /// assert_eq!(decoded, record);
    /// ```
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.weight());
        out.put_slice(MAGIC);
        out.put_u8(VERSION);
        match &self.0.outcome {
            Outcome::Response {
                status,
                headers,
                body,
                trailers,
            } => {
                out.put_u8(KIND_RESPONSE);
                out.put_slice(self.0.fingerprint.as_bytes());
                out.put_u16(status.as_u16());
                put_headers(&mut out, headers);
                put_bytes(&mut out, body);
                match trailers {
                    None => out.put_u8(0),
                    Some(trailers) => {
                        out.put_u8(1);
                        put_headers(&mut out, trailers);
                    }
                }
            }
            Outcome::NotReplayable { status } => {
                out.put_u8(KIND_NOT_REPLAYABLE);
                out.put_slice(self.0.fingerprint.as_bytes());
                out.put_u16(status.as_u16());
            }
        }
        out
    }

    /// Decodes what [`encode`](Record::encode) wrote. Corrupt, truncated or unknown input is an
    /// error, never a panic: every length is checked against the bytes that are there before
    /// anything is allocated, and header counts against [`MAX_RECORD_HEADERS`]. Header values
    /// and the body share `bytes`' buffer (no copies).
    pub fn decode(mut bytes: Bytes) -> Result<Self, RecordError> {
        check_head(&bytes, MAGIC, VERSION)?;
        let input = &mut bytes;
        input.advance(MAGIC.len() + 1);
        let kind = take_u8(input)?;
        let fingerprint = Fingerprint::from_bytes(take_array(input)?);
        let status = StatusCode::from_u16(u16::from_be_bytes(take_array(input)?))
            .map_err(|_| RecordError::InvalidStatus)?;
        let outcome = match kind {
            KIND_RESPONSE => {
                let headers = take_headers(input)?;
                let body = take_len_prefixed(input)?;
                let trailers = match take_u8(input)? {
                    0 => None,
                    1 => Some(take_headers(input)?),
                    _ => return Err(RecordError::Malformed("trailer flag")),
                };
                Outcome::Response {
                    status,
                    headers,
                    body,
                    trailers,
                }
            }
            KIND_NOT_REPLAYABLE => Outcome::NotReplayable { status },
            other => return Err(RecordError::UnknownKind(other)),
        };
        if input.has_remaining() {
            return Err(RecordError::TrailingBytes);
        }
        Ok(Self(Arc::new(Inner {
            fingerprint,
            outcome,
        })))
    }
}

/// Checks the header every value this crate stores starts with: three bytes of `magic`, then
/// `version`. Records use it, and so do the values a store wraps around them (RedisStore's
/// in-flight marker and completed envelope), so that all of them tell foreign, truncated and
/// newer bytes apart alike.
///
/// Bytes shorter than the magic are [`RecordError::Truncated`]; other magic is
/// [`RecordError::BadMagic`]; magic with nothing after it is truncated; another version is
/// [`RecordError::UnsupportedVersion`].
pub(crate) fn check_head(bytes: &[u8], magic: &[u8; 3], version: u8) -> Result<(), RecordError> {
    let Some(found) = bytes.get(..magic.len()) else {
        return Err(RecordError::Truncated);
    };
    if found != magic {
        return Err(RecordError::BadMagic);
    }
    match bytes.get(magic.len()) {
        None => Err(RecordError::Truncated),
        Some(&found) if found == version => Ok(()),
        Some(&other) => Err(RecordError::UnsupportedVersion(other)),
    }
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.put_u8((n as u8) | 0x80);
        n >>= 7;
    }
    out.put_u8(n as u8);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.put_slice(bytes);
}

fn put_headers(out: &mut Vec<u8>, headers: &HeaderMap) {
    put_varint(out, headers.len() as u64);
    // HeaderMap iterates names in first-insertion order with each name's values in order:
    // appending them back in this order rebuilds an identical map.
    for (name, value) in headers {
        put_bytes(out, name.as_str().as_bytes());
        put_bytes(out, value.as_bytes());
    }
}

fn take(input: &mut Bytes, len: usize) -> Result<Bytes, RecordError> {
    if input.remaining() < len {
        return Err(RecordError::Truncated);
    }
    Ok(input.split_to(len))
}

fn take_u8(input: &mut Bytes) -> Result<u8, RecordError> {
    if !input.has_remaining() {
        return Err(RecordError::Truncated);
    }
    Ok(input.get_u8())
}

fn take_array<const N: usize>(input: &mut Bytes) -> Result<[u8; N], RecordError> {
    let bytes = take(input, N)?;
    let mut out = [0; N];
    out.copy_from_slice(&bytes);
    Ok(out)
}

fn take_varint(input: &mut Bytes) -> Result<u64, RecordError> {
    let mut n: u64 = 0;
    for shift in (0..64).step_by(7) {
        let byte = take_u8(input)?;
        let bits = u64::from(byte & 0x7f);
        if shift == 63 && bits > 1 {
            return Err(RecordError::Malformed("length"));
        }
        n |= bits << shift;
        if byte & 0x80 == 0 {
            return Ok(n);
        }
    }
    Err(RecordError::Malformed("length"))
}

fn take_len_prefixed(input: &mut Bytes) -> Result<Bytes, RecordError> {
    let len = take_varint(input)?;
    let len = usize::try_from(len).map_err(|_| RecordError::Truncated)?;
    take(input, len)
}

fn take_headers(input: &mut Bytes) -> Result<HeaderMap, RecordError> {
    let count = usize::try_from(take_varint(input)?)
        .ok()
        .filter(|count| *count <= MAX_RECORD_HEADERS)
        .ok_or(RecordError::TooManyHeaders)?;
    // Each header takes at least three bytes (two lengths and a one-byte name): the table is
    // never sized for more headers than the bytes left could hold.
    let capacity = count.min(input.remaining() / 3);
    // One spare slot: a replay adds `Idempotent-Replayed` without growing the map.
    let mut headers =
        HeaderMap::try_with_capacity(capacity + 1).map_err(|_| RecordError::TooManyHeaders)?;
    for _ in 0..count {
        let name = take_len_prefixed(input)?;
        let name = HeaderName::from_bytes(&name).map_err(|_| RecordError::InvalidHeader)?;
        let value = take_len_prefixed(input)?;
        let value =
            HeaderValue::from_maybe_shared(value).map_err(|_| RecordError::InvalidHeader)?;
        headers
            .try_append(name, value)
            .map_err(|_| RecordError::TooManyHeaders)?;
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::response::tests::{fingerprint, pairs, sample};

    #[test]
    fn the_header_check_tells_foreign_truncated_and_newer_bytes_apart() {
        let cases: [(&[u8], Result<(), RecordError>); 9] = [
            (b"", Err(RecordError::Truncated)),
            (b"T", Err(RecordError::Truncated)),
            (b"X", Err(RecordError::Truncated)),
            (b"TIR", Err(RecordError::Truncated)),
            (b"TIR\x01", Ok(())),
            (b"TIR\x01rest", Ok(())),
            (b"TIR\x02", Err(RecordError::UnsupportedVersion(2))),
            (b"TIC\x01", Err(RecordError::BadMagic)),
            (b"{\"status\":200}", Err(RecordError::BadMagic)),
        ];
        for (bytes, expected) in cases {
            assert_eq!(check_head(bytes, MAGIC, VERSION), expected, "{bytes:?}");
            if expected.is_err() {
                // The record decoder reports what the header check found.
                assert_eq!(
                    Record::decode(Bytes::copy_from_slice(bytes)).err(),
                    expected.err(),
                    "{bytes:?}"
                );
            }
        }
    }

    #[test]
    fn encode_then_decode_gives_the_same_record_in_the_same_order() {
        let record = sample();
        let decoded = Record::decode(Bytes::from(record.encode())).unwrap();
        assert_eq!(decoded, record);
        assert_eq!(
            pairs(decoded.headers().unwrap()),
            pairs(record.headers().unwrap())
        );
        assert_eq!(decoded.body(), record.body());
        assert_eq!(decoded.trailers(), record.trailers());
    }

    #[test]
    fn grpc_answers_round_trip_with_their_trailers_byte_for_byte() {
        use http::{HeaderMap, HeaderValue};

        let map = |fields: &[(&'static str, &[u8])]| {
            let mut map = HeaderMap::new();
            for (name, value) in fields {
                map.append(*name, HeaderValue::from_bytes(value).unwrap());
            }
            map
        };
        let grpc = map(&[
            ("content-type", b"application/grpc"),
            ("x-charge-id", b"ch_1"),
        ]);
        // A length-prefixed message: flag, big-endian length, protobuf bytes (any byte).
        let message = Bytes::from_static(b"\x00\x00\x00\x00\x05\x0a\x03\xffch");
        let cases: [(&str, HeaderMap, Bytes, Option<HeaderMap>); 4] = [
            (
                "OK, with repeated and binary trailing metadata",
                grpc.clone(),
                message.clone(),
                Some(map(&[
                    ("grpc-status", b"0"),
                    ("x-ledger-entry", b"debit ch_1"),
                    ("x-ledger-entry", b"credit ch_1"),
                    // `-bin` values travel as base64 (padding optional): bytes, not text.
                    ("x-receipt-bin", b"AP8KJWNoXzE"),
                    ("x-receipt-bin", b"AP8KJWNoXzE="),
                    ("x-raw", b"\xe9t\xe9 \x80"),
                ])),
            ),
            (
                "an error with a percent-encoded message, in trailers",
                grpc.clone(),
                Bytes::new(),
                Some(map(&[
                    ("grpc-status", b"3"),
                    ("grpc-message", b"amount %C3%A9 must be positive%0A"),
                ])),
            ),
            (
                "Trailers-Only: the status in the head, no body, no trailers",
                map(&[
                    ("content-type", b"application/grpc"),
                    ("grpc-status", b"6"),
                    ("grpc-message", b"exists"),
                ]),
                Bytes::new(),
                None,
            ),
            ("empty trailers", grpc, message, Some(HeaderMap::new())),
        ];
        for (what, headers, body, trailers) in cases {
            let record = Record::response(
                fingerprint(),
                StatusCode::OK,
                &headers,
                body.clone(),
                trailers.as_ref(),
            );
            let decoded = Record::decode(Bytes::from(record.encode())).expect(what);
            assert_eq!(decoded, record, "{what}");
            assert_eq!(pairs(decoded.headers().unwrap()), pairs(&headers), "{what}");
            assert_eq!(decoded.body(), Some(&body), "{what}");
            assert_eq!(
                decoded.trailers().map(pairs),
                trailers.as_ref().map(pairs),
                "{what}"
            );
        }
    }

    #[test]
    fn not_replayable_records_round_trip() {
        let record = Record::not_replayable(fingerprint(), StatusCode::OK);
        let decoded = Record::decode(Bytes::from(record.encode())).unwrap();
        assert_eq!(decoded, record);
        assert!(!decoded.is_replayable());
        assert_eq!(decoded.status(), StatusCode::OK);
        assert!(decoded.body().is_none());
    }

    #[test]
    fn corrupt_bytes_are_errors_not_panics() {
        let good = sample().encode();
        let mut bad_version = good.clone();
        bad_version[3] = 9;
        let mut bad_kind = good.clone();
        bad_kind[4] = 7;
        let mut bad_status = good.clone();
        bad_status[37..39].copy_from_slice(&1000u16.to_be_bytes());
        let mut trailing = good.clone();
        trailing.push(0);
        let mut huge_count = good[..39].to_vec();
        huge_count.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        let mut overlong_varint = good[..39].to_vec();
        overlong_varint.extend_from_slice(&[0xff; 11]);
        let mut bad_name = good[..39].to_vec();
        bad_name.extend_from_slice(&[1, 2, b'A', b' ', 0]);
        let mut bad_value = good[..39].to_vec();
        bad_value.extend_from_slice(&[1, 1, b'a', 1, b'\n']);
        let cases: Vec<(&str, Vec<u8>, RecordError)> = vec![
            ("empty", vec![], RecordError::Truncated),
            ("json", b"{\"status\":200}".to_vec(), RecordError::BadMagic),
            ("version", bad_version, RecordError::UnsupportedVersion(9)),
            ("kind", bad_kind, RecordError::UnknownKind(7)),
            ("status", bad_status, RecordError::InvalidStatus),
            ("trailing", trailing, RecordError::TrailingBytes),
            ("huge count", huge_count, RecordError::TooManyHeaders),
            (
                "overlong varint",
                overlong_varint,
                RecordError::Malformed("length"),
            ),
            ("bad name", bad_name, RecordError::InvalidHeader),
            ("bad value", bad_value, RecordError::InvalidHeader),
        ];
        for (what, bytes, expected) in cases {
            assert_eq!(
                Record::decode(Bytes::from(bytes)).err(),
                Some(expected),
                "{what}"
            );
        }
    }

    #[test]
    fn every_truncation_of_a_record_is_an_error() {
        let good = sample().encode();
        for len in 0..good.len() {
            assert!(
                Record::decode(Bytes::copy_from_slice(&good[..len])).is_err(),
                "prefix of {len} bytes decoded"
            );
        }
    }

    #[test]
    fn lengths_use_all_64_bits_and_nothing_past_them() {
        for n in [
            0,
            1,
            0x7f,
            0x80,
            300,
            u64::from(u32::MAX),
            u64::MAX >> 1,
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, n);
            assert_eq!(take_varint(&mut Bytes::from(out)), Ok(n), "{n}");
        }
        // The tenth byte holds the 64th bit alone: 0 or 1 is a length, more would be lost.
        let tenth = |last: u8, filler: u8| {
            let mut bytes = vec![filler; 9];
            bytes.push(last);
            take_varint(&mut Bytes::from(bytes))
        };
        assert_eq!(tenth(0x01, 0xff), Ok(u64::MAX));
        assert_eq!(tenth(0x00, 0x80), Ok(0));
        assert_eq!(tenth(0x01, 0x80), Ok(1 << 63));
        for last in [0x02, 0x7f] {
            assert_eq!(tenth(last, 0xff), Err(RecordError::Malformed("length")));
        }
        // An eleventh byte is never read: ten bytes hold every length.
        let mut eleven = vec![0x80; 10];
        eleven.push(0x00);
        assert_eq!(
            take_varint(&mut Bytes::from(eleven)),
            Err(RecordError::Malformed("length"))
        );
    }

    #[test]
    fn decoded_headers_leave_room_for_the_replay_marker() {
        // A replay adds `Idempotent-Replayed`: the map it starts from must not grow for it.
        for n in 0..70 {
            let record = Record::decode(Bytes::from(raw_record(n as u64, distinct_names(n))))
                .expect("a well-formed record");
            let headers = record.headers().expect("a response record");
            assert_eq!(headers.len(), n);
            assert!(
                headers.capacity() > n,
                "{n} headers, room for {}",
                headers.capacity()
            );
        }
    }

    /// The bytes of a response record with `headers` raw `(name, value)` pairs, no body and
    /// no trailers, whatever the pairs are.
    fn raw_record(count: u64, headers: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>) -> Vec<u8> {
        let mut out = sample().encode()[..39].to_vec();
        put_varint(&mut out, count);
        for (name, value) in headers {
            put_bytes(&mut out, &name);
            put_bytes(&mut out, &value);
        }
        put_varint(&mut out, 0);
        out.put_u8(0);
        out
    }

    /// `n` distinct short header names: `a`, `b`, …, `aa`, `ab`, …
    fn distinct_names(n: usize) -> impl Iterator<Item = (Vec<u8>, Vec<u8>)> {
        (0..n)
            .map(|mut i| {
                let mut name = Vec::new();
                loop {
                    name.push(b'a' + (i % 26) as u8);
                    i /= 26;
                    if i == 0 {
                        break name;
                    }
                }
            })
            .map(|name| (name, Vec::new()))
    }

    #[test]
    fn a_record_claiming_more_headers_than_a_header_map_holds_is_an_error_not_a_panic() {
        // 40 000 distinct names, and the bytes to back every one of them: enough for
        // `HeaderMap::with_capacity` and `append` to panic (past 32 768 names).
        let bytes = raw_record(40_000, distinct_names(40_000));
        assert!(bytes.len() > 3 * 40_000);
        assert_eq!(
            Record::decode(Bytes::from(bytes)).err(),
            Some(RecordError::TooManyHeaders)
        );
        // The same names, repeated: one name, 40 000 values.
        let repeated = (0..40_000).map(|_| (b"set-cookie".to_vec(), b"a=1".to_vec()));
        assert_eq!(
            Record::decode(Bytes::from(raw_record(40_000, repeated))).err(),
            Some(RecordError::TooManyHeaders)
        );
    }

    #[test]
    fn header_counts_up_to_the_cap_decode_and_one_more_does_not() {
        let at_cap = raw_record(
            MAX_RECORD_HEADERS as u64,
            distinct_names(MAX_RECORD_HEADERS),
        );
        let decoded = Record::decode(Bytes::from(at_cap)).map(|r| r.headers().map(HeaderMap::len));
        assert_eq!(decoded, Ok(Some(MAX_RECORD_HEADERS)));
        let over = raw_record(
            MAX_RECORD_HEADERS as u64 + 1,
            distinct_names(MAX_RECORD_HEADERS + 1),
        );
        assert_eq!(
            Record::decode(Bytes::from(over)).err(),
            Some(RecordError::TooManyHeaders)
        );
        // A count over the cap is refused before anything is read or allocated for it.
        assert_eq!(
            Record::decode(Bytes::from(raw_record(u64::MAX, []))).err(),
            Some(RecordError::TooManyHeaders)
        );
    }
}

/// What the `record` fuzz target and its proptest twins check: decoding `bytes` never panics,
/// and whatever decodes encodes to bytes that decode to the same record (and encode the same
/// again: the encoding of a record is canonical, whatever non-shortest lengths it was read
/// from). Panics when that is broken.
#[cfg(any(test, fuzzing))]
pub(crate) fn check_decode(bytes: &[u8]) {
    if let Ok(record) = Record::decode(Bytes::copy_from_slice(bytes)) {
        let encoded = record.encode();
        let again = Record::decode(Bytes::from(encoded.clone()));
        assert_eq!(again.as_ref(), Ok(&record));
        assert_eq!(again.map(|r| r.encode()), Ok(encoded));
    }
}

/// Proptest twins of the `record` fuzz target: arbitrary and near-valid bytes never panic,
/// and whatever decodes round-trips. The strategies serve the envelope's twins too.
#[cfg(test)]
pub(crate) mod properties {
    use proptest::prelude::*;

    use super::*;

    fn varint(n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        put_varint(&mut out, n);
        out
    }

    /// A length or count as it may appear in stored bytes: true, near it, huge, or not a
    /// valid varint at all.
    fn length(actual: usize) -> impl Strategy<Value = Vec<u8>> {
        let actual = actual as u64;
        prop_oneof![
            6 => Just(varint(actual)),
            1 => (0..4u64).prop_map(move |d| varint(actual.saturating_add(d))),
            1 => (0..4u64).prop_map(move |d| varint(actual.saturating_sub(d))),
            1 => (MAX_RECORD_HEADERS as u64..=40_000).prop_map(varint),
            1 => any::<u64>().prop_map(varint),
            1 => prop::collection::vec(0x80u8..=0xff, 1..12),
            // Not the shortest form: still a valid length.
            1 => Just({
                let mut long = varint(actual);
                if let Some(last) = long.last_mut() {
                    *last |= 0x80;
                }
                long.push(0);
                long
            }),
        ]
    }

    fn header_name() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            4 => prop::sample::select(&["set-cookie", "content-type", "x-a", "connection", "te"][..])
                .prop_map(|name| name.as_bytes().to_vec()),
            2 => "[a-z0-9-]{1,20}".prop_map(String::into_bytes),
            1 => prop::collection::vec(any::<u8>(), 0..8),
            // Around the longest name `http` accepts (65 535 bytes).
            1 => (65_530usize..65_540).prop_map(|len| vec![b'n'; len]),
        ]
    }

    fn header_value() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            4 => prop::collection::vec(prop_oneof![0x20u8..=0x7e, 0x80u8..=0xff], 0..16),
            1 => prop::collection::vec(any::<u8>(), 0..16),
        ]
    }

    /// Header fields as stored: each a length-prefixed name and value, the count in front.
    fn headers() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec((header_name(), header_value()), 0..6).prop_flat_map(|fields| {
            let encoded: Vec<(Vec<u8>, Vec<u8>)> = fields;
            let count = length(encoded.len());
            let fields: Vec<_> = encoded
                .into_iter()
                .map(|(name, value)| {
                    (
                        length(name.len()),
                        Just(name),
                        length(value.len()),
                        Just(value),
                    )
                })
                .collect();
            (count, fields).prop_map(|(count, fields)| {
                let mut out = count;
                for (name_len, name, value_len, value) in fields {
                    out.extend(name_len);
                    out.extend(name);
                    out.extend(value_len);
                    out.extend(value);
                }
                out
            })
        })
    }

    /// Records built field by field, each field usually right and sometimes not.
    pub(crate) fn near_valid() -> impl Strategy<Value = Vec<u8>> {
        let body = prop::collection::vec(any::<u8>(), 0..64)
            .prop_flat_map(|body| (length(body.len()), Just(body)));
        (
            prop_oneof![8 => Just(MAGIC.to_vec()), 1 => prop::collection::vec(any::<u8>(), 3)],
            prop_oneof![8 => Just(VERSION), 1 => any::<u8>()],
            prop_oneof![4 => Just(KIND_RESPONSE), 2 => Just(KIND_NOT_REPLAYABLE), 1 => any::<u8>()],
            any::<[u8; 32]>(),
            prop_oneof![4 => 100u16..1000, 1 => any::<u16>()],
            headers(),
            body,
            prop_oneof![4 => Just(vec![0]), 4 => headers().prop_map(|h| [&[1][..], &h].concat()), 1 => any::<u8>().prop_map(|b| vec![b])],
            prop_oneof![8 => Just(Vec::new()), 1 => prop::collection::vec(any::<u8>(), 1..4)],
        )
            .prop_map(
                |(magic, version, kind, fingerprint, status, headers, (body_len, body), trailers, trailing)| {
                    let mut out = magic;
                    out.push(version);
                    out.push(kind);
                    out.extend_from_slice(&fingerprint);
                    out.extend_from_slice(&status.to_be_bytes());
                    if kind != KIND_NOT_REPLAYABLE {
                        out.extend(headers);
                        out.extend(body_len);
                        out.extend(body);
                        out.extend(trailers);
                    }
                    out.extend(trailing);
                    out
                },
            )
    }

    fn header_map() -> impl Strategy<Value = HeaderMap> {
        prop::collection::vec(("[a-z][a-z0-9-]{0,15}", header_value()), 0..8).prop_map(|fields| {
            let mut map = HeaderMap::new();
            for (name, value) in fields {
                if let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_bytes(&value),
                ) {
                    map.append(name, value);
                }
            }
            map
        })
    }

    /// Valid records, as `Record::response` and `Record::not_replayable` make them.
    pub(crate) fn record() -> impl Strategy<Value = Record> {
        let fingerprint = any::<[u8; 32]>().prop_map(Fingerprint::from_bytes);
        let status = (100u16..1000).prop_map(|s| StatusCode::from_u16(s).unwrap_or_default());
        prop_oneof![
            4 => (fingerprint.clone(), status.clone(), header_map(), prop::collection::vec(any::<u8>(), 0..256), prop::option::of(header_map()))
                .prop_map(|(fingerprint, status, headers, body, trailers)| {
                    Record::response(fingerprint, status, &headers, Bytes::from(body), trailers.as_ref())
                }),
            1 => (fingerprint, status).prop_map(|(f, s)| Record::not_replayable(f, s)),
        ]
    }

    /// One edit of a valid encoding: a byte changed, bytes inserted, a range removed.
    #[derive(Debug, Clone)]
    enum Edit {
        Set(prop::sample::Index, u8),
        Insert(prop::sample::Index, Vec<u8>),
        Remove(prop::sample::Index, usize),
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(at, byte)| Edit::Set(at, byte)),
            (
                any::<prop::sample::Index>(),
                prop_oneof![length(40_000), prop::collection::vec(any::<u8>(), 1..4)]
            )
                .prop_map(|(at, bytes)| Edit::Insert(at, bytes)),
            (any::<prop::sample::Index>(), 1usize..8).prop_map(|(at, len)| Edit::Remove(at, len)),
        ]
    }

    fn apply(bytes: &mut Vec<u8>, edit: &Edit) {
        if bytes.is_empty() {
            return;
        }
        match edit {
            Edit::Set(at, byte) => {
                let at = at.index(bytes.len());
                bytes[at] = *byte;
            }
            Edit::Insert(at, inserted) => {
                let at = at.index(bytes.len() + 1);
                bytes.splice(at..at, inserted.iter().copied());
            }
            Edit::Remove(at, len) => {
                let at = at.index(bytes.len());
                let end = (at + len).min(bytes.len());
                bytes.drain(at..end);
            }
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            check_decode(&bytes);
            // And behind a valid head, so that more than the magic is looked at.
            check_decode(&[&b"TIR\x01\x00"[..], &bytes].concat());
        }

        #[test]
        fn near_valid_records_never_panic_and_round_trip_when_they_decode(bytes in near_valid()) {
            check_decode(&bytes);
        }

        #[test]
        fn valid_records_round_trip_byte_for_byte(record in record()) {
            let encoded = record.encode();
            let decoded = Record::decode(Bytes::from(encoded.clone()));
            prop_assert_eq!(decoded.as_ref(), Ok(&record));
            let pairs = |map: Option<&HeaderMap>| {
                map.map(|map| {
                    map.iter()
                        .map(|(n, v)| (n.clone(), v.clone()))
                        .collect::<Vec<_>>()
                })
            };
            let decoded = decoded.map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(pairs(decoded.headers()), pairs(record.headers()));
            prop_assert_eq!(pairs(decoded.trailers()), pairs(record.trailers()));
            prop_assert_eq!(decoded.encode(), encoded);
        }

        #[test]
        fn grpc_trailing_metadata_round_trips_repeats_and_order_kept(
            fields in prop::collection::vec(
                (prop::sample::select(&["grpc-status", "grpc-message", "x-entry", "x-sig-bin"][..]), header_value()),
                0..12,
            ),
            body in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut trailers = HeaderMap::new();
            for (name, value) in fields {
                if let Ok(value) = HeaderValue::from_bytes(&value) {
                    trailers.append(name, value);
                }
            }
            let mut headers = HeaderMap::new();
            headers.append("content-type", HeaderValue::from_static("application/grpc"));
            let record = Record::response(
                Fingerprint::from_bytes([7; 32]),
                StatusCode::OK,
                &headers,
                Bytes::from(body),
                Some(&trailers),
            );
            let decoded = Record::decode(Bytes::from(record.encode()))
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let pairs = |map: &HeaderMap| {
                map.iter().map(|(n, v)| (n.clone(), v.clone())).collect::<Vec<_>>()
            };
            prop_assert_eq!(decoded.trailers().map(pairs), Some(pairs(&trailers)));
            prop_assert_eq!(decoded.body(), record.body());
        }

        #[test]
        fn edited_records_never_panic(record in record(), edits in prop::collection::vec(edit(), 1..4)) {
            let mut bytes = record.encode();
            for edit in &edits {
                apply(&mut bytes, edit);
            }
            check_decode(&bytes);
        }
    }
}
