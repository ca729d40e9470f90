#!/usr/bin/env bash
# gpugate PostgreSQL entrypoint. First start: initialises $PGDATA with the superuser `postgres`
# (no password: only the container's local socket, peer authentication) and the API's role
# POSTGRES_USER (default gpugate; LOGIN, not a superuser, owning database POSTGRES_DB and its
# schema; docker/postgres/roles.sql) with password POSTGRES_PASSWORD. Every start: sets that
# role's password to POSTGRES_PASSWORD, so the password file `make up` keeps stays the truth.
# Then runs the server as the postgres user in the foreground. Extra arguments go to `postgres`
# (e.g. -c max_connections=300).
set -euo pipefail
log() { echo "gpugate-postgres: $*" >&2; }

user=${POSTGRES_USER:-gpugate}
db=${POSTGRES_DB:-gpugate}
password=${POSTGRES_PASSWORD:-}
unset POSTGRES_PASSWORD
roles_sql=${GPUGATE_ROLES_SQL:-/usr/local/share/gpugate/roles.sql}
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; }
# Runs SQL from stdin in single-user mode (no server, no network), as the bootstrap superuser.
single() { as_postgres postgres --single -D "$PGDATA" -j postgres >/dev/null; }

name_re='^[a-z_][a-z0-9_]*$'
[[ $user =~ $name_re && $db =~ $name_re ]] ||
  { log "POSTGRES_USER \"$user\" and POSTGRES_DB \"$db\" must match $name_re"; exit 64; }
[[ $user != postgres ]] || { log "POSTGRES_USER must not be postgres (the superuser's name)"; exit 64; }
# URL-safe characters only: the password goes into the API's DATABASE_URL as it is, and into
# SQL quotes here.
[[ -z $password || $password =~ ^[A-Za-z0-9._~-]+$ ]] ||
  { log "POSTGRES_PASSWORD may hold only letters, digits and . _ ~ -"; exit 64; }

install -d -o postgres -g postgres -m 0700 "$PGDATA"
if [[ ! -s $PGDATA/PG_VERSION ]]; then
  [[ -n $password ]] || { log "POSTGRES_PASSWORD is required to initialise $PGDATA (make up generates one)"; exit 64; }
  log "initialising $PGDATA (superuser postgres, local socket only; role $user owning database $db)"
  as_postgres initdb -D "$PGDATA" -U postgres -E UTF8 --locale=C.UTF-8 \
    --auth-local=peer --auth-host=reject >/dev/null
  # Clients reach the server through Docker's port publishing, so they come from the bridge's
  # gateway address, not loopback: password login from anywhere, as the published port
  # decides, for every role but the superuser, which has no password and is refused over TCP.
  cat >"$PGDATA/pg_hba.conf" <<HBA
# TYPE  DATABASE  USER      ADDRESS  METHOD
local   all       all                peer
host    all       postgres  all      reject
host    all       all       all      scram-sha-256
HBA
  sql=$(<"$roles_sql")
  sql=${sql//@USER@/$user}
  sql=${sql//@DB@/$db}
  sql=${sql//@PASSWORD@/$password}
  single <<<"$sql"
elif [[ -n $password ]]; then
  # The password file may have been replaced (rotation); keep the role's password equal to it.
  single <<<"ALTER ROLE \"$user\" PASSWORD '$password';"
else
  log "POSTGRES_PASSWORD is not set: role $user keeps its password"
fi
unset password sql
exec setpriv --reuid=postgres --regid=postgres --init-groups -- \
  postgres -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/var/run/postgresql "$@"
