//! Running the handler for a claimed key: in a task of its own, so that a client that
//! disconnects stops only the forwarding of the response, never the handler or the capture.
//!
//! The task calls the inner service, sends the response head to the client, captures the
//! body up to the limit while forwarding it, and then completes or releases the claim. The
//! client's response ends only once its record is stored, so a client that has the whole
//! response and retries at once is replayed, never told the key is still in flight. A
//! panic anywhere in it drops the [`Lease`], which releases the claim; the client sees a 500
//! problem (before the head) or a body error (after it).

use std::{
    pin::{Pin, pin},
    sync::Arc,
    task::Poll,
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame};
use tokio::sync::{mpsc, oneshot};
use tower_service::Service;
use tracing::Instrument;

use crate::{
    body::{Chunk, RequestBody, ResponseBody},
    config::Config,
    error::BoxError,
    fingerprint::Fingerprint,
    lease::Lease,
    problem::Problem,
    record::Record,
    store::IdempotencyStore,
};

/// Frames buffered between the handler's task and a slow client.
const FRAMES_IN_FLIGHT: usize = 8;
/// At most this many frames are taken at once before the response is streamed.
const READY_FRAMES: usize = 64;

type Head<B, E> = Result<Response<ResponseBody<B>>, E>;

/// Runs `inner` for a request whose key `lease` holds, and returns the response head as
/// soon as there is one.
pub(crate) async fn execute<S, St, ReqB, ResB>(
    inner: S,
    request: Request<RequestBody<ReqB>>,
    lease: Lease<St>,
    fingerprint: Fingerprint,
    ttl: Duration,
    config: Arc<Config>,
) -> Result<Response<ResponseBody<ResB>>, S::Error>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: IdempotencyStore,
    ReqB: Send + 'static,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let (head_tx, head_rx) = oneshot::channel();
    let task_config = Arc::clone(&config);
    let task = async move {
        let finish = lease
            .keep_alive(run(inner, request, fingerprint, &task_config, head_tx))
            .await;
        match finish {
            Finish::Store { record, then } => {
                lease.complete(record, ttl).await;
                then.deliver().await;
            }
            Finish::Release => lease.release().await,
        }
    };
    tokio::spawn(task.in_current_span());
    match head_rx.await {
        Ok(head) => head,
        // The task ended without a head: the handler panicked, and the lease's drop has
        // released the key.
        Err(_) => {
            tracing::error!("the handler of an idempotent request panicked; key released");
            Ok(config
                .render(&Problem::handler_failed())
                .map(|body| ResponseBody::full(body, None)))
        }
    }
}

/// How the handler's run ends.
enum Finish<B, E> {
    /// Store the record, then finish the client's response: a client that has the whole
    /// response and retries at once finds the record, not the claim.
    Store { record: Record, then: Deliver<B, E> },
    /// Release the key (an error, or a response not to be stored).
    Release,
}

/// The part of the response held back until its record is stored.
enum Deliver<B, E> {
    /// A response that was ready whole: all of it.
    Whole {
        head_tx: oneshot::Sender<Head<B, E>>,
        response: Response<ResponseBody<B>>,
    },
    /// A streamed response: its end.
    End { client: Option<mpsc::Sender<Chunk>> },
}

impl<B, E> Deliver<B, E> {
    async fn deliver(self) {
        match self {
            Self::Whole { head_tx, response } => {
                let _ = head_tx.send(Ok(response));
            }
            Self::End { mut client } => forward(&mut client, Chunk::End).await,
        }
    }
}

/// Calls the handler, hands the head to the client and captures the body. Returns the record
/// to store and what of the response awaits it, or that the key is to be released.
async fn run<S, ReqB, ResB>(
    mut inner: S,
    request: Request<RequestBody<ReqB>>,
    fingerprint: Fingerprint,
    config: &Config,
    head_tx: oneshot::Sender<Head<ResB, S::Error>>,
) -> Finish<ResB, S::Error>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
    ResB: Body<Data = Bytes>,
    ResB::Error: Into<BoxError>,
{
    let response = match inner.call(request).await {
        Ok(response) => response,
        Err(error) => {
            let _ = head_tx.send(Err(error));
            return Finish::Release;
        }
    };
    let (parts, body) = response.into_parts();
    if !(config.store_when)(&parts) {
        tracing::debug!(status = %parts.status, "response not stored; key released");
        let _ = head_tx.send(Ok(Response::from_parts(parts, ResponseBody::inner(body))));
        return Finish::Release;
    }
    let limit = config.response_body_limit;
    let mut body = pin!(body);

    // Take what the body has ready now. A body that is ready whole (the common case: a
    // buffered JSON response) goes out in one piece, with no channel and no copy.
    let mut ready = Vec::new();
    let mut ready_len = 0;
    let mut trailers = None;
    let streaming = loop {
        if ready_len > limit || ready.len() >= READY_FRAMES {
            break true;
        }
        match poll_frame_now(body.as_mut()).await {
            Poll::Pending => break true,
            Poll::Ready(None) => break false,
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    ready_len += data.len();
                    ready.push(data);
                }
                Err(frame) => trailers = frame.into_trailers().ok(),
            },
            Poll::Ready(Some(Err(error))) => {
                // The client gets what the body produced, then its error; the key is released.
                let (tx, rx) = mpsc::channel(ready.len() + 1);
                for data in ready {
                    let _ = tx.try_send(Chunk::Frame(Frame::data(data)));
                }
                let _ = tx.try_send(Chunk::Error(error));
                let _ = head_tx.send(Ok(Response::from_parts(parts, ResponseBody::channel(rx))));
                return Finish::Release;
            }
        }
    };

    if !streaming {
        let whole = concat(ready);
        let record = if whole.len() <= limit {
            Record::response(
                fingerprint,
                parts.status,
                &parts.headers,
                whole.clone(),
                trailers.as_ref(),
            )
        } else {
            Record::not_replayable(fingerprint, parts.status)
        };
        let response = Response::from_parts(parts, ResponseBody::full(whole, trailers));
        return Finish::Store {
            record,
            then: Deliver::Whole { head_tx, response },
        };
    }

    let status = parts.status;
    let headers = parts.headers.clone();
    let (tx, rx) = mpsc::channel(FRAMES_IN_FLIGHT);
    let _ = head_tx.send(Ok(Response::from_parts(parts, ResponseBody::channel(rx))));
    let mut client = Some(tx);
    let mut capture = Capture::new(limit);
    for data in ready {
        capture.push(&data);
        forward(&mut client, Chunk::Frame(Frame::data(data))).await;
    }
    loop {
        let frame = match next_frame(body.as_mut()).await {
            None => break,
            Some(Ok(frame)) => frame,
            Some(Err(error)) => {
                // The response is broken: release the key so that a retry executes again.
                forward(&mut client, Chunk::Error(error)).await;
                return Finish::Release;
            }
        };
        if let Some(data) = frame.data_ref() {
            capture.push(data);
        } else if let Some(frame_trailers) = frame.trailers_ref() {
            trailers = Some(frame_trailers.clone());
        }
        forward(&mut client, Chunk::Frame(frame)).await;
    }
    Finish::Store {
        record: capture.into_record(fingerprint, status, &headers, trailers.as_ref()),
        then: Deliver::End { client },
    }
}

/// Polls the body once: its next frame if ready, without waiting.
async fn poll_frame_now<B>(body: Pin<&mut B>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = body;
    std::future::poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx).map_err(Into::into))).await
}

/// Waits for the body's next frame.
async fn next_frame<B>(mut body: Pin<&mut B>) -> Option<Result<Frame<Bytes>, BoxError>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    std::future::poll_fn(|cx| body.as_mut().poll_frame(cx).map_err(Into::into)).await
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
    chunks: Vec<Bytes>,
    len: usize,
    limit: usize,
    over: bool,
}

impl Capture {
    fn new(limit: usize) -> Self {
        Self {
            chunks: Vec::new(),
            len: 0,
            limit,
            over: false,
        }
    }

    fn push(&mut self, data: &Bytes) {
        if self.over {
            return;
        }
        self.len += data.len();
        if self.len > self.limit {
            self.over = true;
            self.chunks = Vec::new();
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
        Record::response(fingerprint, status, headers, concat(self.chunks), trailers)
    }
}

/// Joins chunks; one chunk is handed on as it is.
fn concat(mut chunks: Vec<Bytes>) -> Bytes {
    match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => {
            let mut joined = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
            for chunk in chunks {
                joined.extend_from_slice(&chunk);
            }
            joined.freeze()
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
        assert!(capture.chunks.is_empty());
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
    fn concat_keeps_a_single_chunk_without_copying() {
        let chunk = Bytes::from(vec![1, 2, 3]);
        let pointer = chunk.as_ptr();
        assert_eq!(concat(vec![chunk]).as_ptr(), pointer);
        assert_eq!(concat(vec![]), Bytes::new());
        assert_eq!(
            concat(vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")]),
            Bytes::from_static(b"ab")
        );
    }
}
