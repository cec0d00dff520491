//! gRPC behind the layer (issue 19): a real tonic server over HTTP/2 on loopback, the layer
//! in front of it, and a tonic client, on `MemoryStore` and `RedisStore`; raw HTTP/2 calls
//! over tonic's `Channel` for the shapes tonic's client never sends.
//!
//! The messages are written with `prost` derives (no `protoc`); the service is written by
//! hand on `tonic::server::Grpc`, as tonic-build would generate it.

mod common;

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, uri::PathAndQuery};
use http_body::{Body as HttpBody, Frame};
use tonic::{
    Code, Request, Response, Status,
    body::Body,
    codegen::tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream},
    metadata::{MetadataMap, MetadataValue},
    server::NamedService,
    transport::{Channel, Server, server::TcpIncoming},
};
use tonic_prost::ProstCodec;
use tower::ServiceBuilder;
use tower_idempotency::{
    GrpcCode, IdempotencyLayer, IdempotencyStore, KeySource, MemoryStore, RequestBody, WaitMode,
};

#[derive(Clone, PartialEq, prost::Message)]
struct ChargeRequest {
    #[prost(int64, tag = "1")]
    amount: i64,
    /// AIP-155: the client's id of this request, the same on every retry.
    #[prost(string, tag = "2")]
    request_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Charge {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(int64, tag = "2")]
    amount: i64,
}

const CHARGE: &str = "/payments.v1.Payments/Charge";
/// The amount the handler panics on.
const PANICS: i64 = 13;
const WATCH: &str = "/payments.v1.Payments/Watch";
const SPLIT: &str = "/payments.v1.Payments/Split";
/// `Split`, its stream ending in `UNAVAILABLE` after its three charges.
const SPLIT_FAILS: &str = "/payments.v1.Payments/SplitFails";
/// `Split`, its stream never ending after its three charges.
const SPLIT_HANGS: &str = "/payments.v1.Payments/SplitHangs";
/// Answers in whatever shape the request's metadata asks, below tonic (which never writes a
/// status in the head beside data): `x-head-status` puts a `grpc-status` in the head, and
/// `x-trailer-status` one in the trailers, around one message. Its body is never read.
const RAW: &str = "/payments.v1.Payments/Raw";

/// The payments service: `Charge` (unary) counts its executions, takes `delay`, refuses a
/// non-positive amount with `INVALID_ARGUMENT`, and answers with trailing metadata of its
/// own; `Watch` (bidirectional streaming) echoes each request as it comes; `Split` (server
/// streaming) answers with three charges, 30 ms apart.
#[derive(Clone)]
struct Payments {
    calls: Arc<AtomicUsize>,
    delay: Duration,
}

impl NamedService for Payments {
    const NAME: &'static str = "payments.v1.Payments";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type ChargeStream = Pin<Box<dyn Stream<Item = Result<Charge, Status>> + Send>>;

impl Payments {
    async fn charge(&self, request: Request<ChargeRequest>) -> Result<Response<Charge>, Status> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(self.delay).await;
        let ChargeRequest { amount, .. } = request.into_inner();
        assert_ne!(amount, PANICS, "the handler panics on this amount");
        if amount <= 0 {
            return Err(Status::invalid_argument(format!(
                "amount must be positive (execution {n})"
            )));
        }
        let mut response = Response::new(Charge {
            id: format!("ch_{n}"),
            amount,
        });
        let id = MetadataValue::try_from(format!("ch_{n}")).map_err(|_| Status::internal("id"))?;
        response.metadata_mut().insert("x-charge-id", id);
        Ok(response)
    }
}

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
                let mut grpc =
                    tonic::server::Grpc::new(ProstCodec::<Charge, ChargeRequest>::default());
                let method = tower::service_fn(move |request| {
                    let this = this.clone();
                    async move { this.charge(request).await }
                });
                let response = grpc.unary(method, request).await;
                let trailers = ledger_trailers(response.headers());
                Ok(response.map(|body| {
                    Body::new(WithTrailers {
                        inner: body,
                        extra: trailers,
                    })
                }))
            }),
            WATCH => Box::pin(async move {
                let mut grpc =
                    tonic::server::Grpc::new(ProstCodec::<Charge, ChargeRequest>::default());
                Ok(grpc.streaming(Echo(this), request).await)
            }),
            SPLIT | SPLIT_FAILS | SPLIT_HANGS => Box::pin(async move {
                let fails = request.uri().path() == SPLIT_FAILS;
                let hangs = request.uri().path() == SPLIT_HANGS;
                let mut grpc =
                    tonic::server::Grpc::new(ProstCodec::<Charge, ChargeRequest>::default());
                let method = tower::service_fn(move |request: Request<ChargeRequest>| {
                    let n = this.calls.fetch_add(1, Ordering::SeqCst) + 1;
                    let amount = request.into_inner().amount;
                    let (tx, rx) = tokio::sync::mpsc::channel(1);
                    tokio::spawn(async move {
                        for part in 1..=3 {
                            tokio::time::sleep(Duration::from_millis(30)).await;
                            let id = format!("ch_{n}_{part}");
                            let _ = tx
                                .send(Ok(Charge {
                                    id,
                                    amount: amount / 3,
                                }))
                                .await;
                        }
                        if fails {
                            let _ = tx.send(Err(Status::unavailable("ledger down"))).await;
                        }
                        if hangs {
                            // The stream stays open until its reader is dropped.
                            tx.closed().await;
                        }
                    });
                    let stream: ChargeStream = Box::pin(ReceiverStream::new(rx));
                    async move { Ok::<_, Status>(Response::new(stream)) }
                });
                Ok(grpc.server_streaming(method, request).await)
            }),
            RAW => Box::pin(async move {
                let n = this.calls.fetch_add(1, Ordering::SeqCst) + 1;
                Ok(raw_answer(n, request.headers()))
            }),
            _ => Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}

/// `Raw`'s answer to its execution `n`: one message, then trailers, `grpc-status` where
/// `request` asks for it.
fn raw_answer(n: usize, request: &HeaderMap) -> http::Response<Body> {
    use prost::Message;

    let message = Charge {
        id: format!("ch_{n}"),
        amount: 1,
    }
    .encode_to_vec();
    let mut framed = vec![0];
    framed.extend_from_slice(&u32::try_from(message.len()).unwrap_or(0).to_be_bytes());
    framed.extend_from_slice(&message);
    let mut trailers = HeaderMap::new();
    trailers.insert("x-execution", n.into());
    if let Some(status) = request.get("x-trailer-status") {
        trailers.insert("grpc-status", status.clone());
    }
    let frames: Vec<Result<Frame<Bytes>, Status>> = vec![
        Ok(Frame::data(Bytes::from(framed))),
        Ok(Frame::trailers(trailers)),
    ];
    let body = http_body_util::StreamBody::new(tonic::codegen::tokio_stream::iter(frames));
    let mut response = http::Response::new(Body::new(body));
    let headers = response.headers_mut();
    headers.insert(
        "content-type",
        http::HeaderValue::from_static("application/grpc"),
    );
    if let Some(status) = request.get("x-head-status") {
        headers.insert("grpc-status", status.clone());
    }
    response
}

/// `Watch`: every request message is answered at once.
struct Echo(Payments);

impl tonic::server::StreamingService<ChargeRequest> for Echo {
    type Response = Charge;
    type ResponseStream = ChargeStream;
    type Future = BoxFuture<Result<Response<ChargeStream>, Status>>;

    fn call(&mut self, request: Request<tonic::Streaming<ChargeRequest>>) -> Self::Future {
        let calls = Arc::clone(&self.0.calls);
        Box::pin(async move {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            let echo = request.into_inner().map(move |message| {
                message.map(|request| Charge {
                    id: format!("watch_{n}"),
                    amount: request.amount,
                })
            });
            Ok(Response::new(Box::pin(echo) as ChargeStream))
        })
    }
}

/// Trailing metadata the handler adds to `Charge`'s answer, set apart by its execution:
/// a repeated entry and binary metadata (`-bin`, base64 on the wire).
fn ledger_trailers(headers: &HeaderMap) -> HeaderMap {
    let id = headers
        .get("x-charge-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_owned();
    let mut metadata = MetadataMap::new();
    for entry in [format!("debit {id}"), format!("credit {id}")] {
        if let Ok(value) = MetadataValue::try_from(entry) {
            metadata.append("x-ledger-entry", value);
        }
    }
    let mut receipt = vec![0x00, 0xff, 0x0a, b'%'];
    receipt.extend_from_slice(id.as_bytes());
    metadata.insert_bin("x-receipt-bin", MetadataValue::from_bytes(&receipt));
    metadata.into_headers()
}

/// A body with `extra` added to its trailers (tonic has no API for a unary handler's
/// trailing metadata).
struct WithTrailers {
    inner: Body,
    extra: HeaderMap,
}

impl HttpBody for WithTrailers {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        Poll::Ready(Some(Ok(match frame.into_trailers() {
            Ok(mut trailers) => {
                for (name, value) in &self.extra {
                    trailers.append(name, value.clone());
                }
                Frame::trailers(trailers)
            }
            Err(frame) => frame,
        })))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

/// The payments service behind `layer`, served by tonic over HTTP/2 on a loopback port.
struct Served {
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

async fn serve<St>(layer: IdempotencyLayer<St>, delay: Duration) -> Served
where
    St: IdempotencyStore + Clone,
{
    let calls = Arc::new(AtomicUsize::new(0));
    let payments = Payments {
        calls: Arc::clone(&calls),
        delay,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let addr = listener.local_addr().expect("local address");
    let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
    // The layer hands the routes a `RequestBody`; tonic's routes take its `Body`.
    let stack = ServiceBuilder::new()
        .layer(layer)
        .map_request(|request: http::Request<RequestBody<Body>>| request.map(Body::new));
    let server = Server::builder()
        .layer(stack)
        .add_service(payments)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
            let _ = stop.await;
        });
    tokio::spawn(server);
    Served {
        addr,
        calls,
        _shutdown: shutdown,
    }
}

/// `routes` served by tonic over HTTP/2 on a loopback port; `calls` counts their executions.
#[cfg(feature = "axum")]
async fn serve_routes(routes: axum::Router, calls: Arc<AtomicUsize>) -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let addr = listener.local_addr().expect("local address");
    let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
    let server = Server::builder()
        .add_routes(tonic::service::Routes::from(routes))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
            let _ = stop.await;
        });
    tokio::spawn(server);
    Served {
        addr,
        calls,
        _shutdown: shutdown,
    }
}

impl Served {
    async fn client(&self) -> Client {
        Client(tonic::client::Grpc::new(self.channel().await))
    }

    /// An HTTP/2 connection to the server, for requests tonic's client would not send.
    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect to the test server")
    }

    /// Sends `request` as it is over `channel` and reads the answer whole: its head, body
    /// and trailers.
    async fn raw(
        channel: &Channel,
        request: http::Request<Body>,
    ) -> (http::response::Parts, Bytes, Option<HeaderMap>) {
        use http_body_util::BodyExt;
        use tower::ServiceExt;

        let response = channel.clone().oneshot(request).await.expect("an answer");
        let (parts, body) = response.into_parts();
        let collected = body.collect().await.expect("a whole body");
        let trailers = collected.trailers().cloned();
        (parts, collected.to_bytes(), trailers)
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct Client(tonic::client::Grpc<Channel>);

impl Client {
    /// `Charge`, with the `idempotency-key` metadata if `key` is given.
    async fn charge(
        &mut self,
        key: Option<&str>,
        message: ChargeRequest,
    ) -> Result<Response<Charge>, Status> {
        self.charge_as(None, key, message).await
    }

    /// `Charge` by the caller whose `authorization` metadata is `caller` (if given), with the
    /// `idempotency-key` metadata if `key` is given.
    async fn charge_as(
        &mut self,
        caller: Option<&str>,
        key: Option<&str>,
        message: ChargeRequest,
    ) -> Result<Response<Charge>, Status> {
        let mut request = Request::new(message);
        if let Some(key) = key {
            let key = MetadataValue::try_from(key).expect("an ASCII key");
            request.metadata_mut().insert("idempotency-key", key);
        }
        if let Some(caller) = caller {
            let caller = MetadataValue::try_from(caller).expect("an ASCII credential");
            request.metadata_mut().insert("authorization", caller);
        }
        self.0.ready().await.expect("the channel is ready");
        let codec = ProstCodec::<ChargeRequest, Charge>::default();
        self.0
            .unary(request, PathAndQuery::from_static(CHARGE), codec)
            .await
    }
}

fn charge(amount: i64) -> ChargeRequest {
    ChargeRequest {
        amount,
        request_id: String::new(),
    }
}

fn replayed(metadata: &MetadataMap) -> bool {
    metadata
        .get("idempotent-replayed")
        .is_some_and(|value| value == "true")
}

/// Everything the client sees of an answer: message, headers and trailing metadata (tonic
/// merges the trailers into the metadata of a unary answer), without the replay marker.
fn seen(response: &Response<Charge>) -> (Charge, Vec<(String, Vec<u8>)>) {
    let mut metadata: Vec<(String, Vec<u8>)> = response
        .metadata()
        .clone()
        .into_headers()
        .iter()
        .filter(|(name, _)| !matches!(name.as_str(), "idempotent-replayed" | "date"))
        .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
        .collect();
    metadata.sort();
    (response.get_ref().clone(), metadata)
}

async fn a_retried_call_executes_once_and_replays_message_and_trailing_metadata<St>(store: St)
where
    St: IdempotencyStore + Clone,
{
    let served = serve(IdempotencyLayer::new(store), Duration::ZERO).await;
    let mut client = served.client().await;
    let first = client
        .charge(Some("charge-1"), charge(500))
        .await
        .expect("charged");
    let retry = client
        .charge(Some("charge-1"), charge(500))
        .await
        .expect("replayed");
    assert_eq!(served.calls(), 1, "the retry must not execute again");
    assert!(!replayed(first.metadata()));
    assert!(replayed(retry.metadata()), "{:?}", retry.metadata());
    assert_eq!(first.get_ref().id, "ch_1");
    assert_eq!(seen(&retry), seen(&first), "the replay is the first answer");
    let metadata = retry.metadata();
    let entries: Vec<_> = metadata.get_all("x-ledger-entry").iter().collect();
    assert_eq!(
        entries,
        ["debit ch_1", "credit ch_1"],
        "repeated trailing metadata kept in order"
    );
    let receipt = metadata
        .get_bin("x-receipt-bin")
        .expect("binary trailing metadata replayed")
        .to_bytes()
        .expect("base64");
    assert_eq!(&receipt[..], b"\x00\xff\x0a%ch_1");
    assert_eq!(
        metadata.get("x-charge-id").expect("header metadata"),
        "ch_1"
    );
    // Another key is another call.
    let other = client
        .charge(Some("charge-2"), charge(500))
        .await
        .expect("charged");
    assert_eq!(other.get_ref().id, "ch_2");
    assert_eq!(served.calls(), 2);
}

/// Two tenants (two `authorization` credentials) that pick the same key for the same
/// message at the same time: each one's call executes, and each one's retry is replayed its
/// own answer, never the other tenant's.
async fn two_tenants_with_one_key_each_get_their_own_answer<St>(store: St)
where
    St: IdempotencyStore + Clone,
{
    let served = serve(IdempotencyLayer::new(store), Duration::from_millis(50)).await;
    let (mut alice, mut bob) = (served.client().await, served.client().await);
    let (a, b) = tokio::join!(
        alice.charge_as(Some("Bearer alice"), Some("order-1"), charge(500)),
        bob.charge_as(Some("Bearer bob"), Some("order-1"), charge(500)),
    );
    let (a, b) = (a.expect("alice charged"), b.expect("bob charged"));
    assert_eq!(served.calls(), 2, "one execution per tenant");
    assert_ne!(a.get_ref().id, b.get_ref().id, "two charges");
    for (client, caller, first) in [
        (&mut alice, "Bearer alice", &a),
        (&mut bob, "Bearer bob", &b),
    ] {
        let retry = client
            .charge_as(Some(caller), Some("order-1"), charge(500))
            .await
            .expect("replayed");
        assert!(replayed(retry.metadata()), "{caller}'s retry is a replay");
        assert_eq!(
            seen(&retry),
            seen(first),
            "{caller} is replayed its own answer"
        );
    }
    assert_eq!(served.calls(), 2, "the retries ran nothing");
}

/// The same, below tonic's client: headers, the length-prefixed message and the trailers
/// the retry receives are the first answer's bytes, plus `idempotent-replayed: true`.
async fn the_replay_is_the_first_answer_byte_for_byte<St>(store: St)
where
    St: IdempotencyStore + Clone,
{
    use http_body_util::{BodyExt, Full};
    use prost::Message;
    use tower::ServiceExt;

    let calls = Arc::new(AtomicUsize::new(0));
    let payments = Payments {
        calls: Arc::clone(&calls),
        delay: Duration::ZERO,
    };
    let service = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(store))
        .map_request(|request: http::Request<RequestBody<Full<Bytes>>>| request.map(Body::new))
        .service(payments);
    let message = charge(900).encode_to_vec();
    let mut framed = vec![0];
    framed.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(&message);
    let mut answers = Vec::new();
    for _ in 0..2 {
        let request = http::Request::post(CHARGE)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("idempotency-key", "raw-1")
            .body(Full::new(Bytes::from(framed.clone())))
            .unwrap();
        let response = service.clone().oneshot(request).await.unwrap();
        let (mut parts, body) = response.into_parts();
        let collected = body.collect().await.expect("a whole body");
        let marker = parts.headers.remove("idempotent-replayed");
        let trailers = collected.trailers().cloned().expect("trailers");
        answers.push((
            marker,
            parts.status,
            parts.headers,
            collected.to_bytes(),
            trailers,
        ));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let [
        (None, status, headers, message, trailers),
        (Some(marker), ..),
    ] = &answers[..]
    else {
        panic!("the first answer is an execution, the second a replay: {answers:?}");
    };
    assert_eq!(marker, "true");
    let bytes = |map: &HeaderMap| {
        map.iter()
            .map(|(name, value)| (name.clone(), value.as_bytes().to_vec()))
            .collect::<Vec<_>>()
    };
    let (_, replay_status, replay_headers, replay_message, replay_trailers) = &answers[1];
    assert_eq!(replay_status, status);
    assert_eq!(bytes(replay_headers), bytes(headers));
    assert_eq!(replay_message, message);
    assert_eq!(message[0], 0, "an uncompressed length-prefixed message");
    assert_eq!(bytes(replay_trailers), bytes(trailers));
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers.get_all("x-ledger-entry").iter().count(), 2);
}

async fn concurrent_duplicates_are_held_and_run_the_handler_once<St>(store: St)
where
    St: IdempotencyStore + Clone,
{
    let layer =
        IdempotencyLayer::new(store).with_wait_mode(WaitMode::Wait(Duration::from_secs(10)));
    let served = serve(layer, Duration::from_millis(300)).await;
    let client = served.client().await;
    let calls = (0..16).map(|_| {
        let mut client = client.clone();
        tokio::spawn(async move { client.charge(Some("dup"), charge(700)).await })
    });
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.expect("task").expect("every duplicate answered"));
    }
    assert_eq!(served.calls(), 1, "16 concurrent duplicates, one execution");
    let first = answers
        .iter()
        .find(|answer| !replayed(answer.metadata()))
        .expect("one answer is the execution");
    for answer in &answers {
        assert_eq!(seen(answer), seen(first));
    }
    let replays = answers.iter().filter(|a| replayed(a.metadata())).count();
    assert_eq!(replays, 15);
}

async fn a_key_reused_with_another_message_is_refused_with_failed_precondition<St>(store: St)
where
    St: IdempotencyStore + Clone,
{
    let served = serve(IdempotencyLayer::new(store), Duration::ZERO).await;
    let mut client = served.client().await;
    client
        .charge(Some("reuse"), charge(100))
        .await
        .expect("charged");
    let status = client
        .charge(Some("reuse"), charge(999))
        .await
        .expect_err("another message under the same key");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("another"), "{status:?}");
    assert_eq!(
        status
            .metadata()
            .get("idempotency-problem")
            .expect("problem type"),
        "https://docs.rs/tower-idempotency/latest/tower_idempotency/enum.ProblemKind.html#variant.KeyReused"
    );
    assert_eq!(served.calls(), 1, "nothing executed for the reused key");
}

async fn a_handler_error_status_is_not_stored_unless_its_code_is_listed<St>(store: St)
where
    St: IdempotencyStore + Clone,
{
    let served = serve(IdempotencyLayer::new(store.clone()), Duration::ZERO).await;
    let mut client = served.client().await;
    for attempt in 1..=2 {
        let status = client
            .charge(Some("refused"), charge(0))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status
                .message()
                .ends_with(&format!("(execution {attempt})")),
            "{status:?}"
        );
        assert!(!replayed(status.metadata()));
    }
    assert_eq!(
        served.calls(),
        2,
        "an error status is not kept: the retry runs again"
    );

    let keep_refusals = IdempotencyLayer::new(store)
        .with_grpc_codes_stored([GrpcCode::Ok, GrpcCode::InvalidArgument]);
    let served = serve(keep_refusals, Duration::ZERO).await;
    let mut client = served.client().await;
    let first = client
        .charge(Some("kept-refusal"), charge(-5))
        .await
        .expect_err("refused");
    let retry = client
        .charge(Some("kept-refusal"), charge(-5))
        .await
        .expect_err("replayed");
    assert!(first.message().ends_with("(execution 1)"), "{first:?}");
    assert_eq!(served.calls(), 1, "a listed code is kept");
    assert_eq!(retry.code(), Code::InvalidArgument);
    assert_eq!(retry.message(), first.message());
    assert!(replayed(retry.metadata()), "{:?}", retry.metadata());
}

async fn an_aip_155_request_id_in_the_message_is_the_key<St>(store: St)
where
    St: IdempotencyStore + Clone,
{
    use prost::Message;

    let request_id = KeySource::grpc_message(|message| {
        let request = ChargeRequest::decode(message).ok()?;
        (!request.request_id.is_empty()).then_some(request.request_id)
    });
    let layer = IdempotencyLayer::new(store).with_key_source(request_id);
    let served = serve(layer, Duration::ZERO).await;
    let mut client = served.client().await;
    let with_id = |id: &str| ChargeRequest {
        amount: 250,
        request_id: id.to_owned(),
    };
    let first = client
        .charge(None, with_id("4b0c6f5e-aip-155"))
        .await
        .expect("charged");
    let retry = client
        .charge(None, with_id("4b0c6f5e-aip-155"))
        .await
        .expect("replayed");
    assert!(replayed(retry.metadata()));
    assert_eq!(seen(&retry), seen(&first));
    assert_eq!(served.calls(), 1);
    let other = client
        .charge(None, with_id("another-request"))
        .await
        .expect("charged");
    assert_eq!(other.get_ref().id, "ch_2");
    assert_eq!(served.calls(), 2);
}

/// AIP-155: a call without a request id is a new request. Two identical keyless calls from
/// one authenticated client (which would get a derived key over HTTP) both execute.
async fn a_call_without_a_key_is_a_new_call<St>(store: St)
where
    St: IdempotencyStore + Clone,
{
    use tower_idempotency::MissingKey;

    let served = serve(IdempotencyLayer::new(store.clone()), Duration::ZERO).await;
    let mut client = served.client().await;
    let mut charged = Vec::new();
    for _ in 0..2 {
        let mut request = Request::new(charge(300));
        let bearer = MetadataValue::from_static("Bearer alice");
        request.metadata_mut().insert("authorization", bearer);
        client.0.ready().await.expect("ready");
        let codec = ProstCodec::<ChargeRequest, Charge>::default();
        let answer = client
            .0
            .unary(request, PathAndQuery::from_static(CHARGE), codec)
            .await
            .expect("charged");
        assert!(!replayed(answer.metadata()));
        charged.push(answer.into_inner().id);
    }
    assert_eq!(charged, ["ch_1", "ch_2"]);

    let required = IdempotencyLayer::new(store).with_missing_key(MissingKey::Required);
    let served = serve(required, Duration::ZERO).await;
    let mut client = served.client().await;
    let refused = client.charge(None, charge(300)).await.expect_err("no key");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert_eq!(served.calls(), 0);
}

async fn the_layers_own_refusals_are_grpc_statuses<St>(store: St)
where
    St: IdempotencyStore + Clone,
{
    let layer = IdempotencyLayer::new(store.clone()).with_wait_mode(WaitMode::Reject);
    let served = serve(layer, Duration::from_secs(1)).await;
    let mut client = served.client().await;
    let too_long = "k".repeat(300);
    let invalid = client
        .charge(Some(&too_long), charge(1))
        .await
        .expect_err("invalid key");
    assert_eq!(invalid.code(), Code::InvalidArgument, "{invalid:?}");
    assert_eq!(served.calls(), 0);

    let mut first = client.clone();
    let running = tokio::spawn(async move { first.charge(Some("busy"), charge(1)).await });
    while served.calls() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let busy = client
        .charge(Some("busy"), charge(1))
        .await
        .expect_err("in flight");
    assert_eq!(
        busy.code(),
        Code::Unavailable,
        "in flight: retry later, {busy:?}"
    );
    assert_eq!(
        busy.metadata()
            .get("grpc-retry-pushback-ms")
            .expect("pushback"),
        "1000"
    );
    running
        .await
        .expect("task")
        .expect("the first call completes");
    let replay = client
        .charge(Some("busy"), charge(1))
        .await
        .expect("replayed");
    assert!(
        replayed(replay.metadata()),
        "the retry of an in-flight call gets the answer"
    );
    assert_eq!(served.calls(), 1);

    for attempt in 2..=3 {
        let panicked = client
            .charge(Some("panics"), charge(PANICS))
            .await
            .expect_err("panicked");
        assert_eq!(panicked.code(), Code::Internal, "{panicked:?}");
        assert_eq!(
            served.calls(),
            attempt,
            "the key is released: the retry runs again"
        );
    }

    let small = IdempotencyLayer::new(store).with_request_body_limit(4);
    let served = serve(small, Duration::ZERO).await;
    let mut client = served.client().await;
    let large = client
        .charge(Some("large"), charge(1_000_000))
        .await
        .expect_err("too large");
    assert_eq!(large.code(), Code::ResourceExhausted, "{large:?}");
    assert_eq!(served.calls(), 0);
}

async fn a_streaming_method_named_passes_through_untouched<St>(store: St)
where
    St: IdempotencyStore + Clone,
{
    let layer = IdempotencyLayer::new(store).with_grpc_streaming_methods([WATCH]);
    let served = serve(layer, Duration::ZERO).await;
    let client = served.client().await;
    for _ in 0..2 {
        let mut client = client.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut request = Request::new(ReceiverStream::new(rx));
        request
            .metadata_mut()
            .insert("idempotency-key", MetadataValue::from_static("watch"));
        tx.send(charge(1)).await.expect("send");
        client.0.ready().await.expect("ready");
        let codec = ProstCodec::<ChargeRequest, Charge>::default();
        let path = PathAndQuery::from_static(WATCH);
        let call = client.0.streaming(request, path, codec);
        // The answer to the first message comes while the request stream is still open:
        // the layer does not wait for its end.
        let response = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .expect("the stream was held back")
            .expect("a stream");
        assert!(!replayed(response.metadata()));
        let mut stream = response.into_inner();
        let echo = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("the first message was held back");
        assert_eq!(echo.expect("a message").expect("ok").amount, 1);
        tx.send(charge(2)).await.expect("send");
        drop(tx);
        let echo = stream.next().await.expect("a message").expect("ok");
        assert_eq!(echo.amount, 2);
        assert!(stream.next().await.is_none());
    }
    assert_eq!(served.calls(), 2, "a streaming call is never replayed");
}

/// A server-streaming method left unnamed is protected like a unary one: its stream is
/// captured as the handler produces it, and replayed whole once it ended.
async fn an_unnamed_server_stream_is_captured_and_replayed_whole<St>(store: St)
where
    St: IdempotencyStore + Clone,
{
    let served = serve(IdempotencyLayer::new(store), Duration::ZERO).await;
    let mut client = served.client().await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let mut request = Request::new(charge(900));
        request
            .metadata_mut()
            .insert("idempotency-key", MetadataValue::from_static("split-1"));
        client.0.ready().await.expect("ready");
        let codec = ProstCodec::<ChargeRequest, Charge>::default();
        let response = client
            .0
            .server_streaming(request, PathAndQuery::from_static(SPLIT), codec)
            .await
            .expect("a stream");
        let marker = replayed(response.metadata());
        let mut stream = response.into_inner();
        let mut ids = Vec::new();
        while let Some(charge) = stream.message().await.expect("a message") {
            ids.push(charge.id);
        }
        let trailers = stream.trailers().await.expect("trailers");
        seen.push((marker, ids, trailers.map(|t| t.into_headers())));
    }
    assert_eq!(served.calls(), 1, "the stream ran once");
    assert_eq!(seen[0].1, ["ch_1_1", "ch_1_2", "ch_1_3"]);
    assert_eq!((seen[0].0, seen[1].0), (false, true));
    assert_eq!(seen[1].1, seen[0].1, "the replay is the same stream");
    assert_eq!(seen[1].2, seen[0].2, "and the same trailers");
}

macro_rules! on_every_store {
    ($($scenario:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(tower_idempotency::MemoryStore::default()).await;
                }
            )*
        }

        #[cfg(feature = "redis")]
        mod redis {
            use super::common::redis_server::RedisServer;

            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let server = RedisServer::start();
                    let store = tower_idempotency::RedisStore::connect(&server.url())
                        .await
                        .expect("connect to the test server");
                    super::$scenario(store).await;
                }
            )*
        }
    };
}

on_every_store!(
    a_retried_call_executes_once_and_replays_message_and_trailing_metadata,
    two_tenants_with_one_key_each_get_their_own_answer,
    the_replay_is_the_first_answer_byte_for_byte,
    concurrent_duplicates_are_held_and_run_the_handler_once,
    a_key_reused_with_another_message_is_refused_with_failed_precondition,
    a_handler_error_status_is_not_stored_unless_its_code_is_listed,
    an_aip_155_request_id_in_the_message_is_the_key,
    a_call_without_a_key_is_a_new_call,
    an_unnamed_server_stream_is_captured_and_replayed_whole,
    the_layers_own_refusals_are_grpc_statuses,
    a_streaming_method_named_passes_through_untouched,
);

#[tokio::test]
async fn a_store_outage_answers_unavailable_and_runs_nothing() {
    let store = common::flaky_store::FlakyStore::over(MemoryStore::default());
    let served = serve(IdempotencyLayer::new(store.clone()), Duration::ZERO).await;
    let mut client = served.client().await;
    store.hook.down.store(true, Ordering::SeqCst);
    let status = client
        .charge(Some("outage"), charge(1))
        .await
        .expect_err("store down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        status
            .metadata()
            .get("grpc-retry-pushback-ms")
            .expect("pushback"),
        "2000"
    );
    assert_eq!(served.calls(), 0, "fail-closed: nothing ran unprotected");
    store.hook.down.store(false, Ordering::SeqCst);
    client
        .charge(Some("outage"), charge(1))
        .await
        .expect("the store is back");
    assert_eq!(served.calls(), 1);
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn a_redis_outage_answers_unavailable_and_runs_nothing() {
    let mut server = common::redis_server::RedisServer::start();
    let store = tower_idempotency::RedisStore::connect(&server.url())
        .await
        .expect("connect to the test server");
    let served = serve(IdempotencyLayer::new(store), Duration::ZERO).await;
    let mut client = served.client().await;
    client
        .charge(Some("before"), charge(1))
        .await
        .expect("charged");
    server.stop();
    let status = client
        .charge(Some("outage"), charge(1))
        .await
        .expect_err("redis down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(served.calls(), 1, "fail-closed: nothing ran unprotected");
}

/// One length-prefixed message, its compressed flag `flag`.
fn framed(flag: u8, message: &[u8]) -> Bytes {
    let mut body = vec![flag];
    body.extend_from_slice(&u32::try_from(message.len()).unwrap_or(0).to_be_bytes());
    body.extend_from_slice(message);
    Bytes::from(body)
}

/// A call to `path` as the bytes go: `content_type`, `metadata`, and `body`.
fn raw_request(
    path: &str,
    content_type: &str,
    metadata: &[(&str, &str)],
    body: Body,
) -> http::Request<Body> {
    let mut request = http::Request::post(path)
        .header("content-type", content_type)
        .header("te", "trailers");
    for (name, value) in metadata {
        request = request.header(*name, *value);
    }
    request.body(body).expect("a request")
}

impl Client {
    /// A server-streaming call to `path` under `key`: the charges received, and the code
    /// the stream ended with; `Err` for a call refused before any message.
    async fn split(
        &mut self,
        path: &'static str,
        key: &str,
    ) -> Result<(Vec<String>, Code), Status> {
        let mut request = Request::new(charge(900));
        let key = MetadataValue::try_from(key).expect("an ASCII key");
        request.metadata_mut().insert("idempotency-key", key);
        self.0.ready().await.expect("ready");
        let codec = ProstCodec::<ChargeRequest, Charge>::default();
        let response = self
            .0
            .server_streaming(request, PathAndQuery::from_static(path), codec)
            .await?;
        let mut stream = response.into_inner();
        let mut ids = Vec::new();
        loop {
            match stream.message().await {
                Ok(Some(charge)) => ids.push(charge.id),
                Ok(None) => return Ok((ids, Code::Ok)),
                Err(status) => return Ok((ids, status.code())),
            }
        }
    }
}

/// The gRPC protocol puts the status in the trailers, or in the head of a Trailers-Only
/// answer (no data, no trailers). A head status beside data or trailers is malformed (tonic's
/// client acts on the head): such an answer is never kept, whatever either status says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_in_the_head_beside_data_or_trailers_is_never_kept() {
    let served = serve(
        IdempotencyLayer::new(MemoryStore::default()),
        Duration::ZERO,
    )
    .await;
    let channel = served.channel().await;
    for (key, head, trailer, executions) in [
        ("status in the trailers alone", None, Some("0"), 1),
        ("head OK, trailers without status", Some("0"), None, 2),
        ("head INTERNAL, trailers OK", Some("13"), Some("0"), 2),
        ("head OK, trailers INTERNAL", Some("0"), Some("13"), 2),
    ] {
        let before = served.calls();
        let mut replays = Vec::new();
        let key = key.replace([' ', ','], "-");
        for _ in 0..2 {
            let mut metadata = vec![("idempotency-key", key.as_str())];
            metadata.extend(head.map(|status| ("x-head-status", status)));
            metadata.extend(trailer.map(|status| ("x-trailer-status", status)));
            let body = Body::new(http_body_util::Full::new(framed(0, b"")));
            let request = raw_request(RAW, "application/grpc", &metadata, body);
            let (parts, _, _) = Served::raw(&channel, request).await;
            replays.push(parts.headers.contains_key("idempotent-replayed"));
        }
        assert_eq!(served.calls() - before, executions, "{key}");
        assert_eq!(replays, [false, executions == 1], "{key}");
    }
}

/// A server stream that ends in an error status after its messages is not kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ending_in_an_error_status_after_its_messages_is_not_kept() {
    let served = serve(
        IdempotencyLayer::new(MemoryStore::default()),
        Duration::ZERO,
    )
    .await;
    let mut client = served.client().await;
    for attempt in 1..=2 {
        let (ids, code) = client.split(SPLIT_FAILS, "fails").await.expect("a stream");
        assert_eq!(ids, [1, 2, 3].map(|part| format!("ch_{attempt}_{part}")));
        assert_eq!(code, Code::Unavailable);
        assert_eq!(served.calls(), attempt, "the retry runs again");
    }
}

/// Past the capture limit, a stream's key is kept or released by the status in its
/// trailers, as within it: an error releases it (the retry runs again), `OK` spends it (not
/// replayable: refused, never run twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_over_the_capture_limit_is_kept_by_its_final_status() {
    let layer = IdempotencyLayer::new(MemoryStore::default()).with_response_body_limit(8);
    let served = serve(layer, Duration::ZERO).await;
    let mut client = served.client().await;
    for attempt in 1..=2 {
        let (ids, code) = client
            .split(SPLIT_FAILS, "large-fails")
            .await
            .expect("a stream");
        assert_eq!(ids.len(), 3, "the whole stream is delivered");
        assert_eq!(code, Code::Unavailable);
        assert_eq!(served.calls(), attempt, "an error releases the key");
    }
    let (ids, code) = client.split(SPLIT, "large-ok").await.expect("a stream");
    assert_eq!((ids.len(), code), (3, Code::Ok));
    let refused = client
        .split(SPLIT, "large-ok")
        .await
        .expect_err("not replayable");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(
        served.calls(),
        3,
        "an OK stream too large to keep is not run again"
    );
}

/// gRPC-Web carries its status in the body, where the layer can neither read nor write one:
/// its calls pass through untouched, keyed or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_calls_pass_through_untouched() {
    let served = serve(
        IdempotencyLayer::new(MemoryStore::default()),
        Duration::ZERO,
    )
    .await;
    let channel = served.channel().await;
    let mut executions = 0;
    for content_type in ["application/grpc-web+proto", "application/grpc-web-text"] {
        for metadata in [
            &[("idempotency-key", "web-1"), ("x-trailer-status", "0")][..],
            &[("authorization", "Bearer alice"), ("x-trailer-status", "0")][..],
        ] {
            for _ in 0..2 {
                let body = Body::new(http_body_util::Full::new(framed(0, b"")));
                let request = raw_request(RAW, content_type, metadata, body);
                let (parts, _, _) = Served::raw(&channel, request).await;
                assert!(!parts.headers.contains_key("idempotent-replayed"));
                executions += 1;
                assert_eq!(served.calls(), executions, "{content_type} {metadata:?}");
            }
        }
    }
}

/// A key source over the request message reads no compressed message: such a call is told
/// apart from one without a key (refused as unreadable under `Required`, else it runs
/// unprotected, counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_message_is_told_apart_from_a_call_without_a_key() {
    use tower_idempotency::MissingKey;

    let message_is_the_key =
        || KeySource::grpc_message(|message| Some(String::from_utf8_lossy(message).into_owned()));
    let layer = IdempotencyLayer::new(MemoryStore::default())
        .with_key_source(message_is_the_key())
        .with_missing_key(MissingKey::Required);
    let served = serve(layer, Duration::ZERO).await;
    let channel = served.channel().await;
    let call = |flag: u8| {
        let body = Body::new(http_body_util::Full::new(framed(flag, b"req-1")));
        raw_request(RAW, "application/grpc", &[("x-trailer-status", "0")], body)
    };
    for replayed in [false, true] {
        let (parts, _, _) = Served::raw(&channel, call(0)).await;
        assert_eq!(parts.headers.contains_key("idempotent-replayed"), replayed);
    }
    assert_eq!(served.calls(), 1, "an uncompressed message has its key");
    let (parts, _, _) = Served::raw(&channel, call(1)).await;
    assert_eq!(parts.headers["grpc-status"], "3", "{parts:?}");
    let message = parts.headers["grpc-message"].to_str().expect("ASCII");
    assert!(message.contains("compressed"), "{message}");
    assert_eq!(served.calls(), 1);

    let layer = IdempotencyLayer::new(MemoryStore::default()).with_key_source(message_is_the_key());
    let served = serve(layer, Duration::ZERO).await;
    let channel = served.channel().await;
    for _ in 0..2 {
        let (parts, _, _) = Served::raw(&channel, call(1)).await;
        assert!(!parts.headers.contains_key("idempotent-replayed"));
    }
    assert_eq!(served.calls(), 2, "unprotected: no key to read");
}

/// Behind axum's `nest_service`, the layer sees the path without its prefix; a streaming
/// method is named by the path its client sent, as its record is: its keyed call passes
/// through while its request stream is still open.
#[cfg(feature = "axum")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_method_behind_nest_is_named_by_the_path_the_client_sent() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let answer = tower::service_fn(
        move |_request: http::Request<RequestBody<axum::body::Body>>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async {
                let response = http::Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "0")
                    .body(axum::body::Body::empty())
                    .expect("a response");
                Ok::<_, Infallible>(response)
            }
        },
    );
    let layer = IdempotencyLayer::new(MemoryStore::default()).with_grpc_streaming_methods([WATCH]);
    let nested = ServiceBuilder::new().layer(layer).service(answer);
    let routes = axum::Router::new().nest_service("/payments.v1.Payments", nested);
    let served = serve_routes(routes, calls).await;
    let channel = served.channel().await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Status>>(1);
    tx.send(Ok(Frame::data(framed(0, b""))))
        .await
        .expect("send");
    let body = Body::new(http_body_util::StreamBody::new(ReceiverStream::new(rx)));
    let request = raw_request(WATCH, "application/grpc", &[("idempotency-key", "w")], body);
    let answer = tokio::time::timeout(Duration::from_secs(5), Served::raw(&channel, request))
        .await
        .expect("the call was held back: taken as unary");
    assert_eq!(answer.0.headers["grpc-status"], "0");
    assert_eq!(served.calls(), 1);
    drop(tx);
}

/// HTTP/2 has no `connection` header (hyper strips it, with a warning): a refusal that
/// leaves a request body unread closes an HTTP/1 connection only.
#[tokio::test]
async fn a_refusal_of_an_http2_call_carries_no_connection_header() {
    use http_body_util::Full;
    use tower::ServiceExt;

    let handler = tower::service_fn(|_request: http::Request<RequestBody<Full<Bytes>>>| async {
        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::new())))
    });
    let service = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_request_body_limit(4))
        .service(handler);
    let too_long = "k".repeat(300);
    for key in ["valid", too_long.as_str()] {
        for (version, content_type, closes) in [
            (http::Version::HTTP_2, "application/grpc", false),
            (http::Version::HTTP_2, "application/json", false),
            (http::Version::HTTP_11, "application/json", true),
        ] {
            let request = http::Request::post(CHARGE)
                .version(version)
                .header("content-type", content_type)
                .header("idempotency-key", key)
                .body(Full::new(Bytes::from(vec![0; 100])))
                .expect("a request");
            let response = service.clone().oneshot(request).await.expect("an answer");
            assert_eq!(
                response.headers().get("connection").is_some(),
                closes,
                "{version:?} {content_type} {}",
                key.len()
            );
        }
    }
}

/// With the protected methods named, a call of any other method passes through: a
/// bidirectional one left out of the streaming methods is answered while its request
/// stream is open, and a named one is still protected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_protected_methods_named_every_other_call_passes_through() {
    let layer = IdempotencyLayer::new(MemoryStore::default()).with_grpc_protected_methods([CHARGE]);
    let served = serve(layer, Duration::ZERO).await;
    let mut client = served.client().await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut request = Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("idempotency-key", MetadataValue::from_static("watch"));
    tx.send(charge(1)).await.expect("send");
    client.0.ready().await.expect("ready");
    let codec = ProstCodec::<ChargeRequest, Charge>::default();
    let call = client
        .0
        .streaming(request, PathAndQuery::from_static(WATCH), codec);
    let response = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("the stream was held back: taken as unary")
        .expect("a stream");
    let mut stream = response.into_inner();
    let echo = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("the first message was held back");
    assert_eq!(echo.expect("a message").expect("ok").amount, 1);
    drop(tx);
    for replayed_now in [false, true] {
        let answer = client
            .charge(Some("listed"), charge(5))
            .await
            .expect("charged");
        assert_eq!(replayed(answer.metadata()), replayed_now);
    }
    assert_eq!(served.calls(), 2, "one watch, one charge");
}

/// A gRPC stream whose client left and that did not end in time has no status: its key is
/// released (the retry runs again), within the capture limit or past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_short_after_its_client_left_releases_its_key() {
    for limit in [1024 * 1024, 8] {
        let layer = IdempotencyLayer::new(MemoryStore::default())
            .with_response_body_limit(limit)
            .with_capture_after_disconnect(Duration::from_millis(100));
        let served = serve(layer, Duration::ZERO).await;
        for attempt in 1..=2 {
            let mut client = served.client().await;
            let mut request = Request::new(charge(900));
            request
                .metadata_mut()
                .insert("idempotency-key", MetadataValue::from_static("hangs"));
            client.0.ready().await.expect("ready");
            let codec = ProstCodec::<ChargeRequest, Charge>::default();
            let response = client
                .0
                .server_streaming(request, PathAndQuery::from_static(SPLIT_HANGS), codec)
                .await
                .expect("a stream");
            let mut stream = response.into_inner();
            let first = stream.message().await.expect("a message");
            assert!(first.is_some(), "limit {limit}");
            assert_eq!(
                served.calls(),
                attempt,
                "limit {limit}: the retry runs again"
            );
            drop(stream);
            drop(client);
            // The bound after the client left, and the release.
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
    }
}
