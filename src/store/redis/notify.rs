//! Waking waiters across instances: one pub/sub connection per store, shared by all its
//! waiters, demultiplexed by key in process.
//!
//! The scripts publish a key's digest on the store's channel when a claim that a waiter
//! flagged ends (completed or released). Each store runs one subscriber task that wakes the
//! local waiters of that key. Whenever the subscription is (re)established, every waiter is
//! woken to look again: messages published while it was down are lost, and this is what
//! makes losing them harmless.

use std::{
    collections::HashMap,
    future::poll_fn,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use ::redis::{Client, Value, aio::PubSubStream};
use futures_core::Stream;
use tokio::{sync::Notify, task::JoinHandle};

use crate::key::StorageKey;

/// How long the subscriber waits before connecting again, at first and at most.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(2));
/// How often an idle subscription is checked with a `PING`, so a silently dead connection
/// is noticed and replaced.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// The waiters of one store, and the task that wakes them.
pub(super) struct Notifier {
    clients: Vec<Client>,
    channel: Vec<u8>,
    timeout: Duration,
    waiters: Arc<Waiters>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Notifier {
    /// Subscribes through `clients` (tried in turn: the nodes of a cluster) to `channel`,
    /// each connection attempt bounded by `timeout`. Nothing connects before the first wait.
    pub(super) fn new(clients: Vec<Client>, channel: Vec<u8>, timeout: Duration) -> Self {
        Self {
            clients,
            channel,
            timeout,
            waiters: Arc::default(),
            task: Mutex::default(),
        }
    }

    pub(super) fn clients(&self) -> &[Client] {
        &self.clients
    }

    pub(super) fn channel(&self) -> &[u8] {
        &self.channel
    }

    /// Registers interest in `key`, starting the subscriber if it is not running.
    pub(super) fn watch(&self, key: StorageKey) -> Watch {
        self.ensure_running();
        self.waiters.register(key)
    }

    /// Wakes this store's own waiters on `key` at once, without waiting for the message.
    pub(super) fn wake(&self, key: &StorageKey) {
        self.waiters.wake(key);
    }

    fn ensure_running(&self) {
        let mut task = lock(&self.task);
        // A task ends only with its runtime (tests run one runtime per test): start anew.
        if task.as_ref().is_some_and(|task| !task.is_finished()) || self.clients.is_empty() {
            return;
        }
        *task = Some(tokio::spawn(subscribe(
            self.clients.clone(),
            self.channel.clone(),
            self.timeout,
            Arc::clone(&self.waiters),
        )));
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
    }
}

/// Keeps a subscription to `channel` and wakes the waiters named by its messages, forever.
async fn subscribe(
    clients: Vec<Client>,
    channel: Vec<u8>,
    timeout: Duration,
    waiters: Arc<Waiters>,
) {
    let mut backoff = BACKOFF.0;
    for client in clients.iter().cycle() {
        match connect(client, &channel, timeout).await {
            Ok((sink, stream)) => {
                backoff = BACKOFF.0;
                waiters.wake_all();
                listen(sink, stream, &waiters, timeout).await;
                tracing::debug!("idempotency store: notification subscription lost; resubscribing");
                // A server that keeps closing the connection is not hammered.
                tokio::time::sleep(BACKOFF.0).await;
            }
            Err(error) => {
                tracing::debug!(%error, "idempotency store: subscribing to notifications failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF.1);
            }
        }
    }
}

type Subscription = (::redis::aio::PubSubSink, PubSubStream);

async fn connect(
    client: &Client,
    channel: &[u8],
    timeout: Duration,
) -> Result<Subscription, ::redis::RedisError> {
    let subscribed = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        Ok(pubsub.split())
    };
    tokio::time::timeout(timeout, subscribed)
        .await
        .unwrap_or_else(|_| Err(timed_out()))
}

fn timed_out() -> ::redis::RedisError {
    ::redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "subscribing timed out",
    ))
}

/// Wakes waiters until the connection ends or stops answering pings.
async fn listen(
    mut sink: ::redis::aio::PubSubSink,
    mut stream: PubSubStream,
    waiters: &Waiters,
    timeout: Duration,
) {
    loop {
        let next = poll_fn(|cx| Pin::new(&mut stream).poll_next(cx));
        let message = tokio::select! {
            message = next => message,
            () = tokio::time::sleep(KEEPALIVE) => {
                let ping = tokio::time::timeout(timeout, sink.ping::<Value>()).await;
                if !matches!(ping, Ok(Ok(_))) {
                    return;
                }
                continue;
            }
        };
        let Some(message) = message else { return };
        if let Ok(digest) = <[u8; 32]>::try_from(message.get_payload_bytes()) {
            waiters.wake(&StorageKey::from_bytes(digest));
        }
    }
}

/// The keys that local requests wait on, each with the [`Notify`] its waiters share.
#[derive(Default)]
struct Waiters {
    keys: Mutex<HashMap<StorageKey, Arc<Notify>>>,
    resubscribed: Notify,
}

impl Waiters {
    fn register(self: &Arc<Self>, key: StorageKey) -> Watch {
        let notify = Arc::clone(lock(&self.keys).entry(key).or_default());
        Watch {
            waiters: Arc::clone(self),
            key,
            notify,
        }
    }

    fn wake(&self, key: &StorageKey) {
        if let Some(notify) = lock(&self.keys).get(key) {
            notify.notify_waiters();
        }
    }

    /// Tells every waiter to look again.
    fn wake_all(&self) {
        self.resubscribed.notify_waiters();
    }
}

/// One waiter's interest in a key; dropping it forgets the key once no one else waits.
pub(super) struct Watch {
    waiters: Arc<Waiters>,
    key: StorageKey,
    notify: Arc<Notify>,
}

impl Watch {
    /// Woken when the key's claim is published as ended.
    pub(super) fn ended(&self) -> &Notify {
        &self.notify
    }

    /// Woken when the subscription was (re)established: anything published before may have
    /// been missed, so look again.
    pub(super) fn resubscribed(&self) -> &Notify {
        &self.waiters.resubscribed
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut keys = lock(&self.waiters.keys);
        // Every clone is made under this lock: two references are the map's and ours.
        if keys.get(&self.key).is_some_and(|notify| {
            Arc::ptr_eq(notify, &self.notify) && Arc::strong_count(notify) == 2
        }) {
            keys.remove(&self.key);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics under these locks; the data stays consistent regardless.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
