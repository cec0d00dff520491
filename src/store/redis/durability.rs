//! [`Durability`]: how many copies of a claim or a completion Redis confirms before the store
//! reports it, and judging what `WAIT` and `WAITAOF` answered.
//!
//! Pure: the commands to send after a write, the verdict on their replies, and the breaker
//! that stops asking replicas that just fell short ([`Replicas`]). Sending them, in the same
//! pipeline as the write, is `acknowledge.rs`'s job.

use std::{
    fmt,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use ::redis::{Cmd, Value};

/// The default bound on waiting for the acknowledgements: 500 ms.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_millis(500);

/// What [`RedisStore`](crate::RedisStore) waits for after it writes a claim or a completion,
/// in the same round trip (a pipeline): `n` replicas having received it (`WAIT n timeout`)
/// and, with [`with_local_fsync`](Self::with_local_fsync), the primary having written it to
/// its append-only file (`WAITAOF 1 0 timeout`, Redis 7.2 or newer with `appendonly yes`).
///
/// Redis replicates asynchronously: without this, a failover can lose the last claims (a
/// duplicate then runs beside the request in flight) and the last records (a retry runs
/// again). With it:
///
/// - a **claim** that fewer replicas acknowledged in time is refused: the store reports it
///   [`Unavailable`](crate::StoreErrorKind::Unavailable) (the layer answers 503 with
///   `Retry-After`, or runs unprotected if it fails open) and the claim, which the primary
///   does hold, is released. Nothing ran, so nothing is lost by refusing.
/// - a **completion** that fewer replicas acknowledged is kept and reported stored: the
///   handler has run and its response is delivered; taking the record back would let a retry
///   run it again, the very thing a failover was feared for. It is counted
///   (`idempotency_store_acknowledgement_shortfalls_total{store="redis",op="complete"}` with
///   the `metrics` feature) and logged as a warning.
///
/// While the replicas fall short (a `WAIT` came back short), the store stops asking them
/// for a moment: one claim per timeout asks again, the other writes are sent alone and
/// judged unacknowledged (a claim that takes its key is refused, a completion kept, a claim
/// that finds a record replays it). Redis runs a connection's commands in order and a `WAIT`
/// holds those behind it, so this keeps a replica outage to refused claims rather than a
/// connection held up by one timeout after another.
///
/// Releases and renewals are not waited for: a lost release leaves the claim to end with its
/// lease, and a lost renewal shortens a lease that is renewed long before it ends.
///
/// Keep the layer's lease ([`with_lease`](crate::IdempotencyLayer::with_lease)) at least one
/// and a half times a failover and a completion's retry: a completion cut off by the
/// failover is retried onto the promoted replica only while its claim's lease lasts, and the
/// lease runs from the claim or its last renewal (one every third of the lease), so two
/// thirds of it must outlast the time from the primary's loss until the store writes on the
/// promoted replica, plus the longest pause between retries (1 s) and one attempt's bound
/// (the response timeout and this timeout). A completion that runs out of lease leaves its
/// claim to be found abandoned, and (by default) run again. The default 30 s lease, with the
/// default timeouts (1 s and 500 ms), covers failovers of up to 17.5 s.
///
/// Default: [`Durability::none`], one write and no waiting.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::redis::Durability;
///
/// let durability = Durability::replicas(1).with_timeout(Duration::from_millis(200));
/// assert_eq!(durability.replica_count(), 1);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Durability {
    replicas: u32,
    local_fsync: bool,
    timeout: Duration,
}

impl Default for Durability {
    fn default() -> Self {
        Self::none()
    }
}

impl Durability {
    /// No waiting: a write is reported as soon as the primary has it (the default).
    ///
    /// ```
    /// assert_eq!(tower_idempotency::redis::Durability::none().replica_count(), 0);
    /// ```
    pub const fn none() -> Self {
        Self {
            replicas: 0,
            local_fsync: false,
            timeout: DEFAULT_ACK_TIMEOUT,
        }
    }

    /// Wait until `replicas` replicas have a claim or a completion (`WAIT replicas timeout`).
    /// Zero waits for none.
    ///
    /// ```
    /// assert_eq!(tower_idempotency::redis::Durability::replicas(2).replica_count(), 2);
    /// ```
    pub const fn replicas(replicas: u32) -> Self {
        Self {
            replicas,
            ..Self::none()
        }
    }

    /// Also wait until the primary has written the claim or the completion to its
    /// append-only file (`WAITAOF 1 0 timeout`). Needs Redis 7.2 or newer with
    /// `appendonly yes`: elsewhere every claim fails. Default: off.
    ///
    /// ```
    /// let durability = tower_idempotency::redis::Durability::replicas(1).with_local_fsync();
    /// assert!(durability.local_fsync());
    /// ```
    pub const fn with_local_fsync(self) -> Self {
        Self {
            local_fsync: true,
            ..self
        }
    }

    /// How long each of `WAIT` and `WAITAOF` may block. Default: 500 ms
    /// ([`DEFAULT_ACK_TIMEOUT`]). A write that waits is bounded by the store's response
    /// timeout plus this, once for each of the two commands sent (twice for a script the
    /// server did not know yet: it is sent again with its code).
    ///
    /// ```
    /// # use std::time::Duration;
    /// let durability = tower_idempotency::redis::Durability::replicas(1)
    ///     .with_timeout(Duration::from_millis(100));
    /// assert_eq!(durability.timeout(), Duration::from_millis(100));
    /// ```
    ///
    /// # Panics
    ///
    /// If `timeout` is zero: Redis reads `WAIT n 0` as "wait for ever".
    pub const fn with_timeout(self, timeout: Duration) -> Self {
        assert!(
            !timeout.is_zero(),
            "Durability::with_timeout: the timeout must be more than zero (0 means for ever to Redis)"
        );
        Self { timeout, ..self }
    }

    /// How many replicas must acknowledge a write.
    pub const fn replica_count(&self) -> u32 {
        self.replicas
    }

    /// Whether the primary must have written it to its append-only file.
    pub const fn local_fsync(&self) -> bool {
        self.local_fsync
    }

    /// How long each acknowledgement command may block.
    pub const fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether anything is waited for.
    pub(super) fn waits(&self) -> bool {
        self.replicas > 0 || self.local_fsync
    }

    /// The commands that follow a write in its pipeline, in order.
    pub(super) fn commands(&self) -> Vec<Cmd> {
        // At least 1: Redis reads 0 as "for ever".
        let millis = self.timeout.as_millis().clamp(1, u128::from(u32::MAX));
        let mut commands = Vec::with_capacity(2);
        if self.replicas > 0 {
            let mut wait = Cmd::new();
            wait.arg("WAIT").arg(self.replicas).arg(millis.to_string());
            commands.push(wait);
        }
        if self.local_fsync {
            let mut waitaof = Cmd::new();
            waitaof.arg("WAITAOF").arg(1).arg(0).arg(millis.to_string());
            commands.push(waitaof);
        }
        commands
    }

    /// How much of the store's bound on one exchange the acknowledgements may add.
    pub(super) fn extra_time(&self) -> Duration {
        let commands = u32::from(self.replicas > 0) + u32::from(self.local_fsync);
        self.timeout.saturating_mul(commands)
    }

    /// The verdict on the replies to [`commands`](Self::commands), in the same order.
    pub(super) fn judge(&self, replies: &[Value]) -> Result<(), Shortfall> {
        let mut replies = replies.iter();
        if self.replicas > 0 {
            match replies.next() {
                Some(Value::Int(acked)) if *acked >= i64::from(self.replicas) => {}
                Some(Value::Int(acked)) => {
                    return Err(Shortfall::Replicas {
                        acked: *acked,
                        wanted: self.replicas,
                    });
                }
                other => return Err(Shortfall::refused("WAIT", other)),
            }
        }
        if self.local_fsync {
            match replies.next() {
                Some(Value::Array(counts)) => match counts.first() {
                    Some(Value::Int(local)) if *local >= 1 => {}
                    Some(Value::Int(_)) => return Err(Shortfall::LocalFsync),
                    _ => return Err(Shortfall::refused("WAITAOF", None)),
                },
                other => return Err(Shortfall::refused("WAITAOF", other)),
            }
        }
        Ok(())
    }
}

/// Which write is about to be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Write {
    Claim,
    Completion,
}

/// What to do with a write, given how the replicas fared lately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Gate {
    /// Send it with its acknowledgement commands.
    Wait,
    /// Send it alone, judged unacknowledged: while the replicas are short, a claim that takes
    /// its key is refused (and released), and a completion is kept (as it would be anyway);
    /// a claim that finds a record still replays it.
    Unasked,
}

/// Whether the replicas fell short lately: a breaker, so that while they cannot acknowledge
/// (a failover, a replica down) the connection is not held up by one `WAIT` timeout after
/// another (Redis runs a connection's commands in order, and a `WAIT` holds those behind
/// it). While they are short, one claim per timeout asks them again (the probe); the other
/// writes are sent without asking ([`Gate::Unasked`]).
#[derive(Debug, Default)]
pub(super) struct Replicas {
    /// When the last probe was let through, while the replicas are short.
    short: Mutex<Option<Instant>>,
}

impl Replicas {
    /// What to do with `write` at `now`, waiting at most `timeout` for acknowledgements.
    pub(super) fn gate(&self, write: Write, now: Instant, timeout: Duration) -> Gate {
        let mut short = self.short.lock().unwrap_or_else(PoisonError::into_inner);
        match (*short, write) {
            (None, _) => Gate::Wait,
            (Some(_), Write::Completion) => Gate::Unasked,
            (Some(probed), Write::Claim) if now.saturating_duration_since(probed) >= timeout => {
                *short = Some(now);
                Gate::Wait
            }
            (Some(_), Write::Claim) => Gate::Unasked,
        }
    }

    /// Records what a write's acknowledgement said at `now`.
    pub(super) fn record(&self, acknowledged: bool, now: Instant) {
        let mut short = self.short.lock().unwrap_or_else(PoisonError::into_inner);
        match (acknowledged, *short) {
            (true, _) => *short = None,
            (false, None) => *short = Some(now),
            (false, Some(_)) => {}
        }
    }
}

/// A write that was not acknowledged as its [`Durability`] asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Shortfall {
    /// Fewer replicas than asked had it when `WAIT` timed out.
    Replicas { acked: i64, wanted: u32 },
    /// The primary had not written it to its append-only file when `WAITAOF` timed out.
    LocalFsync,
    /// The acknowledgement command failed or answered something else.
    Refused {
        command: &'static str,
        detail: String,
    },
    /// The replicas fell short a moment ago: not asked again until the timeout has passed.
    Lagging,
}

impl Shortfall {
    fn refused(command: &'static str, reply: Option<&Value>) -> Self {
        let detail = match reply {
            Some(Value::ServerError(error)) => error.details().unwrap_or("").to_owned(),
            Some(_) => "unexpected reply".to_owned(),
            None => "no reply".to_owned(),
        };
        Self::Refused { command, detail }
    }
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Replicas { acked, wanted } => write!(
                f,
                "{acked} of the {wanted} replicas required acknowledged the write in time"
            ),
            Self::LocalFsync => f.write_str("redis did not fsync the write to its AOF in time"),
            Self::Refused { command, detail } => write!(
                f,
                "redis refused {command} ({detail}); WAITAOF needs Redis 7.2 and appendonly yes"
            ),
            Self::Lagging => f.write_str(
                "the replicas did not acknowledge a write a moment ago: not asked again yet",
            ),
        }
    }
}

impl std::error::Error for Shortfall {}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(command: &Cmd) -> Vec<String> {
        command
            .args_iter()
            .map(|arg| match arg {
                ::redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                _ => "cursor".to_owned(),
            })
            .collect()
    }

    #[test]
    fn the_commands_follow_the_setting() {
        let ms = Duration::from_millis;
        let cases: [(Durability, Vec<Vec<&str>>, Duration); 5] = [
            (Durability::none(), vec![], Duration::ZERO),
            (Durability::replicas(0), vec![], Duration::ZERO),
            (
                Durability::replicas(2),
                vec![vec!["WAIT", "2", "500"]],
                ms(500),
            ),
            (
                Durability::replicas(1)
                    .with_local_fsync()
                    .with_timeout(ms(20)),
                vec![vec!["WAIT", "1", "20"], vec!["WAITAOF", "1", "0", "20"]],
                ms(40),
            ),
            (
                Durability::none()
                    .with_local_fsync()
                    .with_timeout(Duration::from_micros(10)),
                vec![vec!["WAITAOF", "1", "0", "1"]],
                Duration::from_micros(10),
            ),
        ];
        for (durability, expected, extra) in cases {
            let commands: Vec<Vec<String>> = durability.commands().iter().map(args).collect();
            assert_eq!(commands, expected, "{durability:?}");
            assert_eq!(durability.waits(), !expected.is_empty(), "{durability:?}");
            assert_eq!(durability.extra_time(), extra, "{durability:?}");
        }
    }

    #[test]
    fn replies_are_judged_against_what_was_asked() {
        let error = ::redis::parse_redis_value(
            b"-ERR WAITAOF cannot be used when numlocal is set but appendonly is disabled.\r\n",
        )
        .expect("a RESP error");
        assert!(matches!(error, Value::ServerError(_)), "{error:?}");
        let counts = |local, replicas| Value::Array(vec![Value::Int(local), Value::Int(replicas)]);
        let both = Durability::replicas(2).with_local_fsync();
        let fsync = Durability::none().with_local_fsync();
        let cases: Vec<(Durability, Vec<Value>, Result<(), Shortfall>)> = vec![
            (Durability::none(), vec![], Ok(())),
            (Durability::replicas(1), vec![Value::Int(1)], Ok(())),
            (Durability::replicas(1), vec![Value::Int(3)], Ok(())),
            (
                Durability::replicas(2),
                vec![Value::Int(1)],
                Err(Shortfall::Replicas {
                    acked: 1,
                    wanted: 2,
                }),
            ),
            (both, vec![Value::Int(2), counts(1, 0)], Ok(())),
            (
                both,
                vec![Value::Int(2), counts(0, 0)],
                Err(Shortfall::LocalFsync),
            ),
            (
                both,
                vec![Value::Int(0), counts(1, 0)],
                Err(Shortfall::Replicas {
                    acked: 0,
                    wanted: 2,
                }),
            ),
            (
                fsync,
                vec![error.clone()],
                Err(Shortfall::Refused {
                    command: "WAITAOF",
                    detail:
                        "WAITAOF cannot be used when numlocal is set but appendonly is disabled."
                            .to_owned(),
                }),
            ),
            (
                Durability::replicas(1),
                vec![Value::Nil],
                Err(Shortfall::Refused {
                    command: "WAIT",
                    detail: "unexpected reply".to_owned(),
                }),
            ),
            (
                Durability::replicas(1),
                vec![],
                Err(Shortfall::Refused {
                    command: "WAIT",
                    detail: "no reply".to_owned(),
                }),
            ),
            (
                fsync,
                vec![Value::Array(vec![])],
                Err(Shortfall::Refused {
                    command: "WAITAOF",
                    detail: "no reply".to_owned(),
                }),
            ),
        ];
        for (durability, replies, expected) in cases {
            assert_eq!(
                durability.judge(&replies),
                expected,
                "{durability:?} {replies:?}"
            );
        }
    }

    #[test]
    fn while_the_replicas_are_short_one_claim_per_timeout_asks_them_again() {
        let replicas = Replicas::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let timeout = ms(100);
        // (write, at, acknowledged if sent, expected)
        let steps = [
            (Write::Claim, ms(0), Some(true), Gate::Wait),
            (Write::Completion, ms(1), Some(false), Gate::Wait),
            (Write::Claim, ms(2), None, Gate::Unasked),
            (Write::Completion, ms(3), None, Gate::Unasked),
            (Write::Claim, ms(100), None, Gate::Unasked),
            (Write::Claim, ms(101), Some(false), Gate::Wait),
            (Write::Claim, ms(150), None, Gate::Unasked),
            (Write::Claim, ms(201), Some(true), Gate::Wait),
            (Write::Claim, ms(202), Some(true), Gate::Wait),
            (Write::Completion, ms(203), Some(true), Gate::Wait),
        ];
        for (n, (write, at, acknowledged, expected)) in steps.into_iter().enumerate() {
            let now = t0 + at;
            assert_eq!(replicas.gate(write, now, timeout), expected, "step {n}");
            if let Some(acknowledged) = acknowledged {
                replicas.record(acknowledged, now);
            }
        }
    }

    #[test]
    #[should_panic(expected = "more than zero")]
    fn a_zero_timeout_is_refused() {
        let _ = Durability::replicas(1).with_timeout(Duration::ZERO);
    }
}
