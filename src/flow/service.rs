//! [`Idempotency`]: decides whether a request passes through or is protected, and hands a
//! protected one to its [`Flow`](crate::flow::machine) (read, claim, replay | wait | run, store).
//!
//! 1. Unprotected method, or a gRPC call of a streaming method → pass through (no
//!    allocation, no store call, body untouched).
//! 2. Find the key: the key header (invalid → 400), else a configured key source, else the
//!    missing-key policy (pass through, 400, or derive the key from the request: only when
//!    its scope tells its sender apart, else it passes through unprotected, counted).
//! 3. Anything else is protected: see [`future`](crate::flow::future) for the rest of its flow.

use std::{
    fmt,
    future::poll_fn,
    pin::pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;
use tracing::Instrument;

use crate::{
    flow::body::{Chunks, RequestBody, ResponseBody, poll_read_limited},
    flow::future::ResponseFuture,
    flow::machine::{Flow, send_claim},
    flow::plan::{self, Head},
    flow::reject::{close_connection, reject},
    key::sent_path,
    layer::config::Config,
    observe::Outcome,
    problem::Problem,
    protocol::grpc::{self, Call},
    protocol::jsonrpc::Rpc,
    store::IdempotencyStore,
    store::error::BoxError,
};

/// Middleware that runs a request's handler at most once per idempotency key and replays the
/// first response to every retry. Made by [`IdempotencyLayer`](crate::IdempotencyLayer).
///
/// The inner service receives [`RequestBody`]: the original body for requests passed
/// through, the bytes the layer read otherwise. A request that runs under a client-sent key
/// carries it as an [`IdempotencyKey`](crate::IdempotencyKey) in its extensions (to hand on to a payment provider,
/// say). Its errors pass through unchanged; the layer's own rejections are problem
/// responses. The layer needs a tokio runtime: the unfinished work of a client that went away,
/// and streamed response bodies, continue on tokio tasks.
#[derive(Clone)]
pub struct Idempotency<S, St> {
    inner: S,
    store: St,
    config: Arc<Config>,
}

impl<S, St> Idempotency<S, St> {
    pub(crate) fn new(inner: S, store: St, config: Arc<Config>) -> Self {
        Self {
            inner,
            store,
            config,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, taking the middleware apart.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, St, ReqB, ResB> Service<Request<ReqB>> for Idempotency<S, St>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: IdempotencyStore,
    ReqB: Body<Data = Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResB, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        let config = &self.config;
        if !config.protects(request.method()) {
            return ResponseFuture::pass_through(self.inner.call(request.map(RequestBody::new)));
        }
        let (method, headers) = (request.method(), request.headers());
        let sent = sent_path(request.extensions(), request.uri());
        let paths = [sent, request.uri().path()];
        let rpc = match grpc::classify(method, paths, headers, &config.grpc) {
            None => Rpc::Plain,
            Some(Call::Unary) => Rpc::Grpc,
            // The layer cannot hold a stream's messages back: reading the request to its end
            // would wait on a client that waits for an answer. A gRPC-Web client reads its
            // status from the body, where the layer can neither find nor write one.
            Some(Call::Streaming | Call::Web) => {
                return ResponseFuture::pass_through(
                    self.inner.call(request.map(RequestBody::new)),
                );
            }
        };
        let plan = match plan::from_head(config, request.headers(), request.extensions(), &rpc) {
            Head::Protect(plan) => plan,
            Head::Refuse(problem) => return refuse(config, request, problem, rpc),
            Head::PassThrough => {
                return ResponseFuture::pass_through(
                    self.inner.call(request.map(RequestBody::new)),
                );
            }
            Head::Unscoped => {
                config.observer.passed_through(Outcome::Unscoped);
                return ResponseFuture::pass_through(
                    self.inner.call(request.map(RequestBody::new)),
                );
            }
        };
        // The service that `poll_ready` made ready moves into the future; this clone stays
        // behind for the next request (tower's documented pattern).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let (store, config) = (self.store.clone(), Arc::clone(config));
        let flow = Flow::new(inner, store, config, request, plan, rpc, send_claim::<St>);
        ResponseFuture::protected(Box::pin(flow))
    }
}

/// Refuses a request from its head alone, once its body is read and discarded (up to the
/// limit): hyper closes a keep-alive connection whose request body was left unread, taking
/// with it any request the client already sent behind this one. A gRPC call (`rpc`) is
/// answered with a gRPC status.
fn refuse<F, ReqB, ResB, E>(
    config: &Arc<Config>,
    request: Request<ReqB>,
    problem: Problem,
    rpc: Rpc,
) -> ResponseFuture<F, ResB, E>
where
    E: Send + 'static,
    ReqB: Body<Data = Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    ResB: Send + 'static,
{
    let span = config.observer.request_span(request.method());
    let _entered = span.enter();
    if request.body().is_end_stream() {
        return ResponseFuture::ready(reject(config, &problem, &rpc));
    }
    let config = Arc::clone(config);
    let version = request.version();
    let drain = async move {
        let (limit, mut read) = (config.request_body_limit, Chunks::default());
        let mut body = pin!(request.into_body());
        let drained = poll_fn(|cx| poll_read_limited(body.as_mut(), &mut read, limit, cx)).await;
        let response = reject(&config, &problem, &rpc);
        if drained.is_ok() {
            response
        } else {
            close_connection(response, version)
        }
    };
    // Nothing to finish if the client leaves: the drain ends with it.
    ResponseFuture::refused(Box::pin(drain.in_current_span()))
}

impl<S: fmt::Debug, St: fmt::Debug> fmt::Debug for Idempotency<S, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .field("store", &self.store)
            .field("config", &self.config)
            .finish()
    }
}
