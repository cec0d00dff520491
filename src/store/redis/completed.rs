//! The completed envelope: what a key holds once its request completed.
//!
//! Pure logic. The complete script writes it (the expiry from Redis's own `TIME`); the claim
//! reads it back, since a claim is a plain `SET … NX GET` that returns the value and not the
//! key's remaining lifetime.
//!
//! | bytes  | what                                                             |
//! |--------|------------------------------------------------------------------|
//! | 0..3   | magic `TIC` (an in-flight marker starts with `TIF`)              |
//! | 3      | version, 1                                                       |
//! | 4..12  | when the key expires: Unix time in ms by Redis's clock, big-endian |
//! | 12..20 | the record's TTL in ms, big-endian                               |
//! | 20..   | the record, in [`Record::encode`]'s form                         |
//!
//! # Clocks
//!
//! The remaining lifetime is the expiry (Redis's clock) minus the local clock, so skew
//! between the two shifts it. It decides one thing only: how long a cache in front of the
//! store ([`CachedStore`](crate::CachedStore)) keeps its copy. Claims, leases and expiry in
//! Redis run on Redis's clock alone. A local clock ahead of Redis's makes the cache keep its
//! copy for less time (more round trips); one behind by more than [`SKEW_MARGIN`] lets the
//! cache replay a record for up to the excess after Redis dropped it, and never longer than
//! the record's TTL.

use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::record::{Record, RecordError};

/// The first bytes of every completed envelope.
pub(super) const MAGIC: &[u8; 3] = b"TIC";
const VERSION: u8 = 1;
const HEADER: usize = 20;

/// Taken off every remaining lifetime, so that clocks kept in step by NTP (within a few
/// milliseconds of each other) never let a cache outlive Redis. A negligible share of any
/// TTL worth caching for.
pub(super) const SKEW_MARGIN: Duration = Duration::from_millis(100);

/// A completed record, as stored under its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Completed {
    /// When Redis expires the key: ms since the Unix epoch, by Redis's clock.
    pub(super) expires_at: u64,
    /// The TTL the record was stored with, in ms.
    pub(super) ttl: u64,
    pub(super) record: Record,
}

impl Completed {
    /// Decodes an envelope; `bytes` must start with [`MAGIC`]. The record is not copied.
    pub(super) fn decode(mut bytes: Bytes) -> Result<Self, RecordError> {
        super::check_head(&bytes, MAGIC, VERSION)?;
        let header = bytes.split_to(HEADER.min(bytes.len()));
        let (Some(expires_at), Some(ttl)) = (be_u64(&header, 4), be_u64(&header, 12)) else {
            return Err(RecordError::Truncated);
        };
        Ok(Self {
            expires_at,
            ttl,
            record: Record::decode(bytes)?,
        })
    }

    /// How long the record is left to live as of `now` by the local clock, less
    /// [`SKEW_MARGIN`], and never more than its TTL; `None` when that leaves nothing.
    pub(super) fn expires_in(&self, now: SystemTime) -> Option<Duration> {
        let now = now.duration_since(SystemTime::UNIX_EPOCH).ok()?;
        let left = Duration::from_millis(self.expires_at)
            .checked_sub(now)?
            .checked_sub(SKEW_MARGIN)?
            .min(Duration::from_millis(self.ttl));
        (!left.is_zero()).then_some(left)
    }
}

/// What the complete script stores for `record`, expiring at `expires_at` (Unix ms).
#[cfg(any(test, fuzzing))]
pub(super) fn envelope(expires_at: u64, ttl: u64, record: &Record) -> Vec<u8> {
    // Spelled out, not taken from the constants: the script writes these bytes.
    let mut out = b"TIC\x01".to_vec();
    out.extend_from_slice(&expires_at.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    out.extend_from_slice(&record.encode());
    out
}

fn be_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let field = bytes.get(at..at + 8)?;
    let mut out = [0; 8];
    out.copy_from_slice(field);
    Some(u64::from_be_bytes(out))
}

/// What the `envelope` fuzz target and its proptest twins check: decoding never panics; an
/// envelope that decodes is rebuilt, as the script writes it, into one that decodes the same;
/// and the lifetime it reports is never zero nor more than its TTL, whatever the clock says.
/// Panics when that is broken.
#[cfg(any(test, fuzzing))]
pub(super) fn check_decode(bytes: &[u8]) {
    let Ok(completed) = Completed::decode(Bytes::copy_from_slice(bytes)) else {
        return;
    };
    let rebuilt = envelope(completed.expires_at, completed.ttl, &completed.record);
    assert_eq!(
        Completed::decode(Bytes::from(rebuilt)),
        Ok(completed.clone())
    );
    let expiry = Duration::from_millis(completed.expires_at);
    let nows = [
        Some(SystemTime::UNIX_EPOCH),
        Some(SystemTime::now()),
        SystemTime::UNIX_EPOCH.checked_add(expiry),
        SystemTime::UNIX_EPOCH.checked_add(expiry.saturating_sub(SKEW_MARGIN)),
        SystemTime::UNIX_EPOCH.checked_sub(Duration::from_secs(1)),
    ];
    for now in nows.into_iter().flatten() {
        if let Some(left) = completed.expires_in(now) {
            assert!(!left.is_zero() && left <= Duration::from_millis(completed.ttl));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint::Fingerprint;

    fn record() -> Record {
        Record::not_replayable(Fingerprint::from_bytes([3; 32]), http::StatusCode::OK)
    }

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[test]
    fn an_envelope_decodes_to_its_expiry_ttl_and_record() {
        let bytes = envelope(1_700_000_060_000, 60_000, &record());
        assert_eq!(
            Completed::decode(Bytes::from(bytes)),
            Ok(Completed {
                expires_at: 1_700_000_060_000,
                ttl: 60_000,
                record: record(),
            })
        );
    }

    #[test]
    fn foreign_truncated_or_unknown_envelopes_are_errors() {
        let good = envelope(1_700_000_060_000, 60_000, &record());
        let mut newer = good.clone();
        newer[3] = 2;
        let mut bad_record = good.clone();
        bad_record[HEADER] = b'X';
        let mut long = good.clone();
        long.push(0);
        let cases: [(&str, &[u8], RecordError); 9] = [
            ("empty", b"", RecordError::BadMagic),
            ("marker", b"TIF\x01\x00", RecordError::BadMagic),
            ("bare record", &record().encode(), RecordError::BadMagic),
            ("magic only", b"TIC", RecordError::Truncated),
            ("newer version", &newer, RecordError::UnsupportedVersion(2)),
            ("short header", &good[..HEADER - 1], RecordError::Truncated),
            ("no record", &good[..HEADER], RecordError::Truncated),
            ("not a record inside", &bad_record, RecordError::BadMagic),
            ("trailing", &long, RecordError::TrailingBytes),
        ];
        for (what, bytes, expected) in cases {
            assert_eq!(
                Completed::decode(Bytes::copy_from_slice(bytes)),
                Err(expected),
                "{what}"
            );
        }
    }

    #[test]
    fn every_truncation_of_an_envelope_is_an_error() {
        let good = envelope(1_700_000_060_000, 60_000, &record());
        for len in 0..good.len() {
            assert!(
                Completed::decode(Bytes::copy_from_slice(&good[..len])).is_err(),
                "prefix of {len} bytes"
            );
        }
    }

    #[test]
    fn the_lifetime_left_is_the_expiry_less_the_margin_and_at_most_the_ttl() {
        let completed = |expires_at, ttl| Completed {
            expires_at,
            ttl,
            record: record(),
        };
        let margin = SKEW_MARGIN.as_millis() as u64;
        let ms = |ms| Some(Duration::from_millis(ms));
        let cases = [
            (
                "just stored",
                completed(61_000, 60_000),
                at(1_000),
                ms(60_000 - margin),
            ),
            (
                "half gone",
                completed(61_000, 60_000),
                at(31_000),
                ms(30_000 - margin),
            ),
            (
                "within the margin",
                completed(61_000, 60_000),
                at(61_000 - margin),
                None,
            ),
            ("expired", completed(61_000, 60_000), at(70_000), None),
            // Local clock an hour behind Redis's: no more than the whole TTL.
            (
                "clock behind",
                completed(3_661_000, 60_000),
                at(1_000),
                ms(60_000),
            ),
            (
                "before 1970",
                completed(61_000, 60_000),
                SystemTime::UNIX_EPOCH - Duration::from_secs(1),
                None,
            ),
            (
                "far future",
                completed(u64::MAX, u64::MAX),
                at(0),
                ms(u64::MAX - margin),
            ),
        ];
        for (what, completed, now, expected) in cases {
            assert_eq!(completed.expires_in(now), expected, "{what}");
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::super::*;
        use crate::record::properties::{near_valid, record};

        proptest! {
            #[test]
            fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..128)) {
                check_decode(&bytes);
                check_decode(&[&b"TIC\x01"[..], &bytes].concat());
            }

            #[test]
            fn near_valid_envelopes_never_panic_and_round_trip(
                head in prop_oneof![8 => Just(b"TIC\x01".to_vec()), 1 => prop::collection::vec(any::<u8>(), 0..5)],
                expires_at in any::<u64>(),
                ttl in any::<u64>(),
                cut in prop_oneof![8 => Just(None), 1 => (0..HEADER).prop_map(Some)],
                inner in near_valid(),
            ) {
                let mut bytes = head;
                bytes.extend_from_slice(&expires_at.to_be_bytes());
                bytes.extend_from_slice(&ttl.to_be_bytes());
                // Now and then the header is cut short, so the record starts early.
                if let Some(cut) = cut {
                    bytes.truncate(cut.min(bytes.len()));
                }
                bytes.extend(inner);
                check_decode(&bytes);
            }

            #[test]
            fn valid_envelopes_round_trip(expires_at in any::<u64>(), ttl in any::<u64>(), record in record()) {
                let bytes = envelope(expires_at, ttl, &record);
                prop_assert_eq!(
                    Completed::decode(Bytes::from(bytes.clone())),
                    Ok(Completed { expires_at, ttl, record })
                );
                check_decode(&bytes);
            }
        }
    }
}
