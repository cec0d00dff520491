//! `MemoryStore::new(bytes)` keeps about `bytes` of memory: records are weighed by what they
//! really hold on the heap (their header maps, body, the cache's own bookkeeping), measured
//! here by a counting allocator, so the capacity a user sets is the memory they spend.
//!
//! Its own test binary: the global allocator counts every allocation of the process.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use tower_idempotency::{Claim, Fingerprint, IdempotencyStore, MemoryStore, Record, StorageKey};

#[path = "common/counting_alloc.rs"]
mod counting_alloc;

use counting_alloc::live;

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

/// A response as a JSON API sends it, with `headers` headers and a body of `body` bytes.
fn response(headers: usize, body: usize, serial: u64) -> Record {
    let mut map = HeaderMap::new();
    map.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    map.insert(header::CONTENT_LENGTH, HeaderValue::from(body));
    for i in 2..headers {
        map.append(
            header::SET_COOKIE,
            HeaderValue::from_str(&format!("session{i}={serial:032x}; Path=/; HttpOnly"))
                .expect("a valid header value"),
        );
    }
    Record::response(
        fingerprint(serial),
        StatusCode::CREATED,
        &map,
        Bytes::from(vec![b'x'; body]),
        None,
    )
}

fn fingerprint(serial: u64) -> Fingerprint {
    let mut bytes = [0; 32];
    bytes[..8].copy_from_slice(&serial.to_be_bytes());
    Fingerprint::from_bytes(bytes)
}

/// A digest-like key: every byte depends on `serial`.
fn key(serial: u64) -> StorageKey {
    let mut bytes = [0; 32];
    for (lane, chunk) in bytes.chunks_exact_mut(8).enumerate() {
        let mixed = (serial ^ lane as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        chunk.copy_from_slice(&mixed.to_le_bytes());
    }
    StorageKey::from_bytes(bytes)
}

#[tokio::test(flavor = "current_thread")]
async fn a_store_holds_about_as_many_bytes_as_its_capacity() {
    const CAPACITY: u64 = 4 * 1024 * 1024;
    // (headers, body bytes) of the records written: small to large.
    let shapes = [
        (2, 0),
        (3, 0),
        (4, 0),
        (6, 0),
        (10, 0),
        (3, 300),
        (2, 2_000),
        (4, 16_000),
    ];
    let mut off = Vec::new();
    for (headers, body) in shapes {
        let store = MemoryStore::new(CAPACITY);
        let before = live();
        let records = 3 * CAPACITY / (response(headers, body, 0).weight() as u64);
        for serial in 0..records {
            let key = key(serial);
            let Ok(Claim::Acquired(token)) = store.claim(&key, &fingerprint(serial), LEASE).await
            else {
                panic!("a fresh key is free");
            };
            let record = response(headers, body, serial);
            store.complete(&key, token, record, TTL).await.unwrap();
        }
        let kept = store.record_count();
        assert!(store.evictions() > 0, "filled past its capacity");
        let held = (live() - before) as f64;
        let ratio = held / CAPACITY as f64;
        println!(
            "{headers} headers, {body} B body: {kept} records kept, {:.0} B each, \
             {held:.0} B held for a capacity of {CAPACITY} B ({ratio:.2}×)",
            held / kept as f64
        );
        if !(0.8..=1.2).contains(&ratio) {
            off.push(format!(
                "{headers} headers, {body} B body: {held:.0} B held for a capacity of \
                 {CAPACITY} B ({ratio:.2}×)"
            ));
        }
        drop(store);
    }
    assert!(off.is_empty(), "{off:#?}");
}
