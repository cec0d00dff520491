//! End to end: the layer on an `axum::Router`, under `tower::ServiceBuilder`, and behind a
//! real hyper HTTP/1.1 server driven by a keep-alive client over loopback (SPEC §1).

mod common;

use std::{
    convert::Infallible,
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{Router, body::Body, response::AppendHeaders, routing::post};
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};
use tower::{ServiceBuilder, ServiceExt};
use tower_idempotency::{IdempotencyLayer, MemoryStore, PeerAddr, ProblemKind, RequestBody};

use common::service::{Reply, within};

/// `POST /charges` (counted, echoes the body, sets two cookies) and `GET /charges`.
fn app(calls: &Arc<AtomicUsize>, store: MemoryStore) -> Router {
    let post_calls = Arc::clone(calls);
    let get_calls = Arc::clone(calls);
    Router::new()
        .route(
            "/charges",
            post(move |body: String| {
                let n = post_calls.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    (
                        StatusCode::CREATED,
                        AppendHeaders([
                            (header::SET_COOKIE, "a=1; Path=/"),
                            (header::SET_COOKIE, "b=2; Path=/"),
                        ]),
                        format!("charged {body} (execution #{n})"),
                    )
                }
            })
            .get(move || {
                let n = get_calls.fetch_add(1, Ordering::SeqCst) + 1;
                async move { format!("listing #{n}") }
            }),
        )
        .layer(IdempotencyLayer::new(store))
}

fn axum_post(key: Option<&str>, payload: &'static str) -> Request<Body> {
    let mut request = Request::post("/charges");
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.body(Body::from(payload)).unwrap()
}

async fn call(router: &Router, request: Request<Body>) -> Reply {
    let response = within(router.clone().oneshot(request)).await.unwrap();
    Reply::read(response).await
}

#[tokio::test]
async fn an_axum_router_with_the_layer_executes_once_and_replays_byte_for_byte() {
    let calls = Arc::new(AtomicUsize::new(0));
    let router = app(&calls, MemoryStore::default());
    let first = call(&router, axum_post(Some("k1"), "{\"amount\":100}")).await;
    let replay = call(&router, axum_post(Some("k1"), "{\"amount\":100}")).await;

    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.text(), "charged {\"amount\":100} (execution #1)");
    assert!(!first.replayed());
    assert!(replay.replayed());
    assert_eq!(replay.status, first.status);
    assert_eq!(replay.header_list(), first.header_list());
    assert_eq!(replay.headers.get_all(header::SET_COOKIE).iter().count(), 2);
    assert_eq!(replay.body, first.body);
}

#[tokio::test]
async fn an_axum_router_with_the_layer_lets_get_through_and_refuses_bad_keys() {
    let calls = Arc::new(AtomicUsize::new(0));
    let store = MemoryStore::default();
    let router = app(&calls, store.clone());
    for n in 1..=2 {
        let get = Request::get("/charges").body(Body::empty()).unwrap();
        let reply = call(&router, get).await;
        assert_eq!(reply.text(), format!("listing #{n}"));
        assert!(!reply.replayed());
    }
    assert_eq!(store.record_count(), 0);

    let bad = call(&router, axum_post(Some("bad key"), "{}")).await;
    bad.assert_problem(ProblemKind::InvalidKey, StatusCode::BAD_REQUEST);
    call(&router, axum_post(Some("k1"), "{\"a\":1}")).await;
    let reused = call(&router, axum_post(Some("k1"), "{\"a\":2}")).await;
    reused.assert_problem(ProblemKind::KeyReused, StatusCode::CONFLICT);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn an_axum_router_with_the_layer_catches_a_double_clicked_form() {
    let calls = Arc::new(AtomicUsize::new(0));
    let router = app(&calls, MemoryStore::default());
    // A form has no key: it is scoped by the browser's address, as the server gives it.
    let from_browser = || {
        let mut request = axum_post(None, "item=42");
        request
            .extensions_mut()
            .insert(PeerAddr(Ipv4Addr::LOCALHOST.into()));
        request
    };
    let first = call(&router, from_browser()).await;
    let second = call(&router, from_browser()).await;
    assert!(second.replayed());
    assert_eq!(second.body, first.body);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn service_builder_over_a_service_fn_executes_once_and_replays() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(MemoryStore::default()))
        .service_fn(move |request: Request<RequestBody<Full<Bytes>>>| {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                let body = http_body_util::BodyExt::collect(request.into_body())
                    .await
                    .unwrap()
                    .to_bytes();
                let mut response = Response::new(Full::new(Bytes::from(format!(
                    "{} #{n}",
                    String::from_utf8_lossy(&body)
                ))));
                *response.status_mut() = StatusCode::ACCEPTED;
                Ok::<_, Infallible>(response)
            }
        });
    let request = || {
        Request::post("/jobs")
            .header("idempotency-key", "job-1")
            .body(Full::new(Bytes::from_static(b"payload")))
            .unwrap()
    };
    let first = Reply::read(within(svc.clone().oneshot(request())).await.unwrap()).await;
    let replay = Reply::read(within(svc.clone().oneshot(request())).await.unwrap()).await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    assert_eq!(first.text(), "payload #1");
    assert!(replay.replayed());
    assert_eq!(replay.body, first.body);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// Serves `router` over HTTP/1.1 with keep-alive on a loopback port; counts connections.
async fn start_server(router: Router) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::clone(&connections);
    // The server task ends with the test's runtime.
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            accepted.fetch_add(1, Ordering::SeqCst);
            let router = router.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request| router.clone().oneshot(request));
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, connections)
}

/// A response as read off the wire.
#[derive(Debug)]
struct WireResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl WireResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// A minimal HTTP/1.1 keep-alive client over one TCP connection.
struct Client {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Client {
    async fn connect(addr: std::net::SocketAddr) -> Self {
        let (read, writer) = TcpStream::connect(addr).await.unwrap().into_split();
        Self {
            reader: BufReader::new(read),
            writer,
        }
    }

    /// Sends a POST with its head and body in two separate writes, a pause between them.
    async fn post_in_two_writes(&mut self, path: &str, key: &str, body: &str) -> WireResponse {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nIdempotency-Key: {key}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        self.writer.write_all(head.as_bytes()).await.unwrap();
        self.writer.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        self.writer.write_all(body.as_bytes()).await.unwrap();
        self.writer.flush().await.unwrap();
        within(self.read_response()).await
    }

    async fn get(&mut self, path: &str) -> WireResponse {
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        self.writer.write_all(request.as_bytes()).await.unwrap();
        self.writer.flush().await.unwrap();
        within(self.read_response()).await
    }

    async fn line(&mut self) -> String {
        let mut line = String::new();
        let read = self.reader.read_line(&mut line).await.unwrap();
        assert!(read > 0, "the server closed the connection");
        line.trim_end_matches(['\r', '\n']).to_owned()
    }

    async fn read_response(&mut self) -> WireResponse {
        let status_line = self.line().await;
        let status = status_line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("a status line, got {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let line = self.line().await;
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').expect("a header line");
            headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
        }
        let mut response = WireResponse {
            status,
            headers,
            body: Vec::new(),
        };
        if let Some(len) = response.header("content-length") {
            let mut body = vec![0; len.parse().unwrap()];
            self.reader.read_exact(&mut body).await.unwrap();
            response.body = body;
        } else if response.header("transfer-encoding") == Some("chunked") {
            loop {
                let size = usize::from_str_radix(&self.line().await, 16).unwrap();
                if size == 0 {
                    while !self.line().await.is_empty() {}
                    break;
                }
                let mut chunk = vec![0; size + 2];
                self.reader.read_exact(&mut chunk).await.unwrap();
                response.body.extend_from_slice(&chunk[..size]);
            }
        }
        response
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_over_hyper_keeps_the_keep_alive_connection_open() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (addr, connections) = start_server(app(&calls, MemoryStore::default())).await;
    let mut client = Client::connect(addr).await;

    let first = client
        .post_in_two_writes("/charges", "wire-key", "{\"amount\":7}")
        .await;
    assert_eq!(first.status, 201);
    assert_eq!(first.body, b"charged {\"amount\":7} (execution #1)");
    assert_eq!(first.header("idempotent-replayed"), None);
    assert_ne!(first.header("connection"), Some("close"));

    let replay = client
        .post_in_two_writes("/charges", "wire-key", "{\"amount\":7}")
        .await;
    assert_eq!(replay.status, 201);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.body, first.body);
    assert_eq!(replay.all("set-cookie"), ["a=1; Path=/", "b=2; Path=/"]);
    assert_ne!(replay.header("connection"), Some("close"));

    // The same connection serves a third request, and a fourth.
    let third = client
        .post_in_two_writes("/charges", "wire-key", "{\"amount\":7}")
        .await;
    assert_eq!(third.header("idempotent-replayed"), Some("true"));
    // A problem answered after the body was read keeps the connection too.
    let reused = client
        .post_in_two_writes("/charges", "wire-key", "{\"amount\":8}")
        .await;
    assert_eq!(reused.status, 409);
    assert_eq!(
        reused.header("content-type"),
        Some("application/problem+json")
    );
    let listing = client.get("/charges").await;
    assert_eq!(listing.status, 200);
    assert_eq!(listing.body, b"listing #2");

    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "one connection served all"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2, "one charge, one listing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_over_hyper_run_the_handler_once() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (addr, connections) = start_server(app(&calls, MemoryStore::default())).await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..10 {
        tasks.spawn(async move {
            let mut client = Client::connect(addr).await;
            client.post_in_two_writes("/charges", "same", "{}").await
        });
    }
    let responses = within(tasks.join_all()).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(
        responses
            .iter()
            .all(|r| r.status == 201 && r.body == responses[0].body)
    );
    let originals = responses
        .iter()
        .filter(|r| r.header("idempotent-replayed").is_none())
        .count();
    assert_eq!(originals, 1);
    assert_eq!(connections.load(Ordering::SeqCst), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_decided_from_the_head_still_keeps_the_keep_alive_connection() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (addr, connections) = start_server(app(&calls, MemoryStore::default())).await;
    let mut client = Client::connect(addr).await;

    // The key is refused from the headers alone; the body arrives in a second write.
    let refused = client
        .post_in_two_writes("/charges", "bad key", "{\"amount\":7}")
        .await;
    assert_eq!(refused.status, 400);
    assert_eq!(
        refused.header("content-type"),
        Some("application/problem+json")
    );
    assert_ne!(refused.header("connection"), Some("close"));

    let next = client
        .post_in_two_writes("/charges", "good-key", "{\"amount\":7}")
        .await;
    assert_eq!(next.status, 201);
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "one connection served both"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_is_refused_with_connection_close_without_reading_it() {
    let calls = Arc::new(AtomicUsize::new(0));
    let post_calls = Arc::clone(&calls);
    let router = Router::new()
        .route(
            "/charges",
            post(move || {
                post_calls.fetch_add(1, Ordering::SeqCst);
                async { "charged" }
            }),
        )
        .layer(IdempotencyLayer::new(MemoryStore::default()).with_request_body_limit(16));
    let (addr, _) = start_server(router).await;
    let mut client = Client::connect(addr).await;
    let refused = client
        .post_in_two_writes("/charges", "big", "{\"amount\":1234567890123456789}")
        .await;
    assert_eq!(refused.status, 413);
    assert_eq!(
        refused.header("connection"),
        Some("close"),
        "the unread body makes the connection unusable, and the client is told so"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}
