//! A failover under load, for `tests/redis_failover.rs` and the soak example: two layer
//! instances sharing one highly available Redis, a mixed load of fresh keys and retries of
//! them, and an account of what each key saw.
//!
//! Every key is sent until it gets its answer (a 503 or a 409 is retried, as a client would),
//! then once more to the other instance (a retry that must be a replay). The handler counts
//! executions per key and answers with the key and that count, so a second execution, or a
//! replay of another execution, shows in the bodies.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use http::StatusCode;
use tower_idempotency::{IdempotencyLayer, IdempotencyStore};

use super::service::{Handler, Svc, created, keyed_post, send, serve};

/// How each key fared.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Executions per key, counted by the handler.
    pub executions: BTreeMap<String, usize>,
    /// The distinct bodies answered per key with a 2xx (first execution or replay).
    pub bodies: BTreeMap<String, Vec<String>>,
    /// When each 503 was answered, from the start of the load.
    pub unavailable: Vec<Duration>,
    /// When each 409 was answered, from the start of the load.
    pub conflicts: Vec<Duration>,
    /// Other statuses, counted.
    pub other: BTreeMap<u16, usize>,
    /// Keys that got no 2xx before the load ended.
    pub unanswered: Vec<String>,
    /// Keys answered before the failover whose record was gone after it: their check ran the
    /// handler again.
    pub lost_records: Vec<String>,
    /// Requests sent in all.
    pub requests: usize,
}

impl Outcome {
    /// Keys the handler ran more than once.
    pub fn executed_twice(&self) -> Vec<&String> {
        self.executions
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(key, _)| key)
            .collect()
    }

    /// Keys whose answers differ (a replay of another execution than the first answer's).
    pub fn inconsistent(&self) -> Vec<&String> {
        self.bodies
            .iter()
            .filter(|(_, bodies)| bodies.len() > 1)
            .map(|(key, _)| key)
            .collect()
    }
}

/// A handler that counts executions per key and answers `{key} execution #{n}`.
fn per_key_handler(executions: Arc<Mutex<HashMap<String, usize>>>) -> Handler {
    Handler::new(move |request| {
        let key = request
            .headers()
            .get("idempotency-key")
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let n = {
            let mut executions = executions
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let n = executions.entry(key.clone()).or_default();
            *n += 1;
            *n
        };
        async move {
            // Long enough that some requests are in flight when the primary dies.
            tokio::time::sleep(Duration::from_millis(5)).await;
            created(format!("{key} execution #{n}"))
        }
    })
}

/// The load: `concurrency` workers over the two instances until `stop` is set.
pub struct Load<S: IdempotencyStore> {
    instances: [Svc<S>; 2],
    executions: Arc<Mutex<HashMap<String, usize>>>,
    seen: Arc<Mutex<Outcome>>,
    stop: Arc<AtomicBool>,
    started: Instant,
    next: Arc<AtomicUsize>,
    workers: Vec<tokio::task::JoinHandle<()>>,
    answered_at: Arc<Mutex<Vec<(String, Instant)>>>,
}

impl<S: IdempotencyStore + Clone + Send + Sync + 'static> Load<S> {
    /// Starts the load through `layers` (one per instance).
    pub fn start(layers: [IdempotencyLayer<S>; 2], concurrency: usize, prefix: &str) -> Self {
        let executions = Arc::new(Mutex::new(HashMap::new()));
        let handler = per_key_handler(Arc::clone(&executions));
        let instances = [serve(&layers[0], &handler), serve(&layers[1], &handler)];
        let mut load = Self {
            instances,
            executions,
            seen: Arc::default(),
            stop: Arc::default(),
            started: Instant::now(),
            next: Arc::default(),
            workers: Vec::new(),
            answered_at: Arc::default(),
        };
        for worker in 0..concurrency {
            let (instances, seen, stop, next, started, answered_at) = (
                load.instances.clone(),
                Arc::clone(&load.seen),
                Arc::clone(&load.stop),
                Arc::clone(&load.next),
                load.started,
                Arc::clone(&load.answered_at),
            );
            let prefix = prefix.to_owned();
            load.workers.push(tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let key = format!("{prefix}-{}", next.fetch_add(1, Ordering::SeqCst));
                    // The first attempt goes to the worker's instance, each retry to the other.
                    let mut attempt = worker;
                    let mut answers = 0;
                    while answers < 2 {
                        let instance = &instances[attempt % 2];
                        attempt += 1;
                        let reply = send(instance, keyed_post("/charges", &key, "{}")).await;
                        let at = started.elapsed();
                        let answered = {
                            let mut seen = seen
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner);
                            seen.requests += 1;
                            match reply.status {
                                status if status.is_success() => {
                                    let body = String::from_utf8_lossy(&reply.body).into_owned();
                                    let bodies = seen.bodies.entry(key.clone()).or_default();
                                    if !bodies.contains(&body) {
                                        bodies.push(body);
                                    }
                                    true
                                }
                                StatusCode::SERVICE_UNAVAILABLE => {
                                    seen.unavailable.push(at);
                                    false
                                }
                                StatusCode::CONFLICT => {
                                    seen.conflicts.push(at);
                                    false
                                }
                                status => {
                                    *seen.other.entry(status.as_u16()).or_default() += 1;
                                    false
                                }
                            }
                        };
                        if answered {
                            if answers == 0 {
                                answered_at
                                    .lock()
                                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                                    .push((key.clone(), Instant::now()));
                            }
                            answers += 1;
                            continue;
                        }
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    if answers == 0 {
                        seen.lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .unanswered
                            .push(key);
                    }
                }
            }));
        }
        load
    }

    /// Time since the load started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Requests answered so far.
    pub fn requests(&self) -> usize {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .requests
    }

    /// Whether any request was answered with a 2xx since `since`.
    pub fn answered_since(&self, since: Instant) -> bool {
        self.answered_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .any(|(_, at)| *at >= since)
    }

    /// Stops the load, then sends once more every key that was answered before `failover`
    /// (to check that its record survived), and accounts for everything.
    pub async fn finish(mut self, failover: Instant) -> Outcome {
        self.stop.store(true, Ordering::SeqCst);
        for worker in self.workers.drain(..) {
            tokio::time::timeout(Duration::from_secs(30), worker)
                .await
                .expect("a load worker ends within 30 s")
                .expect("a load worker");
        }
        let before: Vec<String> = self
            .answered_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|(_, at)| *at < failover)
            .map(|(key, _)| key.clone())
            .collect();
        let mut lost = Vec::new();
        for key in before {
            let executed = self.executions_of(&key);
            let mut reply = send(&self.instances[1], keyed_post("/charges", &key, "{}")).await;
            // The instance may still be reconnecting: a 503 is retried, briefly.
            for _ in 0..50 {
                if reply.status != StatusCode::SERVICE_UNAVAILABLE {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                reply = send(&self.instances[1], keyed_post("/charges", &key, "{}")).await;
            }
            if self.executions_of(&key) > executed {
                lost.push(key.clone());
            }
            let mut seen = self
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if reply.status.is_success() {
                let body = String::from_utf8_lossy(&reply.body).into_owned();
                let bodies = seen.bodies.entry(key).or_default();
                if !bodies.contains(&body) {
                    bodies.push(body);
                }
            }
        }
        let mut outcome = std::mem::take(
            &mut *self
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        outcome.lost_records = lost;
        outcome.executions = self
            .executions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(key, n)| (key.clone(), *n))
            .collect();
        outcome
    }

    fn executions_of(&self, key: &str) -> usize {
        self.executions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
            .copied()
            .unwrap_or(0)
    }
}
