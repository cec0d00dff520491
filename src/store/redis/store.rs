//! [`RedisStore`]'s [`IdempotencyStore`] and [`AdminStore`] implementations: claim-or-replay,
//! the fenced scripts, and the operator's tools.

use std::time::{Duration, SystemTime};

use ::redis::{Cmd, Value, aio::ConnectionLike};
use tokio::time::Instant;

use super::{
    codec::{MARKER_LEN, MARKER_MAGIC, Marker, held_by},
    connect::RedisStore,
    durability::Write,
    error::{Unexpected, claim_error},
    script::{BREAK, COMPLETE, FORGET, HELD, RELEASE, RENEW, Script, WATCH},
};
use crate::{
    fingerprint::Fingerprint,
    key::StorageKey,
    layer::config::{MAX_LEASE, MAX_TTL},
    record::Record,
    store::error::{StoreError, StoreErrorKind},
    store::inspect::{ClaimPage, Inspection, ListCursor},
    store::{AdminStore, Claim, FenceToken, IdempotencyStore},
};

/// Redis expires keys to the millisecond; a waiter looks again this long after a lease's end.
const EXPIRY_SLACK: Duration = Duration::from_millis(2);

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// The marker of a new claim `token`, and the key's expiry in ms (the lease, then the
    /// retention of an abandoned claim).
    fn new_claim(
        &self,
        token: FenceToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> ([u8; MARKER_LEN], u64) {
        let retention = self.shared.settings.abandoned_retention;
        let claimed_at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |since| {
                u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
            });
        let marker = Marker {
            token,
            fingerprint: *fingerprint,
            claimed_at,
            retention: u64::try_from(retention.as_millis()).unwrap_or(u64::MAX),
        }
        .encode();
        let expiry = lease.min(MAX_LEASE).saturating_add(retention);
        (marker, millis(expiry, MAX_LEASE.saturating_add(MAX_TTL)))
    }

    /// Claims a key that a claim held a moment ago, taking over the abandoned claim
    /// `abandoned` if it still holds it: one script, judged by Redis's clock. A claim found
    /// live is flagged by the script, so that its end is published, and left to the wait
    /// that follows with what the script said of its lease.
    async fn claim_held(
        &self,
        key: &StorageKey,
        abandoned: Option<FenceToken>,
        token: FenceToken,
        marker: &[u8],
        expiry: u64,
    ) -> Result<Claim, StoreError> {
        let abandoned = abandoned.map(|token| token.get().to_be_bytes());
        let mut digits = itoa::Buffer::new();
        let args: [&[u8]; 3] = [
            abandoned.as_ref().map_or(&[][..], |token| &token[..]),
            marker,
            digits.format(expiry).as_bytes(),
        ];
        // Registered before the script flags the claim: its end, published from then on,
        // reaches the wait that follows however soon it comes.
        let watch = self.shared.notifier.watch(*key);
        let (Value::Array(reply), verdict) = self
            .run_acknowledged(Write::Claim, token, &HELD, key, &args)
            .await?
        else {
            return Err(StoreError::new(StoreErrorKind::Other, Unexpected::Reply));
        };
        let mut reply = reply.into_iter();
        match (reply.next(), reply.next(), reply.next(), reply.next()) {
            (Some(Value::Int(1)), None, None, None) => {
                self.acquired_if_acknowledged(verdict, token)
            }
            (Some(Value::Int(2)), Some(Value::BulkString(value)), None, None) => {
                held_by(value, SystemTime::now())
            }
            (Some(Value::Int(2)), Some(Value::BulkString(value)), Some(Value::Int(left)), None) => {
                let claim = held_by(value, SystemTime::now())?;
                if let (Claim::InFlight { .. }, Ok(left)) = (&claim, u64::try_from(left)) {
                    let left = Duration::from_millis(left);
                    self.shared.notifier.flagged(watch, left);
                }
                Ok(claim)
            }
            (Some(Value::Int(3)), Some(Value::BulkString(value)), None, None) => {
                let marker = Marker::decode(&value)?;
                Ok(Claim::Abandoned {
                    token: marker.token,
                    fingerprint: marker.fingerprint,
                })
            }
            _ => Err(StoreError::new(StoreErrorKind::Other, Unexpected::Reply)),
        }
    }

    async fn fenced(
        &self,
        script: &Script,
        key: &StorageKey,
        args: &[&[u8]],
    ) -> Result<(), StoreError> {
        fenced_reply(self.run(script, key, args).await?)
    }
}

/// What a fenced script's reply says.
fn fenced_reply(reply: Value) -> Result<(), StoreError> {
    match reply {
        Value::Int(1) => Ok(()),
        Value::Int(0) => Err(StoreError::lease_lost()),
        Value::Int(-1) => Err(StoreError::corrupt(Unexpected::Foreign)),
        _ => Err(StoreError::new(StoreErrorKind::Other, Unexpected::Reply)),
    }
}

impl<C> IdempotencyStore for RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    async fn claim_as(
        &self,
        key: &StorageKey,
        token: FenceToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let (marker, expiry) = self.new_claim(token, fingerprint, lease);
        // Sized up front: a command's buffers grown argument by argument reallocate. (The
        // key and the digits in a block of their own: held across the round trip, they would
        // widen the future.)
        let claim = {
            let (redis_key, mut digits) = (self.key_bytes(key), itoa::Buffer::new());
            let expiry = digits.format(expiry).as_bytes();
            let data = "SETNXPXGET".len() + redis_key.as_bytes().len();
            let mut claim = Cmd::with_capacity(7, data + marker.len() + expiry.len());
            claim
                .arg("SET")
                .arg(redis_key.as_bytes())
                .arg(&marker[..])
                .arg("NX")
                .arg("PX")
                .arg(expiry)
                .arg("GET");
            claim
        };
        // A reply lost on its way (the claim may have landed all the same) is an error here;
        // the layer releases the claim by its token.
        let reply = self
            .send_acknowledged(key, token, &claim, claim_error)
            .await?;
        match reply {
            (Value::Nil, verdict) => self.acquired_if_acknowledged(verdict, token),
            // A claim holds the key: whether its lease has ended is for Redis's clock to say.
            // (Boxed: rare, and it would widen the future of every claim.)
            (Value::BulkString(held), _) if held.starts_with(MARKER_MAGIC) => {
                Box::pin(self.claim_held(key, None, token, &marker, expiry)).await
            }
            // Nothing was written: there was nothing to acknowledge.
            (Value::BulkString(held), _) => held_by(held, SystemTime::now()),
            _ => Err(StoreError::new(StoreErrorKind::Other, Unexpected::Reply)),
        }
    }

    async fn complete(
        &self,
        key: &StorageKey,
        token: FenceToken,
        record: Record,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let (encoded, mut digits) = (record.encode(), itoa::Buffer::new());
        let args: [&[u8]; 5] = [
            &token.get().to_be_bytes(),
            &encoded,
            digits.format(millis(ttl, MAX_TTL)).as_bytes(),
            self.shared.notifier.channel(),
            key.as_bytes(),
        ];
        let (reply, verdict) = self
            .run_acknowledged(Write::Completion, token, &COMPLETE, key, &args)
            .await?;
        fenced_reply(reply)?;
        self.completed_acknowledged_or_not(verdict);
        self.shared.notifier.wake(key);
        Ok(())
    }

    async fn release(&self, key: &StorageKey, token: FenceToken) -> Result<(), StoreError> {
        let args: [&[u8]; 3] = [
            &token.get().to_be_bytes(),
            self.shared.notifier.channel(),
            key.as_bytes(),
        ];
        // A claim that got no reply may still be queued on its lane: the release follows it
        // there, so that it cannot run first and leave the late claim holding the key.
        let reply = match self.lanes.take_unanswered(key, token) {
            Some(lane) => self.run_on(lane, &RELEASE, key, &args).await?,
            None => self.run(&RELEASE, key, &args).await?,
        };
        fenced_reply(reply)?;
        self.shared.notifier.wake(key);
        Ok(())
    }

    async fn renew(
        &self,
        key: &StorageKey,
        token: FenceToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let mut digits = itoa::Buffer::new();
        let lease = digits.format(millis(lease, MAX_LEASE));
        let args: [&[u8]; 2] = [&token.get().to_be_bytes(), lease.as_bytes()];
        self.fenced(&RENEW, key, &args).await
    }

    async fn take_over_as(
        &self,
        key: &StorageKey,
        abandoned: FenceToken,
        token: FenceToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let (marker, expiry) = self.new_claim(token, fingerprint, lease);
        self.claim_held(key, Some(abandoned), token, &marker, expiry)
            .await
    }

    const NAME: &'static str = "redis";

    async fn wait(&self, key: &StorageKey, timeout: Duration) -> Result<(), StoreError> {
        let deadline = Instant::now() + timeout.min(MAX_TTL);
        let notifier = &self.shared.notifier;
        // A claim of this store that found the key in flight a moment ago flagged it and
        // registered for its end: nothing to ask Redis until there is news, the lease runs out
        // or a poll is due. Otherwise, look first.
        let (mut watch, mut looked_at, mut lease_left, mut look) = match notifier.take_flagged(key)
        {
            Some(flagged) => (
                flagged.watch,
                flagged.looked_at,
                Some(flagged.lease_left),
                false,
            ),
            None => (notifier.watch(*key), Instant::now(), None, true),
        };
        loop {
            if look {
                watch.looking();
                lease_left = match self.run(&WATCH, key, &[]).await? {
                    Value::Int(-2 | -1) => return Ok(()),
                    Value::Int(-3) => None,
                    Value::Int(ms) if ms >= 0 => Some(Duration::from_millis(ms.unsigned_abs())),
                    _ => return Err(StoreError::new(StoreErrorKind::Other, Unexpected::Reply)),
                };
                looked_at = Instant::now();
            }
            // Checked: neither the poll interval nor what the key says is left of its lease (a
            // value anyone with access could have written) is bounded.
            let poll = looked_at.checked_add(self.shared.settings.poll_interval);
            let lease_end = lease_left
                .and_then(|left| looked_at.checked_add(left.saturating_add(EXPIRY_SLACK)));
            let wake_at = [poll, lease_end]
                .into_iter()
                .flatten()
                .fold(deadline, Instant::min);
            tokio::select! {
                () = watch.news() => {}
                () = tokio::time::sleep_until(wake_at) => {}
            }
            if watch.ended() || Instant::now() >= deadline {
                return Ok(());
            }
            // The subscription was re-established (messages may have been lost), or the poll
            // or the lease's end is due.
            look = true;
        }
    }
}

impl<C> AdminStore for RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    async fn inspect(&self, key: &StorageKey) -> Result<Option<Inspection>, StoreError> {
        self.inspect_key(key).await
    }

    async fn forget(&self, key: &StorageKey) -> Result<bool, StoreError> {
        match self.run(&FORGET, key, &[]).await? {
            Value::Int(1) => Ok(true),
            Value::Int(0) => Ok(false),
            _ => Err(StoreError::new(StoreErrorKind::Other, Unexpected::Reply)),
        }
    }

    async fn break_claim(&self, key: &StorageKey) -> Result<Option<FenceToken>, StoreError> {
        let args: [&[u8]; 2] = [self.shared.notifier.channel(), key.as_bytes()];
        let token = match self.run(&BREAK, key, &args).await? {
            Value::Int(0) => None,
            Value::BulkString(token) => match <[u8; 8]>::try_from(token.as_slice()) {
                Ok(token) => Some(FenceToken::new(u64::from_be_bytes(token))),
                Err(_) => return Err(StoreError::new(StoreErrorKind::Other, Unexpected::Reply)),
            },
            _ => return Err(StoreError::new(StoreErrorKind::Other, Unexpected::Reply)),
        };
        if token.is_some() {
            self.shared.notifier.wake(key);
        }
        Ok(token)
    }

    async fn list_claims(
        &self,
        older_than: Duration,
        cursor: Option<ListCursor>,
        limit: usize,
    ) -> Result<ClaimPage, StoreError> {
        self.list(older_than, cursor, limit).await
    }
}

/// A duration as whole milliseconds for `PX`/`PEXPIRE`: at least 1, which Redis requires, and
/// at most `max` ([`MAX_TTL`] or [`MAX_LEASE`]). Redis refuses an expiry whose milliseconds,
/// added to its clock, overflow; a refused completion would let every retry execute again.
/// (Sent as decimal digits spelled on the stack by `itoa`: a `String` was one
/// allocation per command.)
pub(super) fn millis(duration: Duration, max: Duration) -> u64 {
    let millis = duration.min(max).as_millis().max(1);
    u64::try_from(millis).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_become_at_least_one_millisecond_and_at_most_the_bound() {
        let cases = [
            (Duration::ZERO, MAX_TTL, 1),
            (Duration::from_micros(1_500), MAX_TTL, 1),
            (Duration::from_secs(86_400), MAX_TTL, 86_400_000),
            (MAX_TTL, MAX_TTL, 31_536_000_000),
            (Duration::MAX, MAX_TTL, 31_536_000_000),
            (Duration::MAX, MAX_LEASE, 3_600_000),
            (Duration::from_secs(30), MAX_LEASE, 30_000),
        ];
        for (duration, max, expected) in cases {
            assert_eq!(
                millis(duration, max),
                expected,
                "{duration:?} up to {max:?}"
            );
        }
    }
}
