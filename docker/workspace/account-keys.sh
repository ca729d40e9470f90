#!/bin/sh
# gpugate-account-keys GENERATION PASSWORD_LOGIN [KEY...]
#
# Brings this workspace's SSH server to its owner's account keys and the deployment's password
# setting: writes KEY... (one OpenSSH public key each, vetted by the API) to the file sshd reads
# besides the user's own ~/.ssh/authorized_keys, and turns password login on (yes) or off (no),
# reloading sshd only when that changes (open sessions stay). Run as root by the entrypoint at
# start and by the gpugate API (docker exec) on every change. It never goes back: a GENERATION
# older than the one in place changes nothing and prints "stale"; otherwise it prints "ok".
set -eu

keys_file=/etc/ssh/gpugate_account_keys
password_conf=/etc/ssh/sshd_config.d/05-gpugate-password.conf

fail() { echo "gpugate-account-keys: $*" >&2; exit 64; }
[ "$(id -u)" = 0 ] || fail "must run as root"
[ $# -ge 2 ] || fail "usage: gpugate-account-keys GENERATION yes|no [KEY...]"
generation=$1
password=$2
shift 2
case $generation in '' | *[!0-9]*) fail "GENERATION must be a whole number, not '$generation'" ;; esac
case $password in yes | no) ;; *) fail "PASSWORD_LOGIN must be yes or no, not '$password'" ;; esac
for key in "$@"; do
  case $key in *"
"*) fail "a key must be one line" ;; esac
done

# One change at a time (two API processes may bring the same workspace at once).
exec 9>/run/gpugate-account-keys.lock
flock 9

have=$(sed -n '1s/^# generation \([0-9][0-9]*\)$/\1/p' "$keys_file" 2>/dev/null || true)
if [ -n "$have" ] && [ "$have" -gt "$generation" ]; then
  echo stale
  exit 0
fi
{
  echo "# generation $generation"
  for key in "$@"; do printf '%s\n' "$key"; done
} >"$keys_file.new"
chmod 0644 "$keys_file.new"
mv -f "$keys_file.new" "$keys_file"

# The first value sshd reads wins, and this file sorts before 10-gpugate.conf.
want="PasswordAuthentication $password"
if [ "$(cat "$password_conf" 2>/dev/null || true)" != "$want" ]; then
  printf '%s\n' "$want" >"$password_conf.new"
  mv -f "$password_conf.new" "$password_conf"
  # A running sshd reads its configuration again on SIGHUP (sessions keep their processes).
  if [ -s /run/sshd.pid ]; then
    kill -HUP "$(cat /run/sshd.pid)" 2>/dev/null || true
  fi
fi
echo ok
