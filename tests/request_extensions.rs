//! What the handler of a protected request can see.

use axum::{Router, body::Body, extract::Request as AxumRequest, routing::post};
use http::Request;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_idempotency::{IdempotencyKey, IdempotencyLayer, MemoryStore};

async fn echo_key(request: AxumRequest) -> String {
    match request.extensions().get::<IdempotencyKey>() {
        Some(key) => format!("key={}", key.as_str()),
        None => "no key".to_owned(),
    }
}

async fn body_of(app: &Router, request: Request<Body>) -> String {
    let response = app.clone().oneshot(request).await.unwrap();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn the_handler_sees_the_client_key_unquoted_in_the_request_extensions() {
    let app = Router::new()
        .route("/pay", post(echo_key))
        .layer(IdempotencyLayer::new(MemoryStore::default()));
    let quoted = Request::post("/pay")
        .header("idempotency-key", "\"abc-1\"")
        .body(Body::from("x"))
        .unwrap();
    assert_eq!(body_of(&app, quoted).await, "key=abc-1");
    let derived = Request::post("/pay").body(Body::from("y")).unwrap();
    assert_eq!(
        body_of(&app, derived).await,
        "no key",
        "derived keys are not client keys"
    );
}
