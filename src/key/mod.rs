//! Idempotency keys: parsing and validation, other key sources, scopes, and the digest a
//! store is addressed by.
//!
//! - `parse`: [`IdempotencyKey`], the key a client sends, and why one is refused.
//! - `source`: [`KeySource`], where else a key may be found; `webhooks`, the ready ones;
//!   `delivery`, what a webhook preset's key means (who the subscriber is, whether payloads
//!   are compared).
//! - `origin`: where a request came from: the URI the client sent, the peer's address.
//! - `scope`: whose key it is, and whether a key may be derived for a request.
//! - `storage`: the [`StorageKey`] a store is addressed by.
//!
//! Pure logic: no tower or tokio in here, so the rules are tested by tables.

mod delivery;
mod origin;
mod parse;
mod scope;
mod source;
mod storage;
mod webhooks;

#[cfg(any(test, fuzzing))]
pub(crate) use self::parse::check_parse;
pub(crate) use self::{
    delivery::Delivery,
    origin::{sent_path, sent_uri},
    scope::Scope,
    source::Found,
    storage::KeyRef,
};
pub use self::{
    origin::PeerAddr,
    parse::{IdempotencyKey, KeyError, MAX_KEY_LEN},
    source::KeySource,
    storage::StorageKey,
};
