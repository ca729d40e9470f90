#!/usr/bin/env bash
# Builds gpugate's images without an image registry: the base (bootstrap-base.sh), then the
# workspace, PostgreSQL, gateway and API images. An image whose inputs (its build context and
# the base image) have not changed since it was built is skipped, so a warm run takes seconds.
#
#   docker/build-images.sh [--force] [workspace|postgres|gateway|api ...]   (default: all)
#
# The gateway and API images copy host-built binaries from dist/ (`make build`) and
# nginx-conf/nginx.conf. Set GPUGATE_IMAGE_TAG to tag something other than "latest",
# GPUGATE_BASE_IMAGE to build on another base (e.g. debian:bookworm-slim from a registry).
set -euo pipefail
docker_dir=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$docker_dir")
stage=$docker_dir/.context
tag=${GPUGATE_IMAGE_TAG:-latest}
base=${GPUGATE_BASE_IMAGE:-gpugate/base:bookworm}

force=0
images=()
for a in "$@"; do
  case $a in
    --force) force=1 ;;
    workspace | postgres | gateway | api) images+=("$a") ;;
    *) echo "usage: $0 [--force] [workspace|postgres|gateway|api ...]" >&2; exit 64 ;;
  esac
done
((${#images[@]})) || images=(workspace postgres gateway api)

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }
all_started=$(now)

t=$(now)
GPUGATE_BASE_IMAGE=$base "$docker_dir/bootstrap-base.sh"
base_id=$(docker image inspect -f '{{.Id}}' "$base")
echo "  base            $(since "$t")"

# Copies host-built files into a small build context of their own, so the daemon is never sent
# the repository (target/ alone is gigabytes). Paths inside mirror the repository's.
stage_context() { # name file...
  local ctx=$stage/$1 f
  shift
  rm -rf "$ctx"
  mkdir -p "$ctx"
  for f in "$@"; do
    if [[ ! -f $root/$f ]]; then
      echo "build-images: $f is missing (dist/ comes from \`make build\`; nginx-conf/ from the repository)" >&2
      return 1
    fi
    mkdir -p "$ctx/$(dirname "$f")"
    # Binaries lose their DWARF debug info (the API's is most of its 65 MB) but keep their
    # symbols, so backtraces still name functions. GPUGATE_STRIP=0 copies them untouched.
    if [[ $f == dist/* && ${GPUGATE_STRIP:-1} != 0 ]] && command -v strip >/dev/null; then
      strip --strip-debug -o "$ctx/$f" "$root/$f"
    else
      cp -p "$root/$f" "$ctx/$f"
    fi
  done
  echo "$ctx"
}

# build NAME IMAGE CONTEXT DOCKERFILE: builds unless IMAGE carries the hash of these inputs.
build() {
  local name=$1 image=$2 ctx=$3 dockerfile=$4 t inputs have log
  t=$(now)
  inputs=$( (cd "$ctx" && find . -type f ! -name '.*' -print0 | sort -z | xargs -0 sha256sum
    sha256sum <"$dockerfile"; echo "$base_id") | sha256sum | cut -c1-16)
  have=$(docker image inspect -f '{{index .Config.Labels "gpugate.inputs"}}' "$image" 2>/dev/null || true)
  if ((!force)) && [[ $have == "$inputs" ]]; then
    printf '  %-15s %s (up to date, %s)\n' "$name" "$(since "$t")" "$image"
    return
  fi
  mkdir -p "$stage/logs"
  log=$stage/logs/$name.log
  echo "  $name: building $image (log: docker/.context/logs/$name.log)"
  if ! docker build --build-arg BASE_IMAGE="$base" --label gpugate.inputs="$inputs" \
    -f "$dockerfile" -t "$image" "$ctx" >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "build-images: $name failed; see $log" >&2
    exit 1
  fi
  printf '  %-15s %s (built, %s, %s)\n' "$name" "$(since "$t")" "$image" \
    "$(docker image inspect -f '{{.Size}}' "$image" | awk '{ printf "%.0f MB", $1 / 1e6 }')"
}

for name in "${images[@]}"; do
  case $name in
    workspace)
      "$docker_dir/workspace/fetch-wheels.sh"
      build workspace "gpugate/workspace:$tag" "$docker_dir/workspace" "$docker_dir/workspace/Dockerfile"
      ;;
    postgres)
      build postgres "gpugate/postgres:$tag" "$docker_dir/postgres" "$docker_dir/postgres/Dockerfile"
      ;;
    gateway)
      ctx=$(stage_context gateway dist/sbin/nginx dist/modules/ngx_stream_gpugate_module.so \
        dist/bin/gpugate-routes nginx-conf/nginx.conf docker/gateway/entrypoint.sh)
      build gateway "gpugate/gateway:$tag" "$ctx" "$docker_dir/gateway/Dockerfile"
      ;;
    api)
      ctx=$(stage_context api dist/bin/gpugate-api dist/bin/gpugate-routes docker/api/healthcheck.sh)
      build api "gpugate/api:$tag" "$ctx" "$docker_dir/api/Dockerfile"
      ;;
  esac
done
echo "build-images: done in $(since "$all_started")"
