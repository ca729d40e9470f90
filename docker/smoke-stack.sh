#!/usr/bin/env bash
# Smoke test of the compose stack as built by build-images.sh: starts gateway, API and
# PostgreSQL as a separate stack ("gpugate-smoke": own container names, database port, route
# directory, small private port pools) so it can run beside a real one, creates a workspace
# through the API, and checks through the gateway: SSH login and hostname, scp round trip,
# JupyterLab /api/status, the code port; then a gateway restart, delete -> port refused, and
# tears everything down. Needs the OpenSSH client, curl and python3 on the host.
#
#   docker/smoke-stack.sh            (base port 27000: pools 27000-27039, API on 127.0.0.1:27080)
#   GPUGATE_SMOKE_PORT=28000 docker/smoke-stack.sh
set -euo pipefail
docker_dir=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$docker_dir")
base=${GPUGATE_SMOKE_PORT:-27000}
work=$(mktemp -d)

export GPUGATE_STACK=gpugate-smoke GPUGATE_ROUTE_DIR=/dev/shm/gpugate-smoke
export GPUGATE_DB_PORT=$((base + 81)) GPUGATE_API_LISTEN=127.0.0.1:$((base + 80))
export GPUGATE_DEPLOYMENT=smoke GPUGATE_DB_PASSWORD=smoke-$$ GPUGATE_QUARANTINE_S=5
export GPUGATE_POOL_SSH=$base-$((base + 9)) GPUGATE_POOL_JUPYTER=$((base + 10))-$((base + 19))
export GPUGATE_POOL_CODE=$((base + 20))-$((base + 29)) GPUGATE_POOL_RDP=$((base + 30))-$((base + 39))
api=http://$GPUGATE_API_LISTEN
compose=(docker-compose -p gpugate-smoke -f "$docker_dir/compose.yaml" -f "$work/override.yaml")

cleanup() {
  "${compose[@]}" down -v >/dev/null 2>&1 || true
  docker ps -aq --filter label=gpugate.deployment=smoke | xargs -r docker rm -f >/dev/null
  rm -rf "$work" "$GPUGATE_ROUTE_DIR"
}
trap cleanup EXIT
fail() { echo "smoke: FAIL: $*" >&2; docker logs "$GPUGATE_STACK-api" 2>&1 | tail -n 20 >&2; exit 1; }
ok() { echo "smoke: ok: $*"; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval('d' + sys.argv[1]))" "$1"; }

# The image's nginx.conf with each `listen <range>;` replaced by one of the private pools (the
# module routes by port, so which server block holds which pool does not matter).
awk -v b="$base" '/^[[:space:]]*listen[[:space:]]+[0-9]+-[0-9]+;/ {
    sub(/listen[[:space:]]+[0-9]+-[0-9]+;/, "listen " b + 10 * n "-" b + 10 * n + 9 ";"); n++ }
  { print }' "$root/nginx-conf/nginx.conf" >"$work/nginx.conf"
cat >"$work/override.yaml" <<YAML
version: "2.4"
services:
  gateway:
    volumes:
      - $work/nginx.conf:/usr/local/nginx/conf/nginx.conf:ro
YAML

started=$(date +%s)
"${compose[@]}" up -d >/dev/null 2>&1 || fail "docker-compose up"
for _ in $(seq 60); do
  [[ $(docker inspect -f '{{.State.Health.Status}}' "$GPUGATE_STACK-api" 2>/dev/null) == healthy ]] && break
  sleep 1
done
curl -fsS "$api/healthz" >/dev/null || fail "the API is not healthy"
ok "stack up and healthy in $(($(date +%s) - started)) s"

token=$(docker exec "$GPUGATE_STACK-api" gpugate-api token create --user smoke 2>/dev/null | tail -n 1)
ssh-keygen -q -t ed25519 -N '' -f "$work/key"
body=$(printf '{"name":"smoke","gpus":0,"ssh_public_keys":["%s"]}' "$(cat "$work/key.pub")")
curl -fsS -X POST -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
  -d "$body" "$api/api/v1/environments" >"$work/env.json" || fail "create"
id=$(json '["data"]["id"]' <"$work/env.json")
ssh_port=$(json '["data"]["ports"]["ssh"]' <"$work/env.json")
jupyter_port=$(json '["data"]["ports"]["jupyter"]' <"$work/env.json")
code_port=$(json '["data"]["ports"]["code"]' <"$work/env.json")
jupyter_token=$(json '["data"]["access_info"]["jupyter"]["token"]' <"$work/env.json")
ok "created workspace $id (ssh $ssh_port, jupyter $jupyter_port, code $code_port)"

opts=(-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR
  -o BatchMode=yes -o ConnectTimeout=5 -i "$work/key")
ssh_gw() { ssh "${opts[@]}" -p "$ssh_port" remotegpu@127.0.0.1 "$@"; }
for _ in $(seq 50); do ssh_gw true 2>/dev/null && break; sleep 0.2; done
[[ $(ssh_gw hostname) == "$id" ]] || fail "ssh through the gateway did not reach $id"
ok "ssh through the gateway runs hostname: $id"
head -c 1048576 /dev/urandom >"$work/blob"
scp -q "${opts[@]}" -P "$ssh_port" "$work/blob" remotegpu@127.0.0.1:blob
scp -q "${opts[@]}" -P "$ssh_port" remotegpu@127.0.0.1:blob "$work/blob.back"
cmp -s "$work/blob" "$work/blob.back" || fail "scp round trip"
ok "scp through the gateway: 1 MiB in and back unchanged"
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$jupyter_port/api/status?token=$jupyter_token" >/dev/null 2>&1 && break
  sleep 0.2
done
curl -fsS "http://127.0.0.1:$jupyter_port/api/status?token=$jupyter_token" | grep -q started ||
  fail "JupyterLab through the gateway"
ok "JupyterLab /api/status through the gateway"
for _ in $(seq 50); do curl -fsS "http://127.0.0.1:$code_port/health" >/dev/null 2>&1 && break; sleep 0.2; done
curl -fsS "http://127.0.0.1:$code_port/health" >/dev/null || fail "code port through the gateway"
ok "code port (marimo) answers through the gateway"

docker restart "$GPUGATE_STACK-gateway" >/dev/null
for _ in $(seq 50); do ssh_gw true 2>/dev/null && break; sleep 0.1; done
[[ $(ssh_gw hostname) == "$id" ]] || fail "ssh after a gateway restart"
ok "routes survive a gateway restart"

curl -fsS -X DELETE -H "Authorization: Bearer $token" "$api/api/v1/environments/$id" >/dev/null ||
  fail "delete"
! ssh_gw true 2>/dev/null || fail "the ssh port still answers after delete"
[[ -z $(docker ps -aq --filter "label=gpugate.env_id=$id") ]] || fail "the container is still there"
ok "delete: the ssh port refuses, the container is gone"
echo "smoke: all checks passed in $(($(date +%s) - started)) s"
