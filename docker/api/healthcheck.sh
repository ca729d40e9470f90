#!/bin/bash
# Docker healthcheck for gpugate-api: GET /healthz on the address it listens on (GPUGATE_LISTEN,
# host:port) answers 200. Liveness only: /readyz also needs the database.
set -eu
listen=${GPUGATE_LISTEN:-127.0.0.1:8080}
host=${listen%:*}
[[ $host == 0.0.0.0 ]] && host=127.0.0.1
exec 3<>"/dev/tcp/$host/${listen##*:}"
printf 'GET /healthz HTTP/1.0\r\nHost: %s\r\n\r\n' "$listen" >&3
read -r -t 3 _ status _ <&3
[[ $status == 200 ]]
