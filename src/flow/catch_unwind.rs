//! [`CatchUnwind`]: a handler's panic becomes a value, so it costs the request a 500 problem
//! and a released key rather than the whole connection.

use std::{
    any::Any,
    future::Future,
    panic::{AssertUnwindSafe, catch_unwind},
    pin::Pin,
    task::{Context, Poll},
};

use pin_project_lite::pin_project;

/// What a panic left behind.
pub(crate) type Panic = Box<dyn Any + Send>;

pin_project! {
    /// Catches a panic while polling `future`.
    pub(crate) struct CatchUnwind<F> {
        #[pin]
        future: F,
    }
}

impl<F> CatchUnwind<F> {
    pub(crate) fn new(future: F) -> Self {
        Self { future }
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Panic>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let future = self.project().future;
        // After a panic the future is dropped unpolled, which is all unwind safety asks.
        match catch_unwind(AssertUnwindSafe(|| future.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// Runs `work`, catching a panic.
pub(crate) fn catching<T>(work: impl FnOnce() -> T) -> Result<T, Panic> {
    catch_unwind(AssertUnwindSafe(work))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_while_polling_is_caught_and_an_output_passes() {
        let ok = CatchUnwind::new(async { 7 }).await;
        assert_eq!(ok.ok(), Some(7));
        let panicked = CatchUnwind::new(async {
            if true {
                panic!("expected in this test");
            }
        })
        .await;
        let message = panicked
            .err()
            .and_then(|p| p.downcast_ref::<&str>().copied());
        assert_eq!(message, Some("expected in this test"));
    }
}
