//! The request fingerprint: what a key's reuse is checked against.
//!
//! Pure logic: no tower or tokio in here.

use std::fmt;

use http::{Method, Uri};
use sha2::{Digest, Sha256};

/// A SHA-256 digest of a request's method, path, query and body.
///
/// A record remembers the fingerprint of the request that created it; a retry whose
/// fingerprint differs reuses the key for another payload and is refused (SPEC §4). Headers
/// are not part of it: clients legitimately change `Date`, tracing and auth headers on retry.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Computes the fingerprint of a request.
    ///
    /// ```
    /// use http::{Method, Uri};
    /// use tower_idempotency::Fingerprint;
    ///
    /// let uri = Uri::from_static("/charges?currency=eur");
    /// let a = Fingerprint::of(&Method::POST, &uri, br#"{"amount":100}"#);
    /// let b = Fingerprint::of(&Method::POST, &uri, br#"{"amount":200}"#);
    /// assert_ne!(a, b);
    /// ```
    pub fn of(method: &Method, uri: &Uri, body: &[u8]) -> Self {
        let mut hasher = FieldHasher::new();
        hasher.field(b'm', method.as_str().as_bytes());
        hasher.field(b'p', uri.path().as_bytes());
        hasher.field(b'q', uri.query().map_or(&b""[..], str::as_bytes));
        hasher.field(b'b', body);
        // The query's presence is a field of its own: `/a?` and `/a` are different URIs.
        hasher.put(&[u8::from(uri.query().is_some())]);
        Self(hasher.finish())
    }

    /// Wraps a digest read back from a store.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// SHA-256 over tagged, length-prefixed fields, so that no two inputs share a byte stream
/// (`/a` + `b=1` must not collide with `/a?b` + `=1`). Short fields are gathered in a stack
/// buffer and hashed together: one hash update for many fields instead of three per field.
pub(crate) struct FieldHasher {
    sha: Sha256,
    buffer: [u8; 256],
    len: usize,
}

impl FieldHasher {
    pub(crate) fn new() -> Self {
        Self {
            sha: Sha256::new(),
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

    fn put(&mut self, bytes: &[u8]) {
        if self.len + bytes.len() > self.buffer.len() {
            self.flush();
            if bytes.len() > self.buffer.len() {
                self.sha.update(bytes);
                return;
            }
        }
        self.buffer[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    fn flush(&mut self) {
        self.sha.update(&self.buffer[..self.len]);
        self.len = 0;
    }

    pub(crate) fn finish(mut self) -> [u8; 32] {
        self.flush();
        self.sha.finalize().into()
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({}…)", &crate::key::hex(&self.0)[..12])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(method: Method, uri: &str, body: &[u8]) -> Fingerprint {
        Fingerprint::of(&method, &uri.parse().unwrap(), body)
    }

    #[test]
    fn each_part_of_the_request_changes_the_fingerprint() {
        let base = fp(Method::POST, "/charges?a=1", b"{}");
        let cases = [
            (
                "same request",
                fp(Method::POST, "/charges?a=1", b"{}"),
                true,
            ),
            ("method", fp(Method::PATCH, "/charges?a=1", b"{}"), false),
            ("path", fp(Method::POST, "/refunds?a=1", b"{}"), false),
            ("query", fp(Method::POST, "/charges?a=2", b"{}"), false),
            ("no query", fp(Method::POST, "/charges", b"{}"), false),
            ("body", fp(Method::POST, "/charges?a=1", b"{ }"), false),
            ("empty body", fp(Method::POST, "/charges?a=1", b""), false),
            (
                "authority is ignored",
                fp(Method::POST, "http://h/charges?a=1", b"{}"),
                true,
            ),
        ];
        for (what, other, equal) in cases {
            assert_eq!(base == other, equal, "{what}");
        }
    }

    #[test]
    fn field_boundaries_are_unambiguous() {
        assert_ne!(
            fp(Method::POST, "/a?b", b"c"),
            fp(Method::POST, "/a?bc", b"")
        );
        assert_ne!(fp(Method::POST, "/a?", b""), fp(Method::POST, "/a", b""));
        assert_ne!(fp(Method::POST, "/ab", b""), fp(Method::POST, "/a", b"b"));
    }

    #[test]
    fn gathering_fields_in_a_buffer_hashes_the_same_bytes_as_feeding_them_one_by_one() {
        let long = vec![7u8; 1000];
        let fields: [(u8, &[u8]); 5] = [
            (b'a', b"x"),
            (b'b', &long),
            (b'c', b""),
            (b'd', &long[..250]),
            (b'e', b"yz"),
        ];
        let mut gathered = FieldHasher::new();
        let mut plain = Sha256::new();
        for (tag, bytes) in fields {
            gathered.field(tag, bytes);
            plain.update([tag]);
            plain.update((bytes.len() as u64).to_be_bytes());
            plain.update(bytes);
        }
        let plain: [u8; 32] = plain.finalize().into();
        assert_eq!(gathered.finish(), plain);
    }

    #[test]
    fn fingerprints_are_stable_across_versions() {
        // Stored records carry fingerprints: a change to how they are computed would turn
        // every retry after an upgrade into a 409.
        let fp = Fingerprint::of(&Method::POST, &"/charges?a=1".parse().unwrap(), b"{}");
        assert_eq!(
            crate::key::hex(fp.as_bytes()),
            "2007476a50d446cc42cc5d0b124506f84ff0d05b4c1c1ed040bb4d1402c3035c"
        );
    }

    #[test]
    fn the_digest_round_trips_through_bytes() {
        let a = fp(Method::POST, "/", b"x");
        assert_eq!(Fingerprint::from_bytes(*a.as_bytes()), a);
    }
}
