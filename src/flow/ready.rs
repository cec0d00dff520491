//! [`Inner`]: the inner service of a protected request, which gives back the readiness
//! `poll_ready` gave it while the request waits for another (the usual clone-and-swap), and
//! takes it again only when its handler is about to run.

use std::task::{Context, Poll, ready};

use tower_service::Service;

/// The inner service of a protected request, and whether it holds readiness.
pub(crate) struct Inner<S> {
    service: S,
    ready: bool,
}

impl<S: Clone> Inner<S> {
    /// `service`, made ready by `poll_ready`.
    pub(crate) fn new(service: S) -> Self {
        Self {
            service,
            ready: true,
        }
    }

    /// Drops the ready service for a clone without its readiness: what a ready service holds
    /// (a `ConcurrencyLimit` permit, a `Buffer` slot) goes back for others to use.
    pub(crate) fn give_back_readiness(&mut self) {
        if self.ready {
            self.service = self.service.clone();
            self.ready = false;
        }
    }

    /// Makes the service ready again if it gave its readiness back.
    pub(crate) fn poll_ready<R>(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>>
    where
        S: Service<R>,
    {
        if !self.ready {
            ready!(self.service.poll_ready(cx))?;
            self.ready = true;
        }
        Poll::Ready(Ok(()))
    }

    /// Calls the ready service.
    pub(crate) fn call<R>(&mut self, request: R) -> S::Future
    where
        S: Service<R>,
    {
        self.ready = false;
        self.service.call(request)
    }
}
