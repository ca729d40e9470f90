#!/usr/bin/env bash
# Runs the gpugate stack (gateway, API, PostgreSQL) on this machine with docker/compose.yaml.
#
#   scripts/up.sh up     build the images that are missing or stale, make the development TLS
#                        material (scripts/tls-dev.sh), start the stack, wait until the API is
#                        ready, create an API token and print how to use it
#   scripts/up.sh down   stop and remove the stack's containers (the database volume and the
#                        workspaces stay; `down --volumes` also drops the database)
#   scripts/up.sh demo   create a workspace through the API and open an SSH session into it
#                        through the gateway (runs `hostname` when stdin is not a terminal)
#
# `make up`, `make down` and `make demo` call it (after `make build`, which fills dist/). The
# compose file's variables (GPUGATE_API_LISTEN, GPUGATE_DOMAIN, ...; see docker/README.md)
# apply. The database password: GPUGATE_DB_PASSWORD if set, else the one in
# $GPUGATE_STATE_DIR/db-password (default .gpugate/, mode 0600), generated on the first run and
# reused by every later one (the database volume keeps the role it was made for). GPUGATE_TOKEN_USER names the user the token is made for (default
# "admin", an admin). The gateway's TLS port (GPUGATE_TLS_PORT, default 8443) serves every
# workspace by server name with a certificate from a development CA in GPUGATE_TLS_DIR (default
# $GPUGATE_STATE_DIR/tls, mounted into the gateway), made on the first run and kept.
# Needs docker, docker-compose, curl, python3, openssl, ssh and sshpass.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
project=${GPUGATE_STACK:-gpugate}
compose=(docker-compose -p "$project" -f docker/compose.yaml)
listen=${GPUGATE_API_LISTEN:-127.0.0.1:8080}
api=http://${listen/0.0.0.0/127.0.0.1}
user=${GPUGATE_TOKEN_USER:-admin}
state=${GPUGATE_STATE_DIR:-$root/.gpugate}
domain=${GPUGATE_DOMAIN:-gpu.example.com}
tls_port=${GPUGATE_TLS_PORT:-8443}
# Absolute: docker-compose resolves a relative host path against the compose file's folder
# (docker/), not against the directory it was started from.
tls_dir=${GPUGATE_TLS_DIR:-$state/tls}
[[ $tls_dir == /* ]] || tls_dir=$root/$tls_dir
export GPUGATE_TLS_DIR=$tls_dir

say() { printf '%s\n' "$*"; }
die() { printf 'gpugate: %s\n' "$*" >&2; exit 1; }
since() { echo "$(($(date +%s) - $1)) s"; }
# json EXPR: prints EXPR (Python, over the parsed document `d`) of the JSON on stdin.
json() { python3 -c 'import json, sys; d = json.load(sys.stdin); print(eval(sys.argv[1]))' "$1"; }

# The database password: GPUGATE_DB_PASSWORD, or the state file (made once, random, 0600).
db_password() {
  local f=$state/db-password
  if [[ -n ${GPUGATE_DB_PASSWORD:-} ]]; then
    return
  fi
  if [[ ! -s $f ]]; then
    install -d -m 0700 "$state"
    # 192 random bits, URL-safe characters (the password goes into the API's DATABASE_URL).
    (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(24))' >"$f.new") ||
      die "cannot write $f"
    mv -f "$f.new" "$f"
    say "generated the database password in $f (mode 0600; keep it with the database volume)"
  fi
  chmod 0600 "$f"
  GPUGATE_DB_PASSWORD=$(<"$f")
  [[ -n $GPUGATE_DB_PASSWORD ]] || die "$f is empty: remove it (and the database volume, \`down --volumes\`) or fill it"
  export GPUGATE_DB_PASSWORD
}

ready() { curl -fsS -m 3 "$api/readyz" >/dev/null 2>&1; }

token() {
  docker exec "$project-api" gpugate-api token create --user "$user" ${1:+"$1"} 2>/dev/null | tail -n 1
}

up() {
  local started t tok
  started=$(date +%s)
  for f in dist/sbin/nginx dist/modules/ngx_stream_gpugate_module.so dist/bin/gpugate-api dist/bin/gpugate-routes; do
    [[ -f $f ]] || die "$f is missing: run \`make build\` first (\`make up\` does)"
  done
  say "== images (docker/build-images.sh: builds only what is missing or changed)"
  docker/build-images.sh
  db_password
  say "== TLS (scripts/tls-dev.sh: development CA, made once, and the gateway's certificate)"
  scripts/tls-dev.sh "$tls_dir" "$domain" "${GPUGATE_WORKER_GROUP:-nogroup}"
  say "== starting the stack (docker-compose project \"$project\")"
  t=$(date +%s)
  "${compose[@]}" up -d
  say "== waiting for $api/readyz (database, Docker, route table)"
  for _ in $(seq 120); do
    ready && break
    sleep 1
  done
  if ! ready; then
    curl -sS -m 3 "$api/readyz" >&2 || true
    "${compose[@]}" logs --tail 20 >&2 || true
    die "the API is not ready after 120 s"
  fi
  say "ready in $(since "$t") (all of \`up\`: $(since "$started"))"
  tok=$(token --admin) || die "could not create a token"
  [[ -n $tok ]] || die "could not create a token"
  cat <<EOF

gpugate is running: gateway (nginx, host network, pools from nginx-conf/nginx.conf), API on
$api, PostgreSQL. API token for user "$user" (admin; shown once, keep it):

  export GPUGATE_TOKEN=$tok

Create a workspace (SSH, JupyterLab and a code editor; the answer holds ports and passwords,
and comes once every service answers, so the login below works at once):

  curl -sS -X POST -H "Authorization: Bearer \$GPUGATE_TOKEN" -H 'Content-Type: application/json' \\
    -d '{"name":"my-workspace","gpus":0,"wait":"ready"}' $api/api/v1/environments

then log in through the gateway with data.access_info.ssh (user remotegpu, its password):

  ssh -p <data.ports.ssh> remotegpu@127.0.0.1       # or data.access_info.ssh.command once DNS is set up

Delete it: curl -X DELETE -H "Authorization: Bearer \$GPUGATE_TOKEN" $api/api/v1/environments/<id>

Or with the client (dist/bin/gpugate; SSH by name through the TLS port, no openssl needed):

  dist/bin/gpugate login $api --gateway 127.0.0.1 --ca $tls_dir/ca.crt <<<"\$GPUGATE_TOKEN"
  dist/bin/gpugate keys add ~/.ssh/id_ed25519.pub && dist/bin/gpugate create my-workspace --wait
  dist/bin/gpugate ssh my-workspace     # or: dist/bin/gpugate config-ssh, then ssh my-workspace
Or run \`make demo\` (creates one and logs you in); \`make down\` stops the stack.

TLS by server name, one port for every workspace (GPUGATE_TLS_PORT=$tls_port), with a certificate
from the development CA in $tls_dir (its README says more):

  https://<id>.jupyter.$domain:$tls_port/    https://<id>.code.$domain:$tls_port/
  ssh -o ProxyCommand='openssl s_client -quiet -verify_return_error -CAfile $tls_dir/ca.crt -servername %h -verify_hostname %h -connect 127.0.0.1:$tls_port' remotegpu@<id>.ssh.$domain

Trust the CA once (it is kept across runs): \`curl --cacert $tls_dir/ca.crt ...\`, or
  Debian: sudo cp $tls_dir/ca.crt /usr/local/share/ca-certificates/gpugate-dev.crt && sudo update-ca-certificates
  macOS (a copy of ca.crt): sudo security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain ca.crt

Resolve the names to this machine without DNS, any of:
  curl --cacert $tls_dir/ca.crt --resolve <id>.jupyter.$domain:$tls_port:127.0.0.1 https://<id>.jupyter.$domain:$tls_port/
  /etc/hosts, a line per workspace: 127.0.0.1 <id>.jupyter.$domain <id>.code.$domain <id>.ssh.$domain
  a wildcard record per service (\`gpugate-api dns\`), or dnsmasq: address=/jupyter.$domain/127.0.0.1
EOF
}

down() {
  local n
  "${compose[@]}" down "$@"
  n=$(docker ps -q --filter label=gpugate.managed=true | wc -l)
  if ((n)); then
    say "gpugate: $n workspace container(s) left running (the next \`make up\` takes them back);"
    say "  remove them with: docker ps -q --filter label=gpugate.managed=true | xargs -r docker rm -f"
  fi
}

demo() {
  local tok body out id port pass
  ready || up
  tok=$(token) || die "could not create a token"
  # wait: ready answers once every service answers at its address (a login works), so the
  # ssh below needs no retry.
  body='{"name":"demo","gpus":0,"wait":"ready"}'
  out=$(curl -sS -X POST -H "Authorization: Bearer $tok" -H 'Content-Type: application/json' \
    -d "$body" "$api/api/v1/environments") || die "create failed"
  id=$(json 'd["data"]["id"]' <<<"$out" 2>/dev/null) || die "create failed: $out"
  port=$(json 'd["data"]["ports"]["ssh"]' <<<"$out")
  pass=$(json 'd["data"]["access_info"]["ssh"]["password"]' <<<"$out")
  say "created workspace $id (names on the TLS port: trust .gpugate/tls/ca.crt and resolve them, as printed by make up):"
  say "  ssh      ssh -p $port remotegpu@127.0.0.1   password $pass"
  # By pool port when there is one, else by name on the TLS port (trust the CA and resolve the
  # name as `make up` printed).
  json '"\n".join(x for x in [
      ("  jupyter  http://127.0.0.1:%d/lab?token=%s" % (d["data"]["ports"]["jupyter"], d["data"]["access_info"]["jupyter"]["token"])
        if "jupyter" in d["data"]["ports"] else
       "  jupyter  %slab?token=%s" % (d["data"]["access_info"]["jupyter"]["url"], d["data"]["access_info"]["jupyter"]["token"]))
        if "jupyter" in d["data"]["access_info"] else "",
      ("  code     http://127.0.0.1:%d/   password %s" % (d["data"]["ports"]["code"], d["data"]["access_info"]["code_server"]["password"])
        if "code" in d["data"]["ports"] else
       "  code     %s   password %s" % (d["data"]["access_info"]["code_server"]["url"], d["data"]["access_info"]["code_server"]["password"]))
        if "code_server" in d["data"]["access_info"] else ""] if x)' <<<"$out"
  say "  delete:  curl -X DELETE -H 'Authorization: Bearer $tok' $api/api/v1/environments/$id"
  local ssh=(ssh -p "$port" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null
    -o LogLevel=ERROR -o ConnectTimeout=5 -o PubkeyAuthentication=no remotegpu@127.0.0.1)
  export SSHPASS=$pass
  [[ $(json 'd["data"]["readiness"]["ssh"]["ready"]' <<<"$out") == True ]] ||
    die "the workspace's SSH did not become ready: $(json 'd["data"]["readiness"]["ssh"]' <<<"$out")"
  if [[ -t 0 ]]; then
    say "== ssh -p $port remotegpu@127.0.0.1 (through the gateway; exit to leave)"
    exec sshpass -e "${ssh[@]}"
  fi
  say "== ssh -p $port remotegpu@127.0.0.1 hostname (stdin is not a terminal)"
  sshpass -e "${ssh[@]}" hostname </dev/null
}

case ${1:-up} in
  up) up ;;
  down) shift; down "$@" ;;
  demo) demo ;;
  *) die "usage: $0 up|down [--volumes]|demo" ;;
esac
