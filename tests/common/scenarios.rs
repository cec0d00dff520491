//! Scenarios run against both a single Redis server and a Redis Cluster.

use std::time::Duration;

use tower_idempotency::{IdempotencyLayer, IdempotencyStore};

use crate::common::service::{Handler, keyed_post, send, serve, within};

/// Two layer instances, each over its own store (its own connections), share one Redis:
/// 200 concurrent requests with one key, split across both, run the handler once and all
/// get the same response.
pub async fn concurrent_duplicates_across_two_instances_run_the_handler_once<
    St: IdempotencyStore,
>(
    first: St,
    second: St,
) {
    let handler = Handler::sleeping(Duration::from_millis(300));
    let instances = [
        serve(&IdempotencyLayer::new(first), &handler),
        serve(&IdempotencyLayer::new(second), &handler),
    ];
    let key = format!("two-instances-{}", std::process::id());
    let requests: Vec<_> = (0..200)
        .map(|i| {
            let request = keyed_post("/charges", &key, r#"{"amount":1000}"#);
            tokio::spawn(send(&instances[i % 2], request))
        })
        .collect();
    let mut replies = Vec::new();
    for request in requests {
        replies.push(within(request).await.expect("the request task completed"));
    }
    assert_eq!(
        handler.calls(),
        1,
        "the handler ran once across both instances"
    );
    let first = &replies[0];
    for reply in &replies {
        assert_eq!(reply.status, http::StatusCode::CREATED, "{reply:?}");
        assert_eq!(
            reply.body, first.body,
            "every body is the first execution's"
        );
        assert_eq!(reply.header_list(), first.header_list());
    }
    assert_eq!(first.text(), "execution #1");
    let replays = replies.iter().filter(|reply| reply.replayed()).count();
    assert_eq!(replays, 199, "all but the first are replays");
}
