//! Where records and in-flight claims live.
//!
//! [`IdempotencyStore`] holds the request path's atomic primitives: claim-or-get, complete,
//! release, renew and wait, and take-over of an abandoned claim. There is no `get` followed
//! by a `set`: that pair is the race that lets two concurrent duplicates both execute. Every
//! method that changes a key changes it in one atomic step, and says so. It is all a store
//! must implement for [`IdempotencyLayer`](crate::IdempotencyLayer) to protect requests.
//!
//! [`AdminStore`] adds the operator tools (a read-only look-up, forgetting a record, breaking
//! a claim, listing claims), which the admin router (feature `axum`) requires. The stores of
//! this crate implement both.

use std::{future::Future, time::Duration};

pub(crate) use self::claim::{Claim, FenceToken};
use crate::{
    fingerprint::Fingerprint,
    key::StorageKey,
    record::Record,
    store::error::StoreError,
    store::inspect::{ClaimPage, Inspection, ListCursor},
};

#[cfg(feature = "moka")]
pub(crate) mod cached;
pub(crate) mod claim;
pub(crate) mod error;
pub(crate) mod inspect;
#[cfg(feature = "moka")]
pub(crate) mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "moka")]
mod recent;
#[cfg(feature = "moka")]
mod record_cache;
#[cfg(feature = "redis")]
pub mod redis;

/// A backend for idempotency records: atomic primitives over one key each, all that the
/// layer calls on a request's path. Operator tools are the optional [`AdminStore`].
///
/// Every operation that changes a claimed key is *fenced*: it names the [`FenceToken`]
/// the claim was made with ([`claim_as`](IdempotencyStore::claim_as)) and is refused with
/// [`StoreErrorKind::LeaseLost`](crate::StoreErrorKind::LeaseLost) unless that claim is
/// still the live one, so an owner whose lease expired cannot overwrite a newer owner's work.
///
/// Stores are cheap `Clone` handles over shared state: the layer clones one per request.
///
/// The layer passes TTLs of at most [`MAX_TTL`](crate::MAX_TTL) and leases of at most
/// [`MAX_LEASE`](crate::MAX_LEASE); the stores of this crate clamp longer ones to those
/// bounds, so that no deadline overflows (and Redis never refuses an expiry).
///
/// # A custom store
///
/// A store is a cheap `Clone` handle over shared state. This one keeps everything in one
/// mutex-guarded map, with no expiry and no waiting by notification, to show the contract;
/// see [`MemoryStore`](crate::MemoryStore) for a real one.
///
/// ```
/// use std::{collections::HashMap, sync::{Arc, Mutex}, time::Duration};
/// use tower_idempotency::{Claim, FenceToken, Fingerprint, IdempotencyStore, Record, StorageKey, StoreError};
///
/// enum Entry { InFlight(FenceToken, Fingerprint), Done(Record) }
///
/// #[derive(Clone, Default)]
/// struct MapStore(Arc<Mutex<HashMap<StorageKey, Entry>>>);
///
/// impl MapStore {
///     /// Runs `f` on the map if `key` holds the claim `token`; refuses it otherwise.
///     fn fenced(&self, key: &StorageKey, token: FenceToken, f: impl FnOnce(&mut HashMap<StorageKey, Entry>)) -> Result<(), StoreError> {
///         let mut map = self.0.lock().unwrap();
///         match map.get(key) {
///             Some(Entry::InFlight(held, _)) if *held == token => Ok(f(&mut map)),
///             _ => Err(StoreError::lease_lost()),
///         }
///     }
/// }
///
/// impl IdempotencyStore for MapStore {
///     async fn claim_as(&self, key: &StorageKey, token: FenceToken, fingerprint: &Fingerprint, _lease: Duration) -> Result<Claim, StoreError> {
///         let mut map = self.0.lock().unwrap();
///         Ok(match map.get(key) {
///             Some(Entry::Done(record)) => Claim::Completed { record: record.clone(), expires_in: None },
///             Some(Entry::InFlight(_, fingerprint)) => Claim::InFlight { fingerprint: *fingerprint },
///             None => {
///                 map.insert(*key, Entry::InFlight(token, *fingerprint));
///                 Claim::Acquired(token)
///             }
///         })
///     }
///
///     async fn complete(&self, key: &StorageKey, token: FenceToken, record: Record, _ttl: Duration) -> Result<(), StoreError> {
///         self.fenced(key, token, |map| { map.insert(*key, Entry::Done(record)); })
///     }
///
///     async fn release(&self, key: &StorageKey, token: FenceToken) -> Result<(), StoreError> {
///         self.fenced(key, token, |map| { map.remove(key); })
///     }
///
///     async fn renew(&self, key: &StorageKey, token: FenceToken, _lease: Duration) -> Result<(), StoreError> {
///         self.fenced(key, token, |_| ())
///     }
///
///     async fn wait(&self, _key: &StorageKey, timeout: Duration) -> Result<(), StoreError> {
///         // No notifications here: let the layer look again shortly.
///         tokio::time::sleep(timeout.min(Duration::from_millis(10))).await;
///         Ok(())
///     }
///
///     async fn take_over_as(&self, key: &StorageKey, _abandoned: FenceToken, token: FenceToken, fingerprint: &Fingerprint, lease: Duration) -> Result<Claim, StoreError> {
///         // Claims never expire here, so none is ever abandoned: this is a plain claim.
///         self.claim_as(key, token, fingerprint, lease).await
///     }
/// }
///
/// let layer = tower_idempotency::IdempotencyLayer::new(MapStore::default());
/// ```
pub trait IdempotencyStore: Clone + Send + Sync + 'static {
    /// Atomically: if `key` is free (absent, or its record has expired), claims it for `lease`
    /// as `token` and returns [`Claim::Acquired`] with it; otherwise changes nothing and
    /// returns what holds it.
    ///
    /// A claim whose lease has ended without completion or release does not make the key free:
    /// the store must report it as [`Claim::Abandoned`], with its token, until that claim is
    /// taken over ([`take_over_as`](IdempotencyStore::take_over_as)), released, or dropped by
    /// the store itself. Its owner may have done the work, so the layer asks the application
    /// ([`with_outcome_unknown`](crate::IdempotencyLayer::with_outcome_unknown)) whether to
    /// take the claim over and run the request again, or to answer `409` outcome-unknown.
    /// Reporting [`Claim::Acquired`] instead would run it again behind the application's back;
    /// the core conformance suite checks this.
    ///
    /// The caller chooses the token ([`FenceToken::generate`]): when the reply is lost (a
    /// timeout, a dropped connection) the claim may have landed all the same, and the layer
    /// then releases it, fenced by that token, rather than leave the key blocked for the
    /// lease.
    fn claim_as(
        &self,
        key: &StorageKey,
        token: FenceToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send;

    /// [`claim_as`](IdempotencyStore::claim_as) with a new token
    /// ([`FenceToken::generate`]), for callers that never need to release a claim whose
    /// reply was lost (tests, tools). Not meant to be overridden.
    fn claim(
        &self,
        key: &StorageKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send {
        self.claim_as(key, FenceToken::generate(), fingerprint, lease)
    }

    /// Replaces the live claim `token` with `record`, kept for `ttl`, and wakes waiters.
    fn complete(
        &self,
        key: &StorageKey,
        token: FenceToken,
        record: Record,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Removes the live claim `token` so the key can be claimed again, and wakes waiters.
    fn release(
        &self,
        key: &StorageKey,
        token: FenceToken,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Extends the live claim `token` to expire `lease` from now.
    fn renew(
        &self,
        key: &StorageKey,
        token: FenceToken,
        lease: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Waits until the claim on `key` is completed, released or expired, or `timeout` has
    /// passed, whichever comes first. Spurious returns are allowed: the caller claims again to
    /// learn the new state.
    fn wait(
        &self,
        key: &StorageKey,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Atomically: if `key` still holds the claim `abandoned` and that claim's lease has
    /// ended, replaces it with a new claim `token` for `lease` and returns
    /// [`Claim::Acquired`]; otherwise changes nothing and returns what holds the key, as
    /// [`claim_as`](IdempotencyStore::claim_as) would (a free key is claimed as `token`).
    ///
    /// The layer calls it after a claim reported [`Claim::Abandoned`] and the application
    /// chose to run the request again. Like a claim, it may land with its reply lost: the
    /// layer then releases `token`.
    fn take_over_as(
        &self,
        key: &StorageKey,
        abandoned: FenceToken,
        token: FenceToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send;

    /// [`take_over_as`](IdempotencyStore::take_over_as) with a new token
    /// ([`FenceToken::generate`]). Not meant to be overridden.
    fn take_over(
        &self,
        key: &StorageKey,
        abandoned: FenceToken,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send {
        self.take_over_as(key, abandoned, FenceToken::generate(), fingerprint, lease)
    }

    /// Called once a request holds the claim `token` on `key`, just before its handler runs,
    /// with the request's extensions. A store that writes records in the handler's own
    /// transaction puts there what the handler opens it with, and returns `true`: the
    /// layer then reads a streamed response body to its end (within the capture limit) before
    /// the record is written and the transaction committed, and answers after that. Not an
    /// operation on the store: nothing is sent, nothing waits.
    ///
    /// Default: does nothing and returns `false`.
    fn prepare_handler(
        &self,
        key: &StorageKey,
        token: FenceToken,
        extensions: &mut http::Extensions,
    ) -> bool {
        let _ = (key, token, extensions);
        false
    }

    /// The store's name in metrics (`store` label) and logs. Default: `custom`.
    const NAME: &'static str = "custom";
}

/// Operator tools over an [`IdempotencyStore`]: look a key up, forget a record, break a claim,
/// list claims.
///
/// Requests do not need them: [`IdempotencyLayer`](crate::IdempotencyLayer) asks for
/// [`IdempotencyStore`] only. The admin router (`admin::AdminRouter`, feature `axum`) requires
/// this trait. Each method is read-only or one atomic step.
pub trait AdminStore: IdempotencyStore {
    /// Read-only: what `key` holds, `None` when it is free. An expired record is free.
    fn inspect(
        &self,
        key: &StorageKey,
    ) -> impl Future<Output = Result<Option<Inspection>, StoreError>> + Send;

    /// Atomically: removes the completed record under `key`, so the next request with the
    /// key executes again; returns whether there was one. A claim in flight is left alone
    /// (see [`break_claim`](AdminStore::break_claim)).
    fn forget(&self, key: &StorageKey) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Atomically: removes the claim on `key`, live or abandoned, whoever holds it, wakes
    /// its waiters, and returns its token (`None` when the key held no claim). A completed
    /// record is left alone. The owner, should it still run, is fenced out: its completion
    /// is refused.
    fn break_claim(
        &self,
        key: &StorageKey,
    ) -> impl Future<Output = Result<Option<FenceToken>, StoreError>> + Send;

    /// Read-only: claims (live or abandoned) made at least `older_than` ago, one page of at
    /// most about `limit` from `cursor` (`None`: the start). The work per page is bounded;
    /// a page may hold fewer claims than `limit`, even none, while `next` is `Some`.
    ///
    /// A listing is not a snapshot: claims made or ended while it runs may or may not
    /// appear. A claim whose age the store does not know is listed whatever `older_than`.
    fn list_claims(
        &self,
        older_than: Duration,
        cursor: Option<ListCursor>,
        limit: usize,
    ) -> impl Future<Output = Result<ClaimPage, StoreError>> + Send;
}
