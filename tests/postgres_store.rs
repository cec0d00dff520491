//! `PostgresStore` against a real PostgreSQL server that the tests start themselves: the
//! harness, the conformance suite, statements counted per operation, purging, settings, and
//! corrupt rows.
#![cfg(feature = "postgres")]

mod common;

use std::{
    sync::OnceLock,
    time::{Duration, Instant},
};

use http::StatusCode;
use sqlx::{PgPool, postgres::PgPoolOptions};
use tower_idempotency::{
    AdminStore, Claim, FenceToken, IdempotencyLayer, IdempotencyStore, PostgresStore, ProblemKind,
    StoreErrorKind,
};

use common::{
    conformance::{fingerprint, fresh_key, sample_record},
    postgres_server::PostgresServer,
    service::{Handler, keyed_post, send, serve},
};

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

/// One server for the tests that only need keys of their own; it stops with the test binary.
fn shared_server() -> &'static PostgresServer {
    static SERVER: OnceLock<PostgresServer> = OnceLock::new();
    SERVER.get_or_init(PostgresServer::start)
}

/// A pool on `server` that gives up on a connection within a second.
fn pool(server: &PostgresServer) -> PgPool {
    PgPoolOptions::new()
        .max_connections(10)
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy(&server.url())
        .expect("a valid URL")
}

/// A store on the shared server, in `table`, created if missing.
async fn store_in(table: &str) -> PostgresStore {
    let store = PostgresStore::new(pool(shared_server())).with_table(table);
    store.migrate().await.expect("create the table");
    store
}

conformance_suite!(async { store_in("conformance").await });
admin_conformance_suite!(async { store_in("conformance").await });

fn acquired(claim: Claim) -> FenceToken {
    match claim {
        Claim::Acquired(token) => token,
        other => panic!("expected the claim to be acquired, got {other:?}"),
    }
}

/// How many times each statement on `table` ran since the last reset, by its first words.
async fn statement_calls(admin: &PgPool, table: &str) -> Vec<(String, i64)> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT query, calls FROM pg_stat_statements
         WHERE query LIKE '%' || $1 || '%' AND query NOT LIKE '%pg_stat_statements%'",
    )
    .bind(table)
    .fetch_all(admin)
    .await
    .expect("read pg_stat_statements");
    let mut calls: Vec<(String, i64)> = rows
        .into_iter()
        .map(|(query, calls)| {
            let words: Vec<&str> = query.split_whitespace().take(4).collect();
            (words.join(" "), calls)
        })
        .collect();
    calls.sort();
    calls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_is_one_statement() {
    let table = "round_trips";
    let store = store_in(table).await;
    let admin = pool(shared_server());
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(&admin)
        .await
        .expect("pg_stat_statements is loaded by the harness");
    let count = |what: &'static str| {
        let admin = admin.clone();
        async move {
            let calls = statement_calls(&admin, table).await;
            calls
                .into_iter()
                .filter(|(query, _)| query.contains(what))
                .map(|(_, calls)| calls)
                .sum::<i64>()
        }
    };
    let key = fresh_key();
    sqlx::query("SELECT pg_stat_statements_reset()")
        .execute(&admin)
        .await
        .unwrap();
    let token = acquired(store.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
    store
        .complete(&key, token, sample_record(fingerprint("a")), TTL)
        .await
        .unwrap();
    assert!(matches!(
        store.claim(&key, &fingerprint("a"), LEASE).await.unwrap(),
        Claim::Completed { .. }
    ));
    let all = statement_calls(&admin, table).await;
    // The claim (twice: first execution, then replay) and the completion; nothing else.
    assert_eq!(count("WITH claimed AS").await, 2, "{all:?}");
    assert_eq!(count("WITH done AS").await, 1, "{all:?}");
    assert_eq!(
        all.iter().map(|(_, calls)| calls).sum::<i64>(),
        3,
        "{all:?}"
    );

    // Renewal, release and break (the statistics are the server's: counted in this one test).
    let (renewed, released, broken) = (fresh_key(), fresh_key(), fresh_key());
    let renewing = acquired(
        store
            .claim(&renewed, &fingerprint("a"), LEASE)
            .await
            .unwrap(),
    );
    let releasing = acquired(
        store
            .claim(&released, &fingerprint("a"), LEASE)
            .await
            .unwrap(),
    );
    acquired(
        store
            .claim(&broken, &fingerprint("a"), LEASE)
            .await
            .unwrap(),
    );
    sqlx::query("SELECT pg_stat_statements_reset()")
        .execute(&admin)
        .await
        .unwrap();
    store.renew(&renewed, renewing, LEASE).await.unwrap();
    store.release(&released, releasing).await.unwrap();
    assert!(store.break_claim(&broken).await.unwrap().is_some());
    let all = statement_calls(&admin, table).await;
    assert_eq!(count("UPDATE").await, 1, "the renewal: {all:?}");
    // The release and the break: a DELETE and its NOTIFY, one statement each.
    assert_eq!(count("WITH gone AS").await, 2, "{all:?}");
    assert_eq!(
        all.iter().map(|(_, calls)| calls).sum::<i64>(),
        3,
        "{all:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_survives_a_kill_and_restarts_on_the_same_port() {
    let mut server = PostgresServer::start();
    let pool = pool(&server);
    sqlx::query("CREATE TABLE t (x int)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO t VALUES (1)")
        .execute(&pool)
        .await
        .unwrap();
    let port = server.port();
    server = tokio::task::spawn_blocking(move || {
        server.kill();
        server
    })
    .await
    .unwrap();
    assert!(sqlx::query("SELECT 1").execute(&pool).await.is_err());
    server = tokio::task::spawn_blocking(move || {
        server.restart();
        server
    })
    .await
    .unwrap();
    assert_eq!(server.port(), port);
    let (low, high) = {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
        let mut parts = range.split_whitespace().map(|p| p.parse::<u16>().unwrap());
        (parts.next().unwrap(), parts.next().unwrap())
    };
    assert!(
        !(low..=high).contains(&port),
        "port {port} must be outside the ephemeral range {low}-{high}"
    );
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 1, "the committed row survived the crash");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_rows_are_purged_in_bounded_batches_and_never_read() {
    let store = store_in("purging").await;
    let mut keys = Vec::new();
    for _ in 0..25 {
        let key = fresh_key();
        let token = acquired(store.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
        store
            .complete(
                &key,
                token,
                sample_record(fingerprint("a")),
                Duration::from_millis(50),
            )
            .await
            .unwrap();
        keys.push(key);
    }
    let live = fresh_key();
    let token = acquired(store.claim(&live, &fingerprint("a"), LEASE).await.unwrap());
    store
        .complete(&live, token, sample_record(fingerprint("a")), TTL)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Expired, not yet purged: no read returns them.
    assert_eq!(store.inspect(&keys[0]).await.unwrap(), None);
    assert!(!store.forget(&keys[1]).await.unwrap());
    let mut purged = Vec::new();
    loop {
        let n = store.purge_expired(10).await.unwrap();
        assert!(n <= 10, "a batch is bounded: {n}");
        purged.push(n);
        if n < 10 {
            break;
        }
    }
    // `forget` above deleted one of them already.
    assert_eq!(purged.iter().sum::<u64>(), 24, "{purged:?}");
    assert!(matches!(
        store.claim(&live, &fingerprint("a"), LEASE).await.unwrap(),
        Claim::Completed { .. }
    ));
    // The purge reads the expiry index, never the whole table.
    let plan: Vec<(String,)> = sqlx::query_as(
        "EXPLAIN SELECT key FROM purging WHERE expires_at <= statement_timestamp() \
         ORDER BY expires_at LIMIT 10",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    let plan: String = plan.into_iter().map(|(line,)| line + "\n").collect();
    assert!(plan.contains("purging_expires_at"), "{plan}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_purger_deletes_expired_rows_until_dropped() {
    let store = store_in("background_purge").await;
    let key = fresh_key();
    let token = acquired(store.claim(&key, &fingerprint("a"), LEASE).await.unwrap());
    store
        .complete(
            &key,
            token,
            sample_record(fingerprint("a")),
            Duration::from_millis(10),
        )
        .await
        .unwrap();
    let rows = |store: PostgresStore| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM background_purge")
            .fetch_one(store.pool())
            .await
            .unwrap()
    };
    let purger = store.spawn_purger(Duration::from_millis(50), 100);
    let deadline = Instant::now() + Duration::from_secs(10);
    while rows(store.clone()).await > 0 {
        assert!(Instant::now() < deadline, "the purger did not purge");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(purger);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_rows_are_errors_not_panics_and_the_layer_answers_503() {
    let store = store_in("corrupt").await;
    let table_rows = [
        // (record, fingerprint length)
        (Some(b"\x00\x01 not a record \xff".to_vec()), 32),
        (Some(Vec::new()), 32),
        (None, 7),
    ];
    for (record, fingerprint_len) in table_rows {
        let key = fresh_key();
        sqlx::query(
            "INSERT INTO corrupt (key, token, fingerprint, claimed_at, lease_until, expires_at, record)
             VALUES ($1, 1, $2, now(), now() + interval '1 hour', now() + interval '1 day', $3)",
        )
        .bind(&key.as_bytes()[..])
        .bind(vec![0u8; fingerprint_len])
        .bind(record.clone())
        .execute(store.pool())
        .await
        .unwrap();
        let claim = store.claim(&key, &fingerprint("a"), LEASE).await;
        assert_eq!(
            claim.map_err(|e| e.kind()),
            Err(StoreErrorKind::Corrupt),
            "{record:?}"
        );
        assert_eq!(
            store.inspect(&key).await.map_err(|e| e.kind()),
            Err(StoreErrorKind::Corrupt)
        );
    }
    let handler = Handler::counting();
    let layer = IdempotencyLayer::new(store.clone());
    let instance = serve(&layer, &handler);
    let first = send(&instance, keyed_post("/charges", "k", "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    sqlx::query("UPDATE corrupt SET record = '\\x00ff'::bytea WHERE record IS NOT NULL")
        .execute(store.pool())
        .await
        .unwrap();
    let retry = send(&instance, keyed_post("/charges", "k", "{}")).await;
    retry.assert_problem(
        ProblemKind::StoreUnavailable,
        StatusCode::SERVICE_UNAVAILABLE,
    );
    assert_eq!(handler.calls(), 1, "nothing ran unprotected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_would_stop_the_store_working_panic_naming_the_setter() {
    let store = PostgresStore::new(pool(shared_server()));
    type Set = fn(PostgresStore) -> PostgresStore;
    let cases: [(&str, Set, Option<&str>); 8] = [
        (
            "zero timeout",
            |s| s.with_response_timeout(Duration::ZERO),
            Some("PostgresStore::with_response_timeout"),
        ),
        (
            "endless timeout",
            |s| s.with_response_timeout(Duration::MAX),
            None,
        ),
        (
            "zero poll",
            |s| s.with_poll_interval(Duration::ZERO),
            Some("PostgresStore::with_poll_interval"),
        ),
        (
            "endless poll",
            |s| s.with_poll_interval(Duration::MAX),
            None,
        ),
        (
            "injected table",
            |s| s.with_table("t; DROP TABLE x"),
            Some("PostgresStore::with_table"),
        ),
        (
            "quoted table",
            |s| s.with_table("\"T\""),
            Some("PostgresStore::with_table"),
        ),
        (
            "empty table",
            |s| s.with_table(""),
            Some("PostgresStore::with_table"),
        ),
        ("schema table", |s| s.with_table("app.keys"), None),
    ];
    for (what, set, refused_by) in cases {
        let store = store.clone();
        common::panics::assert_refused_by(what, refused_by, move || drop(set(store)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_on_one_database_execute_once_and_replay_across_instances() {
    let first = store_in("instances").await;
    let second = store_in("instances").await;
    let handler = Handler::sleeping(Duration::from_millis(200));
    let a = serve(&IdempotencyLayer::new(first), &handler);
    let b = serve(&IdempotencyLayer::new(second), &handler);
    let key = format!("across-{}", fresh_key().to_hex());
    let replies: Vec<_> = futures_join(
        (0..20)
            .map(|i| {
                let svc = if i % 2 == 0 { a.clone() } else { b.clone() };
                let key = key.clone();
                tokio::spawn(async move { send(&svc, keyed_post("/charges", &key, "{}")).await })
            })
            .collect(),
    )
    .await;
    assert_eq!(handler.calls(), 1, "one execution across both instances");
    let bodies: std::collections::HashSet<_> = replies.iter().map(|r| r.body.clone()).collect();
    assert_eq!(bodies.len(), 1, "every duplicate got the first response");
    assert!(replies.iter().all(|r| r.status == StatusCode::CREATED));
}

async fn futures_join<T>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        out.push(handle.await.expect("the task"));
    }
    out
}

/// Stops or restarts `server` off the async workers (it waits for the process).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("the blocking step")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_gives_503s_and_the_same_instance_recovers_after_its_restart() {
    let mut server = PostgresServer::start();
    let store = PostgresStore::new(pool(&server)).with_response_timeout(Duration::from_millis(500));
    store.migrate().await.unwrap();
    let handler = Handler::counting();
    let instance = serve(&IdempotencyLayer::new(store), &handler);
    let first = send(&instance, keyed_post("/charges", "before", "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);

    server = blocking(move || {
        server.kill();
        server
    })
    .await;
    for n in 0..3 {
        let started = Instant::now();
        let reply = send(
            &instance,
            keyed_post("/charges", &format!("down-{n}"), "{}"),
        )
        .await;
        reply.assert_problem(
            ProblemKind::StoreUnavailable,
            StatusCode::SERVICE_UNAVAILABLE,
        );
        reply.assert_retry_after();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "a 503, not a hang: {:?}",
            started.elapsed()
        );
    }
    assert_eq!(handler.calls(), 1, "nothing ran unprotected");

    server = blocking(move || {
        server.restart();
        server
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let recovered = loop {
        let reply = send(&instance, keyed_post("/charges", "after", "{}")).await;
        if reply.status == StatusCode::CREATED {
            break reply;
        }
        reply.assert_problem(
            ProblemKind::StoreUnavailable,
            StatusCode::SERVICE_UNAVAILABLE,
        );
        assert!(Instant::now() < deadline, "the instance did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let retry = send(&instance, keyed_post("/charges", "after", "{}")).await;
    assert!(retry.replayed(), "records are kept again");
    assert_eq!(retry.body, recovered.body);
    // The record stored before the crash survived it.
    let before = send(&instance, keyed_post("/charges", "before", "{}")).await;
    assert!(before.replayed());
    assert_eq!(before.body, first.body);
    assert_eq!(handler.calls(), 2);
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_wakes_by_notification_after_the_listener_reconnects() {
    let mut server = PostgresServer::start();
    // A poll interval far past the test: only a notification (or the reconnection) wakes it.
    let store = PostgresStore::new(pool(&server)).with_poll_interval(Duration::from_secs(600));
    store.migrate().await.unwrap();
    let key = fresh_key();
    // The listener is up once a first wait has run.
    store.wait(&key, Duration::from_millis(10)).await.unwrap();
    server = blocking(move || {
        server.kill();
        server.restart();
        server
    })
    .await;
    let token = loop {
        match store.claim(&key, &fingerprint("a"), LEASE).await {
            Ok(claim) => break acquired(claim),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    // Give the listener time to reconnect, then wait: the end must be notified.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            store.wait(&key, Duration::from_secs(60)).await.unwrap();
            started.elapsed()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Completed by another store (another instance): only NOTIFY tells this one.
    let other = PostgresStore::new(pool(&server));
    other
        .complete(&key, token, sample_record(fingerprint("a")), TTL)
        .await
        .unwrap();
    let waited = common::service::within(waiter).await.unwrap();
    assert!(waited < Duration::from_secs(5), "woke after {waited:?}");
    drop(server);
}
