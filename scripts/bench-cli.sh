#!/usr/bin/env bash
# The route-table CLI at operator speed, a section of `make bench` that also runs alone:
# single `gpugate-routes set` commands, a process per change (the baseline, what an operator's
# loop does), against one `gpugate-routes apply` of a file of `set` lines. Both change routes
# on an initialised table; both rates are wall time from the first process start to the last
# exit. Prints the section in gpugate-bench's report format: ours, baseline, ratio, target.
#
#   scripts/bench-cli.sh [PATH-TO-gpugate-routes]    (default: target/release/gpugate-routes)
#
# Sizes: GPUGATE_BENCH_CLI_SINGLE single commands (300), GPUGATE_BENCH_CLI_LINES apply lines
# (10,000). Needs only the gpugate-routes binary (cargo build --release -p gpugate-routes).
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-${CARGO_TARGET_DIR:-target}/release/gpugate-routes}"
single="${GPUGATE_BENCH_CLI_SINGLE:-300}"
lines="${GPUGATE_BENCH_CLI_LINES:-10000}"
if [ ! -x "$bin" ]; then
  echo "bench-cli: no $bin; build it with: cargo build --release -p gpugate-routes" >&2
  exit 1
fi
if [ "$single" -gt 40000 ] || [ "$lines" -gt 60000 ]; then
  echo "bench-cli: at most 40,000 single commands and 60,000 apply lines (one port each)" >&2
  exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/gpugate-bench-cli.XXXXXX")
chmod 755 "$work"
trap 'rm -rf "$work"' EXIT

now_ns() { date +%s%N; }
# 12345.6 -> 12,346
thousands() { printf '%.0f' "$1" | sed -e ':a' -e 's/\([0-9]\)\([0-9]\{3\}\)\($\|,\)/\1,\2\3/' -e 'ta'; }
# The report's row: what, ours, baseline, ours/base, target (as gpugate-bench prints it).
row() { printf '  %-34s %18s %18s %10s  %s\n' "$@" | sed 's/ *$//'; }

# Baseline: a process per change.
"$bin" --table "$work/single" init >/dev/null
t0=$(now_ns)
for ((i = 0; i < single; i++)); do
  "$bin" --table "$work/single" set $((20000 + i)) 127.0.0.1:22 --env benchcli --service ssh >/dev/null
done
t1=$(now_ns)

# Ours: the same change, one per line, one process, one writer lock.
awk -v n="$lines" 'BEGIN {
  for (i = 0; i < n; i++) printf "set %d 127.0.0.1:22 --env benchcli --service ssh\n", 2000 + i
}' >"$work/changes"
"$bin" --table "$work/apply" init >/dev/null
t2=$(now_ns)
if ! "$bin" --table "$work/apply" apply "$work/changes" 2>"$work/apply.log"; then
  cat "$work/apply.log" >&2
  exit 1
fi
t3=$(now_ns)
applied=$(sed -n 's/^applied \([0-9]*\), failed 0,.*/\1/p' "$work/apply.log")
if [ "$applied" != "$lines" ]; then
  echo "bench-cli: apply applied ${applied:-nothing} of $lines lines:" >&2
  cat "$work/apply.log" >&2
  exit 1
fi

read -r base_rate ours_rate ratio base_ms ours_ms ms_ratio met < <(awk \
  -v n1="$single" -v d1="$((t1 - t0))" -v n2="$lines" -v d2="$((t3 - t2))" 'BEGIN {
  b = n1 / (d1 / 1e9); o = n2 / (d2 / 1e9)
  printf "%f %f %.1f %.3f %.4f %.5f %s\n", b, o, o / b, 1000 / b, 1000 / o, b / o, (o >= 20000 ? "met" : "MISSED")
}')

echo
echo "CLI: gpugate-routes changes/s, wall time from the first process start to the last exit"
echo "  ours: one apply of a file of $(thousands "$lines") set lines; baseline: $(thousands "$single") single set"
echo "  commands, a process per change; both on an initialised table"
row "changes/s" "$(thousands "$ours_rate")" "$(thousands "$base_rate") single" "$ratio" \
  ">= 20,000/s  $met"
row "ms per change" "$ours_ms" "$base_ms" "$ms_ratio" ""
echo "  apply's own summary (from its writer lock on): $(cat "$work/apply.log")"
