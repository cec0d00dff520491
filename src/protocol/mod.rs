//! The two protocols the layer understands beyond plain HTTP: [`grpc`] (which requests are
//! gRPC calls, which stream, which answers are kept) and [`jsonrpc`] (which JSON-RPC messages
//! are protected, which answers are kept, ids rewritten on replay).
//!
//! Pure logic: no tower or tokio in here, and no other module of the crate.

pub(crate) mod grpc;
pub(crate) mod jsonrpc;
