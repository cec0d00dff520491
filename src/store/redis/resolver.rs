//! Where the primary is, as Redis Sentinel says: shared by a [`SentinelConnection`](super::SentinelConnection)
//! and the store's notification subscriber.

use ::redis::{Client, ErrorKind, RedisError, RedisResult, sentinel::SentinelClient};

/// Where the primary is, as the Sentinels say: shared by the store's connection and its
/// notification subscriber.
pub(super) struct Resolver {
    sentinel: tokio::sync::Mutex<SentinelClient>,
}

impl Resolver {
    pub(super) fn new(sentinel: SentinelClient) -> Self {
        Self {
            sentinel: tokio::sync::Mutex::new(sentinel),
        }
    }

    /// A client for the node the Sentinels name primary now (checked with `ROLE`).
    ///
    /// In a failover the Sentinels may name no primary for a moment: that is an I/O error
    /// here (the store's [`Unavailable`](crate::StoreErrorKind::Unavailable)), not a
    /// misconfiguration.
    pub(super) async fn primary(&self) -> RedisResult<Client> {
        let client = self.sentinel.lock().await.async_get_client().await;
        client.map_err(|error| match error.kind() {
            ErrorKind::MasterNameNotFoundBySentinel | ErrorKind::NoValidReplicasFoundBySentinel => {
                RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    format!("the Sentinels name no reachable primary: {error}"),
                ))
            }
            _ => error,
        })
    }
}
