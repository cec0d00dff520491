//! Work the layer finishes in the background (a streamed response's capture, a claim given
//! back or stored after its request ended): the one way it is started.

use std::future::Future;

use tracing::Instrument;

/// Runs `work` on the current tokio runtime, in the current span, and says whether it
/// started. Without a runtime (the service polled by another executor, or a runtime that
/// is gone) the work is dropped, never a panic: a claim it held frees itself when its lease
/// ends.
pub(crate) fn spawn(work: impl Future<Output = ()> + Send + 'static) -> bool {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(work.in_current_span());
            true
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };

    use super::*;

    #[test]
    fn without_a_runtime_the_work_is_dropped_instead_of_panicking() {
        let ran = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&ran);
        assert!(!spawn(async move { flag.store(true, Ordering::SeqCst) }));
        assert!(!ran.load(Ordering::SeqCst));
        assert_eq!(Arc::strong_count(&ran), 1, "the work was dropped");
    }

    #[tokio::test]
    async fn on_a_runtime_the_work_runs() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        assert!(spawn(async move {
            let _ = tx.send(());
        }));
        rx.await.expect("the spawned work ran");
    }
}
