//! When things go wrong, and how the layer reports them: the store down, the layer's own
//! problem responses, the route label of metrics and spans, and abandoned claims.

use std::sync::Arc;

use http::request;

use super::IdempotencyLayer;
use crate::{
    layer::config::{FailMode, OnAbandoned, Recovery},
    problem::ProblemResponse,
    store::IdempotencyStore,
};

impl<St: IdempotencyStore> IdempotencyLayer<St> {
    /// What to do when the store is unavailable. Default: [`FailMode::Closed`] (503).
    ///
    /// ```
    /// # use tower_idempotency::{FailMode, IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_fail_mode(FailMode::Open);
    /// ```
    ///
    /// # Warning
    ///
    /// [`FailMode::Open`] runs handlers unprotected while the store is down.
    pub fn with_fail_mode(mut self, mode: FailMode) -> Self {
        self.config().fail_mode = mode;
        self
    }

    /// Renders the layer's own problem responses: a closure over the
    /// [`Problem`](crate::Problem), or a type implementing [`ProblemResponse`] (see its docs for
    /// one). Default: [`Problem::to_response`](crate::Problem::to_response)
    /// (`application/problem+json`).
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore, Problem};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_problem_response(|problem: &Problem| {
    ///     let mut response = http::Response::new(bytes::Bytes::from(problem.detail().to_owned()));
    ///     *response.status_mut() = problem.status();
    ///     response
    /// });
    /// ```
    ///
    /// A closure names its argument's type, `|problem: &Problem|`: the setter takes any
    /// [`ProblemResponse`], so the compiler cannot infer it. Whichever rendering runs, the
    /// response carries the [`Problem`](crate::Problem) and its
    /// [`ProblemKind`](crate::ProblemKind) in its extensions. A gRPC call is answered with a
    /// gRPC status whatever the rendering (see
    /// [`with_grpc_streaming_methods`](Self::with_grpc_streaming_methods)): its client can
    /// read nothing else.
    pub fn with_problem_response<P>(mut self, render: P) -> Self
    where
        P: ProblemResponse + Send + Sync + 'static,
    {
        self.config().render_problem = Some(Arc::new(render));
        self
    }

    /// The `route` label of this layer's metrics and the `route` field of its tracing spans,
    /// to tell apart layers over different routes. Default: `default`.
    ///
    /// A `&'static str`, so that recording costs no allocation, and so that labels stay few:
    /// name a route or a group of routes, never anything per request (a key, a user, a path
    /// with ids in it).
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore};
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_route_label("payments");
    /// ```
    pub fn with_route_label(mut self, label: &'static str) -> Self {
        self.config().observer = crate::observe::Observer::new(label);
        self
    }

    /// What to do when a request finds its key claimed by an earlier request whose owner's
    /// lease ended without completion: the owner crashed mid-request, and whether its work
    /// happened is unknown. Default: [`Recovery::RunAgain`], take the claim over and run the
    /// handler again.
    ///
    /// [`Recovery::OutcomeUnknown`] answers `409`
    /// [`ProblemKind::OutcomeUnknown`](crate::ProblemKind::OutcomeUnknown) instead, until an
    /// operator breaks the claim
    /// ([`AdminStore::break_claim`](crate::AdminStore::break_claim), or the admin router) or
    /// the store drops it.
    ///
    /// Any store will do. Over one that implements only [`IdempotencyStore`] (no operator
    /// tools), such a key answers `409` until the store drops the abandoned claim (the
    /// stores of this crate keep one for a retention period, 24 h by default for
    /// `RedisStore`).
    ///
    /// ```
    /// # use tower_idempotency::{IdempotencyLayer, MemoryStore, Recovery};
    /// // Money moves on /charges: ask the provider before charging again.
    /// let layer = IdempotencyLayer::new(MemoryStore::default()).with_outcome_unknown(|parts: &http::request::Parts| {
    ///     if parts.uri.path().starts_with("/charges") { Recovery::OutcomeUnknown } else { Recovery::RunAgain }
    /// });
    /// ```
    pub fn with_outcome_unknown<F>(mut self, hook: F) -> Self
    where
        F: Fn(&request::Parts) -> Recovery + Send + Sync + 'static,
    {
        self.config().on_abandoned = OnAbandoned::new(Arc::new(hook));
        self
    }
}
