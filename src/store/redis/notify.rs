//! Waking waiters across instances: one pub/sub connection per store, shared by all its
//! waiters, demultiplexed by key in process.
//!
//! The scripts publish a key's digest on the store's channel when a claim that a waiter
//! flagged ends (completed, released or broken). Each store runs one subscriber task that
//! wakes the local waiters of that key. Whenever the subscription is (re)established, every
//! waiter is woken to look again: messages published while it was down are lost, and this is
//! what makes losing them harmless.
//!
//! A waiter registers ([`Notifier::watch`]) before the claim it waits on is flagged, and
//! counts what it was told since it last looked, so nothing published in between is missed:
//! a claim that finds the key in flight registers, then flags the claim with the script that
//! judges it, and leaves the registration to the wait that follows
//! ([`Notifier::flagged`], [`Notifier::take_flagged`]), which then needs no round trip of its
//! own.

use std::{
    collections::{HashMap, VecDeque},
    future::poll_fn,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use ::redis::{Client, Value, aio::PubSubStream};
use futures_core::Stream;
use tokio::{sync::Notify, task::JoinHandle, time::Instant};

use super::resolver::Resolver;
use crate::key::StorageKey;

/// How long the subscriber waits before connecting again, at first and at most.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(2));
/// How often an idle subscription is checked with a `PING`, so a silently dead connection
/// is noticed and replaced.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// How many keys may hold flagged claims that no wait has taken yet (a claim finds the key in
/// flight, then its request is refused instead of waiting) before the stale ones are dropped.
const MAX_FLAGGED_KEYS: usize = 1024;
/// How many flagged claims one key may hold for waits to take; the oldest go first.
const MAX_FLAGGED_PER_KEY: usize = 1024;

/// Where the subscriber connects.
#[derive(Clone)]
pub(super) enum Subscribers {
    /// These nodes, tried in turn: one server, or some nodes of a cluster.
    Nodes(Vec<Client>),
    /// The primary that Sentinel names at each attempt, so that the subscription follows a
    /// failover.
    Sentinel(Arc<Resolver>),
}

impl Subscribers {
    /// The client of the `attempt`th subscription attempt.
    async fn client(&self, attempt: usize) -> Result<Client, ::redis::RedisError> {
        match self {
            Self::Nodes(clients) => clients
                .get(attempt % clients.len().max(1))
                .cloned()
                .ok_or_else(|| {
                    ::redis::RedisError::from((
                        ::redis::ErrorKind::InvalidClientConfig,
                        "no node to subscribe to",
                    ))
                }),
            Self::Sentinel(resolver) => resolver.primary().await,
        }
    }

    fn is_empty(&self) -> bool {
        matches!(self, Self::Nodes(clients) if clients.is_empty())
    }
}

/// The waiters of one store, and the task that wakes them.
pub(super) struct Notifier {
    clients: Subscribers,
    channel: Vec<u8>,
    timeout: Duration,
    /// How long what a look learnt stays fresh: the store's poll interval.
    fresh_for: Duration,
    waiters: Arc<Waiters>,
    task: Mutex<Option<JoinHandle<()>>>,
    /// Claims found in flight and flagged by this store, for the waits that follow.
    flagged: Mutex<HashMap<StorageKey, VecDeque<Flagged>>>,
}

/// A claim that this store found in flight and flagged, with the registration made before
/// it was flagged: what the wait that follows needs, so as not to look again at once.
pub(super) struct Flagged {
    /// Registered before the claim was flagged.
    pub(super) watch: Watch,
    /// When the claim was judged live.
    pub(super) looked_at: Instant,
    /// What was left of its lease then.
    pub(super) lease_left: Duration,
}

impl Notifier {
    /// Subscribes through `clients` (nodes tried in turn, or Sentinel's primary) to `channel`,
    /// each connection attempt bounded by `timeout`. Nothing connects before the first claim
    /// found in flight or the first wait. What a look learnt is kept for `fresh_for`.
    pub(super) fn new(
        clients: Subscribers,
        channel: Vec<u8>,
        timeout: Duration,
        fresh_for: Duration,
    ) -> Self {
        Self {
            clients,
            channel,
            timeout,
            fresh_for,
            waiters: Arc::default(),
            task: Mutex::default(),
            flagged: Mutex::default(),
        }
    }

    /// The nodes it subscribes through (none with Sentinel).
    pub(super) fn clients(&self) -> &[Client] {
        match &self.clients {
            Subscribers::Nodes(clients) => clients,
            Subscribers::Sentinel(_) => &[],
        }
    }

    /// Where it subscribes.
    pub(super) fn subscribers(&self) -> &Subscribers {
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

    /// Keeps `watch`, registered before its key's claim was flagged and judged live with
    /// `lease_left` to go, for the wait that follows ([`take_flagged`](Self::take_flagged)).
    /// Claims that no wait takes (their request was refused) are dropped once stale.
    pub(super) fn flagged(&self, watch: Watch, lease_left: Duration) {
        let now = Instant::now();
        let fresh = |flagged: &Flagged| now.duration_since(flagged.looked_at) < self.fresh_for;
        let mut keys = lock(&self.flagged);
        if keys.len() >= MAX_FLAGGED_KEYS && !keys.contains_key(&watch.key) {
            keys.retain(|_, claims| {
                claims.retain(fresh);
                !claims.is_empty()
            });
            // All fresh: forget them rather than scan this many again at the next claim.
            // Their waits look for themselves, as they would without.
            if keys.len() >= MAX_FLAGGED_KEYS / 2 {
                keys.clear();
            }
        }
        let claims = keys.entry(watch.key).or_default();
        while claims.front().is_some_and(|oldest| !fresh(oldest))
            || claims.len() >= MAX_FLAGGED_PER_KEY
        {
            claims.pop_front();
        }
        claims.push_back(Flagged {
            watch,
            looked_at: now,
            lease_left,
        });
    }

    /// The oldest claim on `key` flagged by this store and not yet taken, if any. The oldest:
    /// its registration is the earliest, so it has missed nothing any later one saw.
    pub(super) fn take_flagged(&self, key: &StorageKey) -> Option<Flagged> {
        let mut keys = lock(&self.flagged);
        let claims = keys.get_mut(key)?;
        let oldest = claims.pop_front();
        if claims.is_empty() {
            keys.remove(key);
        }
        oldest
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
    clients: Subscribers,
    channel: Vec<u8>,
    timeout: Duration,
    waiters: Arc<Waiters>,
) {
    let mut backoff = BACKOFF.0;
    for attempt in 0.. {
        let subscribed = async {
            let client = clients.client(attempt).await?;
            connect(&client, &channel, timeout).await
        };
        match subscribed.await {
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

/// The keys that local requests wait on, each with what its waiters share.
#[derive(Default)]
struct Waiters {
    keys: Mutex<HashMap<StorageKey, Arc<KeyWaiters>>>,
    resubscribed: Notify,
    /// How many times the subscription was (re)established.
    subscriptions: AtomicU64,
}

/// What the waiters of one key share: how many ends of its claims were published (counted
/// from their registration on), and the [`Notify`] that tells them.
#[derive(Default)]
struct KeyWaiters {
    ends: AtomicU64,
    notify: Notify,
}

impl Waiters {
    fn register(self: &Arc<Self>, key: StorageKey) -> Watch {
        let state = Arc::clone(lock(&self.keys).entry(key).or_default());
        Watch {
            ends: state.ends.load(Ordering::SeqCst),
            subscriptions: self.subscriptions.load(Ordering::SeqCst),
            waiters: Arc::clone(self),
            key,
            state,
        }
    }

    fn wake(&self, key: &StorageKey) {
        if let Some(state) = lock(&self.keys).get(key) {
            // Counted before the notification: a waiter that checks the count after arming
            // itself misses neither.
            state.ends.fetch_add(1, Ordering::SeqCst);
            state.notify.notify_waiters();
        }
    }

    /// Tells every waiter to look again.
    fn wake_all(&self) {
        self.subscriptions.fetch_add(1, Ordering::SeqCst);
        self.resubscribed.notify_waiters();
    }
}

/// One waiter's interest in a key, and what it had been told when it last looked; dropping it
/// forgets the key once no one else waits.
pub(super) struct Watch {
    waiters: Arc<Waiters>,
    key: StorageKey,
    state: Arc<KeyWaiters>,
    /// `state.ends` as of the last look.
    ends: u64,
    /// `waiters.subscriptions` as of the last look.
    subscriptions: u64,
}

impl Watch {
    /// Takes note of what was published so far: called just before looking at the key, so
    /// that whatever is published after the look is news.
    pub(super) fn looking(&mut self) {
        self.ends = self.state.ends.load(Ordering::SeqCst);
        self.subscriptions = self.waiters.subscriptions.load(Ordering::SeqCst);
    }

    /// Whether the key's claim was published as ended since the last look.
    pub(super) fn ended(&self) -> bool {
        self.state.ends.load(Ordering::SeqCst) != self.ends
    }

    /// Whether the subscription was (re)established since the last look: anything published
    /// before may have been missed, so look again.
    pub(super) fn resubscribed(&self) -> bool {
        self.waiters.subscriptions.load(Ordering::SeqCst) != self.subscriptions
    }

    /// Returns once the key's claim was published as ended or the subscription was
    /// (re)established since the last look: at once if that has happened already.
    pub(super) async fn news(&self) {
        let ended = self.state.notify.notified();
        let resubscribed = self.waiters.resubscribed.notified();
        tokio::pin!(ended, resubscribed);
        // Armed before the counts are read: news after the reading wakes them.
        ended.as_mut().enable();
        resubscribed.as_mut().enable();
        if self.ended() || self.resubscribed() {
            return;
        }
        tokio::select! {
            () = ended => {}
            () = resubscribed => {}
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut keys = lock(&self.waiters.keys);
        // Every clone is made under this lock: two references are the map's and ours.
        if keys
            .get(&self.key)
            .is_some_and(|state| Arc::ptr_eq(state, &self.state) && Arc::strong_count(state) == 2)
        {
            keys.remove(&self.key);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics under these locks; the data stays consistent regardless.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A notifier with no server: nothing subscribes, the bookkeeping is all there is.
    fn notifier() -> Notifier {
        Notifier::new(
            Subscribers::Nodes(Vec::new()),
            b"test:notifications".to_vec(),
            Duration::from_secs(1),
            Duration::from_secs(1),
        )
    }

    fn key(n: u8) -> StorageKey {
        StorageKey::from_bytes([n; 32])
    }

    fn registered(notifier: &Notifier) -> usize {
        lock(&notifier.waiters.keys).len()
    }

    #[test]
    fn a_watch_hears_of_ends_and_resubscriptions_since_it_last_looked() {
        let notifier = notifier();
        let mut watch = notifier.watch(key(1));
        assert!(!watch.ended() && !watch.resubscribed());

        notifier.wake(&key(2));
        assert!(!watch.ended(), "another key's end is not news");
        notifier.wake(&key(1));
        assert!(watch.ended());
        let late = notifier.watch(key(1));
        assert!(!late.ended(), "an end before registering is not news");

        watch.looking();
        assert!(!watch.ended(), "a look takes note of what was told");
        notifier.waiters.wake_all();
        assert!(watch.resubscribed() && late.resubscribed());
        watch.looking();
        assert!(!watch.resubscribed());
    }

    #[tokio::test]
    async fn news_comes_at_once_when_already_told_and_later_when_told() {
        let notifier = notifier();
        let watch = notifier.watch(key(1));
        notifier.wake(&key(1));
        within(watch.news()).await;

        let mut watch = notifier.watch(key(1));
        watch.looking();
        let listening = async {
            watch.news().await;
            watch.ended()
        };
        let told = async {
            tokio::task::yield_now().await;
            notifier.wake(&key(1));
        };
        let (ended, ()) = within(async { tokio::join!(listening, told) }).await;
        assert!(ended);
        assert!(
            tokio::time::timeout(Duration::from_millis(20), notifier.watch(key(1)).news())
                .await
                .is_err(),
            "no news, no return"
        );
    }

    async fn within<F: std::future::Future>(future: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(5), future)
            .await
            .expect("in time")
    }

    #[tokio::test(start_paused = true)]
    async fn flagged_claims_go_to_waits_oldest_first_and_stale_ones_are_dropped() {
        let notifier = notifier();
        let lease = Duration::from_secs(30);
        notifier.flagged(notifier.watch(key(1)), lease);
        let first = Instant::now();
        tokio::time::advance(Duration::from_millis(10)).await;
        notifier.flagged(notifier.watch(key(1)), lease / 2);
        let taken = notifier.take_flagged(&key(1));
        assert_eq!(taken.as_ref().map(|f| f.looked_at), Some(first));
        assert_eq!(
            notifier.take_flagged(&key(1)).map(|f| f.lease_left),
            Some(lease / 2)
        );
        assert!(notifier.take_flagged(&key(1)).is_none());
        assert!(lock(&notifier.flagged).is_empty());

        // A flagged claim no wait took is dropped once stale, with its registration.
        drop(taken);
        notifier.flagged(notifier.watch(key(2)), lease);
        tokio::time::advance(Duration::from_secs(2)).await;
        notifier.flagged(notifier.watch(key(2)), lease);
        assert_eq!(
            lock(&notifier.flagged).get(&key(2)).map(VecDeque::len),
            Some(1)
        );
        assert_eq!(registered(&notifier), 1);
        drop(notifier.take_flagged(&key(2)));
        assert_eq!(registered(&notifier), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn flagged_claims_are_bounded_however_many_are_left_untaken() {
        let notifier = notifier();
        let lease = Duration::from_secs(30);
        for _ in 0..MAX_FLAGGED_PER_KEY + 10 {
            notifier.flagged(notifier.watch(key(1)), lease);
        }
        assert_eq!(
            lock(&notifier.flagged).get(&key(1)).map(VecDeque::len),
            Some(MAX_FLAGGED_PER_KEY)
        );
        let mut n = 0u32;
        let mut next_key = || {
            n += 1;
            let mut bytes = [0; 32];
            bytes[..4].copy_from_slice(&n.to_be_bytes());
            StorageKey::from_bytes(bytes)
        };
        for _ in 0..MAX_FLAGGED_KEYS * 3 {
            let key = next_key();
            notifier.flagged(notifier.watch(key), lease);
        }
        assert!(lock(&notifier.flagged).len() <= MAX_FLAGGED_KEYS);
        tokio::time::advance(Duration::from_secs(2)).await;
        for _ in 0..MAX_FLAGGED_KEYS {
            let key = next_key();
            notifier.flagged(notifier.watch(key), lease);
        }
        assert!(
            lock(&notifier.flagged).len() <= MAX_FLAGGED_KEYS,
            "stale ones were dropped"
        );
        assert_eq!(registered(&notifier), lock(&notifier.flagged).len());
    }
}
