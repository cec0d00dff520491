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

/// A store outage (fail-closed 503) and a handler panic (500) on a tool call: JSON-RPC errors
/// carrying the call's id, so the SDK hands them to the caller.
mod outages {
    use std::sync::atomic::Ordering;

    use axum::{Router, routing::post};
    use http::StatusCode;
    use serde_json::{Value, json};
    use tower_idempotency::{IdempotencyLayer, MemoryStore, ProblemKind};

    use crate::common::{
        flaky_store::FlakyStore,
        json_rpc::{Counts, app, bare_call, call, mcp_post},
    };

    #[tokio::test]
    async fn a_store_outage_is_a_json_rpc_error_carrying_the_calls_id() {
        let store = FlakyStore::over(MemoryStore::default());
        let counts = Counts::default();
        let router = app(
            IdempotencyLayer::new(store.clone()).with_json_rpc(true),
            "/mcp",
            &counts,
        );
        store.hook.down.store(true, Ordering::SeqCst);
        let session = [("mcp-session-id", "s-1")];
        let reply = call(
            &router,
            mcp_post("/mcp", &session, &bare_call(r#""c-9""#, json!({}))),
        )
        .await;
        assert_eq!(reply.problem, Some(ProblemKind::StoreUnavailable));
        assert_eq!(reply.status, StatusCode::OK);
        assert!(reply.headers.contains_key(http::header::RETRY_AFTER));
        let error: Value = serde_json::from_slice(&reply.body).expect("JSON");
        assert_eq!(error["id"], "c-9");
        assert_eq!(error["error"]["data"]["status"], 503);
        assert_eq!(counts.calls(), 0, "nothing ran unprotected");
        // A message that is not protected needs no store: it still reaches the server.
        let listed = call(
            &router,
            mcp_post(
                "/mcp",
                &session,
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
            ),
        )
        .await;
        assert!(listed.problem.is_none());
    }

    #[tokio::test]
    async fn a_handler_panic_is_a_json_rpc_error_carrying_the_calls_id() {
        let router = Router::new()
            .route(
                "/mcp",
                post(|| async {
                    panic!("the tool panicked");
                    #[allow(unreachable_code)]
                    ""
                }),
            )
            .layer(IdempotencyLayer::new(MemoryStore::default()).with_json_rpc(true));
        let session = [("mcp-session-id", "s-1")];
        let reply = call(
            &router,
            mcp_post("/mcp", &session, &bare_call("4", json!({}))),
        )
        .await;
        assert_eq!(reply.problem, Some(ProblemKind::HandlerFailed));
        assert_eq!(reply.status, StatusCode::OK);
        let error: Value = serde_json::from_slice(&reply.body).expect("JSON");
        assert_eq!(error["id"], 4);
        assert_eq!(error["error"]["code"], -32603);
    }
}
