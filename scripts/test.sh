#!/usr/bin/env bash
# Runs every gpugate test: unit and crate tests, nginx tests over dist/, API tests over a
# PostgreSQL cluster this script starts (and stops) itself, and the end-to-end tests over the
# Docker images (built here first when missing or stale; docker/build-images.sh is cached), then
# Schemathesis against a real API process over its OpenAPI document (scripts/fuzz.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export NGX_CONFIGURE_ARGS="--with-stream_ssl_preread_module"
export GPUGATE_DIST="$PWD/dist"

# The house's arrows all point down: no source file imports one that imports it back.
scripts/import-circles.py

# The end-to-end tests (tests/tests/e2e_stack.rs) run the gateway and API images, which copy
# dist/ (`make test` runs `make build` first).
docker/build-images.sh

source scripts/pg.sh
pg_start
trap pg_stop EXIT

# --no-fail-fast: one failing test binary does not hide the results of the others (the
# end-to-end tests run last and take minutes; a failure elsewhere should not skip them).
cargo_rc=0
cargo test --release --workspace --locked --no-fail-fast -- --test-threads="${GPUGATE_TEST_THREADS:-2}" || cargo_rc=$?

# The fuzzer runs whatever the cargo tests said (its findings are worth having either way),
# on the same PostgreSQL, with a time budget of its own (GPUGATE_FUZZ_SECONDS).
fuzz_rc=0
scripts/fuzz.sh || fuzz_rc=$?
if ((cargo_rc != 0 || fuzz_rc != 0)); then
  echo "test.sh: cargo test exit $cargo_rc, fuzz exit $fuzz_rc" >&2
  exit 1
fi
