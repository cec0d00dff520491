//! The records [`CachedStore`](super::cached::CachedStore) completed and nobody has asked for
//! since: a table of slots, one per key (by a seeded hash of it), where a newer record takes
//! the place of whichever older one shared its slot.
//!
//! # Why not the LRU cache
//!
//! Most completed records are never replayed. Putting each into moka cost its bookkeeping
//! (an entry, an access-order node, a write queued for the housekeeping, an eviction): 7 %
//! more instructions per first execution than `RedisStore` alone, and 45–54 % more server
//! CPU in the load script. Here a completion takes one uncontended lock and one swap, and
//! allocates nothing; a record that is asked for again is moved to the LRU cache then, by
//! the replay (a second look is the sign that a record is worth the bookkeeping, as in a
//! segmented LRU's probation segment).

use std::{
    hash::BuildHasher,
    sync::{
        Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::time::Instant;

use crate::{key::StorageKey, record::Record};

/// The bytes a slot is sized for: about what a record of a JSON answer weighs.
const BYTES_PER_SLOT: u64 = 4096;
/// The most slots a table has, whatever its budget (a bound for `next_power_of_two`; the
/// table is allocated up front, 72 bytes a slot).
const MAX_SLOTS: u64 = 16_384;

pub(crate) struct Recent {
    slots: Box<[Mutex<Option<Held>>]>,
    // Seeded: which keys share a slot cannot be chosen from outside.
    hasher: foldhash::fast::RandomState,
    /// The weight of the records held, never above `budget`.
    bytes: AtomicU64,
    budget: u64,
    held: AtomicU64,
}

struct Held {
    key: StorageKey,
    record: Record,
    expires_at: Instant,
    weight: u64,
}

/// What [`Recent::insert`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Inserted {
    /// The record is held; `pushed_out` tells whether an unexpired record of another key
    /// lost its slot to it.
    Held { pushed_out: bool },
    /// The record does not fit in what the other slots leave of the budget: not held, and
    /// its slot left as it was.
    TooLarge,
}

impl Recent {
    /// A table of records weighing at most `budget` bytes (as weighed by
    /// [`Record::weight`]), with a slot per [`BYTES_PER_SLOT`] of it (at least one).
    pub(crate) fn new(budget: u64) -> Self {
        let slots = (budget / BYTES_PER_SLOT)
            .clamp(1, MAX_SLOTS)
            .next_power_of_two();
        Self {
            slots: (0..slots).map(|_| Mutex::new(None)).collect(),
            hasher: foldhash::fast::RandomState::default(),
            bytes: AtomicU64::new(0),
            budget,
            held: AtomicU64::new(0),
        }
    }

    fn slot(&self, key: &StorageKey) -> MutexGuard<'_, Option<Held>> {
        // The slot count is a power of two: the low bits of the hash pick one.
        let index = self.hasher.hash_one(key) as usize & (self.slots.len() - 1);
        // Nothing panics while a slot is locked; a slot holds a whole entry or none.
        self.slots[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Holds `record` under `key` until `expires_at`, in place of whatever its slot held,
    /// if the other slots leave room for it within the budget (else the slot is left alone).
    pub(crate) fn insert(&self, key: StorageKey, record: Record, expires_at: Instant) -> Inserted {
        let weight = u64::try_from(record.weight()).unwrap_or(u64::MAX);
        let mut slot = self.slot(&key);
        let replaced = slot.as_ref().map_or(0, |held| held.weight);
        // Counted in first, so that concurrent inserts into other slots cannot overrun the
        // budget together; the replaced record is still counted until it is out.
        let before = self.bytes.fetch_add(weight, Ordering::Relaxed);
        if before.saturating_sub(replaced).saturating_add(weight) > self.budget {
            self.bytes.fetch_sub(weight, Ordering::Relaxed);
            return Inserted::TooLarge;
        }
        let old = slot.replace(Held {
            key,
            record,
            expires_at,
            weight,
        });
        drop(slot);
        let Some(old) = old else {
            self.held.fetch_add(1, Ordering::Relaxed);
            return Inserted::Held { pushed_out: false };
        };
        self.bytes.fetch_sub(old.weight, Ordering::Relaxed);
        // The old record is freed as it goes out of scope, outside the lock.
        Inserted::Held {
            pushed_out: old.key != key && old.expires_at > Instant::now(),
        }
    }

    /// Takes the record under `key` out of the table with its deadline, if it is held and
    /// unexpired; an expired one is dropped.
    pub(crate) fn take(&self, key: &StorageKey) -> Option<(Record, Instant)> {
        let taken = {
            let mut slot = self.slot(key);
            match &*slot {
                Some(held) if held.key == *key => slot.take(),
                _ => None,
            }
        }?;
        self.bytes.fetch_sub(taken.weight, Ordering::Relaxed);
        self.held.fetch_sub(1, Ordering::Relaxed);
        (taken.expires_at > Instant::now()).then_some((taken.record, taken.expires_at))
    }

    /// Removes the record under `key`; whether an unexpired one was held.
    pub(crate) fn remove(&self, key: &StorageKey) -> bool {
        self.take(key).is_some()
    }

    /// How many records the table holds, expired ones included until they are pushed out.
    pub(crate) fn len(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// The most the held records weigh together.
    pub(crate) fn budget(&self) -> u64 {
        self.budget
    }

    /// The bytes the held records weigh.
    #[cfg(test)]
    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use http::{HeaderMap, Method, StatusCode, Uri};

    use super::*;
    use crate::fingerprint::Fingerprint;

    fn record(body: usize) -> Record {
        let fingerprint = Fingerprint::of(&Method::POST, &Uri::from_static("/"), b"");
        let body = Bytes::from(vec![b'x'; body]);
        Record::response(fingerprint, StatusCode::OK, &HeaderMap::new(), body, None)
    }

    fn key(n: u32) -> StorageKey {
        let mut bytes = [0; 32];
        bytes[..4].copy_from_slice(&n.to_le_bytes());
        StorageKey::from_bytes(bytes)
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[test]
    fn a_held_record_is_taken_once() {
        let recent = Recent::new(1 << 20);
        let original = record(10);
        assert_eq!(
            recent.insert(key(1), original.clone(), later()),
            Inserted::Held { pushed_out: false }
        );
        assert_eq!(recent.len(), 1);
        let (taken, _) = recent.take(&key(1)).unwrap();
        assert_eq!(taken, original);
        assert!(
            recent.take(&key(1)).is_none(),
            "taken out on the first look"
        );
        assert_eq!((recent.len(), recent.bytes()), (0, 0));
    }

    #[test]
    fn another_key_is_not_found() {
        let recent = Recent::new(1 << 20);
        recent.insert(key(1), record(10), later());
        assert!(recent.take(&key(2)).is_none());
        assert_eq!(recent.len(), 1, "a miss leaves the held record alone");
    }

    #[test]
    fn a_newer_record_takes_the_slot_of_an_older_one() {
        // One slot: every key shares it.
        let recent = Recent::new(BYTES_PER_SLOT);
        assert_eq!(recent.slots.len(), 1);
        recent.insert(key(1), record(10), later());
        assert_eq!(
            recent.insert(key(2), record(20), later()),
            Inserted::Held { pushed_out: true }
        );
        assert!(recent.take(&key(1)).is_none());
        assert_eq!(
            recent.take(&key(2)).unwrap().0.body().map(Bytes::len),
            Some(20)
        );
    }

    #[test]
    fn an_expired_record_is_not_returned_nor_counted_as_pushed_out() {
        let recent = Recent::new(BYTES_PER_SLOT);
        let past = Instant::now() - Duration::from_millis(1);
        recent.insert(key(1), record(10), past);
        assert!(recent.take(&key(1)).is_none());
        assert_eq!((recent.len(), recent.bytes()), (0, 0), "dropped when read");
        recent.insert(key(1), record(10), past);
        assert_eq!(
            recent.insert(key(2), record(10), later()),
            Inserted::Held { pushed_out: false }
        );
    }

    #[test]
    fn the_same_key_again_replaces_its_record_without_pushing_out() {
        let recent = Recent::new(BYTES_PER_SLOT);
        recent.insert(key(1), record(10), later());
        assert_eq!(
            recent.insert(key(1), record(20), later()),
            Inserted::Held { pushed_out: false }
        );
        assert_eq!(recent.len(), 1);
        assert_eq!(recent.bytes(), record(20).weight() as u64);
    }

    #[test]
    fn the_weight_held_never_exceeds_the_budget() {
        let small = record(10).weight() as u64;
        let recent = Recent::new(small * 3);
        for n in 0..1000 {
            recent.insert(key(n), record(10), later());
            assert!(recent.bytes() <= small * 3);
        }
        assert_eq!(recent.bytes(), recent.len() * small);
        // One slot here: the record that does not fit leaves the one it would replace.
        assert_eq!(recent.slots.len(), 1);
        assert_eq!(
            recent.insert(key(5000), record(4 * small as usize), later()),
            Inserted::TooLarge
        );
        assert!(recent.take(&key(5000)).is_none());
        assert!(recent.take(&key(999)).is_some());
    }

    #[test]
    fn removing_tells_whether_an_unexpired_record_was_held() {
        let recent = Recent::new(1 << 20);
        recent.insert(key(1), record(10), later());
        assert!(recent.remove(&key(1)));
        assert!(!recent.remove(&key(1)));
        assert_eq!(recent.len(), 0);
    }

    #[test]
    fn the_table_has_a_slot_per_share_of_the_budget_within_bounds() {
        assert_eq!(Recent::new(0).slots.len(), 1);
        assert_eq!(Recent::new(BYTES_PER_SLOT * 100).slots.len(), 128);
        assert_eq!(Recent::new(u64::MAX).slots.len(), MAX_SLOTS as usize);
    }
}
