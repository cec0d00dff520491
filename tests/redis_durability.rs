//! `RedisStore::with_durability`: a claim and a completion acknowledged by replicas (`WAIT`,
//! and `WAITAOF` where the server has it) in the same round trip as the write, against a real
//! primary and replica; what happens when fewer acknowledge in time.
#![cfg(feature = "redis")]

mod common;

use std::{collections::BTreeMap, time::Duration};

use http::StatusCode;
use tower_idempotency::{
    AdminStore, Claim, FenceToken, IdempotencyLayer, IdempotencyStore, ProblemKind, RedisStore,
    StoreErrorKind, redis::Durability,
};

use common::{
    conformance::{fingerprint, fresh_key, sample_record},
    redis_ha::{Node, server_version},
    redis_server::command_counts,
    service::{Handler, keyed_post, send, serve},
};

const LEASE: Duration = Duration::from_secs(30);

/// One test at a time: the shortfall counters are read as differences of running totals, which
/// any test that runs at the same time and falls short would add to (and a test's `WAIT`s,
/// timed against the response timeout, should not compete with another's for the CPU).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn connect(node: &Node, durability: Durability) -> RedisStore {
    RedisStore::connect(&node.url())
        .await
        .expect("connect to the test server")
        .with_durability(durability)
}

/// Stops or starts servers off the async workers (it waits for the process).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("the blocking step")
}

/// The counts of the commands a store sends, leaving out what replication itself runs.
fn store_commands(node: &Node) -> BTreeMap<String, u64> {
    command_counts(node.port())
        .into_iter()
        .filter(|(name, _)| !matches!(name.as_str(), "replconf" | "ping" | "psync" | "sync"))
        .collect()
}

/// Waits (bounded) until `node` has at least `clients` client connections besides replicas
/// and the `redis-cli` that asks: a store's lanes open in the background.
async fn await_clients(node: &Node, clients: usize) {
    for _ in 0..100 {
        let list = node.cli(&["CLIENT", "LIST"]);
        let count = list
            .lines()
            .filter(|line| !line.contains("flags=S") && !line.contains("cmd=client|list"))
            .count();
        if count >= clients {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("fewer than {clients} clients connected within 5 s");
}

/// Claims a fresh key and completes it: one first execution, as the layer runs it.
async fn claim_and_complete(store: &RedisStore) {
    let key = fresh_key();
    let Claim::Acquired(token) = store
        .claim(&key, &fingerprint("a"), LEASE)
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
}

/// The shortfalls counted for `op` so far in this test binary. A snapshot takes (and resets)
/// every counter, whichever test asks: each one's counts are added to running totals, so
/// that tests running at once do not take each other's.
#[cfg(feature = "metrics")]
fn shortfalls(op: &str) -> u64 {
    use std::{
        collections::HashMap,
        sync::{Mutex, OnceLock},
    };

    use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    static TOTALS: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);
    let snapshotter = SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("the only recorder in this test binary");
        snapshotter
    });
    let mut totals = TOTALS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let totals = totals.get_or_insert_with(HashMap::new);
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        if key.name() != "idempotency_store_acknowledgement_shortfalls_total" {
            continue;
        }
        let (Some(label), DebugValue::Counter(n)) =
            (key.labels().find(|label| label.key() == "op"), value)
        else {
            continue;
        };
        *totals.entry(label.value().to_owned()).or_default() += n;
    }
    totals.get(op).copied().unwrap_or(0)
}

#[cfg(not(feature = "metrics"))]
fn shortfalls(_op: &str) -> u64 {
    0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_claim_and_completion_send_their_wait_in_the_same_pipeline() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let primary = blocking(|| Node::server(&[])).await;
    let replica = blocking({
        let port = primary.port();
        move || Node::replica_of(port, &[])
    })
    .await;
    let mut counts = Vec::new();
    // A generous timeout: a replica on a loaded machine may take a while to acknowledge.
    let slow = Duration::from_secs(2);
    for durability in [
        Durability::none(),
        Durability::replicas(1).with_timeout(slow),
    ] {
        let store = connect(&primary, durability).await;
        // The first completion also loads the script (`EVAL`); count from the second.
        claim_and_complete(&store).await;
        primary.cli(&["CONFIG", "RESETSTAT"]);
        claim_and_complete(&store).await;
        counts.push(store_commands(&primary));
    }
    let (plain, durable) = (&counts[0], &counts[1]);
    // The scripts' own commands are counted too (`GETRANGE`, `PTTL`, `TIME`, `SET`): one
    // `SET … NX GET` and one `EVALSHA` are what the store sent.
    assert_eq!(plain.get("evalsha"), Some(&1), "{plain:?}");
    assert_eq!(plain.get("wait"), None, "{plain:?}");
    let mut expected = plain.clone();
    expected.insert("wait".to_owned(), 2);
    assert_eq!(
        durable, &expected,
        "with Durability::replicas(1), each write's pipeline adds one WAIT and nothing else"
    );
    drop(replica);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_waiting_for_its_acknowledgement_holds_up_no_other_request() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let primary = blocking(|| Node::server(&[])).await;
    let mut replica = blocking({
        let port = primary.port();
        move || Node::replica_of(port, &[])
    })
    .await;
    // The acknowledgement may take 3 s, three times the response timeout (1 s): a command
    // queued behind it on the same connection would time out.
    let store = connect(
        &primary,
        Durability::replicas(1).with_timeout(Duration::from_secs(3)),
    )
    .await;
    claim_and_complete(&store).await;
    // The lanes open in the background, with the first acknowledged write.
    await_clients(&primary, 5).await;
    let key = fresh_key();
    let Claim::Acquired(token) = store
        .claim(&key, &fingerprint("a"), LEASE)
        .await
        .expect("an acknowledged claim")
    else {
        panic!("a fresh key is free");
    };
    replica = blocking(move || {
        replica.stop();
        replica
    })
    .await;

    // A completion whose WAIT no replica answers: it blocks the connection it was sent on
    // for 3 s.
    let completing = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .complete(
                    &key,
                    token,
                    sample_record(fingerprint("a")),
                    Duration::from_secs(60),
                )
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Meanwhile, the store's other commands are answered within the response timeout.
    for _ in 0..3 {
        store
            .inspect(&fresh_key())
            .await
            .expect("a look-up is not held up by another request's WAIT");
    }
    completing
        .await
        .expect("the completion task")
        .expect("the completion is kept, unacknowledged");
    let replay = store
        .claim(&key, &fingerprint("a"), LEASE)
        .await
        .expect("a claim");
    assert!(matches!(replay, Claim::Completed { .. }), "{replay:?}");
    drop(replica);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_no_replica_acknowledges_is_refused_with_503_and_released_for_the_retry() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let primary = blocking(|| Node::server(&[])).await;
    // A WAIT holds up the connection's later commands until it returns: 20 claims waiting
    // 100 ms each take 2 s in all on one connection.
    let store = connect(
        &primary,
        Durability::replicas(1).with_timeout(Duration::from_millis(100)),
    )
    .await
    .with_response_timeout(Duration::from_secs(5));
    let handler = Handler::counting();
    let instance = serve(&IdempotencyLayer::new(store), &handler);
    let shortfalls_before = shortfalls("claim");

    let keys: Vec<String> = (0..20).map(|n| format!("unreplicated-{n}")).collect();
    let refused = futures_join(&instance, &keys).await;
    for reply in &refused {
        reply.assert_problem(
            ProblemKind::StoreUnavailable,
            StatusCode::SERVICE_UNAVAILABLE,
        );
        reply.assert_retry_after();
    }
    assert_eq!(handler.calls(), 0, "nothing ran on an unacknowledged claim");
    if cfg!(feature = "metrics") {
        assert_eq!(shortfalls("claim") - shortfalls_before, 20);
    }

    // A replica arrives: the same keys are free (the refused claims were released), so each
    // retry runs once rather than waiting on a claim that nobody holds.
    let replica = blocking({
        let port = primary.port();
        move || Node::replica_of(port, &[])
    })
    .await;
    // A client retries a 503 (the store asks the replicas again once per timeout).
    for key in &keys {
        let mut reply = send(&instance, keyed_post("/charges", key, "{}")).await;
        for _ in 0..50 {
            if reply.status != StatusCode::SERVICE_UNAVAILABLE {
                break;
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
            reply = send(&instance, keyed_post("/charges", key, "{}")).await;
        }
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
        assert!(!reply.replayed());
    }
    assert_eq!(handler.calls(), 20, "each key ran once, on its retry");
    drop(replica);
}

/// Sends one request for each of `keys` at once.
async fn futures_join(
    instance: &common::service::Svc<RedisStore>,
    keys: &[String],
) -> Vec<common::service::Reply> {
    let sent: Vec<_> = keys
        .iter()
        .map(|key| tokio::spawn(send(instance, keyed_post("/charges", key, "{}"))))
        .collect();
    let mut replies = Vec::new();
    for reply in sent {
        replies.push(common::service::within(reply).await.expect("a request"));
    }
    replies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_no_replica_acknowledges_is_kept_counted_and_replayed() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let primary = blocking(|| Node::server(&[])).await;
    let mut replica = blocking({
        let port = primary.port();
        move || Node::replica_of(port, &[])
    })
    .await;
    // Long enough for a replica on a loaded machine to acknowledge the claim.
    let store = connect(
        &primary,
        Durability::replicas(1).with_timeout(Duration::from_secs(1)),
    )
    .await;
    let key = fresh_key();
    let Claim::Acquired(token) = store
        .claim(&key, &fingerprint("a"), LEASE)
        .await
        .expect("an acknowledged claim")
    else {
        panic!("a fresh key is free");
    };
    let shortfalls_before = shortfalls("complete");
    replica = blocking(move || {
        replica.stop();
        replica
    })
    .await;

    store
        .complete(
            &key,
            token,
            sample_record(fingerprint("a")),
            Duration::from_secs(60),
        )
        .await
        .expect("the completion is kept: the handler has run");
    if cfg!(feature = "metrics") {
        assert_eq!(shortfalls("complete") - shortfalls_before, 1);
    }
    let again = store
        .claim(&key, &fingerprint("a"), LEASE)
        .await
        .expect("a claim");
    assert!(
        matches!(again, Claim::Completed { .. }),
        "a retry is replayed, not run again: {again:?}"
    );
    drop(replica);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waitaof_is_sent_where_the_server_has_it_and_refuses_claims_where_it_has_not() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let (major, minor) = server_version();
    let has_waitaof = (major, minor) >= (7, 2);
    let primary = blocking(move || {
        if has_waitaof {
            Node::server(&["--appendonly", "yes", "--appendfsync", "always"])
        } else {
            Node::server(&[])
        }
    })
    .await;
    let store = connect(&primary, Durability::none().with_local_fsync()).await;
    let key = fresh_key();
    let claim = store.claim(&key, &fingerprint("a"), LEASE).await;
    if has_waitaof {
        assert!(
            matches!(claim, Ok(Claim::Acquired(_))),
            "Redis {major}.{minor} fsyncs the claim: {claim:?}"
        );
        assert_eq!(command_counts(primary.port()).get("waitaof"), Some(&1));
    } else {
        let Err(error) = claim else {
            panic!("Redis {major}.{minor} has no WAITAOF: the claim cannot be acknowledged");
        };
        assert_eq!(error.kind(), StoreErrorKind::Unavailable);
        let message = format!("{error} {:?}", std::error::Error::source(&error));
        assert!(message.contains("WAITAOF"), "{message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_release_of_an_unanswered_claim_follows_it_on_its_lane_and_frees_the_key() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let primary = blocking(|| Node::server(&[])).await;
    let mut replica = blocking({
        let port = primary.port();
        move || Node::replica_of(port, &[])
    })
    .await;
    let wait = Duration::from_secs(1);
    let store = connect(&primary, Durability::replicas(1).with_timeout(wait))
        .await
        .with_response_timeout(Duration::from_millis(300));
    // Acknowledged (the replica is up): the lanes open, in the background, and the replicas
    // are not marked short.
    claim_and_complete(&store).await;
    await_clients(&primary, 5).await;
    claim_and_complete(&store).await;
    replica = blocking(move || {
        replica.stop();
        replica
    })
    .await;

    // Two writes per lane whose WAIT no replica answers: each holds its lane for 1 s.
    let blocking_claims: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.claim(&fresh_key(), &fingerprint("a"), LEASE).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // This claim is queued behind two WAITs (about 2 s), longer than its bound (1.3 s): its
    // reply does not come in time, and it lands later.
    let key = fresh_key();
    let token = FenceToken::new(0x5eed_0001);
    let claim = store
        .claim_as(&key, token, &fingerprint("late"), LEASE)
        .await;
    assert!(
        claim
            .as_ref()
            .is_err_and(|error| error.kind() == StoreErrorKind::Unavailable),
        "the claim's reply did not come in time: {claim:?}"
    );
    // What the layer does with a claim that got no reply: release it by its token.
    let released = store.release(&key, token).await;
    // Before the claim lands, the release must not have run: had it gone on another
    // connection it would have found nothing (LeaseLost) and stopped.
    assert!(
        !released
            .as_ref()
            .is_err_and(|error| error.kind() == StoreErrorKind::LeaseLost),
        "the release ran before the claim it releases: {released:?}"
    );
    for claim in blocking_claims {
        let _ = claim.await;
    }
    // The late claim landed, and its release, queued behind it, freed the key; without that
    // it would hold the key for its lease (30 s).
    let mut free = false;
    for _ in 0..60 {
        if store.inspect(&key).await.expect("a look-up").is_none() {
            free = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        free,
        "the late claim still holds its key: {:?}",
        store.inspect(&key).await
    );
    drop(replica);
}
