//! [`SentinelConnection`]: the connection of a [`RedisStore`] that reaches its primary through
//! Redis Sentinel and follows a failover without a restart.
//!
//! The connection asks the Sentinels where the primary is (the `redis` crate's
//! [`SentinelClient`], which also checks that the node it names says it is the primary) and
//! keeps one multiplexed connection to it. When that connection fails (the primary died), an
//! exchange on it is cut short (the store's response timeout: the primary may hang rather
//! than die), or the node answers `READONLY` (it was demoted to a replica), the connection is
//! dropped and the next command asks the Sentinels again. Until they have promoted a
//! replica, commands fail ([`Unavailable`](crate::StoreErrorKind::Unavailable): the layer
//! answers 503); the first one after the promotion reaches the new primary. A failed command
//! is never resent: a write may have reached the old primary.
//!
//! The store's notification subscriber asks the same Sentinels whenever it subscribes again.
//! The constructors, [`RedisStore::connect_sentinel`] and [`RedisStore::from_sentinel`], are
//! here too.

use std::{
    fmt,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ::redis::{
    AsyncConnectionConfig, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult,
    ServerErrorKind, Value,
    aio::{ConnectionLike, MultiplexedConnection},
    sentinel::{SentinelClient, SentinelServerType},
};

use super::{
    connect::{DEFAULT_RESPONSE_TIMEOUT, RedisStore},
    error::{store_error, timed_out},
    lanes::Opener,
    notify::Subscribers,
    resolver::Resolver,
};
use crate::store::error::StoreError;

/// After a failed look-up, commands fail at once for this long rather than each asking the
/// Sentinels again (a failover takes seconds; requests arrive by the thousand).
const RETRY_AFTER_FAILURE: Duration = Duration::from_millis(50);

impl RedisStore<SentinelConnection> {
    /// Connects to the primary that the Redis Sentinels at `sentinels` (their URLs) know as
    /// `service` (the name in their `sentinel monitor` line), and follows it: after a
    /// failover, the store reaches the promoted replica without a restart, and so does its
    /// notification subscriber. Commands fail ([`StoreErrorKind::Unavailable`](crate::StoreErrorKind::Unavailable): 503)
    /// between the primary's failure and the promotion. See [`SentinelConnection`].
    ///
    /// The eviction policy is checked as [`connect`](RedisStore::connect) does. To reach
    /// Sentinels or a primary that need credentials or TLS, build the
    /// [`SentinelClient`] yourself (`redis::sentinel::SentinelClientBuilder`) and use
    /// [`from_sentinel`](Self::from_sentinel).
    ///
    /// Fails if a URL is invalid, or if no Sentinel names a primary that can be reached
    /// within the default response timeout.
    ///
    /// ```no_run
    /// use tower_idempotency::{RedisStore, redis::Durability};
    ///
    /// # async fn run() -> Result<(), tower_idempotency::StoreError> {
    /// let sentinels = ["redis://10.0.0.1:26379", "redis://10.0.0.2:26379", "redis://10.0.0.3:26379"];
    /// let store = RedisStore::connect_sentinel(sentinels, "mymaster")
    ///     .await?
    ///     .with_durability(Durability::replicas(1));
    /// # Ok(()) }
    /// ```
    pub async fn connect_sentinel<I, U>(sentinels: I, service: &str) -> Result<Self, StoreError>
    where
        I: IntoIterator<Item = U>,
        U: AsRef<str>,
    {
        let urls: Vec<String> = sentinels
            .into_iter()
            .map(|url| url.as_ref().to_owned())
            .collect();
        let sentinel =
            SentinelClient::build(urls, service.to_owned(), None, SentinelServerType::Master)
                .map_err(store_error)?;
        Self::from_sentinel(sentinel).await
    }

    /// As [`connect_sentinel`](Self::connect_sentinel), with a [`SentinelClient`] built by
    /// the application (credentials, TLS, database); it must ask for the primary
    /// (`SentinelServerType::Master`).
    pub async fn from_sentinel(sentinel: SentinelClient) -> Result<Self, StoreError> {
        let resolver = Arc::new(Resolver::new(sentinel));
        let connecting =
            SentinelConnection::connect(Arc::clone(&resolver), DEFAULT_RESPONSE_TIMEOUT);
        let connection = tokio::time::timeout(DEFAULT_RESPONSE_TIMEOUT, connecting)
            .await
            .map_err(|_| timed_out(DEFAULT_RESPONSE_TIMEOUT))?
            .map_err(store_error)?;
        let opener: Opener<SentinelConnection> = {
            let resolver = Arc::clone(&resolver);
            Arc::new(move || {
                Box::pin(SentinelConnection::connect(
                    Arc::clone(&resolver),
                    DEFAULT_RESPONSE_TIMEOUT,
                ))
            })
        };
        let store =
            Self::with_subscribers(connection, Subscribers::Sentinel(Arc::clone(&resolver)))
                .with_opener(opener);
        store.warn_if_evicting().await;
        Ok(store)
    }
}

/// A connection to the primary that Redis Sentinel names, which follows a failover: made by
/// [`RedisStore::connect_sentinel`](crate::RedisStore::connect_sentinel). A cheap `Clone`
/// handle: clones share the connection.
#[derive(Clone)]
pub struct SentinelConnection {
    shared: Arc<Shared>,
}

struct Shared {
    resolver: Arc<Resolver>,
    config: AsyncConnectionConfig,
    /// The connection to the primary, with its generation; `None` once it failed.
    current: Mutex<Option<(u64, MultiplexedConnection)>>,
    generation: AtomicU64,
    /// Serialises look-ups: one asks the Sentinels, the others take what it found.
    connecting: tokio::sync::Mutex<Option<(Instant, RedisError)>>,
}

impl SentinelConnection {
    /// A connection through `resolver`, each connection attempt bounded by
    /// `connection_timeout`; connects at once.
    pub(super) async fn connect(
        resolver: Arc<Resolver>,
        connection_timeout: Duration,
    ) -> RedisResult<Self> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connection_timeout))
            // The store bounds every exchange itself.
            .set_response_timeout(None);
        let connection = Self {
            shared: Arc::new(Shared {
                resolver,
                config,
                current: Mutex::new(None),
                generation: AtomicU64::new(0),
                connecting: tokio::sync::Mutex::new(None),
            }),
        };
        connection.current().await?;
        Ok(connection)
    }

    /// The connection to the primary, asking the Sentinels for it if there is none.
    async fn current(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        if let Some(current) = self.cached() {
            return Ok(current);
        }
        let mut last_failure = self.shared.connecting.lock().await;
        // Another command may have connected while this one waited.
        if let Some(current) = self.cached() {
            return Ok(current);
        }
        if let Some((when, error)) = last_failure.as_ref()
            && when.elapsed() < RETRY_AFTER_FAILURE
        {
            return Err(error.clone());
        }
        let connected = async {
            let client = self.shared.resolver.primary().await?;
            client
                .get_multiplexed_async_connection_with_config(&self.shared.config)
                .await
        }
        .await;
        match connected {
            Ok(connection) => {
                *last_failure = None;
                let generation = self.shared.generation.fetch_add(1, Ordering::Relaxed) + 1;
                let current = (generation, connection);
                *self.lock() = Some(current.clone());
                Ok(current)
            }
            Err(error) => {
                *last_failure = Some((Instant::now(), error.clone()));
                Err(error)
            }
        }
    }

    fn cached(&self) -> Option<(u64, MultiplexedConnection)> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(u64, MultiplexedConnection)>> {
        self.shared
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops the connection of `generation`, if it is still the current one.
    fn forget(&self, generation: u64) {
        let mut current = self.lock();
        if current
            .as_ref()
            .is_some_and(|(current, _)| *current == generation)
        {
            tracing::debug!("RedisStore: connection to the primary lost; asking Sentinel again");
            *current = None;
        }
    }

    /// Runs `exchange` on the current connection, dropping the connection if the exchange
    /// shows that it no longer reaches a primary, or if it is cut short.
    async fn exchange<T>(
        &self,
        exchange: impl AsyncFnOnce(&mut MultiplexedConnection) -> RedisResult<T>,
        failed: impl Fn(&T) -> bool,
    ) -> RedisResult<T> {
        let (generation, mut connection) = self.current().await?;
        let mut pending = Pending {
            connection: self,
            generation,
            done: false,
        };
        let reply = exchange(&mut connection).await;
        pending.done = true;
        let lost = match &reply {
            Err(error) => connection_lost(error),
            Ok(reply) => failed(reply),
        };
        if lost {
            self.forget(generation);
        }
        reply
    }
}

/// An exchange in progress: if it is dropped before its reply (the store's response timeout
/// cut it short), the primary may be hanging: the connection is dropped.
struct Pending<'a> {
    connection: &'a SentinelConnection,
    generation: u64,
    done: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.connection.forget(self.generation);
        }
    }
}

/// Whether `error` means the connection no longer reaches a primary.
fn connection_lost(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_unrecoverable_error()
        || error.is_timeout()
        || error.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
}

/// Whether a pipeline's replies (errors included) say the node was demoted.
fn demoted(replies: &[Value]) -> bool {
    replies.iter().any(|reply| match reply {
        Value::ServerError(error) => error.kind() == Some(ServerErrorKind::ReadOnly),
        _ => false,
    })
}

impl ConnectionLike for SentinelConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            self.exchange(
                async |connection: &mut MultiplexedConnection| {
                    connection.req_packed_command(cmd).await
                },
                |reply| demoted(std::slice::from_ref(reply)),
            )
            .await
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            self.exchange(
                async |connection: &mut MultiplexedConnection| {
                    connection
                        .req_packed_commands(pipeline, offset, count)
                        .await
                },
                |replies| demoted(replies),
            )
            .await
        })
    }

    fn get_db(&self) -> i64 {
        self.cached()
            .map_or(0, |(_, connection)| connection.get_db())
    }
}

impl fmt::Debug for SentinelConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SentinelConnection")
            .field(
                "generation",
                &self.shared.generation.load(Ordering::Relaxed),
            )
            .field("connected", &self.cached().is_some())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_errors_that_mean_another_primary_drop_the_connection() {
        let parse = |resp: &[u8]| {
            ::redis::parse_redis_value(resp)
                .and_then(Value::extract_error)
                .err()
        };
        let cases: [(Option<RedisError>, bool); 6] = [
            (
                parse(b"-READONLY You can't write against a read only replica.\r\n"),
                true,
            ),
            (
                Some(RedisError::from(std::io::Error::from(
                    std::io::ErrorKind::ConnectionReset,
                ))),
                true,
            ),
            (
                Some(RedisError::from(std::io::Error::from(
                    std::io::ErrorKind::ConnectionRefused,
                ))),
                true,
            ),
            (parse(b"-NOSCRIPT No matching script.\r\n"), false),
            (parse(b"-WRONGTYPE Operation against a key\r\n"), false),
            (parse(b"-ERR syntax error\r\n"), false),
        ];
        for (error, lost) in cases {
            let Some(error) = error else {
                panic!("an error reply parses as an error");
            };
            assert_eq!(connection_lost(&error), lost, "{error}");
        }
        let readonly =
            ::redis::parse_redis_value(b"-READONLY You can't write.\r\n").unwrap_or(Value::Nil);
        assert!(demoted(&[Value::Int(1), readonly]));
        assert!(!demoted(&[Value::Int(1), Value::Nil]));
    }
}
