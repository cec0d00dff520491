//! The Lua scripts (the `.lua` files beside this one), and running one in a round trip.
//!
//! The fenced scripts start with `fence.lua`, the helpers they share: Redis has no script
//! includes, so each script is the concatenation, known to Redis by its SHA-1.

use std::sync::LazyLock;

use ::redis::{Cmd, ErrorKind, ServerErrorKind, Value, aio::ConnectionLike};

use super::{connect::RedisStore, error::store_error};
use crate::{key::StorageKey, store::error::StoreError};

/// A Lua script and its SHA-1, the name `EVALSHA` knows it by.
pub(super) struct Script {
    code: &'static str,
    sha: String,
}

impl Script {
    fn new(code: &'static str) -> Self {
        Self {
            code,
            sha: ::redis::Script::new(code).get_hash().to_owned(),
        }
    }
}

pub(super) static WATCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("fence.lua"),
        include_str!("watch.lua")
    ))
});
pub(super) static HELD: LazyLock<Script> =
    LazyLock::new(|| Script::new(concat!(include_str!("fence.lua"), include_str!("held.lua"))));
pub(super) static BREAK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("fence.lua"),
        include_str!("break.lua")
    ))
});
pub(super) static INSPECT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("inspect.lua")));
pub(super) static FORGET: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("forget.lua")));
pub(super) static COMPLETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("fence.lua"),
        include_str!("complete.lua")
    ))
});
pub(super) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("fence.lua"),
        include_str!("release.lua")
    ))
});
pub(super) static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("fence.lua"),
        include_str!("renew.lua")
    ))
});

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Runs `script` on `key` with `args`, in one round trip once the server knows the
    /// script, bounded by the response timeout.
    pub(super) async fn run(
        &self,
        script: &Script,
        key: &StorageKey,
        args: &[&[u8]],
    ) -> Result<Value, StoreError> {
        self.run_on(self.connection.clone(), script, key, args)
            .await
    }

    /// As [`run`](Self::run), on `connection` rather than the store's own.
    pub(super) async fn run_on(
        &self,
        mut connection: C,
        script: &Script,
        key: &StorageKey,
        args: &[&[u8]],
    ) -> Result<Value, StoreError> {
        // The key is spelled per command, not held across the round trip: it would widen
        // every future that sends one (`EVAL` follows only on a server that lost its scripts).
        let command = |verb: &str, body: &[u8]| {
            script_command(verb, body, self.key_bytes(key).as_bytes(), args)
        };
        let exchange = async {
            let reply = command("EVALSHA", script.sha.as_bytes())
                .query_async::<Value>(&mut connection)
                .await;
            match reply {
                // EVAL runs the script and caches it under the same digest: the next call is
                // one EVALSHA again. (`SCRIPT LOAD` would take a third command, and on a
                // cluster would need every primary to answer.)
                Err(error) if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    command("EVAL", script.code.as_bytes())
                        .query_async::<Value>(&mut connection)
                        .await
                }
                reply => reply,
            }
        };
        self.bounded(exchange, store_error).await
    }
}

impl Script {
    /// `EVALSHA` of this script on `redis_key` with `args`.
    pub(super) fn evalsha(&self, redis_key: &[u8], args: &[&[u8]]) -> Cmd {
        script_command("EVALSHA", self.sha.as_bytes(), redis_key, args)
    }

    /// `EVAL` of this script on `redis_key` with `args` (which also caches it on the server).
    pub(super) fn eval(&self, redis_key: &[u8], args: &[&[u8]]) -> Cmd {
        script_command("EVAL", self.code.as_bytes(), redis_key, args)
    }
}

fn script_command(verb: &str, body: &[u8], redis_key: &[u8], args: &[&[u8]]) -> Cmd {
    // Sized up front: a command's buffers grown argument by argument reallocate.
    let data = verb.len() + body.len() + 1 + redis_key.len();
    let data = data + args.iter().map(|arg| arg.len()).sum::<usize>();
    let mut command = Cmd::with_capacity(4 + args.len(), data);
    command.arg(verb).arg(body).arg(1).arg(redis_key);
    for arg in args {
        command.arg(*arg);
    }
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fenced_scripts_share_the_fence() {
        for script in [&*COMPLETE, &*RELEASE, &*RENEW, &*WATCH, &*HELD, &*BREAK] {
            assert!(script.code.starts_with(include_str!("fence.lua")));
            assert_eq!(script.sha.len(), 40);
        }
        assert_ne!(COMPLETE.sha, RELEASE.sha);
    }
}
