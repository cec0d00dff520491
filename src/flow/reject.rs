//! The responses the layer makes itself.

use bytes::Bytes;
use http::{HeaderValue, Response, Version, header};

use crate::{
    flow::body::ResponseBody, layer::config::Config, observe::Outcome, problem::Problem,
    protocol::jsonrpc::Rpc,
};

/// The one way the layer answers a request with a problem: every rejection is observed here.
/// A JSON-RPC request (`rpc`) is answered with a JSON-RPC error carrying its `id`.
pub(crate) fn reject<B>(
    config: &Config,
    problem: &Problem,
    rpc: &Rpc,
) -> Response<ResponseBody<B>> {
    if let Some(outcome) = Outcome::of_problem(problem.kind()) {
        config.observer.outcome(outcome);
    }
    config
        .render(problem, rpc)
        .map(|body| ResponseBody::full(body, None))
}

/// Tells the client (and hyper) that this HTTP/1 connection ends with this response. A
/// request of `version` HTTP/2 or later (every gRPC call) is left as it is: `connection` is
/// not allowed there (hyper strips it with a warning), and its unread stream is reset alone.
pub(crate) fn close_connection<B>(mut response: Response<B>, version: Version) -> Response<B> {
    if version <= Version::HTTP_11 {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// The response of work that finished after its client went away: nobody reads it.
pub(crate) fn nobody_listens<B>() -> Response<ResponseBody<B>> {
    Response::new(ResponseBody::full(Bytes::new(), None))
}
