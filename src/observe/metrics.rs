//! The metric handles of one layer (feature `metrics`), built on first use with
//! `&'static str` labels, so that recording allocates nothing.
//!
//! Built lazily rather than with the layer: a handle is bound to the recorder installed when
//! it is made, and applications often build their router before installing one.

use std::{sync::OnceLock, time::Duration};

use metrics::{Counter, Histogram, counter, histogram};

use super::{AbandonedAction, Op, Outcome, RecordResult, Renewal};

pub(super) struct Handles {
    route: &'static str,
    route_handles: OnceLock<RouteHandles>,
    store_handles: OnceLock<StoreHandles>,
}

struct RouteHandles {
    outcomes: Vec<Counter>,
    records: Vec<Counter>,
    renewals: Vec<Counter>,
    lost_running: Counter,
    lost_completing: Counter,
    abandoned: Vec<Counter>,
    wait: Histogram,
}

struct StoreHandles {
    ops: Vec<Histogram>,
}

impl Handles {
    pub(super) fn new(route: &'static str) -> Self {
        Self {
            route,
            route_handles: OnceLock::new(),
            store_handles: OnceLock::new(),
        }
    }

    fn route(&self) -> &RouteHandles {
        self.route_handles.get_or_init(|| {
            let route = self.route;
            RouteHandles {
                outcomes: Outcome::ALL
                    .iter()
                    .map(|o| {
                        counter!("idempotency_requests_total", "route" => route, "outcome" => o.as_str())
                    })
                    .collect(),
                records: RecordResult::ALL
                    .iter()
                    .map(|r| {
                        counter!("idempotency_records_total", "route" => route, "result" => r.as_str())
                    })
                    .collect(),
                renewals: Renewal::ALL
                    .iter()
                    .map(|r| {
                        counter!("idempotency_lease_renewals_total", "route" => route, "result" => r.as_str())
                    })
                    .collect(),
                lost_running: counter!("idempotency_leases_lost_total", "route" => route, "stage" => "running"),
                lost_completing: counter!("idempotency_leases_lost_total", "route" => route, "stage" => "completing"),
                abandoned: AbandonedAction::ALL
                    .iter()
                    .map(|a| {
                        counter!("idempotency_abandoned_claims_total", "route" => route, "action" => a.as_str())
                    })
                    .collect(),
                wait: histogram!("idempotency_wait_duration_seconds", "route" => route),
            }
        })
    }

    pub(super) fn outcome(&self, outcome: Outcome) {
        let index = Outcome::ALL.iter().position(|o| *o == outcome);
        if let Some(counter) = index.and_then(|i| self.route().outcomes.get(i)) {
            counter.increment(1);
        }
    }

    pub(super) fn record(&self, result: RecordResult) {
        let index = RecordResult::ALL.iter().position(|r| *r == result);
        if let Some(counter) = index.and_then(|i| self.route().records.get(i)) {
            counter.increment(1);
        }
    }

    pub(super) fn renewal(&self, renewal: Renewal) {
        let index = Renewal::ALL.iter().position(|r| *r == renewal);
        if let Some(counter) = index.and_then(|i| self.route().renewals.get(i)) {
            counter.increment(1);
        }
    }

    pub(super) fn lease_lost(&self, completing: bool) {
        let handles = self.route();
        if completing {
            handles.lost_completing.increment(1);
        } else {
            handles.lost_running.increment(1);
        }
    }

    pub(super) fn abandoned(&self, action: AbandonedAction) {
        let index = AbandonedAction::ALL.iter().position(|a| *a == action);
        if let Some(counter) = index.and_then(|i| self.route().abandoned.get(i)) {
            counter.increment(1);
        }
    }

    pub(super) fn waited(&self, duration: Duration) {
        self.route().wait.record(duration.as_secs_f64());
    }

    pub(super) fn store_op(&self, store: &'static str, op: Op, elapsed: Duration) {
        // One layer serves one store type: the first name seen is the only one.
        let handles = self.store_handles.get_or_init(|| {
            let route = self.route;
            StoreHandles {
                ops: Op::ALL
                    .iter()
                    .map(|op| {
                        histogram!(
                            "idempotency_store_duration_seconds",
                            "route" => route,
                            "store" => store,
                            "op" => op.as_str()
                        )
                    })
                    .collect(),
            }
        });
        let index = Op::ALL.iter().position(|o| *o == op);
        if let Some(histogram) = index.and_then(|i| handles.ops.get(i)) {
            histogram.record(elapsed.as_secs_f64());
        }
    }
}
