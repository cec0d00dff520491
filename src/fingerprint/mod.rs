//! The request fingerprint: what a key's reuse is checked against, and the modes that decide
//! which differences between a request and its retry count.
//!
//! Pure logic: no tower or tokio in here.

pub(crate) mod canonical;
pub(crate) mod digest;

mod request;

pub(crate) use self::request::FingerprintRule;
pub use self::request::{BodyFingerprint, Fingerprint, FingerprintHeaders};
