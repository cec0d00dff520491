//! What the client knows about each key once the run is over, and about the outages.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use crate::{
    BoxError,
    client::{Attempt, KeyRun, Kind},
    net::Outcome,
};

/// The outages the script caused: (killed, answering again: Redis's `PING`, `pg_isready`), Unix ms.
pub struct Events {
    pub outages: Vec<(u64, u64)>,
}

impl Events {
    /// Reads the script's event log once it records `outages` restarts (bounded).
    pub async fn wait_for(path: &str, outages: usize, bound: Duration) -> Result<Self, BoxError> {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let (mut kills, mut ups) = (Vec::new(), Vec::new());
            for line in text.lines() {
                match line.split_once(' ') {
                    Some(("kill", ms)) => kills.push(ms.trim().parse::<u64>()?),
                    Some(("up", ms)) => ups.push(ms.trim().parse::<u64>()?),
                    _ => return Err(format!("{path}: unexpected line {line:?}").into()),
                }
            }
            if ups.len() >= outages && kills.len() >= outages {
                return Ok(Self {
                    outages: kills.into_iter().zip(ups).collect(),
                });
            }
            if tokio::time::Instant::now() > deadline {
                return Err(
                    format!("{path}: {outages} restarts not logged within {bound:?}").into(),
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
/// Whether a key violates an invariant.
pub type Violates = fn(&KeyFacts<'_>) -> bool;

/// What the check found for one key.
pub struct KeyFacts<'a> {
    pub run: &'a KeyRun,
    pub executions: &'a [(usize, String)],
    pub stored: bool,
    /// An execution whose request was not answered with a problem.
    pub unexcused: bool,
    /// Distinct 2xx bodies its client received (the check's only if it was a replay).
    pub bodies: usize,
    /// When the request behind its first execution was sent.
    pub first_execution: Option<u64>,
}

impl KeyFacts<'_> {
    pub fn double(&self) -> bool {
        self.stored && self.executions.len() > 1
    }

    pub fn lost(&self) -> bool {
        !self.stored && self.unexcused
    }

    pub fn conflicting(&self) -> bool {
        self.bodies > 1
    }
}

pub fn check_of(run: &KeyRun) -> Option<&Attempt> {
    run.attempts
        .iter()
        .find(|attempt| attempt.kind == Kind::Check)
}

pub fn facts<'a>(
    run: &'a KeyRun,
    executed: &'a HashMap<String, Vec<(usize, String)>>,
) -> KeyFacts<'a> {
    let executions = executed.get(&run.order).map_or(&[][..], Vec::as_slice);
    let stored = matches!(
        check_of(run).map(|check| &check.outcome),
        Some(outcome @ Outcome::Answer { replayed: true, .. }) if outcome.is_success()
    );
    let by_label: HashMap<&str, &Attempt> = run
        .attempts
        .iter()
        .map(|attempt| (attempt.label.as_str(), attempt))
        .collect();
    let unexcused = executions.iter().any(|(_, label)| {
        !matches!(
            by_label.get(label.as_str()).map(|attempt| &attempt.outcome),
            Some(Outcome::Answer {
                problem: Some(_),
                ..
            })
        )
    });
    let bodies: HashSet<&[u8]> = run
        .attempts
        .iter()
        .filter(|attempt| attempt.kind != Kind::Check || stored)
        .filter_map(|attempt| match &attempt.outcome {
            outcome @ Outcome::Answer { body, .. } if outcome.is_success() => Some(&body[..]),
            _ => None,
        })
        .collect();
    let first_execution = executions
        .iter()
        .filter_map(|(_, label)| by_label.get(label.as_str()).map(|attempt| attempt.sent))
        .min();
    KeyFacts {
        run,
        executions,
        stored,
        unexcused,
        bodies: bodies.len(),
        first_execution,
    }
}

/// Whether `ms` falls in an outage, from 1 s before the kill to 1 s after the server answered.
pub fn in_outage(events: &Events, ms: u64) -> bool {
    events
        .outages
        .iter()
        .any(|&(kill, up)| ms + 1000 >= kill && ms <= up + 1000)
}
