//! [`ResponseFuture`]: the future [`Idempotency`](crate::Idempotency) returns.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    task::{Context, Poll, ready},
};

use http::Response;
use pin_project_lite::pin_project;

use crate::body::ResponseBody;

type Protected<B, E> = Pin<Box<dyn Future<Output = Result<Response<ResponseBody<B>>, E>> + Send>>;

pin_project! {
    /// The response future of [`Idempotency`](crate::Idempotency).
    ///
    /// Requests the layer lets through poll the inner future in place (no allocation); a
    /// response the layer knows at once is ready in place; a protected request runs as one
    /// boxed future.
    ///
    /// Dropping this future (the client went away) does not cancel a protected request once
    /// it has sent its claim: its unfinished work moves to a task of its own, so a handler
    /// that started finishes and its response is stored for the retry, and a claim on its way
    /// to the store is never left behind (the handler of a claim that comes back after the
    /// client left is not started: the key is released). Before that, and while it waits for
    /// another request with its key, a dropped request simply ends.
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        PassThrough { #[pin] future: F },
        Ready { response: Option<Response<ResponseBody<B>>> },
        Protected { future: FinishOnDrop<B, E> },
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    pub(crate) fn pass_through(future: F) -> Self {
        Self {
            kind: Kind::PassThrough { future },
        }
    }

    pub(crate) fn ready(response: Response<ResponseBody<B>>) -> Self {
        Self {
            kind: Kind::Ready {
                response: Some(response),
            },
        }
    }

    pub(crate) fn protected(future: Protected<B, E>, detach: Arc<Detach>) -> Self
    where
        B: 'static,
        E: 'static,
    {
        Self {
            kind: Kind::Protected {
                future: FinishOnDrop {
                    future: Some(future),
                    detach,
                    finish: finish_in_task::<B, E>,
                },
            },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::PassThrough { future } => {
                let response = ready!(future.poll(cx))?;
                Poll::Ready(Ok(response.map(ResponseBody::inner)))
            }
            KindProj::Ready { response } => Poll::Ready(Ok(response
                .take()
                .expect("ResponseFuture polled after completion"))),
            KindProj::Protected { future } => future.poll(cx),
        }
    }
}

/// Whether a protected request's work must outlive its client: set by the work while it has
/// a claim on its way or a handler running, read when the client goes away.
#[derive(Debug, Default)]
pub(crate) struct Detach(AtomicU8);

/// The work must finish if the client goes away.
const FINISH: u8 = 1;
/// The client went away.
const GONE: u8 = 2;

impl Detach {
    /// From now on, a client that goes away leaves the work to finish (`true`) or ends it.
    pub(crate) fn finish_on_drop(&self, finish: bool) {
        if finish {
            self.0.fetch_or(FINISH, Ordering::AcqRel);
        } else {
            self.0.fetch_and(!FINISH, Ordering::AcqRel);
        }
    }

    /// Whether the client went away: work finishing on its own starts nothing new for it.
    pub(crate) fn client_gone(&self) -> bool {
        self.0.load(Ordering::Acquire) & GONE != 0
    }

    /// Marks the client gone; returns whether the work must finish.
    fn leave(&self) -> bool {
        self.0.fetch_or(GONE, Ordering::AcqRel) & FINISH != 0
    }
}

/// A protected request's future, finished in a task of its own if dropped before the end
/// while its [`Detach`] says so.
struct FinishOnDrop<B, E> {
    future: Option<Protected<B, E>>,
    detach: Arc<Detach>,
    // Made where `B` and `E` are known to be `'static`, which a `Drop` impl cannot require.
    finish: fn(Protected<B, E>),
}

impl<B, E> FinishOnDrop<B, E> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<Response<ResponseBody<B>>, E>> {
        let future = self
            .future
            .as_mut()
            .expect("ResponseFuture polled after completion");
        let output = ready!(future.as_mut().poll(cx));
        self.future = None;
        Poll::Ready(output)
    }
}

impl<B, E> Drop for FinishOnDrop<B, E> {
    fn drop(&mut self) {
        if let Some(future) = self.future.take()
            && self.detach.leave()
        {
            (self.finish)(future);
        }
    }
}

fn finish_in_task<B: 'static, E: 'static>(future: Protected<B, E>) {
    // Without a runtime (it is shutting down) the work is dropped; a claim it held frees
    // itself when its lease ends.
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            let _ = future.await;
        });
    }
}

impl<F, B, E> fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::PassThrough { .. } => "PassThrough",
            Kind::Ready { .. } => "Ready",
            Kind::Protected { .. } => "Protected",
        };
        f.debug_tuple("ResponseFuture").field(&kind).finish()
    }
}
