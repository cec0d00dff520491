//! What the soak shows: the invariants, checked key by key, and the table.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use crate::{
    client::{Attempt, KeyRun, Kind, Settings},
    facts::{Events, KeyFacts, Violates, check_of, facts, in_outage},
    net::{Cut, Outcome},
};
pub struct Input<'a> {
    pub settings: &'a Settings,
    pub runs: &'a [KeyRun],
    /// Per order: (instance, attempt label) of each execution before the check.
    pub executed: &'a HashMap<String, Vec<(usize, String)>>,
    pub events: &'a Events,
    pub started_ms: u64,
    pub load_time: Duration,
    /// How long the instances took to finish running executions after the load.
    pub quiet: Duration,
    pub claims_at_end: usize,
    /// How long the claims left in the store's server took to expire (`None`: some never did).
    pub claims_wait: Option<Duration>,
    pub check_time: Duration,
}

/// The failed invariants; tolerated ones are reported but do not fail the run.
pub struct Verdict {
    failures: Vec<String>,
}

impl Verdict {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

fn seconds(ms: u64, since: u64) -> String {
    format!("{:.2} s", (ms as f64 - since as f64) / 1000.0)
}

/// What every section of the report reads.
struct Run<'a> {
    input: &'a Input<'a>,
    names: Vec<&'a str>,
    keys: Vec<KeyFacts<'a>>,
}

impl Run<'_> {
    /// The requests of the load (the final check left out).
    fn load(&self) -> impl Iterator<Item = &Attempt> {
        self.input
            .runs
            .iter()
            .flat_map(|run| &run.attempts)
            .filter(|attempt| attempt.kind != Kind::Check)
    }

    fn keys_with(&self, has: impl Fn(&Attempt) -> bool) -> usize {
        let runs = self.input.runs.iter();
        runs.filter(|run| run.attempts.iter().any(&has)).count()
    }
}

fn row(what: &str, value: String) {
    println!("  {what:<46} {value}");
}

/// Prints the report; the verdict says which invariants failed.
pub fn analyse(input: Input<'_>) -> Verdict {
    let run = Run {
        input: &input,
        names: input
            .settings
            .targets
            .iter()
            .map(|(name, _)| name.as_str())
            .collect(),
        keys: input
            .runs
            .iter()
            .map(|run| facts(run, input.executed))
            .collect(),
    };
    println!();
    println!("== soak report ==");
    load(&run);
    check(&run);
    let mut failures = outages(&run);
    failures.extend(invariants(&run));
    println!(
        "result: {}",
        if failures.is_empty() {
            "PASS".to_owned()
        } else {
            format!("FAIL ({})", failures.join("; "))
        }
    );
    Verdict { failures }
}

/// The keys and requests of the load, by outcome.
fn load(run: &Run<'_>) {
    let Input { settings, runs, .. } = run.input;
    row(
        "load",
        format!(
            "{:.1} s, {} workers, instances {}, seed {}",
            run.input.load_time.as_secs_f64(),
            settings.workers,
            run.names.join(" and "),
            settings.seed
        ),
    );
    let explicit = runs.iter().filter(|run| run.key.is_some()).count();
    row(
        "keys",
        format!(
            "{} ({} Idempotency-Key, {} derived)",
            thousands(runs.len()),
            thousands(explicit),
            thousands(runs.len() - explicit)
        ),
    );
    let duplicated = runs
        .iter()
        .filter(|run| {
            run.attempts
                .iter()
                .filter(|a| a.kind == Kind::First)
                .count()
                > 1
        })
        .count();
    row("  sent to both instances at once", thousands(duplicated));
    row(
        "  with a request cut mid-way",
        thousands(run.keys_with(|a| a.cut.is_some())),
    );
    row(
        "  retried after a failure",
        thousands(run.keys_with(|a| a.kind == Kind::Retry)),
    );
    row("requests during the load", thousands(run.load().count()));
    let mut by_outcome: BTreeMap<String, usize> = BTreeMap::new();
    for attempt in run.load() {
        let label = match (&attempt.outcome, attempt.cut) {
            (Outcome::Cut, Some(Cut::WhileReading)) => "cut while reading the response".to_owned(),
            (Outcome::Cut, _) => "cut after sending the request".to_owned(),
            (outcome, _) => outcome.label(),
        };
        *by_outcome.entry(label).or_default() += 1;
    }
    for (label, count) in &by_outcome {
        row(&format!("  {label}"), thousands(*count));
    }
    let mismatches = run.load().filter(|a| a.kind == Kind::Mismatch);
    let (answered, total) = mismatches.fold((0, 0), |(ok, all), a| {
        (ok + usize::from(a.outcome.is_success()), all + 1)
    });
    row(
        "  reused with another payload: answered 2xx",
        format!("{answered} of {total}"),
    );
}

/// Executions per key and what the final check found.
fn check(run: &Run<'_>) {
    let input = run.input;
    let mut histogram = [0usize; 4];
    for key in &run.keys {
        histogram[key.executions.len().min(3)] += 1;
    }
    row(
        "executions per key (0 / 1 / 2 / 3+)",
        histogram.map(thousands).join(" / "),
    );
    row(
        "executions still running when the load ended",
        format!("finished within {:.1} s", input.quiet.as_secs_f64()),
    );
    let (server, _) = input.settings.records.names();
    row(
        &format!("claims left in {server} when the load ended"),
        match input.claims_wait {
            Some(waited) => format!(
                "{} (all expired {:.1} s later)",
                input.claims_at_end,
                waited.as_secs_f64()
            ),
            None => format!("{} (some never expired)", input.claims_at_end),
        },
    );
    row(
        "final check: each key sent once more",
        format!("{:.1} s", input.check_time.as_secs_f64()),
    );
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for check in input.runs.iter().filter_map(check_of) {
        *outcomes.entry(check.outcome.label()).or_default() += 1;
    }
    for (label, count) in &outcomes {
        row(&format!("  {label}"), thousands(*count));
    }
    let stored = run.keys.iter().filter(|key| key.stored).count();
    row("keys stored (replayed by the check)", thousands(stored));
}

/// Per outage and instance: 503s during it and the recovery time. Returns the failures
/// (an instance that never recovered).
fn outages(run: &Run<'_>) -> Vec<String> {
    let Input {
        events, started_ms, ..
    } = run.input;
    let mut failures = Vec::new();
    // When each instance recovered from each outage (u64::MAX: never).
    let mut recovered: Vec<Vec<u64>> = Vec::new();
    for (i, &(kill, up)) in events.outages.iter().enumerate() {
        row(
            &format!(
                "outage {}: {} SIGKILLed",
                i + 1,
                run.input.settings.records.names().1
            ),
            format!(
                "at {}, answering again at {} (down {:.2} s)",
                seconds(kill, *started_ms),
                seconds(up, *started_ms),
                up.saturating_sub(kill) as f64 / 1000.0
            ),
        );
        let mut per_instance = Vec::new();
        for (target, name) in run.names.iter().enumerate() {
            let first_ok = run
                .load()
                .filter(|a| a.target == target && a.sent >= kill && a.received >= up)
                .filter(|a| matches!(a.outcome, Outcome::Answer { status, .. } if status != 503))
                .map(|a| a.received)
                .min();
            let end = first_ok.unwrap_or(u64::MAX);
            let during = run
                .load()
                .filter(|a| a.target == target && a.received >= kill && a.received <= end)
                .filter(|a| matches!(a.outcome, Outcome::Answer { status: 503, .. }))
                .count();
            let recovery = match first_ok {
                Some(at) => format!("recovered {} ms after the server answered", at - up),
                None => {
                    failures.push(format!(
                        "instance {name} never recovered from outage {}",
                        i + 1
                    ));
                    "NEVER recovered".to_owned()
                }
            };
            row(
                &format!("  instance {name}"),
                format!("{} × 503 during the outage, {recovery}", thousands(during)),
            );
            per_instance.push(end);
        }
        recovered.push(per_instance);
    }
    let outside = run
        .load()
        .filter(|a| matches!(a.outcome, Outcome::Answer { status: 503, .. }))
        .filter(|a| {
            !events
                .outages
                .iter()
                .zip(&recovered)
                .any(|(&(kill, _), ends)| a.received >= kill && a.received <= ends[a.target])
        })
        .count();
    row("503s outside the outages", thousands(outside));
    failures
}

/// The invariants, and a few violating keys explained. Returns the failures.
fn invariants(run: &Run<'_>) -> Vec<String> {
    let Input {
        settings,
        events,
        started_ms,
        ..
    } = run.input;
    println!("invariants:");
    let mut failures = Vec::new();
    let mut examples: Vec<&KeyFacts<'_>> = Vec::new();
    let checks: [(&str, Violates); 3] = [
        ("stored keys executed more than once", |key| key.double()),
        ("responses lost", |key| key.lost()),
        ("keys answered two different 2xx bodies", |key| {
            key.conflicting()
        }),
    ];
    for (name, violates) in checks {
        let violating: Vec<&KeyFacts<'_>> = run.keys.iter().filter(|key| violates(key)).collect();
        let in_outage = violating
            .iter()
            .filter(|key| key.first_execution.is_some_and(|ms| in_outage(events, ms)))
            .count();
        let verdict = if violating.is_empty() {
            "ok".to_owned()
        } else {
            failures.push(format!("{name}: {}", violating.len()));
            "FAIL".to_owned()
        };
        let near = if violating.is_empty() {
            String::new()
        } else {
            format!(" ({in_outage} first executed within 1 s of an outage)")
        };
        row(
            &format!("  {name}"),
            format!("{:<6} {verdict}{near}", thousands(violating.len())),
        );
        examples.extend(violating.iter().take(3));
    }
    let unverified = run
        .input
        .runs
        .iter()
        .filter(|key| !check_of(key).is_some_and(|check| check.outcome.is_success()))
        .count();
    let verdict = if unverified == 0 { "ok" } else { "FAIL" };
    row(
        "  keys the final check got no 2xx for",
        format!("{:<6} {verdict}", thousands(unverified)),
    );
    if unverified > 0 {
        failures.push(format!("{unverified} keys could not be checked"));
    }
    if run.input.claims_wait.is_none() {
        failures.push(format!(
            "claims still held in {} {:?} after the load",
            settings.records.names().0,
            settings.lease + Duration::from_secs(10)
        ));
    }
    if !examples.is_empty() {
        println!("examples (times from the start of the load):");
        for key in examples {
            explain(key, &run.names, *started_ms);
        }
    }
    failures
}

fn explain(key: &KeyFacts<'_>, names: &[&str], started_ms: u64) {
    let run = key.run;
    let executions: Vec<String> = key
        .executions
        .iter()
        .map(|(target, label)| format!("{} by {label}", names[*target]))
        .collect();
    println!(
        "  {} ({}): executed {} [{}], {}",
        run.order,
        if run.key.is_some() {
            "Idempotency-Key"
        } else {
            "derived key"
        },
        key.executions.len(),
        executions.join(", "),
        if key.stored { "stored" } else { "not stored" }
    );
    for attempt in &run.attempts {
        let cut = match attempt.cut {
            None => String::new(),
            Some(Cut::WhileReading) => " (cut while reading)".to_owned(),
            Some(Cut::AfterSend(after)) => format!(" (cut {} ms after sending)", after.as_millis()),
        };
        let detail = match &attempt.outcome {
            Outcome::Failed(error) => format!(": {error}"),
            _ => String::new(),
        };
        println!(
            "    {:>9} → {:>9}  {} {:?}{cut} to {}: {}{detail}",
            seconds(attempt.sent, started_ms),
            seconds(attempt.received, started_ms),
            attempt.label,
            attempt.kind,
            names[attempt.target],
            attempt.outcome.label()
        );
    }
}
