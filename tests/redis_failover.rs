//! `RedisStore` across a failover, against real servers started here on loopback: a primary,
//! one replica and three Sentinels, or a Redis Cluster with a replica per master. Two layer
//! instances run a mixed load of keys with retries; the primary (or a master) is SIGKILLed
//! mid-load and its replica promoted.
//!
//! With `Durability::replicas(1)`: no key runs twice, no answered key loses its record, every
//! answer of a key is the same, and 503s come only during the failover. Without it, the same
//! run reports what was lost (printed; run with `--nocapture`). `scripts/soak.sh failover`
//! runs longer ones.
#![cfg(feature = "redis")]

mod common;

use std::time::{Duration, Instant};

use tower_idempotency::{
    AdminStore, Claim, IdempotencyLayer, IdempotencyStore, RedisStore, StoreErrorKind, WaitMode,
    redis::Durability,
};

use common::{
    conformance::{fingerprint, fresh_key, sample_record},
    failover::{Load, Outcome},
    redis_ha::{Node, ReplicatedCluster, SERVICE, SentinelGroup, eventually_sync, report},
};

/// Each test starts a primary, a replica and three Sentinels (or a cluster) and puts them
/// under load: run one at a time, so that no test's failover is timed by another's load.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long the load runs before the kill, and after the first answer following promotion.
const BEFORE: Duration = Duration::from_millis(1_500);
const AFTER: Duration = Duration::from_millis(1_500);
const CONCURRENCY: usize = 16;
/// The rule a durable deployment must keep: a completion cut off by the failover is retried
/// while its lease lasts (from the claim, or its last renewal: a renewal goes out every third
/// of the lease), so at least two thirds of the lease must outlast the failover, from the
/// kill until the store writes on the promoted node, plus [`RETRY_MARGIN`]
/// ([`assert_lease_outlasts`]). Below the wait bound ([`WAIT`]) so that a record lost by the
/// failover is caught in `Load::finish`: its retry, held by the claim left behind, runs again
/// once the lease ends, and is counted.
const LEASE: Duration = Duration::from_secs(10);
const WAIT: Duration = Duration::from_secs(12);
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);
/// The default: shorter, a replica slowed by the load (two cores) misses it now and then,
/// and the claims refused while the store stops asking are 503s outside the failover.
const ACK_TIMEOUT: Duration = Duration::from_millis(500);
/// What a completion's retry may add to the failover: the longest pause between attempts
/// (the lease's `RETRY_MAX`, 1 s) and one attempt's own bound (the response timeout and the
/// acknowledgement's).
const RETRY_MARGIN: Duration = Duration::from_secs(1)
    .saturating_add(RESPONSE_TIMEOUT)
    .saturating_add(ACK_TIMEOUT);

/// Runs blocking process work off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("the blocking step")
}

/// What a failover run measured, from the kill.
struct Timeline {
    /// Until the Sentinels (or the cluster) named the replica primary.
    promoted: Duration,
    /// Until the first first-execution or replay answered after the promotion.
    recovered: Duration,
}

fn layer<C>(store: RedisStore<C>) -> IdempotencyLayer<RedisStore<C>>
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    IdempotencyLayer::new(store)
        .with_lease(LEASE)
        .with_wait_mode(WaitMode::Wait(WAIT))
}

fn summary(name: &str, outcome: &Outcome, timeline: &Timeline, kill_at: Duration) -> String {
    let last_503 = outcome
        .unavailable
        .iter()
        .max()
        .map(|at| at.saturating_sub(kill_at));
    format!(
        "{name}: {} requests, {} keys executed; promoted {:?} after the kill, first answer {:?} \
         after it, last 503 {last_503:?} after it; {} 503s, {} 409s, other {:?}; \
         executed twice: {}, answers differing: {}, records lost: {}, unanswered at the end: {}",
        outcome.requests,
        outcome.executions.len(),
        timeline.promoted,
        timeline.recovered,
        outcome.unavailable.len(),
        outcome.conflicts.len(),
        outcome.other,
        outcome.executed_twice().len(),
        outcome.inconsistent().len(),
        outcome.lost_records.len(),
        outcome.unanswered.len(),
    )
}

/// The failover was short enough for the lease: every completion it cut off could be
/// retried onto the promoted node before its lease ended, its last retry's pause and bound
/// included. (The first answer after the promotion, a replay or a first execution, stands
/// in for when the store writes there again.)
fn assert_lease_outlasts(name: &str, timeline: &Timeline) {
    assert!(
        timeline.recovered + RETRY_MARGIN < LEASE * 2 / 3,
        "{name}: the failover lasted {:?}, which with a completion's retry ({RETRY_MARGIN:?}) is \
         more than two thirds of the {LEASE:?} lease: a completion it cut off may run out of \
         lease before it lands (see README, Choosing a store); the run proves nothing",
        timeline.recovered
    );
}

/// What a durable run must show.
fn assert_nothing_lost(name: &str, outcome: &Outcome, kill_at: Duration, timeline: &Timeline) {
    assert_lease_outlasts(name, timeline);
    assert!(outcome.executions.len() > 50, "{name}: the load ran");
    assert!(
        outcome.executed_twice().is_empty(),
        "{name}: keys executed twice: {:?}",
        outcome.executed_twice()
    );
    assert!(
        outcome.inconsistent().is_empty(),
        "{name}: keys answered with different executions: {:?}",
        outcome.inconsistent()
    );
    assert!(
        outcome.lost_records.is_empty(),
        "{name}: records lost: {:?}",
        outcome.lost_records
    );
    assert!(outcome.other.is_empty(), "{name}: {:?}", outcome.other);
    let window = kill_at..kill_at + timeline.recovered + Duration::from_secs(3);
    for at in &outcome.unavailable {
        assert!(
            window.contains(at),
            "{name}: a 503 at {at:?}, outside the failover ({window:?})"
        );
    }
}

/// A primary, a replica and three Sentinels; two instances under load; the primary killed.
/// Returns the run's outcome, when the kill came (from the load's start), and the timeline.
async fn sentinel_failover(durability: Durability) -> (Outcome, Duration, Timeline) {
    let group = blocking(|| SentinelGroup::start(Duration::from_millis(1_000))).await;
    let connect = || async {
        RedisStore::connect_sentinel(group.sentinel_urls(), SERVICE)
            .await
            .expect("connect through the Sentinels")
            .with_durability(durability)
            .with_response_timeout(RESPONSE_TIMEOUT)
    };
    let (first, second) = (connect().await, connect().await);
    let load = Load::start([layer(first), layer(second)], CONCURRENCY, "sentinel");
    tokio::time::sleep(BEFORE).await;
    let (replica_port, mut group) = (group.replica.port(), group);
    let killed = Instant::now();
    let kill_at = load.elapsed();
    group = blocking(move || {
        group.primary.kill();
        group
    })
    .await;
    group = blocking(move || {
        eventually_sync(
            "the Sentinels promote the replica",
            Duration::from_secs(30),
            || group.primary_port_by_sentinels() == Some(replica_port),
        );
        group
    })
    .await;
    let promoted = killed.elapsed();
    // A supervisor restarts the crashed process once every Sentinel names the new primary,
    // as a replica of it and never promotable while it is empty (`restart_as_replica_of`):
    // restarted as an empty primary, a Sentinel not yet told of the promotion may name it,
    // and a second failover to it before its first sync would lose every record.
    group = blocking(move || {
        eventually_sync(
            "every Sentinel names the new primary",
            Duration::from_secs(30),
            || group.all_name_primary(replica_port),
        );
        group.primary.restart_as_replica_of(replica_port);
        group
    })
    .await;
    let after_promotion = Instant::now();
    // With one replica, a durable claim needs the restarted node synced again.
    let deadline = Instant::now() + Duration::from_secs(45);
    while !load.answered_since(after_promotion) {
        assert!(Instant::now() < deadline, "no answer after the promotion");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let recovered = killed.elapsed();
    tokio::time::sleep(AFTER).await;
    let outcome = load.finish(killed).await;

    // The topology held: the promoted replica is still the primary, every Sentinel names it,
    // and the restarted node is its replica (no second failover).
    let (topology, group) = blocking(move || {
        let topology = (
            group.replica.role(),
            group.all_name_primary(replica_port),
            group.primary.role(),
        );
        (topology, group)
    })
    .await;
    assert_eq!(
        topology,
        ("master".to_owned(), true, "slave".to_owned()),
        "the promoted replica stays the primary, the restarted node its replica"
    );
    drop(group);
    (
        outcome,
        kill_at,
        Timeline {
            promoted,
            recovered,
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_durability_a_sentinel_failover_loses_nothing_and_runs_nothing_twice() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let durability = Durability::replicas(1).with_timeout(ACK_TIMEOUT);
    let (outcome, kill_at, timeline) = sentinel_failover(durability).await;
    report(&summary(
        "sentinel, Durability::replicas(1)",
        &outcome,
        &timeline,
        kill_at,
    ));
    assert_nothing_lost("sentinel", &outcome, kill_at, &timeline);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_durability_a_sentinel_failover_is_survived_and_what_it_lost_is_reported() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let (outcome, kill_at, timeline) = sentinel_failover(Durability::none()).await;
    report(&summary(
        "sentinel, Durability::none()",
        &outcome,
        &timeline,
        kill_at,
    ));
    assert!(outcome.executions.len() > 50, "the load ran");
    assert!(outcome.other.is_empty(), "{:?}", outcome.other);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_sentinel_a_store_fails_fast_in_a_failover_then_follows_the_promotion_waiters_too()
{
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let group = blocking(|| SentinelGroup::start(Duration::from_millis(1_000))).await;
    let connect = || async {
        RedisStore::connect_sentinel(group.sentinel_urls(), SERVICE)
            .await
            .expect("connect through the Sentinels")
            .with_response_timeout(RESPONSE_TIMEOUT)
    };
    let store = connect().await;
    // A waiter subscribed before the failover, woken only by notifications (or in 30 s).
    let waiter = connect().await.with_poll_interval(Duration::from_secs(30));
    waiter
        .wait(&fresh_key(), Duration::from_millis(10))
        .await
        .expect("the subscriber starts");
    store
        .claim(&fresh_key(), &fingerprint("a"), LEASE)
        .await
        .expect("a claim");

    let (replica_port, mut group) = (group.replica.port(), group);
    group = blocking(move || {
        group.primary.kill();
        group
    })
    .await;
    let killed = Instant::now();
    // Until a replica is promoted, every command fails fast as unavailable (503), none hangs.
    for _ in 0..3 {
        let started = Instant::now();
        let error = store
            .claim(&fresh_key(), &fingerprint("a"), LEASE)
            .await
            .expect_err("no primary to claim on");
        assert_eq!(error.kind(), StoreErrorKind::Unavailable, "{error}");
        assert!(started.elapsed() < RESPONSE_TIMEOUT * 3);
    }
    group = blocking(move || {
        eventually_sync(
            "the Sentinels promote the replica",
            Duration::from_secs(30),
            || group.primary_port_by_sentinels() == Some(replica_port),
        );
        group
    })
    .await;
    let promoted = killed.elapsed();
    // The same store claims on the promoted replica, without a restart. (The old primary
    // stays down: nothing but following the Sentinels reaches the new one.)
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match store.claim(&fresh_key(), &fingerprint("a"), LEASE).await {
            Ok(Claim::Acquired(_)) => break,
            Ok(other) => panic!("a fresh key is free: {other:?}"),
            Err(error) => {
                assert_eq!(error.kind(), StoreErrorKind::Unavailable, "{error}");
                assert!(Instant::now() < deadline, "no claim after the promotion");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    report(&format!(
        "sentinel: promoted {promoted:?} after the kill, the store claimed again {:?} after it",
        killed.elapsed()
    ));

    // The waiter's subscription followed too: a completion on the new primary wakes it at
    // once. (Its own connection to the old primary fails the first command it carries after
    // the failover: a failed command is never resent.)
    let _ = waiter.inspect(&fresh_key()).await;
    let key = fresh_key();
    let Claim::Acquired(token) = store
        .claim(&key, &fingerprint("a"), Duration::from_secs(30))
        .await
        .expect("a claim on the new primary")
    else {
        panic!("a fresh key is free");
    };
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        waiter
            .wait(&key, Duration::from_secs(20))
            .await
            .map(|()| started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    store
        .complete(
            &key,
            token,
            sample_record(fingerprint("a")),
            Duration::from_secs(60),
        )
        .await
        .expect("a completion on the new primary");
    let waited = tokio::time::timeout(Duration::from_secs(25), waiting)
        .await
        .expect("the wait ends")
        .expect("the wait task")
        .expect("the wait");
    assert!(
        waited < Duration::from_millis(2_500),
        "the waiter was woken by the new primary's notification, after {waited:?}"
    );
    drop(group);
}

/// A cluster of three masters with a replica each; two instances under load; a master
/// killed and its replica promoted by the cluster.
async fn cluster_failover(durability: Durability) -> (Outcome, Duration, Timeline) {
    let cluster = blocking(|| ReplicatedCluster::start(Duration::from_millis(1_000))).await;
    let connect = || async {
        RedisStore::connect_cluster(cluster.urls())
            .await
            .expect("connect to the cluster")
            .with_durability(durability)
            .with_response_timeout(RESPONSE_TIMEOUT)
    };
    let (first, second) = (connect().await, connect().await);
    let load = Load::start([layer(first), layer(second)], CONCURRENCY, "cluster");
    tokio::time::sleep(BEFORE).await;
    let victim = cluster
        .nodes
        .iter()
        .position(|node| node.role() == "master")
        .expect("a master");
    let replica_of_victim = replica_of(&cluster.nodes, victim);
    let killed = Instant::now();
    let kill_at = load.elapsed();
    let mut cluster = cluster;
    cluster = blocking(move || {
        cluster.nodes[victim].kill();
        eventually_sync(
            "the cluster promotes the replica",
            Duration::from_secs(30),
            || {
                let node = &cluster.nodes[replica_of_victim];
                node.role() == "master"
                    && node.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok")
            },
        );
        cluster
    })
    .await;
    let promoted = killed.elapsed();
    // The crashed node is replaced by a fresh one, a replica of the promoted one.
    cluster = blocking(move || {
        cluster.add_replica_of(replica_of_victim, Duration::from_millis(1_000));
        cluster
    })
    .await;
    let after_promotion = Instant::now();
    // With one replica, a durable claim needs the fresh replica synced.
    let deadline = Instant::now() + Duration::from_secs(45);
    while !load.answered_since(after_promotion) {
        assert!(Instant::now() < deadline, "no answer after the promotion");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let recovered = killed.elapsed();
    tokio::time::sleep(AFTER).await;
    let outcome = load.finish(killed).await;
    drop(cluster);
    (
        outcome,
        kill_at,
        Timeline {
            promoted,
            recovered,
        },
    )
}

/// The index of the replica of `nodes[master]`.
fn replica_of(nodes: &[Node], master: usize) -> usize {
    let id = nodes[master].cli(&["CLUSTER", "MYID"]).trim().to_owned();
    nodes
        .iter()
        .position(|node| {
            node.cli(&["INFO", "replication"])
                .contains(&format!("master_port:{}", nodes[master].port()))
        })
        .unwrap_or_else(|| panic!("no replica of {id}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_durability_a_cluster_master_failover_loses_nothing_and_runs_nothing_twice() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let durability = Durability::replicas(1).with_timeout(ACK_TIMEOUT);
    let (outcome, kill_at, timeline) = cluster_failover(durability).await;
    report(&summary(
        "cluster, Durability::replicas(1)",
        &outcome,
        &timeline,
        kill_at,
    ));
    assert_nothing_lost("cluster", &outcome, kill_at, &timeline);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_durability_a_cluster_master_failover_is_survived_and_what_it_lost_is_reported() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let (outcome, kill_at, timeline) = cluster_failover(Durability::none()).await;
    report(&summary(
        "cluster, Durability::none()",
        &outcome,
        &timeline,
        kill_at,
    ));
    assert!(outcome.executions.len() > 50, "the load ran");
    assert!(outcome.other.is_empty(), "{:?}", outcome.other);
}
