#!/usr/bin/env bash
# Soak test: two instances of a payments API (two processes, each with its own RedisStore) on
# one redis-server, under a client load, while redis-server is killed (SIGKILL) and restarted
# twice. Prints a table and exits non-zero if an invariant fails.
#
# The programs are examples/soak/ (release build): `soak server` is one instance, whose
# handler simulates a payment (0–100 ms), counts its executions per order and lists them on
# an unprotected `GET /executions`; `soak client` drives the load, checks every key and
# prints the report. This script starts everything on loopback ports, kills redis-server at
# about 1/3 and 2/3 of the run, keeps it down for DOWN seconds, restarts it on the same port
# and data directory, and stops every process it started when it ends, however it ends.
#
# redis-server runs with `--appendonly yes --appendfsync always`: an acknowledged write
# (a claim, a stored record) survives the SIGKILL. Without it, a restart loses every record,
# and each retry after it legitimately executes again (see the README, "Choosing a store").
#
# The load (WORKERS concurrent clients, each driving one key after another):
# - keys: 85 % `Idempotency-Key` (a quarter of requests in the quoted form), 15 % derived
#   from the request (the instances use a 1 h window, longer than the run);
# - 20 % of keys are first sent to both instances at the same moment;
# - 15 % of first requests (10 % of retries) are cut: the request is written whole, then the
#   connection is dropped at once, up to 150 ms later, or when the response starts arriving;
# - a key is retried (to either instance, backoff 100 ms doubling to 1 s, ±50 % jitter) after
#   a cut, a connection error, a 503 or a 409 in flight, until it gets a 2xx, for up to 30
#   requests and 5 s past the end of the load; after a 2xx, 20 % of keys are sent again
#   (must be replayed) and 5 % of keyed ones reused with another payload (must get 409).
#
# The check, once the load is over and Redis stable (no execution running, no in-flight
# claim left in Redis, waiting up to the 30 s lease for claims left behind to expire): each
# key's request is sent once more. A 2xx with `Idempotent-Replayed: true` means the key's
# response is stored. Executions are the two instances' counts taken before this check.
# Invariants, each must be 0:
# - stored keys executed more than once: the key was replayed by the check, and the handler
#   ran for it more than once (either instance).
# - responses lost: the handler ran for the key, the check was not replayed (no record is
#   stored), and at least one of those executions was caused by a request that was not
#   answered with a problem (the layer's `application/problem+json`: 503, 409, 500, …), i.e.
#   its client got the handler's response, or nothing because the connection was cut, and
#   was never told that the request failed. Its response exists nowhere: the next retry
#   runs the payment again.
# - keys answered two different 2xx bodies: over all its requests (the check's only if it
#   was a replay), a key's client got two different successful bodies (replays are byte for
#   byte the first response).
# - keys the final check got no 2xx for (Redis is up again: every key must answer).
# Also fails if a claim is still held in Redis 40 s after the load, or an instance never
# answers anything but 503 after a restart. Reported: requests by outcome, executions per
# key, and per outage and instance the 503s during the outage (answers received from the
# kill until the instance recovered) and the recovery time: from redis-server answering
# PING again to the first answer other than 503 to a protected request sent after the kill.
#
# MODE=failover: instead, a primary (no persistence), one replica and three Sentinels; the
# instances connect through the Sentinels (`RedisStore::connect_sentinel`), with
# `Durability::replicas($DURABILITY)`. At about 1/2 of the run the primary is SIGKILLed; once
# the Sentinels have promoted the replica (the "up" time the recovery is measured from) and
# every Sentinel names it, the old primary is restarted, empty, as a replica of the new one
# with `replica-priority 0` (never an empty primary, never promoted before it has synced; its
# priority is restored to 100 once `INFO replication` says the link is up; a
# durable write needs a replica again). The same invariants are checked; without
# DURABILITY they can fail: that is what a failover loses without `WAIT`.
#
# MODE=postgres: instead, one PostgreSQL server (Debian's `postgresql` package: `initdb` into
# a temporary directory, run as the `postgres` user when root; default settings, fsync on, so
# a committed write survives the SIGKILL) and each instance on a `PostgresStore` of its own
# (a pool of 32). At about 1/3 and 2/3 of the run the postmaster and its backends are
# SIGKILLed (a crash, nothing shut down), kept down for DOWN seconds, and restarted on the
# same port and data directory (crash recovery replays the WAL). The same invariants; the
# claims in flight are rows without a record whose lease has not ended, and the recovery time
# counts from `pg_isready` answering again.
#
# Usage: scripts/soak.sh
# Environment:
#   DURATION=300   the load, in seconds (`20s` and `5m` work too)
#   DOWN=2         seconds redis-server stays down at each kill
#   WORKERS=16     concurrent clients            SEED=<time>  the client's random seed
#   MODE=restart   `restart` (above), `failover` (Sentinel) or `postgres`
#   DURABILITY=0   in failover mode, the replicas that must acknowledge each write
#   CARGO_TARGET_DIR  where the programs are built (default target/)
#
# Exit status: 0 every invariant holds; 1 an invariant failed; 2 the run itself failed.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-300}
DOWN=${DOWN:-2}
WORKERS=${WORKERS:-16}
MODE=${MODE:-restart}
DURABILITY=${DURABILITY:-0}
for arg in "$@"; do
    case "$arg" in
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done

die() { echo "error: $*" >&2; exit 2; }
case "$DURATION" in
    *m) seconds=$((${DURATION%m} * 60)) ;;
    *s) seconds=${DURATION%s} ;;
    *) seconds=$DURATION ;;
esac
[[ "$seconds" =~ ^[0-9]+$ ]] && [ "$seconds" -ge 9 ] || die "DURATION=$DURATION: a whole number of seconds, at least 9"
[[ "$DOWN" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "DOWN=$DOWN: seconds"
case "$MODE" in
    restart | failover)
        for tool in redis-server redis-cli; do
            command -v "$tool" >/dev/null ||
                die "$tool is not on PATH (Debian: apt-get install redis-server)"
        done
        ;;
    postgres)
        # No /usr/lib/postgresql fails find: reported by the test below, not by `set -e`.
        pg_bin=$(find /usr/lib/postgresql -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1 || true)
        [ -n "$pg_bin" ] && [ -x "$pg_bin/initdb" ] && [ -x "$pg_bin/pg_isready" ] ||
            die "PostgreSQL's initdb was not found (Debian: apt-get install postgresql)"
        ;;
    *) die "MODE=$MODE: restart, failover or postgres" ;;
esac

work=$(mktemp -d)
pids=()
redis_pid=
ha_pids=()
keep_logs=false
# Whether process $1 is gone; a zombie counts as gone (it runs nothing, holds nothing).
gone() {
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null || true)
    [ -z "$state" ] || [[ "$state" == Z* ]]
}
cleanup() {
    local pid pm=
    # PostgreSQL's postmaster is runuser's child: asked to stop by its own pid (fast shutdown),
    # if that pid (from a pid file that may be stale) is a postgres still.
    if [ "$MODE" = postgres ] && [ -d "$work/redis" ]; then
        pm=$(head -n 1 "$work/redis/data/postmaster.pid" 2>/dev/null || true)
        if [ -n "$pm" ] && [ "$(cat "/proc/$pm/comm" 2>/dev/null || true)" = postgres ]; then
            kill -INT "$pm" 2>/dev/null || true
        else
            pm=
        fi
    fi
    for pid in "${pids[@]}" $redis_pid "${ha_pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}" $redis_pid "${ha_pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [ -n "$pm" ]; then
        for _ in $(seq 200); do gone "$pm" && break; sleep 0.05; done
        # Not stopped in 10 s: killed, so its data directory is not deleted under it.
        if ! gone "$pm"; then
            kill -KILL "$pm" 2>/dev/null || true
            for _ in $(seq 100); do gone "$pm" && break; sleep 0.05; done
        fi
    fi
    if $keep_logs; then
        echo "logs kept in $work" >&2
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

features="redis axum"
if [ "$MODE" = postgres ]; then features="redis axum postgres"; fi
echo "building the soak programs (release)…"
cargo build --quiet --release --example soak --features "$features"
bin=${CARGO_TARGET_DIR:-target}/release/examples/soak
[ -x "$bin" ] || die "no $bin after the build"

# Redis's port is outside the ephemeral range (scripts/lib/ports.sh): it is restarted on the
# same port, and no outgoing connection may take it while it is down.
source scripts/lib/ports.sh

now_ms() { date +%s%3N; }

free_port redis_port || die "no free loopback port"
mkdir "$work/redis"
# MODE=postgres: the server runs as the postgres user when root (PostgreSQL refuses root).
as_pg=()
if [ "$MODE" = postgres ] && [ "$(id -u)" -eq 0 ]; then
    as_pg=(runuser -u postgres --)
    chown postgres "$work" "$work/redis"
fi
# The postmaster's pid, from its pid file (`runuser` forks it: `$!` is not it).
postmaster_pid() { head -n 1 "$work/redis/data/postmaster.pid" 2>/dev/null || true; }
start_postgres() {
    "${as_pg[@]}" "$pg_bin/postgres" -D "$work/redis/data" -p "$redis_port" -h 127.0.0.1 \
        -k "$work/redis" -c max_connections=200 >>"$work/redis/log" 2>&1 &
    redis_pid=$!
}
# SIGKILLs the postmaster and every backend it started, and waits (bounded) until they are gone.
# The postmaster is stopped first, so that it forks no backend while its children are killed.
kill_postgres() {
    local pm child deadline=$((SECONDS + 10))
    local -a left
    pm=$(postmaster_pid)
    [ -n "$pm" ] || die "no postmaster.pid"
    kill -STOP "$pm" 2>/dev/null || true
    while :; do
        left=()
        for child in $(ps -o pid= --ppid "$pm" || true); do
            gone "$child" || left+=("$child")
        done
        [ "${#left[@]}" -gt 0 ] || break
        kill -KILL "${left[@]}" 2>/dev/null || true
        [ "$SECONDS" -lt "$deadline" ] || die "postgres backends survived SIGKILL"
        sleep 0.02
    done
    kill -KILL "$pm" 2>/dev/null || true
    # runuser stops itself when its child stops: continued, it reaps the postmaster and ends.
    kill -CONT "$redis_pid" 2>/dev/null || true
    wait "$redis_pid" 2>/dev/null || true
    until gone "$pm"; do
        [ "$SECONDS" -lt "$deadline" ] || die "postgres survived SIGKILL"
        sleep 0.02
    done
}
# Waits (bounded) until postgres accepts connections; prints when, in Unix ms.
wait_for_postgres() {
    local deadline=$((SECONDS + 60))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if "$pg_bin/pg_isready" -q -h 127.0.0.1 -p "$redis_port"; then
            now_ms
            return
        fi
        kill -0 "$redis_pid" 2>/dev/null || die "postgres exited: $(tail -n 5 "$work/redis/log")"
        sleep 0.02
    done
    die "postgres did not accept connections within 60 s"
}
start_redis() {
    if [ "$MODE" = failover ]; then
        # Restarted after the failover (the argument: the new primary's port), as a careful
        # supervisor restarts a node without persistence: a replica of the primary the
        # Sentinels name, that no Sentinel promotes while it is empty.
        local rejoin=()
        if [ $# -gt 0 ]; then rejoin=(--replicaof 127.0.0.1 "$1" --replica-priority 0); fi
        redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
            --repl-diskless-sync-delay 0 ${rejoin[@]+"${rejoin[@]}"} \
            --daemonize no --dir "$work/redis" --logfile "$work/redis/log" &
    else
        redis-server --port "$redis_port" --bind 127.0.0.1 --save "" \
            --appendonly yes --appendfsync always --daemonize no \
            --dir "$work/redis" --logfile "$work/redis/log" &
    fi
    redis_pid=$!
}
# Waits (bounded) until redis-server answers PING; prints when, in Unix ms.
wait_for_redis() {
    local deadline=$((SECONDS + 30))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if [ "$(redis-cli -h 127.0.0.1 -p "$redis_port" ping 2>/dev/null)" = PONG ]; then
            now_ms
            return
        fi
        kill -0 "$redis_pid" 2>/dev/null || die "redis-server exited: $(tail -n 5 "$work/redis/log")"
        sleep 0.02
    done
    die "redis-server did not answer PING within 30 s"
}
if [ "$MODE" = postgres ]; then
    "${as_pg[@]}" "$pg_bin/initdb" -D "$work/redis/data" -A trust -U postgres >"$work/redis/initdb.log" 2>&1 ||
        die "initdb failed: $(cat "$work/redis/initdb.log")"
    start_postgres
    wait_for_postgres >/dev/null
else
    start_redis
    wait_for_redis >/dev/null
fi
redis_url="redis://127.0.0.1:$redis_port"
instance_env=(REDIS_URL="$redis_url")
client_env=(REDIS_URL="$redis_url")
outages=2
case "$MODE" in
    restart) ;;
    postgres)
        database_url="postgres://postgres@127.0.0.1:$redis_port/postgres"
        instance_env=(DATABASE_URL="$database_url")
        client_env=(DATABASE_URL="$database_url")
        ;;
    failover)
        outages=1
        free_port replica_port || die "no free loopback port"
        mkdir "$work/replica"
        redis-server --port "$replica_port" --bind 127.0.0.1 --save "" --appendonly no \
            --repl-diskless-sync-delay 0 \
            --replicaof 127.0.0.1 "$redis_port" --daemonize no --dir "$work/replica" \
            --logfile "$work/replica/log" &
        ha_pids+=("$!")
        sentinels=()
        for i in 1 2 3; do
            free_port sport || die "no free loopback port"
            mkdir "$work/sentinel-$i"
            printf '%s\n' "port $sport" "bind 127.0.0.1" "daemonize no" \
                "dir $work/sentinel-$i" "logfile $work/sentinel-$i/log" \
                "sentinel monitor mymaster 127.0.0.1 $redis_port 2" \
                "sentinel down-after-milliseconds mymaster 1000" \
                "sentinel failover-timeout mymaster 3000" >"$work/sentinel-$i/sentinel.conf"
            redis-server "$work/sentinel-$i/sentinel.conf" --sentinel &
            ha_pids+=("$!")
            sentinels+=("redis://127.0.0.1:$sport")
            sentinel_port=$sport
        done
        deadline=$((SECONDS + 30))
        until redis-cli -h 127.0.0.1 -p "$sentinel_port" sentinel master mymaster 2>/dev/null |
            grep -A1 -x num-other-sentinels | tail -n1 | grep -qx 2 &&
            redis-cli -h 127.0.0.1 -p "$sentinel_port" sentinel master mymaster |
            grep -A1 -x num-slaves | tail -n1 | grep -qx 1; do
            [ "$SECONDS" -lt "$deadline" ] || die "the Sentinels did not find each other and the replica"
            sleep 0.2
        done
        # The client checks Redis through the replica, which is the primary after the failover.
        redis_url="redis://127.0.0.1:$replica_port"
        client_env=(REDIS_URL="$redis_url")
        instance_env=(SENTINELS="$(IFS=,; echo "${sentinels[*]}")" SERVICE=mymaster DURABILITY="$DURABILITY")
        ;;
esac

declare -A port
for name in a b; do
    # Each instance binds port 0 (the kernel picks a free one at the bind itself, no race) and
    # says which port it got.
    env NAME=$name PORT=0 "${instance_env[@]}" "$bin" server >"$work/server-$name.log" 2>&1 &
    pids+=("$!")
    for _ in $(seq 100); do
        grep -qs listening "$work/server-$name.log" && break
        kill -0 "${pids[-1]}" 2>/dev/null || die "instance $name exited: $(cat "$work/server-$name.log")"
        sleep 0.05
    done
    port[$name]=$(sed -nE 's#^.* listening on http://127\.0\.0\.1:([0-9]+)$#\1#p' "$work/server-$name.log" | head -n 1)
    [ -n "${port[$name]}" ] || die "instance $name did not start: $(cat "$work/server-$name.log")"
done

events=$work/events
: >"$events"
if [ "$MODE" = failover ]; then
    echo "soak: ${seconds} s of load through Sentinel, Durability::replicas($DURABILITY)," \
        "the primary SIGKILLed at ~1/2; $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
elif [ "$MODE" = postgres ]; then
    echo "soak: ${seconds} s of load on PostgresStore, postgres SIGKILLed at ~1/3 and ~2/3 for ${DOWN} s;" \
        "$(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
else
    echo "soak: ${seconds} s of load, redis-server SIGKILLed at ~1/3 and ~2/3 for ${DOWN} s;" \
        "$(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
fi
env TARGETS="a=127.0.0.1:${port[a]},b=127.0.0.1:${port[b]}" "${client_env[@]}" EVENTS=$events \
    DURATION_MS=$((seconds * 1000)) WORKERS=$WORKERS OUTAGES=$outages "$bin" client &
client_pid=$!
pids+=("$client_pid")
start=$(now_ms)

for i in $(seq "$outages"); do
    at=$((start + seconds * 1000 * i / (outages + 1)))
    while [ "$(now_ms)" -lt "$at" ]; do
        kill -0 "$client_pid" 2>/dev/null || break 2
        sleep 0.05
    done
    echo "kill $(now_ms)" >>"$events"
    if [ "$MODE" = postgres ]; then
        kill_postgres
        sleep "$DOWN"
        start_postgres
        # Not inside `echo "$( )"`: a `die` in a command substitution ends only the subshell.
        up_at=$(wait_for_postgres) || exit 2
        echo "up $up_at" >>"$events"
        continue
    fi
    kill -KILL "$redis_pid"
    wait "$redis_pid" 2>/dev/null || true
    if [ "$MODE" = failover ]; then
        deadline=$((SECONDS + 60))
        until redis-cli -h 127.0.0.1 -p "$sentinel_port" sentinel get-master-addr-by-name mymaster |
            grep -qx "$replica_port"; do
            [ "$SECONDS" -lt "$deadline" ] || die "the Sentinels did not promote the replica within 60 s"
            sleep 0.02
        done
        echo "up $(now_ms)" >>"$events"
        # A supervisor restarts the crashed primary once every Sentinel names the new one, as
        # its replica (an empty primary back before may be named by a Sentinel not yet told,
        # and written to; an empty replica promoted before its sync loses every record).
        for sentinel in "${sentinels[@]}"; do
            sport=${sentinel##*:}
            until redis-cli -h 127.0.0.1 -p "$sport" sentinel get-master-addr-by-name mymaster |
                grep -qx "$replica_port"; do
                [ "$SECONDS" -lt "$deadline" ] || die "a Sentinel did not learn of the promotion"
                sleep 0.02
            done
        done
        start_redis "$replica_port"
        wait_for_redis >/dev/null
        echo "failover: replica promoted; old primary restarted (empty) as its replica, priority 0"
        # Once synced, it may be promoted again (README: restore its priority).
        until redis-cli -h 127.0.0.1 -p "$redis_port" info replication | grep -q '^master_link_status:up'; do
            [ "$SECONDS" -lt "$deadline" ] || die "the restarted node did not sync with the new primary"
            sleep 0.05
        done
        redis-cli -h 127.0.0.1 -p "$redis_port" config set replica-priority 100 >/dev/null ||
            die "could not restore replica-priority on the restarted node"
        echo "failover: the restarted node synced; replica-priority restored to 100"
    else
        sleep "$DOWN"
        start_redis
        up_at=$(wait_for_redis) || exit 2
        echo "up $up_at" >>"$events"
    fi
done

status=0
wait "$client_pid" || status=$?
for name in a b; do
    log=$work/server-$name.log
    # What the instances logged, one line per distinct message (keys and errors left out).
    warnings=$(grep -E ' (WARN|ERROR) ' "$log" | sed -E 's/^.*(WARN|ERROR) [^ ]+: //; s/ (key|error)=.*$//' |
        sort | uniq -c | sort -rn || true)
    echo "instance $name logged:"
    if [ -n "$warnings" ]; then echo "$warnings"; else echo "      nothing above INFO"; fi
done
for pid in "${pids[@]:0:2}"; do
    kill -0 "$pid" 2>/dev/null || { echo "error: an instance died (pid $pid)" >&2; status=2; }
done
if [ "$status" -ne 0 ]; then keep_logs=true; fi
exit "$status"
