//! Entry points for the fuzz targets in `fuzz/`. Compiled only with `--cfg fuzzing` (which
//! cargo-fuzz sets) and for the crate's own tests: not part of the API, and absent from every
//! build of the crate for use.
//!
//! Each one feeds arbitrary bytes to a decoder the way the crate does with bytes from a
//! request or a store, and panics only when a property is broken: a decoder panicked, or
//! something that decoded does not round-trip. The proptest twins in the unit tests check the
//! same properties on every `cargo test`.

/// Key parsing: `IdempotencyKey::parse` and reading the key header.
pub fn key(bytes: &[u8]) {
    crate::key::check_parse(bytes);
}

/// `Record::decode`, and `encode` of what decodes.
pub fn record(bytes: &[u8]) {
    crate::record::check_decode(bytes);
}

/// RedisStore's in-flight marker decoder.
#[cfg(feature = "redis")]
pub fn marker(bytes: &[u8]) {
    crate::store::redis::check_marker(bytes);
}

/// RedisStore's completed-envelope decoder, and reading any value a key may hold.
#[cfg(feature = "redis")]
pub fn envelope(bytes: &[u8]) {
    crate::store::redis::check_envelope(bytes);
}

#[cfg(test)]
mod tests {
    /// The fuzz targets' seeds (`fuzz/corpus` is not kept), run through each entry point: the
    /// targets build and pass on stable, in every `cargo test`.
    #[test]
    fn the_entry_points_accept_their_seeds_and_garbage() {
        let fingerprint = crate::Fingerprint::from_bytes([1; 32]);
        let mut headers = http::HeaderMap::new();
        headers.append("set-cookie", http::HeaderValue::from_static("a=1"));
        let body = bytes::Bytes::from_static(b"{}");
        let record =
            crate::Record::response(fingerprint, http::StatusCode::OK, &headers, body, None);
        let record = record.encode();
        let garbage: &[&[u8]] = &[
            b"", b"\xff", b"TIR\x01", b"TIF\x01", b"TIC\x01", b"\"", b" ",
        ];
        for bytes in garbage
            .iter()
            .copied()
            .chain([&record[..], b"8e03978e", b"\"k\";p=1"])
        {
            super::key(bytes);
            super::record(bytes);
            #[cfg(feature = "redis")]
            {
                super::marker(bytes);
                super::envelope(bytes);
                super::envelope(&[&b"TIC\x01"[..], &[0; 16], &record].concat());
            }
        }
    }
}
