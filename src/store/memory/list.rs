//! Listing the claims of a [`MemoryStore`] for operators, a bounded page at a time.
//!
//! Shards hold key ranges (a digest's first byte), so listing them in shard order, each
//! shard's keys in order, lists every claim in key order, and the cursor is the last key
//! looked at. A page looks through at most [`SHARDS_PER_PAGE`] shards and keeps at most
//! `limit + 1` keys while it does (the smallest ones after the cursor, in a bounded heap):
//! it never collects, nor sorts, every claim of the store.

use std::{
    collections::BinaryHeap,
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

use super::{
    MemoryStore,
    shard::{BYTES_PER_SHARD, SHARDS, Slot, claim_info, lock, shard_index},
};
use crate::{
    key::StorageKey,
    store::error::{StoreError, StoreErrorKind},
    store::inspect::{ClaimInfo, ClaimPage, ListCursor},
};

/// Shards one page looks through at most: with the page's limit, what bounds its work.
const SHARDS_PER_PAGE: usize = 8;
/// The largest page returned; a larger limit asks for this many.
const MAX_PAGE: usize = 1000;

impl MemoryStore {
    /// One page of the claims made at least `older_than` ago, after `cursor`.
    pub(super) fn list(
        &self,
        older_than: Duration,
        cursor: Option<&ListCursor>,
        limit: usize,
    ) -> Result<ClaimPage, StoreError> {
        let mut after = match cursor {
            Some(cursor) => Some(StorageKey::from_hex(cursor.as_str()).ok_or_else(|| {
                StoreError::new(StoreErrorKind::Other, "not a MemoryStore cursor")
            })?),
            None => None,
        };
        let limit = limit.clamp(1, MAX_PAGE);
        let (now, wall) = (Instant::now(), SystemTime::now());
        let mut index = after.as_ref().map_or(0, shard_index);
        if after.is_some_and(|after| after == last_key_of(index)) {
            // The previous page ended with this shard: the next one starts the page.
            (index, after) = (index + 1, None);
        }
        let mut claims = Vec::new();
        if index == SHARDS {
            return Ok(ClaimPage { claims, next: None });
        }
        for _ in 0..SHARDS_PER_PAGE {
            let want = limit - claims.len();
            let more = self.shard_page(
                index,
                after.as_ref(),
                want,
                older_than,
                (now, wall),
                &mut claims,
            );
            if more {
                // The page is full and this shard has more: resume after the last key listed.
                let next = claims
                    .last()
                    .map(|claim: &ClaimInfo| ListCursor::new(claim.key().to_hex()));
                return Ok(ClaimPage { claims, next });
            }
            index += 1;
            after = None;
            if index == SHARDS {
                return Ok(ClaimPage { claims, next: None });
            }
            if claims.len() == limit {
                break;
            }
        }
        // Stopped between shards: resume at shard `index`, after every key of the one before.
        let next = Some(ListCursor::new(last_key_of(index - 1).to_hex()));
        Ok(ClaimPage { claims, next })
    }

    /// Adds to `page`, in key order, up to `want` claims of shard `index` made at least
    /// `older_than` ago with keys after `after`; returns whether the shard holds more.
    fn shard_page(
        &self,
        index: usize,
        after: Option<&StorageKey>,
        want: usize,
        older_than: Duration,
        (now, wall): (Instant, SystemTime),
        page: &mut Vec<ClaimInfo>,
    ) -> bool {
        let claims = lock(&self.inner.shards[index].claims);
        // The `want + 1` smallest keys (a max-heap): one more than wanted tells that there are
        // more.
        let mut smallest = BinaryHeap::with_capacity(want + 1);
        for (key, slot) in claims.iter() {
            let Slot::InFlight(claim) = slot else {
                continue;
            };
            let old_enough =
                wall.duration_since(claim.claimed_at).unwrap_or_default() >= older_than;
            if !old_enough || after.is_some_and(|after| key <= after) {
                continue;
            }
            if smallest.len() <= want {
                smallest.push(*key);
            } else if smallest.peek().is_some_and(|largest| key < largest) {
                smallest.pop();
                smallest.push(*key);
            }
        }
        let mut keys = smallest.into_sorted_vec();
        let more = keys.len() > want;
        keys.truncate(want);
        page.extend(keys.iter().filter_map(|key| match claims.get(key) {
            Some(Slot::InFlight(claim)) => Some(claim_info(key, claim, now)),
            _ => None,
        }));
        more
    }
}

/// The largest key shard `index` can hold: every key after it lives in a later shard.
fn last_key_of(index: usize) -> StorageKey {
    let mut bytes = [0xff; 32];
    // At most 255: `index` is below `SHARDS`.
    bytes[0] = u8::try_from((index + 1) * BYTES_PER_SHARD - 1).unwrap_or(u8::MAX);
    StorageKey::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first_byte(byte: u8) -> StorageKey {
        let mut bytes = [0; 32];
        bytes[0] = byte;
        StorageKey::from_bytes(bytes)
    }

    #[test]
    fn shards_hold_key_ranges_and_a_shard_boundary_is_a_cursor() {
        for index in 0..SHARDS {
            let last = last_key_of(index);
            assert_eq!(shard_index(&last), index, "shard {index}'s last key");
            if index + 1 < SHARDS {
                let next = first_byte(last.as_bytes()[0] + 1);
                assert_eq!(shard_index(&next), index + 1);
                assert!(next > last, "keys after the boundary live in later shards");
            }
        }
        for (byte, index) in [
            (0, 0),
            (3, 0),
            (4, 1),
            (127, 31),
            (128, 32),
            (255, SHARDS - 1),
        ] {
            assert_eq!(shard_index(&first_byte(byte)), index, "first byte {byte}");
        }
    }

    #[tokio::test]
    async fn a_cursor_at_a_shard_boundary_resumes_at_the_next_shard() {
        use crate::{fingerprint::Fingerprint, store::IdempotencyStore};
        let store = MemoryStore::default();
        let fingerprint = Fingerprint::from_bytes([1; 32]);
        // One claim at the start of shard 6, one at the end of shard 63.
        let (first, last) = (first_byte(24), last_key_of(SHARDS - 1));
        for key in [first, last] {
            store
                .claim(&key, &fingerprint, Duration::from_secs(30))
                .await
                .expect("a claim");
        }
        let listed = |cursor: StorageKey| {
            let page = store.list(Duration::ZERO, Some(&ListCursor::new(cursor.to_hex())), 10);
            page.map(|page| {
                let keys: Vec<StorageKey> = page.claims.iter().map(|c| *c.key()).collect();
                (keys, page.next.map(|next| next.as_str().to_owned()))
            })
        };
        let cases = [
            // After shard 5: shards 6 to 13, then a boundary cursor.
            (last_key_of(5), vec![first], Some(last_key_of(13).to_hex())),
            (first, vec![], Some(last_key_of(13).to_hex())),
            (last_key_of(SHARDS - 2), vec![last], None),
            // After the last shard: nothing more.
            (last_key_of(SHARDS - 1), vec![], None),
        ];
        for (cursor, keys, next) in cases {
            assert_eq!(listed(cursor).ok(), Some((keys, next)), "after {cursor:?}");
        }
    }

    #[tokio::test]
    async fn cursors_that_are_not_keys_are_refused() {
        let store = MemoryStore::default();
        for bad in ["", "zz", "0:0", &"a".repeat(63), &"a".repeat(65)] {
            let listed = store.list(Duration::ZERO, Some(&ListCursor::new(bad)), 10);
            assert_eq!(
                listed.map(|_| ()).map_err(|e| e.kind()),
                Err(StoreErrorKind::Other),
                "{bad:?}"
            );
        }
        let empty = store
            .list(Duration::ZERO, None, 10)
            .map(|page| page.claims.len());
        assert_eq!(empty.ok(), Some(0));
    }
}
