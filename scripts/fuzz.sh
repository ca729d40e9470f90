#!/usr/bin/env bash
# Fuzzes the control API against its own OpenAPI document with Schemathesis: a real
# `gpugate-api` process on loopback (real PostgreSQL, real Docker, the tiny test image, stand-in
# GPU nodes), authenticated as an ordinary user, every operation, every phase (the documented
# examples, boundary values, random data, and stateful sequences that follow the document's
# links: create -> get -> access -> stop -> start -> delete). Checks: no 5xx, only documented
# status codes and content types, bodies matching their schemas. Fails when Schemathesis finds
# anything. Afterwards every environment it made is deleted through the API, and the run fails
# if one is left in the database or in Docker.
#
# `make fuzz` runs it alone; scripts/test.sh runs it after the cargo tests. Schemathesis comes
# from PyPI, pinned, into a virtual environment under target/ (made once). Variables:
#   GPUGATE_FUZZ_SECONDS   time budget of the Schemathesis run (default 150)
#   GPUGATE_FUZZ_EXAMPLES  most examples per operation and phase (default 100)
#   GPUGATE_FUZZ_SEED      a seed, to replay a run (default: random; printed by Schemathesis)
#   GPUGATE_API_BIN        the binary (default target/release/gpugate-api; `make build` makes it)
#   DATABASE_URL           a PostgreSQL superuser URL; without it a throw-away cluster is started
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

SCHEMATHESIS_VERSION=4.32.5
VALIDATOR_VERSION=0.7.2
IMAGE=gpugate-test/tiny:1
venv=$root/target/fuzz-venv
api_bin=${GPUGATE_API_BIN:-$root/target/release/gpugate-api}
seconds=${GPUGATE_FUZZ_SECONDS:-150}
examples=${GPUGATE_FUZZ_EXAMPLES:-100}

say() { printf 'fuzz: %s\n' "$*"; }
die() { printf 'fuzz: %s\n' "$*" >&2; exit 1; }

[[ -x $api_bin ]] || die "$api_bin missing: run make build first"

# Schemathesis and an OpenAPI validator, pinned, in their own virtual environment
# (python3-venv: scripts/install-deps.sh); remade when the pins change.
pins="schemathesis==$SCHEMATHESIS_VERSION openapi-spec-validator==$VALIDATOR_VERSION"
if [[ "$(cat "$venv/pins" 2>/dev/null)" != "$pins" ]]; then
  say "installing $pins into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check $pins
  echo "$pins" >"$venv/pins"
fi

# The image the workspaces run (built from host binaries, as the API tests do, when missing).
docker image inspect "$IMAGE" >/dev/null 2>&1 || bash control-api/tests/image/build.sh "$IMAGE"

source scripts/pg.sh
pg_start
admin_url=$DATABASE_URL

suffix=$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
deployment=fuzz$suffix
db=gg_fuzz_$suffix
work=$(mktemp -d /tmp/gpugate-fuzz.XXXXXX)
db_url="${admin_url%/*}/$db"
api_pid=
port=

# A loopback port below the kernel's ephemeral range (never autobound by an outgoing
# connection before the API binds it).
for p in $(seq $((28000 + RANDOM % 900)) 28999); do
  if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then port=$p; break; fi
done
[[ -n $port ]] || die "no free port in 28000-28999"
api=http://127.0.0.1:$port

cleanup() {
  local rc=$?
  if [[ -n $api_pid ]] && kill -0 "$api_pid" 2>/dev/null; then
    kill -TERM "$api_pid" 2>/dev/null || true
    wait "$api_pid" 2>/dev/null || true
  fi
  # Whatever a failed run left: containers, home volumes, the workspace network, by label.
  local ids
  ids=$(docker ps -aq --filter "label=gpugate.deployment=$deployment")
  [[ -z $ids ]] || docker rm -f -v $ids >/dev/null 2>&1 || true
  ids=$(docker volume ls -q --filter "label=gpugate.deployment=$deployment")
  [[ -z $ids ]] || docker volume rm -f $ids >/dev/null 2>&1 || true
  ids=$(docker network ls -q --filter "label=gpugate.deployment=$deployment")
  [[ -z $ids ]] || docker network rm $ids >/dev/null 2>&1 || true
  psql -q "$admin_url" -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$work"
  pg_stop
  exit "$rc"
}
trap cleanup EXIT

psql -q "$admin_url" -c "CREATE DATABASE \"$db\"" >/dev/null
# Stand-in GPU device nodes (the device numbers of /dev/null), passed in mode `nodes`.
for i in 0 1; do mknod "$work/nvidia$i" c 1 3; done

export DATABASE_URL=$db_url
export GPUGATE_LISTEN=127.0.0.1:$port
export GPUGATE_ROUTE_TABLE=$work/table/routes
export GPUGATE_DEPLOYMENT=$deployment
export GPUGATE_DEFAULT_IMAGE=$IMAGE
export GPUGATE_ALLOWED_IMAGES='gpugate-test/*'
export GPUGATE_GPUS=0,1 GPUGATE_GPU_MODE=nodes GPUGATE_GPU_NODE_PATH="$work/nvidia{index}"
# Pools far larger than the quota lets the fuzzer hold, so no create meets an empty pool.
export GPUGATE_POOL_SSH=24000-24199 GPUGATE_POOL_JUPYTER=24200-24399 GPUGATE_POOL_CODE=24400-24599
export GPUGATE_POOL_RDP=24600-24799
export GPUGATE_QUARANTINE_S=5 GPUGATE_RECONCILE_INTERVAL_S=3600 GPUGATE_ROUTE_WAIT_MS=3000
export GPUGATE_DOCKER_STOP_TIMEOUT_S=1
# The tiny image serves nothing: a create or start with wait=ready waits out the readiness
# deadlines, so they are short here (the fuzzer sends wait=ready too).
export GPUGATE_READINESS_SSH_DEADLINE_S=2 GPUGATE_READINESS_JUPYTER_DEADLINE_S=2
export GPUGATE_READINESS_CODE_DEADLINE_S=2 GPUGATE_READINESS_RDP_DEADLINE_S=2
# The default quotas (10 environments, 4 GPUs) bound what the fuzzer can hold at once; the rate
# limits are off so the fuzzer's pace (and its requests without a token) is not what is tested.
export GPUGATE_RATE_LIMIT_PER_S=0 GPUGATE_RATE_LIMIT_FAILED_AUTH_PER_MIN=0
export GPUGATE_LOG=${GPUGATE_LOG:-warn}
unset GPUGATE_CONFIG

"$api_bin" migrate >/dev/null 2>&1 || die "migrations failed"
token=$("$api_bin" token create --user fuzz 2>/dev/null | tail -n 1)
[[ $token == ggt_* ]] || die "no token"

"$api_bin" serve >"$work/api.log" 2>&1 &
api_pid=$!
for _ in $(seq 1 600); do
  curl -fsS -m 2 "$api/readyz" >/dev/null 2>&1 && break
  kill -0 "$api_pid" 2>/dev/null || { cat "$work/api.log" >&2; die "the API exited"; }
  sleep 0.1
done
curl -fsS -m 2 "$api/readyz" >/dev/null || { cat "$work/api.log" >&2; die "the API is not ready"; }
curl -fsS -m 10 "$api/api/v1/openapi.json" >"$work/openapi.json"
"$venv/bin/openapi-spec-validator" "$work/openapi.json" || die "the served document is not valid OpenAPI"
say "API ready at $api (deployment $deployment); fuzzing for up to ${seconds}s"

started=$(date +%s)
st_rc=0
"$venv/bin/st" run "$api/api/v1/openapi.json" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  --header "Authorization: Bearer $token" \
  --phases examples,coverage,fuzzing,stateful \
  --max-examples "$examples" \
  --max-time "$seconds" \
  --request-timeout 60 \
  --workers 1 \
  --no-color \
  ${GPUGATE_FUZZ_SEED:+--seed "$GPUGATE_FUZZ_SEED"} || st_rc=$?
say "schemathesis finished in $(($(date +%s) - started)) s (exit $st_rc)"

# Clean up through the API, as a user would: delete every environment the fuzzer left. A
# request Schemathesis gave up on at its time limit may still be creating (or waiting for
# readiness) in the API, so the list is taken again until nothing is left (a minute at most).
deleted=0
for _ in $(seq 20); do
  ids=$(curl -fsS -m 30 -H "Authorization: Bearer $token" "$api/api/v1/environments" |
    python3 -c 'import json, sys; print(" ".join(e["id"] for e in json.load(sys.stdin)["data"]))')
  [[ -z $ids ]] && break
  for id in $ids; do
    code=$(curl -sS -m 120 -o /dev/null -w '%{http_code}' -X DELETE -H "Authorization: Bearer $token" "$api/api/v1/environments/$id")
    [[ $code == 200 ]] && deleted=$((deleted + 1))
  done
  sleep 3
done
left=$(psql -qtA "$db_url" -c "SELECT count(*) FROM environments WHERE status <> 'deleted'")
containers=$(docker ps -aq --filter "label=gpugate.deployment=$deployment" | wc -l)
say "deleted $deleted environments; left: $left in the database, $containers containers"
if ((st_rc != 0)); then
  tail -n 50 "$work/api.log" >&2
  die "schemathesis found failures (above)"
fi
((left == 0 && containers == 0)) || die "environments left behind after the fuzz run"
say "passed"
