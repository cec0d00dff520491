#!/usr/bin/env bash
# HTTP load test: what the layer costs a real server, beside the bare handler in the same run.
#
# Starts examples/bench_server.rs (release) bare and layered (one server per mode), then for
# each round and scenario drives them one after the other (bare, naive-moka, memory,
# naive-redis, redis, cached, then the reverse order in the next round) with Debian's `wrk`
# through the Lua scripts in scripts/wrk/, and prints per scenario and mode: requests/s, p50/p99 latency,
# and server CPU per request (the CPU time /proc gives for the server process around the wrk
# run, divided by the requests wrk reports), with the ratio to bare (per round, then the
# median), and for Redis modes redis-server's CPU per request too.
# naive-moka and naive-redis are baselines, not the layer: the naive middleware in
# benches/common/naive.rs (a response cache by raw key, no claim, no fingerprint), which
# pass requests without an Idempotency-Key through: their derived rows measure a
# pass-through (marked in the table), where the layer derives a key and protects the request.
# Everything listens on and talks to 127.0.0.1 only.
#
# Usage: scripts/loadtest.sh [--quick]
#   --quick        2 s per run (what CI can afford); otherwise DURATION
# Environment:
#   DURATION=5s    each wrk run                 ROUNDS=3        rounds of every mode
#   CONNECTIONS=16 wrk connections              THREADS=1       wrk threads
#   MODES="naive-moka memory naive-redis redis cached"  layered modes (naive-redis, redis
#                  and cached need redis-server; without it, the default is
#                  "naive-moka memory"); `postgres` (not in the default) measures
#                  PostgresStore on a PostgreSQL the script starts (Debian's postgresql
#                  package; default settings, fsync on; run as the postgres user when root)
#   SCENARIOS="get nokey unique replay derived"
#   CARGO_TARGET_DIR  where the server is built (default target/)
#
# Pins the server to the first CPU and wrk (and redis-server) to others with `taskset`
# when there are at least two. Fails (non-zero) on any error, wrk's included; every process
# it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-5s}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-16}
THREADS=${THREADS:-1}
SCENARIOS=${SCENARIOS:-get nokey unique replay derived}
for arg in "$@"; do
    case "$arg" in
        --quick) DURATION=2s ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done

die() { echo "error: $*" >&2; exit 1; }
command -v wrk >/dev/null || die "wrk is not on PATH (Debian: apt-get install wrk)"
command -v curl >/dev/null || die "curl is not on PATH (Debian: apt-get install curl)"
if [ -z "${MODES:-}" ]; then
    if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
        MODES="naive-moka memory naive-redis redis cached"
    else
        echo "note: no redis-server on PATH; measuring MemoryStore (and naive-moka) only" >&2
        MODES="naive-moka memory"
    fi
fi
needs_redis=false
needs_postgres=false
for mode in $MODES; do
    case "$mode" in
        memory | naive-moka) ;;
        redis | cached | naive-redis) needs_redis=true ;;
        postgres) needs_postgres=true ;;
        *) die "unknown mode $mode (naive-moka, memory, naive-redis, redis, cached, postgres)" ;;
    esac
done
for scenario in $SCENARIOS; do
    [ -f "scripts/wrk/$scenario.lua" ] || die "no scripts/wrk/$scenario.lua"
done

work=$(mktemp -d)
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# CPUs: the server alone on the first one; wrk and redis-server on the others.
server_cpu=() client_cpu=() redis_cpu=()
cpus=$(nproc)
if command -v taskset >/dev/null && [ "$cpus" -ge 2 ]; then
    server_cpu=(taskset -c 0)
    client_cpu=(taskset -c 1)
    if [ "$cpus" -ge 3 ]; then redis_cpu=(taskset -c 2); else redis_cpu=(taskset -c 1); fi
    pinning="server on CPU 0, wrk on CPU 1, redis-server on CPU ${redis_cpu[2]}"
else
    pinning="not pinned (no taskset, or one CPU)"
fi

features=()
if $needs_redis; then features=(--features redis); fi
if $needs_postgres; then features=(--features redis,postgres); fi
echo "building the server (release)…"
cargo build --quiet --release --example bench_server "${features[@]}"
server_bin=${CARGO_TARGET_DIR:-target}/release/examples/bench_server
[ -x "$server_bin" ] || die "no $server_bin after the build"

# Ports outside the ephemeral range (the server fails to start if one is taken in between).
source scripts/lib/ports.sh

redis_pid=
redis_url=
if $needs_redis; then
    free_port redis_port || die "no free loopback port"
    mkdir "$work/redis"
    "${redis_cpu[@]}" redis-server --port "$redis_port" --bind 127.0.0.1 --save "" \
        --appendonly no --daemonize no --dir "$work/redis" --logfile "$work/redis/log" &
    redis_pid=$!
    pids+=("$redis_pid")
    for _ in $(seq 100); do
        if redis-cli -h 127.0.0.1 -p "$redis_port" ping 2>/dev/null | grep -q PONG; then
            break
        fi
        kill -0 "$redis_pid" 2>/dev/null || die "redis-server exited: $(cat "$work/redis/log")"
        sleep 0.1
    done
    redis-cli -h 127.0.0.1 -p "$redis_port" ping | grep -q PONG || die "redis-server did not start"
    redis_url="redis://127.0.0.1:$redis_port"
fi

database_url=
if $needs_postgres; then
    pg_bin=$(find /usr/lib/postgresql -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1)
    [ -n "$pg_bin" ] && [ -x "$pg_bin/initdb" ] ||
        die "PostgreSQL's initdb was not found (Debian: apt-get install postgresql)"
    as_pg=()
    mkdir "$work/pg"
    if [ "$(id -u)" -eq 0 ]; then
        # PostgreSQL refuses to run as root.
        as_pg=(runuser -u postgres --)
        chown postgres "$work" "$work/pg"
    fi
    "${as_pg[@]}" "$pg_bin/initdb" -D "$work/pg/data" -A trust -U postgres >"$work/pg/initdb.log" 2>&1 ||
        die "initdb failed: $(cat "$work/pg/initdb.log")"
    free_port pg_port || die "no free loopback port"
    "${redis_cpu[@]}" "${as_pg[@]}" "$pg_bin/postgres" -D "$work/pg/data" -p "$pg_port" \
        -h 127.0.0.1 -k "$work/pg" -c max_connections=200 >"$work/pg/log" 2>&1 &
    pids+=("$!")
    for _ in $(seq 300); do
        "$pg_bin/pg_isready" -q -h 127.0.0.1 -p "$pg_port" && break
        sleep 0.1
    done
    "$pg_bin/pg_isready" -q -h 127.0.0.1 -p "$pg_port" || die "postgres did not start: $(cat "$work/pg/log")"
    database_url="postgres://postgres@127.0.0.1:$pg_port/postgres"
fi

clk_tck=$(getconf CLK_TCK)
# CPU time a process has used, in ns: utime + stime from /proc/<pid>/stat (fields 14 and 15;
# the command name, field 2, may hold spaces, so count from the ')' that ends it). Those
# are in clock ticks (10 ms), too coarse for a 2 s run: where the kernel keeps schedstats,
# the same time is read to the ns as the sum over the process's threads of the first field
# of /proc/<pid>/task/*/schedstat.
cpu_ns() {
    local pid=$1 stat total=0 file ran
    if [ -r "/proc/$pid/schedstat" ]; then
        for file in "/proc/$pid"/task/*/schedstat; do
            read -r ran _ <"$file" || die "process $pid is gone"
            total=$((total + ran))
        done
        echo "$total"
        return
    fi
    stat=$(cat "/proc/$pid/stat") || die "process $pid is gone"
    stat=${stat##*) }
    # shellcheck disable=SC2086
    set -- $stat
    echo $(((${12} + ${13}) * 1000000000 / clk_tck))
}

# Every server runs from the start to the end, idle but for its own wrk runs: each run of a
# layered server sits right next to a run of the bare one.
declare -A server_pid server_port
start_server() {
    local mode=$1 attempt port pid log=$work/server-$1.log
    for attempt in 1 2 3; do
        free_port port || die "no free loopback port"
        MODE=$mode PORT=$port REDIS_URL=$redis_url DATABASE_URL=$database_url \
            "${server_cpu[@]}" "$server_bin" >"$log" 2>&1 &
        pid=$!
        pids+=("$pid")
        for _ in $(seq 100); do
            if grep -q listening "$log" 2>/dev/null; then
                server_pid[$mode]=$pid
                server_port[$mode]=$port
                return
            fi
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.05
        done
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        echo "note: the $mode server did not start (attempt $attempt): $(cat "$log")" >&2
    done
    die "the $mode server did not start"
}

# Before measuring: the server answers, and replays if and only if it is layered.
check_server() {
    local mode=$1 url="http://127.0.0.1:${server_port[$1]}" key="check-$RANDOM-$$" headers
    curl -sf -o /dev/null "$url/v1/charges/ch_1" || die "$mode: GET failed"
    for _ in 1 2; do
        headers=$(curl -sf -D - -o /dev/null "$url/v1/charges" -H "Idempotency-Key: $key" \
            -H 'Content-Type: application/json' -d "$(check_body)") || die "$mode: POST failed"
    done
    if [ "$mode" = bare ]; then
        ! grep -qi '^idempotent-replayed' <<<"$headers" || die "bare server replayed"
    else
        grep -qi '^idempotent-replayed: true' <<<"$headers" || die "$mode: the retry was not replayed"
    fi
}
check_body() {
    printf '{"amount":1000,"currency":"eur","customer":"cus_9s6XKzkNRiz8i3","description":"%s","metadata":{"order_id":"ord_0","channel":"web"},"capture":true}' "check"
}

# Modes whose store is redis-server (its CPU is measured too).
is_redis() {
    case "$1" in redis | cached | naive-redis) return 0 ;; *) return 1 ;; esac
}

results=$work/results.tsv
: >"$results"
# One wrk run: appends "round mode scenario requests rps p50_us p99_us cpu_us_per_req
# redis_cpu_us_per_req" to the results.
measure() {
    local round=$1 mode=$2 scenario=$3 log=$work/wrk.log before after rbefore=0 rafter=0 line
    before=$(cpu_ns "${server_pid[$mode]}")
    if [ -n "$redis_pid" ]; then rbefore=$(cpu_ns "$redis_pid"); fi
    "${client_cpu[@]}" wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --timeout 5s \
        -s "scripts/wrk/$scenario.lua" "http://127.0.0.1:${server_port[$mode]}" \
        -- "r$round-$mode-$$-$RANDOM" >"$log" 2>&1 || die "wrk failed ($mode $scenario): $(cat "$log")"
    after=$(cpu_ns "${server_pid[$mode]}")
    if [ -n "$redis_pid" ]; then rafter=$(cpu_ns "$redis_pid"); fi
    line=$(grep '^RESULT' "$log") || die "no result from wrk ($mode $scenario): $(cat "$log")"
    local requests errors non2xx rps p50 p99
    requests=$(sed -n 's/.* requests=\([0-9]*\).*/\1/p' <<<"$line")
    errors=$(sed -n 's/.* errors=\([0-9]*\).*/\1/p' <<<"$line")
    non2xx=$(sed -n 's/.* non2xx=\([0-9]*\).*/\1/p' <<<"$line")
    rps=$(sed -n 's/.* rps=\([0-9.]*\).*/\1/p' <<<"$line")
    p50=$(sed -n 's/.* p50_us=\([0-9]*\).*/\1/p' <<<"$line")
    p99=$(sed -n 's/.* p99_us=\([0-9]*\).*/\1/p' <<<"$line")
    [ "$errors" = 0 ] && [ "$non2xx" = 0 ] ||
        die "wrk saw $errors socket errors and $non2xx non-2xx answers ($mode $scenario): $(cat "$log")"
    [ "$requests" -gt 0 ] || die "wrk sent no requests ($mode $scenario)"
    awk -v r="$round" -v m="$mode" -v s="$scenario" -v n="$requests" -v rps="$rps" \
        -v p50="$p50" -v p99="$p99" -v t="$((after - before))" -v rt="$((rafter - rbefore))" \
        -v redis="$(is_redis "$mode" && echo 1 || echo 0)" \
        'BEGIN { printf "%s\t%s\t%s\t%d\t%.1f\t%d\t%d\t%.2f\t%s\n", r, m, s, n, rps, p50, p99,
                 t / 1e3 / n, redis ? sprintf("%.2f", rt / 1e3 / n) : "-" }' >>"$results"
    printf '  %-11s %-8s %8d req %9.0f req/s  p99 %8d µs  CPU %6s µs/req\n' "$mode" "$scenario" \
        "$requests" "$rps" "$p99" "$(cut -f8 <<<"$(tail -n1 "$results")")"
}

echo "machine: $cpus CPUs; $pinning; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "runs: $DURATION each, $CONNECTIONS connections, $THREADS wrk thread(s), $ROUNDS rounds of: bare $MODES"
case " $MODES " in
    *" naive-"*)
        echo "naive-*: baselines (examples/bench_server.rs), a response cache by raw key with no claim,"
        echo "  no fingerprint; a POST without Idempotency-Key (derived) passes through them unprotected"
        ;;
esac
for mode in bare $MODES; do
    start_server "$mode"
    check_server "$mode"
done
order="bare $MODES"
for round in $(seq "$ROUNDS"); do
    echo "round $round"
    for scenario in $SCENARIOS; do
        for mode in $order; do
            measure "$round" "$mode" "$scenario"
        done
    done
    # Alternate the order (A B C, C B A, …) so that a drift in the machine's speed during a
    # round does not always favour the same mode.
    order=$(tr ' ' '\n' <<<"$order" | tac | tr '\n' ' ')
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"

# Medians over the rounds; the CPU ratio is taken per round (bare and layered ran next to
# each other), then its median.
awk -F'\t' -v modes="bare $MODES" -v scenarios="$SCENARIOS" '
function median(list,    n, v, i, j, t) {
    n = split(list, v, " ")
    for (i = 2; i <= n; i++) { t = v[i]; for (j = i - 1; j >= 1 && v[j] + 0 > t + 0; j--) v[j + 1] = v[j]; v[j + 1] = t }
    return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
}
{ key = $2 SUBSEP $3; rps[key] = rps[key] " " $5; p50[key] = p50[key] " " $6; p99[key] = p99[key] " " $7
  cpu[key] = cpu[key] " " $8; rcpu[key] = rcpu[key] " " $9; byround[$1, $2, $3] = $8; rounds[$1] = 1 }
END {
    printf "\n%-9s %-11s %10s %9s %9s %11s %14s %16s\n", "scenario", "mode", "req/s", "p50 µs", "p99 µs", "CPU µs/req", "CPU vs bare", "redis CPU µs/req"
    nm = split(modes, m, " "); ns = split(scenarios, s, " ")
    for (i = 1; i <= ns; i++) for (k = 1; k <= nm; k++) {
        key = m[k] SUBSEP s[i]
        ratios = ""
        for (r in rounds) if (byround[r, "bare", s[i]] > 0) ratios = ratios " " byround[r, m[k], s[i]] / byround[r, "bare", s[i]]
        ratio = m[k] == "bare" ? "1" : sprintf("%.2f", median(ratios))
        r = m[k] == "redis" || m[k] == "cached" || m[k] == "naive-redis" ? sprintf("%.2f", median(rcpu[key])) : "-"
        note = m[k] ~ /^naive-/ && s[i] == "derived" ? "  (no key: passed through)" : ""
        printf "%-9s %-11s %10.0f %9.0f %9.0f %11.2f %13s× %16s%s\n", s[i], m[k], median(rps[key]), median(p50[key]), median(p99[key]), median(cpu[key]), ratio, r, note
    }
}' "$results"
