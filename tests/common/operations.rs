//! The operator's tools end to end, run against every store: the admin router mounted in an
//! axum app beside a protected route, and the outcome-unknown hook on an abandoned claim.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{Router, body::Body, routing::post};
use http::{Method, Request, StatusCode, Uri, request::Parts};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;
use tower_idempotency::{
    AdminStore, Claim, Fingerprint, IdempotencyKey, IdempotencyLayer, IdempotencyStore,
    LookupScope, ProblemKind, Recovery, StorageKey, admin::AdminRouter,
};

use crate::common::conformance::fresh_key;

/// A protected `/charges` (scoped by the `x-account` header) whose handler counts its calls,
/// and the admin router under `/admin` (principal from `x-operator`).
pub struct App {
    pub router: Router,
    pub calls: Arc<AtomicUsize>,
}

pub fn app<St: AdminStore>(store: St, recovery: Recovery) -> App {
    app_with(store, recovery, None)
}

/// As [`app`], its layer keyed by `secret` if given.
pub fn app_with<St: AdminStore>(store: St, recovery: Recovery, secret: Option<&[u8]>) -> App {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let mut layer = IdempotencyLayer::new(store)
        .with_scope(account_scope)
        .with_outcome_unknown(move |_: &Parts| recovery);
    if let Some(secret) = secret {
        layer = layer.with_secret(secret);
    }
    let admin = AdminRouter::for_layer(&layer, authorize);
    let charges = Router::new()
        .route(
            "/charges",
            post(move || {
                let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
                async move { (StatusCode::CREATED, format!("charge #{n}")) }
            }),
        )
        .layer(layer);
    App {
        router: charges.nest("/admin", admin.into_router()),
        calls,
    }
}

/// The charges' scope: the `x-account` header.
fn account_scope(parts: &Parts) -> Vec<u8> {
    parts
        .headers
        .get("x-account")
        .map(|v| v.as_bytes().to_vec())
        .unwrap_or_default()
}

/// The operators: `alice` may, `mallory` is known but may not, anyone else is unknown.
fn authorize(parts: &Parts) -> Result<String, StatusCode> {
    match parts.headers.get("x-operator").map(|v| v.as_bytes()) {
        Some(b"alice") => Ok("alice".to_owned()),
        Some(_) => Err(StatusCode::FORBIDDEN),
        None => Err(StatusCode::UNAUTHORIZED),
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub replayed: bool,
    pub problem: Option<ProblemKind>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

pub async fn send(app: &App, request: Request<Body>) -> Reply {
    let response = app
        .router
        .clone()
        .oneshot(request)
        .await
        .expect("the router answers");
    let status = response.status();
    let replayed = response.headers().contains_key("idempotent-replayed");
    let problem = response.extensions().get::<ProblemKind>().copied();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("the body")
        .to_bytes()
        .to_vec();
    Reply {
        status,
        replayed,
        problem,
        body,
    }
}

pub fn charge(account: &str, key: &str) -> Request<Body> {
    Request::post("/charges")
        .header("x-account", account)
        .header("idempotency-key", key)
        .body(Body::from("{\"amount\":100}"))
        .unwrap()
}

pub fn admin(method: Method, uri: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header("x-operator", "alice")
        .body(Body::empty())
        .unwrap()
}

/// A look-up by the request's address, its fields in a JSON body.
pub fn look_up(fields: &str) -> Request<Body> {
    Request::post("/admin/records/lookup")
        .header("x-operator", "alice")
        .header("content-type", "application/json")
        .body(Body::from(fields.to_owned()))
        .unwrap()
}

pub fn charge_fingerprint() -> Fingerprint {
    Fingerprint::of(
        &Method::POST,
        &Uri::from_static("/charges"),
        b"{\"amount\":100}",
    )
}

pub fn digest_of(account: &str, key: &str) -> StorageKey {
    let key = IdempotencyKey::parse(key.as_bytes()).unwrap();
    StorageKey::of_request(
        LookupScope::Principal(account.as_bytes()),
        &Method::POST,
        "/charges",
        &key,
    )
}

/// A unique account, so runs against a shared store do not meet.
pub fn account() -> String {
    format!("acct_{}", &fresh_key().to_hex()[..16])
}

/// A claim made directly in the store for the charge `(account, key)` whose owner then
/// "crashed": its lease of 200 ms ends without completion.
pub async fn abandoned_claim<St: IdempotencyStore>(store: &St, account: &str, key: &str) {
    let claim = store
        .claim(
            &digest_of(account, key),
            &charge_fingerprint(),
            Duration::from_millis(200),
        )
        .await
        .unwrap();
    assert!(matches!(claim, Claim::Acquired(_)), "{claim:?}");
}

pub async fn look_up_forget_and_retry<St: AdminStore>(store: St) {
    let app = app(store, Recovery::RunAgain);
    let account = account();
    let first = send(&app, charge(&account, "k-1")).await;
    assert_eq!(first.status, StatusCode::CREATED);

    let digest = digest_of(&account, "k-1").to_hex();
    let by_address = send(
        &app,
        look_up(&format!(
            r#"{{"method":"POST","path":"/charges","key":"k-1","scope":"{account}"}}"#
        )),
    )
    .await;
    assert_eq!(by_address.status, StatusCode::OK);
    let found = by_address.json();
    assert_eq!(found["key_digest"], digest.as_str());
    assert_eq!(found["state"], "completed");
    assert_eq!(found["status"], 201);
    assert_eq!(found["replayable"], true);
    assert_eq!(found["body_len"], first.body.len());
    assert!(found["expires_at_ms"].as_u64() > found["created_at_ms"].as_u64());
    let by_digest = send(
        &app,
        admin(Method::GET, &format!("/admin/records/{digest}")),
    )
    .await;
    assert_eq!(by_digest.json(), found);

    let other_account = send(
        &app,
        look_up(r#"{"method":"POST","path":"/charges","key":"k-1","scope":"someone-else"}"#),
    )
    .await;
    assert_eq!(other_account.status, StatusCode::NOT_FOUND);
    assert_eq!(other_account.json()["state"], "free");

    let replay = send(&app, charge(&account, "k-1")).await;
    assert!(replay.replayed);
    let forgotten = send(
        &app,
        admin(Method::DELETE, &format!("/admin/records/{digest}")),
    )
    .await;
    assert_eq!(forgotten.status, StatusCode::OK);
    assert_eq!(forgotten.json()["forgotten"], true);
    let again = send(&app, charge(&account, "k-1")).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert!(!again.replayed, "a forgotten record executes again");
    assert_eq!(again.body, b"charge #2");
    assert_eq!(app.calls.load(Ordering::SeqCst), 2);

    // Every route that names an address refuses one that is not 64 hex digits.
    for (method, uri) in [
        (Method::GET, "/admin/records/xyz"),
        (Method::DELETE, "/admin/records/xyz"),
        (Method::DELETE, "/admin/claims/xyz"),
    ] {
        let bad = send(&app, admin(method.clone(), uri)).await;
        assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{method} {uri}");
        assert!(
            bad.json()["error"]
                .as_str()
                .is_some_and(|detail| detail.contains("64 hex")),
            "{method} {uri}: {:?}",
            bad.json()
        );
    }
    let bad = send(&app, look_up(r#"{"method":"POST","path":"/charges"}"#)).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}

pub async fn an_abandoned_claim_is_outcome_unknown_until_released<St: AdminStore>(store: St) {
    let app = app(store.clone(), Recovery::OutcomeUnknown);
    let account = account();
    abandoned_claim(&store, &account, "stuck").await;
    let digest = digest_of(&account, "stuck").to_hex();

    // While the lease runs, the claim is in flight; afterwards its outcome is unknown.
    let inspected = send(
        &app,
        admin(Method::GET, &format!("/admin/records/{digest}")),
    )
    .await;
    assert_eq!(inspected.json()["state"], "in_flight");
    assert_eq!(inspected.json()["abandoned"], false);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let inspected = send(
        &app,
        admin(Method::GET, &format!("/admin/records/{digest}")),
    )
    .await;
    assert_eq!(inspected.json()["abandoned"], true, "{}", inspected.json());

    for _ in 0..2 {
        let refused = send(&app, charge(&account, "stuck")).await;
        assert_eq!(refused.status, StatusCode::CONFLICT);
        assert_eq!(refused.problem, Some(ProblemKind::OutcomeUnknown));
    }
    assert_eq!(app.calls.load(Ordering::SeqCst), 0, "nothing ran again");

    let released = send(
        &app,
        admin(Method::DELETE, &format!("/admin/claims/{digest}")),
    )
    .await;
    assert_eq!(released.status, StatusCode::OK);
    assert_eq!(released.json()["released"], true);
    let ran = send(&app, charge(&account, "stuck")).await;
    assert_eq!(
        ran.status,
        StatusCode::CREATED,
        "released, the retry executes"
    );
    assert_eq!(app.calls.load(Ordering::SeqCst), 1);
    let again = send(
        &app,
        admin(Method::DELETE, &format!("/admin/claims/{digest}")),
    )
    .await;
    assert_eq!(
        again.status,
        StatusCode::NOT_FOUND,
        "a record is not a claim"
    );
}

pub async fn an_abandoned_claim_runs_again_by_default<St: AdminStore>(store: St) {
    let app = app(store.clone(), Recovery::RunAgain);
    let account = account();
    abandoned_claim(&store, &account, "crashed").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let ran = send(&app, charge(&account, "crashed")).await;
    assert_eq!(ran.status, StatusCode::CREATED);
    assert!(!ran.replayed);
    let replay = send(&app, charge(&account, "crashed")).await;
    assert!(replay.replayed, "taken over, completed, then replayed");
    assert_eq!(app.calls.load(Ordering::SeqCst), 1);
}

pub async fn stuck_claims_are_listed_page_by_page<St: AdminStore>(store: St) {
    let app = app(store.clone(), Recovery::OutcomeUnknown);
    let account = account();
    let keys = ["s-1", "s-2", "s-3"];
    for key in keys {
        abandoned_claim(&store, &account, key).await;
    }
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let mut listed = Vec::new();
    let mut uri = String::from("/admin/claims?older_than=1&limit=1");
    for _ in 0..100_000 {
        let page = send(&app, admin(Method::GET, &uri)).await;
        assert_eq!(page.status, StatusCode::OK);
        let page = page.json();
        listed.extend(page["claims"].as_array().cloned().unwrap_or_default());
        match page["next"].as_str() {
            Some(next) => uri = format!("/admin/claims?older_than=1&limit=1&cursor={next}"),
            None => break,
        }
    }
    for key in keys {
        let digest = digest_of(&account, key).to_hex();
        let claim = listed.iter().find(|c| c["key_digest"] == digest.as_str());
        let claim = claim.unwrap_or_else(|| panic!("{key} is listed"));
        assert_eq!(claim["abandoned"], true);
        assert!(claim["age_ms"].as_u64() >= Some(1_000), "{claim}");
    }
    let young = send(&app, admin(Method::GET, "/admin/claims?older_than=3600")).await;
    let young = young.json();
    assert!(
        young["claims"]
            .as_array()
            .is_some_and(|c| c.iter().all(|c| c["age_ms"].as_u64() >= Some(3_600_000))),
        "{young}"
    );
    for key in keys {
        store.break_claim(&digest_of(&account, key)).await.unwrap();
    }
}

pub async fn every_admin_route_refuses_an_unauthorized_request<St: AdminStore>(store: St) {
    let app = app(store, Recovery::RunAgain);
    let account = account();
    assert_eq!(
        send(&app, charge(&account, "k-1")).await.status,
        StatusCode::CREATED
    );
    let digest = digest_of(&account, "k-1").to_hex();
    let look_up_body =
        format!(r#"{{"method":"POST","path":"/charges","key":"k-1","scope":"{account}"}}"#);
    let routes: [(Method, String, &str); 7] = [
        (Method::GET, format!("/admin/records/{digest}"), ""),
        (
            Method::POST,
            "/admin/records/lookup".to_owned(),
            &look_up_body,
        ),
        (Method::DELETE, format!("/admin/records/{digest}"), ""),
        (Method::DELETE, format!("/admin/claims/{digest}"), ""),
        (Method::GET, "/admin/claims?older_than=0".to_owned(), ""),
        (Method::GET, "/admin/no-such-route".to_owned(), ""),
        (Method::PUT, format!("/admin/records/{digest}"), ""),
    ];
    // (operator header, status): unknown callers get 401, known ones without the right 403.
    let callers = [
        (None, StatusCode::UNAUTHORIZED),
        (Some("mallory"), StatusCode::FORBIDDEN),
    ];
    for (method, uri, body) in &routes {
        for (operator, status) in callers {
            let mut request = Request::builder().method(method.clone()).uri(uri.as_str());
            if let Some(operator) = operator {
                request = request.header("x-operator", operator);
            }
            let reply = send(&app, request.body(Body::from(body.to_string())).unwrap()).await;
            assert_eq!(reply.status, status, "{method} {uri} by {operator:?}");
            assert_eq!(reply.json()["error"], "not authorized", "{method} {uri}");
        }
    }
    // Nothing was forgotten: the retry is still a replay, and the record is still there.
    let replay = send(&app, charge(&account, "k-1")).await;
    assert!(replay.replayed);
    assert_eq!(app.calls.load(Ordering::SeqCst), 1);
    let allowed = send(
        &app,
        admin(Method::GET, &format!("/admin/records/{digest}")),
    )
    .await;
    assert_eq!(allowed.status, StatusCode::OK);
}

pub async fn a_look_up_never_takes_credentials_from_the_url<St: AdminStore>(store: St) {
    let app = app(store, Recovery::RunAgain);
    let account = account();
    assert_eq!(
        send(&app, charge(&account, "k-1")).await.status,
        StatusCode::CREATED
    );
    let fields =
        format!(r#"{{"method":"POST","path":"/charges","key":"k-1","scope":"{account}"}}"#);
    let in_query = format!("method=POST&path=/charges&key=k-1&scope={account}");
    let mut with_query = look_up(&fields);
    *with_query.uri_mut() = format!("/admin/records/lookup?{in_query}").parse().unwrap();
    let refused = send(&app, with_query).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&refused.body).contains("never in the URL"));
    // The look-up of earlier versions, all in the query string, is no route at all.
    let old = send(
        &app,
        admin(Method::GET, &format!("/admin/records?{in_query}")),
    )
    .await;
    assert!(
        old.status.is_client_error() && old.status != StatusCode::OK,
        "{}",
        old.status
    );
    assert!(!String::from_utf8_lossy(&old.body).contains("state"));
    // In the body, it is found.
    let found = send(&app, look_up(&fields)).await;
    assert_eq!(found.status, StatusCode::OK);
    assert_eq!(found.json()["state"], "completed");
}

pub async fn a_look_up_finds_what_a_keyed_layer_stored<St: AdminStore>(store: St) {
    let secret = b"server secret, 32 bytes or more..";
    let app = app_with(store.clone(), Recovery::RunAgain, Some(secret));
    let account = account();
    assert_eq!(
        send(&app, charge(&account, "k-1")).await.status,
        StatusCode::CREATED
    );
    let fields =
        format!(r#"{{"method":"POST","path":"/charges","key":"k-1","scope":"{account}"}}"#);
    let found = send(&app, look_up(&fields)).await;
    assert_eq!(found.status, StatusCode::OK, "{}", found.json());
    assert_eq!(found.json()["state"], "completed");
    let key = IdempotencyKey::parse(b"k-1").unwrap();
    let keyed = StorageKey::of_keyed_request(
        secret,
        LookupScope::Principal(account.as_bytes()),
        &Method::POST,
        "/charges",
        &key,
    );
    assert_eq!(found.json()["key_digest"], keyed.to_hex().as_str());
    assert_ne!(
        keyed,
        digest_of(&account, "k-1"),
        "the secret keys the address"
    );
    assert!(found.json().get("secret").is_none());

    // After a rotation, the router of the rotated layer finds it under the previous secret.
    let rotated = IdempotencyLayer::new(store)
        .with_scope(account_scope)
        .with_secret(b"the next secret, 32 bytes or more")
        .add_previous_secret(secret);
    let rotated = App {
        router: Router::new().nest(
            "/admin",
            AdminRouter::for_layer(&rotated, authorize).into_router(),
        ),
        calls: Arc::new(AtomicUsize::new(0)),
    };
    let found = send(&rotated, look_up(&fields)).await;
    assert_eq!(found.status, StatusCode::OK, "{}", found.json());
    assert_eq!(found.json()["key_digest"], keyed.to_hex().as_str());
    assert_eq!(found.json()["secret"], "previous");
    // Forgotten by the digest the look-up gave, the next request executes again.
    let forgotten = send(
        &app,
        admin(
            Method::DELETE,
            &format!("/admin/records/{}", keyed.to_hex()),
        ),
    )
    .await;
    assert_eq!(forgotten.json()["forgotten"], true);
    let again = send(&app, charge(&account, "k-1")).await;
    assert!(!again.replayed);
    assert_eq!(app.calls.load(Ordering::SeqCst), 2);
}

/// Defines one `#[tokio::test]` per scenario above, each on the store `$make` builds.
#[macro_export]
macro_rules! operations_suite {
    ($make:expr) => {
        $crate::operations_suite!($make;
            look_up_forget_and_retry,
            an_abandoned_claim_is_outcome_unknown_until_released,
            an_abandoned_claim_runs_again_by_default,
            every_admin_route_refuses_an_unauthorized_request,
            a_look_up_never_takes_credentials_from_the_url,
            a_look_up_finds_what_a_keyed_layer_stored,
            stuck_claims_are_listed_page_by_page,
        );
    };
    ($make:expr; $($scenario:ident),* $(,)?) => {
        mod operations {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let store = ($make).await;
                    $crate::common::operations::$scenario(store).await;
                }
            )*
        }
    };
}
