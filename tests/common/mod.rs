//! Helpers shared by the integration tests.
#![allow(dead_code, unused_macros, unused_imports)]

pub mod conformance;
pub mod flaky_store;
pub mod panics;
pub mod redis_server;
pub mod scenarios;
pub mod service;
