//! Where a request came from, as far as the server tells: the URI the client sent (a router
//! may have stripped a prefix from the one the layer sees) and the peer's IP address.
//!
//! Both are read from the request's extensions: axum's `OriginalUri` and
//! `ConnectInfo<SocketAddr>` with the `axum` feature, and this crate's [`PeerAddr`] for
//! servers that set the address themselves (plain hyper, a trusted reverse proxy's forwarded
//! address).
//!
//! Pure logic: no tower or tokio in here.

use std::net::IpAddr;

use http::{Extensions, Uri, request::Parts};

/// The peer's IP address, for a server to put in a request's extensions: the default scope
/// separates anonymous clients by it (their derived keys, see
/// [`with_scope`](crate::IdempotencyLayer::with_scope)).
///
/// axum fills in its own `ConnectInfo<SocketAddr>` when served with
/// `into_make_service_with_connect_info::<SocketAddr>()`, which the layer reads with the
/// `axum` feature. Insert a `PeerAddr` where nothing else does: a hyper server (the address
/// `accept` returned), or a middleware in front of the layer that knows the client's address
/// behind a trusted reverse proxy (every client of a proxy shares its address). A `PeerAddr`
/// is preferred to `ConnectInfo` when both are present. Only the address counts, never the
/// port: a browser may send a double click over two connections.
///
/// ```
/// use std::net::{IpAddr, Ipv4Addr};
/// use tower_idempotency::PeerAddr;
///
/// let mut request = http::Request::post("/charges").body(()).unwrap();
/// request.extensions_mut().insert(PeerAddr(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerAddr(pub IpAddr);

/// The URI the client sent: axum's `OriginalUri` (set by the outermost `Router`, before
/// `nest` or `nest_service` strip their prefix) when present, else the request's own.
pub(crate) fn sent_uri(parts: &Parts) -> &Uri {
    #[cfg(feature = "axum")]
    if let Some(axum::extract::OriginalUri(uri)) = parts.extensions.get() {
        return uri;
    }
    &parts.uri
}

/// The path of the URI the client sent ([`sent_uri`]), from a request's `extensions` and
/// its `uri`.
pub(crate) fn sent_path<'a>(extensions: &'a Extensions, uri: &'a Uri) -> &'a str {
    #[cfg(feature = "axum")]
    if let Some(axum::extract::OriginalUri(uri)) = extensions.get() {
        return uri.path();
    }
    #[cfg(not(feature = "axum"))]
    let _ = extensions;
    uri.path()
}

/// The peer's IP address, if the server gave it: [`PeerAddr`], else axum's `ConnectInfo`.
/// An IPv4 address mapped into IPv6 is the IPv4 address (one client, whichever socket family
/// the server listens on).
pub(crate) fn peer_ip(extensions: &Extensions) -> Option<IpAddr> {
    if let Some(PeerAddr(ip)) = extensions.get() {
        return Some(ip.to_canonical());
    }
    #[cfg(feature = "axum")]
    if let Some(axum::extract::ConnectInfo(addr)) =
        extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
    {
        return Some(addr.ip().to_canonical());
    }
    None
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use http::Request;

    use super::*;

    #[test]
    fn the_peer_address_is_its_ip_in_canonical_form() {
        let v4 = Ipv4Addr::new(192, 0, 2, 7);
        let cases: [(&str, Option<PeerAddr>, Option<IpAddr>); 4] = [
            ("none", None, None),
            ("v4", Some(PeerAddr(v4.into())), Some(v4.into())),
            (
                "v4 mapped into v6",
                Some(PeerAddr(v4.to_ipv6_mapped().into())),
                Some(v4.into()),
            ),
            (
                "v6",
                Some(PeerAddr(Ipv6Addr::LOCALHOST.into())),
                Some(Ipv6Addr::LOCALHOST.into()),
            ),
        ];
        for (what, peer, expected) in cases {
            let mut extensions = Extensions::new();
            if let Some(peer) = peer {
                extensions.insert(peer);
            }
            assert_eq!(peer_ip(&extensions), expected, "{what}");
        }
    }

    #[test]
    fn without_an_original_uri_the_sent_uri_is_the_request_uri() {
        let parts = Request::post("/eur/payouts?x=1")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        assert_eq!(sent_uri(&parts), "/eur/payouts?x=1");
        assert_eq!(sent_path(&parts.extensions, &parts.uri), "/eur/payouts");
    }

    #[cfg(feature = "axum")]
    #[test]
    fn axum_extensions_name_the_sent_uri_and_the_peer() {
        use std::net::SocketAddr;

        use axum::extract::{ConnectInfo, OriginalUri};

        let mut parts = Request::post("/payouts").body(()).unwrap().into_parts().0;
        parts
            .extensions
            .insert(OriginalUri(Uri::from_static("/eur/payouts")));
        let addr = SocketAddr::from((Ipv4Addr::new(198, 51, 100, 1), 50_123));
        parts.extensions.insert(ConnectInfo(addr));
        assert_eq!(sent_uri(&parts), "/eur/payouts");
        assert_eq!(sent_path(&parts.extensions, &parts.uri), "/eur/payouts");
        assert_eq!(peer_ip(&parts.extensions), Some(addr.ip()));
        // A PeerAddr set by the application wins over the connection's address.
        let forwarded = IpAddr::from(Ipv4Addr::new(203, 0, 113, 9));
        parts.extensions.insert(PeerAddr(forwarded));
        assert_eq!(peer_ip(&parts.extensions), Some(forwarded));
    }
}
