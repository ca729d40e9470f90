#!/usr/bin/env bash
# gpugate PostgreSQL entrypoint: initialises $PGDATA on first start (superuser POSTGRES_USER with
# POSTGRES_PASSWORD, database POSTGRES_DB, password login over TCP), then runs the server as the
# postgres user in the foreground. Extra arguments go to `postgres` (e.g. -c max_connections=300).
set -euo pipefail
log() { echo "gpugate-postgres: $*" >&2; }

user=${POSTGRES_USER:-gpugate}
db=${POSTGRES_DB:-gpugate}
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; }

install -d -o postgres -g postgres -m 0700 "$PGDATA"
if [[ ! -s $PGDATA/PG_VERSION ]]; then
  [[ -n ${POSTGRES_PASSWORD:-} ]] || { log "POSTGRES_PASSWORD is required to initialise $PGDATA"; exit 64; }
  log "initialising $PGDATA (superuser $user, database $db)"
  pwfile=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
  chown postgres "$pwfile"
  as_postgres initdb -D "$PGDATA" -U "$user" --pwfile="$pwfile" -E UTF8 --locale=C.UTF-8 \
    --auth-local=peer --auth-host=scram-sha-256 >/dev/null
  rm -f "$pwfile"
  # Clients reach the server through Docker's port publishing, so they come from the bridge's
  # gateway address, not loopback: password login from anywhere, as the published port decides.
  echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
  if [[ $db != postgres ]]; then
    as_postgres postgres --single -D "$PGDATA" -j postgres >/dev/null <<<"CREATE DATABASE \"$db\" OWNER \"$user\";"
  fi
fi
unset POSTGRES_PASSWORD
exec setpriv --reuid=postgres --regid=postgres --init-groups -- \
  postgres -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/var/run/postgresql "$@"
