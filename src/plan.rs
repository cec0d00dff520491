//! Where a protected request's key comes from: the head first (the key header, a key source
//! that reads headers), then the body (a key source that reads it), else the missing-key
//! policy (pass through, 400, or a key derived from the request).
//!
//! Pure decisions: no tower or tokio in here.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, request::Parts};

use crate::{
    config::{Config, MissingKey},
    fingerprint::Fingerprint,
    jsonrpc::Rpc,
    key::{IdempotencyKey, KeyRef, StorageKey},
    problem::Problem,
};

/// What the request head says.
pub(crate) enum Head {
    /// Nothing to protect: the request passes through untouched.
    PassThrough,
    /// A bad or missing key: refused.
    Refuse(Problem),
    /// Protected, its key found as planned.
    Protect(KeyPlan),
}

/// Where a protected request's key comes from, as far as its head tells.
pub(crate) enum KeyPlan {
    /// The client sent it.
    Client(IdempotencyKey),
    /// A key source that reads the body; the missing-key policy applies if it finds nothing.
    FromBody,
    /// No key: derive one from the request.
    Derived,
    /// A bad or missing key, refused once the body tells what the request is: in JSON-RPC
    /// mode, only calls of protected methods need a key, and are refused as JSON-RPC.
    Refused(Problem),
}

/// The key once the body is read: what the claim is made on.
pub(crate) struct Key {
    /// The client's key, handed to the handler in its request's extensions.
    pub(crate) client: Option<IdempotencyKey>,
    pub(crate) storage: StorageKey,
    /// How long the record is kept.
    pub(crate) ttl: Duration,
}

/// Reads the plan off the request head.
pub(crate) fn from_head(config: &Config, headers: &HeaderMap) -> Head {
    match head_only(config, headers) {
        Head::Refuse(problem) if config.json_rpc.enabled => {
            Head::Protect(KeyPlan::Refused(problem))
        }
        head => head,
    }
}

/// What the head alone says.
fn head_only(config: &Config, headers: &HeaderMap) -> Head {
    match IdempotencyKey::from_headers(headers, &config.header_name) {
        Ok(Some(key)) => return Head::Protect(KeyPlan::Client(key)),
        Err(error) => return Head::Refuse(Problem::invalid_key(&error)),
        Ok(None) => {}
    }
    let from_source = config
        .key_source
        .as_ref()
        .map(|source| source.extract_from_headers(headers));
    match from_source {
        Some(Some(Ok(Some(key)))) => Head::Protect(KeyPlan::Client(key)),
        Some(Some(Err(error))) => Head::Refuse(Problem::invalid_key(&error)),
        Some(None) => Head::Protect(KeyPlan::FromBody),
        Some(Some(Ok(None))) | None => match config.missing_key {
            MissingKey::PassThrough => Head::PassThrough,
            MissingKey::Required => Head::Refuse(Problem::missing_key(&config.header_name)),
            MissingKey::Fingerprint(_) => Head::Protect(KeyPlan::Derived),
        },
    }
}

/// Follows `plan` once the body is read (`rpc` is what it is to JSON-RPC): the key to claim,
/// `None` to run unprotected (a body key source found nothing and the policy is to pass
/// through, or a JSON-RPC call names no agent to keep a derived key for), or the problem to
/// answer.
pub(crate) fn after_body(
    config: &Config,
    plan: KeyPlan,
    parts: &Parts,
    body: &Bytes,
    fingerprint: &Fingerprint,
    rpc: &Rpc,
) -> Result<Option<Key>, Problem> {
    let client = match plan {
        KeyPlan::Client(key) => Some(key),
        KeyPlan::Refused(problem) => return Err(problem),
        KeyPlan::Derived => None,
        KeyPlan::FromBody => {
            let source = config.key_source.as_ref();
            let found = source.map(|source| source.extract(parts, body)).transpose();
            found
                .map_err(|error| Problem::invalid_key(&error))?
                .flatten()
        }
    };
    let (key_ref, ttl) = match (&client, config.missing_key) {
        (Some(key), _) => (KeyRef::Client(key), config.ttl),
        // Agents share hosts and often credentials: a tool call's derived key is kept only
        // for a credential or a session, never for whoever sends the same arguments.
        (None, MissingKey::Fingerprint(_))
            if rpc.is_json_rpc() && !config.scope.names_an_agent(parts) =>
        {
            return Ok(None);
        }
        (None, MissingKey::Fingerprint(window)) => (KeyRef::Derived(fingerprint), window),
        (None, MissingKey::Required) => return Err(Problem::missing_key(&config.header_name)),
        (None, MissingKey::PassThrough) => return Ok(None),
    };
    let storage = config.storage_key(parts, key_ref);
    Ok(Some(Key {
        client,
        storage,
        ttl,
    }))
}
