//! [`RedisStore`] itself and making one: connecting, its settings, and bounding each exchange
//! with Redis.

use std::{fmt, sync::Arc, time::Duration};

use ::redis::{
    Client, RedisError,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
};

use super::{
    durability::{Durability, Replicas},
    error::{store_error, timed_out},
    key::{RedisKey, spell, spell_string},
    lanes::{Lanes, Opener},
    notify::{Notifier, Subscribers},
};
use crate::{
    key::StorageKey, layer::config::MAX_TTL, observe::ShortfallCounter, store::error::StoreError,
};

/// The default key prefix: `idempotency:`.
pub const DEFAULT_PREFIX: &str = "idempotency:";
/// The default bound on each command: 1 s.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);
/// The default bound on waiting for a notification before looking again: 1 s.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How long a claim whose lease ended without completion is kept, by default, to be reported
/// as abandoned: 24 h.
pub const DEFAULT_ABANDONED_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

/// What the clones of one store share.
pub(super) struct Shared {
    pub(super) settings: Settings,
    pub(super) notifier: Notifier,
    pub(super) shortfalls: ShortfallCounter,
    pub(super) replicas: Replicas,
}

#[derive(Clone)]
pub(super) struct Settings {
    pub(super) prefix: String,
    pub(super) response_timeout: Duration,
    pub(super) poll_interval: Duration,
    pub(super) abandoned_retention: Duration,
    pub(super) durability: Durability,
}

impl Shared {
    fn new(settings: Settings, clients: Subscribers) -> Self {
        let mut channel = settings.prefix.clone().into_bytes();
        channel.extend_from_slice(b"notifications");
        Self {
            notifier: Notifier::new(
                clients,
                channel,
                settings.response_timeout,
                settings.poll_interval,
            ),
            settings,
            shortfalls: ShortfallCounter::new("redis"),
            replicas: Replicas::default(),
        }
    }
}

/// A store in Redis, shared by every instance of a service: a request executes once across
/// all of them, and a retry sent to any instance is replayed.
///
/// - **One round trip** to claim-or-replay (a native `SET … NX GET`) and one to complete
///   (a Lua script).
/// - **Fenced**: completing, releasing and renewing name the claim's token; an owner whose
///   lease expired is refused ([`StoreErrorKind::LeaseLost`](crate::StoreErrorKind::LeaseLost)) and cannot overwrite the
///   newer owner's record.
/// - **Redis Cluster**: a record is one key. Use [`connect_cluster`](Self::connect_cluster).
/// - **Sentinel and failover**: [`connect_sentinel`](RedisStore::connect_sentinel) follows a
///   promotion without a restart; [`with_durability`](Self::with_durability) has replicas
///   acknowledge each claim and completion (`WAIT`, in the same round trip), so that a
///   failover loses neither. Such writes go on a few connections of their own (four, opened
///   in the background with the first of them; the same round trip as before), since a
///   `WAIT` holds up every later command on its connection: replays, releases and renewals
///   are then held up by no `WAIT`, though acknowledged writes sharing a lane still queue
///   behind each other's. Through Sentinel, after a promotion each lane finds its connection
///   dead only when next used: up to four more acknowledged writes fail before all follow.
/// - **Eviction guard**: the `connect*` constructors warn if Redis's `maxmemory-policy` may
///   evict claims and records.
/// - **Waiting by notification** across instances (pub/sub, one subscriber connection per
///   store), bounded by the claim's lease so a crashed owner's claim ends a wait when it
///   expires. A duplicate held while another instance runs its request takes three round
///   trips: its claim, the script that judges and flags the claim it found, and its claim
///   again once woken, which returns the record.
/// - **Reconnects by itself**: [`connect`](Self::connect) uses a [`ConnectionManager`]. Every
///   command is bounded by a response timeout, so a dead Redis yields errors quickly (the
///   layer answers 503, or runs unprotected when failing open), not hung requests.
/// - **Corrupt or foreign bytes** under a key are [`StoreErrorKind::Corrupt`](crate::StoreErrorKind::Corrupt) errors.
///
/// `RedisStore` is a cheap `Clone` handle: clones share the connection and the subscriber.
///
/// # Requirements
///
/// **Redis 7.0 or newer** (or a server compatible with it): claims use `SET` with both `NX`
/// and `GET`, which older servers refuse as a syntax error. On those, every claim fails with
/// a [`StoreErrorKind::Other`](crate::StoreErrorKind::Other) error saying that Redis 7.0 or newer is required.
///
/// # Clocks
///
/// A replay reports how long the record has left ([`Claim::Completed`](crate::Claim::Completed)'s `expires_in`), so
/// that a [`CachedStore`](crate::CachedStore) in front keeps its copy no longer than Redis
/// does. The record carries its expiry by Redis's clock; the claim subtracts the local time
/// and a margin of 100 ms, and never reports more than the record's TTL. Skew between the
/// instance's clock and Redis's affects nothing else (leases and expiry run on Redis's clock
/// alone): an instance whose clock runs behind Redis's by more than the margin may keep a
/// cached copy for up to the excess after Redis dropped the record.
///
/// ```no_run
/// use axum::{Router, routing::post};
/// use tower_idempotency::{IdempotencyLayer, RedisStore};
///
/// # async fn run() -> Result<(), tower_idempotency::StoreError> {
/// let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
/// let app: Router = Router::new()
///     .route("/charges", post(|| async { "charged" }))
///     .layer(IdempotencyLayer::new(store));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore<C = ConnectionManager> {
    pub(super) connection: C,
    pub(super) shared: Arc<Shared>,
    /// The connections for writes that wait for their acknowledgement (`lanes.rs`).
    pub(super) lanes: Arc<Lanes<C>>,
}

impl RedisStore<ConnectionManager> {
    /// Connects to the Redis server at `url` (`redis://host:port/db`, `rediss://…` with a TLS
    /// feature of `redis`), with a connection that reconnects by itself and a second one,
    /// opened when a claim first finds its key in flight (or on the first wait), for
    /// notifications.
    ///
    /// Reads the server's `maxmemory-policy`, and logs a warning if Redis may evict the
    /// store's claims and records under memory pressure (any policy but `noeviction`, with a
    /// `maxmemory` set), or if `CONFIG GET` is refused and the check was skipped; neither
    /// fails the connection.
    ///
    /// Fails if the URL is invalid or the server cannot be reached within the default
    /// response timeout. To start while Redis may be down, give [`new`](Self::new) a
    /// connection made with [`ConnectionManager::new_lazy_with_config`].
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = Client::open(url).map_err(store_error)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(DEFAULT_RESPONSE_TIMEOUT))
            // The store bounds every command itself (`with_response_timeout`).
            .set_response_timeout(None)
            // While Redis is down, retry often enough that service resumes within about
            // half a second of its return.
            .set_max_delay(Duration::from_millis(500));
        let connecting = ConnectionManager::new_with_config(client.clone(), config.clone());
        let connection = tokio::time::timeout(DEFAULT_RESPONSE_TIMEOUT, connecting)
            .await
            .map_err(|_| timed_out(DEFAULT_RESPONSE_TIMEOUT))?
            .map_err(store_error)?;
        let opener: Opener<ConnectionManager> = {
            let client = client.clone();
            Arc::new(move || {
                Box::pin(ConnectionManager::new_with_config(
                    client.clone(),
                    config.clone(),
                ))
            })
        };
        let store = Self::new(connection, client).with_opener(opener);
        store.warn_if_evicting().await;
        Ok(store)
    }
}

impl RedisStore<ClusterConnection> {
    /// Connects to the Redis Cluster that `nodes` (URLs of some of its nodes) belong to.
    /// Notifications are received through one of these nodes, the next one if it fails.
    /// The eviction policy is checked as [`connect`](RedisStore::connect) does, on one node.
    pub async fn connect_cluster<I, U>(nodes: I) -> Result<Self, StoreError>
    where
        I: IntoIterator<Item = U>,
        U: AsRef<str>,
    {
        let clients = nodes
            .into_iter()
            .map(|url| Client::open(url.as_ref()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(store_error)?;
        let infos = clients
            .iter()
            .map(|client| client.get_connection_info().clone());
        let cluster = ClusterClient::builder(infos)
            .connection_timeout(DEFAULT_RESPONSE_TIMEOUT)
            // The store bounds every command itself; this only stops the cluster client
            // from cutting a longer `with_response_timeout` short.
            .response_timeout(Duration::from_secs(24 * 60 * 60))
            .build()
            .map_err(store_error)?;
        let connection =
            tokio::time::timeout(DEFAULT_RESPONSE_TIMEOUT, cluster.get_async_connection())
                .await
                .map_err(|_| timed_out(DEFAULT_RESPONSE_TIMEOUT))?
                .map_err(store_error)?;
        let opener: Opener<ClusterConnection> = Arc::new(move || {
            let cluster = cluster.clone();
            Box::pin(async move { cluster.get_async_connection().await })
        });
        let store =
            Self::with_subscribers(connection, Subscribers::Nodes(clients)).with_opener(opener);
        store.warn_if_evicting().await;
        Ok(store)
    }
}

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// A store over an existing `connection` — a [`ConnectionManager`], a
    /// [`ClusterConnection`], a [`MultiplexedConnection`](::redis::aio::MultiplexedConnection)
    /// (which does not reconnect) — with `subscriber` opening the connection that receives
    /// notifications (for a cluster, any of its nodes).
    ///
    /// Commands are bounded by the store's response timeout, whatever the connection's own;
    /// a connection with a response timeout of its own (a [`ConnectionManager`]'s is 500 ms
    /// by default) starts a second timer for every command: `connect` sets none, as the
    /// example does. With [`with_durability`](Self::with_durability), writes that wait for their
    /// acknowledgement share this one connection too (`connect`, `connect_cluster` and
    /// `connect_sentinel` open four more for them): each `WAIT` then holds up the commands
    /// queued behind it.
    ///
    /// ```no_run
    /// use redis::aio::{ConnectionManager, ConnectionManagerConfig};
    /// use tower_idempotency::RedisStore;
    ///
    /// # async fn run() -> redis::RedisResult<()> {
    /// let client = redis::Client::open("redis://127.0.0.1:6379")?;
    /// let config = ConnectionManagerConfig::new().set_response_timeout(None);
    /// let connection = ConnectionManager::new_with_config(client.clone(), config).await?;
    /// let store = RedisStore::new(connection, client);
    /// # Ok(()) }
    /// ```
    pub fn new(connection: C, subscriber: Client) -> Self {
        Self::with_subscribers(connection, Subscribers::Nodes(vec![subscriber]))
    }

    pub(super) fn with_subscribers(connection: C, subscribers: Subscribers) -> Self {
        let settings = Settings {
            prefix: DEFAULT_PREFIX.to_owned(),
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            poll_interval: DEFAULT_POLL_INTERVAL,
            abandoned_retention: DEFAULT_ABANDONED_RETENTION,
            durability: Durability::none(),
        };
        Self {
            connection,
            shared: Arc::new(Shared::new(settings, subscribers)),
            lanes: Arc::new(Lanes::new(None)),
        }
    }

    /// The same store, opening its connections for acknowledged writes with `opener`.
    pub(super) fn with_opener(self, opener: Opener<C>) -> Self {
        Self {
            lanes: Arc::new(Lanes::new(Some(opener))),
            ..self
        }
    }

    /// The prefix of every key this store writes, and of its notification channel
    /// (`{prefix}notifications`). Default: `idempotency:` ([`DEFAULT_PREFIX`]).
    ///
    /// Stores with different prefixes share nothing. On Redis Cluster, a prefix must not
    /// contain a `{hash tag}`: it would put every record in one slot.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tower_idempotency::StoreError> {
    /// let store = tower_idempotency::RedisStore::connect("redis://127.0.0.1").await?
    ///     .with_prefix("payments:idem:");
    /// # Ok(()) }
    /// ```
    pub fn with_prefix(self, prefix: impl Into<String>) -> Self {
        let prefix = prefix.into();
        self.reconfigured(|settings| settings.prefix = prefix)
    }

    /// How long a command may take before it fails with [`StoreErrorKind::Unavailable`](crate::StoreErrorKind::Unavailable)(crate::StoreErrorKind::Unavailable).
    /// Default: 1 s ([`DEFAULT_RESPONSE_TIMEOUT`]). It also bounds each attempt to open the
    /// notification connection.
    ///
    /// A command that timed out may still have run: a claim is then released in the
    /// background (its token is known), a completion is left to expire with its lease.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # async fn run() -> Result<(), tower_idempotency::StoreError> {
    /// let store = tower_idempotency::RedisStore::connect("redis://127.0.0.1").await?
    ///     .with_response_timeout(Duration::from_millis(250));
    /// # Ok(()) }
    /// ```
    ///
    /// # Panics
    ///
    /// If `timeout` is zero: every command would fail.
    pub fn with_response_timeout(self, timeout: Duration) -> Self {
        assert!(
            !timeout.is_zero(),
            "RedisStore::with_response_timeout: the timeout must be more than zero"
        );
        self.reconfigured(|settings| settings.response_timeout = timeout)
    }

    /// How long a waiter waits for a notification before looking at the claim again, in
    /// case a message was lost. Default: 1 s ([`DEFAULT_POLL_INTERVAL`]). Waiters also look
    /// again when the claim's lease ends and whenever the subscription is re-established.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # async fn run() -> Result<(), tower_idempotency::StoreError> {
    /// let store = tower_idempotency::RedisStore::connect("redis://127.0.0.1").await?
    ///     .with_poll_interval(Duration::from_secs(2));
    /// # Ok(()) }
    /// ```
    ///
    /// # Panics
    ///
    /// If `interval` is zero: waiters would ask Redis again and again without pause.
    pub fn with_poll_interval(self, interval: Duration) -> Self {
        assert!(
            !interval.is_zero(),
            "RedisStore::with_poll_interval: the interval must be more than zero"
        );
        self.reconfigured(|settings| settings.poll_interval = interval)
    }

    /// How long a claim whose lease ended without completion or release (its owner crashed)
    /// is kept after its lease, to be reported as [`Claim::Abandoned`](crate::Claim::Abandoned) and inspected; the key
    /// is free after that. Default: 24 h ([`DEFAULT_ABANDONED_RETENTION`]).
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # async fn run() -> Result<(), tower_idempotency::StoreError> {
    /// let store = tower_idempotency::RedisStore::connect("redis://127.0.0.1").await?
    ///     .with_abandoned_retention(Duration::from_secs(7 * 24 * 60 * 60));
    /// # Ok(()) }
    /// ```
    ///
    /// # Panics
    ///
    /// If `retention` is longer than [`MAX_TTL`]. Zero keeps no abandoned claim: the key is
    /// free as soon as the lease ends, and the outcome-unknown hook is never asked.
    pub fn with_abandoned_retention(self, retention: Duration) -> Self {
        assert!(
            retention <= MAX_TTL,
            "RedisStore::with_abandoned_retention: the retention must be at most MAX_TTL ({MAX_TTL:?})"
        );
        self.reconfigured(|settings| settings.abandoned_retention = retention)
    }

    /// How many copies of a claim and of a completion Redis confirms before the store reports
    /// them: see [`Durability`] for what is sent (in the same round trip as the write) and
    /// what happens when fewer replicas acknowledge in time. Default: [`Durability::none`].
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tower_idempotency::StoreError> {
    /// use tower_idempotency::{RedisStore, redis::Durability};
    /// let store = RedisStore::connect("redis://127.0.0.1").await?
    ///     .with_durability(Durability::replicas(1));
    /// # Ok(()) }
    /// ```
    pub fn with_durability(self, durability: Durability) -> Self {
        self.reconfigured(|settings| settings.durability = durability)
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.shared.settings.prefix
    }

    /// The Redis key that holds `key`'s claim or record.
    pub fn redis_key(&self, key: &StorageKey) -> String {
        spell_string(&self.shared.settings.prefix, key.as_bytes())
    }

    /// `key`'s Redis key as [`redis_key`](Self::redis_key) spells it, on the stack when the
    /// prefix is short enough (every command a request sends names its key).
    pub(super) fn key_bytes(&self, key: &StorageKey) -> RedisKey {
        spell(&self.shared.settings.prefix, key.as_bytes())
    }

    /// A new handle with changed settings (and so a fresh subscriber: the channel may have
    /// changed). Clones made before keep the old settings.
    fn reconfigured(self, change: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = self.shared.settings.clone();
        change(&mut settings);
        let clients = self.shared.notifier.subscribers().clone();
        Self {
            connection: self.connection,
            shared: Arc::new(Shared::new(settings, clients)),
            lanes: self.lanes,
        }
    }

    /// `exchange`, its error turned into a [`StoreError`] by `error`, failing as
    /// [`StoreErrorKind::Unavailable`](crate::StoreErrorKind::Unavailable)(crate::StoreErrorKind::Unavailable) after the response timeout.
    pub(super) async fn bounded<T>(
        &self,
        exchange: impl Future<Output = Result<T, RedisError>>,
        error: fn(RedisError) -> StoreError,
    ) -> Result<T, StoreError> {
        self.bounded_longer(Duration::ZERO, exchange, error).await
    }

    /// As [`bounded`](Self::bounded), the response timeout lengthened by `extra` (the time
    /// the write's acknowledgement may take).
    pub(super) async fn bounded_longer<T>(
        &self,
        extra: Duration,
        exchange: impl Future<Output = Result<T, RedisError>>,
        error: fn(RedisError) -> StoreError,
    ) -> Result<T, StoreError> {
        let timeout = self.shared.settings.response_timeout.saturating_add(extra);
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| timed_out(timeout))?
            .map_err(error)
    }
}

impl<C> fmt::Debug for RedisStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let settings = &self.shared.settings;
        f.debug_struct("RedisStore")
            .field("prefix", &settings.prefix)
            .field("response_timeout", &settings.response_timeout)
            .field("poll_interval", &settings.poll_interval)
            .field("abandoned_retention", &settings.abandoned_retention)
            .field("durability", &settings.durability)
            .finish_non_exhaustive()
    }
}
