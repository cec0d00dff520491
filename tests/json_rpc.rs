//! JSON-RPC mode (MCP streamable HTTP) end to end through axum: the suite in
//! `tests/common/json_rpc.rs`, one line per store.

mod common;

mod memory_store {
    crate::json_rpc_suite!(async { tower_idempotency::MemoryStore::default() });
}

#[cfg(feature = "redis")]
mod redis_store {
    use std::sync::OnceLock;

    use crate::common::redis_server::RedisServer;

    /// One server for the whole suite; each check works under paths of its own.
    fn server() -> &'static RedisServer {
        static SERVER: OnceLock<RedisServer> = OnceLock::new();
        SERVER.get_or_init(RedisServer::start)
    }

    async fn connect() -> tower_idempotency::RedisStore {
        tower_idempotency::RedisStore::connect(&server().url())
            .await
            .expect("connect to the test server")
    }

    crate::json_rpc_suite!(connect());
}
