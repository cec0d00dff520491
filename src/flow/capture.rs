//! Capturing a handler's response for its record: what its body has ready at once, and the
//! rest of a streamed body, read by a task of its own at the pace the handler produces it.
//!
//! The captured data is handed to the client without waiting for it
//! ([`stream`](crate::flow::stream)): a slow or silent client never holds the key in flight. Past
//! the capture limit the key is spent (completed, not replayable) and the rest of the body
//! follows at the client's pace. A streamed response ends only once its record is stored, so
//! a client that has the whole response and retries at once is replayed.
//!
//! A gRPC call is kept by the status in its trailers, which come last: past the limit its
//! key is held (the rest forwarded at the client's pace) until they say whether it is spent
//! or released; a gRPC body cut short has no status and releases its key.
//!
//! A capture outlives its client for a bounded time only
//! ([`with_capture_after_disconnect`](crate::IdempotencyLayer::with_capture_after_disconnect)):
//! a body that has not ended by then (an event stream that never ends) is dropped, and its key
//! spent like an oversized one's: the handler ran, and its response was neither delivered
//! whole nor recorded, so a retry must not run it again.
//!
//! A record that commits in the handler's own transaction
//! ([`IdempotencyStore::prepare_handler`]) must hold the whole response before the commit:
//! a streamed body is captured whole first, and the client's body follows the commit. Past
//! the limit the key is spent as anywhere else (a not-replayable record commits, the rest
//! follows); a body that fails or panics first rolls back, frees the key and costs a 500.

mod pump;

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Response, response};
use http_body::Body;

use crate::{
    fingerprint::Fingerprint,
    flow::body::{Chunks, ResponseBody},
    flow::catch_unwind,
    flow::expiry,
    flow::lease::{Kept, Lease},
    flow::reject::reject,
    flow::stream,
    flow::task,
    layer::config::Config,
    observe::RecordResult,
    problem::Problem,
    protocol::jsonrpc::Rpc,
    record::Record,
    store::IdempotencyStore,
    store::error::BoxError,
};

use pump::{Pump, RecordOf, kept};

/// A protected handler's response, settled.
pub(crate) enum Settled<B> {
    /// Answered once the record is stored or the key released (`lease_op`).
    AfterStore {
        lease_op: Pin<Box<dyn Future<Output = Kept> + Send>>,
        response: Response<ResponseBody<B>>,
    },
    /// Answered now: a task of its own captures the body still being produced.
    Now(Response<ResponseBody<B>>),
}

/// Settles the response of a handler that ran under `lease`: takes what its body has ready
/// (polling it with `cx`, never waiting), then stores its record (or releases the key) before
/// it is answered, or hands a body still being produced to a task of its own. A panic of the
/// body costs a 500 problem and the key. `rpc` is what the request is to JSON-RPC.
pub(crate) fn settle<B, St>(
    response: Response<B>,
    lease: Lease<St>,
    fingerprint: Fingerprint,
    ttl: Duration,
    config: &Config,
    rpc: &Rpc,
    cx: &mut Context<'_>,
) -> Settled<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    St: IdempotencyStore,
{
    let limit = config.response_body_limit;
    let Ok(taken) = catch_unwind::catching(|| take_ready(response, config, cx)) else {
        return panicked(lease, config, rpc);
    };
    let (lease_op, response): (Pin<Box<dyn Future<Output = Kept> + Send>>, _) = match taken {
        Ran::NotStored(response) => {
            tracing::debug!(status = %response.status(), "response not stored; key released");
            (Box::pin(lease.release(RecordResult::Predicate)), response)
        }
        Ran::Broken(response) => (Box::pin(lease.release(RecordResult::BodyError)), response),
        Ran::Whole {
            head,
            body,
            trailers,
        } if !kept(
            rpc,
            (&config.json_rpc, &config.grpc),
            &head.headers,
            &body,
            trailers.as_ref(),
        ) =>
        {
            tracing::debug!("no JSON-RPC answer, or no gRPC status, to keep; key released");
            let response = Response::from_parts(head, ResponseBody::full(body, trailers));
            (Box::pin(lease.release(RecordResult::Predicate)), response)
        }
        Ran::Whole {
            head,
            body,
            trailers,
        } => {
            let record = if body.len() <= limit {
                let stored_trailers = trailers.as_ref();
                Record::response(
                    fingerprint,
                    head.status,
                    &head.headers,
                    body.clone(),
                    stored_trailers,
                )
            } else {
                Record::not_replayable(fingerprint, head.status)
            };
            let response = Response::from_parts(head, ResponseBody::full(body, trailers));
            let response = expiry::on_first_execution(config, ttl, response);
            (Box::pin(lease.complete(record, ttl)), response)
        }
        Ran::Streaming {
            head,
            body,
            ready,
            trailers,
        } => {
            let of = RecordOf {
                fingerprint,
                status: head.status,
                headers: head.headers.clone(),
                ttl,
                rpc: rpc.clone(),
                json_rpc: config.json_rpc.clone(),
                grpc: config.grpc.clone(),
            };
            let len = ready.len;
            let (tx, rx) = stream::channel(ready);
            if let Some(trailers) = &trailers {
                tx.capture_trailers(trailers.clone());
            }
            let pump = Pump {
                body,
                tx,
                len,
                limit,
                trailers,
                after_client: config.capture_after_disconnect,
            };
            if lease.in_transaction() {
                // The record is written in the handler's transaction, which commits before
                // the response is answered: the body is captured whole (up to the limit)
                // first, and the client reads it once the commit is done.
                let response = Response::from_parts(head, ResponseBody::channel(rx));
                let response = expiry::on_first_execution(config, ttl, response);
                return Settled::AfterStore {
                    lease_op: Box::pin(pump.commit(lease, of)),
                    response,
                };
            }
            if !task::spawn(pump.finish(lease, of)) {
                // Polled outside a tokio runtime: nothing can read the rest of the body. The
                // client's body ends in an error; the claim frees itself when its lease ends.
                tracing::warn!(
                    "a streamed idempotent response needs a tokio runtime to be captured; \
                     its body was cut short"
                );
            }
            let response = Response::from_parts(head, ResponseBody::channel(rx));
            return Settled::Now(expiry::on_first_execution(config, ttl, response));
        }
    };
    Settled::AfterStore { lease_op, response }
}

/// The handler (or its body) panicked: the key is released and the client gets a 500.
pub(crate) fn panicked<B, St: IdempotencyStore>(
    lease: Lease<St>,
    config: &Config,
    rpc: &Rpc,
) -> Settled<B> {
    // The panic message went to the panic hook already.
    tracing::error!("the handler of an idempotent request panicked; key released");
    Settled::AfterStore {
        lease_op: Box::pin(lease.release(RecordResult::Panic)),
        response: reject(config, &Problem::handler_failed(), rpc),
    }
}

/// At most this many frames are taken at once before the response is streamed.
const READY_FRAMES: usize = 64;

/// How the handler's run went, as far as it could be taken without waiting for the body.
enum Ran<B> {
    /// A response the store-when predicate refuses: delivered untouched, the key released.
    NotStored(Response<ResponseBody<B>>),
    /// A body that failed at once: the client gets what it produced and the error; the key is
    /// released.
    Broken(Response<ResponseBody<B>>),
    /// The whole body was ready.
    Whole {
        head: response::Parts,
        body: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// The body is still being produced; here is what was taken of it so far.
    Streaming {
        head: response::Parts,
        body: Pin<Box<B>>,
        ready: Chunks,
        trailers: Option<HeaderMap>,
    },
}

/// Takes what the body of the handler's `response` has ready now, polling it with `cx` until
/// it would wait (never waiting itself).
fn take_ready<B>(response: Response<B>, config: &Config, cx: &mut Context<'_>) -> Ran<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let (head, body) = response.into_parts();
    if !(config.store_when)(&head) {
        return Ran::NotStored(Response::from_parts(head, ResponseBody::inner(body)));
    }
    // Pinned in a box so that a body still being produced can move to the pump's task.
    let mut body = Box::pin(body);
    let limit = config.response_body_limit;
    let mut ready = Chunks::default();
    let mut trailers = None;
    for _ in 0..READY_FRAMES {
        if ready.len > limit {
            break;
        }
        match body.as_mut().poll_frame(cx) {
            Poll::Pending => break,
            Poll::Ready(None) => {
                return Ran::Whole {
                    head,
                    body: ready.concat(),
                    trailers,
                };
            }
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => ready.push(data),
                Err(frame) => trailers = frame.into_trailers().ok(),
            },
            Poll::Ready(Some(Err(error))) => {
                let rx = stream::failed(ready, error.into());
                return Ran::Broken(Response::from_parts(head, ResponseBody::channel(rx)));
            }
        }
    }
    Ran::Streaming {
        head,
        body,
        ready,
        trailers,
    }
}
