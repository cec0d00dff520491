//! `RedisStore` over stored times out of any clock's range (bytes written by something else, a
//! bit flipped): a look-up is a `Corrupt` error and a listing leaves the claim out, never a
//! panic nor a time half a billion years ahead.
#![cfg(feature = "redis")]

mod common;

use std::time::Duration;

use tower_idempotency::{AdminStore, IdempotencyStore, RedisStore, StoreErrorKind};

use common::{
    conformance::{fingerprint, fresh_key, sample_record},
    redis_server::RedisServer,
};

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

/// Bytes 45..53 of a marker: when it was claimed, Unix ms.
const CLAIMED_AT: usize = 45;
/// Bytes 53..61 of a marker: how long the key outlives the lease, ms.
const RETENTION: usize = 53;
/// Bytes 4..12 of a completed envelope: when Redis expires it, Unix ms.
const EXPIRES_AT: usize = 4;

fn with(mut value: Vec<u8>, at: usize, field: u64) -> Vec<u8> {
    value[at..at + 8].copy_from_slice(&field.to_be_bytes());
    value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_times_out_of_range_are_corrupt_never_a_panic() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url())
        .await
        .expect("connect to the test server");
    // A real marker and a real envelope, to spoil.
    let claimed = fresh_key();
    store
        .claim(&claimed, &fingerprint("a"), LEASE)
        .await
        .expect("a claim");
    let completed = fresh_key();
    let token = match store.claim(&completed, &fingerprint("a"), LEASE).await {
        Ok(tower_idempotency::Claim::Acquired(token)) => token,
        other => panic!("expected to acquire, got {other:?}"),
    };
    store
        .complete(&completed, token, sample_record(fingerprint("a")), TTL)
        .await
        .expect("a completion");
    let client = redis::Client::open(server.url()).expect("a client");
    let mut admin = client
        .get_multiplexed_async_connection()
        .await
        .expect("an admin connection");
    let mut get = async |key| -> Vec<u8> {
        redis::cmd("GET")
            .arg(store.redis_key(key))
            .query_async(&mut admin)
            .await
            .expect("GET")
    };
    let (marker, envelope) = (get(&claimed).await, get(&completed).await);
    assert_eq!(&marker[..4], b"TIF\x02");
    assert_eq!(&envelope[..4], b"TIC\x01");

    // Each a year 9999 or later by some clock: no instance ever writes one.
    let latest = 253_402_300_799_999;
    let spoiled = [
        (
            "claimed at u64::MAX",
            with(marker.clone(), CLAIMED_AT, u64::MAX),
        ),
        (
            "claimed after 9999",
            with(marker.clone(), CLAIMED_AT, latest + 1),
        ),
        (
            "retention u64::MAX",
            with(marker.clone(), RETENTION, u64::MAX),
        ),
        (
            "expires at u64::MAX",
            with(envelope.clone(), EXPIRES_AT, u64::MAX),
        ),
        (
            "expires after 9999",
            with(envelope.clone(), EXPIRES_AT, latest + 1),
        ),
    ];
    for (what, value) in spoiled {
        let key = fresh_key();
        let () = redis::cmd("SET")
            .arg(store.redis_key(&key))
            .arg(&value)
            .arg("PX")
            .arg(60_000)
            .query_async(&mut admin)
            .await
            .expect("SET");

        let inspected = store.inspect(&key).await.map(|_| ()).map_err(|e| e.kind());
        assert_eq!(
            inspected,
            Err(StoreErrorKind::Corrupt),
            "inspect over {what}"
        );
        let mut listed = Vec::new();
        let mut cursor = None;
        loop {
            let page = store
                .list_claims(Duration::ZERO, cursor, 100)
                .await
                .unwrap_or_else(|error| panic!("list over {what}: {error}"));
            listed.extend(page.claims.iter().map(|claim| *claim.key()));
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        assert!(!listed.contains(&key), "{what} is not listed");
        assert!(listed.contains(&claimed), "the sound claim is listed");
        let () = redis::cmd("DEL")
            .arg(store.redis_key(&key))
            .query_async(&mut admin)
            .await
            .expect("DEL");
    }
}
