//! A rotated secret: once a request holds its key's claim under the current secret, the
//! addresses its key had under previous secrets are looked at, so that a request completed,
//! or still in flight, before the rotation is replayed or waited for rather than run again.
//!
//! Each earlier address is looked at with the store's atomic claim (given back at once when
//! free): never a read followed by a write. Requests with the key under the current secret
//! queue behind this request's claim meanwhile, so no two of them can both find the earlier
//! addresses free and run.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use super::{Ctx, LeaseOp, Probing, State, Step, step::FlowStep};
use crate::{
    fingerprint::Fingerprint,
    flow::body::RequestBody,
    flow::lease::{Lease, Renewal},
    flow::plan::Key,
    flow::recovery::on_abandoned,
    flow::reject::{nobody_listens, reject},
    flow::replay::{Retry, replay},
    key::StorageKey,
    observe::{Op, RecordResult},
    problem::Problem,
    store::error::{BoxError, StoreError},
    store::{Claim, IdempotencyStore},
};

/// What an earlier address held: a record, a claim in flight, or an abandoned claim.
pub(crate) struct Found {
    key: StorageKey,
    /// The request's fingerprint under the secret of that address.
    fingerprint: Fingerprint,
    claim: Claim,
}

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
    /// Looks at the key's earlier addresses, newest secret first, holding `lease` (the claim
    /// under the current secret, not yet observed: what becomes of it is reported only if
    /// the handler runs under it).
    pub(super) fn probe(&self, key: Key, lease: Lease<St>) -> State<ReqB, St, ResB, S::Error> {
        let config = &self.config;
        let client = key.client.as_ref().map(|client| (client, key.delivery));
        let earlier = config.previous_addresses(&self.head, &self.body, client, &self.rpc);
        let (store, observer, lease_for) =
            (self.store.clone(), config.observer.clone(), config.lease);
        let probe = Box::pin(async move {
            let mut abandoned = None;
            for (key, fingerprint) in earlier {
                let claim = store.claim(&key, &fingerprint, lease_for);
                match observer.store_op(St::NAME, Op::Claim, claim).await? {
                    Claim::Acquired(token) => {
                        // Free: nothing was kept under that secret. A release that fails
                        // leaves the claim to its lease; requests under the current secret
                        // never wait on it (they wait on this request's claim).
                        let release = store.release(&key, token);
                        let _ = observer.store_op(St::NAME, Op::Release, release).await;
                    }
                    claim @ Claim::Abandoned { .. } => {
                        abandoned.get_or_insert(Found {
                            key,
                            fingerprint,
                            claim,
                        });
                    }
                    claim => {
                        return Ok(Some(Found {
                            key,
                            fingerprint,
                            claim,
                        }));
                    }
                }
            }
            Ok(abandoned)
        });
        let probing = Box::new(Probing {
            key,
            lease,
            renewal: Renewal::default(),
        });
        State::Probe { probe, probing }
    }

    /// The earlier addresses are looked at: run under `lease` if none holds anything live;
    /// otherwise give the claim back and replay, wait, or refuse.
    pub(super) fn probed(
        &mut self,
        key: Key,
        lease: Lease<St>,
        found: Result<Option<Found>, StoreError>,
    ) -> FlowStep<S, St, ReqB, ResB> {
        let config = Arc::clone(&self.config);
        if self.gone {
            // Nobody is left to answer: nothing is replayed, waited for or run for nobody.
            return self.give_back(lease, Ok(nobody_listens()));
        }
        let found = match found {
            Ok(None) => return self.hold(key, lease.observed(config.observer.clone())),
            Ok(Some(found)) => found,
            Err(error) => {
                // Dropped, the lease gives the key back in the background.
                drop(lease);
                return self.store_failed(error);
            }
        };
        let Found {
            key: on,
            fingerprint,
            claim,
        } = found;
        match claim {
            Claim::Completed { record, expires_in } => {
                let retry = Retry {
                    fingerprint: &fingerprint,
                    rpc: &self.rpc,
                    expires_in,
                    waited: self.waited,
                };
                let answer = match replay(&config, record, &retry) {
                    Ok(response) => response,
                    Err(problem) => reject(&config, &problem, &self.rpc),
                };
                self.give_back(lease, Ok(answer))
            }
            Claim::InFlight { fingerprint: held } => {
                if held != fingerprint {
                    let problem = Problem::key_reused(config.mismatch_status);
                    return self.give_back(lease, Ok(reject(&config, &problem, &self.rpc)));
                }
                self.wait_on(key, on, Some(release(lease)))
            }
            Claim::Abandoned {
                fingerprint: held, ..
            } => match on_abandoned(&config, &self.head, &held, &fingerprint) {
                // Its owner's work is not known to have happened: run under the current
                // claim; the abandoned one expires by itself.
                Ok(()) => self.hold(key, lease.observed(config.observer.clone())),
                Err(problem) => self.give_back(lease, Ok(reject(&config, &problem, &self.rpc))),
            },
            // Never found: a free address is given back in the probe itself.
            Claim::Acquired(_) => self.hold(key, lease.observed(config.observer.clone())),
        }
    }

    /// Gives the claim back (nothing reported: the lease is not observed), then answers.
    fn give_back(
        &self,
        lease: Lease<St>,
        output: super::Output<ResB, S::Error>,
    ) -> FlowStep<S, St, ReqB, ResB> {
        Step::Next(State::Finish {
            lease_op: release(lease),
            output,
        })
    }
}

/// The claim given back; the reason is not reported (the lease is not observed).
fn release<St: IdempotencyStore>(lease: Lease<St>) -> LeaseOp {
    Box::pin(lease.release(RecordResult::ClientGone))
}
