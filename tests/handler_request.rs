//! The request the handler receives, on every path the flow takes to it (issue 18's fourth
//! pass moved the request's head and body out of the flow's states into its context): the
//! handler echoes what it got (method, URI and query, version, headers in order with a repeat
//! and a non-UTF-8 value, an extension an outer layer put in, the client's key, the body), and
//! each row compares that with what a bare handler (no idempotency layer) gets for the same
//! request.

mod common;

use std::{
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::{BodyExt, combinators::UnsyncBoxBody};
use tower::{
    Layer, Service, ServiceExt,
    util::{MapRequest, MapRequestLayer},
};
use tower_idempotency::{
    FailMode, IDEMPOTENCY_KEY, IdempotencyKey, IdempotencyLayer, IdempotencyStore, MemoryStore,
    StoreError, WaitMode,
};

use common::{
    flaky_store::FlakyStore,
    service::{
        BodyError, Gate, Handler, Reply, Scripted, Svc, TEST_PEER, created, data, eventually, full,
        respond, serve, value, within,
    },
    wrap::{Hook, Op, Wrap},
};

/// The request body of every row: whole, or in chunks of unknown total size.
type ReqBody = UnsyncBoxBody<Bytes, BodyError>;

const OLD: &[u8] = b"old secret, 32 bytes or more....";
const NEW: &[u8] = b"new secret, 32 bytes or more....";
/// The lease of a claim whose owner is cut off from the store: it is abandoned this soon.
const SHORT_LEASE: Duration = Duration::from_millis(200);
/// Long enough for a short lease to run out.
const SETTLE: Duration = Duration::from_millis(400);

/// Put in by a layer outside the idempotency layer: the handler must still see it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Outer(&'static str);

/// What the handler received.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    method: Method,
    uri: Uri,
    version: Version,
    /// Every header, in order, repeats kept, its value's bytes escaped.
    headers: Vec<(String, String)>,
    outer: Option<Outer>,
    /// The extensions' count, `IdempotencyKey` not counted.
    other_extensions: usize,
    key: Option<String>,
    body: Bytes,
}

/// Everything the handler has received, in order: the echo. Each response's body is its
/// request's index here (a response carries no request extensions to echo them in).
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Seen>>>);

impl Log {
    fn push(&self, seen: Seen) -> usize {
        let mut log = self.0.lock().unwrap_or_else(|e| e.into_inner());
        log.push(seen);
        log.len() - 1
    }

    fn get(&self, index: usize) -> Seen {
        self.0.lock().unwrap_or_else(|e| e.into_inner())[index].clone()
    }
}

/// The echoing handler. With `hold`, its first call waits for the gate, then answers 500 (not
/// stored: its claim is released).
fn echo(log: &Log, hold: Option<Gate>) -> Handler {
    let log = log.clone();
    Handler::with_counter(move |n, request| {
        let (parts, body) = request.into_parts();
        let key = parts.extensions.get::<IdempotencyKey>();
        let seen = Seen {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: (parts.headers.iter())
                .map(|(name, value)| {
                    (
                        name.to_string(),
                        value.as_bytes().escape_ascii().to_string(),
                    )
                })
                .collect(),
            outer: parts.extensions.get::<Outer>().cloned(),
            other_extensions: parts.extensions.len() - usize::from(key.is_some()),
            key: key.map(|key| key.as_str().to_owned()),
            body,
        };
        let index = log.push(seen);
        let hold = hold.clone().filter(|_| n == 1);
        async move {
            match hold {
                Some(gate) => {
                    gate.pass().await;
                    respond(StatusCode::INTERNAL_SERVER_ERROR, full("held"))
                }
                None => created(index.to_string()),
            }
        }
    })
}

/// Marks a request as the outer layer does.
fn mark(mut request: Request<ReqBody>) -> Request<ReqBody> {
    request.extensions_mut().insert(Outer("outer"));
    request
}

/// A service behind the outer layer.
type Outside<S> = MapRequest<S, fn(Request<ReqBody>) -> Request<ReqBody>>;

/// `inner` behind the outer layer that marks every request.
fn outer<S>(inner: S) -> Outside<S> {
    MapRequestLayer::new(mark as fn(_) -> _).layer(inner)
}

/// `handler` under `layer`, behind the outer layer.
fn protected<St: IdempotencyStore>(
    layer: &IdempotencyLayer<St>,
    handler: &Handler,
) -> Outside<Svc<St>> {
    outer(serve(layer, handler))
}

/// Sends `request` through `svc`: its response, and what the handler saw (`None` if the
/// response is not the echo's).
async fn through<S, B>(svc: S, log: Log, request: Request<ReqBody>) -> (Reply, Option<Seen>)
where
    S: Service<Request<ReqBody>, Response = Response<B>>,
    S::Error: fmt::Debug,
    B: Body<Data = Bytes>,
    B::Error: fmt::Debug,
{
    let response = within(svc.oneshot(request))
        .await
        .expect("the service answers");
    let reply = Reply::read(response).await;
    let seen = match (reply.status, std::str::from_utf8(&reply.body)) {
        (StatusCode::CREATED, Ok(index)) => index.parse().ok().map(|index| log.get(index)),
        _ => None,
    };
    (reply, seen)
}

/// What a row's request carries besides what every request carries.
#[derive(Clone, Copy)]
struct Ask {
    /// The client's key (each row's own, fresh).
    keyed: bool,
    /// From a known peer (a derived key is scoped by it).
    peer: bool,
    /// The body, in chunks.
    body: &'static [&'static [u8]],
}

const PAYLOAD: &[&[u8]] = &[br#"{"amount":100,"currency":"eur"}"#];

/// The row's request: `POST` over HTTP/2 with a query, a repeated
/// header, a non-UTF-8 header value and the body in `ask.body`'s chunks.
fn request(ask: Ask, key: &str) -> Request<ReqBody> {
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri("/charges/ch_1?expand=customer&expand=invoice&note=a%20b")
        .version(Version::HTTP_2)
        .header("content-type", "application/json")
        .header("x-tag", "first")
        .header("x-tag", "second")
        .header("x-raw", value(b"caf\xe9 \xff"));
    if ask.keyed {
        builder = builder.header(IDEMPOTENCY_KEY, key);
    }
    let body = match ask.body {
        [whole] => full(Bytes::from_static(whole)),
        chunks => {
            Scripted::new(chunks.iter().map(|chunk| data(Bytes::from_static(chunk)))).boxed_unsync()
        }
    };
    let mut request = builder.body(body).expect("a valid request");
    if ask.peer {
        request.extensions_mut().insert(TEST_PEER);
    }
    request
}

/// The store operations a row's layer sent, by name; and a switch that fails waits only.
#[derive(Clone, Default)]
struct Trail {
    ops: Arc<Mutex<Vec<&'static str>>>,
    waits_fail: Arc<AtomicBool>,
}

impl Trail {
    fn ops(&self) -> Vec<&'static str> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Hook for Trail {
    async fn before(&self, op: Op<'_>) -> Result<(), StoreError> {
        let name = match op {
            Op::Claim(..) => "claim",
            Op::TakeOver(..) => "take_over",
            Op::Complete => "complete",
            Op::Release => "release",
            Op::Renew => "renew",
            Op::Wait => "wait",
            Op::Inspect | Op::Forget | Op::BreakClaim | Op::ListClaims => "admin",
        };
        self.ops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name);
        if matches!(op, Op::Wait) && self.waits_fail.load(Ordering::SeqCst) {
            return Err(StoreError::unavailable("simulated outage of waits"));
        }
        Ok(())
    }
}

/// The path a row's request takes to the handler.
#[derive(Clone, Copy, Debug)]
enum Path {
    /// A first execution: claimed, run.
    First,
    /// A duplicate of a request in flight waits; the first answers 500, its claim released;
    /// the duplicate claims again and runs.
    AfterWait,
    /// An instance cut off from the store left its claim abandoned: taken over, run again.
    TakeOver,
    /// A rotated secret: the earlier address holds nothing.
    RotatedNothingEarlier,
    /// A rotated secret: the earlier address holds a claim abandoned before the rotation.
    RotatedAbandonedEarlier,
    /// The store is down, failing open: run unprotected.
    FailOpenOnClaim,
    /// The claim finds the key in flight; the wait fails, failing open: run unprotected.
    FailOpenOnWait,
    /// No key and a body over the limit: run unprotected, the body handed on whole.
    Oversized,
    /// No key, from a known peer: a derived key, claimed, run.
    Derived,
    /// JSON-RPC mode, a notification: passed through without a store call.
    JsonRpcNotification,
    /// JSON-RPC mode, a call of a method not protected: passed through without a store call.
    JsonRpcUnprotectedCall,
    /// No key and nothing to scope a derived one by: passed through unprotected.
    Unscoped,
}

/// Runs `ask` down `path`: the reply and what the handler saw.
async fn layered(path: Path, ask: Ask, key: &str, log: &Log) -> (Reply, Option<Seen>) {
    macro_rules! send {
        ($svc:expr, $log:expr) => {
            through($svc, $log.clone(), request(ask, key))
        };
    }
    match path {
        Path::First | Path::Oversized | Path::Derived | Path::Unscoped => {
            let trail = Wrap::<MemoryStore, Trail>::default();
            let layer = IdempotencyLayer::new(trail.clone()).with_request_body_limit(64);
            let answer = send!(protected(&layer, &echo(log, None)), log).await;
            let claimed = trail.hook.ops().contains(&"claim");
            let should = matches!(path, Path::First | Path::Derived);
            assert_eq!(claimed, should, "{path:?}: claimed {:?}", trail.hook.ops());
            answer
        }
        Path::AfterWait => {
            let trail = Wrap::<MemoryStore, Trail>::default();
            let layer = IdempotencyLayer::new(trail.clone())
                .with_wait_mode(WaitMode::Wait(Duration::from_secs(10)));
            let gate = Gate::new();
            let handler = echo(log, Some(gate.clone()));
            let svc = protected(&layer, &handler);
            let first = tokio::spawn(send!(svc.clone(), log));
            eventually("the first request runs", || handler.calls() == 1).await;
            let duplicate = tokio::spawn(send!(svc, log));
            eventually("the duplicate waits", || trail.hook.ops().contains(&"wait")).await;
            assert!(!duplicate.is_finished(), "the duplicate waits");
            gate.open();
            let (first, _) = within(first).await.expect("the first request");
            assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
            let answer = within(duplicate).await.expect("the duplicate");
            assert_eq!(
                handler.calls(),
                2,
                "the duplicate ran once the claim was released"
            );
            answer
        }
        Path::TakeOver | Path::RotatedAbandonedEarlier => {
            let trail = Wrap::<MemoryStore, Trail>::default();
            let cut_off = FlakyStore::over(trail.inner.clone());
            cut_off.hook.writes_down.store(true, Ordering::SeqCst);
            let (mut owner, mut taker) = (
                IdempotencyLayer::new(cut_off).with_lease(SHORT_LEASE),
                IdempotencyLayer::new(trail.clone()),
            );
            if let Path::RotatedAbandonedEarlier = path {
                owner = owner.with_secret(OLD);
                taker = taker.with_secret(NEW).add_previous_secret(OLD);
            }
            let handler = echo(log, None);
            let (crashed, _) = send!(protected(&owner, &handler), log).await;
            assert_eq!(crashed.status, StatusCode::CREATED, "{crashed:?}");
            tokio::time::sleep(SETTLE).await;
            let answer = send!(protected(&taker, &handler), log).await;
            assert_eq!(handler.calls(), 2, "run again under the taker's claim");
            let ops = trail.hook.ops();
            let expected: &[&str] = match path {
                // Claimed, found abandoned, taken over.
                Path::TakeOver => &["claim", "take_over"],
                // Claimed at the new address, the old one looked at (abandoned: not given
                // back, as a free one would be), the record stored.
                _ => &["claim", "claim", "complete"],
            };
            assert!(ops.starts_with(expected), "{path:?}: {ops:?}");
            answer
        }
        Path::RotatedNothingEarlier => {
            let trail = Wrap::<MemoryStore, Trail>::default();
            let layer = IdempotencyLayer::new(trail.clone())
                .with_secret(NEW)
                .add_previous_secret(OLD);
            let answer = send!(protected(&layer, &echo(log, None)), log).await;
            // Claimed at the new address; the old one claimed free and given back.
            let ops = trail.hook.ops();
            assert_eq!(ops, ["claim", "claim", "release", "complete"]);
            answer
        }
        Path::FailOpenOnClaim => {
            let flaky = FlakyStore::default();
            flaky.hook.down.store(true, Ordering::SeqCst);
            let layer = IdempotencyLayer::new(flaky).with_fail_mode(FailMode::Open);
            send!(protected(&layer, &echo(log, None)), log).await
        }
        Path::FailOpenOnWait => {
            // The key is held by a request on another instance, over the same store.
            let shared = MemoryStore::default();
            let gate = Gate::new();
            let holder = echo(log, Some(gate.clone()));
            let holding = protected(&IdempotencyLayer::new(shared.clone()), &holder);
            let first = tokio::spawn(send!(holding, log));
            eventually("the first request runs", || holder.calls() == 1).await;
            let trail = Wrap::<MemoryStore, Trail>::over(shared);
            trail.hook.waits_fail.store(true, Ordering::SeqCst);
            let layer = IdempotencyLayer::new(trail.clone())
                .with_fail_mode(FailMode::Open)
                .with_wait_mode(WaitMode::Wait(Duration::from_secs(10)));
            let answer = send!(protected(&layer, &echo(log, None)), log).await;
            assert_eq!(trail.hook.ops(), ["claim", "wait"]);
            gate.open();
            within(first).await.expect("the first request");
            answer
        }
        Path::JsonRpcNotification | Path::JsonRpcUnprotectedCall => {
            let trail = Wrap::<MemoryStore, Trail>::default();
            let layer = IdempotencyLayer::new(trail.clone()).with_json_rpc(true);
            let answer = send!(protected(&layer, &echo(log, None)), log).await;
            assert_eq!(trail.hook.ops(), Vec::<&str>::new(), "no store call");
            answer
        }
    }
}

struct Row {
    path: Path,
    ask: Ask,
    /// Whether the handler is given the client's key.
    sees_key: bool,
}

const fn row(path: Path, keyed: bool, peer: bool, sees_key: bool) -> Row {
    Row {
        path,
        ask: Ask {
            keyed,
            peer,
            body: PAYLOAD,
        },
        sees_key,
    }
}

const ROWS: &[Row] = &[
    row(Path::First, true, true, true),
    row(Path::AfterWait, true, true, true),
    row(Path::TakeOver, true, true, true),
    row(Path::RotatedNothingEarlier, true, true, true),
    row(Path::RotatedAbandonedEarlier, true, true, true),
    // Fail-open runs the request as if no layer were there: no key is given.
    row(Path::FailOpenOnClaim, true, true, false),
    row(Path::FailOpenOnWait, true, true, false),
    Row {
        path: Path::Oversized,
        ask: Ask {
            keyed: false,
            peer: true,
            // 96 bytes in three chunks, over the 64-byte limit after the second.
            body: &[&[b'a'; 32], &[b'b'; 40], &[b'c'; 24]],
        },
        sees_key: false,
    },
    // A derived key is not the client's.
    row(Path::Derived, false, true, false),
    Row {
        path: Path::JsonRpcNotification,
        ask: Ask {
            keyed: true,
            peer: true,
            body: &[br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#],
        },
        sees_key: false,
    },
    Row {
        path: Path::JsonRpcUnprotectedCall,
        ask: Ask {
            keyed: true,
            peer: true,
            body: &[br#"{"jsonrpc":"2.0","id":7,"method":"tools/list"}"#],
        },
        sees_key: false,
    },
    row(Path::Unscoped, false, false, false),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handler_gets_the_request_a_bare_handler_gets_on_every_path() {
    // Every row is run; the rows whose handler got another request are told together.
    let mut wrong = Vec::new();
    for (n, row) in ROWS.iter().enumerate() {
        let key = format!("handler-request-{n}");
        let log = Log::default();
        let bare = outer(echo(&log, None));
        let (_, bare) = through(bare, log.clone(), request(row.ask, &key)).await;
        let bare = bare.expect("the bare handler echoes");
        assert_eq!(bare.outer, Some(Outer("outer")));
        assert_eq!(bare.headers.iter().filter(|(n, _)| n == "x-tag").count(), 2);

        let (reply, seen) = layered(row.path, row.ask, &key, &log).await;
        assert!(!reply.replayed(), "{:?}: {reply:?}", row.path);
        let seen = seen.unwrap_or_else(|| panic!("{:?}: not the echo: {reply:?}", row.path));
        let key = row.sees_key.then(|| key.clone());
        let expected = Seen { key, ..bare };
        if seen != expected {
            wrong.push(format!(
                "{:?}:\n  got      {seen:?}\n  expected {expected:?}",
                row.path
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
