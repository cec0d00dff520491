//! Look-ups by a request's address: its fields in a JSON body (never in the URL), the
//! address derived as the layer derives it, under its secret and then its previous ones.

use axum::{
    extract::{Request, State},
    response::Response,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method, request::Parts};
use serde_json::Value;

use super::router::Admin;
use super::{AdminRouter, json::bad_request};
use crate::{
    fingerprint::digest::Secret,
    key::{IdempotencyKey, KeyRef, Scope, StorageKey},
    layer::config::Config,
    store::AdminStore,
    store::inspect::LookupScope,
};

/// The largest look-up body read.
const MAX_LOOKUP_BODY: usize = 16 * 1024;

impl<St: AdminStore> AdminRouter<St> {
    /// `POST /records/lookup`: what the store holds under the address the body gives.
    pub(super) async fn look_up(State(admin): Admin<St>, request: Request) -> Response {
        let (parts, body) = request.into_parts();
        if parts.uri.query().is_some() {
            return bad_request(
                "a look-up takes its parameters in the JSON body, never in the URL (access logs record URLs)",
            );
        }
        let Ok(body) = axum::body::to_bytes(body, MAX_LOOKUP_BODY).await else {
            return bad_request("the body could not be read (at most 16 KiB)");
        };
        let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(&body) else {
            return bad_request(
                "the body is a JSON object: method, path, key, and scope or headers",
            );
        };
        let config = &admin.config;
        let secrets = std::iter::once(config.fingerprint.secret.as_ref())
            .chain(config.fingerprint.previous_secrets.iter().map(Some));
        let addresses: Result<Vec<StorageKey>, _> = secrets
            .map(|secret| address(config, secret, &fields))
            .collect();
        match addresses {
            Ok(addresses) => admin.look_up_key(&parts, addresses).await,
            Err(message) => bad_request(message),
        }
    }

    /// Looks at the request's address under the layer's secret, then (while free) under each
    /// previous secret ([`add_previous_secret`](crate::IdempotencyLayer::add_previous_secret)),
    /// as the layer itself does: what is found first is the answer.
    async fn look_up_key(&self, parts: &Parts, addresses: Vec<StorageKey>) -> Response {
        let Some(&current) = addresses.first() else {
            return bad_request("no address");
        };
        for (i, key) in addresses.into_iter().enumerate() {
            match self.store.inspect(&key).await {
                Ok(None) => {}
                Ok(found) => return self.inspected(parts, "look_up", key, found, i > 0),
                Err(error) => return self.store_failed(parts, "look_up", Some(&key), &error),
            }
        }
        self.inspected(parts, "look_up", current, None, false)
    }
}

/// The storage key a client-keyed request had, from the look-up's fields, derived as
/// `config`'s layer derives it with `secret` (its own, or a previous one).
fn address(
    config: &Config,
    secret: Option<&Secret>,
    fields: &serde_json::Map<String, Value>,
) -> Result<StorageKey, &'static str> {
    let text = |name: &str| fields.get(name).and_then(Value::as_str);
    let method = text("method")
        .ok_or("method is required")
        .and_then(|m| Method::from_bytes(m.as_bytes()).map_err(|_| "method is not a method"))?;
    let path = text("path").ok_or("path is required")?;
    let uri = http::Uri::try_from(path).map_err(|_| "path is not a URI path")?;
    let key = text("key")
        .ok_or("key is required")
        .and_then(|k| IdempotencyKey::parse(k.as_bytes()).map_err(|_| "key is not a valid key"))?;
    let custom_scope = matches!(config.scope, Scope::Custom(_));
    match (fields.get("scope"), fields.get("headers"), custom_scope) {
        (Some(_), Some(_), _) => Err("give scope or headers, not both"),
        (Some(scope), None, true) => {
            let scope = scope.as_str().ok_or("scope is a string")?;
            let scope = LookupScope::Principal(scope.as_bytes());
            Ok(StorageKey::of_lookup(
                secret,
                scope,
                &method,
                uri.path(),
                &key,
            ))
        }
        (None, headers, false) => {
            let mut request = http::Request::builder().method(method).uri(uri);
            if let Some(map) = request.headers_mut() {
                *map = headers_of(headers)?;
            }
            let (parts, ()) = request
                .body(())
                .map_err(|_| "the request head is not valid")?
                .into_parts();
            Ok(config.storage_key_under(secret, &parts, KeyRef::Client(&key)))
        }
        (Some(_), None, false) => Err(
            "this layer scopes records by the request's credentials: give its credential headers, not a scope",
        ),
        (None, _, true) => {
            Err("this layer scopes records with with_scope: give the scope it returns")
        }
    }
}

/// The credential headers of a look-up: an object of names to a value or a list of values.
fn headers_of(headers: Option<&Value>) -> Result<HeaderMap, &'static str> {
    let mut map = HeaderMap::new();
    let Some(headers) = headers else {
        return Ok(map);
    };
    let headers = headers
        .as_object()
        .ok_or("headers is an object of header names to values")?;
    for (name, values) in headers {
        let name =
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| "a header name is not valid")?;
        let values = match values {
            Value::Array(values) => values.iter().collect(),
            value => vec![value],
        };
        for value in values {
            let value = value
                .as_str()
                .and_then(|v| HeaderValue::from_str(v).ok())
                .ok_or("a header value is not a valid header value")?;
            map.append(name.clone(), value);
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(json: &str) -> serde_json::Map<String, Value> {
        match serde_json::from_str(json) {
            Ok(Value::Object(fields)) => fields,
            _ => panic!("an object: {json}"),
        }
    }

    fn config(secret: Option<&[u8]>, custom_scope: bool) -> Config {
        let mut config = Config::default();
        config.fingerprint.secret = secret.map(Secret::new);
        if custom_scope {
            config.scope = Scope::custom(|parts: &Parts| {
                parts
                    .headers
                    .get("x-account")
                    .map_or(Vec::new(), |v| v.as_bytes().to_vec())
            });
        }
        config
    }

    #[test]
    fn a_look_up_needs_a_method_a_path_a_key_and_the_layers_kind_of_scope() {
        let (custom, credentials) = (config(None, true), config(None, false));
        let cases: [(&Config, &str, Result<(), &str>); 12] = [
            (
                &custom,
                r#"{"method":"POST","path":"/charges","key":"k-1","scope":"a"}"#,
                Ok(()),
            ),
            (
                &credentials,
                r#"{"method":"POST","path":"/charges","key":"k-1","headers":{"authorization":"Bearer a"}}"#,
                Ok(()),
            ),
            (
                &credentials,
                r#"{"method":"POST","path":"/charges","key":"k-1"}"#,
                Ok(()),
            ),
            (
                &custom,
                r#"{"method":"POST","path":"/charges","scope":"a"}"#,
                Err("key is required"),
            ),
            (
                &custom,
                r#"{"path":"/charges","key":"k","scope":"a"}"#,
                Err("method is required"),
            ),
            (
                &custom,
                r#"{"method":"POST","key":"k","scope":"a"}"#,
                Err("path is required"),
            ),
            (
                &custom,
                r#"{"method":"PO ST","path":"/","key":"k","scope":"a"}"#,
                Err("method is not a method"),
            ),
            (
                &custom,
                r#"{"method":"POST","path":"/","key":"","scope":"a"}"#,
                Err("key is not a valid key"),
            ),
            (
                &custom,
                r#"{"method":"POST","path":"/","key":"k","scope":"a","headers":{}}"#,
                Err("give scope or headers, not both"),
            ),
            (
                &custom,
                r#"{"method":"POST","path":"/","key":"k","headers":{"x-account":"a"}}"#,
                Err("this layer scopes records with with_scope: give the scope it returns"),
            ),
            (
                &credentials,
                r#"{"method":"POST","path":"/","key":"k","scope":"a"}"#,
                Err(
                    "this layer scopes records by the request's credentials: give its credential headers, not a scope",
                ),
            ),
            (
                &credentials,
                r#"{"method":"POST","path":"/","key":"k","headers":{"authorization":7}}"#,
                Err("a header value is not a valid header value"),
            ),
        ];
        for (config, json, expected) in cases {
            assert_eq!(
                address(config, None, &fields(json)).map(|_| ()),
                expected,
                "{json}"
            );
        }
    }

    #[test]
    fn a_look_up_finds_the_address_the_layer_derives_with_its_secret_and_scope() {
        let key = IdempotencyKey::parse(b"k-1").unwrap();
        for secret in [None, Some(&b"server secret"[..])] {
            for custom in [false, true] {
                let config = config(secret, custom);
                let (parts, ()) = http::Request::post("/charges?x=1")
                    .header(http::header::AUTHORIZATION, "Bearer alice")
                    .header("x-account", "acct_1")
                    .body(())
                    .unwrap()
                    .into_parts();
                let stored = config.storage_key(&parts, KeyRef::Client(&key));
                let look_up = if custom {
                    r#"{"method":"POST","path":"/charges","key":"k-1","scope":"acct_1"}"#
                } else {
                    r#"{"method":"POST","path":"/charges","key":"k-1","headers":{"authorization":"Bearer alice"}}"#
                };
                assert_eq!(
                    address(
                        &config,
                        config.fingerprint.secret.as_ref(),
                        &fields(look_up)
                    ),
                    Ok(stored),
                    "{secret:?} {custom}"
                );
                let unkeyed = Config {
                    fingerprint: Default::default(),
                    ..config.clone()
                };
                assert_eq!(
                    address(&unkeyed, None, &fields(look_up)) == Ok(stored),
                    secret.is_none(),
                    "a router with another secret finds another address"
                );
            }
        }
    }
}
