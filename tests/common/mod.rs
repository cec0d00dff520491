//! Helpers shared by the integration tests.
#![allow(dead_code, unused_macros, unused_imports)]

pub mod conformance;
pub mod deliveries;
pub mod failover;
pub mod flaky_store;
#[cfg(feature = "axum")]
pub mod operations;
pub mod panics;
pub mod recording_store;
pub mod redis_ha;
pub mod redis_server;
pub mod scenarios;
pub mod service;
