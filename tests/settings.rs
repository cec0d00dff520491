//! Settings are checked when set: a value that would break exactly-once, or that no setting
//! can mean, panics at once with a message naming the setter, not at the first request.

mod common;

use std::time::Duration;

use http::StatusCode;
use tower_idempotency::{
    IdempotencyLayer, MAX_CAPTURE_AFTER_DISCONNECT, MAX_LEASE, MAX_TTL, MAX_WAIT, MIN_LEASE,
    MemoryStore, MissingKey, WaitMode,
};

use common::panics::assert_refused_by;

type Layer = IdempotencyLayer<MemoryStore>;

const MS: Duration = Duration::from_millis(1);
const NS: Duration = Duration::from_nanos(1);

/// Each case: what, the setting, and the setter named in the panic (`None`: accepted).
type Case = (
    &'static str,
    Box<dyn FnOnce(Layer) -> Layer>,
    Option<&'static str>,
);

fn case(
    what: &'static str,
    set: impl FnOnce(Layer) -> Layer + 'static,
    refused_by: Option<&'static str>,
) -> Case {
    (what, Box::new(set), refused_by)
}

#[test]
fn layer_settings_outside_their_bounds_panic_naming_the_setter() {
    let lease = Some("IdempotencyLayer::with_lease");
    let ttl = Some("IdempotencyLayer::with_ttl");
    let window = Some("IdempotencyLayer::with_missing_key");
    let mismatch = Some("IdempotencyLayer::with_mismatch_status");
    let wait = Some("IdempotencyLayer::with_wait_mode");
    let capture = Some("IdempotencyLayer::with_capture_after_disconnect");
    let secret = Some("IdempotencyLayer::with_secret");
    let previous = Some("IdempotencyLayer::add_previous_secret");
    let status = |code: u16| StatusCode::from_u16(code).unwrap();
    let cases: Vec<Case> = vec![
        case("zero lease", |l| l.with_lease(Duration::ZERO), lease),
        case(
            "lease under the minimum",
            |l| l.with_lease(MIN_LEASE - NS),
            lease,
        ),
        case("shortest lease", |l| l.with_lease(MIN_LEASE), None),
        case(
            "default lease",
            |l| l.with_lease(Duration::from_secs(30)),
            None,
        ),
        case("longest lease", |l| l.with_lease(MAX_LEASE), None),
        case(
            "lease over the maximum",
            |l| l.with_lease(MAX_LEASE + MS),
            lease,
        ),
        case("endless lease", |l| l.with_lease(Duration::MAX), lease),
        case("zero TTL", |l| l.with_ttl(Duration::ZERO), ttl),
        case("shortest TTL", |l| l.with_ttl(NS), None),
        case(
            "a week",
            |l| l.with_ttl(Duration::from_secs(7 * 86_400)),
            None,
        ),
        case("longest TTL", |l| l.with_ttl(MAX_TTL), None),
        case("TTL over the maximum", |l| l.with_ttl(MAX_TTL + NS), ttl),
        case("endless TTL", |l| l.with_ttl(Duration::MAX), ttl),
        case(
            "zero window",
            |l| l.with_missing_key(MissingKey::Fingerprint(Duration::ZERO)),
            window,
        ),
        case(
            "shortest window",
            |l| l.with_missing_key(MissingKey::Fingerprint(MS)),
            None,
        ),
        case(
            "longest window",
            |l| l.with_missing_key(MissingKey::Fingerprint(MAX_TTL)),
            None,
        ),
        case(
            "window over the maximum",
            |l| l.with_missing_key(MissingKey::Fingerprint(MAX_TTL + NS)),
            window,
        ),
        case(
            "endless window",
            |l| l.with_missing_key(MissingKey::Fingerprint(Duration::MAX)),
            window,
        ),
        case(
            "keys required",
            |l| l.with_missing_key(MissingKey::Required),
            None,
        ),
        case(
            "pass through",
            |l| l.with_missing_key(MissingKey::PassThrough),
            None,
        ),
        case("409", move |l| l.with_mismatch_status(status(409)), None),
        case("422", move |l| l.with_mismatch_status(status(422)), None),
        case(
            "200",
            move |l| l.with_mismatch_status(status(200)),
            mismatch,
        ),
        case(
            "400",
            move |l| l.with_mismatch_status(status(400)),
            mismatch,
        ),
        case(
            "410",
            move |l| l.with_mismatch_status(status(410)),
            mismatch,
        ),
        case(
            "500",
            move |l| l.with_mismatch_status(status(500)),
            mismatch,
        ),
        case("reject", |l| l.with_wait_mode(WaitMode::Reject), None),
        case(
            "no wait",
            |l| l.with_wait_mode(WaitMode::Wait(Duration::ZERO)),
            None,
        ),
        case(
            "longest wait",
            |l| l.with_wait_mode(WaitMode::Wait(MAX_WAIT)),
            None,
        ),
        case(
            "wait over the maximum",
            |l| l.with_wait_mode(WaitMode::Wait(MAX_WAIT + NS)),
            wait,
        ),
        case(
            "endless wait",
            |l| l.with_wait_mode(WaitMode::Wait(Duration::MAX)),
            wait,
        ),
        case(
            "capture stops with its client",
            |l| l.with_capture_after_disconnect(Duration::ZERO),
            None,
        ),
        case(
            "default capture bound",
            |l| l.with_capture_after_disconnect(Duration::from_secs(60)),
            None,
        ),
        case(
            "longest capture bound",
            |l| l.with_capture_after_disconnect(MAX_CAPTURE_AFTER_DISCONNECT),
            None,
        ),
        case(
            "capture bound over the maximum",
            |l| l.with_capture_after_disconnect(MAX_CAPTURE_AFTER_DISCONNECT + NS),
            capture,
        ),
        case(
            "endless capture",
            |l| l.with_capture_after_disconnect(Duration::MAX),
            capture,
        ),
        case("empty secret", |l| l.with_secret(b""), secret),
        case("empty secret string", |l| l.with_secret(""), secret),
        case("one-byte secret", |l| l.with_secret(b"x"), None),
        case("32-byte secret", |l| l.with_secret([7u8; 32]), None),
        case(
            "empty previous secret",
            |l| l.add_previous_secret(b""),
            previous,
        ),
        case(
            "previous secret",
            |l| l.add_previous_secret([6u8; 32]),
            None,
        ),
    ];
    for (what, set, refused_by) in cases {
        let layer = IdempotencyLayer::new(MemoryStore::default());
        assert_refused_by(what, refused_by, move || drop(set(layer)));
    }
}
