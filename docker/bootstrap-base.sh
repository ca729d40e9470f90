#!/usr/bin/env bash
# Builds the base image every gpugate Dockerfile names (gpugate/base:bookworm) from Debian
# packages when no image registry is reachable: mmdebstrap makes a bookworm root filesystem from
# the host's own apt mirror and `docker import` turns it into an image. Idempotent: returns at
# once when the image exists and was made by this version of the script from the same mirrors
# (pass --force to rebuild it anyway).
#
# Where a registry is reachable, `docker pull debian:bookworm-slim && docker tag debian:bookworm-slim
# gpugate/base:bookworm` gives an equivalent base (see docker/README.md).
#
# Environment:
#   GPUGATE_BASE_IMAGE     image to build (default gpugate/base:bookworm)
#   GPUGATE_DEBIAN_MIRROR  Debian mirror URI; default: read from the host's apt sources
set -euo pipefail

image=${GPUGATE_BASE_IMAGE:-gpugate/base:bookworm}
suite=bookworm
# What every gpugate image needs on top of `--variant=apt` (dpkg, apt, coreutils, bash...).
include=ca-certificates

force=0
[[ ${1:-} == --force ]] && force=1


# Prints one "deb URI SUITE COMPONENTS" line per Debian bookworm source the host uses
# (bookworm, bookworm-updates, bookworm-security), from one-line and deb822 source files.
host_sources() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -r $f ]] || continue
    # deb [options] URI SUITE COMPONENT...
    awk -v s="$suite" '$1 == "deb" {
        i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
        if ($(i+1) == s || $(i+1) == s "-updates" || $(i+1) == s "-security") {
          line = "deb " $i " " $(i+1); for (j = i + 2; j <= NF; j++) line = line " " $j; print line
        }
      }' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -r $f ]] || continue
    # deb822 stanzas separated by blank lines; fields Types, URIs, Suites, Components.
    awk -v s="$suite" '
      function flush(  n, u, m, x, i, j, k) {
        if (types ~ /(^| )deb( |$)/ && enabled != "no") {
          n = split(uris, u, " "); m = split(suites, x, " ")
          for (i = 1; i <= n; i++) for (j = 1; j <= m; j++)
            if (x[j] == s || x[j] == s "-updates" || x[j] == s "-security")
              print "deb " u[i] " " x[j] " " comps
        }
        types = uris = suites = comps = enabled = ""
      }
      /^[[:space:]]*#/ { next }
      /^[[:space:]]*$/ { flush(); next }
      { key = tolower($1); sub(/:$/, "", key); $1 = ""; sub(/^ +/, "")
        if (key == "types") types = $0; else if (key == "uris") uris = $0
        else if (key == "suites") suites = $0; else if (key == "components") comps = $0
        else if (key == "enabled") enabled = tolower($0) }
      END { flush() }' "$f"
  done
}

mirrors=()
if [[ -n ${GPUGATE_DEBIAN_MIRROR:-} ]]; then
  mirrors=("$GPUGATE_DEBIAN_MIRROR")
else
  mapfile -t mirrors < <(host_sources | awk '!seen[$0]++')
fi
if ((${#mirrors[@]} == 0)); then
  echo "bootstrap-base: no Debian $suite source found in /etc/apt/sources.list{,.d/*}; set GPUGATE_DEBIAN_MIRROR" >&2
  exit 1
fi
# apt settings for the Dockerfiles built on this base: apt-get in a RUN step leaves no package
# cache or downloaded .deb behind in the layer (the binary caches alone are ~80 MB).
apt_conf='// gpugate images: keep apt caches out of image layers.
APT::Update::Post-Invoke { "rm -f /var/cache/apt/*.bin || true"; };
DPkg::Post-Invoke { "rm -f /var/cache/apt/*.bin /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb || true"; };'

# The recipe. Documentation, man pages and translations are dead weight in containers;
# copyright files stay.
mm_opts=(
  --variant=apt
  --include="$include"
  --aptopt='APT::Install-Recommends "false"'
  --aptopt='APT::Install-Suggests "false"'
  --aptopt='Acquire::Languages "none"'
  --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/share/locale/*'
  --dpkgopt='path-include=/usr/share/locale/locale.alias'
  --customize-hook='rm -f "$1"/etc/hostname "$1"/etc/resolv.conf'
)

# The image records what made it (recipe, apt settings, mirrors); a change to any rebuilds it,
# a change to this script's comments does not.
inputs=$(printf '%s\n' "$suite" "${mm_opts[@]}" "$apt_conf" "${mirrors[@]}" | sha256sum | cut -c1-16)
if ((!force)) && docker image inspect "$image" >/dev/null 2>&1; then
  have=$(docker image inspect -f '{{index .Config.Labels "gpugate.inputs"}}' "$image")
  if [[ $have == "$inputs" ]]; then
    echo "bootstrap-base: $image present"
    exit 0
  elif [[ -z $have || $have == "<no value>" ]]; then
    # Not made by this script (pulled from a registry and tagged): the operator's choice stands.
    echo "bootstrap-base: $image present (not made here; left as it is)"
    exit 0
  fi
  echo "bootstrap-base: $image was made from another recipe or other mirrors; rebuilding"
fi
if [[ $image != gpugate/base:* ]]; then
  # Another base was chosen (e.g. debian:bookworm-slim): it comes from a registry, not from here.
  echo "bootstrap-base: $image is missing; pull it (docker pull $image) or leave GPUGATE_BASE_IMAGE unset" >&2
  exit 1
fi
command -v mmdebstrap >/dev/null || {
  echo "bootstrap-base: mmdebstrap is missing (apt-get install mmdebstrap)" >&2
  exit 1
}

echo "bootstrap-base: building $image from Debian $suite via:"
printf '  %s\n' "${mirrors[@]}"
started=$(date +%s)

conf_file=$(mktemp)
trap 'rm -f "$conf_file"' EXIT
printf '%s\n' "$apt_conf" >"$conf_file"
mmdebstrap --quiet "${mm_opts[@]}" \
  --customize-hook="cp '$conf_file' \"\$1/etc/apt/apt.conf.d/90gpugate-image\"" \
  "$suite" - "${mirrors[@]}" |
  docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    --change "LABEL gpugate.inputs=$inputs" \
    --message "gpugate base: mmdebstrap $suite ($include)" \
    - "$image" >/dev/null

echo "bootstrap-base: $image built in $(($(date +%s) - started)) s ($(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'))"
