#!/usr/bin/env bash
# The whole check: formatting, lints, every test (Redis and Postgres ones start their own
# servers), docs with warnings denied, the published package (its files, and that it builds
# alone), benches compile, the load script runs, the memory flood (in release), a 20 s soak
# with redis-server killed twice, and the declared minimum Rust version builds.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

for tool in redis-server redis-cli wrk; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "error: $tool is not on PATH; the Redis tests and the load script need it." >&2
        echo "       install Debian's packages: sudo apt-get install redis-server wrk" >&2
        exit 1
    fi
done
# The Postgres tests start their own server from Debian's binaries, which are not on PATH.
if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null && ! command -v initdb >/dev/null 2>&1; then
    echo "error: PostgreSQL's initdb was not found; the Postgres tests need it." >&2
    echo "       install Debian's package: sudo apt-get install postgresql" >&2
    exit 1
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "module graph: no cycle between modules or files; pure modules import no service, store, observe or config"
python3 scripts/modgraph.py --check
python3 scripts/modgraph.py --check --files

step "cargo clippy (all targets, all features)"
cargo clippy --all-targets --all-features -- -D warnings

step "cargo clippy (all targets, default features: code only some features use is gated)"
cargo clippy --all-targets -- -D warnings

step "cargo test (all features)"
cargo test --all-features

step "cargo test (default features: the feature set users get)"
cargo test --lib --tests
# Examples and benchmarks too: one that names a feature it does not require fails here.
cargo check --examples --benches

step "cargo check (no default features: features stay additive)"
cargo check --no-default-features --lib

step "cargo doc (warnings denied)"
RUSTDOCFLAGS="-D warnings" cargo doc --all-features --no-deps
# A README or docs/ link that docs/rustdoc-links.md does not redirect stays a relative link
# to a .md file: fine on GitHub, broken on docs.rs. rustdoc does not warn about it.
if grep -rEo 'href="[^"]*\.md(#[^"]*)?"' target/doc/tower_idempotency/index.html target/doc/tower_idempotency/guide; then
    echo "error: links to .md files in the crate docs; add their labels to docs/rustdoc-links.md" >&2
    exit 1
fi
# Default features too: an intra-doc link to an item of an optional feature breaks there.
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps

# Offline: the crates are in cargo's cache by now. `cargo publish --dry-run` would also read
# the crates.io index over the network, so it is not run here.
step "the published package: only what a user needs (Cargo.toml include), and it builds alone"
packaged=$(cargo package --list --allow-dirty --offline)
if grep -E '^(tests|benches|examples|scripts|fuzz|proptest-regressions|\.ci)/' <<<"$packaged"; then
    echo "error: the package would ship the files above; see include in Cargo.toml" >&2
    exit 1
fi
cargo package --allow-dirty --offline
# Again with every feature: the verify build above compiles default features only, so the
# packaged RedisStore (its Lua include_str!s) and PostgresStore sources are compiled here.
cargo package --allow-dirty --offline --all-features

step "benches compile (criterion; numbers come from running them, never from tests)"
cargo bench --all-features --no-run

step "the load script runs (a few seconds of each scenario; its numbers are not checked)"
DURATION=1s ROUNDS=1 scripts/loadtest.sh

# A million requests take ~15 s in release and ~2.5 min in a debug build (where the test is
# ignored). `--features "redis axum"` shares the release build of the soak programs.
step "memory flood: 1 000 000 keys through the layer into MemoryStore::new(64 MiB) (release)"
cargo test --release --features "redis axum" --test memory_flood -- --nocapture

step "soak: two instances on one redis-server, killed and restarted twice (20 s)"
DURATION=20s scripts/soak.sh

msrv=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml)
step "minimum supported Rust version $msrv builds the library"
if ! rustup run "$msrv" rustc --version >/dev/null 2>&1; then
    rustup toolchain install "$msrv" --profile minimal --no-self-update
fi
CARGO_TARGET_DIR=target/msrv cargo "+$msrv" check --all-features --lib

step "all checks passed"
