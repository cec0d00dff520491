use axum::{Router, body::Body, routing::post};
use http::Request;
use http_body_util::BodyExt;
use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

#[tokio::test]
async fn smoke() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let app = Router::new()
        .route(
            "/charges",
            post(move |body: String| {
                let c = c.clone();
                async move {
                    let n = c.fetch_add(1, Ordering::SeqCst);
                    format!("charge {n} for {body}")
                }
            }),
        )
        .layer(IdempotencyLayer::new(MemoryStore::default()));
    for i in 0..3 {
        let req = Request::post("/charges")
            .header("idempotency-key", "k1")
            .body(Body::from("100"))
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        let replayed = res.headers().get("idempotent-replayed").cloned();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        println!("{i}: {replayed:?} {body:?}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
