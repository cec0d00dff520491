//! Running the handler for a claimed key, capturing its response, and completing or releasing
//! the claim.
//!
//! The handler runs inline, in the request's own future: no task, no channel for the common
//! response whose body is ready at once. Three things keep that safe:
//!
//! - **Disconnects**: the response future hands its unfinished work to a task when it is
//!   dropped ([`ResponseFuture`](crate::ResponseFuture)), so a client that goes away stops
//!   nothing: the handler finishes and its record is stored.
//! - **Panics** in the handler are caught here: the claim is released and the client gets a
//!   500 problem.
//! - **Streaming**: a body that is not ready whole is read by a task of its own at the pace
//!   the handler produces it, captured, and queued for the client without waiting for it
//!   ([`stream`](crate::stream)): a slow or silent client never holds the key in flight. Past
//!   the capture limit the key is spent (completed, not replayable) and the rest of the body
//!   follows at the client's pace.
//!
//! A response ends only once its record is stored, so a client that has the whole response
//! and retries at once is replayed, never told the key is still in flight.

use std::{
    any::Any,
    future::Future,
    panic::{AssertUnwindSafe, catch_unwind},
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, response};
use http_body::{Body, Frame};
use pin_project_lite::pin_project;
use tower_service::Service;
use tracing::Instrument;

use crate::{
    body::{Chunks, RequestBody, ResponseBody},
    config::Config,
    error::BoxError,
    fingerprint::Fingerprint,
    lease::Lease,
    observe::RecordResult,
    problem::Problem,
    record::Record,
    store::IdempotencyStore,
    stream::{self, Chunk, Sender},
};

/// At most this many frames are taken at once before the response is streamed.
const READY_FRAMES: usize = 64;

/// Runs `inner` for a request whose key `lease` holds; stores or releases the key.
pub(crate) async fn execute<S, St, ReqB, ResB>(
    inner: S,
    request: Request<RequestBody<ReqB>>,
    mut lease: Lease<St>,
    fingerprint: Fingerprint,
    ttl: Duration,
    config: &Config,
) -> Result<Response<ResponseBody<ResB>>, S::Error>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
    St: IdempotencyStore,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let limit = config.response_body_limit;
    let ran = lease
        .keep_alive(CatchUnwind::new(run(inner, request, config)))
        .await;
    match ran {
        Ok(Ran::Failed(error)) => {
            lease.release(RecordResult::HandlerError).await;
            Err(error)
        }
        Ok(Ran::NotStored(response)) => {
            tracing::debug!(status = %response.status(), "response not stored; key released");
            lease.release(RecordResult::Predicate).await;
            Ok(response)
        }
        Ok(Ran::Broken(response)) => {
            lease.release(RecordResult::BodyError).await;
            Ok(response)
        }
        Ok(Ran::Whole {
            head,
            body,
            trailers,
        }) => {
            let record = if body.len() <= limit {
                Record::response(
                    fingerprint,
                    head.status,
                    &head.headers,
                    body.clone(),
                    trailers.as_ref(),
                )
            } else {
                Record::not_replayable(fingerprint, head.status)
            };
            lease.complete(record, ttl).await;
            Ok(Response::from_parts(
                head,
                ResponseBody::full(body, trailers),
            ))
        }
        Ok(Ran::Streaming { head, pump }) => {
            let (tx, rx) = stream::channel();
            let record = RecordOf {
                fingerprint,
                status: head.status,
                headers: head.headers.clone(),
                ttl,
            };
            tokio::spawn(pump.finish(lease, tx, limit, record).in_current_span());
            Ok(Response::from_parts(head, ResponseBody::channel(rx)))
        }
        Err(_panic) => {
            // The panic message went to the panic hook already.
            tracing::error!("the handler of an idempotent request panicked; key released");
            lease.release(RecordResult::Panic).await;
            Ok(config
                .render(&Problem::handler_failed())
                .map(|body| ResponseBody::full(body, None)))
        }
    }
}

/// How the handler's run went, as far as it could be taken without waiting for the body.
enum Ran<B, E> {
    /// The inner service returned an error: it passes through, the key is released.
    Failed(E),
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
    /// The body is still being produced.
    Streaming {
        head: response::Parts,
        pump: Pump<B>,
    },
}

/// Calls the handler and takes what its body has ready now.
async fn run<S, ReqB, ResB>(
    mut inner: S,
    request: Request<RequestBody<ReqB>>,
    config: &Config,
) -> Ran<ResB, S::Error>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
    ResB: Body<Data = Bytes>,
    ResB::Error: Into<BoxError>,
{
    let response = match inner.call(request).await {
        Ok(response) => response,
        Err(error) => return Ran::Failed(error),
    };
    let (head, body) = response.into_parts();
    if !(config.store_when)(&head) {
        return Ran::NotStored(Response::from_parts(head, ResponseBody::inner(body)));
    }
    // Pinned in a box so that a body still being produced can move to the pump's task.
    let mut body = Box::pin(body);
    let limit = config.response_body_limit;
    let mut ready = Chunks::default();
    let mut trailers = None;
    loop {
        if ready.len > limit || ready.count() >= READY_FRAMES {
            break;
        }
        let polled = std::future::poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await;
        match polled {
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
                let frames = ready
                    .into_vec()
                    .into_iter()
                    .map(|data| Chunk::Frame(Frame::data(data), 0));
                let rx = stream::ready(frames.chain([Chunk::Error(error.into())]));
                return Ran::Broken(Response::from_parts(head, ResponseBody::channel(rx)));
            }
        }
    }
    Ran::Streaming {
        head,
        pump: Pump {
            body,
            ready,
            trailers,
        },
    }
}

/// What a streamed response's record is made of, besides its body.
struct RecordOf {
    fingerprint: Fingerprint,
    status: StatusCode,
    headers: HeaderMap,
    ttl: Duration,
}

/// The rest of a body still being produced, and what was taken of it so far.
struct Pump<B> {
    body: Pin<Box<B>>,
    ready: Chunks,
    trailers: Option<HeaderMap>,
}

/// How capturing a streamed body ended.
enum Captured<B> {
    /// The whole body, within the limit.
    Whole {
        body: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// The body went past the limit; here is the rest of it, still to be forwarded.
    OverLimit(Pin<Box<B>>),
    /// The body failed.
    Failed(BoxError),
}

impl<B> Pump<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    /// The task behind a streamed response: captures the body while the lease is kept alive,
    /// then stores the record (or releases the key) and ends the client's body.
    async fn finish<St: IdempotencyStore>(
        self,
        mut lease: Lease<St>,
        tx: Sender,
        limit: usize,
        of: RecordOf,
    ) {
        match lease.keep_alive(self.capture(&tx, limit)).await {
            Captured::Whole { body, trailers } => {
                let record = Record::response(
                    of.fingerprint,
                    of.status,
                    &of.headers,
                    body,
                    trailers.as_ref(),
                );
                lease.complete(record, of.ttl).await;
                tx.push(Chunk::End);
            }
            Captured::OverLimit(rest) => {
                // The key is spent whatever the rest of the body does: the handler ran.
                let record = Record::not_replayable(of.fingerprint, of.status);
                lease.complete(record, of.ttl).await;
                forward_rest(rest, &tx).await;
            }
            Captured::Failed(error) => {
                // Released before the client sees the error, so its retry at once executes.
                lease.release(RecordResult::BodyError).await;
                tx.push(Chunk::Error(error));
            }
        }
    }

    /// Reads the body at the handler's pace, capturing it and queueing every frame for the
    /// client without waiting for it, until it ends, fails or goes past `limit`.
    async fn capture(mut self, tx: &Sender, limit: usize) -> Captured<B> {
        let over = self.ready.len > limit;
        for data in self.ready.iter() {
            tx.push(Chunk::Frame(Frame::data(data.clone()), 0));
        }
        if over {
            return Captured::OverLimit(self.body);
        }
        loop {
            let next = std::future::poll_fn(|cx| {
                self.body
                    .as_mut()
                    .poll_frame(cx)
                    .map_err(Into::<BoxError>::into)
            });
            let frame = match next.await {
                None => {
                    return Captured::Whole {
                        body: self.ready.concat(),
                        trailers: self.trailers,
                    };
                }
                Some(Ok(frame)) => frame,
                Some(Err(error)) => return Captured::Failed(error),
            };
            if let Some(data) = frame.data_ref() {
                if self.ready.len + data.len() > limit {
                    tx.push(Chunk::Frame(frame, 0));
                    return Captured::OverLimit(self.body);
                }
                self.ready.push(data.clone());
            } else if let Some(trailers) = frame.trailers_ref() {
                self.trailers = Some(trailers.clone());
            }
            tx.push(Chunk::Frame(frame, 0));
        }
    }
}

/// Forwards the rest of a body past the capture limit at the client's pace; stops reading it
/// once the client is gone (nothing else needs it: its key is spent already).
async fn forward_rest<B>(mut body: Pin<Box<B>>, tx: &Sender)
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    loop {
        let next =
            std::future::poll_fn(|cx| body.as_mut().poll_frame(cx).map_err(Into::<BoxError>::into));
        match next.await {
            None => return tx.push(Chunk::End),
            Some(Err(error)) => return tx.push(Chunk::Error(error)),
            Some(Ok(frame)) => {
                if !tx.send(frame).await {
                    tracing::debug!("client went away from a response too large to keep");
                    return;
                }
            }
        }
    }
}

pin_project! {
    /// Catches a panic while polling the handler, so that it costs the request a 500 problem
    /// and a released key rather than the whole connection.
    struct CatchUnwind<F> {
        #[pin]
        future: F,
    }
}

impl<F> CatchUnwind<F> {
    fn new(future: F) -> Self {
        Self { future }
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let future = self.project().future;
        // After a panic the future is dropped unpolled, which is all unwind safety asks.
        match catch_unwind(AssertUnwindSafe(|| future.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_while_polling_is_caught() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut panicking = Box::pin(CatchUnwind::new(async {
            panic!("expected in this test");
        }));
        assert!(matches!(
            panicking.as_mut().poll(&mut cx),
            Poll::Ready(Err(_))
        ));
        let mut fine = Box::pin(CatchUnwind::new(async { 7 }));
        assert!(matches!(fine.as_mut().poll(&mut cx), Poll::Ready(Ok(7))));
    }
}
