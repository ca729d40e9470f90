#!/bin/sh
# gpugate gateway entrypoint: lets nginx's workers write the route table's counters, then runs
# nginx in the foreground. Arguments go to nginx (default: -g "daemon off;").
#
# The API creates the table file mode 0664; the workers (nginx.conf's `user`, group nogroup)
# need it group-writable in their group. A setgid table directory gives a file created later that
# group; a file that already exists (the API started first) is given it here.
set -eu
dir=${GPUGATE_ROUTE_DIR:-/dev/shm/gpugate}
group=${GPUGATE_WORKER_GROUP:-nogroup}
mkdir -p "$dir"
chgrp "$group" "$dir"
chmod 2755 "$dir"
for f in "$dir"/*; do
  [ -f "$f" ] || continue
  chgrp "$group" "$f"
  chmod g+rw "$f"
done
exec /usr/local/nginx/sbin/nginx -p /usr/local/nginx/ -e stderr "$@"
