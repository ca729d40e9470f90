#!/usr/bin/env bash
# Installs the Debian packages gpugate needs to build and test (idempotent; quiet when done).
set -euo pipefail
pkgs=(
  libclang-dev libpcre2-dev libssl-dev zlib1g-dev pkg-config make   # nginx + bindgen
  postgresql                                                         # tests start their own cluster
  openssh-client sshpass curl openssl rsync netcat-openbsd           # real clients in end-to-end tests
  docker-compose                                                     # the stack (docker/compose.yaml)
  mmdebstrap                                                         # offline base image for docker/
  python3-pip                                                        # docker/workspace/fetch-wheels.sh (pip download)
  python3-venv                                                       # scripts/fuzz.sh (Schemathesis in a virtual environment)
  busybox-static dropbear-bin                                        # control-api/tests/image/build-iso.sh (isolation tests)
  chromium libnss3-tools                                             # a real browser by name in the end-to-end test
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
