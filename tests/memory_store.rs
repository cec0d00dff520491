//! `MemoryStore`: the conformance suite, and its behaviour under capacity pressure.

mod common;

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tower_idempotency::{Claim, IdempotencyStore, MemoryStore, Record, StorageKey};

use common::conformance::{fingerprint, fresh_key};

conformance_suite!(async { MemoryStore::default() });

#[cfg(feature = "axum")]
operations_suite!(async { MemoryStore::default() });

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
    let store = MemoryStore::new(10_000);
    let key = complete_new_key(&store, record_of(100_000)).await;
    store.evictions();
    // moka refuses an entry heavier than the cache; the key is then simply free again.
    let claim = store.claim(&key, &fingerprint("a"), LEASE).await.unwrap();
    assert!(matches!(
        claim,
        Claim::Acquired(_) | Claim::Completed { .. }
    ));
}

#[tokio::test]
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

    // Read, an expired record is not replayed: its key is free, and the record is dropped.
    assert!(matches!(
        store
            .claim(&expiring[0], &fingerprint("a"), LEASE)
            .await
            .unwrap(),
        Claim::Acquired(_)
    ));
    assert_eq!(store.record_count(), 99);

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
