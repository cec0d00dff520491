//! `MemoryStore::list_claims` does bounded work per page, however many claims the store holds:
//! a page of 10 out of 50 000 claims costs a few kilobytes, not a copy of every claim sorted;
//! and paging through lists each claim once, in key order.
//!
//! Its own test binary: the global allocator counts the bytes this thread allocates.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    collections::HashSet,
    time::Duration,
};

use tower_idempotency::{
    AdminStore, Claim, FenceToken, Fingerprint, IdempotencyStore, ListCursor, MemoryStore,
    StorageKey,
};

struct Counting;

thread_local! {
    /// Bytes allocated by this thread so far.
    static ALLOCATED: Cell<usize> = const { Cell::new(0) };
}

fn count(bytes: usize) {
    let _ = ALLOCATED.try_with(|allocated| allocated.set(allocated.get() + bytes));
}

// SAFETY: every call is forwarded to the system allocator unchanged; only sizes are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size.saturating_sub(layout.size()));
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const LEASE: Duration = Duration::from_secs(30);
const CLAIMS: u64 = 50_000;

/// Key `n`: spread over every first byte, as digests are.
fn key(n: u64) -> StorageKey {
    let mut bytes = [0; 32];
    let mut state = n;
    for chunk in bytes.chunks_mut(8) {
        // splitmix64
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        chunk.copy_from_slice(&(z ^ (z >> 31)).to_be_bytes());
    }
    StorageKey::from_bytes(bytes)
}

async fn store_with_claims() -> (MemoryStore, Vec<(StorageKey, FenceToken)>) {
    let store = MemoryStore::default();
    let fingerprint = Fingerprint::from_bytes([7; 32]);
    let mut claimed = Vec::new();
    for n in 0..CLAIMS {
        match store.claim(&key(n), &fingerprint, LEASE).await {
            Ok(Claim::Acquired(token)) => claimed.push((key(n), token)),
            other => panic!("a fresh key is free: {other:?}"),
        }
    }
    (store, claimed)
}

/// Bytes allocated by this thread while `f` runs.
async fn allocated_by<T>(f: impl Future<Output = T>) -> (T, usize) {
    let before = ALLOCATED.with(Cell::get);
    let output = f.await;
    (output, ALLOCATED.with(Cell::get) - before)
}

#[tokio::test(flavor = "current_thread")]
async fn a_page_costs_a_bounded_amount_whatever_the_number_of_claims() {
    let (store, _claimed) = store_with_claims().await;
    for (limit, cursor) in [
        (1, None),
        (10, None),
        (10, Some(ListCursor::new(key(7).to_hex()))),
        (100, None),
    ] {
        let (page, bytes) = allocated_by(store.list_claims(Duration::ZERO, cursor, limit)).await;
        let page = page.expect("a page");
        assert!(!page.claims.is_empty() && page.claims.len() <= limit);
        assert!(page.next.is_some());
        // A page's claims, its cursor and a heap of `limit + 1` keys; before, every claim of
        // the store was copied and sorted (50 000 claims: several megabytes).
        let bound = 4_096 + limit * 256;
        assert!(
            bytes <= bound,
            "a page of {limit} allocated {bytes} bytes (bound {bound})"
        );
    }
}

#[tokio::test(flavor = "current_thread")]
async fn paging_lists_every_claim_once_in_key_order() {
    let (store, claimed) = store_with_claims().await;
    let mut expected: Vec<StorageKey> = claimed.iter().map(|(key, _)| *key).collect();
    expected.sort();
    for limit in [1_000, 333] {
        let mut listed = Vec::new();
        let mut cursor = None;
        let mut pages = 0;
        loop {
            pages += 1;
            assert!(pages < 10_000, "the listing ends");
            let page = store
                .list_claims(Duration::ZERO, cursor, limit)
                .await
                .expect("a page");
            assert!(page.claims.len() <= limit);
            listed.extend(page.claims.iter().map(|claim| *claim.key()));
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        assert_eq!(
            listed.len(),
            expected.len(),
            "every claim, once (limit {limit})"
        );
        assert_eq!(listed, expected, "in key order (limit {limit})");
        let tokens: HashSet<FenceToken> = claimed.iter().map(|(_, token)| *token).collect();
        assert_eq!(tokens.len(), claimed.len());
    }
    // Claims younger than asked are left out, on every page.
    let mut cursor = None;
    loop {
        let page = store
            .list_claims(Duration::from_secs(3_600), cursor, 100)
            .await
            .expect("a page");
        assert!(page.claims.is_empty());
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
}
