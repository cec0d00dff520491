//! The channel a streamed first response travels through, from the task that reads the
//! handler's body (and captures it) to the client's [`ResponseBody`](crate::ResponseBody).
//!
//! The capture must never wait for the client: a slow or silent client would otherwise keep
//! the key in flight for as long as it pleased. So the data the capture keeps is not queued
//! for the client frame by frame: the client reads it from the capture itself, shared under
//! one lock, at its own pace. A client that reads nothing costs the captured bytes and
//! nothing per frame ([`Chunks`] copies short frames together and keeps no empty ones), so
//! the capture limit bounds it.
//!
//! Data past the capture limit is kept by nobody else, so it is queued only as the client
//! takes what came before: a window of [`WINDOW`] bytes, where every frame costs
//! [`FRAME_COST`] beyond its data (an empty frame or trailers too), so a body of countless
//! tiny or empty frames waits for its client like one of large frames.
//!
//! The producer learns when the client goes away ([`Sender::gone`]), so a capture that
//! outlives its client can be bounded.

use std::{
    collections::VecDeque,
    fmt,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::Frame;

use crate::{
    flow::chunks::{Chunks, Cursor},
    store::error::BoxError,
};

/// What frames past the capture limit may cost, queued for the client, before the producer
/// waits for it.
pub(crate) const WINDOW: usize = 64 * 1024;

/// What a frame queued past the capture limit costs beyond its data: about what it takes in
/// the queue (the frame, its `Bytes`, the allocation behind them).
pub(crate) const FRAME_COST: usize = 128;

/// A new channel: the producer's end and the client's, the client's reading from `captured`
/// (what was taken of the body before it was handed to a task) first.
pub(crate) fn channel(captured: Chunks) -> (Sender, Receiver) {
    let shared = Arc::new(Mutex::new(State {
        captured,
        ..State::default()
    }));
    (
        Sender {
            shared: Arc::clone(&shared),
        },
        Receiver {
            shared,
            done: false,
        },
    )
}

/// A channel holding `captured` and then `error`, with no producer left.
pub(crate) fn failed(captured: Chunks, error: BoxError) -> Receiver {
    let (tx, rx) = channel(captured);
    tx.fail(error);
    rx
}

/// What the two ends share.
#[derive(Default)]
struct State {
    /// The data captured: the record's body while within the limit, and what the client
    /// reads first.
    captured: Chunks,
    /// How far the client has read `captured`.
    at: Cursor,
    /// Trailers of a body within the limit, sent after its data.
    trailers: Option<HeaderMap>,
    /// Frames past the capture limit, and what they cost.
    queue: VecDeque<Frame<Bytes>>,
    queued: usize,
    end: Option<End>,
    client: Option<Waker>,
    producer: Option<Waker>,
    client_gone: bool,
}

enum End {
    /// The body ended normally.
    Complete,
    Failed(BoxError),
    /// The producer went away without ending the body (the task producing it died: a panic
    /// in the handler's body): the client must see an error, not a short body.
    Stopped,
}

impl State {
    fn wake_client(&mut self) {
        if let Some(waker) = self.client.take() {
            waker.wake();
        }
    }

    fn wake_producer(&mut self) {
        if let Some(waker) = self.producer.take() {
            waker.wake();
        }
    }
}

fn lock(shared: &Mutex<State>) -> MutexGuard<'_, State> {
    // Nothing panics while the state is locked; a poisoned lock holds a whole state.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a frame queued past the capture limit costs.
fn cost(frame: &Frame<Bytes>) -> usize {
    let data = match (frame.data_ref(), frame.trailers_ref()) {
        (Some(data), _) => data.len(),
        (None, Some(trailers)) => trailers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum(),
        (None, None) => 0,
    };
    FRAME_COST.saturating_add(data)
}

/// The producer's end.
pub(crate) struct Sender {
    shared: Arc<Mutex<State>>,
}

impl Sender {
    /// Captures `data`, for the record and for the client, at once, whatever the client has
    /// taken so far.
    pub(crate) fn capture(&self, data: Bytes) {
        let mut state = lock(&self.shared);
        state.captured.push(data);
        state.wake_client();
    }

    /// Captures the body's trailers, sent to the client after the data.
    pub(crate) fn capture_trailers(&self, trailers: HeaderMap) {
        lock(&self.shared).trailers = Some(trailers);
    }

    /// The captured bytes, whole: the record's body. The client reads on from where it was,
    /// in these bytes (a slice of them, not a copy).
    pub(crate) fn captured(&self) -> Bytes {
        let mut state = lock(&self.shared);
        let body = std::mem::take(&mut state.captured).concat();
        let mut unread = Chunks::default();
        unread.push(body.slice(state.at.read.min(body.len())..));
        state.captured = unread;
        state.at = Cursor::default();
        body
    }

    /// Ends the client's body, its captured trailers last.
    pub(crate) fn end(&self) {
        self.finish(End::Complete);
    }

    /// Ends the client's body with `error`.
    pub(crate) fn fail(&self, error: BoxError) {
        self.finish(End::Failed(error));
    }

    fn finish(&self, end: End) {
        let mut state = lock(&self.shared);
        state.end.get_or_insert(end);
        state.wake_client();
    }

    /// Queues a frame past the capture limit once the client has taken enough of what came
    /// before: waits while the queue is not empty and the frame would take it past
    /// [`WINDOW`] (a frame larger than the window passes alone). Returns `false` if the
    /// client is gone.
    pub(crate) async fn send(&self, frame: Frame<Bytes>) -> bool {
        let cost = cost(&frame);
        let mut frame = Some(frame);
        std::future::poll_fn(|cx| {
            let mut state = lock(&self.shared);
            if state.client_gone {
                return Poll::Ready(false);
            }
            if state.queued > 0 && state.queued.saturating_add(cost) > WINDOW {
                state.producer = Some(cx.waker().clone());
                return Poll::Pending;
            }
            if let Some(frame) = frame.take() {
                state.queue.push_back(frame);
                state.queued = state.queued.saturating_add(cost);
                state.wake_client();
            }
            Poll::Ready(true)
        })
        .await
    }

    /// Returns once the client is gone.
    pub(crate) async fn gone(&self) {
        std::future::poll_fn(|cx| {
            let mut state = lock(&self.shared);
            if state.client_gone {
                return Poll::Ready(());
            }
            state.producer = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
    }

    /// What the channel holds for a client that has not read it: captured bytes, and the
    /// cost of the frames queued past the limit (for tests).
    #[cfg(test)]
    pub(crate) fn held(&self) -> (usize, usize) {
        let state = lock(&self.shared);
        (state.captured.held(), state.queued)
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.finish(End::Stopped);
    }
}

impl fmt::Debug for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender").finish_non_exhaustive()
    }
}

/// The producer stopped before the end of the body.
#[derive(Debug)]
struct ProducerStopped;

impl fmt::Display for ProducerStopped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the response body ended early: its handler failed")
    }
}

impl std::error::Error for ProducerStopped {}

/// The client's end.
pub(crate) struct Receiver {
    shared: Arc<Mutex<State>>,
    done: bool,
}

impl Receiver {
    /// The next frame of the body: captured data, then frames past the limit, then the
    /// captured trailers; then the end, or an error.
    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let mut state = lock(&self.shared);
        let State { captured, at, .. } = &mut *state;
        if let Some(data) = captured.read(at) {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(frame) = state.queue.pop_front() {
            state.queued = state.queued.saturating_sub(cost(&frame));
            state.wake_producer();
            return Poll::Ready(Some(Ok(frame)));
        }
        let next = match state.end.take() {
            None => {
                state.client = Some(cx.waker().clone());
                return Poll::Pending;
            }
            Some(End::Complete) => match state.trailers.take() {
                Some(trailers) => {
                    state.end = Some(End::Complete);
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                None => None,
            },
            Some(End::Failed(error)) => Some(Err(error)),
            Some(End::Stopped) => Some(Err(ProducerStopped.into())),
        };
        self.done = true;
        Poll::Ready(next)
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        self.done
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let mut state = lock(&self.shared);
        state.client_gone = true;
        // Frames past the limit are of no use to anyone now.
        state.queue.clear();
        state.queued = 0;
        state.wake_producer();
    }
}

impl fmt::Debug for Receiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver")
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn data(len: usize) -> Frame<Bytes> {
        Frame::data(Bytes::from(vec![b'x'; len]))
    }

    async fn next(rx: &mut Receiver) -> Option<Result<Frame<Bytes>, BoxError>> {
        std::future::poll_fn(|cx| rx.poll_frame(cx)).await
    }

    #[tokio::test]
    async fn captured_data_never_waits_for_the_client_and_costs_its_bytes_alone() {
        let (tx, mut rx) = channel(Chunks::default());
        // Half a million one-byte frames and as many empty ones, with nobody reading.
        for _ in 0..500_000 {
            tx.capture(Bytes::from_static(b"x"));
            tx.capture(Bytes::new());
        }
        let (held, queued) = tx.held();
        assert!(held <= 2 * 500_000, "held {held} bytes for 500 000");
        assert_eq!(queued, 0);
        tx.end();
        let mut read = 0;
        while let Some(frame) = next(&mut rx).await {
            read += frame.unwrap().into_data().unwrap().len();
        }
        assert_eq!(read, 500_000);
    }

    #[tokio::test(start_paused = true)]
    async fn frames_past_the_limit_wait_once_the_window_is_spent_even_empty_ones() {
        for (what, frame) in [
            ("data", data(1024)),
            ("empty", data(0)),
            ("trailers", Frame::trailers(HeaderMap::new())),
        ] {
            let (tx, mut rx) = channel(Chunks::default());
            let mut sent = 0;
            loop {
                let send =
                    tokio::time::timeout(Duration::from_secs(1), tx.send(frame_like(&frame)));
                match send.await {
                    Ok(sent_ok) => assert!(sent_ok),
                    Err(_elapsed) => break,
                }
                sent += 1;
                assert!(
                    sent <= WINDOW / FRAME_COST + 1,
                    "{what}: {sent} frames queued"
                );
            }
            let (_, queued) = tx.held();
            assert!(queued <= WINDOW, "{what}: {queued}");
            assert!(
                sent >= WINDOW / (FRAME_COST + 1024),
                "{what}: only {sent} queued"
            );
            assert!(next(&mut rx).await.is_some());
            assert!(
                tx.send(frame_like(&frame)).await,
                "{what}: taking one frees room"
            );
        }
    }

    fn frame_like(frame: &Frame<Bytes>) -> Frame<Bytes> {
        match frame.data_ref() {
            Some(data) => Frame::data(data.clone()),
            None => Frame::trailers(HeaderMap::new()),
        }
    }

    #[tokio::test]
    async fn a_send_to_a_client_that_left_returns_false_instead_of_waiting() {
        let (tx, rx) = channel(Chunks::default());
        assert!(tx.send(data(WINDOW)).await);
        let blocked = tokio::spawn(async move {
            let sent = tx.send(data(1)).await;
            tx.gone().await;
            sent
        });
        drop(rx);
        assert!(!blocked.await.unwrap());
    }

    #[tokio::test]
    async fn frames_larger_than_the_window_still_pass() {
        let (tx, mut rx) = channel(Chunks::default());
        assert!(tx.send(data(WINDOW * 3)).await);
        assert!(next(&mut rx).await.is_some());
        assert!(tx.send(data(WINDOW * 3)).await);
    }

    #[tokio::test]
    async fn the_client_reads_captured_data_then_frames_past_the_limit_then_trailers() {
        let mut first = Chunks::default();
        first.push(Bytes::from_static(b"ab"));
        let (tx, mut rx) = channel(first);
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", http::HeaderValue::from_static("1"));
        tx.capture(Bytes::from_static(b"c"));
        assert_eq!(
            next(&mut rx).await.unwrap().unwrap().into_data().unwrap(),
            "ab"
        );
        tx.capture(Bytes::from_static(b"d"));
        tx.capture_trailers(trailers.clone());
        assert_eq!(tx.captured(), "abcd", "the record's body, whole");
        assert!(tx.send(data(3)).await);
        tx.end();
        assert_eq!(
            next(&mut rx).await.unwrap().unwrap().into_data().unwrap(),
            "cd"
        );
        assert_eq!(
            next(&mut rx).await.unwrap().unwrap().into_data().unwrap(),
            "xxx"
        );
        let last = next(&mut rx).await.unwrap().unwrap();
        assert_eq!(last.into_trailers().unwrap(), trailers);
        assert!(next(&mut rx).await.is_none());
        assert!(rx.is_end_stream());
    }

    #[tokio::test]
    async fn a_failed_channel_yields_its_data_then_its_error() {
        let mut first = Chunks::default();
        first.push(Bytes::from_static(b"part"));
        let mut rx = failed(first, "broken".into());
        assert_eq!(
            next(&mut rx).await.unwrap().unwrap().into_data().unwrap(),
            "part"
        );
        assert!(next(&mut rx).await.unwrap().is_err());
        assert!(next(&mut rx).await.is_none());
    }
}
