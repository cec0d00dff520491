//! The eviction guard: at connect, whether Redis may evict the store's keys under memory
//! pressure, and a warning if it may.
//!
//! Every claim and every record has an expiry, so both the `volatile-*` policies (which
//! evict keys with an expiry) and the `allkeys-*` ones can evict them, once `maxmemory` is
//! reached. An evicted claim lets a duplicate run beside the request in flight; an evicted
//! record lets a retry run again. Only `noeviction` (writes fail instead, which the layer
//! answers with 503) keeps them, or no `maxmemory` at all.
//!
//! The store warns rather than refusing to start: managed services set an evicting policy by
//! default (ElastiCache, Azure Cache and Memorystore all default to `volatile-lru`), where
//! refusing would stop every deployment at its next upgrade, and the policy can be changed
//! at run time anyway (`CONFIG SET`), so a check at connect is no guarantee to rely on. A
//! server that refuses `CONFIG GET` (managed Redis often renames or forbids it) gets a warning
//! that the check was skipped, never a failure.

use ::redis::{Cmd, Value, aio::ConnectionLike};

use super::{connect::RedisStore, error::store_error};

/// What the server's memory settings mean for the store's keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Eviction {
    /// `noeviction`, or no memory limit: Redis never evicts.
    Never,
    /// A policy that may evict the store's keys once the memory limit is reached.
    Possible { policy: String, maxmemory: u64 },
    /// A policy this crate does not know.
    Unknown { policy: String },
}

impl Eviction {
    /// The verdict on `maxmemory-policy` and `maxmemory` (bytes; 0 is no limit).
    pub(super) fn judge(policy: &str, maxmemory: u64) -> Self {
        let policy = policy.trim().to_ascii_lowercase();
        let evicting = [
            "volatile-lru",
            "volatile-lfu",
            "volatile-random",
            "volatile-ttl",
            "allkeys-lru",
            "allkeys-lfu",
            "allkeys-random",
        ];
        if policy == "noeviction" {
            Self::Never
        } else if evicting.contains(&policy.as_str()) {
            if maxmemory == 0 {
                Self::Never
            } else {
                Self::Possible { policy, maxmemory }
            }
        } else {
            Self::Unknown { policy }
        }
    }

    /// The verdict on the replies to `CONFIG GET maxmemory-policy` and `CONFIG GET
    /// maxmemory`, or `None` if they are not what those commands answer.
    pub(super) fn from_replies(policy: &Value, maxmemory: &Value) -> Option<Self> {
        let policy = config_value(policy, "maxmemory-policy")?;
        let maxmemory = config_value(maxmemory, "maxmemory")?.trim().parse().ok()?;
        Some(Self::judge(&policy, maxmemory))
    }
}

/// The value of `name` in a `CONFIG GET` reply (an array of names and values under RESP2, a
/// map under RESP3).
fn config_value(reply: &Value, name: &str) -> Option<String> {
    let text = |value: &Value| match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    };
    match reply {
        Value::Array(items) => items
            .chunks(2)
            .find(|pair| pair.first().and_then(text).as_deref() == Some(name))
            .and_then(|pair| pair.get(1).and_then(text)),
        Value::Map(pairs) => pairs
            .iter()
            .find(|(key, _)| text(key).as_deref() == Some(name))
            .and_then(|(_, value)| text(value)),
        _ => None,
    }
}

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Reads the server's eviction settings (on a cluster, those of one node) and warns if
    /// they may evict the store's keys, or if they could not be read. Never fails.
    pub(super) async fn warn_if_evicting(&self) {
        let mut connection = self.connection.clone();
        let mut policy = Cmd::new();
        policy.arg("CONFIG").arg("GET").arg("maxmemory-policy");
        let mut maxmemory = Cmd::new();
        maxmemory.arg("CONFIG").arg("GET").arg("maxmemory");
        let read = async {
            let policy = policy.query_async::<Value>(&mut connection).await?;
            let maxmemory = maxmemory.query_async::<Value>(&mut connection).await?;
            Ok((policy, maxmemory))
        };
        let verdict = match self.bounded(read, store_error).await {
            Ok((policy, maxmemory)) => Eviction::from_replies(&policy, &maxmemory),
            Err(error) => {
                tracing::warn!(
                    %error,
                    "RedisStore could not read maxmemory-policy (CONFIG GET refused?): the check that Redis does not evict claims and records was skipped"
                );
                return;
            }
        };
        match verdict {
            Some(Eviction::Never) => {}
            Some(Eviction::Possible { policy, maxmemory }) => tracing::warn!(
                policy,
                maxmemory,
                "Redis may evict idempotency claims and records under memory pressure (every one has an expiry): an evicted claim lets a duplicate run, an evicted record lets a retry run again; set maxmemory-policy noeviction"
            ),
            Some(Eviction::Unknown { policy }) => tracing::warn!(
                policy,
                "unknown maxmemory-policy: RedisStore cannot tell whether Redis may evict its claims and records"
            ),
            None => tracing::warn!(
                "RedisStore could not read maxmemory-policy (unexpected reply): the check that Redis does not evict claims and records was skipped"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_that_may_evict_keys_with_an_expiry_are_told_apart() {
        let possible = |policy: &str, maxmemory| Eviction::Possible {
            policy: policy.to_owned(),
            maxmemory,
        };
        let cases = [
            ("noeviction", 0, Eviction::Never),
            ("noeviction", 1 << 30, Eviction::Never),
            ("volatile-lru", 0, Eviction::Never),
            ("allkeys-lru", 0, Eviction::Never),
            ("volatile-lru", 100, possible("volatile-lru", 100)),
            ("volatile-lfu", 100, possible("volatile-lfu", 100)),
            ("volatile-random", 100, possible("volatile-random", 100)),
            ("volatile-ttl", 100, possible("volatile-ttl", 100)),
            ("allkeys-lru", 100, possible("allkeys-lru", 100)),
            ("allkeys-lfu", 100, possible("allkeys-lfu", 100)),
            ("allkeys-random", 100, possible("allkeys-random", 100)),
            ("AllKeys-LRU ", 100, possible("allkeys-lru", 100)),
            (
                "volatile-future",
                100,
                Eviction::Unknown {
                    policy: "volatile-future".to_owned(),
                },
            ),
            (
                "",
                0,
                Eviction::Unknown {
                    policy: String::new(),
                },
            ),
        ];
        for (policy, maxmemory, expected) in cases {
            assert_eq!(
                Eviction::judge(policy, maxmemory),
                expected,
                "{policy:?} {maxmemory}"
            );
        }
    }

    #[test]
    fn config_replies_are_read_in_either_protocol_and_odd_ones_give_no_verdict() {
        let bulk = |text: &str| Value::BulkString(text.as_bytes().to_vec());
        let resp2 = |name: &str, value: &str| Value::Array(vec![bulk(name), bulk(value)]);
        let resp3 = |name: &str, value: &str| Value::Map(vec![(bulk(name), bulk(value))]);
        let cases = [
            (
                resp2("maxmemory-policy", "allkeys-lru"),
                resp2("maxmemory", "1024"),
                Some(Eviction::Possible {
                    policy: "allkeys-lru".to_owned(),
                    maxmemory: 1024,
                }),
            ),
            (
                resp3("maxmemory-policy", "noeviction"),
                resp3("maxmemory", "0"),
                Some(Eviction::Never),
            ),
            (Value::Array(vec![]), resp2("maxmemory", "0"), None),
            (
                resp2("maxmemory-policy", "allkeys-lru"),
                resp2("maxmemory", "lots"),
                None,
            ),
            (
                resp2("maxmemory-policy", "allkeys-lru"),
                Value::Array(vec![bulk("maxmemory")]),
                None,
            ),
            (Value::Nil, Value::Int(3), None),
            (
                Value::Array(vec![bulk("maxmemory-policy"), Value::Int(1)]),
                resp2("maxmemory", "0"),
                None,
            ),
        ];
        for (policy, maxmemory, expected) in cases {
            assert_eq!(
                Eviction::from_replies(&policy, &maxmemory),
                expected,
                "{policy:?} {maxmemory:?}"
            );
        }
    }
}
