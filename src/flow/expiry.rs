//! The opt-in response header that tells a client how long its key will be honoured.
//!
//! Pure logic: no tower or tokio in here.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Response};

use crate::{layer::config::Config, problem::ProblemKind};

/// `Idempotency-Key-Expires-In`: how many whole seconds from now the key will be honoured
/// (retries replayed rather than executed). Sent only when
/// [`with_expiry_header`](crate::IdempotencyLayer::with_expiry_header) asks for it.
///
/// Named after the request header it answers, and after OAuth's `expires_in` (seconds from
/// now, not a date, so no clock needs to agree); not `Expires` or `Cache-Control`, which
/// caches would read as the response's freshness.
pub const IDEMPOTENCY_KEY_EXPIRES_IN: HeaderName =
    HeaderName::from_static("idempotency-key-expires-in");

/// States `left` (rounded down to whole seconds: a client must not count on more than is
/// left) in `name`.
pub(crate) fn announce(headers: &mut HeaderMap, name: &HeaderName, left: Duration) {
    headers.insert(name, HeaderValue::from(left.as_secs()));
}

/// The first execution's response: states the TTL its record is stored with, if the header
/// is on and the response is one the layer stores (not a refused status, not the layer's own
/// problem).
pub(crate) fn on_first_execution<B>(
    config: &Config,
    ttl: Duration,
    response: Response<B>,
) -> Response<B> {
    let Some(name) = &config.expiry_header else {
        return response;
    };
    if response.extensions().get::<ProblemKind>().is_some() {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    if (config.store_when)(&parts) {
        announce(&mut parts.headers, name, ttl);
    }
    Response::from_parts(parts, body)
}

/// A replay's response: states how long its record has left, if the header is on and the
/// store said (a store that cannot tell gets no header rather than a guess).
pub(crate) fn on_replay(config: &Config, headers: &mut HeaderMap, left: Option<Duration>) {
    if let (Some(name), Some(left)) = (&config.expiry_header, left) {
        announce(headers, name, left);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http::StatusCode;

    use super::*;

    fn response(status: StatusCode) -> Response<()> {
        let mut response = Response::new(());
        *response.status_mut() = status;
        response
    }

    fn stated(response: &Response<()>) -> Option<&str> {
        response
            .headers()
            .get(IDEMPOTENCY_KEY_EXPIRES_IN)
            .map(|v| v.to_str().unwrap())
    }

    #[test]
    fn the_first_response_states_the_ttl_in_whole_seconds_when_stored() {
        let on = Config {
            expiry_header: Some(IDEMPOTENCY_KEY_EXPIRES_IN),
            ..Config::default()
        };
        let day = Duration::from_secs(86_400);
        let cases = [
            (&on, StatusCode::CREATED, day, Some("86400")),
            (
                &on,
                StatusCode::CONFLICT,
                Duration::from_millis(60_999),
                Some("60"),
            ),
            (&on, StatusCode::OK, Duration::from_millis(999), Some("0")),
            // Not stored: the key is released, a retry executes again.
            (&on, StatusCode::SERVICE_UNAVAILABLE, day, None),
            (&on, StatusCode::TOO_MANY_REQUESTS, day, None),
        ];
        for (config, status, ttl, expected) in cases {
            let answered = on_first_execution(config, ttl, response(status));
            assert_eq!(stated(&answered), expected, "{status} {ttl:?}");
        }
        let off = Config::default();
        assert_eq!(
            stated(&on_first_execution(&off, day, response(StatusCode::OK))),
            None
        );
        let everything = Config {
            store_when: Arc::new(|_: &http::response::Parts| true),
            ..on.clone()
        };
        let stored_503 =
            on_first_execution(&everything, day, response(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(stated(&stored_503), Some("86400"));
    }

    #[test]
    fn the_layers_own_problems_state_nothing() {
        let config = Config {
            expiry_header: Some(IDEMPOTENCY_KEY_EXPIRES_IN),
            ..Config::default()
        };
        let mut problem = response(StatusCode::INTERNAL_SERVER_ERROR);
        problem.extensions_mut().insert(ProblemKind::HandlerFailed);
        let mut handled = response(StatusCode::CONFLICT);
        handled.extensions_mut().insert(ProblemKind::InFlight);
        for answered in [problem, handled] {
            let answered = on_first_execution(&config, Duration::from_secs(60), answered);
            assert_eq!(stated(&answered), None);
        }
    }

    #[test]
    fn a_replay_states_what_is_left_when_the_store_knows() {
        let config = Config {
            expiry_header: Some(HeaderName::from_static("x-key-ttl")),
            ..Config::default()
        };
        let mut headers = HeaderMap::new();
        on_replay(&config, &mut headers, Some(Duration::from_millis(41_700)));
        assert_eq!(headers["x-key-ttl"], "41");
        let mut unknown = HeaderMap::new();
        on_replay(&config, &mut unknown, None);
        assert!(unknown.is_empty());
        let mut off = HeaderMap::new();
        on_replay(&Config::default(), &mut off, Some(Duration::from_secs(5)));
        assert!(off.is_empty());
    }
}
