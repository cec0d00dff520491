//! The in-flight marker: what a claimed key holds until it is completed or released.
//!
//! Pure logic. The layout is fixed because the Lua scripts read it in place:
//!
//! | bytes  | what                                                        |
//! |--------|-------------------------------------------------------------|
//! | 0..3   | magic `TIF` (a completed envelope starts with `TIC`)        |
//! | 3      | version, 1                                                  |
//! | 4      | flags: 1 once a waiter watches the claim (its end is published) |
//! | 5..13  | the owner's fence token, big-endian                         |
//! | 13..45 | the fingerprint of the owner's request                      |

use crate::{fingerprint::Fingerprint, record::RecordError, store::FenceToken};

/// The first bytes of every marker.
pub(super) const MAGIC: &[u8; 3] = b"TIF";
const VERSION: u8 = 1;
const LEN: usize = 45;

/// A claim in flight, as stored under its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Marker {
    pub(super) token: FenceToken,
    pub(super) fingerprint: Fingerprint,
}

impl Marker {
    pub(super) fn encode(&self) -> [u8; LEN] {
        let mut out = [0; LEN];
        out[..3].copy_from_slice(MAGIC);
        out[3] = VERSION;
        out[5..13].copy_from_slice(&self.token.get().to_be_bytes());
        out[13..].copy_from_slice(self.fingerprint.as_bytes());
        out
    }

    /// Decodes a marker; `bytes` must start with [`MAGIC`]. Any flags are accepted.
    pub(super) fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        super::check_head(bytes, MAGIC, VERSION)?;
        if bytes.len() < LEN {
            return Err(RecordError::Truncated);
        }
        if bytes.len() > LEN {
            return Err(RecordError::TrailingBytes);
        }
        let mut token = [0; 8];
        token.copy_from_slice(&bytes[5..13]);
        let mut fingerprint = [0; 32];
        fingerprint.copy_from_slice(&bytes[13..]);
        Ok(Self {
            token: FenceToken::new(u64::from_be_bytes(token)),
            fingerprint: Fingerprint::from_bytes(fingerprint),
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
        }
    }

    #[test]
    fn a_marker_round_trips_and_keeps_its_layout() {
        let encoded = marker().encode();
        assert_eq!(&encoded[..5], b"TIF\x01\x00");
        assert_eq!(&encoded[5..13], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(Marker::decode(&encoded), Ok(marker()));
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
        newer[3] = 2;
        let mut long = good.to_vec();
        long.push(0);
        let cases: [(&str, &[u8], RecordError); 6] = [
            ("empty", b"", RecordError::BadMagic),
            ("completed", b"TIC\x01", RecordError::BadMagic),
            ("magic only", b"TIF", RecordError::Truncated),
            ("newer version", &newer, RecordError::UnsupportedVersion(2)),
            ("trailing", &long, RecordError::TrailingBytes),
            ("short", &good[..44], RecordError::Truncated),
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
