//! The eviction guard: `RedisStore::connect` warns when Redis may evict claims and records
//! (every one has an expiry), and when it cannot tell because `CONFIG GET` is refused, as
//! managed Redis often does; it never fails for either.
#![cfg(feature = "redis")]

mod common;

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use tower_idempotency::{IdempotencyStore, RedisStore};

use common::{
    conformance::{fingerprint, fresh_key},
    redis_ha::Node,
};

/// Everything logged at `warn` while `connect` runs, as text.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Starts a server with `extra` arguments, connects a store to it and returns what was
/// logged at `warn` or above while connecting; the store must work.
async fn warnings_at_connect(extra: &'static [&'static str]) -> String {
    let server = tokio::task::spawn_blocking(|| Node::server(extra))
        .await
        .expect("start the server");
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer({
            let captured = captured.clone();
            move || captured.clone()
        })
        .finish();
    let store = {
        let _guard = tracing::subscriber::set_default(subscriber);
        RedisStore::connect(&server.url())
            .await
            .expect("the check never fails the connection")
    };
    store
        .claim(
            &fresh_key(),
            &fingerprint("a"),
            std::time::Duration::from_secs(30),
        )
        .await
        .expect("the store works");
    let logged = captured
        .0
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    String::from_utf8_lossy(&logged).into_owned()
}

#[tokio::test]
async fn connect_warns_once_when_redis_may_evict_claims_and_records_and_only_then() {
    // (server arguments, expected in the warnings, or nothing logged)
    let cases: [(&'static [&'static str], Option<&str>); 6] = [
        (&[], None),
        (
            &["--maxmemory", "64mb", "--maxmemory-policy", "noeviction"],
            None,
        ),
        // No memory limit: nothing is ever evicted, whatever the policy.
        (&["--maxmemory-policy", "allkeys-lru"], None),
        (
            &["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"],
            Some("allkeys-lru"),
        ),
        (
            &["--maxmemory", "64mb", "--maxmemory-policy", "volatile-ttl"],
            Some("volatile-ttl"),
        ),
        (
            &["--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru"],
            Some("volatile-lru"),
        ),
    ];
    for (extra, expected) in cases {
        let warnings = warnings_at_connect(extra).await;
        match expected {
            None => assert!(warnings.is_empty(), "{extra:?}: {warnings}"),
            Some(policy) => {
                assert_eq!(
                    warnings.lines().count(),
                    1,
                    "{extra:?}: one warning: {warnings}"
                );
                assert!(
                    warnings.contains("may evict") && warnings.contains(policy),
                    "{extra:?}: {warnings}"
                );
            }
        }
    }
}

#[tokio::test]
async fn a_server_that_refuses_config_get_gets_a_warning_that_the_check_was_skipped() {
    let warnings = warnings_at_connect(&["--rename-command", "CONFIG", ""]).await;
    assert_eq!(warnings.lines().count(), 1, "one warning: {warnings}");
    assert!(
        warnings.contains("check") && warnings.contains("skipped"),
        "{warnings}"
    );
}
