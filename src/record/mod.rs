//! What a store keeps for a completed request (`response.rs`); its versioned binary encoding is
//! in [`wire`].
//!
//! Pure logic: no tower or tokio in here.

mod response;
mod wire;

pub use self::response::{MAX_RECORD_HEADERS, Record, RecordError};
#[cfg(any(test, fuzzing))]
pub(crate) use wire::check_decode;
#[cfg(feature = "redis")]
pub(crate) use wire::check_head;
#[cfg(all(test, feature = "redis"))]
pub(crate) use wire::properties;
