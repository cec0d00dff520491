//! The layer's settings, their defaults, and the policies they choose between.

use std::{fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderName, Method, Response, StatusCode, request::Parts, response};

use crate::{
    fingerprint::digest::{FieldHasher, Secret},
    fingerprint::{Fingerprint, FingerprintRule},
    key::{Delivery, IdempotencyKey, KeyRef, KeySource, Scope, StorageKey, sent_uri},
    observe::{self, Observer},
    problem::{Problem, ProblemResponse},
    protocol::grpc,
    protocol::jsonrpc::{self, Rpc},
};

/// The request header that carries the key: `Idempotency-Key`.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The response header that marks a replay: `Idempotent-Replayed: true`.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The longest a record may be kept: 365 days. The bound of
/// [`with_ttl`](crate::IdempotencyLayer::with_ttl) and of the [`MissingKey::Fingerprint`]
/// window, and what every store of this crate clamps a longer TTL to.
///
/// A year is far beyond any retry schedule (Stripe keeps keys for 24 hours), and keeps every
/// deadline far from overflowing: Redis refuses an expiry whose milliseconds, added to its
/// clock, overflow, and a store that refused every completion would let every retry execute
/// again. Check a TTL read from configuration against it before calling the setter.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// The shortest lease [`with_lease`](crate::IdempotencyLayer::with_lease) accepts: 100 ms.
///
/// The owner renews its lease every third of it, so a 100 ms lease is renewed every 33 ms and
/// lost after about 66 ms without an answer from the store; any shorter and a busy runtime's
/// scheduling delays, or one slow round trip, would let a duplicate take the claim over while
/// the handler still runs (and both execute). Leases are kept to the millisecond (Redis's
/// resolution). Prefer seconds in production: the default is 30 s.
pub const MIN_LEASE: Duration = Duration::from_millis(100);

/// The longest lease [`with_lease`](crate::IdempotencyLayer::with_lease) accepts: one hour,
/// and what the stores of this crate clamp a longer lease to.
///
/// A lease is renewed while its handler runs, so it does not bound how long a handler may
/// take; it bounds how long the key of a crashed instance stays blocked.
pub const MAX_LEASE: Duration = Duration::from_secs(60 * 60);

/// The longest a streamed response may still be captured once its client is gone
/// ([`with_capture_after_disconnect`](crate::IdempotencyLayer::with_capture_after_disconnect)):
/// one hour. A capture that outlives its client holds its key in flight (retries wait, then
/// get `409`) and keeps its handler's body running; "forever" is what the bound is for.
pub const MAX_CAPTURE_AFTER_DISCONNECT: Duration = Duration::from_secs(60 * 60);

/// The longest [`WaitMode::Wait`] accepted: one hour, far longer than any HTTP client waits
/// for a response.
pub const MAX_WAIT: Duration = Duration::from_secs(60 * 60);

/// What to do with a protected request that carries no key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingKey {
    /// Derive the key from the request itself (SHA-256 of method, path, query and body) and
    /// remember it for this window only: what stops a double-clicked form from charging twice.
    /// Only for a request whose scope tells its sender apart (a credential header, the peer's
    /// address, or [`with_scope`](crate::IdempotencyLayer::with_scope)); any other runs
    /// unprotected, since a derived key would answer it with another client's response. A
    /// body over the request-body limit runs unprotected too, handed on whole. A gRPC call
    /// is never given a derived key (AIP-155: a call without a request id is a new request):
    /// it passes through.
    ///
    /// The window must be more than zero and at most [`MAX_TTL`]
    /// ([`with_missing_key`](crate::IdempotencyLayer::with_missing_key) panics otherwise).
    Fingerprint(Duration),
    /// Refuse the request with a 400 problem.
    Required,
    /// Let the request through unprotected, without reading its body.
    PassThrough,
}

/// What a request does while another request with its key is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitMode {
    /// Wait up to this long for the first request to finish, then replay its response; past
    /// it, 409 with `Retry-After`. Waiting is woken by notification, not polling. At most
    /// [`MAX_WAIT`] ([`with_wait_mode`](crate::IdempotencyLayer::with_wait_mode) panics
    /// otherwise); zero answers 409 at once, like [`WaitMode::Reject`].
    Wait(Duration),
    /// Answer 409 with `Retry-After` at once (Stripe's and the IETF draft's behaviour).
    Reject,
}

/// What to do when the store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    /// Refuse with a 503 problem and `Retry-After`: nothing runs unprotected.
    Closed,
    /// Run the handler unprotected, log a warning and count it.
    ///
    /// # Warning
    ///
    /// While the store is down, retries and concurrent duplicates execute again.
    Open,
}

/// The application's choice for a request that finds its key's claim abandoned
/// ([`IdempotencyLayer::with_outcome_unknown`](crate::IdempotencyLayer::with_outcome_unknown)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Take the claim over and run the handler again (the default): right when running twice
    /// is harmless, or when the handler itself asks its downstream whether the work happened
    /// (a payment provider's own idempotency key).
    RunAgain,
    /// Answer `409` [`ProblemKind::OutcomeUnknown`](crate::ProblemKind::OutcomeUnknown) and
    /// leave the claim as it is, until an operator resolves it: breaks the claim so the next
    /// retry runs (the work did not happen), or lets it expire.
    OutcomeUnknown,
}

pub(crate) type RecoveryFn = Arc<dyn Fn(&Parts) -> Recovery + Send + Sync>;

/// The hook, or the default (run again).
#[derive(Clone, Default)]
pub(crate) struct OnAbandoned(Option<RecoveryFn>);

impl OnAbandoned {
    pub(crate) fn new(hook: RecoveryFn) -> Self {
        Self(Some(hook))
    }

    pub(crate) fn decide(&self, parts: &Parts) -> Recovery {
        self.0
            .as_ref()
            .map_or(Recovery::RunAgain, |hook| hook(parts))
    }
}

pub(crate) type StoreWhen = Arc<dyn Fn(&response::Parts) -> bool + Send + Sync>;
pub(crate) type RenderProblem = Arc<dyn ProblemResponse + Send + Sync>;

/// Every setting of an [`IdempotencyLayer`](crate::IdempotencyLayer), shared by all its
/// services behind one `Arc`.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) header_name: HeaderName,
    pub(crate) methods: Vec<Method>,
    pub(crate) missing_key: MissingKey,
    pub(crate) key_source: Option<KeySource>,
    /// Body and header modes and the server secret.
    pub(crate) fingerprint: FingerprintRule,
    /// JSON-RPC mode: on or off, the protected methods, whether errors are kept.
    pub(crate) json_rpc: jsonrpc::Settings,
    /// gRPC: the streaming methods that pass through, the codes whose answers are kept.
    pub(crate) grpc: grpc::Settings,
    /// The header that states how long a key is honoured; none by default.
    pub(crate) expiry_header: Option<HeaderName>,
    pub(crate) scope: Scope,
    pub(crate) ttl: Duration,
    pub(crate) lease: Duration,
    pub(crate) wait_mode: WaitMode,
    pub(crate) mismatch_status: StatusCode,
    pub(crate) request_body_limit: usize,
    pub(crate) response_body_limit: usize,
    /// How long a streamed response is still captured once its client is gone.
    pub(crate) capture_after_disconnect: Duration,
    pub(crate) store_when: StoreWhen,
    pub(crate) fail_mode: FailMode,
    pub(crate) render_problem: Option<RenderProblem>,
    // Operations (issue 10): the route label's reporting, and the abandoned-claim hook.
    pub(crate) observer: Observer,
    pub(crate) on_abandoned: OnAbandoned,
}

/// Defaults, in one place; the setters' docs repeat them.
pub(crate) mod defaults {
    use std::time::Duration;

    pub(crate) const TTL: Duration = Duration::from_secs(24 * 60 * 60);
    pub(crate) const LEASE: Duration = Duration::from_secs(30);
    pub(crate) const WAIT: Duration = Duration::from_secs(10);
    pub(crate) const FINGERPRINT_WINDOW: Duration = Duration::from_secs(60);
    pub(crate) const BODY_LIMIT: usize = 1024 * 1024;
    pub(crate) const CAPTURE_AFTER_DISCONNECT: Duration = Duration::from_secs(60);
}

/// The default store-when predicate: everything but transient failures (5xx, 408, 429).
pub(crate) fn is_not_transient(parts: &response::Parts) -> bool {
    !(parts.status.is_server_error()
        || parts.status == StatusCode::REQUEST_TIMEOUT
        || parts.status == StatusCode::TOO_MANY_REQUESTS)
}

impl Default for Config {
    fn default() -> Self {
        Self {
            header_name: IDEMPOTENCY_KEY,
            methods: vec![Method::POST, Method::PATCH],
            missing_key: MissingKey::Fingerprint(defaults::FINGERPRINT_WINDOW),
            key_source: None,
            fingerprint: FingerprintRule::default(),
            json_rpc: jsonrpc::Settings::default(),
            grpc: grpc::Settings::default(),
            expiry_header: None,
            scope: Scope::Credentials,
            ttl: defaults::TTL,
            lease: defaults::LEASE,
            wait_mode: WaitMode::Wait(defaults::WAIT),
            mismatch_status: StatusCode::CONFLICT,
            request_body_limit: defaults::BODY_LIMIT,
            response_body_limit: defaults::BODY_LIMIT,
            capture_after_disconnect: defaults::CAPTURE_AFTER_DISCONNECT,
            store_when: Arc::new(is_not_transient),
            fail_mode: FailMode::Closed,
            render_problem: None,
            observer: Observer::new(observe::DEFAULT_ROUTE),
            on_abandoned: OnAbandoned::default(),
        }
    }
}

impl Config {
    /// Whether requests with `method` are protected at all.
    pub(crate) fn protects(&self, method: &Method) -> bool {
        self.methods.contains(method)
    }

    /// The fingerprint of a request under the layer's settings, over the URI the client sent,
    /// its body read as `rpc` says.
    pub(crate) fn fingerprint_of(&self, parts: &Parts, body: &[u8], rpc: &Rpc) -> Fingerprint {
        Fingerprint::compute(
            &self.fingerprint,
            &parts.method,
            sent_uri(parts),
            &parts.headers,
            body,
            rpc,
        )
    }

    /// The address of a request's record under the layer's settings.
    pub(crate) fn storage_key(&self, parts: &Parts, key: KeyRef<'_>) -> StorageKey {
        self.storage_key_under(self.fingerprint.secret.as_ref(), parts, key)
    }

    /// The address of a request's record under the layer's settings, keyed by `secret` in
    /// place of the layer's own.
    pub(crate) fn storage_key_under(
        &self,
        secret: Option<&Secret>,
        parts: &Parts,
        key: KeyRef<'_>,
    ) -> StorageKey {
        let hasher = FieldHasher::for_secret(secret);
        let session = self.json_rpc.enabled;
        StorageKey::derive_with(hasher, &self.scope, session, &parts.method, parts, key)
    }

    /// Where a request's record was kept under each previous secret, newest first: the
    /// address and the fingerprint, both computed with that secret as the current ones are
    /// ([`plan::after_body`](crate::flow::plan)). `client` is the key the request carries and the
    /// delivery it was found for (`None`: its key is derived from its fingerprint).
    pub(crate) fn previous_addresses(
        &self,
        parts: &Parts,
        body: &[u8],
        client: Option<(&IdempotencyKey, Delivery)>,
        rpc: &Rpc,
    ) -> Vec<(StorageKey, Fingerprint)> {
        let rule = &self.fingerprint;
        rule.previous_secrets
            .iter()
            .map(|secret| {
                let fingerprint = match client {
                    // A delivery whose payloads may differ matches whatever it carries.
                    Some((_, delivery)) if !delivery.compares_payload() => {
                        Fingerprint::from_bytes([0; 32])
                    }
                    _ => {
                        let (method, headers) = (&parts.method, &parts.headers);
                        let uri = sent_uri(parts);
                        Fingerprint::compute_keyed(
                            rule,
                            Some(secret),
                            method,
                            uri,
                            headers,
                            body,
                            rpc,
                        )
                    }
                };
                let key = match client {
                    Some((key, Delivery::Plain)) => KeyRef::Client(key),
                    Some((key, delivery)) => KeyRef::Delivered(key, delivery),
                    None => KeyRef::Derived(&fingerprint),
                };
                (
                    self.storage_key_under(Some(secret), parts, key),
                    fingerprint,
                )
            })
            .collect()
    }

    /// Renders a problem the layer produces itself, with the problem and its kind in the
    /// response's extensions whatever the rendering: a gRPC status for a gRPC call, else the
    /// application's rendering if it set one, else a JSON-RPC error for a JSON-RPC request,
    /// else RFC 9457 JSON.
    pub(crate) fn render(&self, problem: &Problem, rpc: &Rpc) -> Response<Bytes> {
        let mut response = match &self.render_problem {
            // A gRPC client reads nothing but a gRPC status, whatever the application renders.
            _ if rpc.is_grpc() => problem.to_grpc_response(),
            Some(render) => render.problem_response(problem),
            None if rpc.is_json_rpc() => problem.to_json_rpc_response(rpc.id()),
            None => problem.to_response(),
        };
        let extensions = response.extensions_mut();
        extensions.insert(problem.kind());
        extensions.insert(problem.clone());
        response
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("header_name", &self.header_name)
            .field("methods", &self.methods)
            .field("missing_key", &self.missing_key)
            .field("key_source", &self.key_source)
            .field("fingerprint", &self.fingerprint)
            .field("json_rpc", &self.json_rpc)
            .field("grpc", &self.grpc)
            .field("expiry_header", &self.expiry_header)
            .field("scope", &self.scope)
            .field("ttl", &self.ttl)
            .field("lease", &self.lease)
            .field("wait_mode", &self.wait_mode)
            .field("mismatch_status", &self.mismatch_status)
            .field("request_body_limit", &self.request_body_limit)
            .field("response_body_limit", &self.response_body_limit)
            .field("fail_mode", &self.fail_mode)
            .field(
                "render_problem",
                &self.render_problem.as_ref().map(|_| ".."),
            )
            .field("route_label", &self.observer.route())
            .field("on_abandoned", &self.on_abandoned)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for OnAbandoned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Hook(..)"
        } else {
            "RunAgain"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::ProblemKind;

    fn parts(status: StatusCode) -> response::Parts {
        let mut response = Response::new(());
        *response.status_mut() = status;
        response.into_parts().0
    }

    #[test]
    fn transient_failures_are_not_stored_by_default() {
        let cases = [
            (200, true),
            (201, true),
            (302, true),
            (400, true),
            (404, true),
            (409, true),
            (422, true),
            (408, false),
            (429, false),
            (500, false),
            (502, false),
            (503, false),
        ];
        for (status, stored) in cases {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(is_not_transient(&parts(status)), stored, "{status}");
        }
    }

    #[test]
    fn only_post_and_patch_are_protected_by_default() {
        let config = Config::default();
        for (method, protected) in [
            (Method::POST, true),
            (Method::PATCH, true),
            (Method::GET, false),
            (Method::PUT, false),
            (Method::DELETE, false),
            (Method::HEAD, false),
            (Method::OPTIONS, false),
        ] {
            assert_eq!(config.protects(&method), protected, "{method}");
        }
    }

    #[test]
    fn rendered_problems_carry_the_problem_and_its_kind_even_when_overridden() {
        // A rendering that tries to put another problem in its place.
        let config = Config {
            render_problem: Some(Arc::new(|problem: &Problem| {
                let mut response = Response::new(Bytes::from_static(b"custom"));
                *response.status_mut() = problem.status();
                response.extensions_mut().insert(Problem::in_flight());
                response.extensions_mut().insert(ProblemKind::InFlight);
                response
            })),
            ..Config::default()
        };
        let problem = Problem::missing_key(&IDEMPOTENCY_KEY);
        for (rendering, response) in [
            ("overridden", config.render(&problem, &Rpc::Plain)),
            ("default", Config::default().render(&problem, &Rpc::Plain)),
        ] {
            assert_eq!(
                response.extensions().get::<ProblemKind>(),
                Some(&ProblemKind::MissingKey),
                "{rendering}"
            );
            assert_eq!(
                response.extensions().get::<Problem>(),
                Some(&problem),
                "{rendering}"
            );
        }
        assert_eq!(config.render(&problem, &Rpc::Plain).body(), "custom");
        let call = Rpc::Call(Some(Bytes::from_static(b"7")));
        assert_eq!(config.render(&problem, &call).body(), "custom");
        // A gRPC client reads gRPC statuses only: the application's rendering is not for it.
        let grpc = config.render(&problem, &Rpc::Grpc);
        assert!(grpc.body().is_empty());
        assert_eq!(grpc.headers()["grpc-status"], "3");
        assert_eq!(grpc.extensions().get::<Problem>(), Some(&problem));
    }

    #[test]
    fn the_defaults_are_within_the_bounds_the_setters_check() {
        let config = Config::default();
        assert!(!config.ttl.is_zero() && config.ttl <= MAX_TTL);
        assert!((MIN_LEASE..=MAX_LEASE).contains(&config.lease));
        assert!(
            matches!(config.missing_key, MissingKey::Fingerprint(window) if !window.is_zero() && window <= MAX_TTL)
        );
        assert!(matches!(config.wait_mode, WaitMode::Wait(wait) if wait <= MAX_WAIT));
        assert_eq!(config.mismatch_status, StatusCode::CONFLICT);
    }

    #[test]
    fn a_secret_keys_storage_keys_and_none_leaves_them_as_they_were() {
        use http::Request;

        use crate::{
            fingerprint::digest::Secret,
            key::{IdempotencyKey, Scope},
        };

        let parts = Request::post("/charges")
            .header("authorization", "Bearer alice")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let key = IdempotencyKey::parse(b"k1").unwrap();
        let address = |config: &Config| config.storage_key(&parts, KeyRef::Client(&key));
        let plain = Config::default();
        assert_eq!(
            address(&plain),
            StorageKey::derive(
                &Scope::Credentials,
                &Method::POST,
                &parts,
                KeyRef::Client(&key)
            ),
            "no secret: the address every earlier version used"
        );
        let mut keyed = Config::default();
        keyed.fingerprint.secret = Some(Secret::new(b"server secret"));
        let mut other = Config::default();
        other.fingerprint.secret = Some(Secret::new(b"another secret"));
        assert_ne!(address(&plain), address(&keyed));
        assert_ne!(address(&keyed), address(&other));
        assert_eq!(address(&keyed), address(&keyed.clone()));
        // The fingerprint is keyed by the same secret.
        assert_ne!(
            plain.fingerprint_of(&parts, b"{}", &Rpc::Plain),
            keyed.fingerprint_of(&parts, b"{}", &Rpc::Plain)
        );
    }
}
