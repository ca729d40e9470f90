#!/usr/bin/env bash
# Control-plane benchmark: port allocation (ours vs the seed's method, two processes),
# placement throughput on two hosts (ours vs a global lock, two processes), route activation
# latency (one table, then two publisher processes with a table each), create latency by step,
# and the gateways' activity reports (`scripts/bench-api.sh activity` runs that row alone).
# Prints ratios side by side; never fails on absolute times. Starts its own throw-away
# PostgreSQL (unless DATABASE_URL is set) and builds the small test image if Docker lacks it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pg.sh
pg_start
trap pg_stop EXIT
docker image inspect gpugate-test/tiny:1 >/dev/null 2>&1 || bash control-api/tests/image/build.sh gpugate-test/tiny:1
# The gateway row spawns `gpugate-api publish` from the benchmark's own directory.
cargo build --release -p gpugate-api --bin gpugate-api-bench --bin gpugate-api
"${CARGO_TARGET_DIR:-target}/release/gpugate-api-bench" "$@"
