//! The records a [`MemoryStore`](super::MemoryStore) completed that nobody has asked for
//! since, oldest first, within a budget of bytes: where every first execution's record lands.
//!
//! # Why not the LRU cache
//!
//! Most completed records are never asked for again. Inserting each into moka cost its
//! bookkeeping (an entry and its key in their own allocations, an access-order node, a write
//! queued for the housekeeping, then an eviction, on a table that rehashes as it churns): most
//! of what a first execution cost beyond the handler. Here a completion takes one short lock,
//! one insert into a map and one push onto a queue, both of which keep their room, so at
//! steady state it allocates nothing; the oldest record makes room. A record that is asked
//! for again moves to the LRU cache then (a second look is the sign that a record is worth
//! the bookkeeping, as in a segmented LRU's probation segment).
//!
//! Records are pushed out in the order they were completed, which for records nobody asked
//! for since is the order they were last used: the least recently used first, as the cache
//! evicts its own.

use std::{
    collections::{HashMap, VecDeque, hash_map::Entry},
    sync::{Mutex, MutexGuard, PoisonError},
    time::SystemTime,
};

// Tokio's clock is the system's, but tests can pause and advance it.
use tokio::time::Instant;

use crate::{key::StorageKey, record::Record};

/// The queue is compacted (entries of records no longer held dropped) once it has this many
/// entries beyond twice the records held: it stays bounded by the records held.
const SLACK: usize = 64;

/// The records completed and not asked for since, oldest first (see the module docs).
pub(super) struct Fifo {
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    /// Keys are digests: a fast seeded hasher is enough.
    held: HashMap<StorageKey, Held, foldhash::fast::RandomState>,
    /// Keys in the order their records came in, with the serial of the record: an entry
    /// whose record left or was replaced since is skipped.
    order: VecDeque<(StorageKey, u64)>,
    next_serial: u64,
    /// The weight of the records held.
    bytes: u64,
}

struct Held {
    record: Record,
    expires_at: Instant,
    stored_at: SystemTime,
    serial: u64,
    weight: u64,
}

/// A record found among the recent completions.
pub(super) struct Found {
    pub(super) record: Record,
    pub(super) expires_at: Instant,
    pub(super) stored_at: SystemTime,
    /// Tells this record from a newer one of the same key.
    pub(super) serial: u64,
}

/// What [`Fifo::insert`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Inserted {
    /// Whether the record is held (it is not if it weighs more than the whole room).
    pub(super) held: bool,
    /// How many unexpired records of other keys were pushed out to make room for it.
    pub(super) pushed_out: u64,
}

impl Fifo {
    /// An empty queue; its room is given with each insert.
    pub(super) fn new() -> Self {
        Self {
            queue: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Nothing panics while the queue is locked but the allocator; the map and the queue
        // each stay whole, and an entry of the queue without its record is skipped anyway.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Holds `record` under `key` until `expires_at`, in place of the key's earlier record,
    /// pushing out the oldest records until all of them weigh at most `room` bytes. A record
    /// heavier than `room` by itself is not held (and nothing is pushed out for it).
    pub(super) fn insert(
        &self,
        key: StorageKey,
        record: Record,
        expires_at: Instant,
        room: u64,
    ) -> Inserted {
        let weight = u64::try_from(record.weight()).unwrap_or(u64::MAX);
        let stored_at = SystemTime::now();
        let mut queue = self.lock();
        let queue = &mut *queue;
        if weight > room {
            // The key's earlier record (expired, or its key forgotten and executed again)
            // is replaced all the same.
            if let Some(earlier) = queue.held.remove(&key) {
                queue.bytes -= earlier.weight;
            }
            return Inserted::default();
        }
        let serial = queue.next_serial;
        queue.next_serial += 1;
        let earlier = queue.held.insert(
            key,
            Held {
                record,
                expires_at,
                stored_at,
                serial,
                weight,
            },
        );
        queue.bytes = queue.bytes - earlier.map_or(0, |earlier| earlier.weight) + weight;
        let now = Instant::now();
        let mut pushed_out = 0;
        // The oldest make room; never the record just inserted (queued after this): once all
        // the others are out, it alone weighs at most `room`. Records freed here are freed under
        // the lock: carrying them out would cost an allocation per completion, and the lock
        // is this store's alone (moka never runs under it).
        while queue.bytes > room {
            let Some((oldest, serial)) = queue.order.pop_front() else {
                break;
            };
            if let Entry::Occupied(held) = queue.held.entry(oldest)
                && held.get().serial == serial
            {
                let held = held.remove();
                pushed_out += u64::from(held.expires_at > now);
                queue.bytes -= held.weight;
            }
        }
        queue.order.push_back((key, serial));
        queue.compact();
        Inserted {
            held: true,
            pushed_out,
        }
    }

    /// The unexpired record under `key`, left in place (an expired one too: between this read
    /// and a removal, a newer record may take its place).
    pub(super) fn get(&self, key: &StorageKey) -> Option<Found> {
        let queue = self.lock();
        let held = queue.held.get(key)?;
        (held.expires_at > Instant::now()).then(|| Found {
            record: held.record.clone(),
            expires_at: held.expires_at,
            stored_at: held.stored_at,
            serial: held.serial,
        })
    }

    /// Whether the record of `serial` is still held under `key`.
    pub(super) fn holds(&self, key: &StorageKey, serial: u64) -> bool {
        self.lock()
            .held
            .get(key)
            .is_some_and(|held| held.serial == serial)
    }

    /// Removes the record of `serial` under `key`, if it is still held (never a newer one).
    pub(super) fn remove_if(&self, key: &StorageKey, serial: u64) {
        let removed = {
            let mut queue = self.lock();
            let Entry::Occupied(held) = queue.held.entry(*key) else {
                return;
            };
            if held.get().serial != serial {
                return;
            }
            let removed = held.remove();
            queue.bytes -= removed.weight;
            queue.compact();
            removed
        };
        drop(removed);
    }

    /// Removes the record under `key`; whether an unexpired one was held.
    pub(super) fn remove(&self, key: &StorageKey) -> bool {
        let removed = {
            let mut queue = self.lock();
            let removed = queue.held.remove(key);
            queue.bytes -= removed.as_ref().map_or(0, |held| held.weight);
            removed
        };
        removed.is_some_and(|held| held.expires_at > Instant::now())
    }

    /// How many records are held, expired ones included until they are pushed out.
    pub(super) fn len(&self) -> u64 {
        self.lock().held.len() as u64
    }

    /// The bytes the held records weigh.
    #[cfg(test)]
    pub(super) fn bytes(&self) -> u64 {
        self.lock().bytes
    }
}

impl Queue {
    /// Drops the entries of records no longer held once they outnumber the held ones, so the
    /// queue never grows past about twice the records held (records leave by promotion and
    /// by `forget` without their entry).
    fn compact(&mut self) {
        if self.order.len() > 2 * self.held.len() + SLACK {
            let held = &self.held;
            self.order
                .retain(|(key, serial)| held.get(key).is_some_and(|held| held.serial == *serial));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    use super::*;
    use crate::fingerprint::Fingerprint;

    fn record(body: usize) -> Record {
        let fingerprint = Fingerprint::from_bytes([7; 32]);
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

    fn weight(body: usize) -> u64 {
        record(body).weight() as u64
    }

    #[test]
    fn a_held_record_is_found_and_stays_until_removed() {
        let fifo = Fifo::new();
        let original = record(10);
        let inserted = fifo.insert(key(1), original.clone(), later(), 1 << 20);
        assert_eq!(
            inserted,
            Inserted {
                held: true,
                pushed_out: 0
            }
        );
        let found = fifo.get(&key(1)).unwrap();
        assert_eq!(found.record, original);
        assert!(fifo.get(&key(1)).is_some(), "a read leaves it in place");
        assert!(fifo.get(&key(2)).is_none());
        assert!(fifo.holds(&key(1), found.serial));
        fifo.remove_if(&key(1), found.serial);
        assert!(fifo.get(&key(1)).is_none());
        assert_eq!((fifo.len(), fifo.bytes()), (0, 0));
    }

    #[test]
    fn the_oldest_records_make_room_and_the_newest_stay() {
        let fifo = Fifo::new();
        let room = weight(100) * 10;
        for n in 0..25 {
            let inserted = fifo.insert(key(n), record(100), later(), room);
            assert_eq!(inserted.pushed_out, u64::from(n >= 10));
            assert!(fifo.bytes() <= room);
        }
        assert_eq!(fifo.len(), 10);
        assert!((0..15).all(|n| fifo.get(&key(n)).is_none()));
        assert!((15..25).all(|n| fifo.get(&key(n)).is_some()));
    }

    #[test]
    fn a_smaller_room_pushes_out_as_many_as_it_takes() {
        let fifo = Fifo::new();
        for n in 0..10 {
            fifo.insert(key(n), record(100), later(), 1 << 20);
        }
        let inserted = fifo.insert(key(10), record(100), later(), weight(100) * 3);
        assert_eq!(
            inserted,
            Inserted {
                held: true,
                pushed_out: 8
            }
        );
        assert!((8..11).all(|n| fifo.get(&key(n)).is_some()));
    }

    #[test]
    fn a_record_heavier_than_the_room_is_not_held_and_pushes_nothing_out() {
        let fifo = Fifo::new();
        fifo.insert(key(1), record(10), later(), 1 << 20);
        let inserted = fifo.insert(key(2), record(10_000), later(), weight(100));
        assert_eq!(inserted, Inserted::default());
        assert!(fifo.get(&key(1)).is_some());
        assert!(fifo.get(&key(2)).is_none());
    }

    #[test]
    fn a_newer_record_of_the_same_key_replaces_the_older_one() {
        let fifo = Fifo::new();
        let past = Instant::now() - Duration::from_millis(1);
        fifo.insert(key(1), record(10), past, 1 << 20);
        assert!(
            fifo.get(&key(1)).is_none(),
            "an expired record is not found"
        );
        assert_eq!(fifo.len(), 1, "nor removed by the read");
        fifo.insert(key(1), record(20), later(), 1 << 20);
        assert_eq!((fifo.len(), fifo.bytes()), (1, weight(20)));
        assert_eq!(fifo.get(&key(1)).unwrap().record, record(20));
    }

    #[test]
    fn removing_an_older_serial_leaves_the_newer_record() {
        let fifo = Fifo::new();
        fifo.insert(key(1), record(10), later(), 1 << 20);
        let older = fifo.get(&key(1)).unwrap().serial;
        fifo.insert(key(1), record(20), later(), 1 << 20);
        assert!(!fifo.holds(&key(1), older));
        fifo.remove_if(&key(1), older);
        assert_eq!(fifo.get(&key(1)).unwrap().record, record(20));
    }

    #[test]
    fn expired_records_pushed_out_are_not_counted() {
        let fifo = Fifo::new();
        let past = Instant::now() - Duration::from_millis(1);
        fifo.insert(key(1), record(100), past, 1 << 20);
        let inserted = fifo.insert(key(2), record(100), later(), weight(100));
        assert_eq!(
            inserted,
            Inserted {
                held: true,
                pushed_out: 0
            }
        );
    }

    #[test]
    fn removing_tells_whether_an_unexpired_record_was_held() {
        let fifo = Fifo::new();
        fifo.insert(key(1), record(10), later(), 1 << 20);
        assert!(fifo.remove(&key(1)));
        assert!(!fifo.remove(&key(1)));
        assert_eq!((fifo.len(), fifo.bytes()), (0, 0));
    }

    #[test]
    fn the_queue_stays_bounded_by_the_records_held() {
        let fifo = Fifo::new();
        for n in 0..10_000 {
            fifo.insert(key(n), record(10), later(), 1 << 30);
            let serial = fifo.get(&key(n)).unwrap().serial;
            fifo.remove_if(&key(n), serial);
            // The same key over and over leaves an entry behind each time too.
            fifo.insert(key(0), record(10), later(), 1 << 30);
        }
        let queue = fifo.lock();
        assert_eq!(queue.held.len(), 1);
        assert!(queue.order.len() <= 2 + SLACK + 1, "{}", queue.order.len());
    }
}
