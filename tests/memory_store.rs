//! `MemoryStore`: the conformance suite, and its behaviour under capacity pressure.

mod common;

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tower_idempotency::{Claim, IdempotencyStore, MemoryStore, Record, StorageKey};

use common::conformance::{fingerprint, fresh_key};

conformance_suite!(paused; async { MemoryStore::default() });

// The operator tools compare against `SystemTime`: the real clock.
admin_conformance_suite!(async { MemoryStore::default() });

#[cfg(feature = "axum")]
operations_suite!(async { MemoryStore::default() });

rotation_suite!(async { MemoryStore::default() });

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

fn record_of(len: usize) -> Record {
    Record::response(
        fingerprint("a"),
        StatusCode::OK,
        &HeaderMap::new(),
        Bytes::from(vec![b'x'; len]),
        None,
    )
}

async fn complete_new_key(store: &MemoryStore, record: Record) -> StorageKey {
    let key = fresh_key();
    let Claim::Acquired(token) = store.claim(&key, &fingerprint("a"), LEASE).await.unwrap() else {
        panic!("a fresh key is free");
    };
    store.complete(&key, token, record, TTL).await.unwrap();
    key
}

#[tokio::test]
async fn a_store_filled_past_its_capacity_still_replays_its_most_recent_keys() {
    let record = record_of(1_000);
    let per_record = record.weight() as u64;
    // Room for 10 000 records; 30 000 are written.
    let store = MemoryStore::new(per_record * 10_000);
    let mut keys = Vec::new();
    for _ in 0..30_000 {
        keys.push(complete_new_key(&store, record.clone()).await);
    }
    let recent = &keys[keys.len() - 5_000..];
    let mut replayed = 0;
    for key in recent {
        if matches!(
            store.claim(key, &fingerprint("a"), LEASE).await.unwrap(),
            Claim::Completed { .. }
        ) {
            replayed += 1;
        }
    }
    assert_eq!(
        replayed,
        recent.len(),
        "every one of the 5 000 most recent keys replays"
    );
    assert!(
        store.evictions() >= 15_000,
        "evictions are counted: {}",
        store.evictions()
    );
    assert!(store.record_count() <= 10_000);
}

#[tokio::test]
async fn a_claim_in_flight_is_never_evicted() {
    let record = record_of(1_000);
    let store = MemoryStore::new(record.weight() as u64 * 100);
    let key = fresh_key();
    let Claim::Acquired(token) = store.claim(&key, &fingerprint("a"), LEASE).await.unwrap() else {
        panic!("a fresh key is free");
    };
    for _ in 0..5_000 {
        complete_new_key(&store, record.clone()).await;
    }
    assert!(store.evictions() > 4_000);
    assert_eq!(store.in_flight_count(), 1);
    assert!(matches!(
        store.claim(&key, &fingerprint("a"), LEASE).await.unwrap(),
        Claim::InFlight { .. }
    ));
    store
        .complete(&key, token, record.clone(), TTL)
        .await
        .unwrap();
    assert!(matches!(
        store.claim(&key, &fingerprint("a"), LEASE).await.unwrap(),
        Claim::Completed { .. }
    ));
}

#[tokio::test]
async fn a_record_larger_than_the_whole_store_is_not_kept_and_nothing_breaks() {
    let store = MemoryStore::new(MemoryStore::MIN_CAPACITY_BYTES);
    let key = complete_new_key(&store, record_of(1_000_000)).await;
    store.evictions();
    // moka refuses an entry heavier than the cache; the key is then simply free again.
    let claim = store.claim(&key, &fingerprint("a"), LEASE).await.unwrap();
    assert!(matches!(
        claim,
        Claim::Acquired(_) | Claim::Completed { .. }
    ));
}

#[tokio::test(start_paused = true)]
async fn expired_records_are_never_replayed_and_make_room_without_counting_as_evictions() {
    let record = record_of(1_000);
    // Room for 100 records.
    let store = MemoryStore::new(record.weight() as u64 * 100);
    let mut expiring = Vec::new();
    for _ in 0..100 {
        let key = fresh_key();
        let Claim::Acquired(token) = store.claim(&key, &fingerprint("a"), LEASE).await.unwrap()
        else {
            panic!("a fresh key is free");
        };
        let ttl = Duration::from_millis(50);
        store
            .complete(&key, token, record.clone(), ttl)
            .await
            .unwrap();
        expiring.push(key);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        store.record_count(),
        100,
        "expired records wait to be read or pushed out"
    );

    // Read, an expired record is not replayed: its key is free. The read leaves it in place
    // (it might have removed a newer record); the key's next record replaces it.
    let Claim::Acquired(token) = store
        .claim(&expiring[0], &fingerprint("a"), LEASE)
        .await
        .unwrap()
    else {
        panic!("an expired record is not replayed");
    };
    assert_eq!(store.record_count(), 100);
    store
        .complete(&expiring[0], token, record.clone(), TTL)
        .await
        .unwrap();
    assert_eq!(store.record_count(), 100, "replaced, not added");

    // Newer records push the rest out; that is not an eviction of anything still useful.
    let fresh: Vec<StorageKey> = {
        let mut keys = Vec::new();
        for _ in 0..99 {
            keys.push(complete_new_key(&store, record.clone()).await);
        }
        keys
    };
    assert_eq!(store.evictions(), 0, "only expired records made room");
    for key in &fresh {
        assert!(matches!(
            store.claim(key, &fingerprint("a"), LEASE).await.unwrap(),
            Claim::Completed { .. }
        ));
    }
    // One more live record than there is room for: now a live record is evicted.
    complete_new_key(&store, record.clone()).await;
    complete_new_key(&store, record).await;
    assert!(store.evictions() >= 1);
}

/// What the racing tasks saw of one key.
#[derive(Default)]
struct KeyLog {
    /// Set while a task holds the key (between its `Acquired` and its release or completion).
    held: std::sync::atomic::AtomicBool,
    acquired: std::sync::atomic::AtomicUsize,
    released: std::sync::atomic::AtomicUsize,
    completed: std::sync::atomic::AtomicUsize,
    /// Set once a completion returned: every claim that starts later must find the record.
    done: std::sync::atomic::AtomicBool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_claims_and_completions_acquire_each_key_generation_exactly_once() {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::SeqCst},
    };
    const TASKS: usize = 64;
    const KEYS: usize = 256;
    // Each key is released this many times before it is completed: that many generations.
    const RELEASES: usize = 2;
    let store = MemoryStore::default();
    // All in four shards, so that completions in a shard race with claims in it.
    let keys: Arc<Vec<StorageKey>> = Arc::new(
        (0..KEYS)
            .map(|n| {
                let mut bytes = *fresh_key().as_bytes();
                bytes[0] = (n % 4) as u8;
                bytes[1..9].copy_from_slice(&(n as u64).to_be_bytes());
                StorageKey::from_bytes(bytes)
            })
            .collect(),
    );
    let logs: Arc<Vec<KeyLog>> = Arc::new((0..KEYS).map(|_| KeyLog::default()).collect());
    let replays = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let (store, keys, logs, replays) = (
                store.clone(),
                Arc::clone(&keys),
                Arc::clone(&logs),
                Arc::clone(&replays),
            );
            tokio::spawn(async move {
                for i in 0..KEYS {
                    // Each task walks the keys from its own starting point.
                    let n = (i + task * 7) % KEYS;
                    let (key, log) = (&keys[n], &logs[n]);
                    loop {
                        let done_before = log.done.load(SeqCst);
                        match store.claim(key, &fingerprint("a"), LEASE).await.unwrap() {
                            Claim::Acquired(token) => {
                                assert!(!done_before, "key {n} acquired after its completion");
                                assert!(!log.held.swap(true, SeqCst), "key {n} held twice");
                                let generation = log.acquired.fetch_add(1, SeqCst);
                                tokio::task::yield_now().await;
                                log.held.store(false, SeqCst);
                                if generation < RELEASES {
                                    log.released.fetch_add(1, SeqCst);
                                    store.release(key, token).await.unwrap();
                                } else {
                                    let record =
                                        Record::not_replayable(fingerprint("a"), StatusCode::OK);
                                    store.complete(key, token, record, TTL).await.unwrap();
                                    log.completed.fetch_add(1, SeqCst);
                                    log.done.store(true, SeqCst);
                                    break;
                                }
                            }
                            Claim::InFlight { .. } => tokio::task::yield_now().await,
                            Claim::Abandoned { .. } => panic!("key {n}: no lease runs out here"),
                            Claim::Completed { record, .. } => {
                                assert_eq!(record.fingerprint(), &fingerprint("a"));
                                replays.fetch_add(1, SeqCst);
                                break;
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    for (n, log) in logs.iter().enumerate() {
        assert_eq!(log.completed.load(SeqCst), 1, "key {n} completed once");
        assert_eq!(log.released.load(SeqCst), RELEASES, "key {n}");
        assert_eq!(
            log.acquired.load(SeqCst),
            RELEASES + 1,
            "key {n}: one acquisition per generation"
        );
    }
    assert_eq!(
        replays.load(SeqCst),
        TASKS * KEYS - KEYS,
        "every other visit replayed"
    );
    assert_eq!(store.in_flight_count(), 0);
}

#[test]
fn a_memory_store_too_small_to_keep_a_record_panics() {
    let cases: [(u64, bool); 5] = [
        (0, false),
        (1, false),
        (MemoryStore::MIN_CAPACITY_BYTES - 1, false),
        (MemoryStore::MIN_CAPACITY_BYTES, true),
        (64 * 1024 * 1024, true),
    ];
    for (capacity, accepted) in cases {
        let message = common::panics::panic_message(|| drop(MemoryStore::new(capacity)));
        match message {
            None => assert!(accepted, "{capacity} bytes were accepted"),
            Some(message) => {
                assert!(!accepted, "{capacity} bytes: {message}");
                assert!(message.starts_with("MemoryStore::new"), "{message}");
            }
        }
    }
}

/// A reader that finds an expired record and is descheduled must not remove the record a
/// newer execution stored meanwhile: the next claim would run the handler again.
#[tokio::test(flavor = "multi_thread", worker_threads = 16)]
async fn no_claim_acquires_a_key_while_its_record_is_live_under_sixteen_racing_threads() {
    let seen = common::stress::no_claim_acquires_a_key_whose_record_is_live(
        MemoryStore::default(),
        16,
        (Duration::from_micros(500), Duration::ZERO),
        Duration::from_secs(2),
    )
    .await;
    println!("{seen:?}");
    assert!(
        seen.total > 50,
        "the key was executed again and again: {seen:?}"
    );
    assert_eq!(
        seen.while_live, 0,
        "executions while a record was live: {seen:?}"
    );
}
