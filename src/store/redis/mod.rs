//! [`RedisStore`]: one store shared by every instance of a service (feature `redis`).
//!
//! # Layout in Redis
//!
//! One key per record, `{prefix}{hex digest}` (default prefix `idempotency:`), so keys spread
//! over the slots of a Redis Cluster and every operation touches exactly one key. The key
//! holds either
//!
//! - an **in-flight marker** (61 bytes, format version 2: magic `TIF`, version, flags, the
//!   owner's fence token, the request fingerprint, when it was claimed, and the retention of
//!   an abandoned claim) expiring `lease + retention` after its claim or last renewal, or
//! - a **completed envelope** (magic `TIC`, version, the key's expiry as Unix milliseconds
//!   by Redis's clock, the TTL, then the record in [`Record::encode`]'s versioned binary
//!   form), with the record TTL as its expiry.
//!
//! A claim's lease has ended once the key's remaining time (`PTTL`, Redis's clock) is down to
//! the retention ([`RedisStore::with_abandoned_retention`], 24 h by default). The marker
//! stays that long after its lease, so that a request finding it learns that the owner
//! stopped without completing ([`Claim::Abandoned`]) rather than finding the key free.
//!
//! **Changed in this version** (marker format 1 → 2): format 1 markers expired with their
//! lease (`PX lease`), so nothing was left of an abandoned claim. This version still reads
//! format 1 markers (claims made by an older instance during a rolling deploy keep their
//! meaning); an older instance reading a format 2 marker reports it corrupt (503 for that
//! key until the claim ends), so deploy while traffic on in-flight keys is low, or all at
//! once.
//!
//! # Round trips
//!
//! Claim-or-replay is one native command, `SET key marker NX PX expiry GET`: a nil reply
//! means the claim is ours, a value is what holds the key. It is as cheap for Redis as a
//! plain `GET`, which a replay amounts to. Only when the value is a marker does the claim
//! take a second round trip: a script (`held.lua`) that judges by Redis's clock whether that
//! claim's lease has ended (it may have, since the marker outlives it) and claims the key if
//! it is free by then. Complete, release and renew are one Lua script each (`EVALSHA`),
//! fenced by the claim's token. Taking over an abandoned claim is the same script as the
//! claim's second step, fenced by the abandoned claim's token. The first call of a script on
//! a server that does not know it costs one more command (`EVAL`, which also caches it
//! there).
//!
//! A claim does not learn the key's remaining lifetime from Redis: it reads it from the
//! envelope, against the local clock (see [`RedisStore`] on clocks).
//!
//! # Inspection
//!
//! Looking a key up is one read-only script (its value, `PTTL` and `TIME`); forgetting a
//! record and breaking a claim are one script each, which change the key only if it holds
//! what they remove. Listing claims scans the prefix with `SCAN … MATCH {prefix}* COUNT n`
//! (cursor-based, a bounded number of keys per page) on the server, or on each primary of a
//! Redis Cluster in turn (found with `CLUSTER NODES`, reached with the store's connection
//! settings); the cursor names the primary and its `SCAN` cursor.
//!
//! # Waiting
//!
//! A waiter flags the claim it waits on; when a flagged claim is completed or released, the
//! script publishes the key on the store's channel (`{prefix}notifications`), so claims that
//! nobody waits on publish nothing. Each store keeps one subscriber connection, shared by all
//! its waiters, that wakes the waiters of that key (waiters on the instance that completed
//! are woken at once, without the message). A waiter also wakes when the claim's lease runs
//! out (its owner may be gone), looks again whenever the subscription is re-established
//! (messages may have been lost meanwhile) and, as a last resort, after a bounded poll
//! interval.

mod completed;
mod inspect;
mod marker;
mod notify;

use std::{
    collections::hash_map::RandomState,
    fmt,
    hash::{BuildHasher, Hasher},
    sync::{
        Arc, LazyLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use ::redis::{
    Client, Cmd, ErrorKind, RedisError, ServerErrorKind, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
};
use bytes::Bytes;
use tokio::time::Instant;

use self::{
    completed::Completed,
    marker::Marker,
    notify::{Notifier, Watch},
};
use super::{Claim, FenceToken, IdempotencyStore};
use crate::{
    config::{MAX_LEASE, MAX_TTL},
    error::{StoreError, StoreErrorKind},
    fingerprint::Fingerprint,
    inspect::{ClaimPage, Inspection, ListCursor},
    key::{StorageKey, hex},
    record::{Record, RecordError},
};

/// Checks the 4-byte head every value this store writes starts with: `magic`, then `version`.
fn check_head(bytes: &[u8], magic: &[u8; 3], version: u8) -> Result<(), RecordError> {
    if bytes.get(..3) != Some(&magic[..]) {
        return Err(RecordError::BadMagic);
    }
    match bytes.get(3) {
        None => Err(RecordError::Truncated),
        Some(&found) if found == version => Ok(()),
        Some(&other) => Err(RecordError::UnsupportedVersion(other)),
    }
}

/// The default key prefix: `idempotency:`.
pub const DEFAULT_PREFIX: &str = "idempotency:";
/// The default bound on each command: 1 s.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);
/// The default bound on waiting for a notification before looking again: 1 s.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How long a claim whose lease ended without completion is kept, by default, to be reported
/// as abandoned: 24 h.
pub const DEFAULT_ABANDONED_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

/// Redis expires keys to the millisecond; a waiter looks again this long after a lease's end.
const EXPIRY_SLACK: Duration = Duration::from_millis(2);

/// A store in Redis, shared by every instance of a service: a request executes once across
/// all of them, and a retry sent to any instance is replayed.
///
/// - **One round trip** to claim-or-replay (a native `SET … NX GET`) and one to complete
///   (a Lua script).
/// - **Fenced**: completing, releasing and renewing name the claim's token; an owner whose
///   lease expired is refused ([`StoreErrorKind::LeaseLost`]) and cannot overwrite the
///   newer owner's record.
/// - **Redis Cluster**: a record is one key. Use [`connect_cluster`](Self::connect_cluster).
/// - **Waiting by notification** across instances (pub/sub, one subscriber connection per
///   store), bounded by the claim's lease so a crashed owner's claim ends a wait when it
///   expires.
/// - **Reconnects by itself**: [`connect`](Self::connect) uses a [`ConnectionManager`]. Every
///   command is bounded by a response timeout, so a dead Redis yields errors quickly (the
///   layer answers 503, or runs unprotected when failing open), not hung requests.
/// - **Corrupt or foreign bytes** under a key are [`StoreErrorKind::Corrupt`] errors.
///
/// `RedisStore` is a cheap `Clone` handle: clones share the connection and the subscriber.
///
/// # Requirements
///
/// **Redis 7.0 or newer** (or a server compatible with it): claims use `SET` with both `NX`
/// and `GET`, which older servers refuse as a syntax error. On those, every claim fails with
/// a [`StoreErrorKind::Other`] error saying that Redis 7.0 or newer is required.
///
/// # Clocks
///
/// A replay reports how long the record has left ([`Claim::Completed`]'s `expires_in`), so
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
    connection: C,
    shared: Arc<Shared>,
}

struct Shared {
    settings: Settings,
    notifier: Notifier,
    tokens: Tokens,
}

#[derive(Clone)]
struct Settings {
    prefix: String,
    response_timeout: Duration,
    poll_interval: Duration,
    abandoned_retention: Duration,
}

impl Shared {
    fn new(settings: Settings, clients: Vec<Client>) -> Self {
        let mut channel = settings.prefix.clone().into_bytes();
        channel.extend_from_slice(b"notifications");
        Self {
            notifier: Notifier::new(clients, channel, settings.response_timeout),
            settings,
            tokens: Tokens::default(),
        }
    }
}

/// Fence tokens unique to this store: a counter, hashed with a key drawn at random, so tokens
/// from different processes do not collide and cannot be guessed from one another.
struct Tokens {
    seed: RandomState,
    next: AtomicU64,
}

impl Default for Tokens {
    fn default() -> Self {
        Self {
            seed: RandomState::new(),
            next: AtomicU64::new(0),
        }
    }
}

impl Tokens {
    fn next(&self) -> FenceToken {
        let mut hasher = self.seed.build_hasher();
        hasher.write_u64(self.next.fetch_add(1, Ordering::Relaxed));
        FenceToken::new(hasher.finish())
    }
}

impl RedisStore<ConnectionManager> {
    /// Connects to the Redis server at `url` (`redis://host:port/db`, `rediss://…` with a TLS
    /// feature of `redis`), with a connection that reconnects by itself and a second one,
    /// opened on the first wait, for notifications.
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
        let connecting = ConnectionManager::new_with_config(client.clone(), config);
        let connection = tokio::time::timeout(DEFAULT_RESPONSE_TIMEOUT, connecting)
            .await
            .map_err(|_| timed_out(DEFAULT_RESPONSE_TIMEOUT))?
            .map_err(store_error)?;
        Ok(Self::new(connection, client))
    }
}

impl RedisStore<ClusterConnection> {
    /// Connects to the Redis Cluster that `nodes` (URLs of some of its nodes) belong to.
    /// Notifications are received through one of these nodes, the next one if it fails.
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
        Ok(Self::with_subscribers(connection, clients))
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
    /// Commands are bounded by the store's response timeout, whatever the connection's own.
    ///
    /// ```no_run
    /// use tower_idempotency::RedisStore;
    ///
    /// # async fn run() -> redis::RedisResult<()> {
    /// let client = redis::Client::open("redis://127.0.0.1:6379")?;
    /// let connection = client.get_connection_manager().await?;
    /// let store = RedisStore::new(connection, client);
    /// # Ok(()) }
    /// ```
    pub fn new(connection: C, subscriber: Client) -> Self {
        Self::with_subscribers(connection, vec![subscriber])
    }

    fn with_subscribers(connection: C, subscribers: Vec<Client>) -> Self {
        let settings = Settings {
            prefix: DEFAULT_PREFIX.to_owned(),
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            poll_interval: DEFAULT_POLL_INTERVAL,
            abandoned_retention: DEFAULT_ABANDONED_RETENTION,
        };
        Self {
            connection,
            shared: Arc::new(Shared::new(settings, subscribers)),
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

    /// How long a command may take before it fails with [`StoreErrorKind::Unavailable`].
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
    /// is kept after its lease, to be reported as [`Claim::Abandoned`] and inspected; the key
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

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.shared.settings.prefix
    }

    /// The Redis key that holds `key`'s claim or record.
    pub fn redis_key(&self, key: &StorageKey) -> String {
        format!("{}{}", self.shared.settings.prefix, hex(key.as_bytes()))
    }

    /// A new handle with changed settings (and so a fresh subscriber: the channel may have
    /// changed). Clones made before keep the old settings.
    fn reconfigured(self, change: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = self.shared.settings.clone();
        change(&mut settings);
        let clients = self.shared.notifier.clients().to_vec();
        Self {
            connection: self.connection,
            shared: Arc::new(Shared::new(settings, clients)),
        }
    }

    /// Runs `script` on `key` with `args`, in one round trip once the server knows the
    /// script, bounded by the response timeout.
    async fn run(
        &self,
        script: &Script,
        key: &StorageKey,
        args: &[&[u8]],
    ) -> Result<Value, StoreError> {
        let redis_key = self.redis_key(key);
        let mut connection = self.connection.clone();
        let command = |verb: &str, body: &[u8]| {
            let mut command = Cmd::new();
            command.arg(verb).arg(body).arg(1).arg(redis_key.as_bytes());
            for arg in args {
                command.arg(*arg);
            }
            command
        };
        let exchange = async {
            let reply = command("EVALSHA", script.sha.as_bytes())
                .query_async::<Value>(&mut connection)
                .await;
            match reply {
                // EVAL runs the script and caches it under the same digest: the next call is
                // one EVALSHA again. (`SCRIPT LOAD` would take a third command, and on a
                // cluster would need every primary to answer.)
                Err(error) if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    command("EVAL", script.code.as_bytes())
                        .query_async::<Value>(&mut connection)
                        .await
                }
                reply => reply,
            }
        };
        self.bounded(exchange, store_error).await
    }

    /// `exchange`, its error turned into a [`StoreError`] by `error`, failing as
    /// [`StoreErrorKind::Unavailable`] after the response timeout.
    async fn bounded<T>(
        &self,
        exchange: impl Future<Output = Result<T, RedisError>>,
        error: fn(RedisError) -> StoreError,
    ) -> Result<T, StoreError> {
        let timeout = self.shared.settings.response_timeout;
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| timed_out(timeout))?
            .map_err(error)
    }

    /// A new claim's token, its marker, and the key's expiry in ms (the lease, then the
    /// retention of an abandoned claim).
    fn new_claim(
        &self,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> (FenceToken, [u8; 61], String) {
        let token = self.shared.tokens.next();
        let retention = self.shared.settings.abandoned_retention;
        let claimed_at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |since| {
                u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
            });
        let marker = Marker {
            token,
            fingerprint: *fingerprint,
            claimed_at,
            retention: u64::try_from(retention.as_millis()).unwrap_or(u64::MAX),
        }
        .encode();
        let expiry = lease.min(MAX_LEASE).saturating_add(retention);
        (
            token,
            marker,
            millis(expiry, MAX_LEASE.saturating_add(MAX_TTL)),
        )
    }

    /// Claims a key that a claim held a moment ago, taking over the abandoned claim
    /// `abandoned` if it still holds it: one script, judged by Redis's clock.
    async fn claim_held(
        &self,
        key: &StorageKey,
        abandoned: Option<FenceToken>,
        token: FenceToken,
        marker: &[u8],
        expiry: &str,
    ) -> Result<Claim, StoreError> {
        let abandoned = abandoned.map(|token| token.get().to_be_bytes());
        let args: [&[u8]; 3] = [
            abandoned.as_ref().map_or(&[][..], |token| &token[..]),
            marker,
            expiry.as_bytes(),
        ];
        let reply = self.run(&HELD, key, &args).await?;
        let Value::Array(mut reply) = reply else {
            return Err(StoreError::new(StoreErrorKind::Other, Unexpected::Reply));
        };
        let value = match reply.pop() {
            Some(Value::BulkString(value)) => Some(value),
            Some(other) => {
                reply.push(other);
                None
            }
            None => None,
        };
        match (reply.first(), value) {
            (Some(Value::Int(1)), None) => Ok(Claim::Acquired(token)),
            (Some(Value::Int(2)), Some(value)) => held_by(value, SystemTime::now()),
            (Some(Value::Int(3)), Some(value)) => {
                let marker = Marker::decode(&value)?;
                Ok(Claim::Abandoned {
                    token: marker.token,
                    fingerprint: marker.fingerprint,
                })
            }
            _ => Err(StoreError::new(StoreErrorKind::Other, Unexpected::Reply)),
        }
    }

    async fn fenced(
        &self,
        script: &Script,
        key: &StorageKey,
        args: &[&[u8]],
    ) -> Result<(), StoreError> {
        match self.run(script, key, args).await? {
            Value::Int(1) => Ok(()),
            Value::Int(0) => Err(StoreError::lease_lost()),
            Value::Int(-1) => Err(StoreError::corrupt(Unexpected::Foreign)),
            _ => Err(StoreError::new(StoreErrorKind::Other, Unexpected::Reply)),
        }
    }
}

impl<C> IdempotencyStore for RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    async fn claim(
        &self,
        key: &StorageKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let (token, marker, expiry) = self.new_claim(fingerprint, lease);
        let mut claim = Cmd::new();
        claim
            .arg("SET")
            .arg(self.redis_key(key).as_bytes())
            .arg(&marker[..])
            .arg("NX")
            .arg("PX")
            .arg(expiry.as_bytes())
            .arg("GET");
        let mut connection = self.connection.clone();
        let reply = self
            .bounded(claim.query_async::<Value>(&mut connection), claim_error)
            .await;
        let reply = match reply {
            Ok(Value::Nil) => Ok(Claim::Acquired(token)),
            // A claim holds the key: whether its lease has ended is for Redis's clock to say.
            Ok(Value::BulkString(held)) if held.starts_with(marker::MAGIC) => {
                self.claim_held(key, None, token, &marker, &expiry).await
            }
            Ok(Value::BulkString(held)) => held_by(held, SystemTime::now()),
            Ok(_) => Err(StoreError::new(StoreErrorKind::Other, Unexpected::Reply)),
            Err(error) => Err(error),
        };
        match reply {
            Err(error) => {
                if error.kind() == StoreErrorKind::Unavailable {
                    // The claim may have landed without its reply reaching us. Its token is
                    // ours: releasing it frees the key now rather than at the lease's end.
                    let (store, key) = (self.clone(), *key);
                    tokio::spawn(async move {
                        let _ = store.release(&key, token).await;
                    });
                }
                Err(error)
            }
            claim => claim,
        }
    }

    async fn complete(
        &self,
        key: &StorageKey,
        token: FenceToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let (encoded, ttl) = (record.encode(), millis(ttl, MAX_TTL));
        let args: [&[u8]; 5] = [
            &token.get().to_be_bytes(),
            &encoded,
            ttl.as_bytes(),
            self.shared.notifier.channel(),
            key.as_bytes(),
        ];
        self.fenced(&COMPLETE, key, &args).await?;
        self.shared.notifier.wake(key);
        Ok(())
    }

    async fn release(&self, key: &StorageKey, token: FenceToken) -> Result<(), StoreError> {
        let args: [&[u8]; 3] = [
            &token.get().to_be_bytes(),
            self.shared.notifier.channel(),
            key.as_bytes(),
        ];
        self.fenced(&RELEASE, key, &args).await?;
        self.shared.notifier.wake(key);
        Ok(())
    }

    async fn renew(
        &self,
        key: &StorageKey,
        token: FenceToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let lease = millis(lease, MAX_LEASE);
        let args: [&[u8]; 2] = [&token.get().to_be_bytes(), lease.as_bytes()];
        self.fenced(&RENEW, key, &args).await
    }

    async fn take_over(
        &self,
        key: &StorageKey,
        abandoned: FenceToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let (token, marker, expiry) = self.new_claim(fingerprint, lease);
        self.claim_held(key, Some(abandoned), token, &marker, &expiry)
            .await
    }

    async fn inspect(&self, key: &StorageKey) -> Result<Option<Inspection>, StoreError> {
        self.inspect_key(key).await
    }

    async fn forget(&self, key: &StorageKey) -> Result<bool, StoreError> {
        match self.run(&FORGET, key, &[]).await? {
            Value::Int(1) => Ok(true),
            Value::Int(0) => Ok(false),
            _ => Err(StoreError::new(StoreErrorKind::Other, Unexpected::Reply)),
        }
    }

    async fn break_claim(&self, key: &StorageKey) -> Result<Option<FenceToken>, StoreError> {
        let args: [&[u8]; 2] = [self.shared.notifier.channel(), key.as_bytes()];
        let token = match self.run(&BREAK, key, &args).await? {
            Value::Int(0) => None,
            Value::BulkString(token) => match <[u8; 8]>::try_from(token.as_slice()) {
                Ok(token) => Some(FenceToken::new(u64::from_be_bytes(token))),
                Err(_) => return Err(StoreError::new(StoreErrorKind::Other, Unexpected::Reply)),
            },
            _ => return Err(StoreError::new(StoreErrorKind::Other, Unexpected::Reply)),
        };
        if token.is_some() {
            self.shared.notifier.wake(key);
        }
        Ok(token)
    }

    async fn list_claims(
        &self,
        older_than: Duration,
        cursor: Option<ListCursor>,
        limit: usize,
    ) -> Result<ClaimPage, StoreError> {
        self.list(older_than, cursor, limit).await
    }

    const NAME: &'static str = "redis";

    async fn wait(&self, key: &StorageKey, timeout: Duration) -> Result<(), StoreError> {
        let deadline = Instant::now() + timeout.min(MAX_TTL);
        let watch: Watch = self.shared.notifier.watch(*key);
        loop {
            // Armed before looking, so an end published after the look is not missed.
            let ended = watch.ended().notified();
            let resubscribed = watch.resubscribed().notified();
            tokio::pin!(ended, resubscribed);
            ended.as_mut().enable();
            resubscribed.as_mut().enable();
            let lease_left = match self.run(&WATCH, key, &[]).await? {
                Value::Int(-2 | -1) => return Ok(()),
                Value::Int(-3) => None,
                Value::Int(ms) if ms >= 0 => Some(Duration::from_millis(ms.unsigned_abs())),
                _ => return Err(StoreError::new(StoreErrorKind::Other, Unexpected::Reply)),
            };
            // Checked: neither the poll interval nor what the key says is left of its lease (a
            // value anyone with access could have written) is bounded.
            let now = Instant::now();
            let poll = now.checked_add(self.shared.settings.poll_interval);
            let lease_end =
                lease_left.and_then(|left| now.checked_add(left.saturating_add(EXPIRY_SLACK)));
            let wake_at = [poll, lease_end]
                .into_iter()
                .flatten()
                .fold(deadline, Instant::min);
            tokio::select! {
                () = &mut ended => return Ok(()),
                () = &mut resubscribed => {}
                () = tokio::time::sleep_until(wake_at) => {}
            }
            if Instant::now() >= deadline {
                return Ok(());
            }
        }
    }
}

/// What a held key's value says, as of `now` by the local clock: a claim in flight, or a
/// completed record and how long it has left.
fn held_by(value: Vec<u8>, now: SystemTime) -> Result<Claim, StoreError> {
    if value.starts_with(marker::MAGIC) {
        let marker = Marker::decode(&value)?;
        return Ok(Claim::InFlight {
            fingerprint: marker.fingerprint,
        });
    }
    if value.starts_with(completed::MAGIC) {
        let completed = Completed::decode(Bytes::from(value))?;
        let expires_in = completed.expires_in(now);
        return Ok(Claim::Completed {
            record: completed.record,
            expires_in,
        });
    }
    Err(StoreError::corrupt(Unexpected::Foreign))
}

/// What the `marker` fuzz target checks (see `marker::check_decode`), and that a held value
/// starting like a marker is read without panicking.
#[cfg(any(test, fuzzing))]
pub(crate) fn check_marker(bytes: &[u8]) {
    marker::check_decode(bytes);
    let _ = held_by(
        [marker::MAGIC.as_slice(), bytes].concat(),
        SystemTime::now(),
    );
}

/// What the `envelope` fuzz target checks (see `completed::check_decode`), and that a held
/// value is read without panicking whatever it holds.
#[cfg(any(test, fuzzing))]
pub(crate) fn check_envelope(bytes: &[u8]) {
    completed::check_decode(bytes);
    let _ = held_by(bytes.to_vec(), SystemTime::now());
}

/// A duration as whole milliseconds for `PX`/`PEXPIRE`: at least 1, which Redis requires, and
/// at most `max` ([`MAX_TTL`] or [`MAX_LEASE`]). Redis refuses an expiry whose milliseconds,
/// added to its clock, overflow; a refused completion would let every retry execute again.
fn millis(duration: Duration, max: Duration) -> String {
    duration.min(max).as_millis().max(1).to_string()
}

fn timed_out(after: Duration) -> StoreError {
    StoreError::unavailable(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("redis did not answer within {after:?}"),
    ))
}

/// A failed claim's error: as [`store_error`], but a syntax error is a server older than 7.0,
/// which does not take `NX` together with `GET`.
fn claim_error(error: RedisError) -> StoreError {
    let syntax = error.kind() == ErrorKind::Server(ServerErrorKind::ResponseError)
        && error
            .detail()
            .is_some_and(|detail| detail.to_ascii_lowercase().starts_with("syntax error"));
    if syntax {
        return StoreError::new(StoreErrorKind::Other, NeedsRedis7(error));
    }
    store_error(error)
}

fn store_error(error: RedisError) -> StoreError {
    // A key of another type (a hash, a list) under one of ours: foreign data, like bad bytes.
    if error.code() == Some("WRONGTYPE") {
        return StoreError::corrupt(error);
    }
    let unavailable = error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_cluster_error()
        || matches!(
            error.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ReadOnly
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::ClusterDown
                )
        )
        || error.code() == Some("BUSY");
    let kind = if unavailable {
        StoreErrorKind::Unavailable
    } else {
        StoreErrorKind::Other
    };
    StoreError::new(kind, error)
}

/// A reply the store's scripts never give.
#[derive(Debug)]
enum Unexpected {
    /// The key holds bytes that are neither a marker nor a record of this crate.
    Foreign,
    /// A reply of a shape the script does not return.
    Reply,
}

impl fmt::Display for Unexpected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Foreign => "the key holds a value that is not an idempotency record or claim",
            Self::Reply => "unexpected reply from redis",
        })
    }
}

impl std::error::Error for Unexpected {}

/// A server that refused `SET … NX … GET`: older than Redis 7.0.
#[derive(Debug)]
struct NeedsRedis7(RedisError);

impl fmt::Display for NeedsRedis7 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The server's reply is the source, for reporters that walk the chain.
        f.write_str(
            "RedisStore requires Redis 7.0 or newer: the server refused SET with both NX and GET",
        )
    }
}

impl std::error::Error for NeedsRedis7 {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// A Lua script and its SHA-1, the name `EVALSHA` knows it by.
struct Script {
    code: &'static str,
    sha: String,
}

impl Script {
    fn new(code: &'static str) -> Self {
        Self {
            code,
            sha: ::redis::Script::new(code).get_hash().to_owned(),
        }
    }
}

static WATCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("fence.lua"),
        include_str!("watch.lua")
    ))
});
static HELD: LazyLock<Script> =
    LazyLock::new(|| Script::new(concat!(include_str!("fence.lua"), include_str!("held.lua"))));
static BREAK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("fence.lua"),
        include_str!("break.lua")
    ))
});
static INSPECT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("inspect.lua")));
static FORGET: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("forget.lua")));
static COMPLETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("fence.lua"),
        include_str!("complete.lua")
    ))
});
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("fence.lua"),
        include_str!("release.lua")
    ))
});
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("fence.lua"),
        include_str!("renew.lua")
    ))
});

impl<C> fmt::Debug for RedisStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let settings = &self.shared.settings;
        f.debug_struct("RedisStore")
            .field("prefix", &settings.prefix)
            .field("response_timeout", &settings.response_timeout)
            .field("poll_interval", &settings.poll_interval)
            .field("abandoned_retention", &settings.abandoned_retention)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::{completed::envelope, *};

    #[test]
    fn durations_become_at_least_one_millisecond_and_at_most_the_bound() {
        let cases = [
            (Duration::ZERO, MAX_TTL, "1"),
            (Duration::from_micros(1_500), MAX_TTL, "1"),
            (Duration::from_secs(86_400), MAX_TTL, "86400000"),
            (MAX_TTL, MAX_TTL, "31536000000"),
            (Duration::MAX, MAX_TTL, "31536000000"),
            (Duration::MAX, MAX_LEASE, "3600000"),
            (Duration::from_secs(30), MAX_LEASE, "30000"),
        ];
        for (duration, max, expected) in cases {
            assert_eq!(
                millis(duration, max),
                expected,
                "{duration:?} up to {max:?}"
            );
        }
    }

    #[test]
    fn tokens_do_not_repeat() {
        let tokens = Tokens::default();
        let other = Tokens::default();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            assert!(seen.insert(tokens.next()));
            assert!(seen.insert(other.next()));
        }
    }

    #[test]
    fn a_held_value_is_a_claim_in_flight_or_a_record_and_anything_else_corrupt() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let now_ms = 1_700_000_000_000;
        let fingerprint = Fingerprint::from_bytes([7; 32]);
        let marker = Marker {
            token: FenceToken::new(9),
            fingerprint,
            claimed_at: 1,
            retention: 2,
        };
        let in_flight = held_by(marker.encode().to_vec(), now);
        assert_eq!(in_flight.ok(), Some(Claim::InFlight { fingerprint }));

        let record = Record::not_replayable(fingerprint, http::StatusCode::OK);
        let completed = held_by(envelope(now_ms + 5_000, 60_000, &record), now);
        assert_eq!(
            completed.ok(),
            Some(Claim::Completed {
                record: record.clone(),
                expires_in: Some(Duration::from_millis(5_000) - completed::SKEW_MARGIN),
            })
        );
        let expired = held_by(envelope(now_ms - 1, 60_000, &record), now);
        assert!(matches!(
            expired,
            Ok(Claim::Completed {
                expires_in: None,
                ..
            })
        ));

        let corrupt: [&[u8]; 7] = [
            b"{\"status\":200}",
            b"",
            b"TIF\x03",
            b"TIC\x01\x00",
            b"TIC\x09",
            &record.encode(),
            &envelope(now_ms, 60_000, &record)[..30],
        ];
        for value in corrupt {
            assert_eq!(
                held_by(value.to_vec(), now).map_err(|e| e.kind()),
                Err(StoreErrorKind::Corrupt),
                "{value:?}"
            );
        }
    }

    #[test]
    fn a_server_older_than_7_is_told_apart_by_its_syntax_error() {
        // What Redis 6.2 answers to `SET key value NX PX 30000 GET`.
        let reply = ::redis::parse_redis_value(b"-ERR syntax error\r\n")
            .and_then(Value::extract_error)
            .err();
        let Some(refused) = reply else {
            panic!("an error reply parses as an error");
        };
        let error = claim_error(refused);
        assert_eq!(error.kind(), StoreErrorKind::Other);
        let message = error.to_string();
        assert!(message.contains("Redis 7.0 or newer"), "{message}");
        let reply = std::error::Error::source(&error)
            .and_then(std::error::Error::source)
            .map(ToString::to_string);
        assert!(
            reply
                .as_deref()
                .is_some_and(|reply| reply.contains("syntax error")),
            "the server's reply is kept as the source: {reply:?}"
        );

        let other = ::redis::parse_redis_value(b"-WRONGTYPE Operation against a key\r\n")
            .and_then(Value::extract_error)
            .err();
        let Some(other) = other else {
            panic!("an error reply parses as an error");
        };
        let error = claim_error(other);
        assert_eq!(error.kind(), StoreErrorKind::Corrupt);
        assert!(!error.to_string().contains("7.0"));
    }

    #[test]
    fn the_fenced_scripts_share_the_fence() {
        for script in [&*COMPLETE, &*RELEASE, &*RENEW, &*WATCH, &*HELD, &*BREAK] {
            assert!(script.code.starts_with(include_str!("fence.lua")));
            assert_eq!(script.sha.len(), 40);
        }
        assert_ne!(COMPLETE.sha, RELEASE.sha);
    }
}
