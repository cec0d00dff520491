//! `RedisStore` against real `redis-server` processes: the conformance suite, two instances
//! sharing one Redis, leases across instances, round trips counted by the server, waiting by
//! notification, and corrupt data.
#![cfg(feature = "redis")]

mod common;

use std::{
    collections::BTreeMap,
    sync::OnceLock,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::StatusCode;
use tower_idempotency::{
    AdminStore, Claim, FenceToken, IdempotencyLayer, IdempotencyStore, ProblemKind, Record,
    RedisStore, StoreErrorKind, WaitMode,
};

use common::{
    conformance::{fingerprint, fresh_key, sample_record},
    redis_server::{RedisServer, command_counts},
    scenarios,
    service::{Gate, Handler, created, eventually, keyed_post, send, serve, within},
};

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

/// One server for the tests that only need keys of their own; it stops with the test binary.
fn shared_server() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(RedisServer::start)
}

async fn connect(server: &RedisServer) -> RedisStore {
    RedisStore::connect(&server.url())
        .await
        .expect("connect to the test server")
}

/// A plain connection for inspecting and tampering with what the store wrote.
async fn admin(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .expect("a valid URL")
        .get_multiplexed_async_connection()
        .await
        .expect("an admin connection")
}

async fn query<T: redis::FromRedisValue>(
    connection: &mut redis::aio::MultiplexedConnection,
    command: &mut redis::Cmd,
) -> T {
    command
        .query_async(connection)
        .await
        .expect("the admin command succeeds")
}

/// The keys under `prefix`.
async fn keys(server: &RedisServer, prefix: &str) -> Vec<String> {
    let mut admin = admin(server).await;
    query(&mut admin, redis::cmd("KEYS").arg(format!("{prefix}*"))).await
}

/// Redis's clock (`TIME`), in ms since the Unix epoch.
async fn redis_time_ms(connection: &mut redis::aio::MultiplexedConnection) -> u64 {
    let (seconds, micros): (u64, u64) = query(connection, &mut redis::cmd("TIME")).await;
    seconds * 1000 + micros / 1000
}

fn be_u64(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes.try_into().expect("eight bytes"))
}

fn acquired(claim: Claim) -> FenceToken {
    match claim {
        Claim::Acquired(token) => token,
        other => panic!("expected the claim to be acquired, got {other:?}"),
    }
}

fn unique_prefix(what: &str) -> String {
    format!(
        "test:{what}:{}:",
        fresh_key().to_hex().get(..8).unwrap_or("x")
    )
}

conformance_suite!(async { connect(shared_server()).await });
admin_conformance_suite!(async { connect(shared_server()).await });

#[cfg(feature = "axum")]
operations_suite!(async { connect(shared_server()).await });

rotation_suite!(async { connect(shared_server()).await });

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_across_two_instances_run_the_handler_once() {
    let server = shared_server();
    let prefix = unique_prefix("two");
    scenarios::concurrent_duplicates_across_two_instances_run_the_handler_once(
        connect(server).await.with_prefix(&prefix),
        connect(server).await.with_prefix(&prefix),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_hold_a_small_marker_while_in_flight_then_the_record_with_its_expiry() {
    let server = shared_server();
    let prefix = unique_prefix("layout");
    let store = connect(server).await.with_prefix(&prefix);
    let key = fresh_key();
    let redis_key = store.redis_key(&key);
    assert_eq!(redis_key, format!("{prefix}{}", key.to_hex()));
    let mut admin = admin(server).await;

    let token = acquired(
        store
            .claim(&key, &fingerprint("a"), Duration::from_secs(5))
            .await
            .unwrap(),
    );
    let marker: Vec<u8> = query(&mut admin, redis::cmd("GET").arg(&redis_key)).await;
    assert_eq!(
        marker.len(),
        61,
        "token, fingerprint, claim time and retention, nothing more"
    );
    assert_eq!(&marker[..5], b"TIF\x02\x00", "a marker, format version 2");
    assert_eq!(&marker[5..13], &token.get().to_be_bytes());
    assert_eq!(&marker[13..45], fingerprint("a").as_bytes());
    let claimed_at = be_u64(&marker[45..53]);
    let local_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        claimed_at <= local_now && claimed_at + 5_000 > local_now,
        "claimed at {claimed_at} by the local clock ({local_now})"
    );
    let retention = tower_idempotency::redis::DEFAULT_ABANDONED_RETENTION.as_millis() as u64;
    assert_eq!(be_u64(&marker[53..61]), retention);
    let key_left: i64 = query(&mut admin, redis::cmd("PTTL").arg(&redis_key)).await;
    let lease_left = key_left - retention as i64;
    assert!(
        (1..=5_000).contains(&lease_left),
        "the key lives for the lease ({lease_left} ms left), then the retention"
    );

    let record = sample_record(fingerprint("a"));
    let before = redis_time_ms(&mut admin).await;
    store
        .complete(&key, token, record.clone(), TTL)
        .await
        .unwrap();
    let after = redis_time_ms(&mut admin).await;
    let stored: Vec<u8> = query(&mut admin, redis::cmd("GET").arg(&redis_key)).await;
    assert_eq!(&stored[..4], b"TIC\x01", "a completed envelope, version 1");
    let expires_at = be_u64(&stored[4..12]);
    let ttl_ms = TTL.as_millis() as u64;
    assert!(
        (before + ttl_ms..=after + ttl_ms).contains(&expires_at),
        "expiry {expires_at} by Redis's clock, completed within [{before}, {after}]"
    );
    assert_eq!(be_u64(&stored[12..20]), ttl_ms, "the TTL");
    assert_eq!(
        stored[20..],
        record.encode(),
        "then the record's own binary encoding"
    );
    let ttl_left: i64 = query(&mut admin, redis::cmd("PTTL").arg(&redis_key)).await;
    assert!(
        ttl_left > 3_500_000 && ttl_left <= 3_600_000,
        "record PTTL {ttl_left}"
    );
    let now = redis_time_ms(&mut admin).await;
    assert!(
        expires_at.abs_diff(now + ttl_left as u64) <= 2,
        "the envelope's expiry ({expires_at}) is the key's ({now} + {ttl_left})"
    );
    assert_eq!(
        keys(server, &prefix).await,
        vec![redis_key],
        "one key per record"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_too_long_for_keys_built_on_the_stack_claims_and_completes_the_same_key() {
    let server = shared_server();
    // The store builds a key on the stack for a prefix of up to 64 bytes; this one is longer.
    let prefix = format!("{}{}:", unique_prefix("long"), "p".repeat(80));
    let store = connect(server).await.with_prefix(&prefix);
    let key = fresh_key();
    let redis_key = store.redis_key(&key);
    let mut admin = admin(server).await;

    let token = acquired(store.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
    let marker: Vec<u8> = query(&mut admin, redis::cmd("GET").arg(&redis_key)).await;
    assert_eq!(
        &marker[5..13],
        &token.get().to_be_bytes(),
        "the claim's marker"
    );
    store
        .complete(&key, token, sample_record(fingerprint("a")), TTL)
        .await
        .unwrap();
    let stored: Vec<u8> = query(&mut admin, redis::cmd("GET").arg(&redis_key)).await;
    assert_eq!(&stored[..4], b"TIC\x01", "the completed record");
    assert!(matches!(
        store.claim(&key, &fingerprint("a"), LEASE).await.unwrap(),
        Claim::Completed { .. }
    ));
    assert_eq!(keys(server, &prefix).await, vec![redis_key], "one key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_with_different_prefixes_share_nothing() {
    let server = shared_server();
    let first = connect(server).await.with_prefix(unique_prefix("one"));
    let second = connect(server).await.with_prefix(unique_prefix("two"));
    let key = fresh_key();
    let token = acquired(first.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
    first
        .complete(&key, token, sample_record(fingerprint("a")), TTL)
        .await
        .unwrap();
    let other = acquired(second.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
    assert_eq!(
        second.release(&key, token).await.map_err(|e| e.kind()),
        Err(StoreErrorKind::LeaseLost),
        "a token of one store means nothing to the other"
    );
    second.release(&key, other).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_owner_is_gone_ends_a_wait_and_frees_the_key_after_its_lease() {
    let server = shared_server();
    let key = fresh_key();
    let lease = Duration::from_millis(500);
    {
        let owner = connect(server).await;
        acquired(owner.claim(&key, &fingerprint("a"), lease).await.unwrap());
        // The owner goes away without completing or releasing.
    }
    let other = connect(server).await;
    assert!(matches!(
        other.claim(&key, &fingerprint("a"), lease).await.unwrap(),
        Claim::InFlight { .. }
    ));
    let started = Instant::now();
    other.wait(&key, Duration::from_secs(20)).await.unwrap();
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(2),
        "the wait ended with the lease, after {waited:?}"
    );
    let Claim::Abandoned { token, .. } = other.claim(&key, &fingerprint("a"), LEASE).await.unwrap()
    else {
        panic!("the claim is reported abandoned, not free");
    };
    acquired(
        other
            .take_over(&key, token, &fingerprint("a"), LEASE)
            .await
            .unwrap(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_dies_holding_a_claim_frees_the_key_when_its_lease_ends() {
    let server = shared_server();
    let prefix = unique_prefix("dies");
    let lease = Duration::from_millis(500);
    let key = format!("dies-{}", fresh_key().to_hex());

    // Instance A runs on a runtime of its own, which is shut down mid-request: its handler,
    // its lease renewals and its connections end without releasing anything.
    let doomed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    let store_a = {
        let url = server.url();
        let prefix = prefix.clone();
        doomed
            .spawn(async move {
                RedisStore::connect(&url)
                    .await
                    .map(|store| store.with_prefix(prefix))
            })
            .await
            .expect("the connect task")
            .expect("connect")
    };
    let never = Gate::new();
    let handler_a = Handler::gated(&never);
    let instance_a = serve(
        &IdempotencyLayer::new(store_a).with_lease(lease),
        &handler_a,
    );
    doomed.spawn(send(&instance_a, keyed_post("/charges", &key, "{}")));
    eventually("instance A runs the handler", || handler_a.calls() == 1).await;
    // Renewals keep the claim past several leases while A lives.
    tokio::time::sleep(lease * 3).await;
    assert_eq!(
        keys(server, &prefix).await.len(),
        1,
        "A still holds its claim"
    );
    doomed.shutdown_background();

    let handler_b = Handler::counting();
    let instance_b = serve(
        &IdempotencyLayer::new(connect(server).await.with_prefix(&prefix)).with_lease(lease),
        &handler_b,
    );
    let started = Instant::now();
    let reply = send(&instance_b, keyed_post("/charges", &key, "{}")).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{reply:?}");
    assert!(!reply.replayed());
    assert_eq!(handler_b.calls(), 1, "B executed once A's claim expired");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "B waited {:?}, not just the rest of A's lease",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_handler_keeps_its_claim_through_renewal() {
    let server = shared_server();
    let prefix = unique_prefix("renew");
    let lease = Duration::from_millis(300);
    // The handler runs until the test lets it finish: several leases.
    let gate = Gate::new();
    let handler = Handler::gated(&gate);
    let layer = |store: RedisStore| IdempotencyLayer::new(store).with_lease(lease);
    let first = serve(&layer(connect(server).await.with_prefix(&prefix)), &handler);
    let impatient = serve(
        &layer(connect(server).await.with_prefix(&prefix)).with_wait_mode(WaitMode::Reject),
        &handler,
    );
    let started = Instant::now();
    let running = tokio::spawn(send(&first, keyed_post("/charges", "long", "{}")));
    eventually("the handler runs", || handler.calls() == 1).await;
    while started.elapsed() < lease * 5 {
        tokio::time::sleep(lease / 2).await;
        let duplicate = send(&impatient, keyed_post("/charges", "long", "{}")).await;
        duplicate.assert_problem(ProblemKind::InFlight, StatusCode::CONFLICT);
        duplicate.assert_retry_after();
    }
    let mut admin = admin(server).await;
    let redis_key = keys(server, &prefix).await.pop().expect("the claim's key");
    let marker: Vec<u8> = query(&mut admin, redis::cmd("GET").arg(&redis_key)).await;
    assert!(
        marker.starts_with(b"TIF"),
        "still in flight after five leases"
    );
    let left: i64 = query(&mut admin, redis::cmd("PTTL").arg(&redis_key)).await;
    let retention = tower_idempotency::redis::DEFAULT_ABANDONED_RETENTION.as_millis() as i64;
    assert!(
        (1..=300).contains(&(left - retention)),
        "the claim lives by renewal of a short lease (PTTL {left}: the lease, then the retention)"
    );
    gate.open();
    let reply = within(running).await.expect("the first request");
    assert_eq!(reply.status, StatusCode::CREATED);
    // (An instance that waits: the record may land just after the response.)
    let retry = send(&first, keyed_post("/charges", "long", "{}")).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, reply.body);
    assert_eq!(handler.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_owner_cannot_overwrite_the_newer_record() {
    let server = shared_server();
    let prefix = unique_prefix("stale");
    let lease = Duration::from_millis(300);
    let gate = Gate::new();
    let stale_handler = {
        let gate = gate.clone();
        Handler::new(move |_| {
            let gate = gate.clone();
            async move {
                gate.pass().await;
                created("from the stale owner")
            }
        })
    };
    let new_handler = Handler::new(|_| async { created("from the new owner") });
    let layer = |store: RedisStore| IdempotencyLayer::new(store).with_lease(lease);
    let stale = serve(
        &layer(connect(server).await.with_prefix(&prefix)),
        &stale_handler,
    );
    let fresh = serve(
        &layer(connect(server).await.with_prefix(&prefix)),
        &new_handler,
    );

    let running = tokio::spawn(send(&stale, keyed_post("/charges", "k", "{}")));
    eventually("the first owner runs", || stale_handler.calls() == 1).await;
    // Its lease is lost (as after a long pause): the claim is gone from Redis.
    let mut admin = admin(server).await;
    let redis_key = keys(server, &prefix).await.pop().expect("the claim's key");
    let deleted: u64 = query(&mut admin, redis::cmd("DEL").arg(&redis_key)).await;
    assert_eq!(deleted, 1);

    let newer = send(&fresh, keyed_post("/charges", "k", "{}")).await;
    assert_eq!(newer.text(), "from the new owner");
    gate.open();
    let stale_reply = within(running).await.expect("the stale request");
    assert_eq!(
        stale_reply.text(),
        "from the stale owner",
        "its client still gets it"
    );

    for instance in [&stale, &fresh] {
        let retry = send(instance, keyed_post("/charges", "k", "{}")).await;
        assert!(retry.replayed());
        assert_eq!(
            retry.text(),
            "from the new owner",
            "the newer record stands"
        );
    }
    assert_eq!((stale_handler.calls(), new_handler.calls()), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_token_from_another_instance_is_refused_as_lease_lost() {
    let server = shared_server();
    let (first, second) = (connect(server).await, connect(server).await);
    let key = fresh_key();
    let lease = Duration::from_millis(200);
    let stale = acquired(first.claim(&key, &fingerprint("a"), lease).await.unwrap());
    tokio::time::sleep(lease + Duration::from_millis(100)).await;
    let current = acquired(
        second
            .take_over(&key, stale, &fingerprint("a"), LEASE)
            .await
            .unwrap(),
    );
    for refused in [
        first
            .complete(&key, stale, sample_record(fingerprint("stale")), TTL)
            .await,
        first.renew(&key, stale, LEASE).await,
        first.release(&key, stale).await,
    ] {
        assert_eq!(
            refused.map_err(|e| e.kind()),
            Err(StoreErrorKind::LeaseLost)
        );
    }
    second
        .complete(&key, current, sample_record(fingerprint("a")), TTL)
        .await
        .unwrap();
    assert!(matches!(
        first.claim(&key, &fingerprint("a"), LEASE).await.unwrap(),
        Claim::Completed { record, .. } if record == sample_record(fingerprint("a"))
    ));
    // Over the completed record, every token is a lost lease, the winner's included.
    for token in [stale, current] {
        for refused in [
            second
                .complete(&key, token, sample_record(fingerprint("late")), TTL)
                .await,
            second.renew(&key, token, LEASE).await,
            second.release(&key, token).await,
        ] {
            assert_eq!(
                refused.map_err(|e| e.kind()),
                Err(StoreErrorKind::LeaseLost)
            );
        }
    }
    assert!(matches!(
        first.claim(&key, &fingerprint("a"), LEASE).await.unwrap(),
        Claim::Completed { record, .. } if record == sample_record(fingerprint("a"))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_reports_how_long_the_record_has_left_within_its_ttl() {
    let server = shared_server();
    let store = connect(server).await;
    let mut admin = admin(server).await;
    for ttl in [
        Duration::from_secs(2),
        TTL,
        Duration::from_secs(7 * 24 * 3600),
    ] {
        let key = fresh_key();
        let token = acquired(store.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
        store
            .complete(&key, token, sample_record(fingerprint("a")), ttl)
            .await
            .unwrap();
        for _ in 0..3 {
            let pttl: u64 = query(&mut admin, redis::cmd("PTTL").arg(store.redis_key(&key))).await;
            let Claim::Completed { expires_in, .. } =
                store.claim(&key, &fingerprint("a"), LEASE).await.unwrap()
            else {
                panic!("the record is there");
            };
            let left = expires_in.expect("RedisStore knows the remaining lifetime");
            assert!(
                left > Duration::ZERO && left <= ttl,
                "{left:?} left of a TTL of {ttl:?}"
            );
            assert!(
                left <= Duration::from_millis(pttl),
                "no longer than Redis keeps it: {left:?}, PTTL {pttl} ms just before"
            );
            assert!(
                left >= ttl - Duration::from_secs(1),
                "{left:?} left of a TTL of {ttl:?}, just completed"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[cfg(feature = "moka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_learned_through_a_cache_leaves_it_no_later_than_it_leaves_redis() {
    let server = shared_server();
    let ttl = Duration::from_millis(1_000);
    let elsewhere = connect(server).await;
    let mut admin = admin(server).await;
    for _ in 0..3 {
        let cached = tower_idempotency::CachedStore::new(connect(server).await, 1024 * 1024);
        // Completed by another instance, then replayed here: the cache learns it from Redis.
        let key = fresh_key();
        let redis_key = elsewhere.redis_key(&key);
        let token = acquired(
            elsewhere
                .claim(&key, &fingerprint("a"), LEASE)
                .await
                .unwrap(),
        );
        elsewhere
            .complete(&key, token, sample_record(fingerprint("a")), ttl)
            .await
            .unwrap();
        let learned = cached.claim(&key, &fingerprint("a"), LEASE).await.unwrap();
        assert!(matches!(learned, Claim::Completed { .. }), "{learned:?}");
        assert_eq!(cached.record_count(), 1, "the cache keeps a copy");

        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let exists: u64 = query(&mut admin, redis::cmd("EXISTS").arg(&redis_key)).await;
            if exists == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "Redis keeps the record past its TTL"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Redis has just dropped the record: the cache must have dropped it already.
        let after = cached.claim(&key, &fingerprint("a"), LEASE).await.unwrap();
        let token = acquired(after);
        cached.inner().release(&key, token).await.unwrap();
    }
}

/// Runs every operation once, so the server knows every script.
async fn warm_up<St: IdempotencyStore>(store: &St) {
    let key = fresh_key();
    let token = acquired(store.claim(&key, &fingerprint("w"), LEASE).await.unwrap());
    store.renew(&key, token, LEASE).await.unwrap();
    store
        .complete(&key, token, sample_record(fingerprint("w")), TTL)
        .await
        .unwrap();
    assert!(matches!(
        store.claim(&key, &fingerprint("w"), LEASE).await.unwrap(),
        Claim::Completed { .. }
    ));
    let key = fresh_key();
    let token = acquired(store.claim(&key, &fingerprint("w"), LEASE).await.unwrap());
    assert!(matches!(
        store.claim(&key, &fingerprint("w"), LEASE).await.unwrap(),
        Claim::InFlight { .. }
    ));
    store.release(&key, token).await.unwrap();
    store.wait(&key, LEASE).await.unwrap();
}

fn counts(entries: &[(&str, u64)]) -> BTreeMap<String, u64> {
    entries
        .iter()
        .map(|(name, calls)| ((*name).to_owned(), *calls))
        .collect()
}

/// The server's command counts once they reach `expected` (bounded): a client has its
/// response before the record is stored, so the completion may still be on its way.
async fn settled_counts(
    server: &RedisServer,
    expected: impl Fn(&BTreeMap<String, u64>) -> bool,
) -> BTreeMap<String, u64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let counts = command_counts(server.port());
        if expected(&counts) || Instant::now() > deadline {
            // Nothing else arrives afterwards.
            tokio::time::sleep(Duration::from_millis(100)).await;
            return command_counts(server.port());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// `INFO commandstats` counts the commands clients sent and, alike, the ones scripts ran
// inside them (no round trip): the maps below name both. The commands sent are the claim's
// `set` and the scripts' `evalsha`/`eval`; every other entry ran inside a script, and so did
// a second `set` beside a `time` (the complete script's write).

/// What a first execution runs: the claim (`SET … NX GET`, sent) and the complete script
/// (`EVALSHA`, sent; `GETRANGE`, `PTTL`, `TIME` and `SET` inside it). The `PTTL` is the
/// fence's lease check: markers outlive their lease (to report abandoned claims), so the
/// lease has ended when the key's time left is down to the retention, not when the key is
/// gone.
fn first_execution() -> BTreeMap<String, u64> {
    counts(&[
        ("set", 2),
        ("evalsha", 1),
        ("getrange", 1),
        ("pttl", 1),
        ("time", 1),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_is_one_command_and_a_first_execution_two() {
    let server = RedisServer::start();
    let handler = Handler::counting();
    let instance = serve(&IdempotencyLayer::new(connect(&server).await), &handler);

    server.cli(&["CONFIG", "RESETSTAT"]);
    let first = send(&instance, keyed_post("/charges", "warm-up", "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    // On a server that has never seen the complete script, it costs one more command, once:
    // the EVALSHA refused with NOSCRIPT, then EVAL.
    let first_ever = counts(&[
        ("set", 2),
        ("evalsha", 1),
        ("eval", 1),
        ("getrange", 1),
        ("pttl", 1),
        ("time", 1),
    ]);
    assert_eq!(
        settled_counts(&server, |counts| *counts == first_ever).await,
        first_ever
    );

    server.cli(&["CONFIG", "RESETSTAT"]);
    let executed = send(&instance, keyed_post("/charges", "counted", "{}")).await;
    assert!(!executed.replayed());
    assert_eq!(
        settled_counts(&server, |counts| *counts == first_execution()).await,
        first_execution(),
        "two commands sent: claim (SET NX GET) + complete (EVALSHA: GETRANGE, PTTL, TIME, SET)"
    );

    server.cli(&["CONFIG", "RESETSTAT"]);
    let replayed = send(&instance, keyed_post("/charges", "counted", "{}")).await;
    assert!(replayed.replayed());
    assert_eq!(replayed.body, executed.body);
    assert_eq!(
        command_counts(server.port()),
        counts(&[("set", 1)]),
        "one claim-or-get (SET NX GET), no script, no GET"
    );
    assert_eq!(handler.calls(), 2);
}

#[cfg(feature = "moka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_through_the_local_cache_is_zero_commands() {
    let server = RedisServer::start();
    let store = tower_idempotency::CachedStore::new(connect(&server).await, 16 * 1024 * 1024);
    warm_up(store.inner()).await;
    let handler = Handler::counting();
    let instance = serve(&IdempotencyLayer::new(store), &handler);

    server.cli(&["CONFIG", "RESETSTAT"]);
    let executed = send(&instance, keyed_post("/charges", "cached", "{}")).await;
    assert_eq!(
        settled_counts(&server, |counts| *counts == first_execution()).await,
        first_execution()
    );

    server.cli(&["CONFIG", "RESETSTAT"]);
    for _ in 0..3 {
        let replayed = send(&instance, keyed_post("/charges", "cached", "{}")).await;
        assert!(replayed.replayed());
        assert_eq!(replayed.body, executed.body);
    }
    let three = command_counts(server.port());
    assert!(
        three == counts(&[]) || three == counts(&[("set", 1)]),
        "at most the first replay asks Redis: {three:?}"
    );

    server.cli(&["CONFIG", "RESETSTAT"]);
    let replayed = send(&instance, keyed_post("/charges", "cached", "{}")).await;
    assert!(replayed.replayed());
    assert_eq!(
        command_counts(server.port()),
        counts(&[]),
        "served from memory"
    );
    assert_eq!(handler.calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_on_another_instance_is_woken_by_notification_not_by_polling() {
    let server = RedisServer::start();
    let owner = connect(&server).await;
    // Only a notification (or the end of the 30 s lease) can wake this waiter in time.
    let waiter = connect(&server)
        .await
        .with_poll_interval(Duration::from_secs(30));
    warm_up(&owner).await;
    // A first wait (on a free key) opens the waiter's subscription (the owner's warm-up
    // opened the other).
    waiter.wait(&fresh_key(), LEASE).await.unwrap();
    eventually_async("the waiter subscribes", || async {
        subscribers(&server) == 2
    })
    .await;
    let key = fresh_key();
    let token = acquired(owner.claim(&key, &fingerprint("a"), LEASE).await.unwrap());

    server.cli(&["CONFIG", "RESETSTAT"]);
    let waiting = tokio::spawn({
        let waiter = waiter.clone();
        async move {
            waiter.wait(&key, Duration::from_secs(20)).await.unwrap();
            Instant::now()
        }
    });
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(
        !waiting.is_finished(),
        "the wait lasts while the claim does"
    );
    assert_eq!(
        command_counts(server.port()),
        counts(&[
            ("evalsha", 1),
            ("getrange", 1),
            ("setrange", 1),
            ("pttl", 1)
        ]),
        "one look at the claim (flagging it as watched), then no polling in 1.5 s"
    );

    owner
        .complete(&key, token, sample_record(fingerprint("a")), TTL)
        .await
        .unwrap();
    let completed = Instant::now();
    let woke = within(waiting).await.expect("the waiter");
    let delay = woke.saturating_duration_since(completed);
    assert!(
        delay < Duration::from_millis(500),
        "woke {delay:?} after completion"
    );
    assert!(matches!(
        waiter.claim(&key, &fingerprint("a"), LEASE).await.unwrap(),
        Claim::Completed { .. }
    ));
}

/// A duplicate sent to another instance while the first request runs: its claim finds the
/// claim in flight (`SET NX GET`, then the held script judging it by Redis's clock and flagging
/// it so that its end is published), it waits for the notification without asking Redis
/// again, and once woken one `SET NX GET` returns the record. Three commands in all, each its
/// own round trip: the least a duplicate can take while a replay stays one `SET` and claims
/// nobody waits on publish nothing (a wait that looked with a script of its own took four).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_waiting_on_another_instance_takes_three_round_trips() {
    let server = RedisServer::start();
    // Only the notification (or the end of the 30 s lease) can wake the duplicate in time.
    let (owner_store, waiter_store) = owner_and_waiter(&server).await;
    let gate = Gate::new();
    let handler = Handler::gated(&gate);
    let owner = serve(&IdempotencyLayer::new(owner_store), &handler);
    let waiter = serve(&IdempotencyLayer::new(waiter_store), &handler);
    let first = tokio::spawn(send(&owner, keyed_post("/charges", "waited-on", "{}")));
    eventually("the first request runs its handler", || {
        handler.calls() == 1
    })
    .await;

    server.cli(&["CONFIG", "RESETSTAT"]);
    let duplicate = tokio::spawn(send(&waiter, keyed_post("/charges", "waited-on", "{}")));
    let waiting = counts(&[
        ("set", 1),
        ("evalsha", 1),
        ("get", 1),
        ("pttl", 1),
        ("setrange", 1),
    ]);
    let found = settled_counts(&server, |counts| counts.get("evalsha") == Some(&1)).await;
    assert_eq!(
        found, waiting,
        "two round trips to find the claim and wait: SET NX GET, then EVALSHA (GET, PTTL, \
         SETRANGE: judged live by Redis's clock and flagged)"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !duplicate.is_finished(),
        "the duplicate waits for the first"
    );
    assert_eq!(
        command_counts(server.port()),
        waiting,
        "no round trip while waiting"
    );

    server.cli(&["CONFIG", "RESETSTAT"]);
    gate.open();
    let first = within(first).await.expect("the first request");
    let duplicate = within(duplicate).await.expect("the duplicate");
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(duplicate.replayed());
    assert_eq!(duplicate.body, first.body);
    assert_eq!(handler.calls(), 1);
    // The owner's completion publishes (its claim was flagged); the duplicate, woken, looks
    // once. `set` counts the complete script's write and the duplicate's claim.
    let woken = counts(&[
        ("evalsha", 1),
        ("getrange", 1),
        ("pttl", 1),
        ("time", 1),
        ("publish", 1),
        ("set", 2),
    ]);
    assert_eq!(
        settled_counts(&server, |counts| *counts == woken).await,
        woken,
        "the owner's completion (EVALSHA: GETRANGE, PTTL, TIME, SET, PUBLISH), then one round \
         trip for the duplicate: SET NX GET, which returns the record"
    );
}

/// An owner and a waiter on another instance (which polls only every 30 s), both knowing
/// every script and listening on the channel.
async fn owner_and_waiter(server: &RedisServer) -> (RedisStore, RedisStore) {
    let owner = connect(server).await;
    let waiter = connect(server)
        .await
        .with_poll_interval(Duration::from_secs(30));
    warm_up(&owner).await;
    warm_up(&waiter).await;
    eventually_async("both instances subscribe", || async {
        subscribers(server) == 2
    })
    .await;
    // The server counts a subscriber a moment before the store takes note; a claim made in
    // between would look again once the store does.
    tokio::time::sleep(Duration::from_millis(100)).await;
    (owner, waiter)
}

/// The claim that finds a key in flight flags it, and the wait comes after: an end published
/// in between (here, before the wait is even called) still ends the wait at once, without a
/// look, whether the owner is another instance or the waiter's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_published_between_a_duplicates_claim_and_its_wait_ends_the_wait_at_once() {
    let server = RedisServer::start();
    let (owner, waiter) = owner_and_waiter(&server).await;
    for (how, ending) in [
        ("completed", &owner),
        ("released", &owner),
        ("completed", &waiter),
    ] {
        let key = fresh_key();
        let token = acquired(ending.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
        assert!(matches!(
            waiter.claim(&key, &fingerprint("a"), LEASE).await.unwrap(),
            Claim::InFlight { .. }
        ));
        if how == "completed" {
            let record = sample_record(fingerprint("a"));
            ending.complete(&key, token, record, TTL).await.unwrap();
        } else {
            ending.release(&key, token).await.unwrap();
        }
        // The message reaches the waiter's instance before its wait starts.
        tokio::time::sleep(Duration::from_millis(200)).await;
        server.cli(&["CONFIG", "RESETSTAT"]);
        let started = Instant::now();
        within(waiter.wait(&key, Duration::from_secs(20)))
            .await
            .unwrap();
        let waited = started.elapsed();
        assert!(
            waited < Duration::from_millis(500),
            "{how}: the wait ended after {waited:?}"
        );
        assert_eq!(
            command_counts(server.port()),
            counts(&[]),
            "{how}: the wait knew without looking"
        );
    }
}

/// A subscription lost between a duplicate's claim and its wait may have lost the end of the
/// claim: once subscribed again, the wait looks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_lost_between_a_duplicates_claim_and_its_wait_makes_the_wait_look() {
    let server = RedisServer::start();
    let (owner, waiter) = owner_and_waiter(&server).await;
    let key = fresh_key();
    let token = acquired(owner.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
    assert!(matches!(
        waiter.claim(&key, &fingerprint("a"), LEASE).await.unwrap(),
        Claim::InFlight { .. }
    ));
    // Published while nobody listens.
    server.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    owner.release(&key, token).await.unwrap();
    eventually_async("both instances subscribe again", || async {
        subscribers(&server) == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    within(waiter.wait(&key, Duration::from_secs(20)))
        .await
        .unwrap();
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_millis(500),
        "the wait looked at once, having missed a subscription, after {waited:?}"
    );
}

/// The lease the claim's script reported bounds the wait that follows: an owner gone without
/// completing ends it when its lease does, not at the next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_after_a_duplicates_claim_ends_with_the_lease_it_found() {
    let server = RedisServer::start();
    let (owner, waiter) = owner_and_waiter(&server).await;
    let key = fresh_key();
    let lease = Duration::from_millis(500);
    acquired(owner.claim(&key, &fingerprint("a"), lease).await.unwrap());
    assert!(matches!(
        waiter.claim(&key, &fingerprint("a"), LEASE).await.unwrap(),
        Claim::InFlight { .. }
    ));
    let started = Instant::now();
    within(waiter.wait(&key, Duration::from_secs(20)))
        .await
        .unwrap();
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(2),
        "the wait ended with the lease, after {waited:?}"
    );
    assert!(matches!(
        waiter.claim(&key, &fingerprint("a"), LEASE).await.unwrap(),
        Claim::Abandoned { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_subscription_drops_still_wakes_when_the_claim_ends() {
    let server = RedisServer::start();
    let owner = connect(&server).await;
    let waiter = connect(&server)
        .await
        .with_poll_interval(Duration::from_secs(30));
    let key = fresh_key();
    let token = acquired(owner.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
    let waiting = tokio::spawn({
        let waiter = waiter.clone();
        async move { waiter.wait(&key, Duration::from_secs(20)).await }
    });
    eventually_async("the waiter subscribes", || async {
        subscribers(&server) == 1
    })
    .await;
    // The subscription is cut; the release below is published while nobody listens.
    server.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    owner.release(&key, token).await.unwrap();
    let started = Instant::now();
    within(waiting).await.expect("the waiter").unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the waiter looked again on resubscribing, after {:?}",
        started.elapsed()
    );
}

/// How many connections listen on the default notification channel.
fn subscribers(server: &RedisServer) -> u64 {
    let reply = server.cli(&["PUBSUB", "NUMSUB", "idempotency:notifications"]);
    reply
        .lines()
        .nth(1)
        .and_then(|count| count.trim().parse().ok())
        .unwrap_or(0)
}

async fn eventually_async<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_gets_no_answer_times_out_and_its_claim_is_released_by_its_token() {
    let server = RedisServer::start();
    let store = connect(&server)
        .await
        .with_response_timeout(Duration::from_millis(200));
    warm_up(&store).await;
    let key = fresh_key();
    // The server stops answering for a while; the claim is queued behind the pause.
    server.cli(&["CLIENT", "PAUSE", "1000", "ALL"]);
    let started = Instant::now();
    let token = FenceToken::generate();
    let claim = store.claim_as(&key, token, &fingerprint("a"), LEASE).await;
    assert_eq!(
        claim.map_err(|e| e.kind()),
        Err(StoreErrorKind::Unavailable)
    );
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "failed after {:?}",
        started.elapsed()
    );
    // Once the server answers again, the claim has run: it holds the key under the token the
    // caller chose, which releases it (the layer does, in the background) rather than leave
    // the key blocked for its 30 s lease.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let other = connect(&server).await;
    assert!(matches!(
        other.claim(&key, &fingerprint("a"), LEASE).await.unwrap(),
        Claim::InFlight { .. }
    ));
    store.release(&key, token).await.unwrap();
    acquired(other.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_or_foreign_values_are_corrupt_errors_never_panics() {
    let server = shared_server();
    let store = connect(server).await;
    let mut admin = admin(server).await;
    // A real completed envelope, to spoil in every way.
    let valid: Vec<u8> = {
        let key = fresh_key();
        let token = acquired(store.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
        store
            .complete(&key, token, sample_record(fingerprint("a")), TTL)
            .await
            .unwrap();
        query(&mut admin, redis::cmd("GET").arg(store.redis_key(&key))).await
    };
    assert_eq!(&valid[..4], b"TIC\x01");
    let spoiled = |at: usize, byte: u8| {
        let mut value = valid.clone();
        value[at] = byte;
        value
    };
    let mut trailing = valid.clone();
    trailing.push(0);
    let values: Vec<(&str, Vec<u8>)> = vec![
        ("json", br#"{"status":200,"body":"aGk="}"#.to_vec()),
        ("empty", Vec::new()),
        ("truncated envelope", valid[..valid.len() / 2].to_vec()),
        ("envelope header only", valid[..20].to_vec()),
        ("short envelope header", valid[..11].to_vec()),
        ("newer envelope", spoiled(3, 9)),
        ("newer record in an envelope", spoiled(23, 9)),
        ("foreign bytes in an envelope", spoiled(20, b'X')),
        ("trailing bytes after the record", trailing),
        ("bare record", sample_record(fingerprint("a")).encode()),
        (
            "newer marker",
            b"TIF\x02\x00\x01\x02\x03\x04\x05\x06\x07\x08".to_vec(),
        ),
        ("truncated marker", b"TIF\x01\x00\x01\x02".to_vec()),
        ("binary", vec![0xff, 0x00, 0xfe, 0x01]),
    ];
    for (what, value) in values {
        let key = fresh_key();
        let redis_key = store.redis_key(&key);
        let () = query(&mut admin, redis::cmd("SET").arg(&redis_key).arg(&value)).await;
        let claim = store.claim(&key, &fingerprint("a"), LEASE).await;
        assert_eq!(
            claim.map_err(|e| e.kind()),
            Err(StoreErrorKind::Corrupt),
            "claim over {what}"
        );
        let token = FenceToken::new(1);
        let fenced = [
            store
                .complete(&key, token, sample_record(fingerprint("a")), TTL)
                .await,
            store.renew(&key, token, LEASE).await,
            store.release(&key, token).await,
        ];
        for result in fenced {
            let kind = result.map_err(|e| e.kind()).err();
            assert!(
                matches!(
                    kind,
                    Some(StoreErrorKind::Corrupt | StoreErrorKind::LeaseLost)
                ),
                "fenced op over {what}: {kind:?}"
            );
        }
        let untouched: Vec<u8> = query(&mut admin, redis::cmd("GET").arg(&redis_key)).await;
        assert_eq!(untouched, value, "nothing was written over {what}");
        let wait = tokio::time::timeout(
            Duration::from_secs(5),
            store.wait(&key, Duration::from_secs(2)),
        )
        .await;
        assert!(wait.is_ok(), "a wait over {what} ends");
    }

    // Foreign bytes that are not ours at all are reported as such by the fenced ops too.
    let key = fresh_key();
    let () = query(
        &mut admin,
        redis::cmd("SET").arg(store.redis_key(&key)).arg("hello"),
    )
    .await;
    assert_eq!(
        store
            .release(&key, FenceToken::new(1))
            .await
            .map_err(|e| e.kind()),
        Err(StoreErrorKind::Corrupt)
    );

    // A key of another type.
    let key = fresh_key();
    let added: u64 = query(
        &mut admin,
        redis::cmd("HSET")
            .arg(store.redis_key(&key))
            .arg("status")
            .arg("200"),
    )
    .await;
    assert_eq!(added, 1);
    for kind in [
        store
            .claim(&key, &fingerprint("a"), LEASE)
            .await
            .map(|_| ())
            .map_err(|e| e.kind()),
        store
            .complete(
                &key,
                FenceToken::new(1),
                sample_record(fingerprint("a")),
                TTL,
            )
            .await
            .map_err(|e| e.kind()),
        store
            .wait(&key, Duration::from_secs(1))
            .await
            .map_err(|e| e.kind()),
    ] {
        assert_eq!(kind, Err(StoreErrorKind::Corrupt));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_bytes_through_the_layer_give_a_503_problem_and_no_second_execution() {
    let server = shared_server();
    let prefix = unique_prefix("corrupt");
    let handler = Handler::counting();
    let instance = serve(
        &IdempotencyLayer::new(connect(server).await.with_prefix(&prefix)),
        &handler,
    );
    let first = send(&instance, keyed_post("/charges", "k", "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let redis_key = keys(server, &prefix).await.pop().expect("the record's key");
    let mut admin = admin(server).await;
    let () = query(
        &mut admin,
        redis::cmd("SET")
            .arg(&redis_key)
            .arg(&b"\x00\x01 not a record \xff"[..]),
    )
    .await;
    let retry = send(&instance, keyed_post("/charges", "k", "{}")).await;
    retry.assert_problem(
        ProblemKind::StoreUnavailable,
        StatusCode::SERVICE_UNAVAILABLE,
    );
    retry.assert_retry_after();
    assert_eq!(handler.calls(), 1, "nothing ran unprotected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_every_size_and_shape_round_trip_through_redis() {
    let server = shared_server();
    let store = connect(server).await;
    let fingerprint = fingerprint("shapes");
    let mut headers = http::HeaderMap::new();
    headers.append("set-cookie", http::HeaderValue::from_static("a=1"));
    headers.append("set-cookie", http::HeaderValue::from_static("b=2"));
    let mut trailers = http::HeaderMap::new();
    trailers.append("grpc-status", http::HeaderValue::from_static("0"));
    let records = [
        Record::response(
            fingerprint,
            StatusCode::OK,
            &http::HeaderMap::new(),
            Bytes::new(),
            None,
        ),
        Record::response(
            fingerprint,
            StatusCode::ACCEPTED,
            &headers,
            Bytes::from_static(b"\x00\xff\r\n"),
            Some(&trailers),
        ),
        Record::not_replayable(fingerprint, StatusCode::CREATED),
    ];
    for record in records {
        let key = fresh_key();
        let token = acquired(store.claim(&key, &fingerprint, LEASE).await.unwrap());
        store
            .complete(&key, token, record.clone(), TTL)
            .await
            .unwrap();
        match store.claim(&key, &fingerprint, LEASE).await.unwrap() {
            Claim::Completed {
                record: found,
                expires_in,
            } => {
                assert_eq!(found, record);
                assert!(expires_in.is_some_and(|left| left <= TTL && left > TTL / 2));
            }
            other => panic!("expected the record, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_nothing_fails_quickly_as_unavailable() {
    let port = common::redis_server::free_port();
    let started = Instant::now();
    let error = RedisStore::connect(&format!("redis://127.0.0.1:{port}"))
        .await
        .expect_err("nothing listens there");
    assert_eq!(error.kind(), StoreErrorKind::Unavailable);
    assert!(started.elapsed() < Duration::from_secs(3));
    let invalid = RedisStore::connect("not a url").await.expect_err("invalid");
    assert_ne!(invalid.kind(), StoreErrorKind::Unavailable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_1_marker_of_an_older_instance_is_honoured_until_its_lease_ends() {
    let server = shared_server();
    let store = connect(server).await;
    let key = fresh_key();
    // What an instance of the previous version wrote: 45 bytes, expiring with its lease.
    let mut marker = b"TIF\x01\x00".to_vec();
    marker.extend_from_slice(&77u64.to_be_bytes());
    marker.extend_from_slice(fingerprint("a").as_bytes());
    let mut admin = admin(server).await;
    let _: () = query(
        &mut admin,
        redis::cmd("SET")
            .arg(store.redis_key(&key))
            .arg(&marker)
            .arg("PX")
            .arg(400),
    )
    .await;
    assert_eq!(
        store.claim(&key, &fingerprint("a"), LEASE).await.unwrap(),
        Claim::InFlight {
            fingerprint: fingerprint("a")
        }
    );
    let Some(tower_idempotency::Inspection::InFlight(claim)) = store.inspect(&key).await.unwrap()
    else {
        panic!("a format 1 marker is a claim in flight");
    };
    assert_eq!(
        (claim.token(), claim.claimed_at()),
        (FenceToken::new(77), None)
    );
    // Its owner's fenced scripts still recognise it.
    store
        .renew(&key, FenceToken::new(77), Duration::from_millis(400))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    // It expired with its lease, as format 1 markers do: the key is free, not abandoned.
    let token = acquired(store.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
    store.release(&key, token).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_or_lease_longer_than_redis_accepts_is_clamped_not_refused() {
    use tower_idempotency::{MAX_LEASE, MAX_TTL};
    let server = shared_server();
    let store = connect(server).await;
    let mut admin = admin(server).await;
    let key = fresh_key();
    let redis_key = store.redis_key(&key);
    let pttl = |admin: &mut redis::aio::MultiplexedConnection| {
        let redis_key = redis_key.clone();
        let mut admin = admin.clone();
        async move { query::<i64>(&mut admin, redis::cmd("PTTL").arg(&redis_key)).await }
    };
    let near = |left: i64, bound: Duration| {
        let bound = bound.as_millis() as i64;
        left <= bound && left > bound - 60_000
    };

    // `PX i64::MAX` overflows Redis's clock: it refuses the command. Clamped, it is a lease of
    // `MAX_LEASE`, and a TTL of `MAX_TTL`.
    let token = acquired(
        store
            .claim(&key, &fingerprint("a"), Duration::MAX)
            .await
            .unwrap(),
    );
    // A marker outlives its lease by the abandoned-claim retention.
    let marker_life = MAX_LEASE + tower_idempotency::redis::DEFAULT_ABANDONED_RETENTION;
    assert!(near(pttl(&mut admin).await, marker_life), "lease clamped");
    store.renew(&key, token, Duration::MAX).await.unwrap();
    assert!(near(pttl(&mut admin).await, marker_life), "renewal clamped");
    let record = sample_record(fingerprint("a"));
    store
        .complete(&key, token, record.clone(), Duration::MAX)
        .await
        .unwrap();
    assert!(near(pttl(&mut admin).await, MAX_TTL), "TTL clamped");
    match store.claim(&key, &fingerprint("a"), LEASE).await.unwrap() {
        Claim::Completed {
            record: found,
            expires_in: Some(left),
        } => {
            assert_eq!(found, record);
            assert!(left <= MAX_TTL && left > MAX_TTL - Duration::from_secs(60));
        }
        other => panic!("expected the record and its expiry, got {other:?}"),
    }

    // The longest settings the layer takes work end to end.
    let handler = Handler::counting();
    let layer = IdempotencyLayer::new(store)
        .with_ttl(MAX_TTL)
        .with_lease(MAX_LEASE);
    let svc = serve(&layer, &handler);
    let first = send(&svc, keyed_post("/charges", &fresh_key().to_hex(), "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let key = fresh_key().to_hex();
    send(&svc, keyed_post("/charges", &key, "{}")).await;
    assert!(
        send(&svc, keyed_post("/charges", &key, "{}"))
            .await
            .replayed()
    );
    assert_eq!(handler.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_settings_that_would_stop_it_working_panic_naming_the_setter() {
    let store = connect(shared_server()).await;
    type Set = fn(RedisStore) -> RedisStore;
    let cases: [(&str, Set, Option<&str>); 6] = [
        (
            "zero timeout",
            |s| s.with_response_timeout(Duration::ZERO),
            Some("RedisStore::with_response_timeout"),
        ),
        (
            "1 ms timeout",
            |s| s.with_response_timeout(Duration::from_millis(1)),
            None,
        ),
        (
            "endless timeout",
            |s| s.with_response_timeout(Duration::MAX),
            None,
        ),
        (
            "zero poll interval",
            |s| s.with_poll_interval(Duration::ZERO),
            Some("RedisStore::with_poll_interval"),
        ),
        (
            "1 ms poll interval",
            |s| s.with_poll_interval(Duration::from_millis(1)),
            None,
        ),
        (
            "endless poll interval",
            |s| s.with_poll_interval(Duration::MAX),
            None,
        ),
    ];
    for (what, set, refused_by) in cases {
        let store = store.clone();
        common::panics::assert_refused_by(what, refused_by, move || drop(set(store)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_with_an_endless_poll_interval_ends_at_its_timeout() {
    let server = shared_server();
    let owner = connect(server).await;
    let waiter = connect(server).await.with_poll_interval(Duration::MAX);
    let key = fresh_key();
    let token = acquired(owner.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
    let started = Instant::now();
    within(waiter.wait(&key, Duration::from_millis(300)))
        .await
        .unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "returned early: {waited:?}"
    );
    // And a wait with no bound at all on a claim that ends.
    let waiting = tokio::spawn(async move { waiter.wait(&key, Duration::MAX).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    owner.release(&key, token).await.unwrap();
    within(waiting).await.unwrap().unwrap();
}
