//! Where a protected request's key comes from: the head first (the key header, a key source
//! that reads headers), then the body (a key source that reads it), else the missing-key
//! policy (pass through, 400, or a key derived from the request).
//!
//! Pure decisions: no tower or tokio in here.

use std::time::Duration;

use bytes::Bytes;
use http::{Extensions, HeaderMap, request::Parts};

use crate::{
    fingerprint::Fingerprint,
    key::{Delivery, Found, IdempotencyKey, KeyRef, StorageKey},
    layer::config::{Config, MissingKey},
    problem::Problem,
    protocol::grpc,
    protocol::jsonrpc::Rpc,
};

/// What the request head says.
pub(crate) enum Head {
    /// Nothing to protect: the request passes through untouched.
    PassThrough,
    /// No key, and nothing tells its sender apart (no credential, no peer address): a
    /// derived key could answer it with another client's response, so it passes through
    /// unprotected, counted.
    Unscoped,
    /// A bad or missing key: refused.
    Refuse(Problem),
    /// Protected, its key found as planned.
    Protect(KeyPlan),
}

/// Where a protected request's key comes from, as far as its head tells.
pub(crate) enum KeyPlan {
    /// The client sent it, or a key source found it in the head.
    Client(Found),
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
    /// The webhook delivery the client's key was found for (`Plain` otherwise).
    pub(crate) delivery: Delivery,
    pub(crate) storage: StorageKey,
    /// What a retry's payload must match.
    pub(crate) fingerprint: Fingerprint,
    /// How long the record is kept.
    pub(crate) ttl: Duration,
}

/// What becomes of a protected request once its body is read.
pub(crate) enum Keying {
    /// Claimed under this key.
    Protect(Key),
    /// No key, and the policy is to pass through.
    PassThrough,
    /// No key, and nothing to scope a derived one by ([`Head::Unscoped`]).
    Unscoped,
    /// A gRPC call whose key was to come from its request message, which is not one
    /// uncompressed message: it passes through unprotected, counted.
    GrpcUndecoded,
}

/// Reads the plan off the request head (`rpc`: what it is to gRPC, as far as the head tells).
pub(crate) fn from_head(
    config: &Config,
    headers: &HeaderMap,
    extensions: &Extensions,
    rpc: &Rpc,
) -> Head {
    match head_only(config, headers, extensions, rpc) {
        // In JSON-RPC mode only calls of protected methods need a key, and the body tells
        // which a request is: the refusal waits for it, and is answered as JSON-RPC.
        Head::Refuse(problem) if config.json_rpc.enabled => {
            Head::Protect(KeyPlan::Refused(problem))
        }
        // Whether a JSON-RPC call names its agent is decided once its body is read (a peer
        // address is not enough there, an MCP session is).
        Head::Unscoped if config.json_rpc.enabled => Head::Protect(KeyPlan::Derived),
        head => head,
    }
}

/// What the head alone says.
fn head_only(config: &Config, headers: &HeaderMap, extensions: &Extensions, rpc: &Rpc) -> Head {
    match IdempotencyKey::from_headers(headers, &config.header_name) {
        Ok(Some(key)) => return Head::Protect(KeyPlan::Client(Found::plain(key))),
        Err(error) => return Head::Refuse(Problem::invalid_key(&error)),
        Ok(None) => {}
    }
    let from_source = config
        .key_source
        .as_ref()
        .map(|source| source.find_in_head(headers));
    match from_source {
        Some(Some(Ok(Some(found)))) => Head::Protect(KeyPlan::Client(found)),
        Some(Some(Err(error))) => Head::Refuse(Problem::invalid_key(&error)),
        Some(None) => Head::Protect(KeyPlan::FromBody),
        Some(Some(Ok(None))) | None => match config.missing_key {
            MissingKey::PassThrough => Head::PassThrough,
            MissingKey::Required => Head::Refuse(Problem::missing_key(&config.header_name)),
            // AIP-155: a gRPC call without a request id is a new request, never a duplicate
            // of an earlier one with the same message.
            MissingKey::Fingerprint(_) if rpc.is_grpc() => Head::PassThrough,
            MissingKey::Fingerprint(_) if config.scope.derives(headers, extensions) => {
                Head::Protect(KeyPlan::Derived)
            }
            MissingKey::Fingerprint(_) => Head::Unscoped,
        },
    }
}

/// Follows `plan` once the body is read (`rpc` is what it is to JSON-RPC): the key to claim
/// and the fingerprint a retry must match, the request to run unprotected, or the problem to
/// answer.
pub(crate) fn after_body(
    config: &Config,
    plan: KeyPlan,
    parts: &Parts,
    body: &Bytes,
    rpc: &Rpc,
) -> Result<Keying, Problem> {
    let found = match plan {
        KeyPlan::Client(found) => Some(found),
        KeyPlan::Refused(problem) => return Err(problem),
        KeyPlan::Derived => None,
        KeyPlan::FromBody => {
            let source = config.key_source.as_ref();
            let found = source.map(|source| source.find(parts, body)).transpose();
            let found = found
                .map_err(|error| Problem::invalid_key(&error))?
                .flatten();
            // A key source over the message finds nothing in a compressed one: that is no
            // call without a key, and it is told apart (counted, or refused as such).
            if found.is_none() && rpc.is_grpc() && grpc::grpc_message(body).is_none() {
                return match config.missing_key {
                    MissingKey::Required => {
                        Err(Problem::grpc_message_unreadable(&config.header_name))
                    }
                    MissingKey::PassThrough | MissingKey::Fingerprint(_) => {
                        Ok(Keying::GrpcUndecoded)
                    }
                };
            }
            found
        }
    };
    let Some(Found { key, delivery }) = found else {
        let window = match config.missing_key {
            MissingKey::Fingerprint(_) if rpc.is_grpc() => return Ok(Keying::PassThrough),
            MissingKey::Fingerprint(window) => window,
            MissingKey::Required => return Err(Problem::missing_key(&config.header_name)),
            MissingKey::PassThrough => return Ok(Keying::PassThrough),
        };
        // Agents share hosts and often credentials: a tool call's derived key is kept only
        // for a credential or a session, never for whoever sends the same arguments.
        let scoped = if rpc.is_json_rpc() {
            config.scope.names_an_agent(&parts.headers)
        } else {
            config.scope.derives(&parts.headers, &parts.extensions)
        };
        if !scoped {
            return Ok(Keying::Unscoped);
        }
        let fingerprint = config.fingerprint_of(parts, body, rpc);
        let storage = config.storage_key(parts, KeyRef::Derived(&fingerprint));
        return Ok(Keying::Protect(Key {
            client: None,
            delivery: Delivery::Plain,
            storage,
            fingerprint,
            ttl: window,
        }));
    };
    let fingerprint = if delivery.compares_payload() {
        config.fingerprint_of(parts, body, rpc)
    } else {
        // Every payload under this key is the same delivery (see `Delivery`): a retry
        // matches whatever it carries.
        Fingerprint::from_bytes([0; 32])
    };
    let key_ref = match delivery {
        Delivery::Plain => KeyRef::Client(&key),
        _ => KeyRef::Delivered(&key, delivery),
    };
    let storage = config.storage_key(parts, key_ref);
    Ok(Keying::Protect(Key {
        client: Some(key),
        delivery,
        storage,
        fingerprint,
        ttl: config.ttl,
    }))
}
