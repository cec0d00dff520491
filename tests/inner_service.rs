//! The inner service behind the middleware: `get_ref`, `get_mut` and `into_inner`, as tower's
//! and tower-http's middleware have them.

use std::{
    convert::Infallible,
    future::{Ready, ready},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::{IDEMPOTENCY_KEY, Idempotency, IdempotencyLayer, MemoryStore, RequestBody};

/// An inner service with state of its own: it answers with its greeting.
#[derive(Clone)]
struct Greeter {
    greeting: &'static str,
}

impl<B> Service<Request<RequestBody<B>>> for Greeter {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: Request<RequestBody<B>>) -> Self::Future {
        ready(Ok(Response::new(Full::from(self.greeting))))
    }
}

fn post(key: &str) -> Request<Full<Bytes>> {
    Request::post("/greet")
        .header(IDEMPOTENCY_KEY, key)
        .body(Full::from("{}"))
        .unwrap()
}

async fn greeting(
    service: &Idempotency<Greeter, MemoryStore>,
    request: Request<Full<Bytes>>,
) -> String {
    let Ok(response) = service.clone().oneshot(request).await;
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn get_mut_changes_the_inner_service_that_runs_the_next_requests() {
    let mut service =
        IdempotencyLayer::new(MemoryStore::default()).layer(Greeter { greeting: "hello" });
    assert_eq!(service.get_ref().greeting, "hello");
    assert_eq!(greeting(&service, post("k1")).await, "hello");

    service.get_mut().greeting = "bonjour";
    assert_eq!(service.get_ref().greeting, "bonjour");
    assert_eq!(greeting(&service, post("k2")).await, "bonjour");
    assert_eq!(
        greeting(&service, post("k1")).await,
        "hello",
        "a retry is replayed from its record, whatever the inner service says now"
    );
}

#[tokio::test]
async fn into_inner_gives_the_inner_service_back_as_it_was_left() {
    let mut service =
        IdempotencyLayer::new(MemoryStore::default()).layer(Greeter { greeting: "hello" });
    service.get_mut().greeting = "hej";
    let inner: Greeter = service.into_inner();
    assert_eq!(inner.greeting, "hej");
}
