//! What the layer costs a unary gRPC call: a tonic server on a loopback port (HTTP/2), a tonic
//! client on one channel, the call timed end to end.
//!
//! One criterion group, `grpc_unary`: `bare` (no layer), `first` (the layer on
//! `MemoryStore`, a new `idempotency-key` per call: claim, run, store) and `replay` (the same
//! key every call: the stored answer, message and trailers). Server and client share one
//! multi-thread tokio runtime.
//!
//! ```sh
//! cargo bench --bench grpc
//! ```
//!
//! At the end it prints each case's median per call and its ratio to `bare`.

use std::{
    convert::Infallible,
    path::PathBuf,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use criterion::Criterion;
use http::uri::PathAndQuery;
use tonic::{
    Request, Response, Status,
    body::Body,
    metadata::MetadataValue,
    server::NamedService,
    transport::{Channel, Server, server::TcpIncoming},
};
use tonic_prost::ProstCodec;
use tower::ServiceBuilder;
use tower_idempotency::{IdempotencyLayer, MemoryStore, RequestBody};

#[derive(Clone, PartialEq, prost::Message)]
struct ChargeRequest {
    #[prost(int64, tag = "1")]
    amount: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Charge {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(int64, tag = "2")]
    amount: i64,
}

const CHARGE: &str = "/payments.v1.Payments/Charge";
const CASES: [&str; 3] = ["bare", "first", "replay"];

#[derive(Clone)]
struct Payments;

impl NamedService for Payments {
    const NAME: &'static str = "payments.v1.Payments";
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
        Box::pin(async move {
            let codec = ProstCodec::<Charge, ChargeRequest>::default();
            let method = tower::service_fn(|request: Request<ChargeRequest>| async move {
                let amount = request.into_inner().amount;
                let id = String::from("ch_1");
                Ok::<_, Status>(Response::new(Charge { id, amount }))
            });
            Ok(tonic::server::Grpc::new(codec).unary(method, request).await)
        })
    }
}

/// Serves `Payments` (behind the layer if `layered`) on a loopback port; its client.
async fn serve(layered: bool) -> tonic::client::Grpc<Channel> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let addr = listener.local_addr().expect("its address");
    let incoming = TcpIncoming::from(listener);
    if layered {
        let stack = ServiceBuilder::new()
            .layer(IdempotencyLayer::new(MemoryStore::default()))
            .map_request(|request: http::Request<RequestBody<Body>>| request.map(Body::new));
        let server = Server::builder().layer(stack).add_service(Payments);
        tokio::spawn(server.serve_with_incoming(incoming));
    } else {
        tokio::spawn(
            Server::builder()
                .add_service(Payments)
                .serve_with_incoming(incoming),
        );
    }
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("an endpoint")
        .connect()
        .await
        .expect("connected");
    tonic::client::Grpc::new(channel)
}

async fn call(client: &mut tonic::client::Grpc<Channel>, key: Option<String>) {
    let mut request = Request::new(ChargeRequest { amount: 500 });
    if let Some(key) = key {
        let key = MetadataValue::try_from(key).expect("an ASCII key");
        request.metadata_mut().insert("idempotency-key", key);
    }
    client.ready().await.expect("ready");
    let codec = ProstCodec::<ChargeRequest, Charge>::default();
    let answer = client
        .unary(request, PathAndQuery::from_static(CHARGE), codec)
        .await
        .expect("charged");
    assert_eq!(answer.get_ref().amount, 500);
}

fn main() {
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
        .configure_from_args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let started = SystemTime::now();
    let bare = runtime.block_on(serve(false));
    let layered = runtime.block_on(serve(true));
    let next = AtomicU64::new(0);

    let mut group = criterion.benchmark_group("grpc_unary");
    group.bench_function("bare", |b| {
        b.to_async(&runtime).iter(|| {
            let mut client = bare.clone();
            async move { call(&mut client, None).await }
        });
    });
    group.bench_function("first", |b| {
        b.to_async(&runtime).iter(|| {
            let mut client = layered.clone();
            let key = format!("first-{}", next.fetch_add(1, Ordering::Relaxed));
            async move { call(&mut client, Some(key)).await }
        });
    });
    group.bench_function("replay", |b| {
        b.to_async(&runtime).iter(|| {
            let mut client = layered.clone();
            async move { call(&mut client, Some("replayed".to_owned())).await }
        });
    });
    group.finish();
    criterion.final_summary();
    report(started);
}

/// Prints each case's median per call measured in this run, and its ratio to `bare`.
fn report(started: SystemTime) {
    let median = |case: &str| -> Option<f64> {
        let path = criterion_home()
            .join("grpc_unary")
            .join(case)
            .join("new/estimates.json");
        if std::fs::metadata(&path).ok()?.modified().ok()? < started {
            return None;
        }
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
        json.pointer("/median/point_estimate")?.as_f64()
    };
    let Some(bare) = median("bare") else {
        return;
    };
    println!("\nper unary call, median of this run (ratio to bare)");
    for case in CASES {
        if let Some(ns) = median(case) {
            println!("{case:<8} {:>9.1} µs  {:.2}×", ns / 1e3, ns / bare);
        }
    }
}

/// Where criterion writes its results: `$CRITERION_HOME`, else the target directory's
/// `criterion` (this executable lives in `<target>/<profile>/deps/`).
fn criterion_home() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(target).join("criterion");
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.join("criterion")))
        .unwrap_or_else(|| PathBuf::from("target/criterion"))
}
