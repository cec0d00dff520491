//! A small gRPC payments service behind the layer: tonic over HTTP/2, a `Charge` call keyed
//! by its AIP-155 `request_id` (read from the message with `prost`), or by the
//! `idempotency-key` metadata when a client sends one.
//!
//! The messages are `prost` derives (no `protoc`); the service is what tonic-build would
//! generate for
//!
//! ```proto
//! service Payments {
//!   rpc Charge(ChargeRequest) returns (Charge);
//!   rpc WatchCharges(stream WatchRequest) returns (stream Charge);  // passes through
//! }
//! message ChargeRequest { int64 amount = 1; string request_id = 2; }
//! message Charge { string id = 1; int64 amount = 2; }
//! ```
//!
//! It serves on a loopback port, then a tonic client calls it: the transcript of
//! `cargo run --example grpc`:
//!
//! ```text
//! serving payments.v1.Payments on 127.0.0.1:41973 (HTTP/2)
//! charge  request_id=7f1c… -> ch_1 (500) replayed=false  executions=1
//! retry   request_id=7f1c… -> ch_1 (500) replayed=true   executions=1
//! reuse   request_id=7f1c… -> FailedPrecondition: Idempotency key reused with another request: this idempotency key was already used with another method, path, query or body; nothing was executed  executions=1
//! refused request_id=9a02… -> InvalidArgument: amount must be positive  executions=2
//! retry   request_id=9a02… -> InvalidArgument: amount must be positive  executions=3
//! metadata idempotency-key   -> ch_4 (120) replayed=false  executions=4
//! retry   idempotency-key   -> ch_4 (120) replayed=true   executions=4
//! ```
//!
//! The retry of a refused charge runs again (`INVALID_ARGUMENT` is not kept by default;
//! `with_grpc_codes_stored` keeps it); the reused `request_id` with another amount runs
//! nothing.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use http::uri::PathAndQuery;
use prost::Message;
use tonic::{
    Request, Response, Status,
    body::Body,
    metadata::MetadataValue,
    server::NamedService,
    transport::{Channel, Server, server::TcpIncoming},
};
use tonic_prost::ProstCodec;
use tower::ServiceBuilder;
use tower_idempotency::{IdempotencyLayer, KeySource, MemoryStore, RequestBody};

#[derive(Clone, PartialEq, Message)]
struct ChargeRequest {
    #[prost(int64, tag = "1")]
    amount: i64,
    /// AIP-155: the client's id of this request, the same on every retry.
    #[prost(string, tag = "2")]
    request_id: String,
}

#[derive(Clone, PartialEq, Message)]
struct Charge {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(int64, tag = "2")]
    amount: i64,
}

const CHARGE: &str = "/payments.v1.Payments/Charge";

/// The service, as tonic-build would generate its server.
#[derive(Clone, Default)]
struct Payments {
    executions: Arc<AtomicUsize>,
}

impl NamedService for Payments {
    const NAME: &'static str = "payments.v1.Payments";
}

impl Payments {
    async fn charge(&self, request: Request<ChargeRequest>) -> Result<Response<Charge>, Status> {
        let n = self.executions.fetch_add(1, Ordering::SeqCst) + 1;
        let ChargeRequest { amount, .. } = request.into_inner();
        if amount <= 0 {
            return Err(Status::invalid_argument("amount must be positive"));
        }
        let id = format!("ch_{n}");
        Ok(Response::new(Charge { id, amount }))
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl tower::Service<http::Request<Body>> for Payments {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let this = self.clone();
        match request.uri().path() {
            CHARGE => Box::pin(async move {
                let codec = ProstCodec::<Charge, ChargeRequest>::default();
                let method = tower::service_fn(move |request| {
                    let this = this.clone();
                    async move { this.charge(request).await }
                });
                Ok(tonic::server::Grpc::new(codec).unary(method, request).await)
            }),
            _ => Box::pin(async { Ok(Status::unimplemented("").into_http()) }),
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let payments = Payments::default();
    let executions = Arc::clone(&payments.executions);

    let layer = IdempotencyLayer::new(MemoryStore::default())
        // AIP-155: the key is the message's request_id (the idempotency-key metadata, when
        // a client sends it, comes first).
        .with_key_source(KeySource::grpc_message(|message| {
            let request = ChargeRequest::decode(message).ok()?;
            (!request.request_id.is_empty()).then_some(request.request_id)
        }))
        // The streaming methods pass through untouched.
        .with_grpc_streaming_methods(["/payments.v1.Payments/WatchCharges"]);
    // The layer hands the service a `RequestBody`; tonic's routes take its `Body`.
    let stack = ServiceBuilder::new()
        .layer(layer)
        .map_request(|request: http::Request<RequestBody<Body>>| request.map(Body::new));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    println!("serving payments.v1.Payments on {addr} (HTTP/2)");
    tokio::spawn(
        Server::builder()
            .layer(stack)
            .add_service(payments)
            .serve_with_incoming(TcpIncoming::from(listener)),
    );

    let channel = Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut client = tonic::client::Grpc::new(channel);
    let count = || executions.load(Ordering::SeqCst);
    let mut call = async |what: &str, key: Option<&str>, amount: i64, request_id: &str| {
        let mut request = Request::new(ChargeRequest {
            amount,
            request_id: request_id.to_owned(),
        });
        if let Some(key) = key {
            request
                .metadata_mut()
                .insert("idempotency-key", MetadataValue::try_from(key)?);
        }
        client.ready().await?;
        let codec = ProstCodec::<ChargeRequest, Charge>::default();
        let answer = client
            .unary(request, PathAndQuery::from_static(CHARGE), codec)
            .await;
        let shown = if key.is_some() {
            "idempotency-key  ".to_owned()
        } else {
            format!("request_id={}…", request_id.get(..4).unwrap_or(""))
        };
        match answer {
            Ok(response) => {
                let replayed = response.metadata().contains_key("idempotent-replayed");
                let Charge { id, amount } = response.into_inner();
                println!(
                    "{what:7} {shown} -> {id} ({amount}) replayed={replayed:<5}  executions={}",
                    count()
                );
            }
            Err(status) => println!(
                "{what:7} {shown} -> {:?}: {}  executions={}",
                status.code(),
                status.message(),
                count()
            ),
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    };

    let first = "7f1c2b9e-5d4a-4c3e-9b1f-0a8d6e2c4f71";
    call("charge", None, 500, first).await?;
    call("retry", None, 500, first).await?;
    call("reuse", None, 999, first).await?;
    let refused = "9a02e4d1-3b7c-4f5a-8e6d-1c2b3a4f5e6d";
    call("refused", None, -1, refused).await?;
    call("retry", None, -1, refused).await?;
    call("metadata", Some("order-42-charge"), 120, "").await?;
    call("retry", Some("order-42-charge"), 120, "").await?;
    Ok(())
}
