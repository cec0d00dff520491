//! Capturing a handler's response for its record: what its body has ready at once, and the
//! rest of a streamed body, read by a task of its own at the pace the handler produces it.
//!
//! The captured frames are queued for the client without waiting for it
//! ([`stream`](crate::stream)): a slow or silent client never holds the key in flight. Past
//! the capture limit the key is spent (completed, not replayable) and the rest of the body
//! follows at the client's pace. A streamed response ends only once its record is stored, so
//! a client that has the whole response and retries at once is replayed.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode, response};
use http_body::{Body, Frame};

use crate::{
    body::{Chunks, ResponseBody},
    config::Config,
    error::BoxError,
    fingerprint::Fingerprint,
    lease::Lease,
    observe::RecordResult,
    record::Record,
    store::IdempotencyStore,
    stream::{self, Chunk, Sender},
};

/// At most this many frames are taken at once before the response is streamed.
const READY_FRAMES: usize = 64;

/// How the handler's run went, as far as it could be taken without waiting for the body.
pub(crate) enum Ran<B> {
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
pub(crate) fn take_ready<B>(response: Response<B>, config: &Config, cx: &mut Context<'_>) -> Ran<B>
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
pub(crate) struct RecordOf {
    pub(crate) fingerprint: Fingerprint,
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) ttl: Duration,
}

/// The rest of a body still being produced, and what was taken of it so far.
pub(crate) struct Pump<B> {
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
    pub(crate) async fn finish<St: IdempotencyStore>(
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
