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
        let mut hasher = Sha256::new();
        // Each field is length-prefixed so that no two requests share an input stream
        // (`/a` + `b=1` must not collide with `/a?b` + `=1`).
        for (tag, field) in [
            (b'm', method.as_str().as_bytes()),
            (b'p', uri.path().as_bytes()),
            (b'q', uri.query().map_or(&b""[..], str::as_bytes)),
            (b'b', body),
        ] {
            hasher.update([tag]);
            hasher.update((field.len() as u64).to_be_bytes());
            hasher.update(field);
        }
        // The query's presence is a field of its own: `/a?` and `/a` are different URIs.
        hasher.update([u8::from(uri.query().is_some())]);
        Self(hasher.finalize().into())
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
    fn the_digest_round_trips_through_bytes() {
        let a = fp(Method::POST, "/", b"x");
        assert_eq!(Fingerprint::from_bytes(*a.as_bytes()), a);
    }
}
