#!/usr/bin/env bash
# `make bench`: every load scenario at the sizes DESIGN.md sets targets for, each against a
# fresh hub the harness spawns itself (release build, default hub settings), then one table
# against the targets. Reports go to target/bench/<run>.json. About three minutes in all.
#
#   make bench                         # build release, run everything
#   ./load-test/bench.sh fanout idle   # only these runs (binaries must be built)
#   BENCH_DIR=/tmp/b ./load-test/bench.sh
#
# Exit status: non-zero if any run broke a stream, lost a connection or could not run.
# Missed performance targets are shown in the table, not turned into a failure (benchmarks
# are not tests); `branchline-load summary --strict DIR` makes them one.
set -uo pipefail

cd "$(dirname "$0")/.."
LOAD=${BRANCHLINE_LOAD_BIN:-target/release/branchline-load}
DIR=${BENCH_DIR:-target/bench}

if [[ ! -x "$LOAD" ]]; then
    echo "bench: $LOAD is missing; run: cargo build --release -p branchline-hub -p branchline-load" >&2
    exit 2
fi

# 10,000 idle sessions need 10,000 descriptors in the harness and as many in the hub, more than
# the usual soft limit of 1,024. The hard limit here is 20,000; raise the soft one to it.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if (( $(ulimit -n) < 12000 )); then
    echo "bench: open-file limit $(ulimit -n) is below 12,000; the idle run may fail (ulimit -n 20000)" >&2
fi

# name | flags. Sizes are DESIGN.md's; durations keep the whole bench to a few minutes.
# `publish` is open loop (latencies from the intended send times): a hub that cannot hold the
# rate shows it as fewer acks/s and growing latency, not as a harness that quietly slowed
# down. `light` is the fan-out shape at a fifth of the load. `fanout` and `publish` both run
# 2% above their targets (510/s x 1,000 followers, 100 branches x 510/s = 51,000/s) so that
# ">= 500,000 deliveries/s" and ">= 50,000 acked events/s" are not decided by rounding.
RUNS=(
    "fanout|--scenario fanout --branches 1 --subscribers 1000 --rate 510 --duration 20s --warmup 3s"
    "light|--scenario fanout --branches 1 --subscribers 1000 --rate 100 --duration 20s --warmup 3s"
    "publish|--scenario publish --branches 100 --publishers 10 --rate 510 --duration 20s --warmup 3s"
    "idle|--scenario idle --connections 10000 --branches 1000 --settle 5s --duration 20s"
    "catchup|--scenario catchup --behind 100000 --duration 60s"
    "reconnect-storm|--scenario reconnect-storm --branches 100 --subscribers 5000 --behind 100 --rate 5 --jitter 1s --warmup 3s --duration 30s"
)

mkdir -p "$DIR"
failed=()
for run in "${RUNS[@]}"; do
    name=${run%%|*}
    flags=${run#*|}
    if (( $# > 0 )) && [[ " $* " != *" $name "* ]]; then
        continue
    fi
    rm -f "$DIR/$name.json"
    echo "=== $name: branchline-load --spawn-hub $flags"
    # shellcheck disable=SC2086 # the flags are meant to split
    "$LOAD" --spawn-hub $flags --label "$name" --report "$DIR/$name.json"
    status=$?
    if (( status != 0 )); then
        failed+=("$name (exit $status)")
    fi
    echo
done

echo "=== summary ($DIR)"
"$LOAD" summary "$DIR"
summary=$?

if (( ${#failed[@]} > 0 )); then
    echo "bench: failed runs: ${failed[*]}" >&2
    exit 1
fi
exit "$summary"
