//! The layer over a plain hyper 1.x service, no axum: `tower::ServiceBuilder` wraps a
//! `service_fn`, and hyper-util's `TowerToHyperService` serves it.
//!
//! ```sh
//! cargo run --example hyper
//! curl -i localhost:3000/orders -H 'Idempotency-Key: order-1' -d 'two coffees'
//! curl -i localhost:3000/orders -H 'Idempotency-Key: order-1' -d 'two coffees'   # replayed
//! curl -i localhost:3000/orders -d 'a form, no key'      # deduplicated per client address
//! ```
//!
//! hyper does not tell a service who is connected: each connection's service puts the peer's
//! address in the request as a [`PeerAddr`], which scopes requests sent without a key.

use std::{
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use tower::ServiceBuilder;
use tower_idempotency::{IdempotencyLayer, MemoryStore, PeerAddr, RequestBody};

/// The application: it sees the request body the layer hands on (`RequestBody<Incoming>`).
async fn place_order(
    orders: Arc<AtomicU64>,
    request: Request<RequestBody<Incoming>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = match request.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return Ok(status(StatusCode::BAD_REQUEST)),
    };
    let number = orders.fetch_add(1, Ordering::SeqCst) + 1;
    let text = format!("order #{number}: {}\n", String::from_utf8_lossy(&body));
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = StatusCode::CREATED;
    Ok(response)
}

fn status(status: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3000);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on http://{addr}");

    let orders = Arc::new(AtomicU64::new(0));
    let service = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(MemoryStore::default()))
        .service_fn(move |request| place_order(Arc::clone(&orders), request));

    loop {
        let (stream, peer) = listener.accept().await?;
        let service = ServiceBuilder::new()
            .map_request(move |mut request: Request<Incoming>| {
                request.extensions_mut().insert(PeerAddr(peer.ip()));
                request
            })
            .service(service.clone());
        let service = TowerToHyperService::new(service);
        tokio::spawn(async move {
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            if let Err(error) = connection.await {
                eprintln!("connection error: {error}");
            }
        });
    }
}
