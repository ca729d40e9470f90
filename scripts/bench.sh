#!/usr/bin/env bash
# `make bench`: the gateway against the approaches it replaces, measured side by side in one run
# and reported as ratios (no pass/fail on absolute times). Prints the report and keeps a copy in
# .bench/report.txt (plus a time-stamped one).
#
#   1. lookup cost, by port and by server name (criterion, shared/benches/lookup.rs)
#   2. data path, route activation and footprint, and routing by TLS server name: TLS
#      connection rate and name-route activation (tests/src/bin/gpugate-bench/)
#   3. the route-table CLI: single commands vs apply (scripts/bench-cli.sh, which runs alone too)
#
# Sizes: GPUGATE_BENCH_* variables (see gpugate-bench's Config). Needs an open-files limit above
# the number of listening ports (10,200 by default): the soft limit is raised to the hard one.
# Every nginx and backend it starts is stopped on exit, failure or interrupt.
set -euo pipefail
cd "$(dirname "$0")/.."
export NGX_CONFIGURE_ARGS="--with-stream_ssl_preread_module"
export GPUGATE_DIST="$PWD/dist"
target_dir="${CARGO_TARGET_DIR:-target}"

ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt 11000 ]; then
  echo "bench: the open-files limit is $(ulimit -n); nginx needs one per listening port (10,200)" >&2
  exit 1
fi

mkdir -p .bench
# Everything the run creates (nginx prefixes, route tables, port files) lives here; nginx's
# workers (nobody) must be able to traverse it.
work=$(mktemp -d "${TMPDIR:-/tmp}/gpugate-bench.XXXXXX")
chmod 755 "$work"
bench_pid=""

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$bench_pid" ] && kill -0 "$bench_pid" 2>/dev/null; then
    kill "$bench_pid" 2>/dev/null || true
    wait "$bench_pid" 2>/dev/null || true
  fi
  # Stop every nginx this run started, with all its workers (old generations included).
  local pidfile master kids
  for pidfile in "$work"/*/nginx/logs/nginx.pid; do
    [ -f "$pidfile" ] || continue
    master=$(cat "$pidfile" 2>/dev/null) || continue
    [ -n "$master" ] && [ -d "/proc/$master" ] || continue
    kids=$(cat "/proc/$master/task/$master/children" 2>/dev/null || true)
    kill -TERM "$master" 2>/dev/null || true
    for _ in $(seq 50); do
      [ -d "/proc/$master" ] || break
      sleep 0.1
    done
    for p in $master $kids; do
      kill -KILL "$p" 2>/dev/null || true
    done
  done
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "bench: building the load client" >&2
cargo build --release --locked -p gpugate-tests --bin gpugate-bench >&2

echo "bench: lookup cost (criterion)" >&2
TMPDIR="$work" cargo bench --locked -p gpugate-routes --bench lookup >"$work/criterion.log" 2>&1 || {
  cat "$work/criterion.log" >&2
  exit 1
}
grep -E '^lookup/' "$work/criterion.log" >&2 || true
# criterion's median point estimate, in ns, from its JSON (one line, no jq needed).
estimate() {
  sed -nE 's/.*"median":\{"confidence_interval":\{[^}]*\},"point_estimate":([0-9.eE+-]+).*/\1/p' \
    "$target_dir/criterion/lookup/$1/new/estimates.json"
}
live=$(estimate live)
miss=$(estimate miss)
host_live=$(estimate host_live)
host_miss=$(estimate host_miss)

echo "bench: data path, activation, footprint and TLS names (gpugate-bench)" >&2
stamp=$(date -u +%Y%m%dT%H%M%SZ)
TMPDIR="$work" "$target_dir/release/gpugate-bench" \
  --lookup-live-ns "$live" --lookup-miss-ns "$miss" \
  --lookup-host-live-ns "$host_live" --lookup-host-miss-ns "$host_miss" --out ".bench/report-$stamp.txt" &
bench_pid=$!
wait "$bench_pid"
bench_pid=""

echo "bench: route-table CLI, single commands vs apply (bench-cli.sh)" >&2
TMPDIR="$work" scripts/bench-cli.sh "$target_dir/release/gpugate-routes" | tee -a ".bench/report-$stamp.txt"
cp ".bench/report-$stamp.txt" .bench/report.txt
echo "bench: report written to .bench/report.txt" >&2
