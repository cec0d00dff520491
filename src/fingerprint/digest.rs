//! The hashing that fingerprints and storage keys share: SHA-256 over tagged fields, or
//! HMAC-SHA-256 under a server secret; and the hex digests are written in.
//!
//! Pure logic: no tower or tokio in here, and no other module of the crate: `key`,
//! `fingerprint` and `canonical` build on it, never the other way round.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// A server secret that keys every digest: HMAC-SHA-256 instead of SHA-256, so that a dump
/// of the store cannot be used to confirm a guessed key or body.
///
/// The HMAC's inner and outer pads are hashed once, here; each request clones the keyed state
/// (a copy, no allocation).
#[derive(Clone)]
pub(crate) struct Secret(Hmac<Sha256>);

impl Secret {
    pub(crate) fn new(secret: &[u8]) -> Self {
        // HMAC takes keys of any length (longer ones are hashed first): this cannot fail.
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        Self(mac)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// SHA-256 (or HMAC-SHA-256) over tagged, length-prefixed fields, so that no two inputs share
/// a byte stream (`/a` + `b=1` must not collide with `/a?b` + `=1`). Short fields are gathered
/// in a stack buffer and hashed together: one hash update for many fields instead of three
/// per field.
pub(crate) struct FieldHasher {
    state: State,
    buffer: [u8; 256],
    len: usize,
}

enum State {
    Plain(Sha256),
    Keyed(Hmac<Sha256>),
}

impl FieldHasher {
    /// Plain SHA-256.
    pub(crate) fn new() -> Self {
        Self::with_state(State::Plain(Sha256::new()))
    }

    /// HMAC-SHA-256 keyed by `secret`.
    pub(crate) fn keyed(secret: &Secret) -> Self {
        Self::with_state(State::Keyed(secret.0.clone()))
    }

    /// Keyed by `secret` if there is one, plain otherwise.
    pub(crate) fn for_secret(secret: Option<&Secret>) -> Self {
        secret.map_or_else(Self::new, Self::keyed)
    }

    fn with_state(state: State) -> Self {
        Self {
            state,
            buffer: [0; 256],
            len: 0,
        }
    }

    /// Adds a field: its tag, its length, its bytes.
    pub(crate) fn field(&mut self, tag: u8, bytes: &[u8]) {
        let mut prefix = [tag; 9];
        prefix[1..].copy_from_slice(&(bytes.len() as u64).to_be_bytes());
        self.put(&prefix);
        self.put(bytes);
    }

    /// Adds bytes as they are, without a tag or length: only for fixed-size values.
    pub(crate) fn put(&mut self, bytes: &[u8]) {
        if self.len + bytes.len() > self.buffer.len() {
            self.flush();
            if bytes.len() > self.buffer.len() {
                self.update(bytes);
                return;
            }
        }
        self.buffer[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    fn update(&mut self, bytes: &[u8]) {
        match &mut self.state {
            State::Plain(sha) => sha.update(bytes),
            State::Keyed(mac) => mac.update(bytes),
        }
    }

    fn flush(&mut self) {
        let len = std::mem::take(&mut self.len);
        let buffer = self.buffer;
        self.update(&buffer[..len]);
    }

    pub(crate) fn finish(mut self) -> [u8; 32] {
        self.flush();
        match self.state {
            State::Plain(sha) => sha.finalize().into(),
            State::Keyed(mac) => mac.finalize().into_bytes().into(),
        }
    }
}

/// Bytes as lowercase hex digits, two a byte.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    out
}

/// Appends bytes to `out` as lowercase hex digits, two a byte.
pub(crate) fn push_hex(out: &mut String, bytes: &[u8]) {
    // Into a buffer on the stack, then appended at once: `String::push` checks room and
    // encodes UTF-8 for every character.
    let mut buffer = [0; 128];
    for chunk in bytes.chunks(buffer.len() / 2) {
        let hex = &mut buffer[..2 * chunk.len()];
        write_hex(hex, chunk);
        // Hex digits are ASCII: this never fails.
        out.push_str(std::str::from_utf8(hex).unwrap_or_default());
    }
}

/// Writes bytes as lowercase hex digits into the start of `out`, two a byte (as many as fit).
pub(crate) fn write_hex(out: &mut [u8], bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0x0f)];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(long: &[u8]) -> [(u8, &[u8]); 5] {
        [
            (b'a', b"x"),
            (b'b', long),
            (b'c', b""),
            (b'd', &long[..250]),
            (b'e', b"yz"),
        ]
    }

    #[test]
    fn gathering_fields_in_a_buffer_hashes_the_same_bytes_as_feeding_them_one_by_one() {
        let long = vec![7u8; 1000];
        let mut gathered = FieldHasher::new();
        let mut plain = Sha256::new();
        for (tag, bytes) in fields(&long) {
            gathered.field(tag, bytes);
            plain.update([tag]);
            plain.update((bytes.len() as u64).to_be_bytes());
            plain.update(bytes);
        }
        let plain: [u8; 32] = plain.finalize().into();
        assert_eq!(gathered.finish(), plain);
    }

    /// SHA-256 of `chunks` put one after the other, through the buffer.
    fn put_in_chunks(chunks: &[&[u8]]) -> [u8; 32] {
        let mut hasher = FieldHasher::new();
        for chunk in chunks {
            hasher.put(chunk);
        }
        hasher.finish()
    }

    #[test]
    fn bytes_put_in_any_chunks_hash_as_their_concatenation() {
        let bytes: Vec<u8> = (0..=255).cycle().take(1200).collect();
        // Chunk sizes that end exactly at, just before and just past the buffer's end, that
        // start with more than it holds, and one byte at a time past it.
        let splits: &[&[usize]] = &[
            &[300],
            &[256, 1],
            &[255, 1, 1],
            &[255, 2],
            &[1; 300],
            &[0, 256, 0, 256],
            &[100, 156, 257, 1],
            &[9, 700, 3],
        ];
        for sizes in splits {
            let mut rest = &bytes[..];
            let mut chunks = Vec::new();
            for &size in *sizes {
                let (chunk, tail) = rest.split_at(size);
                chunks.push(chunk);
                rest = tail;
            }
            let whole: [u8; 32] = Sha256::digest(chunks.concat()).into();
            assert_eq!(put_in_chunks(&chunks), whole, "chunks of {sizes:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_chunks_hash_as_their_concatenation(
            chunks in proptest::collection::vec(proptest::collection::vec(proptest::arbitrary::any::<u8>(), 0..600), 0..8),
        ) {
            let chunks: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            let whole: [u8; 32] = Sha256::digest(chunks.concat()).into();
            proptest::prop_assert_eq!(put_in_chunks(&chunks), whole);
        }
    }

    #[test]
    fn a_keyed_hasher_is_hmac_sha256_over_the_same_fields() {
        let long = vec![9u8; 700];
        let secret = b"server secret, 32 bytes or more..";
        let mut keyed = FieldHasher::keyed(&Secret::new(secret));
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap();
        for (tag, bytes) in fields(&long) {
            keyed.field(tag, bytes);
            mac.update(&[tag]);
            mac.update(&(bytes.len() as u64).to_be_bytes());
            mac.update(bytes);
        }
        let expected: [u8; 32] = mac.finalize().into_bytes().into();
        assert_eq!(keyed.finish(), expected);
    }

    #[test]
    fn the_keyed_state_matches_rfc_4231() {
        // RFC 4231, test case 2: key "Jefe", data "what do ya want for nothing?".
        let mut keyed = FieldHasher::keyed(&Secret::new(b"Jefe"));
        keyed.put(b"what do ya want for nothing?");
        assert_eq!(
            hex(&keyed.finish()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn different_secrets_and_no_secret_give_different_digests() {
        let digest = |secret: Option<&[u8]>| {
            let secret = secret.map(Secret::new);
            let mut hasher = FieldHasher::for_secret(secret.as_ref());
            hasher.field(b'k', b"key-1");
            hasher.finish()
        };
        let plain = digest(None);
        let a = digest(Some(b"secret a"));
        let b = digest(Some(b"secret b"));
        assert_ne!(plain, a);
        assert_ne!(a, b);
        assert_eq!(a, digest(Some(b"secret a")));
    }

    #[test]
    fn hex_is_lowercase_and_two_digits_a_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
    }

    #[test]
    fn push_hex_appends_to_what_is_there() {
        let mut out = String::from("prefix:");
        push_hex(&mut out, &[0x01, 0xbc]);
        assert_eq!(out, "prefix:01bc");
    }

    #[test]
    fn push_hex_spells_every_byte_of_a_long_input() {
        let bytes: Vec<u8> = (0..=255).chain(0..=255).collect();
        let mut out = String::from(":");
        push_hex(&mut out, &bytes);
        let expected: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
        assert_eq!(out, format!(":{expected}"));
    }

    #[test]
    fn a_secret_is_never_printed() {
        assert_eq!(format!("{:?}", Secret::new(b"hunter2")), "Secret(..)");
    }
}
