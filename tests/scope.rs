//! Right response, right party, through axum (SPEC §3, §6): records are addressed by the
//! path the client sent (`nest`, `nest_service`), scoped by every common credential header,
//! and, for requests without a key, by the peer's address (never its port) or not at all;
//! a keyless upload over the body limit reaches its handler whole. Every check runs on
//! MemoryStore and on RedisStore (a redis-server the test starts).
#![cfg(all(feature = "axum", feature = "metrics", feature = "moka"))]

mod common;

use std::{
    collections::{BTreeSet, HashMap},
    net::{Ipv4Addr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::{ConnectInfo, Request as AxumRequest},
    routing::post,
};
use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body::Frame;
use http_body_util::BodyExt;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tokio::sync::{mpsc, watch};
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, IdempotencyStore, ProblemKind};

use common::{
    conformance::fresh_key,
    service::{BodyError, Reply, within},
};

/// A route that counts its executions and answers with its name, its execution number and
/// the body it received.
fn counting(name: &'static str, calls: &Arc<AtomicUsize>) -> Router {
    let calls = Arc::clone(calls);
    Router::new().route(
        "/payouts",
        post(move |body: String| {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            async move { (StatusCode::CREATED, format!("{name} #{n}: {body}")) }
        }),
    )
}

/// A key no other check (or earlier run against the same server) uses.
fn unique_key() -> String {
    fresh_key().to_hex()[..24].to_owned()
}

fn request(path: &str, headers: &[(&str, &str)], payload: &str) -> Request<Body> {
    let mut builder = Request::post(path);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Body::from(payload.to_owned())).unwrap()
}

/// As axum's `into_make_service_with_connect_info::<SocketAddr>()` serves it.
fn from_peer(mut request: Request<Body>, peer: SocketAddr) -> Request<Body> {
    request.extensions_mut().insert(ConnectInfo(peer));
    request
}

fn peer(last: u8, port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(192, 0, 2, last), port))
}

async fn call(app: &Router, request: Request<Body>) -> Reply {
    let response = within(app.clone().oneshot(request)).await.unwrap();
    Reply::read(response).await
}

/// Sends every request at once, and reads every reply in order.
async fn all_at_once(app: &Router, requests: Vec<Request<Body>>) -> Vec<Reply> {
    let sent: Vec<_> = requests
        .into_iter()
        .map(|request| {
            let app = app.clone();
            tokio::spawn(async move { call(&app, request).await })
        })
        .collect();
    let mut replies = Vec::with_capacity(sent.len());
    for reply in sent {
        replies.push(reply.await.expect("the request task finished"));
    }
    replies
}

/// The one metrics recorder of this test binary; each check counts under its own route label.
fn snapshotter() -> &'static Snapshotter {
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("the only recorder in this test binary");
        snapshotter
    })
}

/// `idempotency_requests_total{route, outcome}`. A snapshot drains the counters, and the
/// checks run at once: every snapshot is added to one running total.
fn requests_counted(route: &str, outcome: &str) -> u64 {
    static TOTALS: OnceLock<Mutex<HashMap<BTreeSet<String>, u64>>> = OnceLock::new();
    let mut totals = TOTALS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    for (key, _, _, value) in snapshotter().snapshot().into_vec() {
        if key.key().name() != "idempotency_requests_total" {
            continue;
        }
        let labels = key
            .key()
            .labels()
            .map(|label| format!("{}={}", label.key(), label.value()))
            .collect();
        if let DebugValue::Counter(n) = value {
            *totals.entry(labels).or_default() += n;
        }
    }
    let wanted = BTreeSet::from([format!("route={route}"), format!("outcome={outcome}")]);
    totals.get(&wanted).copied().unwrap_or(0)
}

/// A route label of its own for one check on one store. The recorder is installed first: a
/// layer takes its metric handles from the recorder installed when it is made.
fn label(check: &str, store: &str) -> &'static str {
    snapshotter();
    Box::leak(format!("{check}-{store}").into_boxed_str())
}

pub async fn nested_routers_keep_a_record_per_prefix<St: IdempotencyStore>(store: St) {
    let layer = IdempotencyLayer::new(store);
    let calls: HashMap<&str, Arc<AtomicUsize>> = ["eur", "usd", "gbp", "v2-eur"]
        .into_iter()
        .map(|name| (name, Arc::default()))
        .collect();
    let app = Router::new()
        .nest("/eur", counting("eur", &calls["eur"]).layer(layer.clone()))
        .nest("/usd", counting("usd", &calls["usd"]).layer(layer.clone()))
        .nest_service("/gbp", counting("gbp", &calls["gbp"]).layer(layer.clone()))
        .nest(
            "/v2",
            Router::new().nest("/eur", counting("v2-eur", &calls["v2-eur"]).layer(layer)),
        );
    let key = unique_key();
    let payout = |path: &str| request(path, &[("idempotency-key", &key)], r#"{"amount":100}"#);
    let paths = [
        "/eur/payouts",
        "/usd/payouts",
        "/gbp/payouts",
        "/v2/eur/payouts",
    ];
    // One client's key and body on every prefix, four times each, all at once.
    let requests = paths
        .iter()
        .flat_map(|path| (0..4).map(|_| payout(path)))
        .collect();
    let replies = all_at_once(&app, requests).await;
    for (path, replies) in paths.iter().zip(replies.chunks(4)) {
        let name = path.trim_end_matches("/payouts").trim_start_matches('/');
        let name = name.replace('/', "-");
        assert_eq!(calls[name.as_str()].load(Ordering::SeqCst), 1, "{path}");
        for reply in replies {
            assert_eq!(reply.status, StatusCode::CREATED, "{path}: {reply:?}");
            assert_eq!(
                reply.text(),
                format!("{name} #1: {{\"amount\":100}}"),
                "{path}"
            );
        }
        assert_eq!(
            replies.iter().filter(|r| !r.replayed()).count(),
            1,
            "{path}"
        );
    }
    // A later retry to one prefix gets that prefix's answer.
    let retry = call(&app, payout("/usd/payouts")).await;
    assert!(retry.replayed());
    assert_eq!(retry.text(), "usd #1: {\"amount\":100}");
}

pub async fn customers_told_apart_by_any_credential_header_each_execute<St: IdempotencyStore>(
    store: St,
) {
    for credential in [
        "authorization",
        "proxy-authorization",
        "cookie",
        "x-api-key",
        "api-key",
    ] {
        let calls = Arc::default();
        let app = counting("orders", &calls).layer(IdempotencyLayer::new(store.clone()));
        let key = unique_key();
        let from = |customer: &str| {
            request(
                "/payouts",
                &[(credential, customer), ("idempotency-key", &key)],
                r#"{"order":1}"#,
            )
        };
        // Two customers, one key and one body, each retrying at once.
        let requests = ["cust_a", "cust_b", "cust_a", "cust_b", "cust_a", "cust_b"]
            .into_iter()
            .map(from)
            .collect();
        let replies = all_at_once(&app, requests).await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "{credential}: {replies:#?}"
        );
        let (a, b): (Vec<_>, Vec<_>) = replies.iter().enumerate().partition(|(i, _)| i % 2 == 0);
        for customer in [&a, &b] {
            assert!(customer.iter().all(|(_, r)| r.body == customer[0].1.body));
            assert_eq!(customer.iter().filter(|(_, r)| !r.replayed()).count(), 1);
        }
        assert_ne!(a[0].1.body, b[0].1.body, "{credential}: B got A's answer");
    }
}

pub async fn anonymous_clients_are_told_apart_by_address_and_not_by_port<St: IdempotencyStore>(
    store: St,
) {
    let calls = Arc::default();
    let app = counting("forms", &calls).layer(IdempotencyLayer::new(store));
    let form = unique_key();
    // Two anonymous clients post the same form; each double-clicks over two connections.
    let requests = [
        peer(1, 50_001),
        peer(1, 50_002),
        peer(2, 50_001),
        peer(2, 50_002),
    ]
    .into_iter()
    .cycle()
    .take(8)
    .map(|peer| from_peer(request("/payouts", &[], &form), peer))
    .collect();
    let replies = all_at_once(&app, requests).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "one per client: {replies:#?}"
    );
    let (first_client, second_client): (Vec<_>, Vec<_>) =
        replies.iter().enumerate().partition(|(i, _)| i % 4 < 2);
    let first_client: Vec<_> = first_client.into_iter().map(|(_, r)| r).collect();
    let second_client: Vec<_> = second_client.into_iter().map(|(_, r)| r).collect();
    for client in [&first_client, &second_client] {
        assert!(client.iter().all(|r| r.body == client[0].body));
        assert_eq!(client.iter().filter(|r| !r.replayed()).count(), 1);
    }
    assert_ne!(first_client[0].body, second_client[0].body);
}

pub async fn a_keyless_request_nobody_can_be_told_apart_from_runs_unprotected_and_is_counted<
    St: IdempotencyStore,
>(
    store: St,
    route: &'static str,
) {
    let calls = Arc::default();
    let layer = IdempotencyLayer::new(store).with_route_label(route);
    let app = counting("anonymous", &calls).layer(layer);
    let form = unique_key();
    // No credential and no address (a server that does not give it): no derived key.
    for n in 1..=3 {
        let reply = call(&app, request("/payouts", &[], &form)).await;
        assert_eq!(reply.status, StatusCode::CREATED);
        assert!(!reply.replayed());
        assert_eq!(reply.text(), format!("anonymous #{n}: {form}"));
    }
    assert_eq!(requests_counted(route, "unscoped"), 3);
    // A client's own key needs no scope: it is honoured.
    let key = unique_key();
    let keyed = || request("/payouts", &[("idempotency-key", &key)], "k");
    let first = call(&app, keyed()).await;
    let again = call(&app, keyed()).await;
    assert!(again.replayed());
    assert_eq!(again.body, first.body);
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    assert_eq!(requests_counted(route, "unscoped"), 3);
}

/// A request body fed by the test, chunk by chunk.
struct Fed(mpsc::Receiver<Bytes>);

impl http_body::Body for Fed {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|data| Ok(Frame::data(data))))
    }
}

/// `/upload`: reads its body frame by frame, reporting how many bytes it has so far, and
/// answers with what it received.
fn upload_route(calls: &Arc<AtomicUsize>, received: watch::Sender<usize>) -> Router {
    let calls = Arc::clone(calls);
    Router::new().route(
        "/upload",
        post(move |request: AxumRequest| {
            calls.fetch_add(1, Ordering::SeqCst);
            let received = received.clone();
            async move {
                let mut body = request.into_body();
                let mut all = Vec::new();
                while let Some(frame) = body.frame().await {
                    if let Ok(data) = frame.expect("the upload reads to its end").into_data() {
                        all.extend_from_slice(&data);
                        received.send_replace(all.len());
                    }
                }
                (StatusCode::CREATED, all)
            }
        }),
    )
}

pub async fn a_keyless_upload_over_the_limit_reaches_its_handler_whole_as_it_streams<
    St: IdempotencyStore,
>(
    store: St,
    route: &'static str,
) {
    const LIMIT: usize = 1024;
    let calls = Arc::default();
    let (received, mut seen) = watch::channel(0);
    let layer = IdempotencyLayer::new(store)
        .with_request_body_limit(LIMIT)
        .with_route_label(route);
    // The layer over a whole router: uploads and forms alike.
    let app = upload_route(&calls, received).layer(layer);
    let chunk = |byte: u8| Bytes::from(vec![byte; 600]);

    // Streamed, no length: the first two chunks cross the limit while the layer reads them.
    let (feed, body) = mpsc::channel(4);
    let upload = Request::post("/upload")
        .extension(ConnectInfo(peer(9, 40_000)))
        .body(Fed(body))
        .unwrap();
    let answer = tokio::spawn({
        let app = app.clone();
        async move { Reply::read(within(app.oneshot(upload)).await.unwrap()).await }
    });
    feed.send(chunk(b'a')).await.unwrap();
    feed.send(chunk(b'b')).await.unwrap();
    // The handler has what the layer read before the client sends the rest: nothing waits
    // for the whole body.
    tokio::time::timeout(Duration::from_secs(10), seen.wait_for(|n| *n >= 1200))
        .await
        .expect("the handler receives the chunks read while the upload still streams")
        .unwrap();
    feed.send(chunk(b'c')).await.unwrap();
    drop(feed);
    let reply = answer.await.unwrap();
    assert_eq!(reply.status, StatusCode::CREATED);
    let expected = [chunk(b'a'), chunk(b'b'), chunk(b'c')].concat();
    assert_eq!(reply.body.len(), expected.len());
    assert!(reply.body == expected, "every byte, in order");
    assert!(!reply.replayed());

    // Declared too large by Content-Length: handed on without the layer reading any of it.
    let declared = |key: Option<&str>| {
        let mut request = Request::post("/upload")
            .header(header::CONTENT_LENGTH, (2 * LIMIT).to_string())
            .extension(ConnectInfo(peer(9, 40_001)));
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        request.body(Body::from(vec![b'd'; 2 * LIMIT])).unwrap()
    };
    for _ in 0..2 {
        let reply = call(&app, declared(None)).await;
        assert_eq!(reply.status, StatusCode::CREATED);
        assert_eq!(reply.body, vec![b'd'; 2 * LIMIT]);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(requests_counted(route, "oversized"), 3);

    // With a key, the layer must read the body to protect it: 413, nothing runs.
    let key = unique_key();
    call(&app, declared(Some(&key)))
        .await
        .assert_problem(ProblemKind::BodyTooLarge, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // Under the limit, a keyless request is still deduplicated (one browser, two connections).
    let form = unique_key();
    let first = call(
        &app,
        from_peer(request("/upload", &[], &form), peer(9, 40_002)),
    )
    .await;
    let second = call(
        &app,
        from_peer(request("/upload", &[], &form), peer(9, 40_003)),
    )
    .await;
    assert!(second.replayed(), "{second:?}");
    assert_eq!(second.body, first.body);
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

/// Sends `POST /payouts` with `body` over a new connection from `source` (any port), and
/// returns the response's head and body as text.
async fn post_from(server: SocketAddr, source: Ipv4Addr, body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    let mut stream = socket.connect(server).await.unwrap();
    let request = format!(
        "POST /payouts HTTP/1.1\r\nhost: {server}\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    within(stream.read_to_string(&mut response)).await.unwrap();
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_with_connect_info_one_browser_is_deduplicated_and_two_are_not() {
    let calls = Arc::default();
    let app = counting("forms", &calls).layer(IdempotencyLayer::new(
        tower_idempotency::MemoryStore::default(),
    ));
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let server = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        axum::serve(listener, app).await.unwrap();
    });
    // A double click from one browser (two connections, two ports), then the same form from
    // another machine (127.0.0.2, another loopback address).
    let browser = Ipv4Addr::LOCALHOST;
    let (first, second) = tokio::join!(
        post_from(server, browser, "amount=5"),
        post_from(server, browser, "amount=5"),
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1, "{first}\n{second}");
    assert_eq!(
        [&first, &second]
            .iter()
            .filter(|r| r.contains("idempotent-replayed: true"))
            .count(),
        1
    );
    let other = post_from(server, Ipv4Addr::new(127, 0, 0, 2), "amount=5").await;
    assert!(other.starts_with("HTTP/1.1 201"), "{other}");
    assert!(!other.contains("idempotent-replayed"), "{other}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// Captured log output.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        all.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Self;

    fn make_writer(&'a self) -> Self {
        self.clone()
    }
}

#[tokio::test]
async fn requests_that_cannot_be_scoped_are_warned_of_once_per_layer() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(captured.clone())
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .finish();
    // This test's runtime runs on this thread only: the subscriber sees every event.
    let _default = tracing::subscriber::set_default(subscriber);
    let calls = Arc::default();
    for route in ["warned-a", "warned-b"] {
        let layer = IdempotencyLayer::new(tower_idempotency::MemoryStore::default())
            .with_route_label(route);
        let app = counting("anonymous", &calls).layer(layer);
        for _ in 0..3 {
            call(&app, request("/payouts", &[], "form")).await;
        }
    }
    assert_eq!(calls.load(Ordering::SeqCst), 6);
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let warnings: Vec<_> = text
        .lines()
        .filter(|l| l.contains("runs unprotected"))
        .collect();
    assert_eq!(warnings.len(), 2, "{text}");
    assert!(
        warnings[0].contains("warned-a") && warnings[1].contains("warned-b"),
        "{text}"
    );
}

macro_rules! on_both_stores {
    ($($check:ident $(($($arg:tt)*))?),* $(,)?) => {
        mod memory_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    let store = tower_idempotency::MemoryStore::default();
                    crate::$check(store $(, crate::label($($arg)*, "memory"))?).await;
                }
            )*
        }

        #[cfg(feature = "redis")]
        mod redis_store {
            use std::sync::OnceLock;

            use crate::common::redis_server::RedisServer;

            /// One server for the file; each check uses keys of its own.
            fn server() -> &'static RedisServer {
                static SERVER: OnceLock<RedisServer> = OnceLock::new();
                SERVER.get_or_init(RedisServer::start)
            }

            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    let store = tower_idempotency::RedisStore::connect(&server().url())
                        .await
                        .expect("connect to the test server");
                    crate::$check(store $(, crate::label($($arg)*, "redis"))?).await;
                }
            )*
        }
    };
}

on_both_stores!(
    nested_routers_keep_a_record_per_prefix,
    customers_told_apart_by_any_credential_header_each_execute,
    anonymous_clients_are_told_apart_by_address_and_not_by_port,
    a_keyless_request_nobody_can_be_told_apart_from_runs_unprotected_and_is_counted("unscoped"),
    a_keyless_upload_over_the_limit_reaches_its_handler_whole_as_it_streams("oversized"),
);
