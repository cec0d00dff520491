//! JSON-RPC 2.0 (MCP streamable HTTP): which messages a layer in JSON-RPC mode protects, what
//! of them counts in the fingerprint, which responses are kept, how a replay answers a retry
//! with its own `id`. (The layer's own rejections as JSON-RPC errors are
//! [`problem::json_rpc`](crate::problem).)
//!
//! Only a body with `"jsonrpc": "2.0"` is JSON-RPC; any other body on such a route is a plain
//! request ([`Rpc::Plain`]). Of JSON-RPC messages, only calls of the protected methods
//! (`tools/call` by default) are protected; `initialize`, notifications, `ping`, lists and
//! reads pass through untouched.
//!
//! A single call's `id` and `params._meta` (per-request progress tokens and trace context) do
//! not count in its fingerprint. A batch keeps its ids, so a batch is replayed only to the
//! same batch, byte for byte.
//!
//! Pure logic: no tower or tokio in here.

mod message;
mod reply;
mod scan;
mod sse;

pub(crate) use self::message::{Rpc, Settings, classify, prepare};
pub(crate) use self::reply::{Unanswerable, answers, with_retry_id};
