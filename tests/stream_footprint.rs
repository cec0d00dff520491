//! What a streamed response holds for a client that does not read it: the captured bytes
//! (bounded by the capture limit), not a queue entry per frame; past the limit, a window,
//! where empty frames count too, after which the handler's body waits. Measured by a
//! counting allocator.
//!
//! Its own test binary: the global allocator counts every allocation of the process, so the
//! shapes run one after the other in one test.

mod common;

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::StatusCode;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tower_idempotency::{IdempotencyLayer, MemoryStore, ProblemKind};

use common::service::{BodyError, Handler, eventually, keyed_post, respond, send, send_raw, serve};

#[path = "common/counting_alloc.rs"]
mod counting_alloc;

use counting_alloc::live;

/// A handler's body: `frames` frames of `len` bytes each (each one a fresh allocation, as a
/// handler formatting events makes them), then `empty` empty frames, returning `Pending`
/// (woken at once) every 64 frames, as a body produced on the fly does. Counts the frames it
/// produced.
struct Generated {
    frames: usize,
    len: usize,
    empty: usize,
    produced: Arc<AtomicUsize>,
    since_pending: u32,
}

impl Body for Generated {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.since_pending == 64 {
            self.since_pending = 0;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.since_pending += 1;
        let n = self.produced.load(Ordering::Relaxed);
        let data = if n < self.frames {
            Bytes::from(vec![b'x'; self.len])
        } else if n < self.frames + self.empty {
            Bytes::new()
        } else {
            return Poll::Ready(None);
        };
        self.produced.fetch_add(1, Ordering::Relaxed);
        Poll::Ready(Some(Ok(Frame::data(data))))
    }
}

struct Shape {
    what: &'static str,
    frames: usize,
    len: usize,
    empty: usize,
    limit: usize,
}

/// Sends one request whose response has `shape`, reads nothing of its body, and returns the
/// bytes held once the handler's body ended or stopped being read, and the frames it produced.
async fn held_for_an_unread_client(shape: &Shape) -> (isize, usize, MemoryStore) {
    let produced = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&produced);
    let (frames, len, empty) = (shape.frames, shape.len, shape.empty);
    let handler = Handler::new(move |_request| {
        let produced = Arc::clone(&counter);
        async move {
            let body = Generated {
                frames,
                len,
                empty,
                produced,
                since_pending: 0,
            };
            respond(StatusCode::OK, body.boxed_unsync())
        }
    });
    let store = MemoryStore::default();
    let layer = IdempotencyLayer::new(store.clone()).with_response_body_limit(shape.limit);
    let svc = serve(&layer, &handler);
    // What the shape before left behind (its tasks ending) is freed first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = live();
    let unread = send_raw(&svc, keyed_post("/events", "k", "{}")).await;
    assert_eq!(unread.status(), StatusCode::OK);
    // Until the handler's body ended, or has not moved for a while (it waits for the client).
    let mut last = usize::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = produced.load(Ordering::Relaxed);
        if now == frames + empty || now == last {
            break;
        }
        last = now;
    }
    let held = live() - before;
    drop(unread);
    (held, produced.load(Ordering::Relaxed), store)
}

#[tokio::test(flavor = "current_thread")]
async fn an_unread_stream_holds_about_its_captured_bytes_whatever_its_frames() {
    const MIB: usize = 1024 * 1024;
    const WINDOW_FRAMES: usize = 512;
    let within = [
        Shape {
            what: "500 000 one-byte frames",
            frames: 500_000,
            len: 1,
            empty: 0,
            limit: MIB,
        },
        Shape {
            what: "300 000 empty frames",
            frames: 1,
            len: 1,
            empty: 300_000,
            limit: MIB,
        },
    ];
    // Every shape is run and reported before the test fails.
    let mut off = Vec::new();
    for shape in &within {
        let (held, produced, store) = held_for_an_unread_client(shape).await;
        let data = shape.frames * shape.len;
        let seen = format!("{}: {held} B held for {data} B of data", shape.what);
        println!("{seen}");
        // The captured bytes, what a growing buffer reserves beyond them, and the record.
        if held > (3 * data + 256 * 1024) as isize {
            off.push(seen);
        }
        assert_eq!(
            produced,
            shape.frames + shape.empty,
            "{}: read whole",
            shape.what
        );
        eventually("the record is stored", || store.record_count() == 1).await;
    }

    let past = [
        Shape {
            what: "one-byte frames past a 64 KiB limit",
            frames: 1_000_000,
            len: 1,
            empty: 0,
            limit: 64 * 1024,
        },
        Shape {
            what: "empty frames past a 64 KiB limit",
            frames: 64 * 1024 + 1,
            len: 1,
            empty: 1_000_000,
            limit: 64 * 1024,
        },
    ];
    for shape in &past {
        let (held, produced, store) = held_for_an_unread_client(shape).await;
        let seen = format!("{}: {held} B held, {produced} frames produced", shape.what);
        println!("{seen}");
        // The handler's body waits for the client once the window is spent.
        if produced > shape.limit + 1 + WINDOW_FRAMES + 64
            || held > (3 * shape.limit + 256 * 1024) as isize
        {
            off.push(seen);
        }
        eventually("the key is spent", || store.record_count() == 1).await;
        let layer = IdempotencyLayer::new(store);
        let retry = send(
            &serve(&layer, &Handler::counting()),
            keyed_post("/events", "k", "{}"),
        )
        .await;
        retry.assert_problem(ProblemKind::NotReplayable, StatusCode::CONFLICT);
    }
    assert!(off.is_empty(), "{off:#?}");
}
