//! Whose key it is ([`Scope`]), which key a request carries ([`KeyRef`]), and the
//! [`StorageKey`] a store is addressed by: a digest of them all.

use std::{fmt, sync::Arc};

use http::{HeaderName, Method, header, request::Parts};

use super::IdempotencyKey;
use crate::{
    digest::{FieldHasher, hex},
    fingerprint::Fingerprint,
};

type ScopeFn = Arc<dyn Fn(&Parts, &mut KeyHasher) + Send + Sync>;

/// The header that names an MCP session (streamable HTTP transport).
pub(crate) const MCP_SESSION_ID: HeaderName = HeaderName::from_static("mcp-session-id");

/// Whose key it is: the part of a record's address that separates one principal's keys
/// from another's.
#[derive(Clone)]
pub(crate) enum Scope {
    /// The request's credentials: `Authorization`, and `Cookie` for derived keys.
    Credentials,
    /// The application's own notion of a principal.
    Custom(ScopeFn),
}

impl Scope {
    pub(crate) fn custom<F, R>(f: F) -> Self
    where
        F: Fn(&Parts) -> R + Send + Sync + 'static,
        R: AsRef<[u8]>,
    {
        Self::Custom(Arc::new(move |parts, hasher| {
            hasher.field(b's', f(parts).as_ref());
        }))
    }

    fn hash(&self, parts: &Parts, derived: bool, session: bool, hasher: &mut KeyHasher) {
        match self {
            Self::Credentials => {
                // In JSON-RPC mode an MCP session is a party of its own: agents that share a
                // credential (or have none) never share a record.
                if session {
                    for value in &parts.headers.get_all(MCP_SESSION_ID) {
                        hasher.field(b'n', value.as_bytes());
                    }
                }
                for value in &parts.headers.get_all(header::AUTHORIZATION) {
                    hasher.field(b'a', value.as_bytes());
                }
                // Derived keys are guessable (anyone can compute the digest of a body), so
                // browser sessions must separate them too.
                if derived {
                    for value in &parts.headers.get_all(header::COOKIE) {
                        hasher.field(b'c', value.as_bytes());
                    }
                }
            }
            Self::Custom(f) => f(parts, hasher),
        }
    }

    /// Whether a JSON-RPC call is scoped to an agent a derived key may be kept for: a
    /// credential or an MCP session in the default scope (a peer address is not enough:
    /// agents share hosts), or the application's own scope.
    pub(crate) fn names_an_agent(&self, parts: &Parts) -> bool {
        match self {
            Self::Credentials => [header::AUTHORIZATION, header::COOKIE, MCP_SESSION_ID]
                .iter()
                .any(|name| parts.headers.contains_key(name)),
            Self::Custom(_) => true,
        }
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Credentials => f.write_str("Credentials"),
            Self::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// The hasher a storage key is derived with.
pub(crate) type KeyHasher = FieldHasher;

/// Which key a request carries.
#[derive(Debug, Clone, Copy)]
pub(crate) enum KeyRef<'a> {
    /// Sent by the client (header or another key source).
    Client(&'a IdempotencyKey),
    /// Derived from the request itself (no key sent).
    Derived(&'a Fingerprint),
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
        hasher.field(b'p', parts.uri.path().as_bytes());
        match key {
            KeyRef::Client(key) => hasher.field(b'k', key.as_str().as_bytes()),
            KeyRef::Derived(fingerprint) => hasher.field(b'f', fingerprint.as_bytes()),
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
    fn cookies_scope_derived_keys_but_not_client_keys() {
        let scope = Scope::Credentials;
        let alice = parts(Method::POST, "/", &[("cookie", "session=alice")]);
        let bob = parts(Method::POST, "/", &[("cookie", "session=bob")]);
        assert_eq!(
            storage_key(&scope, &alice, "k"),
            storage_key(&scope, &bob, "k")
        );
        let fingerprint = Fingerprint::of(&Method::POST, &alice.uri, b"");
        let derived =
            |p: &Parts| StorageKey::derive(&scope, &p.method, p, KeyRef::Derived(&fingerprint));
        assert_ne!(derived(&alice), derived(&bob));
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
        ];
        for (headers, names) in cases {
            let head = parts(Method::POST, "/mcp", headers);
            assert_eq!(
                Scope::Credentials.names_an_agent(&head),
                names,
                "{headers:?}"
            );
            assert!(Scope::custom(|_: &Parts| "t").names_an_agent(&head));
        }
    }
}
