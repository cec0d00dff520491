//! Capturing a handler's response for its record: what its body has ready at once, and the
//! rest of a streamed body, read by a task of its own at the pace the handler produces it.
//!
//! The captured frames are queued for the client without waiting for it
//! ([`stream`](crate::stream)): a slow or silent client never holds the key in flight. Past
//! the capture limit the key is spent (completed, not replayable) and the rest of the body
//! follows at the client's pace. A streamed response ends only once its record is stored, so
//! a client that has the whole response and retries at once is replayed.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode, response};
use http_body::{Body, Frame};
use tracing::Instrument;

use crate::{
    body::{Chunks, ResponseBody},
    catch_unwind,
    config::Config,
    error::BoxError,
    expiry,
    fingerprint::Fingerprint,
    lease::{Kept, Lease},
    observe::RecordResult,
    problem::Problem,
    record::Record,
    reject::reject,
    store::IdempotencyStore,
    stream::{self, Chunk, Sender},
};

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
/// body costs a 500 problem and the key.
pub(crate) fn settle<B, St>(
    response: Response<B>,
    lease: Lease<St>,
    fingerprint: Fingerprint,
    ttl: Duration,
    config: &Config,
    cx: &mut Context<'_>,
) -> Settled<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    St: IdempotencyStore,
{
    let limit = config.response_body_limit;
    let Ok(taken) = catch_unwind::catching(|| take_ready(response, config, cx)) else {
        return panicked(lease, config);
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
        Ran::Streaming { pump, .. } if lease.in_transaction() => {
            // The record is written in the handler's transaction, which commits before the
            // response is answered: a body still being produced cannot be part of it. The
            // transaction is rolled back with the release.
            drop(pump);
            tracing::error!(
                "a handler completing in its own transaction returned a streamed body; refused and rolled back"
            );
            return Settled::AfterStore {
                lease_op: Box::pin(lease.release(RecordResult::BodyError)),
                response: reject(config, &Problem::handler_failed()),
            };
        }
        Ran::Streaming { head, pump } => {
            let (tx, rx) = stream::channel();
            let of = RecordOf {
                fingerprint,
                status: head.status,
                headers: head.headers.clone(),
                ttl,
            };
            tokio::spawn(pump.finish(lease, tx, limit, of).in_current_span());
            let response = Response::from_parts(head, ResponseBody::channel(rx));
            return Settled::Now(expiry::on_first_execution(config, ttl, response));
        }
    };
    Settled::AfterStore { lease_op, response }
}

/// The handler (or its body) panicked: the key is released and the client gets a 500.
pub(crate) fn panicked<B, St: IdempotencyStore>(lease: Lease<St>, config: &Config) -> Settled<B> {
    // The panic message went to the panic hook already.
    tracing::error!("the handler of an idempotent request panicked; key released");
    Settled::AfterStore {
        lease_op: Box::pin(lease.release(RecordResult::Panic)),
        response: reject(config, &Problem::handler_failed()),
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
    /// The body is still being produced.
    Streaming {
        head: response::Parts,
        pump: Pump<B>,
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
    while ready.len <= limit && ready.count() < READY_FRAMES {
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
                let _ = lease.complete(record, of.ttl).await;
                tx.push(Chunk::End);
            }
            Captured::OverLimit(rest) => {
                // The key is spent whatever the rest of the body does: the handler ran.
                let record = Record::not_replayable(of.fingerprint, of.status);
                let _ = lease.complete(record, of.ttl).await;
                forward_rest(rest, &tx).await;
            }
            Captured::Failed(error) => {
                // Released before the client sees the error, so its retry at once executes.
                let _ = lease.release(RecordResult::BodyError).await;
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
