//! The rest of a streamed response, captured by a task of its own (or, for a record that
//! commits in the handler's transaction, before the answer): what is kept, how a capture past
//! the limit, cut short or failing ends, and how the rest follows at the client's pace.

use std::{pin::Pin, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body::{Body, Frame};

use crate::{
    fingerprint::Fingerprint,
    flow::catch_unwind,
    flow::lease::{Kept, Lease},
    flow::stream::Sender,
    flow::task,
    observe::RecordResult,
    protocol::grpc,
    protocol::jsonrpc::{self, Rpc},
    record::Record,
    store::IdempotencyStore,
    store::error::BoxError,
};

/// Whether a whole response within the limit is kept for replay, besides the store-when
/// predicate: a single JSON-RPC call's only if it answers the call
/// ([`jsonrpc::answers`]); a gRPC call's only if its `grpc-status` is one of the stored
/// codes (a gRPC error is an HTTP 200, which the store-when predicate would keep).
pub(super) fn kept(
    rpc: &Rpc,
    (json_rpc, grpc): (&jsonrpc::Settings, &grpc::Settings),
    headers: &HeaderMap,
    body: &[u8],
    trailers: Option<&HeaderMap>,
) -> bool {
    match rpc {
        Rpc::Call(Some(_)) => jsonrpc::answers(headers, body, json_rpc.store_errors),
        Rpc::Grpc => grpc::kept(headers, body.len(), trailers, grpc),
        Rpc::Call(None) | Rpc::Batch | Rpc::Plain => true,
    }
}

/// What a streamed response's record is made of, besides its body.
pub(super) struct RecordOf {
    pub(super) fingerprint: Fingerprint,
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) ttl: Duration,
    /// What the request is to JSON-RPC or gRPC, and which of its answers are kept.
    pub(super) rpc: Rpc,
    pub(super) json_rpc: jsonrpc::Settings,
    pub(super) grpc: grpc::Settings,
}

/// The rest of a body still being produced, read by a task of its own.
pub(super) struct Pump<B> {
    pub(super) body: Pin<Box<B>>,
    /// The client's channel, which holds the captured data.
    pub(super) tx: Sender,
    /// The bytes captured so far.
    pub(super) len: usize,
    pub(super) limit: usize,
    pub(super) trailers: Option<HeaderMap>,
    /// How long the capture may go on once the client is gone.
    pub(super) after_client: Duration,
}

/// How capturing a streamed body ended.
enum Captured {
    /// The whole body, within the limit.
    Whole,
    /// The body went past the limit with this frame (none if what was ready at once did).
    OverLimit(Option<Frame<Bytes>>),
    /// The body had not ended when the client had been gone for the bound.
    CutShort,
    /// The body failed.
    Failed(BoxError),
}

/// How forwarding a gRPC body past the capture limit ended.
enum Rest {
    /// With these trailers, which carry the call's status.
    Trailers(HeaderMap),
    /// With no trailers: no status.
    Ended,
    /// The body failed.
    Failed(BoxError),
    /// The body had not ended when its client had been gone (or had taken nothing) for the
    /// bound.
    CutShort,
}

/// A task reading a body that is always ready (countless frames, none pending) lets others
/// run after this many frames.
const YIELD_EVERY: u32 = 64;

impl<B> Pump<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    /// The task behind a streamed response: captures the body while the lease is kept alive,
    /// then stores the record (or releases the key) and ends the client's body.
    pub(super) async fn finish<St: IdempotencyStore>(mut self, mut lease: Lease<St>, of: RecordOf) {
        match lease.keep_alive(self.capture()).await {
            Captured::Whole => {
                let body = self.tx.captured();
                if !kept(
                    &of.rpc,
                    (&of.json_rpc, &of.grpc),
                    &of.headers,
                    &body,
                    self.trailers.as_ref(),
                ) {
                    tracing::debug!("no JSON-RPC answer, or no gRPC status, to keep; key released");
                    let _ = lease.release(RecordResult::Predicate).await;
                    self.tx.end();
                    return;
                }
                let record = Record::response(
                    of.fingerprint,
                    of.status,
                    &of.headers,
                    body,
                    self.trailers.as_ref(),
                );
                let _ = lease.complete(record, of.ttl).await;
                self.tx.end();
            }
            Captured::OverLimit(frame) if of.rpc.is_grpc() => {
                // A gRPC call's status comes in its trailers, after the data: the key is held
                // (the lease kept alive) until they say whether the answer is kept.
                let (rest, whole) = lease.keep_alive(self.forward_to_trailers(frame)).await;
                if let Rest::CutShort = rest {
                    // The handler's body first: its stream stops now.
                    drop(self);
                    tracing::warn!(
                        "the client of a gRPC answer over the capture limit left, or took \
                         nothing, and its body did not end in time; its status is unknown: \
                         key released"
                    );
                    let _ = lease.release(RecordResult::BodyError).await;
                    return;
                }
                let kept = matches!(&rest, Rest::Trailers(trailers)
                    if grpc::kept(&of.headers, 1, Some(trailers), &of.grpc));
                if kept {
                    let record = Record::not_replayable(of.fingerprint, of.status);
                    let _ = lease.complete(record, of.ttl).await;
                } else if let Rest::Failed(_) = rest {
                    let _ = lease.release(RecordResult::BodyError).await;
                } else {
                    tracing::debug!(
                        "a gRPC answer over the capture limit ended with no status, or one not \
                         kept; key released"
                    );
                    let _ = lease.release(RecordResult::Predicate).await;
                }
                match rest {
                    Rest::Trailers(trailers) if whole => self.end_with(trailers).await,
                    Rest::Ended if whole => self.tx.end(),
                    Rest::Failed(error) => self.tx.fail(error),
                    // Frames the client did not take were dropped: its body must end in an
                    // error, never look whole.
                    _ => drop(self),
                }
            }
            Captured::OverLimit(frame) => {
                // The key is spent whatever the rest of the body does: the handler ran.
                let record = Record::not_replayable(of.fingerprint, of.status);
                let _ = lease.complete(record, of.ttl).await;
                self.forward_rest(frame).await;
            }
            Captured::CutShort if of.rpc.is_grpc() => {
                drop(self);
                // No status: as a gRPC answer cut short in any other way, never kept.
                tracing::warn!(
                    "the client of a streamed gRPC answer left and its body did not end in \
                     time; its status is unknown: the body is dropped and the key released"
                );
                let _ = lease.release(RecordResult::BodyError).await;
            }
            Captured::CutShort => {
                let after = self.after_client;
                // The handler's body first: its stream stops now, not once the key is spent.
                drop(self);
                tracing::warn!(
                    ?after,
                    "the client of a streamed idempotent response left and its body did not \
                     end in time; the body is dropped and the key spent (not replayable)"
                );
                let record = Record::not_replayable(of.fingerprint, of.status);
                let _ = lease.complete(record, of.ttl).await;
            }
            Captured::Failed(error) => {
                // Released before the client sees the error, so its retry at once executes.
                let _ = lease.release(RecordResult::BodyError).await;
                self.tx.fail(error);
            }
        }
    }

    /// The lease operation of a streamed response whose record commits in the handler's own
    /// transaction: captures the whole body (the lease kept alive), then commits the record
    /// with it and ends the client's body, which the client reads once this is done.
    ///
    /// Past the limit the key is spent as without the setting: a not-replayable record
    /// commits with the handler's writes (or alone, if it never began its transaction), and
    /// the rest of the body follows the commit at the client's pace. A client gone for the
    /// bound spends the key the same way. A body that fails or panics before it is whole
    /// rolls the transaction back and frees the key ([`Kept::BodyFailed`]: nothing of it was
    /// sent). The body is dropped before any store operation that does not need the rest of
    /// it, so a transaction guard it holds never stalls the commit or the rollback.
    pub(super) async fn commit<St: IdempotencyStore>(
        mut self,
        mut lease: Lease<St>,
        of: RecordOf,
    ) -> Kept {
        let captured = lease
            .keep_alive(catch_unwind::CatchUnwind::new(self.capture()))
            .await;
        match captured {
            Ok(Captured::Whole) => {
                let Self {
                    body, tx, trailers, ..
                } = self;
                drop(body);
                let captured = tx.captured();
                let kept = if kept(
                    &of.rpc,
                    (&of.json_rpc, &of.grpc),
                    &of.headers,
                    &captured,
                    trailers.as_ref(),
                ) {
                    let record = Record::response(
                        of.fingerprint,
                        of.status,
                        &of.headers,
                        captured,
                        trailers.as_ref(),
                    );
                    lease.complete(record, of.ttl).await
                } else {
                    tracing::debug!("no JSON-RPC answer, or no gRPC status, to keep; key released");
                    lease.release(RecordResult::Predicate).await
                };
                tx.end();
                kept
            }
            Ok(Captured::OverLimit(frame)) => {
                // The key is spent whatever the rest of the body does: the handler ran.
                let record = Record::not_replayable(of.fingerprint, of.status);
                let kept = lease.complete(record, of.ttl).await;
                if kept == Kept::Response && !task::spawn(self.forward_rest(frame)) {
                    tracing::warn!(
                        "a streamed idempotent response needs a tokio runtime to be forwarded; \
                         its body was cut short"
                    );
                }
                kept
            }
            Ok(Captured::CutShort) => {
                let after = self.after_client;
                drop(self);
                tracing::warn!(
                    ?after,
                    "the client of a response completing in the handler's transaction left and \
                     its body did not end in time; the body is dropped and the key spent (not \
                     replayable)"
                );
                let record = Record::not_replayable(of.fingerprint, of.status);
                lease.complete(record, of.ttl).await
            }
            Ok(Captured::Failed(error)) => {
                drop(self);
                tracing::warn!(
                    %error,
                    "the streamed body of a response completing in the handler's transaction \
                     failed before its end; rolled back and the key released"
                );
                let _ = lease.release(RecordResult::BodyError).await;
                Kept::BodyFailed
            }
            Err(_panic) => {
                drop(self);
                // The panic message went to the panic hook already.
                tracing::error!(
                    "the streamed body of a response completing in the handler's transaction \
                     panicked; rolled back and the key released"
                );
                let _ = lease.release(RecordResult::Panic).await;
                Kept::BodyFailed
            }
        }
    }

    /// Reads the body at the handler's pace, capturing it for the record and the client
    /// without waiting for the client, until it ends, fails, goes past the limit, or its
    /// client has been gone for `after_client`.
    async fn capture(&mut self) -> Captured {
        if self.len > self.limit {
            return Captured::OverLimit(None);
        }
        let Self {
            body,
            tx,
            len,
            limit,
            trailers,
            after_client,
        } = self;
        let cut_short = async {
            tx.gone().await;
            tokio::time::sleep(*after_client).await;
        };
        let mut cut_short = std::pin::pin!(cut_short);
        let mut frames: u32 = 0;
        loop {
            frames = frames.wrapping_add(1);
            if frames.is_multiple_of(YIELD_EVERY) {
                tokio::task::yield_now().await;
            }
            let next = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx).map_err(Into::into));
            let frame = tokio::select! {
                biased;
                () = &mut cut_short => return Captured::CutShort,
                frame = next => frame,
            };
            let frame = match frame {
                None => return Captured::Whole,
                Some(Ok(frame)) => frame,
                Some(Err(error)) => return Captured::Failed(error),
            };
            match frame.into_data() {
                Ok(data) if *len + data.len() > *limit => {
                    return Captured::OverLimit(Some(Frame::data(data)));
                }
                Ok(data) => {
                    *len += data.len();
                    tx.capture(data);
                }
                Err(frame) => {
                    if let Ok(map) = frame.into_trailers() {
                        *trailers = Some(map.clone());
                        tx.capture_trailers(map);
                    }
                }
            }
        }
    }

    /// Forwards the rest of a gRPC body past the capture limit (from `first`) at the
    /// client's pace, up to its trailers (returned, not sent: they follow the decision
    /// they carry), and tells whether the client was given every frame. Once the client is
    /// gone, or has taken nothing for `after_client`, the body is read on without
    /// forwarding, for `after_client` at most.
    async fn forward_to_trailers(&mut self, first: Option<Frame<Bytes>>) -> (Rest, bool) {
        let Self {
            body,
            tx,
            after_client,
            ..
        } = self;
        let after_client = *after_client;
        let cut_short = async {
            tx.gone().await;
            tokio::time::sleep(after_client).await;
        };
        let mut cut_short = std::pin::pin!(cut_short);
        let mut pending = first;
        let mut whole = true;
        let mut stalled: Option<tokio::time::Instant> = None;
        let mut frames: u32 = 0;
        loop {
            if let Some(frame) = pending.take() {
                match frame.into_trailers() {
                    Ok(trailers) => return (Rest::Trailers(trailers), whole),
                    Err(frame) if whole => {
                        match tokio::time::timeout(after_client, tx.send(frame)).await {
                            Ok(true) => {}
                            // Gone: `cut_short` bounds the rest.
                            Ok(false) => whole = false,
                            Err(_elapsed) => {
                                whole = false;
                                stalled = Some(tokio::time::Instant::now() + after_client);
                            }
                        }
                    }
                    Err(_) => {}
                }
            }
            frames = frames.wrapping_add(1);
            if frames.is_multiple_of(YIELD_EVERY) {
                tokio::task::yield_now().await;
            }
            let next = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx).map_err(Into::into));
            let stall = async {
                match stalled {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let next = tokio::select! {
                biased;
                () = &mut cut_short => return (Rest::CutShort, false),
                () = stall => return (Rest::CutShort, false),
                next = next => next,
            };
            match next {
                None => return (Rest::Ended, whole),
                Some(Err(error)) => return (Rest::Failed(error), whole),
                Some(Ok(frame)) => pending = Some(frame),
            }
        }
    }

    /// Ends the client's body with `trailers`, once it has taken what came before them.
    async fn end_with(self, trailers: HeaderMap) {
        if self.tx.send(Frame::trailers(trailers)).await {
            self.tx.end();
        }
    }

    /// Forwards the rest of a body past the capture limit (from `first`) at the client's
    /// pace; stops reading it once the client is gone (nothing else needs it: its key is
    /// spent already).
    async fn forward_rest(mut self, first: Option<Frame<Bytes>>) {
        if let Some(frame) = first
            && !self.tx.send(frame).await
        {
            return;
        }
        loop {
            let next = std::future::poll_fn(|cx| {
                self.body
                    .as_mut()
                    .poll_frame(cx)
                    .map_err(Into::<BoxError>::into)
            });
            let next = tokio::select! {
                biased;
                () = self.tx.gone() => return,
                next = next => next,
            };
            match next {
                None => return self.tx.end(),
                Some(Err(error)) => return self.tx.fail(error),
                Some(Ok(frame)) => {
                    if !self.tx.send(frame).await {
                        tracing::debug!("client went away from a response too large to keep");
                        return;
                    }
                }
            }
        }
    }
}
