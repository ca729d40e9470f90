#!/usr/bin/env bash
# Builds the tiny workspace image the API tests run (no registry needed): a root filesystem
# of a few host binaries (sh, sleep, cat, ls, env) and the shared libraries they link, imported
# with `docker import`. Its command sleeps, and exits at once on SIGTERM.
# Usage: build.sh [TAG]   (default gpugate-test/tiny:1)
set -euo pipefail
tag=${1:-gpugate-test/tiny:1}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/dev" "$root/proc" "$root/sys" "$root/etc" "$root/tmp"
for b in sh sleep cat ls env; do
  src=$(command -v "$b")
  src=$(readlink -f "$src")
  cp "$src" "$root/bin/$b"
  # Copy every library the binary links, at the same path.
  ldd "$src" | grep -o '/[^ ]*' | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
done
echo "root:x:0:0:root:/:/bin/sh" > "$root/etc/passwd"
tar -C "$root" -c . | docker import \
  --change 'ENV PATH=/bin' \
  --change 'CMD ["/bin/sh", "-c", "trap \"exit 0\" TERM; while :; do sleep 1; done"]' \
  - "$tag" >/dev/null
echo "built $tag"
