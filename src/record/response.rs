//! [`Record`]: a completed request's response (or the fact that it cannot be replayed) and
//! the fingerprint it answers; the headers kept, and the errors building one.

use std::{fmt, sync::Arc};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, StatusCode, header};

use crate::fingerprint::Fingerprint;

/// The most header fields a record keeps, repeats counted: as many in its headers, and as
/// many again in its trailers.
///
/// A response with more is recorded as not replayable, like one over the body limit: its
/// key is spent and retries get a problem, never a second execution. Decoding bytes that
/// claim more is an error ([`RecordError::TooManyHeaders`]), so every record
/// [`encode`](Record::encode) writes decodes again, and no stored bytes can make decoding
/// allocate a header table for more. The bound is far below what `http::HeaderMap` holds
/// (it panics past 32 768 names) and far above what HTTP clients accept (a hundred or so).
pub const MAX_RECORD_HEADERS: usize = 4096;

/// A completed request, as a store keeps it: the fingerprint of the request that produced
/// it and either the full response (status, headers in order with repeats, body, trailers) or
/// the mark that the response was too large to keep.
///
/// Records never change once written, so caches may hold them freely: a clone shares the
/// same record (a reference count), it copies nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct Record(pub(super) Arc<Inner>);

#[derive(PartialEq, Eq)]
pub(super) struct Inner {
    pub(super) fingerprint: Fingerprint,
    pub(super) outcome: Outcome,
}

// Nearly every record is a response: boxing it would add an allocation to every record.
#[allow(clippy::large_enum_variant)]
#[derive(PartialEq, Eq)]
pub(super) enum Outcome {
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
    ///
    /// A response with more than [`MAX_RECORD_HEADERS`] header fields, or as many trailer
    /// fields, is kept as [`not_replayable`](Record::not_replayable) instead: it could not be
    /// decoded again, and a record that cannot be read back would let retries execute again.
    ///
    /// ```
    /// # use bytes::Bytes;
    /// # use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
    /// use tower_idempotency::{Fingerprint, MAX_RECORD_HEADERS, Record};
    ///
    /// let fingerprint = Fingerprint::of(&Method::POST, &Uri::from_static("/"), b"");
    /// let mut headers = HeaderMap::new();
    /// for _ in 0..=MAX_RECORD_HEADERS {
    ///     headers.append("set-cookie", HeaderValue::from_static("a=1"));
    /// }
    /// let record = Record::response(fingerprint, StatusCode::OK, &headers, Bytes::new(), None);
    /// assert!(!record.is_replayable());
    /// ```
    pub fn response(
        fingerprint: Fingerprint,
        status: StatusCode,
        headers: &HeaderMap,
        body: Bytes,
        trailers: Option<&HeaderMap>,
    ) -> Self {
        let kept = end_to_end(headers).and_then(|headers| {
            let trailers = match trailers {
                Some(trailers) => Some(end_to_end(trailers)?),
                None => None,
            };
            Some((headers, trailers))
        });
        let Some((headers, trailers)) = kept else {
            return Self::not_replayable(fingerprint, status);
        };
        Self(Arc::new(Inner {
            fingerprint,
            outcome: Outcome::Response {
                status,
                headers,
                body,
                trailers,
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
                // Room to spare only: a record holds at most `MAX_RECORD_HEADERS` fields,
                // far below what a map can reserve, and a map without it grows on insert.
                let _ = headers.try_reserve(extra);
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
        Some(ResponseParts {
            status: *status,
            headers: copy_with_room(headers, extra),
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
    /// More header (or trailer) fields than [`MAX_RECORD_HEADERS`].
    TooManyHeaders,
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
            Self::TooManyHeaders => write!(
                f,
                "record holds more than {MAX_RECORD_HEADERS} header fields"
            ),
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

/// The headers minus hop-by-hop ones, in order, repeats kept; `None` when more than
/// [`MAX_RECORD_HEADERS`] are left.
fn end_to_end(headers: &HeaderMap) -> Option<HeaderMap> {
    let listed_in_connection = |name: &HeaderName| {
        headers.get_all(header::CONNECTION).iter().any(|value| {
            value.as_bytes().split(|b| *b == b',').any(|token| {
                token
                    .trim_ascii()
                    .eq_ignore_ascii_case(name.as_str().as_bytes())
            })
        })
    };
    let mut kept = HeaderMap::try_with_capacity(headers.len().min(MAX_RECORD_HEADERS)).ok()?;
    for (name, value) in headers {
        if !is_hop_by_hop(name) && !listed_in_connection(name) {
            if kept.len() == MAX_RECORD_HEADERS {
                return None;
            }
            kept.try_append(name, value.clone()).ok()?;
        }
    }
    Some(kept)
}

/// A copy of `headers` with room for `extra` more. A record's maps are far below what a map
/// holds, so the fallbacks (a plain clone, without the room) are never taken; they are there
/// so that nothing here can panic.
fn copy_with_room(headers: &HeaderMap, extra: usize) -> HeaderMap {
    let Ok(mut copy) = HeaderMap::try_with_capacity(headers.len().saturating_add(extra)) else {
        return headers.clone();
    };
    for (name, value) in headers {
        if copy.try_append(name, value.clone()).is_err() {
            return headers.clone();
        }
    }
    copy
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use http::{HeaderValue, Method, Uri};

    pub(in crate::record) fn fingerprint() -> Fingerprint {
        Fingerprint::of(&Method::POST, &Uri::from_static("/charges"), b"{}")
    }

    pub(in crate::record) fn sample() -> Record {
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

    pub(in crate::record) fn pairs(map: &HeaderMap) -> Vec<(String, Vec<u8>)> {
        map.iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect()
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

    fn repeated(name: &'static str, n: usize) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for _ in 0..n {
            headers.append(name, HeaderValue::from_static("a=1"));
        }
        headers
    }

    #[test]
    fn a_response_with_more_headers_than_a_record_keeps_is_recorded_not_replayable() {
        let record = |headers: &HeaderMap, trailers: Option<&HeaderMap>| {
            Record::response(
                fingerprint(),
                StatusCode::OK,
                headers,
                Bytes::new(),
                trailers,
            )
        };
        let at_cap = repeated("set-cookie", MAX_RECORD_HEADERS);
        let over = repeated("set-cookie", MAX_RECORD_HEADERS + 1);
        // A hop-by-hop header is dropped before counting.
        let mut at_cap_and_hop = at_cap.clone();
        at_cap_and_hop.append("transfer-encoding", HeaderValue::from_static("chunked"));
        // Past what `HeaderMap::with_capacity` takes: this one used to panic.
        let huge = repeated("set-cookie", 40_000);
        let none = HeaderMap::new();
        let cases: [(&str, Record, bool); 6] = [
            ("headers at the cap", record(&at_cap, None), true),
            ("trailers at the cap", record(&none, Some(&at_cap)), true),
            (
                "hop-by-hop not counted",
                record(&at_cap_and_hop, None),
                true,
            ),
            ("headers over the cap", record(&over, None), false),
            ("trailers over the cap", record(&none, Some(&over)), false),
            ("40 000 headers", record(&huge, None), false),
        ];
        for (what, record, replayable) in cases {
            assert_eq!(record.is_replayable(), replayable, "{what}");
            assert_eq!(record.status(), StatusCode::OK, "{what}");
            // Whatever was kept decodes again: no record is written that cannot be read.
            let decoded = Record::decode(Bytes::from(record.encode()));
            assert_eq!(decoded.as_ref(), Ok(&record), "{what}");
            if replayable {
                let parts = record.into_replay_parts(1).unwrap();
                assert!(parts.headers.capacity() > parts.headers.len(), "{what}");
            }
        }
    }
}
