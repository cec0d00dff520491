//! Helpers shared by the integration tests.
#![allow(dead_code, unused_macros, unused_imports)]

pub mod conformance;
pub mod deliveries;
pub mod failover;
pub mod flaky_store;
pub mod json_rpc;
pub mod lossy_link;
#[cfg(feature = "axum")]
pub mod operations;
pub mod panics;
pub mod postgres_server;
pub mod recording_store;
pub mod redis_ha;
pub mod redis_server;
pub mod rotation;
pub mod scenarios;
pub mod service;
pub mod stress;
pub mod wrap;
