//! The channel a streamed first response travels through, from the task that reads the
//! handler's body (and captures it) to the client's [`ResponseBody`](crate::ResponseBody).
//!
//! The capture must never wait for the client: a slow or silent client would otherwise keep
//! the key in flight for as long as it pleased. So data the capture keeps anyway is queued
//! without waiting (it costs no memory beyond the capture, whose limit bounds it: the queue
//! and the capture share the same `Bytes`). Data past the capture limit is kept by nobody
//! else, so it is queued only as the client takes what came before: a window of
//! [`WINDOW`] bytes.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::Frame;
use tokio::sync::{Semaphore, mpsc};

use crate::error::BoxError;

/// Bytes queued for the client beyond the capture before the producer waits for it.
const WINDOW: usize = 64 * 1024;

/// What the producing task sends to the client's body.
#[derive(Debug)]
pub(crate) enum Chunk {
    /// A frame, and the credit the client gives back when it takes it.
    Frame(Frame<Bytes>, u32),
    Error(BoxError),
    /// The body ended normally. A channel that closes without it means the producing task
    /// died (a panic in the handler's body): the client must see an error, not a short body.
    End,
}

/// A new channel: the producer's end and the client's.
pub(crate) fn channel() -> (Sender, Receiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let credit = Arc::new(Semaphore::new(WINDOW));
    (
        Sender {
            tx,
            credit: Arc::clone(&credit),
        },
        Receiver { rx, credit },
    )
}

/// A channel already holding `chunks`, with no producer left.
pub(crate) fn ready(chunks: impl IntoIterator<Item = Chunk>) -> Receiver {
    let (tx, rx) = channel();
    for chunk in chunks {
        tx.push(chunk);
    }
    rx
}

/// The producer's end.
#[derive(Debug)]
pub(crate) struct Sender {
    tx: mpsc::UnboundedSender<Chunk>,
    credit: Arc<Semaphore>,
}

impl Sender {
    /// Queues `chunk` at once, whatever the client has taken so far. Dropped if the client is
    /// gone.
    pub(crate) fn push(&self, chunk: Chunk) {
        // A client that went away stops nothing: the capture goes on without it.
        let _ = self.tx.send(chunk);
    }

    /// Queues a data or trailers frame once the client has taken enough of what came before.
    /// Returns `false` if the client is gone.
    pub(crate) async fn send(&self, frame: Frame<Bytes>) -> bool {
        let len = frame.data_ref().map_or(0, Bytes::len).min(WINDOW);
        // At most WINDOW, which fits.
        let credit = u32::try_from(len).unwrap_or(u32::MAX);
        if credit > 0 {
            tokio::select! {
                permit = self.credit.acquire_many(credit) => match permit {
                    Ok(permit) => permit.forget(),
                    Err(_closed) => return false,
                },
                () = self.tx.closed() => return false,
            }
        }
        self.tx.send(Chunk::Frame(frame, credit)).is_ok()
    }
}

/// The client's end.
#[derive(Debug)]
pub(crate) struct Receiver {
    rx: mpsc::UnboundedReceiver<Chunk>,
    credit: Arc<Semaphore>,
}

impl Receiver {
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Chunk>> {
        let chunk = std::task::ready!(self.rx.poll_recv(cx));
        if let Some(Chunk::Frame(_, credit)) = &chunk
            && *credit > 0
        {
            self.credit.add_permits(*credit as usize);
        }
        Poll::Ready(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize) -> Frame<Bytes> {
        Frame::data(Bytes::from(vec![b'x'; len]))
    }

    async fn recv(rx: &mut Receiver) -> Option<Chunk> {
        std::future::poll_fn(|cx| rx.poll_recv(cx)).await
    }

    #[tokio::test]
    async fn pushed_chunks_never_wait_for_the_client() {
        let (tx, mut rx) = channel();
        // Far more than the window, with nobody reading.
        for _ in 0..100 {
            tx.push(Chunk::Frame(data(WINDOW), 0));
        }
        tx.push(Chunk::End);
        let mut frames = 0;
        while let Some(chunk) = recv(&mut rx).await {
            match chunk {
                Chunk::Frame(..) => frames += 1,
                Chunk::End => break,
                Chunk::Error(error) => panic!("unexpected error {error}"),
            }
        }
        assert_eq!(frames, 100);
    }

    #[tokio::test(start_paused = true)]
    async fn sent_frames_wait_until_the_client_took_a_window() {
        let (tx, mut rx) = channel();
        assert!(tx.send(data(WINDOW / 2)).await);
        assert!(tx.send(data(WINDOW / 2)).await);
        // The window is full: the next send waits for the client.
        let third = tokio::time::timeout(std::time::Duration::from_secs(1), tx.send(data(10)));
        assert!(third.await.is_err(), "a third send went past a full window");
        assert!(matches!(recv(&mut rx).await, Some(Chunk::Frame(..))));
        assert!(
            tx.send(data(10)).await,
            "taking a frame gives its credit back"
        );
    }

    #[tokio::test]
    async fn a_send_to_a_client_that_left_returns_false_instead_of_waiting() {
        let (tx, rx) = channel();
        assert!(tx.send(data(WINDOW)).await);
        let blocked = tokio::spawn(async move { tx.send(data(1)).await });
        drop(rx);
        assert!(!blocked.await.unwrap());
    }

    #[tokio::test]
    async fn frames_larger_than_the_window_still_pass() {
        let (tx, mut rx) = channel();
        assert!(tx.send(data(WINDOW * 3)).await);
        assert!(matches!(recv(&mut rx).await, Some(Chunk::Frame(..))));
        assert!(tx.send(data(WINDOW * 3)).await);
    }
}
