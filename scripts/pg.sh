# Sourced by test and bench scripts: a throw-away PostgreSQL 15 cluster on loopback.
# pg_start exports DATABASE_URL (a superuser URL; tests create a database each); pg_stop ends it.
# If DATABASE_URL is already set, both do nothing and that server is used.

pg_bin() {
  local d
  for d in /usr/lib/postgresql/15/bin /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && { echo "$d"; return; }
  done
  echo "PostgreSQL server binaries not found (apt-get install postgresql)" >&2
  return 1
}

pg_start() {
  if [ -n "${DATABASE_URL:-}" ]; then GPUGATE_PG_OWNED=0; return; fi
  local bin port
  bin=$(pg_bin)
  port=${GPUGATE_PG_PORT:-}
  if [ -z "$port" ]; then
    # The first free port from 55432 up, so concurrent runs on one machine do not collide.
    for port in $(seq 55432 55499); do
      (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || break
    done
  fi
  GPUGATE_PG_DIR=$(mktemp -d /tmp/gpugate-pg.XXXXXX)
  chown postgres: "$GPUGATE_PG_DIR" 2>/dev/null || true
  local as=(); [ "$(id -u)" = 0 ] && as=(runuser -u postgres --)
  "${as[@]}" "$bin/initdb" -D "$GPUGATE_PG_DIR/data" -U postgres -A trust --no-sync >/dev/null
  "${as[@]}" "$bin/pg_ctl" -D "$GPUGATE_PG_DIR/data" -l "$GPUGATE_PG_DIR/log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $GPUGATE_PG_DIR -c fsync=off -c max_connections=300" \
    start >/dev/null || { cat "$GPUGATE_PG_DIR/log" >&2; return 1; }
  GPUGATE_PG_OWNED=1
  export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
  export GPUGATE_PG_DIR GPUGATE_PG_OWNED
  echo "PostgreSQL ready at $DATABASE_URL"
}

pg_stop() {
  [ "${GPUGATE_PG_OWNED:-0}" = 1 ] || return 0
  local bin; bin=$(pg_bin)
  local as=(); [ "$(id -u)" = 0 ] && as=(runuser -u postgres --)
  "${as[@]}" "$bin/pg_ctl" -D "$GPUGATE_PG_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$GPUGATE_PG_DIR"
}
