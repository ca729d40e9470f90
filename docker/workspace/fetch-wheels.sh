#!/usr/bin/env bash
# Downloads the demo workspace's Python wheels on the host (which can reach PyPI) into
# docker/workspace/wheels/, so the image build installs them without network. Wheels are chosen
# for the image's Python (Debian bookworm: CPython 3.11, glibc 2.36, x86_64), not the host's.
# Quiet and fast when the folder already matches requirements.txt.
#
#   fetch-wheels.sh            download what requirements.txt pins (idempotent)
#   fetch-wheels.sh --resolve  re-resolve requirements.in and rewrite requirements.txt
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
wheels=$here/wheels
# pip only downloads here (nothing is installed on the host), so Debian's python3-pip will do.
if [[ -n ${PIP:-} ]]; then
  read -ra pip <<<"$PIP"
elif command -v pip3 >/dev/null; then
  pip=(pip3)
elif python3 -m pip --version >/dev/null 2>&1; then
  pip=(python3 -m pip)
else
  echo "fetch-wheels: pip is missing (apt-get install python3-pip)" >&2
  exit 1
fi

target=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64)

if [[ ${1:-} == --resolve ]]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "${pip[@]}" download -q "${target[@]}" -d "$tmp" -r "$here/requirements.in"
  {
    sed -n '1,2p' "$here/requirements.txt"
    # wheel file names are NAME-VERSION-...; NAME uses _ where the project name may use -.
    ls "$tmp" | sed -E 's/^([^-]+)-([^-]+)-.*/\1==\2/' | tr '_A-Z' '-a-z' | sort
  } >"$here/requirements.txt.new"
  mv "$here/requirements.txt.new" "$here/requirements.txt"
  echo "fetch-wheels: requirements.txt re-resolved ($(grep -c '==' "$here/requirements.txt") packages)"
fi

stamp=$wheels/.requirements.sha256
want=$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  echo "fetch-wheels: wheels up to date ($(ls "$wheels"/*.whl | wc -l) files)"
  exit 0
fi

started=$(date +%s)
rm -rf "$wheels.tmp"
mkdir -p "$wheels.tmp"
"${pip[@]}" download -q "${target[@]}" --no-deps -d "$wheels.tmp" -r "$here/requirements.txt"
echo "$want" >"$wheels.tmp/.requirements.sha256"
rm -rf "$wheels"
mv "$wheels.tmp" "$wheels"
echo "fetch-wheels: $(ls "$wheels"/*.whl | wc -l) wheels, $(du -sh "$wheels" | cut -f1), in $(($(date +%s) - started)) s"
