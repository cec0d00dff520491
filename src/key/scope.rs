//! Whose key it is: the [`Scope`] that separates one principal's records from another's,
//! and the one decision of whether a request may be given a derived key ([`Scope::derives`]).
//!
//! By default a request is scoped by its credential headers ([`CREDENTIALS`]); with none, a
//! derived key is scoped by the peer's IP address; with neither, nothing tells its sender
//! apart, and no key is derived for it.
//!
//! Pure logic: no tower or tokio in here.

use std::{fmt, net::IpAddr, sync::Arc};

use http::{Extensions, HeaderMap, HeaderName, header, request::Parts};

use super::origin::peer_ip;
use crate::fingerprint::digest::FieldHasher;

type ScopeFn = Arc<dyn Fn(&Parts, &mut FieldHasher) + Send + Sync>;

/// The request headers that name a principal by default, each with the tag its values are
/// hashed under. `a` (Authorization) and `c` (Cookie) are the tags earlier versions used, so
/// a request that carries only those keeps its records' addresses across the upgrade.
// The one list: a mode that adds a credential (a JSON-RPC session) adds it here or beside it.
static CREDENTIALS: [(HeaderName, u8); 5] = [
    (header::AUTHORIZATION, b'a'),
    (header::COOKIE, b'c'),
    (header::PROXY_AUTHORIZATION, b'x'),
    (HeaderName::from_static("x-api-key"), b'y'),
    (HeaderName::from_static("api-key"), b'z'),
];

/// The tag the peer's address is hashed under.
const PEER: u8 = b'i';

/// The header that names an MCP session (streamable HTTP transport): part of the default
/// scope in JSON-RPC mode, hashed under the tag `n`.
pub(crate) const MCP_SESSION_ID: HeaderName = HeaderName::from_static("mcp-session-id");

/// Whose key it is: the part of a record's address that separates one principal's keys
/// from another's.
#[derive(Clone)]
pub(crate) enum Scope {
    /// The request's credentials ([`CREDENTIALS`]); for a derived key without any, the
    /// peer's IP address.
    Credentials,
    /// The application's own notion of a principal.
    Custom(ScopeFn),
}

/// What a scope tells of a request's sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sender {
    /// The application names it ([`Scope::Custom`]).
    Named,
    /// At least one credential header.
    Credentials,
    /// No credential; the peer's address.
    Peer(IpAddr),
    /// Nothing: any client could be this one.
    Unknown,
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

    /// What this scope tells of the sender of a request with these headers and extensions.
    pub(crate) fn sender(&self, headers: &HeaderMap, extensions: &Extensions) -> Sender {
        match self {
            Self::Custom(_) => Sender::Named,
            Self::Credentials if has_credential(headers) => Sender::Credentials,
            Self::Credentials => peer_ip(extensions).map_or(Sender::Unknown, Sender::Peer),
        }
    }

    /// Whether a request may be given a key derived from its content: only when something
    /// tells its sender apart. A derived key is guessable (anyone can hash a body), so
    /// without a scope one client's request would be answered with another's response.
    pub(crate) fn derives(&self, headers: &HeaderMap, extensions: &Extensions) -> bool {
        self.sender(headers, extensions) != Sender::Unknown
    }

    /// Adds the scope of `parts` to a storage key: its credentials (and, with `session`, its
    /// MCP session), or for a derived key without any, its peer's address.
    pub(crate) fn hash(
        &self,
        parts: &Parts,
        derived: bool,
        session: bool,
        hasher: &mut FieldHasher,
    ) {
        match self {
            Self::Credentials => {
                let mut named = false;
                // In JSON-RPC mode an MCP session is a party of its own: agents that share a
                // credential (or have none) never share a record.
                if session {
                    for value in &parts.headers.get_all(MCP_SESSION_ID) {
                        hasher.field(b'n', value.as_bytes());
                        named = true;
                    }
                }
                for (name, tag) in &CREDENTIALS {
                    for value in &parts.headers.get_all(name) {
                        hasher.field(*tag, value.as_bytes());
                        named = true;
                    }
                }
                // A client's own key is random, and a retry may come from another address
                // (a phone between networks): only derived keys are scoped by the peer.
                if derived && !named {
                    match peer_ip(&parts.extensions) {
                        Some(IpAddr::V4(ip)) => hasher.field(PEER, &ip.octets()),
                        Some(IpAddr::V6(ip)) => hasher.field(PEER, &ip.octets()),
                        None => {}
                    }
                }
            }
            Self::Custom(f) => f(parts, hasher),
        }
    }

    /// Whether a JSON-RPC call is scoped to an agent a derived key may be kept for: a
    /// credential or an MCP session in the default scope (a peer address is not enough:
    /// agents share hosts), or the application's own scope.
    pub(crate) fn names_an_agent(&self, headers: &HeaderMap) -> bool {
        match self {
            Self::Credentials => has_credential(headers) || headers.contains_key(MCP_SESSION_ID),
            Self::Custom(_) => true,
        }
    }
}

fn has_credential(headers: &HeaderMap) -> bool {
    CREDENTIALS
        .iter()
        .any(|(name, _)| headers.contains_key(name))
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Credentials => f.write_str("Credentials"),
            Self::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use http::{Method, Request};

    use super::*;
    use crate::{
        fingerprint::Fingerprint,
        key::{IdempotencyKey, KeyRef, PeerAddr, StorageKey},
    };

    fn parts(headers: &[(&str, &str)], peer: Option<[u8; 4]>) -> Parts {
        let mut builder = Request::builder().method(Method::POST).uri("/orders");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let mut parts = builder.body(()).unwrap().into_parts().0;
        if let Some(ip) = peer {
            parts.extensions.insert(PeerAddr(Ipv4Addr::from(ip).into()));
        }
        parts
    }

    fn client(parts: &Parts) -> StorageKey {
        let key = IdempotencyKey::parse(b"order-1").unwrap();
        StorageKey::derive(
            &Scope::Credentials,
            &parts.method,
            parts,
            KeyRef::Client(&key),
        )
    }

    fn derived(parts: &Parts) -> StorageKey {
        let fingerprint = Fingerprint::of(&Method::POST, &parts.uri, b"{}");
        let key = KeyRef::Derived(&fingerprint);
        StorageKey::derive(&Scope::Credentials, &parts.method, parts, key)
    }

    #[test]
    fn every_credential_header_separates_principals_for_client_and_derived_keys() {
        for name in [
            "authorization",
            "proxy-authorization",
            "cookie",
            "x-api-key",
            "api-key",
        ] {
            let alice = parts(&[(name, "alice")], None);
            let bob = parts(&[(name, "bob")], None);
            assert_ne!(client(&alice), client(&bob), "{name}, client key");
            assert_ne!(derived(&alice), derived(&bob), "{name}, derived key");
            assert_eq!(client(&alice), client(&alice.clone()), "{name}");
        }
        // The same value under two headers is two principals.
        let as_api_key = parts(&[("x-api-key", "k")], None);
        let as_other = parts(&[("api-key", "k")], None);
        assert_ne!(client(&as_api_key), client(&as_other));
    }

    #[test]
    fn who_sent_a_request_table() {
        let peer = Some([192, 0, 2, 7]);
        let ip = IpAddr::from(Ipv4Addr::new(192, 0, 2, 7));
        let cases: [(&str, Parts, Sender); 6] = [
            ("nothing", parts(&[], None), Sender::Unknown),
            ("a peer", parts(&[], peer), Sender::Peer(ip)),
            (
                "an API key",
                parts(&[("x-api-key", "k")], None),
                Sender::Credentials,
            ),
            (
                "a cookie and a peer",
                parts(&[("cookie", "s=1")], peer),
                Sender::Credentials,
            ),
            (
                "an unrelated header",
                parts(&[("x-request-id", "r")], None),
                Sender::Unknown,
            ),
            (
                "proxy authorization",
                parts(&[("proxy-authorization", "Basic x")], None),
                Sender::Credentials,
            ),
        ];
        for (what, parts, expected) in cases {
            let scope = Scope::Credentials;
            assert_eq!(
                scope.sender(&parts.headers, &parts.extensions),
                expected,
                "{what}"
            );
            assert_eq!(
                scope.derives(&parts.headers, &parts.extensions),
                expected != Sender::Unknown,
                "{what}"
            );
            let named = Scope::custom(|_: &Parts| "tenant");
            assert!(named.derives(&parts.headers, &parts.extensions), "{what}");
        }
    }

    #[test]
    fn the_peer_address_scopes_derived_keys_only_and_never_its_port() {
        let one = parts(&[], Some([192, 0, 2, 7]));
        let other = parts(&[], Some([192, 0, 2, 8]));
        assert_ne!(derived(&one), derived(&other));
        assert_eq!(
            client(&one),
            client(&other),
            "a client key is not scoped by address"
        );
        // Two connections from one browser: axum's ConnectInfo differs by port only.
        #[cfg(feature = "axum")]
        {
            use std::net::SocketAddr;

            use axum::extract::ConnectInfo;
            let connection = |port| {
                let mut parts = parts(&[], None);
                let addr = SocketAddr::from((Ipv4Addr::new(192, 0, 2, 7), port));
                parts.extensions.insert(ConnectInfo(addr));
                parts
            };
            assert_eq!(derived(&connection(50_001)), derived(&connection(50_002)));
            assert_eq!(derived(&connection(50_001)), derived(&one));
        }
        // With a credential, the credential decides, not the address.
        let here = parts(&[("cookie", "s=1")], Some([192, 0, 2, 7]));
        let there = parts(&[("cookie", "s=1")], Some([198, 51, 100, 1]));
        assert_eq!(derived(&here), derived(&there));
    }
}
