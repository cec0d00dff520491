//! Which key a request carries ([`KeyRef`]), and the [`StorageKey`] a store is addressed
//! by: a digest of the key, whose it is ([`Scope`]), and the route the client sent it to.

use std::fmt;

use http::{Method, request::Parts};

use super::{IdempotencyKey, Scope, delivery::Delivery, origin::sent_uri};
use crate::{
    fingerprint::Fingerprint,
    fingerprint::digest::{FieldHasher, hex},
};

/// The hasher a storage key is derived with.
pub(crate) type KeyHasher = FieldHasher;

/// Which key a request carries.
#[derive(Debug, Clone, Copy)]
pub(crate) enum KeyRef<'a> {
    /// Sent by the client (header or another key source).
    Client(&'a IdempotencyKey),
    /// Derived from the request itself (no key sent).
    Derived(&'a Fingerprint),
    /// Found by a webhook preset: the key, scoped by what tells the event's subscribers apart.
    Delivered(&'a IdempotencyKey, Delivery),
}

/// The address of a record in a store: a SHA-256 digest of (scope, method, path, key), so the
/// same key on another route or from another principal is another record, and neither keys
/// nor credentials are ever stored in clear.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct StorageKey([u8; 32]);

impl std::hash::Hash for StorageKey {
    // The digest is uniformly spread already: eight of its bytes are plenty for a hash table,
    // and four times cheaper to feed to the table's keyed hasher than all 32. The hasher stays
    // keyed, so keys ground to collide in a table cannot be chosen from outside.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut prefix = [0; 8];
        prefix.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(prefix));
    }
}

impl StorageKey {
    #[cfg(test)]
    pub(crate) fn derive(scope: &Scope, method: &Method, parts: &Parts, key: KeyRef<'_>) -> Self {
        Self::derive_with(KeyHasher::new(), scope, false, method, parts, key)
    }

    /// Derives the address with `hasher`: plain SHA-256, or HMAC-SHA-256 under a secret;
    /// `session`: the MCP session is part of the default scope (JSON-RPC mode).
    pub(crate) fn derive_with(
        mut hasher: KeyHasher,
        scope: &Scope,
        session: bool,
        method: &Method,
        parts: &Parts,
        key: KeyRef<'_>,
    ) -> Self {
        hasher.field(b'd', b"tower-idempotency storage key v1");
        let derived = matches!(key, KeyRef::Derived(_));
        scope.hash(parts, derived, session, &mut hasher);
        hasher.field(b'm', method.as_str().as_bytes());
        hasher.field(b'p', sent_uri(parts).path().as_bytes());
        match key {
            KeyRef::Client(key) => hasher.field(b'k', key.as_str().as_bytes()),
            KeyRef::Derived(fingerprint) => hasher.field(b'f', fingerprint.as_bytes()),
            KeyRef::Delivered(key, delivery) => {
                hasher.field(b'k', key.as_str().as_bytes());
                delivery.hash(&parts.headers, &mut hasher);
            }
        }
        Self(hasher.finish())
    }

    /// Wraps a digest, for stores that read keys back.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The digest as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

impl fmt::Debug for StorageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorageKey({}…)", &self.to_hex()[..12])
    }
}

#[cfg(test)]
mod tests {
    use http::Request;

    use super::*;

    fn parts(method: Method, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    fn storage_key(scope: &Scope, parts: &Parts, key: &str) -> StorageKey {
        let key = IdempotencyKey::parse(key.as_bytes()).unwrap();
        StorageKey::derive(scope, &parts.method, parts, KeyRef::Client(&key))
    }

    #[test]
    fn the_storage_key_separates_route_method_principal_and_key() {
        let scope = Scope::Credentials;
        let base = parts(
            Method::POST,
            "/charges",
            &[("authorization", "Bearer alice")],
        );
        let same = parts(
            Method::POST,
            "/charges?x=1",
            &[("authorization", "Bearer alice")],
        );
        let route = parts(
            Method::POST,
            "/refunds",
            &[("authorization", "Bearer alice")],
        );
        let method = parts(
            Method::PATCH,
            "/charges",
            &[("authorization", "Bearer alice")],
        );
        let principal = parts(Method::POST, "/charges", &[("authorization", "Bearer bob")]);
        let anonymous = parts(Method::POST, "/charges", &[]);
        let k = storage_key(&scope, &base, "k1");
        assert_eq!(
            k,
            storage_key(&scope, &same, "k1"),
            "the query is not part of the address"
        );
        assert_ne!(k, storage_key(&scope, &base, "k2"));
        assert_ne!(k, storage_key(&scope, &route, "k1"));
        assert_ne!(k, storage_key(&scope, &method, "k1"));
        assert_ne!(k, storage_key(&scope, &principal, "k1"));
        assert_ne!(k, storage_key(&scope, &anonymous, "k1"));
    }

    #[test]
    fn storage_keys_are_stable_across_versions() {
        // Stores are addressed by these digests: a change to how they are computed would
        // orphan every stored record (and let every retry after an upgrade execute again).
        let head = parts(
            Method::POST,
            "/charges",
            &[("authorization", "Bearer alice")],
        );
        assert_eq!(
            storage_key(&Scope::Credentials, &head, "k1").to_hex(),
            "1ff42507437fb8f75ea7b329e75da3deeff644911e4f06e49b1fac19f6412f81"
        );
    }

    #[test]
    fn addresses_of_requests_earlier_versions_scoped_alike_are_unchanged() {
        // Digests as the previous version computed them (its derivation, redone by hand):
        // a client key without credentials, a derived key under Authorization and Cookie,
        // and a derived key without either (never claimed now, but its digest is the same).
        let scope = Scope::Credentials;
        let none = parts(Method::POST, "/charges", &[]);
        assert_eq!(
            storage_key(&scope, &none, "k1").to_hex(),
            "450c8ebc8d1ec0cf8760c3c730d159b1d33d35628fc7c20f00f282717be5e490"
        );
        let fingerprint = Fingerprint::from_bytes([7; 32]);
        let derived =
            |p: &Parts| StorageKey::derive(&scope, &p.method, p, KeyRef::Derived(&fingerprint));
        let browser = parts(
            Method::POST,
            "/charges",
            &[
                ("authorization", "Bearer alice"),
                ("cookie", "session=alice"),
            ],
        );
        assert_eq!(
            derived(&browser).to_hex(),
            "9ccaf1a4e21528960542dc6fdee6c5e6cf126e0c7af13a80f0d3f7fdf86fdb09"
        );
        assert_eq!(
            derived(&none).to_hex(),
            "99d449841ded453aff1702178408b33a658d1da8c9a1a41b0d3ba4e34d8ca947"
        );
    }

    #[test]
    fn cookies_scope_client_keys_too() {
        let scope = Scope::Credentials;
        let alice = parts(Method::POST, "/", &[("cookie", "session=alice")]);
        let bob = parts(Method::POST, "/", &[("cookie", "session=bob")]);
        assert_ne!(
            storage_key(&scope, &alice, "k"),
            storage_key(&scope, &bob, "k")
        );
    }

    #[test]
    fn webhook_deliveries_are_scoped_by_their_subscriber_headers() {
        let scope = Scope::Credentials;
        let key = IdempotencyKey::parse(b"72d3162e").unwrap();
        let address = |p: &Parts, delivery| {
            StorageKey::derive(&scope, &p.method, p, KeyRef::Delivered(&key, delivery))
        };
        let hook = |id: &str| parts(Method::POST, "/hooks", &[("x-github-hook-id", id)]);
        assert_ne!(
            address(&hook("1"), Delivery::GitHub),
            address(&hook("2"), Delivery::GitHub)
        );
        assert_eq!(
            address(&hook("1"), Delivery::GitHub),
            address(&hook("1"), Delivery::GitHub)
        );
        // A plain source ignores them, and is the address of a client key.
        assert_eq!(
            address(&hook("1"), Delivery::Plain),
            address(&hook("2"), Delivery::Plain)
        );
        assert_eq!(
            address(&hook("1"), Delivery::Plain),
            StorageKey::derive(&scope, &Method::POST, &hook("1"), KeyRef::Client(&key))
        );
    }

    #[test]
    fn a_custom_scope_replaces_credentials() {
        let scope = Scope::custom(|parts: &Parts| {
            parts
                .headers
                .get("x-tenant")
                .map(|v| v.as_bytes().to_vec())
                .unwrap_or_default()
        });
        let a = parts(
            Method::POST,
            "/",
            &[("x-tenant", "a"), ("authorization", "x")],
        );
        let a2 = parts(
            Method::POST,
            "/",
            &[("x-tenant", "a"), ("authorization", "y")],
        );
        let b = parts(Method::POST, "/", &[("x-tenant", "b")]);
        assert_eq!(storage_key(&scope, &a, "k"), storage_key(&scope, &a2, "k"));
        assert_ne!(storage_key(&scope, &a, "k"), storage_key(&scope, &b, "k"));
    }

    #[test]
    fn client_and_derived_keys_never_share_an_address() {
        let scope = Scope::Credentials;
        let head = parts(Method::POST, "/", &[]);
        let fingerprint = Fingerprint::of(&Method::POST, &head.uri, b"");
        let hex_key = IdempotencyKey::parse(hex(fingerprint.as_bytes()).as_bytes()).unwrap();
        assert_ne!(
            StorageKey::derive(&scope, &head.method, &head, KeyRef::Client(&hex_key)),
            StorageKey::derive(&scope, &head.method, &head, KeyRef::Derived(&fingerprint)),
        );
    }

    #[test]
    fn in_json_rpc_mode_the_mcp_session_is_part_of_the_default_scope() {
        let scope = Scope::Credentials;
        let session = |id: &str| {
            parts(
                Method::POST,
                "/mcp",
                &[("authorization", "Bearer shared"), ("mcp-session-id", id)],
            )
        };
        let key = IdempotencyKey::parse(b"k").unwrap();
        let address = |p: &Parts, in_mode: bool| {
            StorageKey::derive_with(
                KeyHasher::new(),
                &scope,
                in_mode,
                &p.method,
                p,
                KeyRef::Client(&key),
            )
        };
        assert_ne!(address(&session("a"), true), address(&session("b"), true));
        assert_eq!(
            address(&session("a"), false),
            address(&session("b"), false),
            "outside JSON-RPC mode the header is nobody's credential"
        );
        assert_eq!(
            address(&session("a"), false),
            storage_key(&scope, &session("a"), "k"),
            "the address every earlier version used"
        );
        // A custom scope names the party itself: sessions of one tenant share its records.
        let tenant = Scope::custom(|_: &Parts| "acme");
        let in_tenant = |p: &Parts| {
            StorageKey::derive_with(
                KeyHasher::new(),
                &tenant,
                true,
                &p.method,
                p,
                KeyRef::Client(&key),
            )
        };
        assert_eq!(in_tenant(&session("a")), in_tenant(&session("b")));
    }

    #[test]
    fn a_derived_key_needs_a_credential_or_a_session_to_name_an_agent() {
        let cases = [
            (&[][..], false),
            (&[("x-forwarded-for", "10.0.0.1")][..], false),
            (&[("user-agent", "agent/1.0")][..], false),
            (&[("authorization", "Bearer a")][..], true),
            (&[("cookie", "s=1")][..], true),
            (&[("mcp-session-id", "3f1c")][..], true),
            (&[("x-api-key", "k_live_1")][..], true),
            (&[("proxy-authorization", "Basic eA==")][..], true),
        ];
        for (headers, names) in cases {
            let head = parts(Method::POST, "/mcp", headers);
            assert_eq!(
                Scope::Credentials.names_an_agent(&head.headers),
                names,
                "{headers:?}"
            );
            assert!(Scope::custom(|_: &Parts| "t").names_an_agent(&head.headers));
        }
    }
}
