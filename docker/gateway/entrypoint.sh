#!/bin/sh
# gpugate gateway entrypoint: lets nginx's workers write the route table's counters (and only
# those), then runs nginx in the foreground. Arguments go to nginx (default: -g "daemon off;").
#
# The writer (the API, root) creates `routes` mode 0644 and `routes.counters` mode 0664 in a
# directory only it may write. The workers (nginx.conf's `user`, group nogroup) need the counters
# file group-writable in their group: a setgid directory gives a file created later that group;
# a counters file that already exists (the API started first) is given it here. The routes file
# is never made writable for the workers: they must not be able to change a route.
set -eu
dir=${GPUGATE_ROUTE_DIR:-/dev/shm/gpugate}
group=${GPUGATE_WORKER_GROUP:-nogroup}
mkdir -p "$dir"
chgrp "$group" "$dir"
chmod 2755 "$dir"
for f in "$dir"/*.counters; do
  [ -f "$f" ] || continue
  chgrp "$group" "$f"
  chmod g+rw "$f"
done
# The domain of the names the TLS server routes (`gpugate_name_domain`), from GPUGATE_DOMAIN: a
# copy of nginx.conf with that one line set, made at start (nginx is never reloaded after).
conf=/usr/local/nginx/conf/nginx.conf
if [ -n "${GPUGATE_DOMAIN:-}" ]; then
  case $GPUGATE_DOMAIN in
    *[!a-z0-9.-]* | .* | *. | *..*)
      echo "gateway: GPUGATE_DOMAIN \"$GPUGATE_DOMAIN\" is not a lowercase DNS name" >&2
      exit 64 ;;
  esac
  sed "s/^\([[:space:]]*gpugate_name_domain\) .*;/\1 $GPUGATE_DOMAIN;/" "$conf" >/usr/local/nginx/conf/nginx.run.conf
  conf=/usr/local/nginx/conf/nginx.run.conf
fi
exec /usr/local/nginx/sbin/nginx -p /usr/local/nginx/ -c "$conf" -e stderr "$@"
