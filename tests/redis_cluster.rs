//! `RedisStore` on a Redis Cluster of three primaries: the conformance suite, and two
//! instances sharing the cluster.
#![cfg(feature = "redis")]

mod common;

use std::{collections::BTreeSet, sync::OnceLock, time::Duration};

use tower_idempotency::{Claim, IdempotencyStore, RedisStore};

use common::{
    conformance::{fingerprint, fresh_key, sample_record},
    redis_server::RedisCluster,
    scenarios,
};

/// One cluster for the whole test binary; it stops with it.
fn cluster() -> &'static RedisCluster {
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| RedisCluster::start(3))
}

async fn connect() -> RedisStore<redis::cluster_async::ClusterConnection> {
    RedisStore::connect_cluster(cluster().urls())
        .await
        .expect("connect to the test cluster")
}

conformance_suite!(async { connect().await });
admin_conformance_suite!(async { connect().await });

#[cfg(feature = "axum")]
operations_suite!(async { connect().await });

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_across_two_instances_run_the_handler_once_on_a_cluster() {
    scenarios::concurrent_duplicates_across_two_instances_run_the_handler_once(
        connect().await,
        connect().await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_spread_over_every_primary_one_key_each() {
    let store = connect().await;
    let mut keys = Vec::new();
    for _ in 0..60 {
        let key = fresh_key();
        let Claim::Acquired(token) = store
            .claim(&key, &fingerprint("a"), Duration::from_secs(30))
            .await
            .expect("a claim")
        else {
            panic!("a fresh key is free");
        };
        store
            .complete(
                &key,
                token,
                sample_record(fingerprint("a")),
                Duration::from_secs(60),
            )
            .await
            .expect("a completion");
        keys.push(store.redis_key(&key));
    }
    let mut holders = BTreeSet::new();
    for key in &keys {
        let owners: Vec<u16> = cluster()
            .nodes()
            .iter()
            .filter(|node| node.cli(&["EXISTS", key]).trim() == "1")
            .map(|node| node.port())
            .collect();
        assert_eq!(owners.len(), 1, "{key} is one key on one node");
        holders.extend(owners);
    }
    assert_eq!(
        holders.len(),
        3,
        "every primary holds some of the 60 records"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_connected_through_another_node_is_woken_across_the_cluster() {
    // Each store receives notifications through the first node it was given: give them
    // different ones, so the message must cross the cluster bus.
    let urls = cluster().urls();
    let mut reversed = urls.clone();
    reversed.reverse();
    let owner = RedisStore::connect_cluster(&urls).await.expect("connect");
    let waiter = RedisStore::connect_cluster(&reversed)
        .await
        .expect("connect")
        .with_poll_interval(Duration::from_secs(30));
    let key = fresh_key();
    let Claim::Acquired(token) = owner
        .claim(&key, &fingerprint("a"), Duration::from_secs(30))
        .await
        .expect("a claim")
    else {
        panic!("a fresh key is free");
    };
    let waiting = tokio::spawn(async move {
        let started = std::time::Instant::now();
        waiter
            .wait(&key, Duration::from_secs(20))
            .await
            .map(|()| started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    owner
        .complete(
            &key,
            token,
            sample_record(fingerprint("a")),
            Duration::from_secs(60),
        )
        .await
        .expect("a completion");
    let waited = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the wait ends")
        .expect("the wait task")
        .expect("the wait");
    assert!(
        waited < Duration::from_millis(1_500),
        "woken by the published completion, after {waited:?}"
    );
}
