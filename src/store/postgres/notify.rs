//! Waking waiting duplicates: one `LISTEN` connection per store, shared by all its waiters.
//!
//! Completing, releasing or breaking a claim sends `NOTIFY` on the table's channel with the
//! key in hex, in the same statement (and so, in the handler's transaction, only once it
//! commits). The listener wakes the waiters of that key. Waiters on the instance that ended
//! the claim are also woken at once, without the message.
//!
//! A notification can be lost while the listener reconnects; once it listens again, it
//! announces it (an epoch), and every waiter looks at its claim again. A waiter also looks when the claim's
//! lease runs out and after a bounded poll interval.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use sqlx::{PgPool, postgres::PgListener};
use tokio::sync::{Notify, watch};

use crate::key::StorageKey;

/// The pause before the listener tries again after failing to connect; it doubles up to
/// [`RECONNECT_MAX`].
const RECONNECT_FIRST: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_millis(500);

/// The waiters of one store, by key.
#[derive(Default)]
struct Waiters {
    keys: Mutex<HashMap<StorageKey, (Arc<Notify>, usize)>>,
}

impl Waiters {
    fn wake(&self, key: &StorageKey) {
        let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((notify, _)) = keys.get(key) {
            notify.notify_waiters();
        }
    }
}

pub(super) struct Notifier {
    pool: PgPool,
    channel: String,
    connect_timeout: Duration,
    waiters: Arc<Waiters>,
    /// Bumped each time the listener is (re-)established; `0` until the first time.
    epoch: watch::Sender<u64>,
    listener: Mutex<Option<tokio::task::AbortHandle>>,
}

/// A waiter's registration for one key's end; removed when dropped.
pub(super) struct Watch {
    waiters: Arc<Waiters>,
    key: StorageKey,
    pub(super) notify: Arc<Notify>,
    /// Changes when the listener is (re-)established: ends of claims may have been missed.
    pub(super) epoch: watch::Receiver<u64>,
}

impl Notifier {
    pub(super) fn new(pool: PgPool, channel: String, connect_timeout: Duration) -> Self {
        Self {
            pool,
            channel,
            connect_timeout,
            waiters: Arc::default(),
            epoch: watch::Sender::new(0),
            listener: Mutex::new(None),
        }
    }

    /// Registers for the end of `key`'s claim, starting the listener if it is not running, and
    /// waiting (at most `bound`) until it listens, so that an end notified from now on is
    /// not missed.
    pub(super) async fn watch(&self, key: StorageKey, bound: Duration) -> Watch {
        self.start();
        let notify = {
            let mut keys = self
                .waiters
                .keys
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let entry = keys.entry(key).or_insert_with(|| (Arc::default(), 0));
            entry.1 += 1;
            Arc::clone(&entry.0)
        };
        let mut epoch = self.epoch.subscribe();
        // Not listening yet: the first wait of this store waits for the listener (bounded;
        // the poll covers a listener that cannot connect).
        let _ = tokio::time::timeout(bound, epoch.wait_for(|epoch| *epoch > 0)).await;
        epoch.mark_unchanged();
        Watch {
            waiters: Arc::clone(&self.waiters),
            key,
            notify,
            epoch,
        }
    }

    /// Wakes this process's waiters of `key` (its claim ended here).
    pub(super) fn wake(&self, key: &StorageKey) {
        self.waiters.wake(key);
    }

    fn start(&self) {
        let mut listener = self.listener.lock().unwrap_or_else(PoisonError::into_inner);
        if listener.is_some() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let task = listen(
            self.pool.clone(),
            self.channel.clone(),
            self.connect_timeout,
            Arc::clone(&self.waiters),
            self.epoch.clone(),
        );
        *listener = Some(runtime.spawn(task).abort_handle());
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        if let Some(listener) = self
            .listener
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            listener.abort();
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut keys = self
            .waiters
            .keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = keys.get_mut(&self.key) {
            entry.1 -= 1;
            if entry.1 == 0 {
                keys.remove(&self.key);
            }
        }
    }
}

/// The listener: connects, listens, wakes the waiters of each key notified; on a lost
/// connection, connects again and announces it (waiters look again: messages may have been
/// lost meanwhile).
async fn listen(
    pool: PgPool,
    channel: String,
    connect_timeout: Duration,
    waiters: Arc<Waiters>,
    epoch: watch::Sender<u64>,
) {
    let mut pause = RECONNECT_FIRST;
    loop {
        let connecting = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(&channel).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = match tokio::time::timeout(connect_timeout, connecting).await {
            Ok(Ok(listener)) => listener,
            Ok(Err(error)) => {
                tracing::debug!(%error, "the idempotency listener could not connect");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RECONNECT_MAX);
                continue;
            }
            Err(_) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RECONNECT_MAX);
                continue;
            }
        };
        pause = RECONNECT_FIRST;
        // Ends of claims missed while the listener was away: waiters look again.
        epoch.send_modify(|epoch| *epoch += 1);
        // `try_recv` reports a lost connection as `Ok(None)`; the loop then connects anew.
        while let Ok(Some(notification)) = listener.try_recv().await {
            if let Some(key) = StorageKey::from_hex(notification.payload()) {
                waiters.wake(&key);
            }
        }
        tracing::debug!("the idempotency listener lost its connection; reconnecting");
    }
}
