//! A completed key's stored response, made into the retry's answer.

use std::time::Duration;

use http::{HeaderValue, Response};

use crate::{
    fingerprint::Fingerprint,
    flow::body::ResponseBody,
    flow::expiry,
    layer::config::{Config, IDEMPOTENT_REPLAYED},
    observe::Outcome,
    problem::Problem,
    protocol::jsonrpc::{self, Rpc},
    record::Record,
};

/// What a replay answers besides the record: the retry's fingerprint and what it is to
/// JSON-RPC (a JSON-RPC call gets its own `id` back), how long the record has left, and
/// whether the retry waited for the first request.
pub(crate) struct Retry<'a> {
    pub(crate) fingerprint: &'a Fingerprint,
    pub(crate) rpc: &'a Rpc,
    pub(crate) expires_in: Option<Duration>,
    pub(crate) waited: bool,
}

/// The replay of `record` for `retry`, marked `Idempotent-Replayed: true`; or the problem to
/// answer instead if the payload differs or nothing was kept.
pub(crate) fn replay<B>(
    config: &Config,
    record: Record,
    retry: &Retry<'_>,
) -> Result<Response<ResponseBody<B>>, Problem> {
    if record.fingerprint() != retry.fingerprint {
        return Err(Problem::key_reused(config.mismatch_status));
    }
    let status = record.status();
    let extra_headers = 1 + usize::from(config.expiry_header.is_some());
    let Some(mut parts) = record.into_replay_parts(extra_headers) else {
        return Err(Problem::not_replayable(status, config.response_body_limit));
    };
    if let Some(id) = retry.rpc.id() {
        parts.body = jsonrpc::with_retry_id(parts.body, id, &mut parts.headers)
            .map_err(|jsonrpc::Unanswerable| Problem::unanswerable())?;
    }
    expiry::on_replay(config, &mut parts.headers, retry.expires_in);
    let mut response = Response::new(ResponseBody::full(parts.body, parts.trailers));
    *response.status_mut() = parts.status;
    *response.headers_mut() = parts.headers;
    response
        .headers_mut()
        .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    config.observer.outcome(if retry.waited {
        Outcome::Waited
    } else {
        Outcome::Replayed
    });
    Ok(response)
}
