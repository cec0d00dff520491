//! [`ResponseFuture`]: the future [`Idempotency`](crate::Idempotency) returns, and the flow
//! of one protected request ([`machine`](super::machine)), as a state machine.
//!
//! Requests the layer lets through poll the inner future in place; a protected request is a
//! boxed [`Flow`](super::machine::Flow), which [`ResponseFuture`] polls and, if its client
//! goes away, hands on to finish what must not be cut short.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use http::Response;
use pin_project_lite::pin_project;

use crate::flow::body::ResponseBody;

/// What a protected request answers.
pub(crate) type Output<B, E> = Result<Response<ResponseBody<B>>, E>;

pin_project! {
    /// The response future of [`Idempotency`](crate::Idempotency).
    ///
    /// Requests the layer lets through poll the inner future in place (no allocation); a
    /// response the layer knows at once is ready in place; a protected request runs as one
    /// boxed state machine.
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
        Protected { work: Detached<B, E> },
        Refused { drain: Pin<Box<dyn Future<Output = Response<ResponseBody<B>>> + Send>> },
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

    pub(crate) fn protected(flow: Pin<Box<dyn Work<B, E>>>) -> Self {
        Self {
            kind: Kind::Protected {
                work: Detached(Some(flow)),
            },
        }
    }

    /// A refusal answered once the request body is drained (see `service::refuse`).
    pub(crate) fn refused(
        drain: Pin<Box<dyn Future<Output = Response<ResponseBody<B>>> + Send>>,
    ) -> Self {
        Self {
            kind: Kind::Refused { drain },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Output<B, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::PassThrough { future } => {
                let response = ready!(future.poll(cx))?;
                Poll::Ready(Ok(response.map(ResponseBody::inner)))
            }
            KindProj::Ready { response } => Poll::Ready(Ok(response
                .take()
                .expect("ResponseFuture polled after completion"))),
            KindProj::Protected { work } => work.poll(cx),
            KindProj::Refused { drain } => drain.as_mut().poll(cx).map(Ok),
        }
    }
}

/// A protected request's flow, seen from [`ResponseFuture`]: polled, or left behind by a
/// client that went away.
pub(crate) trait Work<B, E>: Send {
    fn poll_work(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Output<B, E>>;

    /// The client went away: what must not be cut short finishes in a task of its own.
    fn client_gone(self: Pin<Box<Self>>);
}

/// The flow of a protected request, handed to [`Work::client_gone`] if dropped unfinished.
struct Detached<B, E>(Option<Pin<Box<dyn Work<B, E>>>>);

impl<B, E> Detached<B, E> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Output<B, E>> {
        let work = self
            .0
            .as_mut()
            .expect("ResponseFuture polled after completion");
        let output = ready!(work.as_mut().poll_work(cx));
        self.0 = None;
        Poll::Ready(output)
    }
}

impl<B, E> Drop for Detached<B, E> {
    fn drop(&mut self) {
        if let Some(work) = self.0.take() {
            work.client_gone();
        }
    }
}

impl<F, B, E> fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::PassThrough { .. } => "PassThrough",
            Kind::Ready { .. } => "Ready",
            Kind::Protected { .. } => "Protected",
            Kind::Refused { .. } => "Refused",
        };
        f.debug_tuple("ResponseFuture").field(&kind).finish()
    }
}
