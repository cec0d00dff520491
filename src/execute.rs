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
//! - **Streaming**: a body that is not ready whole is pumped by a task of its own, which
//!   forwards it to the client while capturing it; a client that goes away stops only the
//!   forwarding.
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
use tokio::sync::mpsc;
use tower_service::Service;
use tracing::Instrument;

use crate::{
    body::{Chunk, Chunks, RequestBody, ResponseBody},
    config::Config,
    error::BoxError,
    fingerprint::Fingerprint,
    lease::Lease,
    observe::RecordResult,
    problem::Problem,
    record::Record,
    store::IdempotencyStore,
};

/// Frames buffered between the task pumping a streamed body and a slow client.
const FRAMES_IN_FLIGHT: usize = 8;
/// At most this many frames are taken at once before the response is streamed.
const READY_FRAMES: usize = 64;

/// Runs `inner` for a request whose key `lease` holds; stores or releases the key.
pub(crate) async fn execute<S, St, ReqB, ResB>(
    inner: S,
    request: Request<RequestBody<ReqB>>,
    lease: Lease<St>,
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
            let (tx, rx) = mpsc::channel(FRAMES_IN_FLIGHT);
            let status = head.status;
            let headers = head.headers.clone();
            let pump = async move {
                let capture = lease.keep_alive(pump.run(tx, limit)).await;
                match capture {
                    Some((capture, trailers, client)) => {
                        let record =
                            capture.into_record(fingerprint, status, &headers, trailers.as_ref());
                        lease.complete(record, ttl).await;
                        Deliver(client).end().await;
                    }
                    None => lease.release(RecordResult::BodyError).await,
                }
            };
            tokio::spawn(pump.in_current_span());
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
                let chunks = ready.into_vec();
                let (tx, rx) = mpsc::channel(chunks.len() + 1);
                for data in chunks {
                    let _ = tx.try_send(Chunk::Frame(Frame::data(data)));
                }
                let _ = tx.try_send(Chunk::Error(error.into()));
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

/// The rest of a body still being produced, and what was taken of it so far.
struct Pump<B> {
    body: Pin<Box<B>>,
    ready: Chunks,
    trailers: Option<HeaderMap>,
}

impl<B> Pump<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    /// Forwards the body to the client while capturing it. Returns the capture, the trailers
    /// and the client's end of the channel (to be ended once the record is stored), or `None`
    /// if the body failed (the key is then released).
    async fn run(
        mut self,
        tx: mpsc::Sender<Chunk>,
        limit: usize,
    ) -> Option<(Capture, Option<HeaderMap>, Option<mpsc::Sender<Chunk>>)> {
        let mut client = Some(tx);
        let mut capture = Capture::new(limit);
        for data in self.ready.into_vec() {
            capture.push(&data);
            forward(&mut client, Chunk::Frame(Frame::data(data))).await;
        }
        loop {
            let next = std::future::poll_fn(|cx| {
                self.body
                    .as_mut()
                    .poll_frame(cx)
                    .map_err(Into::<BoxError>::into)
            })
            .await;
            let frame = match next {
                None => break,
                Some(Ok(frame)) => frame,
                Some(Err(error)) => {
                    // The response is broken: release the key so that a retry executes again.
                    forward(&mut client, Chunk::Error(error)).await;
                    return None;
                }
            };
            if let Some(data) = frame.data_ref() {
                capture.push(data);
            } else if let Some(trailers) = frame.trailers_ref() {
                self.trailers = Some(trailers.clone());
            }
            forward(&mut client, Chunk::Frame(frame)).await;
        }
        Some((capture, self.trailers, client))
    }
}

/// The end of a streamed response, held back until its record is stored.
struct Deliver(Option<mpsc::Sender<Chunk>>);

impl Deliver {
    async fn end(mut self) {
        forward(&mut self.0, Chunk::End).await;
    }
}

/// Sends a chunk to the client while it is there; once it is gone, chunks are dropped and the
/// handler's body is still read to the end (and captured).
async fn forward(client: &mut Option<mpsc::Sender<Chunk>>, chunk: Chunk) {
    if let Some(tx) = client
        && tx.send(chunk).await.is_err()
    {
        tracing::debug!("client went away; the handler runs on and its response is stored");
        *client = None;
    }
}

/// The copy of a streamed body, kept while it stays within the limit.
struct Capture {
    chunks: Chunks,
    limit: usize,
    over: bool,
}

impl Capture {
    fn new(limit: usize) -> Self {
        Self {
            chunks: Chunks::default(),
            limit,
            over: false,
        }
    }

    fn push(&mut self, data: &Bytes) {
        if self.over {
            return;
        }
        if self.chunks.len + data.len() > self.limit {
            self.over = true;
            self.chunks = Chunks::default();
        } else {
            self.chunks.push(data.clone());
        }
    }

    fn into_record(
        self,
        fingerprint: Fingerprint,
        status: StatusCode,
        headers: &HeaderMap,
        trailers: Option<&HeaderMap>,
    ) -> Record {
        if self.over {
            return Record::not_replayable(fingerprint, status);
        }
        Record::response(fingerprint, status, headers, self.chunks.concat(), trailers)
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
    fn a_capture_over_the_limit_keeps_nothing_and_records_not_replayable() {
        let fingerprint = Fingerprint::from_bytes([7; 32]);
        let mut capture = Capture::new(4);
        capture.push(&Bytes::from_static(b"abc"));
        capture.push(&Bytes::from_static(b"de"));
        assert_eq!(capture.chunks.count(), 0);
        let record = capture.into_record(fingerprint, StatusCode::OK, &HeaderMap::new(), None);
        assert!(!record.is_replayable());
    }

    #[test]
    fn a_capture_at_the_limit_is_kept_whole() {
        let fingerprint = Fingerprint::from_bytes([7; 32]);
        let mut capture = Capture::new(5);
        capture.push(&Bytes::from_static(b"abc"));
        capture.push(&Bytes::from_static(b"de"));
        let record = capture.into_record(fingerprint, StatusCode::OK, &HeaderMap::new(), None);
        assert_eq!(record.body().map(|b| &b[..]), Some(&b"abcde"[..]));
    }

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
