//! Writes that wait for their acknowledgement: a claim or a completion followed, in the same
//! pipeline (one round trip), by the `WAIT`/`WAITAOF` of the store's [`Durability`], and what
//! the store does when fewer copies were confirmed than asked.
//!
//! On a Redis Cluster the pipeline goes to the node that owns the key (`WAIT` and `WAITAOF`
//! name no key), so the acknowledgement is that of the write's own shard.

use std::time::Instant;

use ::redis::{Cmd, ErrorKind, Pipeline, RedisError, ServerErrorKind, Value, aio::ConnectionLike};

use super::{
    connect::RedisStore,
    durability::{Durability, Gate, Shortfall, Write},
    error::store_error,
    script::Script,
};
use crate::{
    key::StorageKey,
    store::error::StoreError,
    store::{Claim, FenceToken},
};

/// A write's reply, and whether it was acknowledged as the store's durability asks.
pub(super) type Acknowledged = (Value, Result<(), Shortfall>);

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn durability(&self) -> &Durability {
        &self.shared.settings.durability
    }

    /// Whether to send `write` with its acknowledgement commands (not while the replicas
    /// are short, but for one probing claim per timeout).
    fn asks(&self, write: Write) -> bool {
        self.durability().waits()
            && self
                .shared
                .replicas
                .gate(write, Instant::now(), self.durability().timeout())
                == Gate::Wait
    }

    /// The verdict on a write sent without its acknowledgement.
    fn unasked(&self) -> Result<(), Shortfall> {
        if self.durability().waits() {
            Err(Shortfall::Lagging)
        } else {
            Ok(())
        }
    }

    /// Sends `command` (a claim of `key` by `token`), followed by the acknowledgement
    /// commands if the store waits for any, in one round trip. `error` turns the command's
    /// own error into a [`StoreError`].
    pub(super) async fn send_acknowledged(
        &self,
        key: &StorageKey,
        token: FenceToken,
        command: &Cmd,
        error: fn(RedisError) -> StoreError,
    ) -> Result<Acknowledged, StoreError> {
        if !self.asks(Write::Claim) {
            let mut connection = self.connection.clone();
            let reply = self
                .bounded(command.query_async::<Value>(&mut connection), error)
                .await?;
            return Ok((reply, self.unasked()));
        }
        // Boxed, as in `run_acknowledged`.
        Box::pin(self.send_on_lane(key, token, command, error)).await
    }

    /// [`send_acknowledged`](Self::send_acknowledged) on a lane, with the acknowledgement
    /// commands.
    async fn send_on_lane(
        &self,
        key: &StorageKey,
        token: FenceToken,
        command: &Cmd,
        error: fn(RedisError) -> StoreError,
    ) -> Result<Acknowledged, StoreError> {
        let lane = self.lane();
        let mut connection = lane.clone();
        let exchange = self.pipelined(&mut connection, command);
        let replies = self
            .bounded_longer(self.durability().extra_time(), exchange, store_error)
            .await
            .inspect_err(|_| self.unanswered(Write::Claim, key, token, lane))?;
        self.split(replies, error)
    }

    /// Runs `script` on `key` as [`run`](Self::run) does (`EVAL` if the server does not
    /// know it), followed by the acknowledgement commands if the store waits for any, in one
    /// round trip once the server knows the script. `token` is the claim's or completion's.
    pub(super) async fn run_acknowledged(
        &self,
        write: Write,
        token: FenceToken,
        script: &Script,
        key: &StorageKey,
        args: &[&[u8]],
    ) -> Result<Acknowledged, StoreError> {
        if !self.asks(write) {
            return Ok((self.run(script, key, args).await?, self.unasked()));
        }
        // Boxed: the path of a store that waits for replicas would otherwise widen every
        // write's future, which the layer moves and holds.
        Box::pin(self.run_on_lane(write, token, script, key, args)).await
    }

    /// [`run_acknowledged`](Self::run_acknowledged) on a lane, with the acknowledgement
    /// commands.
    async fn run_on_lane(
        &self,
        write: Write,
        token: FenceToken,
        script: &Script,
        key: &StorageKey,
        args: &[&[u8]],
    ) -> Result<Acknowledged, StoreError> {
        let lane = self.lane();
        let mut connection = lane.clone();
        let exchange = async {
            // The key spelled in a statement of its own, not held across the round trip.
            let evalsha = script.evalsha(self.key_bytes(key).as_bytes(), args);
            let replies = self.pipelined(&mut connection, &evalsha).await?;
            match replies.first() {
                // The script ran nowhere: run it with its code, which also caches it.
                Some(Value::ServerError(error))
                    if error.kind() == Some(ServerErrorKind::NoScript) =>
                {
                    let eval = script.eval(self.key_bytes(key).as_bytes(), args);
                    self.pipelined(&mut connection, &eval).await
                }
                _ => Ok(replies),
            }
        };
        // Twice: a server that did not know the script has waited for the first pipeline's
        // acknowledgement too.
        let extra = self.durability().extra_time().saturating_mul(2);
        let replies = self
            .bounded_longer(extra, exchange, store_error)
            .await
            .inspect_err(|_| self.unanswered(write, key, token, lane))?;
        self.split(replies, store_error)
    }

    /// After a claim got no reply (in time), remembers its `lane` for its release: the claim
    /// may still be queued there behind other writes' `WAIT`s, and a release sent on another
    /// connection could run before it, find nothing, and leave the late claim holding its
    /// key for a whole lease.
    fn unanswered(&self, write: Write, key: &StorageKey, token: FenceToken, lane: C) {
        if write == Write::Claim {
            self.lanes.remember_unanswered(key, token, lane);
        }
    }

    /// The connection for a write sent with its acknowledgement commands: one of the
    /// store's lanes (`lanes.rs`), so that its `WAIT` holds up no replay, release or renewal
    /// (acknowledged writes sharing a lane still queue behind each other's `WAIT`). The
    /// store's own connection while the lanes are being opened, in the background.
    fn lane(&self) -> C {
        self.lanes
            .pick(&self.connection, self.shared.settings.response_timeout)
    }

    /// `command` and the acknowledgement commands, as one pipeline whose replies include
    /// the commands' errors (the write's own error is not the acknowledgement's).
    async fn pipelined(&self, connection: &mut C, command: &Cmd) -> Result<Vec<Value>, RedisError> {
        let mut pipeline = Pipeline::with_capacity(3);
        pipeline.ignore_errors().add_command(command.clone());
        for acknowledgement in self.durability().commands() {
            pipeline.add_command(acknowledgement);
        }
        pipeline.query_async::<Vec<Value>>(connection).await
    }

    fn split(
        &self,
        replies: Vec<Value>,
        error: fn(RedisError) -> StoreError,
    ) -> Result<Acknowledged, StoreError> {
        let mut replies = replies.into_iter();
        let reply = match replies.next().map(Value::extract_error) {
            Some(Ok(reply)) => reply,
            Some(Err(refused)) => return Err(error(refused)),
            None => {
                return Err(error(RedisError::from((
                    ErrorKind::UnexpectedReturnType,
                    "no reply to a pipelined write",
                ))));
            }
        };
        let acknowledgements: Vec<Value> = replies.collect();
        let verdict = self.durability().judge(&acknowledgements);
        self.shared.replicas.record(verdict.is_ok(), Instant::now());
        Ok((reply, verdict))
    }

    /// A claim that took the key, if it was acknowledged. Otherwise it is refused as
    /// [`Unavailable`](crate::StoreErrorKind::Unavailable), which also releases it (the
    /// primary holds it: its token is ours), and counted.
    pub(super) fn acquired_if_acknowledged(
        &self,
        verdict: Result<(), Shortfall>,
        token: FenceToken,
    ) -> Result<Claim, StoreError> {
        match verdict {
            Ok(()) => Ok(Claim::Acquired(token)),
            Err(shortfall) => {
                self.shared.shortfalls.claim();
                tracing::debug!(%shortfall, "claim refused: not acknowledged as the store's durability asks");
                Err(StoreError::unavailable(shortfall))
            }
        }
    }

    /// A completion stored on the primary, acknowledged or not: the handler has run, and
    /// taking the record back would let a retry run it again. A shortfall is counted and
    /// logged.
    pub(super) fn completed_acknowledged_or_not(&self, verdict: Result<(), Shortfall>) {
        if let Err(shortfall) = verdict {
            self.shared.shortfalls.complete();
            tracing::warn!(
                %shortfall,
                "record kept without the acknowledgement the store's durability asks: a failover now may lose it"
            );
        }
    }
}
