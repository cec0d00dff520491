//! RFC 9457 problem details: every response the layer itself produces, and
//! [`ProblemResponse`], the strategy that renders them.
//!
//! Pure logic: no tower or tokio in here. The body is four fields, written by hand (with
//! `serde_json` escaping the one free-text field) rather than through a serde derive.

mod grpc;
mod http;
mod json_rpc;

pub use self::http::{Problem, ProblemKind, ProblemResponse};
