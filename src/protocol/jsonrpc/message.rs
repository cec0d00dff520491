//! [`Rpc`]: what a request body is (plain, or which JSON-RPC messages), the [`Settings`] that
//! choose the protected methods, and what of a call counts in its fingerprint.

use std::{fmt, sync::Arc};

use bytes::Bytes;
use serde_json::Value;

use super::scan::{Members, Scanned, scan};

/// The JSON-RPC mode's settings.
#[derive(Clone)]
pub(crate) struct Settings {
    /// JSON-RPC mode is on.
    pub(crate) enabled: bool,
    /// The methods whose calls are protected.
    pub(crate) methods: Arc<[Box<str>]>,
    /// Whether a response with an `error` member is kept for replay.
    pub(crate) store_errors: bool,
}

/// The methods protected by default: MCP's one side-effecting call.
pub(crate) const DEFAULT_METHODS: [&str; 1] = ["tools/call"];

impl Default for Settings {
    fn default() -> Self {
        Self {
            enabled: false,
            methods: DEFAULT_METHODS.iter().map(|&m| Box::from(m)).collect(),
            store_errors: false,
        }
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonRpc")
            .field("enabled", &self.enabled)
            .field("methods", &self.methods)
            .field("store_errors", &self.store_errors)
            .finish()
    }
}

/// What a protected request is, to JSON-RPC.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) enum Rpc {
    /// Not JSON-RPC (or the mode is off): a plain HTTP request.
    #[default]
    Plain,
    /// One call of a protected method, with the raw text of its `id` (`None` for a
    /// notification, or an `id` JSON-RPC does not allow).
    Call(Option<Bytes>),
    /// A batch with a call of a protected method in it.
    Batch,
    /// A gRPC call (not JSON-RPC): answered with gRPC statuses, kept by `grpc-status`.
    Grpc,
}

impl Rpc {
    /// Whether the request is JSON-RPC: the layer answers it with JSON-RPC errors.
    pub(crate) fn is_json_rpc(&self) -> bool {
        matches!(self, Self::Call(_) | Self::Batch)
    }

    /// Whether the request is a gRPC call: the layer answers it with gRPC statuses.
    pub(crate) fn is_grpc(&self) -> bool {
        matches!(self, Self::Grpc)
    }

    /// The raw text of a single call's `id`.
    pub(crate) fn id(&self) -> Option<&[u8]> {
        match self {
            Self::Call(id) => id.as_deref(),
            Self::Plain | Self::Batch | Self::Grpc => None,
        }
    }
}

/// What the layer does with `body` in JSON-RPC mode: `None` lets it pass through untouched
/// (a JSON-RPC message that calls no protected method), `Some` protects it.
///
/// A batch passes through only if every message in it is JSON-RPC 2.0 and none calls a
/// protected method; anything that cannot be read as JSON-RPC is a plain request.
pub(crate) fn classify(body: &Bytes, settings: &Settings) -> Option<Rpc> {
    let protects = |members: &Members<'_>| {
        members
            .method
            .as_deref()
            .is_some_and(|method| settings.methods.iter().any(|m| &**m == method))
    };
    match scan(body) {
        Some(Scanned::One(members)) if members.version_2 => {
            if !protects(&members) {
                return None;
            }
            let id = members
                .id
                .and_then(|raw| super::scan::id_span(body, raw))
                .map(|span| body.slice(span));
            Some(Rpc::Call(id))
        }
        Some(Scanned::Batch(batch))
            if !batch.is_empty() && batch.iter().all(|members| members.version_2) =>
        {
            batch.iter().any(protects).then_some(Rpc::Batch)
        }
        _ => Some(Rpc::Plain),
    }
}

/// Leaves out of a JSON-RPC request's canonical value what a retry changes: a single call's
/// `id` (blanked: the member stays, so a request is never taken for a notification) and the
/// `params._meta` of every message.
pub(crate) fn prepare(value: &mut Value, rpc: &Rpc) {
    match (rpc, value) {
        (Rpc::Call(_), Value::Object(map)) => {
            if let Some(id) = map.get_mut("id")
                && matches!(id, Value::String(_) | Value::Number(_) | Value::Null)
            {
                *id = Value::Null;
            }
            drop_meta(map);
        }
        (Rpc::Batch, Value::Array(messages)) => {
            for message in messages {
                if let Value::Object(map) = message {
                    drop_meta(map);
                }
            }
        }
        _ => {}
    }
}

fn drop_meta(message: &mut serde_json::Map<String, Value>) {
    if let Some(Value::Object(params)) = message.get_mut("params") {
        params.remove("_meta");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(body: &str) -> Option<Rpc> {
        classify(&Bytes::from(body.to_owned()), &Settings::default())
    }

    fn call(id: &str) -> Option<Rpc> {
        Some(Rpc::Call(Some(Bytes::from(id.to_owned()))))
    }

    #[test]
    fn only_calls_of_protected_methods_are_protected_and_only_json_rpc_2_0_is_json_rpc() {
        let cases = [
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{}}"#,
                call("1"),
            ),
            (
                r#"{"method":"tools/call","id":"a-1","jsonrpc":"2.0"}"#,
                call(r#""a-1""#),
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools\/call"}"#,
                call("1"),
            ),
            // A notification or an id JSON-RPC does not allow: protected, no id to answer.
            (
                r#"{"jsonrpc":"2.0","method":"tools/call"}"#,
                Some(Rpc::Call(None)),
            ),
            (
                r#"{"jsonrpc":"2.0","id":{"x":1},"method":"tools/call"}"#,
                Some(Rpc::Call(None)),
            ),
            // JSON-RPC that calls nothing protected passes through.
            (
                r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{}}"#,
                None,
            ),
            (
                r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
                None,
            ),
            (
                r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":1}}"#,
                None,
            ),
            (r#"{"jsonrpc":"2.0","id":2,"method":"ping"}"#, None),
            (r#"{"jsonrpc":"2.0","id":3,"method":"tools/list"}"#, None),
            (
                r#"{"jsonrpc":"2.0","id":4,"method":"resources/read","params":{"uri":"a"}}"#,
                None,
            ),
            (r#"{"jsonrpc":"2.0","id":5,"method":"Tools/Call"}"#, None),
            (r#"{"jsonrpc":"2.0","id":6,"result":{}}"#, None),
            (
                r#"{"jsonrpc":"2.0","id":7,"error":{"code":1,"message":"no"}}"#,
                None,
            ),
            (
                r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"notifications/x"}]"#,
                None,
            ),
            (
                r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"tools/call"}]"#,
                Some(Rpc::Batch),
            ),
            // Not JSON-RPC 2.0: a plain request, protected as any other.
            (r#"{"id":"order-1","amount":10}"#, Some(Rpc::Plain)),
            (
                r#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#,
                Some(Rpc::Plain),
            ),
            (r#"{"id":1,"method":"tools/list"}"#, Some(Rpc::Plain)),
            (
                r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"id":2}]"#,
                Some(Rpc::Plain),
            ),
            ("[]", Some(Rpc::Plain)),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"ping","method":"tools/call"}"#,
                Some(Rpc::Plain),
            ),
            ("amount=10&currency=eur", Some(Rpc::Plain)),
            ("", Some(Rpc::Plain)),
        ];
        for (body, expected) in cases {
            assert_eq!(class(body), expected, "{body}");
        }
    }

    #[test]
    fn the_protected_methods_are_a_setting() {
        let settings = Settings {
            methods: ["tools/call", "orders/create"].map(Box::from).into(),
            ..Settings::default()
        };
        let body = |method: &str| {
            Bytes::from(format!(r#"{{"jsonrpc":"2.0","id":1,"method":"{method}"}}"#))
        };
        assert!(classify(&body("orders/create"), &settings).is_some());
        assert!(classify(&body("tools/call"), &settings).is_some());
        assert!(classify(&body("tools/list"), &settings).is_none());
        let none = Settings {
            methods: Arc::from([]),
            ..Settings::default()
        };
        assert!(classify(&body("tools/call"), &none).is_none());
    }

    #[test]
    fn a_calls_id_and_meta_are_left_out_and_a_batch_keeps_its_ids() {
        let cases = [
            (
                Rpc::Call(None),
                r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"a","_meta":{"progressToken":7,"traceparent":"00-1"},"arguments":{"_meta":1}}}"#,
                r#"{"jsonrpc":"2.0","id":null,"method":"tools/call","params":{"name":"a","arguments":{"_meta":1}}}"#,
            ),
            (
                Rpc::Call(None),
                r#"{"id":"x","params":[1]}"#,
                r#"{"id":null,"params":[1]}"#,
            ),
            (Rpc::Call(None), r#"{"id":{"a":1}}"#, r#"{"id":{"a":1}}"#),
            (Rpc::Call(None), r#"{"method":"m"}"#, r#"{"method":"m"}"#),
            (
                Rpc::Batch,
                r#"[{"id":1,"params":{"_meta":{"progressToken":1}}},{"id":2,"params":{"x":1}}]"#,
                r#"[{"id":1,"params":{}},{"id":2,"params":{"x":1}}]"#,
            ),
            (
                Rpc::Plain,
                r#"{"id":1,"params":{"_meta":1}}"#,
                r#"{"id":1,"params":{"_meta":1}}"#,
            ),
        ];
        for (rpc, input, expected) in cases {
            let mut value: Value = serde_json::from_str(input).unwrap();
            prepare(&mut value, &rpc);
            assert_eq!(
                value,
                serde_json::from_str::<Value>(expected).unwrap(),
                "{input}"
            );
        }
    }
}
