//! What a store keeps for a completed request, and its versioned binary encoding.
//!
//! Pure logic: no tower or tokio in here. The encoding is hand-written because it is small,
//! ours, and must keep what generic formats lose or bloat: header order, repeated names and
//! non-UTF-8 value bytes, without base64.

use std::{fmt, sync::Arc};

use bytes::{Buf, BufMut, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};

use crate::fingerprint::Fingerprint;

/// The first bytes of every encoded record; a value that starts otherwise is not ours.
const MAGIC: &[u8; 3] = b"TIR";
/// The encoding's version; decoders refuse versions they do not know.
const VERSION: u8 = 1;

const KIND_RESPONSE: u8 = 0;
const KIND_NOT_REPLAYABLE: u8 = 1;

/// A completed request, as a store keeps it: the fingerprint of the request that produced
/// it and either the full response (status, headers in order with repeats, body, trailers) or
/// the mark that the response was too large to keep.
///
/// Records never change once written, so caches may hold them freely: a clone shares the
/// same record (a reference count), it copies nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct Record(Arc<Inner>);

#[derive(PartialEq, Eq)]
struct Inner {
    fingerprint: Fingerprint,
    outcome: Outcome,
}

// Nearly every record is a response: boxing it would add an allocation to every record.
#[allow(clippy::large_enum_variant)]
#[derive(PartialEq, Eq)]
enum Outcome {
    Response {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        trailers: Option<HeaderMap>,
    },
    NotReplayable {
        status: StatusCode,
    },
}

impl Record {
    /// A replayable response. Hop-by-hop headers (`Connection`, `Transfer-Encoding`, … and
    /// those `Connection` names) are dropped: they describe one connection, not the response.
    pub fn response(
        fingerprint: Fingerprint,
        status: StatusCode,
        headers: &HeaderMap,
        body: Bytes,
        trailers: Option<&HeaderMap>,
    ) -> Self {
        Self(Arc::new(Inner {
            fingerprint,
            outcome: Outcome::Response {
                status,
                headers: end_to_end(headers),
                body,
                trailers: trailers.map(end_to_end),
            },
        }))
    }

    /// A request that completed with a response too large to keep: its key is spent, but
    /// retries cannot be given the response.
    pub fn not_replayable(fingerprint: Fingerprint, status: StatusCode) -> Self {
        Self(Arc::new(Inner {
            fingerprint,
            outcome: Outcome::NotReplayable { status },
        }))
    }

    /// The fingerprint of the request that produced this record.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.0.fingerprint
    }

    /// The status of the original response.
    pub fn status(&self) -> StatusCode {
        match &self.0.outcome {
            Outcome::Response { status, .. } | Outcome::NotReplayable { status } => *status,
        }
    }

    /// Whether the full response was kept and can be replayed.
    pub fn is_replayable(&self) -> bool {
        matches!(self.0.outcome, Outcome::Response { .. })
    }

    /// The response headers, if replayable.
    pub fn headers(&self) -> Option<&HeaderMap> {
        match &self.0.outcome {
            Outcome::Response { headers, .. } => Some(headers),
            Outcome::NotReplayable { .. } => None,
        }
    }

    /// The response body, if replayable.
    pub fn body(&self) -> Option<&Bytes> {
        match &self.0.outcome {
            Outcome::Response { body, .. } => Some(body),
            Outcome::NotReplayable { .. } => None,
        }
    }

    /// The response trailers, if replayable and the response had any.
    pub fn trailers(&self) -> Option<&HeaderMap> {
        match &self.0.outcome {
            Outcome::Response { trailers, .. } => trailers.as_ref(),
            Outcome::NotReplayable { .. } => None,
        }
    }

    /// The parts of a replay; `None` when not replayable. The header map has room for
    /// `extra` more headers, so adding them does not grow it. A record nobody else holds (one
    /// just decoded from a remote store) gives its parts away; a shared one is copied.
    pub(crate) fn into_replay_parts(self, extra: usize) -> Option<ResponseParts> {
        let inner = match Arc::try_unwrap(self.0) {
            Ok(inner) => inner,
            Err(shared) => return Self(shared).replay_parts(extra),
        };
        match inner.outcome {
            Outcome::Response {
                status,
                mut headers,
                body,
                trailers,
            } => {
                headers.reserve(extra);
                Some(ResponseParts {
                    status,
                    headers,
                    body,
                    trailers,
                })
            }
            Outcome::NotReplayable { .. } => None,
        }
    }

    fn replay_parts(&self, extra: usize) -> Option<ResponseParts> {
        let Outcome::Response {
            status,
            headers,
            body,
            trailers,
        } = &self.0.outcome
        else {
            return None;
        };
        let mut replayed = HeaderMap::with_capacity(headers.len() + extra);
        for (name, value) in headers {
            replayed.append(name, value.clone());
        }
        Some(ResponseParts {
            status: *status,
            headers: replayed,
            body: body.clone(),
            trailers: trailers.clone(),
        })
    }

    /// About how many bytes this record occupies in memory, a cache's bookkeeping for it
    /// included: what byte-bounded caches weigh, so that their capacity is the memory they
    /// use. (The constants are measured by `tests/memory_footprint.rs`.)
    pub fn weight(&self) -> usize {
        // The record, its cache entry and the cache's bookkeeping for it.
        const OVERHEAD: usize = 400;
        // A header map's table reserves room for its capacity, used or not.
        const PER_SLOT: usize = 200;
        // A value's own allocation and its share of the map's bookkeeping.
        const PER_VALUE: usize = 24;
        let map_weight = |map: &HeaderMap| {
            PER_SLOT * map.capacity()
                + map
                    .iter()
                    .map(|(name, value)| PER_VALUE + name.as_str().len() + value.len())
                    .sum::<usize>()
        };
        OVERHEAD
            + match &self.0.outcome {
                Outcome::Response {
                    headers,
                    body,
                    trailers,
                    ..
                } => map_weight(headers) + body.len() + trailers.as_ref().map_or(0, map_weight),
                Outcome::NotReplayable { .. } => 0,
            }
    }

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
    /// error, never a panic. Header values and the body share `bytes`' buffer (no copies).
    pub fn decode(mut bytes: Bytes) -> Result<Self, RecordError> {
        let input = &mut bytes;
        if take(input, MAGIC.len())? != MAGIC[..] {
            return Err(RecordError::BadMagic);
        }
        let version = take_u8(input)?;
        if version != VERSION {
            return Err(RecordError::UnsupportedVersion(version));
        }
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

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = f.debug_struct("Record");
        out.field("fingerprint", &self.0.fingerprint)
            .field("status", &self.status());
        match &self.0.outcome {
            Outcome::Response {
                headers,
                body,
                trailers,
                ..
            } => out
                .field("headers", &headers.len())
                .field("body_len", &body.len())
                .field("trailers", &trailers.as_ref().map(HeaderMap::len)),
            Outcome::NotReplayable { .. } => out.field("replayable", &false),
        };
        out.finish()
    }
}

/// A replayable response taken apart.
#[derive(Debug)]
pub(crate) struct ResponseParts {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    pub(crate) trailers: Option<HeaderMap>,
}

/// Why bytes could not be decoded as a [`Record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordError {
    /// The bytes do not start with the record magic: not a record of this crate.
    BadMagic,
    /// A record written by a newer (or unknown) version of the encoding.
    UnsupportedVersion(u8),
    /// A record kind this version does not know.
    UnknownKind(u8),
    /// The bytes end before the record does.
    Truncated,
    /// Bytes follow the end of the record.
    TrailingBytes,
    /// The status code is outside 100–999.
    InvalidStatus,
    /// A header name or value is not valid HTTP.
    InvalidHeader,
    /// A length or flag has an impossible value.
    Malformed(&'static str),
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic => f.write_str("not an idempotency record (bad magic)"),
            Self::UnsupportedVersion(v) => write!(f, "unsupported record version {v}"),
            Self::UnknownKind(k) => write!(f, "unknown record kind {k}"),
            Self::Truncated => f.write_str("truncated record"),
            Self::TrailingBytes => f.write_str("trailing bytes after record"),
            Self::InvalidStatus => f.write_str("invalid status code in record"),
            Self::InvalidHeader => f.write_str("invalid header in record"),
            Self::Malformed(what) => write!(f, "malformed record: bad {what}"),
        }
    }
}

impl std::error::Error for RecordError {}

/// Whether `name` describes one connection rather than the response (RFC 9110 §7.6.1).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::TE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// The headers minus hop-by-hop ones, in order, repeats kept.
fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let listed_in_connection = |name: &HeaderName| {
        headers.get_all(header::CONNECTION).iter().any(|value| {
            value.as_bytes().split(|b| *b == b',').any(|token| {
                token
                    .trim_ascii()
                    .eq_ignore_ascii_case(name.as_str().as_bytes())
            })
        })
    };
    let mut kept = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if !is_hop_by_hop(name) && !listed_in_connection(name) {
            kept.append(name, value.clone());
        }
    }
    kept
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
    let count = take_varint(input)?;
    // Each header takes at least three bytes (two lengths and a one-byte name), which bounds
    // the allocation by the input size whatever the count claims.
    let capacity = usize::try_from(count)
        .unwrap_or(usize::MAX)
        .min(input.remaining() / 3);
    // One spare slot: a replay adds `Idempotent-Replayed` without growing the map.
    let mut headers = HeaderMap::with_capacity(capacity + 1);
    for _ in 0..count {
        let name = take_len_prefixed(input)?;
        let name = HeaderName::from_bytes(&name).map_err(|_| RecordError::InvalidHeader)?;
        let value = take_len_prefixed(input)?;
        let value =
            HeaderValue::from_maybe_shared(value).map_err(|_| RecordError::InvalidHeader)?;
        headers.append(name, value);
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, Uri};

    fn fingerprint() -> Fingerprint {
        Fingerprint::of(&Method::POST, &Uri::from_static("/charges"), b"{}")
    }

    fn sample() -> Record {
        let mut headers = HeaderMap::new();
        headers.append("content-type", HeaderValue::from_static("application/json"));
        headers.append("set-cookie", HeaderValue::from_static("a=1"));
        headers.append("x-bin", HeaderValue::from_bytes(b"caf\xe9 \xff").unwrap());
        headers.append("set-cookie", HeaderValue::from_static("b=2"));
        let mut trailers = HeaderMap::new();
        trailers.append("grpc-status", HeaderValue::from_static("0"));
        Record::response(
            fingerprint(),
            StatusCode::CREATED,
            &headers,
            Bytes::from_static(b"\x00\x01{\"id\":1}\xff"),
            Some(&trailers),
        )
    }

    fn pairs(map: &HeaderMap) -> Vec<(String, Vec<u8>)> {
        map.iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect()
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
    fn not_replayable_records_round_trip() {
        let record = Record::not_replayable(fingerprint(), StatusCode::OK);
        let decoded = Record::decode(Bytes::from(record.encode())).unwrap();
        assert_eq!(decoded, record);
        assert!(!decoded.is_replayable());
        assert_eq!(decoded.status(), StatusCode::OK);
        assert!(decoded.body().is_none());
    }

    #[test]
    fn hop_by_hop_headers_are_not_stored() {
        let mut headers = HeaderMap::new();
        headers.append(
            "connection",
            HeaderValue::from_static("close, x-conn-private"),
        );
        headers.append("transfer-encoding", HeaderValue::from_static("chunked"));
        headers.append("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.append("x-conn-private", HeaderValue::from_static("1"));
        headers.append("content-length", HeaderValue::from_static("2"));
        headers.append("x-kept", HeaderValue::from_static("1"));
        let record = Record::response(fingerprint(), StatusCode::OK, &headers, Bytes::new(), None);
        let names: Vec<_> = record
            .headers()
            .unwrap()
            .keys()
            .map(|n| n.as_str())
            .collect();
        assert_eq!(names, ["content-length", "x-kept"]);
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
            ("huge count", huge_count, RecordError::Truncated),
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
    fn a_replay_of_a_shared_or_an_owned_record_has_the_same_parts_and_room_for_one_more() {
        let record = sample();
        let decoded = Record::decode(Bytes::from(record.encode())).unwrap();
        let shared = record.clone().into_replay_parts(1).unwrap();
        let owned = decoded.into_replay_parts(1).unwrap();
        for parts in [&shared, &owned] {
            assert_eq!(parts.status, StatusCode::CREATED);
            assert_eq!(pairs(&parts.headers), pairs(record.headers().unwrap()));
            assert_eq!(&parts.body, record.body().unwrap());
            assert!(parts.headers.capacity() > parts.headers.len());
        }
        let spent = Record::not_replayable(fingerprint(), StatusCode::OK);
        assert!(spent.into_replay_parts(1).is_none());
    }

    #[test]
    fn weight_grows_with_the_body_and_the_headers() {
        let with_body = |len: usize| {
            Record::response(
                fingerprint(),
                StatusCode::OK,
                &HeaderMap::new(),
                Bytes::from(vec![0; len]),
                None,
            )
        };
        assert_eq!(with_body(10_000).weight() - with_body(0).weight(), 10_000);
        assert!(sample().weight() > with_body(13).weight() + 4 * 24);
    }
}
