#!/usr/bin/env bash
# Runs every gpugate test: unit and crate tests, nginx tests over dist/, API tests over a
# PostgreSQL cluster this script starts (and stops) itself.
set -euo pipefail
cd "$(dirname "$0")/.."
export NGX_CONFIGURE_ARGS="--with-stream_ssl_preread_module"
export GPUGATE_DIST="$PWD/dist"

source scripts/pg.sh
pg_start
trap pg_stop EXIT

cargo test --release --workspace --locked -- --test-threads="${GPUGATE_TEST_THREADS:-2}"
