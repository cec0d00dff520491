//! Where each state's answer leads: the decisions of the [flow](super), one method per
//! event.

use std::{future::Future, sync::Arc, task::Context};

use bytes::Bytes;
use http::{Request, Response, request::Parts};
use http_body::Body;
use tokio::time::Instant;
use tower_service::Service;

use super::{Ctx, Held, Keyed, State, Step, StoreOp};
use crate::{
    body::{RequestBody, ResponseBody},
    capture::{self, Settled},
    catch_unwind::{self, CatchUnwind, Panic},
    config::{FailMode, WaitMode},
    error::{BoxError, StoreError},
    key::StorageKey,
    lease::{Lease, Renewal},
    observe::{Describe, Op, Outcome, RecordResult},
    plan::{self, KeyPlan},
    problem::Problem,
    recovery::on_abandoned,
    reject::{close_connection, nobody_listens, reject},
    replay::{Retry, replay},
    store::{Claim, IdempotencyStore},
};

type FlowStep<S, St, ReqB, ResB> = Step<
    <S as Service<Request<RequestBody<ReqB>>>>::Future,
    ReqB,
    St,
    ResB,
    <S as Service<Request<RequestBody<ReqB>>>>::Error,
>;

impl<S, St, ReqB, ResB> Ctx<S, St, ReqB, ResB>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: IdempotencyStore,
    ReqB: Body<Data = Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    /// The body is read: fingerprint it, find its key, claim the key.
    pub(super) fn read(
        &mut self,
        parts: Parts,
        body: Result<Bytes, Problem>,
        plan: KeyPlan,
    ) -> FlowStep<S, St, ReqB, ResB> {
        let config = &self.config;
        let body = match body {
            Ok(body) => body,
            // The rest of the body was not read: the connection cannot carry another request.
            Err(problem) => return Step::Answer(Ok(close_connection(reject(config, &problem)))),
        };
        let fingerprint = config.fingerprint_of(&parts, &body);
        match plan::after_body(config, plan, &parts, &body, &fingerprint) {
            Ok(Some(key)) => {
                config.observer.key(&key.storage);
                Step::Next(self.claim(Keyed {
                    parts,
                    body,
                    key,
                    fingerprint,
                }))
            }
            Ok(None) => Step::Next(State::Ready {
                request: Request::from_parts(parts, RequestBody::full(body)),
                held: None,
            }),
            Err(problem) => self.reject(&problem),
        }
    }

    /// Sends the claim on the key.
    pub(super) fn claim(&self, keyed: Keyed) -> State<S::Future, ReqB, St, ResB, S::Error> {
        let (fingerprint, lease) = (keyed.fingerprint, self.config.lease);
        let claim = self.store_op(Op::Claim, &keyed, move |store, key| async move {
            store.claim(&key, &fingerprint, lease).await
        });
        let sent = Instant::now();
        State::Claim { claim, sent, keyed }
    }

    /// Sends `op` on `keyed`'s key, observed.
    fn store_op<T, F, Fut>(&self, op: Op, keyed: &Keyed, send: F) -> StoreOp<T>
    where
        F: FnOnce(St, StorageKey) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
        Result<T, StoreError>: Describe,
    {
        let observer = self.config.observer.clone();
        let operation = send(self.store.clone(), keyed.key.storage);
        Box::pin(async move { observer.store_op(St::NAME, op, operation).await })
    }

    /// The store answered the claim (or take-over) sent at `sent`.
    pub(super) fn claimed(
        &mut self,
        keyed: Keyed,
        sent: Instant,
        claim: Result<Claim, StoreError>,
    ) -> FlowStep<S, St, ReqB, ResB> {
        let config = Arc::clone(&self.config);
        let observer = &config.observer;
        if self.gone && !matches!(claim, Ok(Claim::Acquired(_))) {
            return Step::Answer(Ok(nobody_listens()));
        }
        match claim {
            Ok(Claim::Acquired(token)) => {
                let Keyed {
                    parts,
                    body,
                    key,
                    fingerprint,
                } = keyed;
                let mut lease =
                    Lease::new(self.store.clone(), key.storage, token, config.lease, sent)
                        .observed(observer.clone());
                if self.gone {
                    // Nobody is left to answer: the handler is not started for nobody.
                    let lease_op = Box::pin(lease.release(RecordResult::ClientGone));
                    let output = Ok(nobody_listens());
                    return Step::Next(State::Finish { lease_op, output });
                }
                let mut request = Request::from_parts(parts, RequestBody::full(body));
                if let Some(client_key) = key.client {
                    request.extensions_mut().insert(client_key);
                }
                lease.prepare_handler(request.extensions_mut());
                let held = Held {
                    lease,
                    renewal: Renewal::default(),
                    fingerprint,
                    ttl: key.ttl,
                };
                Step::Next(State::Ready {
                    request,
                    held: Some(held),
                })
            }
            Ok(Claim::Completed { record, expires_in }) => {
                let retry = Retry {
                    fingerprint: &keyed.fingerprint,
                    body: &keyed.body,
                    expires_in,
                    waited: self.waited,
                };
                match replay(&config, record, &retry) {
                    Ok(response) => Step::Answer(Ok(response)),
                    Err(problem) => self.reject(&problem),
                }
            }
            Ok(Claim::Abandoned { token, fingerprint }) => {
                let held = &fingerprint;
                if let Err(problem) = on_abandoned(&config, &keyed.parts, held, &keyed.fingerprint)
                {
                    return self.reject(&problem);
                }
                let lease = config.lease;
                let claim = self.store_op(Op::TakeOver, &keyed, move |store, key| async move {
                    store.take_over(&key, token, &fingerprint, lease).await
                });
                let sent = Instant::now();
                Step::Next(State::Claim { claim, sent, keyed })
            }
            Ok(Claim::InFlight { fingerprint }) => {
                if fingerprint != keyed.fingerprint {
                    return self.reject(&Problem::key_reused(config.mismatch_status));
                }
                let now = Instant::now();
                let until = match (self.wait_until, config.wait_mode) {
                    (Some(until), _) => Some(until),
                    (None, WaitMode::Wait(bound)) => Some(*self.wait_until.insert(now + bound)),
                    (None, WaitMode::Reject) => None,
                };
                let remaining = until.and_then(|until| until.checked_duration_since(now));
                let Some(remaining) = remaining.filter(|left| !left.is_zero()) else {
                    return self.reject(&Problem::in_flight());
                };
                // Whatever readiness the inner service holds (a concurrency permit, a buffer
                // slot) is not held through the wait.
                self.inner.give_back_readiness();
                self.waited = true;
                if let Some(clock) = &mut self.wait_clock {
                    clock.start();
                }
                let (store, observer, key) =
                    (self.store.clone(), observer.clone(), keyed.key.storage);
                let wait = Box::pin(async move {
                    let wait = store.wait(&key, remaining);
                    observer.store_op(St::NAME, Op::Wait, wait).await
                });
                Step::Next(State::Wait { wait, keyed })
            }
            Err(error) => self.store_failed(error, keyed),
        }
    }

    /// The store failed: 503 when failing closed; when failing open, the handler runs
    /// unprotected.
    pub(super) fn store_failed(
        &mut self,
        error: StoreError,
        keyed: Keyed,
    ) -> FlowStep<S, St, ReqB, ResB> {
        match self.config.fail_mode {
            FailMode::Closed => {
                tracing::warn!(%error, "refusing the request (fail-closed)");
                self.reject(&Problem::store_unavailable())
            }
            FailMode::Open => {
                tracing::warn!(%error, "executing unprotected (fail-open)");
                self.config.observer.outcome(Outcome::FailOpen);
                let request = Request::from_parts(keyed.parts, RequestBody::full(keyed.body));
                Step::Next(State::Ready {
                    request,
                    held: None,
                })
            }
        }
    }

    /// The inner service is ready (or failed to get ready): the handler runs.
    pub(super) fn run(
        &mut self,
        request: Request<RequestBody<ReqB>>,
        held: Option<Held<St>>,
        ready: Result<(), S::Error>,
    ) -> FlowStep<S, St, ReqB, ResB> {
        if let Err(error) = ready {
            return match held {
                Some(held) => Step::Next(State::Finish {
                    lease_op: Box::pin(held.lease.release(RecordResult::HandlerError)),
                    output: Err(error),
                }),
                None => Step::Answer(Err(error)),
            };
        }
        if held.is_some() {
            self.config.observer.outcome(Outcome::Executed);
        }
        // The wait, if any, ends here: its duration is reported.
        self.wait_clock = None;
        // `call` itself may panic before it returns a future (a router, a `service_fn`
        // closure): that costs a 500 and the key too, as a panic while polling does.
        let handler = match catch_unwind::catching(|| self.inner.call(request)) {
            Ok(handler) => CatchUnwind::new(handler),
            Err(panic) => return self.panicked(held, panic),
        };
        Step::Next(State::Run { handler, held })
    }

    /// The handler answered (or panicked): its response is settled.
    pub(super) fn ran(
        &mut self,
        held: Option<Held<St>>,
        ran: Result<Result<Response<ResB>, S::Error>, Panic>,
        cx: &mut Context<'_>,
    ) -> FlowStep<S, St, ReqB, ResB> {
        let ran = match ran {
            Ok(ran) => ran,
            Err(panic) => return self.panicked(held, panic),
        };
        let Some(Held {
            lease,
            fingerprint,
            ttl,
            ..
        }) = held
        else {
            // Unprotected: the answer passes through as it is.
            return Step::Answer(ran.map(|r| r.map(ResponseBody::inner)));
        };
        let config = &self.config;
        let settled = match ran {
            Ok(response) => capture::settle(response, lease, fingerprint, ttl, config, cx),
            Err(error) => {
                let lease_op = Box::pin(lease.release(RecordResult::HandlerError));
                return Step::Next(State::Finish {
                    lease_op,
                    output: Err(error),
                });
            }
        };
        match settled {
            Settled::AfterStore { lease_op, response } => Step::Next(State::Finish {
                lease_op,
                output: Ok(response),
            }),
            Settled::Now(response) => Step::Answer(Ok(response)),
        }
    }

    /// The handler panicked (in `call` or while polled): a 500 and the key released when it
    /// ran protected; resumed when it ran unprotected.
    fn panicked(&self, held: Option<Held<St>>, panic: Panic) -> FlowStep<S, St, ReqB, ResB> {
        let Some(held) = held else {
            std::panic::resume_unwind(panic)
        };
        match capture::panicked(held.lease, &self.config) {
            Settled::AfterStore { lease_op, response } => Step::Next(State::Finish {
                lease_op,
                output: Ok(response),
            }),
            Settled::Now(response) => Step::Answer(Ok(response)),
        }
    }

    /// The record was to commit in the handler's own transaction, which was rolled back:
    /// the key is freed and a 503 answers in place of the handler's response.
    pub(super) fn voided(&self) -> FlowStep<S, St, ReqB, ResB> {
        self.reject(&Problem::store_unavailable())
    }

    /// A problem, answered at once.
    fn reject(&self, problem: &Problem) -> FlowStep<S, St, ReqB, ResB> {
        Step::Answer(Ok(reject(&self.config, problem)))
    }
}
