//! A real MCP server and client (the official Rust SDK, `rmcp`) over loopback HTTP, the
//! server behind the layer in JSON-RPC mode as the README's agent recipe puts it: rmcp's
//! streamable HTTP server in its stateful (SSE, sessions) and stateless (SSE or JSON) modes,
//! and its client calling a counting tool, directly or through a proxy that loses a response.

mod common;

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use rmcp::{
    ErrorData, RoleServer, ServerHandler, ServiceExt,
    model::{
        CallToolRequestParams, CallToolResponse, CallToolResult, ClientConfig, ContentBlock,
        ServerCapabilities, ServerConfig,
    },
    service::{RequestContext, RunningService},
    transport::{
        StreamableHttpClientTransport,
        streamable_http_client::StreamableHttpClientTransportConfig,
        streamable_http_server::{
            StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
        },
    },
};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceBuilder;
use tower_idempotency::{IdempotencyLayer, IdempotencyStore};

use common::service::PATIENCE;

/// A tool server: `count` runs its tool, counted across every session of the server; the
/// first run sleeps `first_run_ms` (a call its client gives up on).
#[derive(Clone)]
struct Counter {
    runs: Arc<AtomicUsize>,
    first_run_ms: u64,
}

impl ServerHandler for Counter {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        if run == 1 && self.first_run_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.first_run_ms)).await;
        }
        let arguments = Value::Object(request.arguments.unwrap_or_default());
        let text = format!("{} run #{run} for {arguments}", request.name);
        Ok(CallToolResult::success(vec![ContentBlock::text(text)]).into())
    }
}

/// How rmcp's streamable HTTP server is set up.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// Sessions (`Mcp-Session-Id`), answers in SSE: rmcp's default.
    Stateful,
    /// No sessions, answers in SSE.
    StatelessSse,
    /// No sessions, answers in JSON.
    StatelessJson,
}

/// A running MCP server behind the layer: its address, its tool's run count, how many
/// sessions it opened, and the session ids its responses carried.
struct Server {
    addr: SocketAddr,
    runs: Arc<AtomicUsize>,
    sessions_opened: Arc<AtomicUsize>,
    session_ids: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn server<St: IdempotencyStore>(store: St, mode: Mode, first_run_ms: u64) -> Server {
    let runs = Arc::new(AtomicUsize::new(0));
    let sessions_opened = Arc::new(AtomicUsize::new(0));
    let session_ids = Arc::new(Mutex::new(Vec::new()));
    let config = StreamableHttpServerConfig::default().with_sse_keep_alive(None);
    let config = match mode {
        Mode::Stateful => config,
        Mode::StatelessSse => config.with_legacy_session_mode(false),
        Mode::StatelessJson => config
            .with_legacy_session_mode(false)
            .with_json_response(true),
    };
    let factory = {
        let (runs, opened) = (Arc::clone(&runs), Arc::clone(&sessions_opened));
        move || {
            opened.fetch_add(1, Ordering::SeqCst);
            let runs = Arc::clone(&runs);
            Ok(Counter { runs, first_run_ms })
        }
    };
    let mcp: StreamableHttpService<Counter, LocalSessionManager> =
        StreamableHttpService::new(factory, Default::default(), config);
    // The README's agent recipe.
    let layer = IdempotencyLayer::new(store).with_json_rpc(true);
    let seen = Arc::clone(&session_ids);
    let service = ServiceBuilder::new()
        .map_response(move |response: Response<_>| {
            if let Some(id) = response.headers().get("mcp-session-id") {
                let id = id.to_str().unwrap_or_default().to_owned();
                seen.lock().unwrap_or_else(|e| e.into_inner()).push(id);
            }
            response
        })
        .layer(layer)
        .service(mcp);
    let router = axum::Router::new().route_service("/mcp", service);
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let addr = listener.local_addr().expect("an address");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Server {
        addr,
        runs,
        sessions_opened,
        session_ids,
        task,
    }
}

type Client = RunningService<rmcp::RoleClient, ClientConfig>;

/// An rmcp client of `addr` with the SDK's defaults, and a bearer token if given.
async fn client(addr: SocketAddr, token: Option<&str>) -> Client {
    let mut config = StreamableHttpClientTransportConfig::with_uri(format!("http://{addr}/mcp"));
    if let Some(token) = token {
        config = config.auth_header(token);
    }
    let transport = StreamableHttpClientTransport::from_config(config);
    tokio::time::timeout(PATIENCE, ClientConfig::default().serve(transport))
        .await
        .expect("initialized in time")
        .expect("initialized")
}

fn count_call(arguments: Value) -> CallToolRequestParams {
    let Value::Object(arguments) = arguments else {
        panic!("arguments are an object")
    };
    CallToolRequestParams::new("count").with_arguments(arguments)
}

/// The text of a tool result.
fn text(result: &CallToolResult) -> String {
    let value = serde_json::to_value(result).expect("serializable");
    value["content"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("a text result: {value}"))
        .to_owned()
}

async fn call_tool(
    client: &Client,
    arguments: Value,
) -> Result<CallToolResult, rmcp::ServiceError> {
    tokio::time::timeout(PATIENCE, client.call_tool(count_call(arguments)))
        .await
        .expect("the call is answered in time")
}

/// The credential a stateless deployment names its agents by (it has no sessions).
fn token(mode: Mode) -> Option<&'static str> {
    match mode {
        Mode::Stateful => None,
        Mode::StatelessSse | Mode::StatelessJson => Some("agent-1-token"),
    }
}

async fn two_clients_initializing_at_once_get_sessions_of_their_own<St: IdempotencyStore>(
    store: St,
) {
    let server = server(store, Mode::Stateful, 0).await;
    let (a, b) = tokio::join!(client(server.addr, None), client(server.addr, None));
    assert_eq!(server.sessions_opened.load(Ordering::SeqCst), 2);
    let ids = server.session_ids.lock().unwrap().clone();
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 2, "two clients, two sessions: {ids:?}");
    // Each works in its own session: the same call from both runs twice.
    let args = json!({"to": "ada"});
    let (ra, rb) = tokio::join!(call_tool(&a, args.clone()), call_tool(&b, args));
    let (ra, rb) = (ra.expect("a's call"), rb.expect("b's call"));
    assert_ne!(text(&ra), text(&rb));
    assert_eq!(server.runs.load(Ordering::SeqCst), 2);
}

async fn a_repeated_tool_call_runs_once_and_the_client_gets_its_result<St: IdempotencyStore>(
    store: St,
    mode: Mode,
) {
    let server = server(store, mode, 0).await;
    let client = client(server.addr, token(mode)).await;
    // Arguments of their own: the modes share one store.
    let args = json!({"to": "ada", "amount": 10, "mode": format!("{mode:?}")});
    let first = call_tool(&client, args.clone())
        .await
        .expect("the first call");
    // The SDK sends the retry with a new id and a new progress token: answered from the
    // first, with its own id (or the client would never match it).
    let retry = call_tool(&client, args.clone()).await.expect("the retry");
    assert_eq!(text(&retry), text(&first), "{mode:?}");
    assert_eq!(server.runs.load(Ordering::SeqCst), 1, "{mode:?}");
    let other = call_tool(&client, json!({"to": "bob", "mode": format!("{mode:?}")}))
        .await
        .expect("another call");
    assert_ne!(text(&other), text(&first));
    assert_eq!(server.runs.load(Ordering::SeqCst), 2, "{mode:?}");
    // Listing the tools (or anything else not protected) still reaches the server.
    client.list_all_tools().await.expect("tools/list");
}

/// A loopback HTTP proxy to `upstream` that lets the first `drops` responses to a
/// `tools/call` reach it whole, then closes the client's connection without a byte of them.
async fn lossy_proxy(
    upstream: SocketAddr,
    drops: usize,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let addr = listener.local_addr().expect("an address");
    let left = Arc::new(AtomicUsize::new(drops));
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let left = Arc::clone(&left);
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    forward(upstream, request, Arc::clone(&left))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, task)
}

type ProxyBody = BoxBody<Bytes, hyper::Error>;

async fn forward(
    upstream: SocketAddr,
    request: Request<Incoming>,
    left: Arc<AtomicUsize>,
) -> Result<Response<ProxyBody>, std::io::Error> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let is_call = serde_json::from_slice::<Value>(&body)
        .is_ok_and(|message| message["method"] == "tools/call");
    let stream = TcpStream::connect(upstream).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(connection);
    let request = Request::from_parts(parts, Full::new(body));
    let response = sender
        .send_request(request)
        .await
        .map_err(std::io::Error::other)?;
    let drop_it = is_call
        && left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
    if drop_it {
        // The server answered in full; its client never hears of it.
        let _ = response.into_body().collect().await;
        return Err(std::io::Error::other("response lost"));
    }
    Ok(response.map(|body| body.map_err(|e| e).boxed()))
}

async fn a_lost_response_is_replayed_to_the_retry_with_its_id<St: IdempotencyStore>(
    store: St,
    mode: Mode,
) {
    let server = server(store, mode, 0).await;
    let (proxy, proxy_task) = lossy_proxy(server.addr, 1).await;
    let client = client(proxy, token(mode)).await;
    let args = json!({"to": "ada", "amount": 20, "mode": format!("{mode:?}")});
    let lost = call_tool(&client, args.clone()).await;
    assert!(
        lost.is_err(),
        "{mode:?}: the first response was lost: {lost:?}"
    );
    let retry = call_tool(&client, args)
        .await
        .expect("the retry is answered");
    assert!(
        text(&retry).starts_with("count run #1 "),
        "{mode:?}: {}",
        text(&retry)
    );
    assert_eq!(server.runs.load(Ordering::SeqCst), 1, "{mode:?}");
    proxy_task.abort();
}

async fn a_call_its_client_gave_up_on_is_not_kept_and_its_retry_runs<St: IdempotencyStore>(
    store: St,
) {
    // The first run outlasts the client's patience: it cancels the request
    // (`notifications/cancelled`), and rmcp ends the call's stream after its opening event.
    let server = server(store, Mode::Stateful, 2_000).await;
    let client = client(server.addr, None).await;
    let args = json!({"to": "ada"});
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        client.call_tool(count_call(args.clone())),
    )
    .await;
    assert!(gave_up.is_err(), "the client gave up");
    // The empty answer is not replayed: the retry runs the tool and gets its result.
    let retry = call_tool(&client, args)
        .await
        .expect("the retry is answered");
    assert!(
        text(&retry).starts_with("count run #2 "),
        "{}",
        text(&retry)
    );
}

/// `POST /mcp` with `body` (and a session, if any) over a connection of its own; the status,
/// the session id answered, and the whole body.
async fn raw_post(
    addr: SocketAddr,
    session: Option<&str>,
    body: &str,
) -> (u16, Option<String>, String) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    let mut request = Request::post("/mcp")
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("authorization", "Bearer agent-1-token");
    if let Some(session) = session {
        request = request.header("mcp-session-id", session);
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("a request");
    let response = tokio::time::timeout(PATIENCE, sender.send_request(request))
        .await
        .expect("answered in time")
        .expect("a response");
    let status = response.status().as_u16();
    let session = response
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = tokio::time::timeout(PATIENCE, response.into_body().collect())
        .await
        .expect("read in time")
        .expect("a body")
        .to_bytes();
    (status, session, String::from_utf8_lossy(&body).into_owned())
}

async fn a_raw_retry_with_the_same_id_is_answered_byte_for_byte<St: IdempotencyStore>(
    store: St,
    mode: Mode,
) {
    let server = server(store, mode, 0).await;
    let initialize = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"raw","version":"1"}}}"#;
    let (status, session, _) = raw_post(server.addr, None, initialize).await;
    assert_eq!(status, 200, "{mode:?}");
    let session = session.as_deref();
    let initialized = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
    raw_post(server.addr, session, initialized).await;
    let call = format!(
        r#"{{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{{"name":"count","arguments":{{"mode":"{mode:?}"}}}}}}"#
    );
    let (status, _, first) = raw_post(server.addr, session, &call).await;
    assert_eq!(status, 200, "{mode:?}: {first}");
    let (_, _, retry) = raw_post(server.addr, session, &call).await;
    assert_eq!(retry, first, "{mode:?}");
    assert!(first.contains(r#""id":5"#), "{mode:?}: {first}");
    assert_eq!(server.runs.load(Ordering::SeqCst), 1, "{mode:?}");
}

macro_rules! mcp_suite {
    ($make:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn two_clients_initializing_at_once_get_sessions_of_their_own() {
            super::two_clients_initializing_at_once_get_sessions_of_their_own($make.await).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_repeated_tool_call_runs_once_and_the_client_gets_its_result() {
            for mode in [
                super::Mode::Stateful,
                super::Mode::StatelessSse,
                super::Mode::StatelessJson,
            ] {
                super::a_repeated_tool_call_runs_once_and_the_client_gets_its_result(
                    $make.await,
                    mode,
                )
                .await;
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_lost_response_is_replayed_to_the_retry_with_its_id() {
            for mode in [
                super::Mode::Stateful,
                super::Mode::StatelessSse,
                super::Mode::StatelessJson,
            ] {
                super::a_lost_response_is_replayed_to_the_retry_with_its_id($make.await, mode)
                    .await;
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_raw_retry_with_the_same_id_is_answered_byte_for_byte() {
            for mode in [
                super::Mode::Stateful,
                super::Mode::StatelessSse,
                super::Mode::StatelessJson,
            ] {
                super::a_raw_retry_with_the_same_id_is_answered_byte_for_byte($make.await, mode)
                    .await;
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_call_its_client_gave_up_on_is_not_kept_and_its_retry_runs() {
            super::a_call_its_client_gave_up_on_is_not_kept_and_its_retry_runs($make.await).await;
        }
    };
}

mod memory_store {
    mcp_suite!(async { tower_idempotency::MemoryStore::default() });
}

#[cfg(feature = "redis")]
mod redis_store {
    use std::sync::OnceLock;

    use crate::common::redis_server::RedisServer;

    fn server() -> &'static RedisServer {
        static SERVER: OnceLock<RedisServer> = OnceLock::new();
        SERVER.get_or_init(RedisServer::start)
    }

    async fn connect() -> tower_idempotency::RedisStore {
        tower_idempotency::RedisStore::connect(&server().url())
            .await
            .expect("connect to the test server")
    }

    mcp_suite!(connect());
}
