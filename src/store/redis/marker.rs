//! The in-flight marker: what a claimed key holds until it is completed or released.
//!
//! Pure logic. The layout is fixed because the Lua scripts read it in place:
//!
//! | bytes  | what                                                        |
//! |--------|-------------------------------------------------------------|
//! | 0..3   | magic `TIF` (a completed envelope starts with `TIC`)        |
//! | 3      | version, 2                                                  |
//! | 4      | flags: 1 once a waiter watches the claim (its end is published) |
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

use crate::{fingerprint::Fingerprint, record::RecordError, store::FenceToken};

/// The first bytes of every marker.
pub(super) const MAGIC: &[u8; 3] = b"TIF";
const VERSION: u8 = 2;
const LEN: usize = 61;
const V1_LEN: usize = 45;

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
    pub(super) fn encode(&self) -> [u8; LEN] {
        let mut out = [0; LEN];
        out[..3].copy_from_slice(MAGIC);
        out[3] = VERSION;
        out[5..13].copy_from_slice(&self.token.get().to_be_bytes());
        out[13..45].copy_from_slice(self.fingerprint.as_bytes());
        out[45..53].copy_from_slice(&self.claimed_at.to_be_bytes());
        out[53..].copy_from_slice(&self.retention.to_be_bytes());
        out
    }

    /// Decodes a marker, version 2 or 1; `bytes` must start with [`MAGIC`]. Any flags are
    /// accepted.
    pub(super) fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let len = match super::check_head(bytes, MAGIC, VERSION) {
            Ok(()) => LEN,
            Err(RecordError::UnsupportedVersion(1)) => V1_LEN,
            Err(error) => return Err(error),
        };
        if bytes.len() < len {
            return Err(RecordError::Truncated);
        }
        if bytes.len() > len {
            return Err(RecordError::TrailingBytes);
        }
        let be_u64 = |at: usize| {
            let mut field = [0; 8];
            field.copy_from_slice(&bytes[at..at + 8]);
            u64::from_be_bytes(field)
        };
        let mut fingerprint = [0; 32];
        fingerprint.copy_from_slice(&bytes[13..45]);
        let (claimed_at, retention) = if len == LEN {
            (be_u64(45), be_u64(53))
        } else {
            (0, 0)
        };
        Ok(Self {
            token: FenceToken::new(be_u64(5)),
            fingerprint: Fingerprint::from_bytes(fingerprint),
            claimed_at,
            retention,
        })
    }
}

/// What the `marker` fuzz target and its proptest twins check: decoding never panics, and a
/// marker that decodes encodes to the same bytes but its flags (any flags decode). Panics
/// when that is broken.
#[cfg(any(test, fuzzing))]
pub(super) fn check_decode(bytes: &[u8]) {
    if let Ok(marker) = Marker::decode(bytes) {
        let encoded = marker.encode();
        assert_eq!(Marker::decode(&encoded), Ok(marker));
        assert_eq!(bytes.len(), LEN);
        assert_eq!(encoded[..4], bytes[..4]);
        assert_eq!(encoded[5..], bytes[5..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
            ("empty", b"", RecordError::BadMagic),
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
            check_decode(&bytes);
        }

        #[test]
        fn near_valid_markers_never_panic_and_round_trip(
            version in proptest::prop_oneof![4 => proptest::strategy::Just(VERSION), 1 => proptest::arbitrary::any::<u8>()],
            flags in proptest::arbitrary::any::<u8>(),
            rest in proptest::collection::vec(proptest::arbitrary::any::<u8>(), 36..44),
        ) {
            let mut bytes = MAGIC.to_vec();
            bytes.push(version);
            bytes.push(flags);
            bytes.extend(rest);
            check_decode(&bytes);
            let decoded = Marker::decode(&bytes);
            proptest::prop_assert_eq!(decoded.is_ok(), version == VERSION && bytes.len() == LEN);
        }
    }
}
