#!/usr/bin/env bash
# Checks the workspace image the way a user would: starts one container with ports published on
# loopback, logs in over SSH with the password and with a key, copies a file in and back with
# scp, asks JupyterLab for /api/status with the token, logs in to marimo on the code port, and
# removes the container. Needs the OpenSSH client and curl on the host.
#
#   docker/workspace/selftest.sh [IMAGE]     (default gpugate/workspace:latest)
set -euo pipefail
image=${1:-gpugate/workspace:latest}
name=gpugate-selftest-$$
tmp=$(mktemp -d)
trap 'docker rm -f "$name" >/dev/null 2>&1 || true; rm -rf "$tmp"' EXIT

fail() { echo "selftest: FAIL: $*" >&2; exit 1; }
ok() { echo "selftest: ok: $*"; }

password="pw-$(head -c 9 /dev/urandom | od -An -tx1 | tr -d ' \n'):x y"
token=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
env_id=selftest$$
ssh-keygen -q -t ed25519 -N '' -f "$tmp/key"
started=$(date +%s.%N)
docker run -d --name "$name" --hostname "$env_id" \
  -p 127.0.0.1::22 -p 127.0.0.1::8888 -p 127.0.0.1::8080 \
  -e GPUGATE_PASSWORD="$password" -e GPUGATE_JUPYTER_TOKEN="$token" \
  -e GPUGATE_SSH_PUBLIC_KEYS="$(cat "$tmp/key.pub")" -e GPUGATE_ENV_ID="$env_id" \
  "$image" >/dev/null
port() { docker port "$name" "$1" | head -n1 | sed 's/.*://'; }
ssh_port=$(port 22) jupyter_port=$(port 8888) code_port=$(port 8080)

opts=(-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR
  -o ConnectTimeout=5)
# The password reaches ssh through SSH_ASKPASS (no sshpass needed).
printf '#!/bin/sh\ncat %q\n' "$tmp/password" >"$tmp/askpass"
printf '%s\n' "$password" >"$tmp/password"
chmod +x "$tmp/askpass"
ssh_password() {
  SSH_ASKPASS="$tmp/askpass" SSH_ASKPASS_REQUIRE=force DISPLAY=none setsid -w \
    ssh "${opts[@]}" -o PubkeyAuthentication=no -o NumberOfPasswordPrompts=1 \
    -p "$ssh_port" remotegpu@127.0.0.1 "$@" </dev/null
}
ssh_key() { ssh "${opts[@]}" -o BatchMode=yes -i "$tmp/key" -p "$ssh_port" remotegpu@127.0.0.1 "$@"; }

# Ready when JupyterLab answers (sshd and marimo start sooner or in parallel).
for _ in $(seq 150); do
  curl -fsS "http://127.0.0.1:$jupyter_port/api/status?token=$token" >"$tmp/status" 2>/dev/null && break
  sleep 0.2
done
grep -q '"started"' "$tmp/status" || fail "JupyterLab did not answer /api/status (docker logs $name)"
ok "JupyterLab /api/status answers with the token after $(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f s", b - a }')"
code=$(curl -sS -o /dev/null -w '%{http_code}' "http://127.0.0.1:$jupyter_port/api/status?token=wrong")
[[ $code == 403 ]] || fail "JupyterLab answered $code to a wrong token"
ok "JupyterLab refuses a wrong token (403)"

[[ $(ssh_password hostname) == "$env_id" ]] || fail "password login did not run hostname"
ok "ssh with the password runs hostname ($env_id)"
[[ $(ssh_key hostname) == "$env_id" ]] || fail "key login did not run hostname"
ok "ssh with the key runs hostname"
printf 'wrong\n' >"$tmp/password"
! ssh_password true 2>/dev/null || fail "a wrong password was accepted"
ok "a wrong password is refused"
! ssh "${opts[@]}" -o BatchMode=yes -i "$tmp/key" -p "$ssh_port" root@127.0.0.1 true 2>/dev/null ||
  fail "root login was accepted"
ok "root login is refused"

head -c 1048576 /dev/urandom >"$tmp/blob"
scp -q "${opts[@]}" -i "$tmp/key" -P "$ssh_port" "$tmp/blob" remotegpu@127.0.0.1:blob
scp -q "${opts[@]}" -i "$tmp/key" -P "$ssh_port" remotegpu@127.0.0.1:blob "$tmp/blob.back"
cmp -s "$tmp/blob" "$tmp/blob.back" || fail "scp round trip changed the file"
ok "scp copies 1 MiB in and back unchanged"

for _ in $(seq 50); do
  curl -fsS "http://127.0.0.1:$code_port/health" >/dev/null 2>&1 && break
  sleep 0.2
done
final=$(curl -sS -L -c "$tmp/jar" -b "$tmp/jar" -o /dev/null -w '%{http_code} %{url_effective}' \
  "http://127.0.0.1:$code_port/?access_token=$(printf %s "$password" | sed 's/:/%3A/g; s/ /%20/g')")
[[ $final == "200 http://127.0.0.1:$code_port/" ]] || fail "marimo login with the password: $final"
ok "marimo on the code port logs in with the password"
final=$(curl -sS -L -o /dev/null -w '%{url_effective}' "http://127.0.0.1:$code_port/?access_token=wrong")
[[ $final == *"/auth/login"* ]] || fail "marimo let a wrong password in"
ok "marimo refuses a wrong password"

! docker logs "$name" 2>&1 | grep -qF -e "$token" -e "$password" || fail "a secret is in the container log"
ok "no secret in the container log"
echo "selftest: all checks passed ($image)"
