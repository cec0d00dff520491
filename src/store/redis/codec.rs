//! What a key holds, byte for byte: the in-flight marker and the completed envelope. Pure
//! logic. The layouts are fixed because the Lua scripts read and write them in place; both
//! start with the header every value of this crate starts with (three bytes of magic, then a
//! version), checked by the same function as a [`Record`]'s.
//!
//! # The in-flight marker
//!
//! What a claimed key holds until it is completed or released.
//!
//! | bytes  | what                                                        |
//! |--------|-------------------------------------------------------------|
//! | 0..3   | magic `TIF` (a completed envelope starts with `TIC`)        |
//! | 3      | version, 2                                                  |
//! | 4      | flags: 1 once another request found the claim in flight (its end is published) |
//! | 5..13  | the owner's fence token, big-endian                         |
//! | 13..45 | the fingerprint of the owner's request                      |
//! | 45..53 | when it was claimed: Unix ms by the claiming instance's clock |
//! | 53..61 | retention: how long the key outlives the lease, in ms       |
//!
//! The key expires `lease + retention` after its last claim or renewal, so the lease ends
//! when the key's remaining time (`PTTL`, Redis's clock) falls to the retention: an abandoned
//! claim stays readable for the retention, to be reported as abandoned.
//!
//! Version 1 (45 bytes, no claim time, no retention: the key expired with its lease) is still
//! read, so that claims made before an upgrade are honoured during a rolling deploy.
//!
//! # The completed envelope
//!
//! What a key holds once its request completed. The complete script writes it (the expiry
//! from Redis's own `TIME`); the claim reads it back, since a claim is a plain `SET … NX GET`
//! that returns the value and not the key's remaining lifetime.
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

use super::error::Unexpected;
use crate::{
    fingerprint::Fingerprint,
    record::{Record, RecordError, check_head},
    store::error::StoreError,
    store::{Claim, FenceToken},
};

/// The first bytes of every marker.
pub(super) const MARKER_MAGIC: &[u8; 3] = b"TIF";
const MARKER_VERSION: u8 = 2;
/// A marker's length, in bytes.
pub(super) const MARKER_LEN: usize = 61;
const MARKER_V1_LEN: usize = 45;

/// The first bytes of every completed envelope.
pub(super) const ENVELOPE_MAGIC: &[u8; 3] = b"TIC";
const ENVELOPE_VERSION: u8 = 1;
const ENVELOPE_HEADER: usize = 20;

/// Taken off every remaining lifetime, so that clocks kept in step by NTP (within a few
/// milliseconds of each other) never let a cache outlive Redis. A negligible share of any
/// TTL worth caching for.
pub(super) const SKEW_MARGIN: Duration = Duration::from_millis(100);

/// What a held key's value says, as of `now` by the local clock: a claim in flight, or a
/// completed record and how long it has left.
pub(super) fn held_by(value: Vec<u8>, now: SystemTime) -> Result<Claim, StoreError> {
    if value.starts_with(MARKER_MAGIC) {
        let marker = Marker::decode(&value)?;
        return Ok(Claim::InFlight {
            fingerprint: marker.fingerprint,
        });
    }
    if value.starts_with(ENVELOPE_MAGIC) {
        let completed = Completed::decode(Bytes::from(value))?;
        let expires_in = completed.expires_in(now);
        return Ok(Claim::Completed {
            record: completed.record,
            expires_in,
        });
    }
    Err(StoreError::corrupt(Unexpected::Foreign))
}

/// A claim in flight, as stored under its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Marker {
    pub(super) token: FenceToken,
    pub(super) fingerprint: Fingerprint,
    /// Unix ms by the claimant's clock; 0 when unknown (version 1).
    pub(super) claimed_at: u64,
    /// How long the key outlives the lease, in ms; 0 for version 1.
    pub(super) retention: u64,
}

impl Marker {
    pub(super) fn encode(&self) -> [u8; MARKER_LEN] {
        let mut out = [0; MARKER_LEN];
        out[..3].copy_from_slice(MARKER_MAGIC);
        out[3] = MARKER_VERSION;
        out[5..13].copy_from_slice(&self.token.get().to_be_bytes());
        out[13..45].copy_from_slice(self.fingerprint.as_bytes());
        out[45..53].copy_from_slice(&self.claimed_at.to_be_bytes());
        out[53..].copy_from_slice(&self.retention.to_be_bytes());
        out
    }

    /// Decodes a marker, version 2 or 1; `bytes` must start with [`MARKER_MAGIC`]. Any flags
    /// are accepted.
    pub(super) fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let len = match check_head(bytes, MARKER_MAGIC, MARKER_VERSION) {
            Ok(()) => MARKER_LEN,
            Err(RecordError::UnsupportedVersion(1)) => MARKER_V1_LEN,
            Err(error) => return Err(error),
        };
        if bytes.len() < len {
            return Err(RecordError::Truncated);
        }
        if bytes.len() > len {
            return Err(RecordError::TrailingBytes);
        }
        let mut fingerprint = [0; 32];
        fingerprint.copy_from_slice(&bytes[13..45]);
        let field = |at| be_u64(bytes, at).unwrap_or_default();
        let (claimed_at, retention) = if len == MARKER_LEN {
            (field(45), field(53))
        } else {
            (0, 0)
        };
        Ok(Self {
            token: FenceToken::new(field(5)),
            fingerprint: Fingerprint::from_bytes(fingerprint),
            claimed_at,
            retention,
        })
    }
}

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
    /// Decodes an envelope; `bytes` must start with [`ENVELOPE_MAGIC`]. The record is not
    /// copied.
    pub(super) fn decode(mut bytes: Bytes) -> Result<Self, RecordError> {
        check_head(&bytes, ENVELOPE_MAGIC, ENVELOPE_VERSION)?;
        let header = bytes.split_to(ENVELOPE_HEADER.min(bytes.len()));
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

/// What the `marker` fuzz target checks (see [`check_marker_decode`]), and that a held value
/// starting like a marker is read without panicking.
#[cfg(any(test, fuzzing))]
pub(crate) fn check_marker(bytes: &[u8]) {
    check_marker_decode(bytes);
    let _ = held_by([MARKER_MAGIC.as_slice(), bytes].concat(), SystemTime::now());
}

/// What the `envelope` fuzz target checks (see [`check_envelope_decode`]), and that a held
/// value is read without panicking whatever it holds.
#[cfg(any(test, fuzzing))]
pub(crate) fn check_envelope(bytes: &[u8]) {
    check_envelope_decode(bytes);
    let _ = held_by(bytes.to_vec(), SystemTime::now());
}

/// What the `marker` fuzz target and its proptest twins check: decoding never panics, and a
/// marker that decodes encodes to the same bytes but its flags (any flags decode); a version
/// 1 marker (an older instance's) encodes as version 2, its token and fingerprint kept and
/// its claim time and retention unknown (0). Panics when that is broken.
#[cfg(any(test, fuzzing))]
fn check_marker_decode(bytes: &[u8]) {
    if let Ok(marker) = Marker::decode(bytes) {
        let encoded = marker.encode();
        assert_eq!(Marker::decode(&encoded), Ok(marker));
        if bytes.get(3) == Some(&1) {
            assert_eq!(bytes.len(), MARKER_V1_LEN);
            assert_eq!(encoded[5..MARKER_V1_LEN], bytes[5..]);
            assert_eq!((marker.claimed_at, marker.retention), (0, 0));
            return;
        }
        assert_eq!(bytes.len(), MARKER_LEN);
        assert_eq!(encoded[..4], bytes[..4]);
        assert_eq!(encoded[5..], bytes[5..]);
    }
}

/// What the `envelope` fuzz target and its proptest twins check: decoding never panics; an
/// envelope that decodes is rebuilt, as the script writes it, into one that decodes the same;
/// and the lifetime it reports is never zero nor more than its TTL, whatever the clock says.
/// Panics when that is broken.
#[cfg(any(test, fuzzing))]
fn check_envelope_decode(bytes: &[u8]) {
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
    use crate::store::error::StoreErrorKind;

    #[test]
    fn a_held_value_is_a_claim_in_flight_or_a_record_and_anything_else_corrupt() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let now_ms = 1_700_000_000_000;
        let fingerprint = Fingerprint::from_bytes([7; 32]);
        let marker = Marker {
            token: FenceToken::new(9),
            fingerprint,
            claimed_at: 1,
            retention: 2,
        };
        let in_flight = held_by(marker.encode().to_vec(), now);
        assert_eq!(in_flight.ok(), Some(Claim::InFlight { fingerprint }));

        let record = Record::not_replayable(fingerprint, http::StatusCode::OK);
        let completed = held_by(envelope(now_ms + 5_000, 60_000, &record), now);
        assert_eq!(
            completed.ok(),
            Some(Claim::Completed {
                record: record.clone(),
                expires_in: Some(Duration::from_millis(5_000) - SKEW_MARGIN),
            })
        );
        let expired = held_by(envelope(now_ms - 1, 60_000, &record), now);
        assert!(matches!(
            expired,
            Ok(Claim::Completed {
                expires_in: None,
                ..
            })
        ));

        let corrupt: [&[u8]; 7] = [
            b"{\"status\":200}",
            b"",
            b"TIF\x03",
            b"TIC\x01\x00",
            b"TIC\x09",
            &record.encode(),
            &envelope(now_ms, 60_000, &record)[..30],
        ];
        for value in corrupt {
            assert_eq!(
                held_by(value.to_vec(), now).map_err(|e| e.kind()),
                Err(StoreErrorKind::Corrupt),
                "{value:?}"
            );
        }
    }

    mod marker {
        use super::super::*;
        use http::{Method, Uri};

        fn marker() -> Marker {
            Marker {
                token: FenceToken::new(0x0102_0304_0506_0708),
                fingerprint: Fingerprint::of(&Method::POST, &Uri::from_static("/charges"), b"{}"),
                claimed_at: 1_700_000_000_000,
                retention: 86_400_000,
            }
        }

        #[test]
        fn a_marker_round_trips_and_keeps_its_layout() {
            let encoded = marker().encode();
            assert_eq!(&encoded[..5], b"TIF\x02\x00");
            assert_eq!(&encoded[5..13], &[1, 2, 3, 4, 5, 6, 7, 8]);
            assert_eq!(&encoded[45..53], &1_700_000_000_000u64.to_be_bytes());
            assert_eq!(&encoded[53..], &86_400_000u64.to_be_bytes());
            assert_eq!(Marker::decode(&encoded), Ok(marker()));
        }

        #[test]
        fn a_version_1_marker_is_read_without_claim_time_or_retention() {
            let mut v1 = b"TIF\x01\x00".to_vec();
            v1.extend_from_slice(&marker().token.get().to_be_bytes());
            v1.extend_from_slice(marker().fingerprint.as_bytes());
            let expected = Marker {
                claimed_at: 0,
                retention: 0,
                ..marker()
            };
            assert_eq!(Marker::decode(&v1), Ok(expected));
            // What the proptest twin of the fuzz target once drew (a 1 in 40 run flake).
            check_marker_decode(&v1);
            v1.push(0);
            assert_eq!(Marker::decode(&v1), Err(RecordError::TrailingBytes));
        }

        #[test]
        fn a_watched_marker_decodes_the_same() {
            let mut encoded = marker().encode();
            encoded[4] = 1;
            assert_eq!(Marker::decode(&encoded), Ok(marker()));
        }

        #[test]
        fn foreign_truncated_or_unknown_markers_are_errors() {
            let good = marker().encode();
            let mut newer = good;
            newer[3] = 3;
            let mut long = good.to_vec();
            long.push(0);
            let cases: [(&str, &[u8], RecordError); 6] = [
                ("empty", b"", RecordError::Truncated),
                ("completed", b"TIC\x01", RecordError::BadMagic),
                ("magic only", b"TIF", RecordError::Truncated),
                ("newer version", &newer, RecordError::UnsupportedVersion(3)),
                ("trailing", &long, RecordError::TrailingBytes),
                ("short", &good[..60], RecordError::Truncated),
            ];
            for (what, bytes, expected) in cases {
                assert_eq!(Marker::decode(bytes), Err(expected), "{what}");
            }
        }

        #[test]
        fn every_truncation_of_a_marker_is_an_error() {
            let good = marker().encode();
            for len in 0..good.len() {
                assert!(
                    Marker::decode(&good[..len]).is_err(),
                    "prefix of {len} bytes"
                );
            }
        }

        proptest::proptest! {
            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::arbitrary::any::<u8>(), 0..64)) {
                check_marker_decode(&bytes);
            }

            #[test]
            fn near_valid_markers_never_panic_and_round_trip(
                version in proptest::prop_oneof![4 => proptest::strategy::Just(MARKER_VERSION), 1 => proptest::arbitrary::any::<u8>()],
                flags in proptest::arbitrary::any::<u8>(),
                rest in proptest::collection::vec(proptest::arbitrary::any::<u8>(), 36..44),
            ) {
                let mut bytes = MARKER_MAGIC.to_vec();
                bytes.push(version);
                bytes.push(flags);
                bytes.extend(rest);
                check_marker_decode(&bytes);
                let decoded = Marker::decode(&bytes);
                let sound = (version == MARKER_VERSION && bytes.len() == MARKER_LEN)
                    || (version == 1 && bytes.len() == MARKER_V1_LEN);
                proptest::prop_assert_eq!(decoded.is_ok(), sound);
            }
        }
    }

    mod envelope {
        use super::super::*;
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
            bad_record[ENVELOPE_HEADER] = b'X';
            let mut long = good.clone();
            long.push(0);
            let cases: [(&str, &[u8], RecordError); 9] = [
                ("empty", b"", RecordError::Truncated),
                ("marker", b"TIF\x01\x00", RecordError::BadMagic),
                ("bare record", &record().encode(), RecordError::BadMagic),
                ("magic only", b"TIC", RecordError::Truncated),
                ("newer version", &newer, RecordError::UnsupportedVersion(2)),
                (
                    "short header",
                    &good[..ENVELOPE_HEADER - 1],
                    RecordError::Truncated,
                ),
                (
                    "no record",
                    &good[..ENVELOPE_HEADER],
                    RecordError::Truncated,
                ),
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

            use super::super::super::*;
            use crate::record::properties::{near_valid, record};

            proptest! {
                #[test]
                fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..128)) {
                    check_envelope_decode(&bytes);
                    check_envelope_decode(&[&b"TIC\x01"[..], &bytes].concat());
                }

                #[test]
                fn near_valid_envelopes_never_panic_and_round_trip(
                    head in prop_oneof![8 => Just(b"TIC\x01".to_vec()), 1 => prop::collection::vec(any::<u8>(), 0..5)],
                    expires_at in any::<u64>(),
                    ttl in any::<u64>(),
                    cut in prop_oneof![8 => Just(None), 1 => (0..ENVELOPE_HEADER).prop_map(Some)],
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
                    check_envelope_decode(&bytes);
                }

                #[test]
                fn valid_envelopes_round_trip(expires_at in any::<u64>(), ttl in any::<u64>(), record in record()) {
                    let bytes = envelope(expires_at, ttl, &record);
                    prop_assert_eq!(
                        Completed::decode(Bytes::from(bytes.clone())),
                        Ok(Completed { expires_at, ttl, record })
                    );
                    check_envelope_decode(&bytes);
                }
            }
        }
    }
}
