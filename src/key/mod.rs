//! Idempotency keys: parsing and validation, other key sources, scopes, and the digest a
//! store is addressed by.
//!
//! - `parse`: [`IdempotencyKey`], the key a client sends, and why one is refused.
//! - `source`: [`KeySource`], where else a key may be found; `webhooks`, the ready ones.
//! - `storage`: whose key it is (the scope), and the [`StorageKey`] a store is addressed by.
//!
//! Pure logic: no tower or tokio in here, so the rules are tested by tables.

mod parse;
mod source;
mod storage;
mod webhooks;

#[cfg(any(test, fuzzing))]
pub(crate) use self::parse::check_parse;
pub(crate) use self::storage::{KeyRef, Scope};
pub use self::{
    parse::{IdempotencyKey, KeyError, MAX_KEY_LEN},
    source::KeySource,
    storage::StorageKey,
};
