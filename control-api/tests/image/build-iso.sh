#!/usr/bin/env bash
# Builds the isolation test image (no registry needed): busybox (a shell, nc, httpd, wget) and
# dropbear (a real SSH server), imported with `docker import`. Its entrypoint authorises the
# keys in GPUGATE_SSH_PUBLIC_KEYS for root, serves HTTP on 8888 and runs sshd on 22, the ports
# a workspace publishes. Needs Debian's busybox-static and dropbear-bin on the host.
# Usage: build-iso.sh [TAG]   (default gpugate-test/iso:1)
set -euo pipefail
tag=${1:-gpugate-test/iso:1}
for b in busybox dropbear; do
  command -v "$b" >/dev/null || { echo "$b missing: apt-get install busybox-static dropbear-bin" >&2; exit 1; }
done
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/dev" "$root/proc" "$root/sys" "$root/etc/dropbear" "$root/tmp" "$root/root" "$root/www"
cp "$(readlink -f "$(command -v busybox)")" "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
  [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
src=$(readlink -f "$(command -v dropbear)")
cp "$src" "$root/bin/dropbear"
# Every library dropbear links, at the same path.
ldd "$src" | grep -o '/[^ ]*' | while read -r lib; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
echo "root:x:0:0:root:/root:/bin/sh" > "$root/etc/passwd"
echo "root:x:0:" > "$root/etc/group"
echo "/bin/sh" > "$root/etc/shells"
echo "workspace" > "$root/www/index.html"
cat > "$root/bin/workspace" <<'SH'
#!/bin/sh
mkdir -p /root/.ssh
printf '%s\n' "$GPUGATE_SSH_PUBLIC_KEYS" > /root/.ssh/authorized_keys
chmod 700 /root /root/.ssh && chmod 600 /root/.ssh/authorized_keys
httpd -p 8888 -h /www
trap 'exit 0' TERM
dropbear -R -E -s -p 22 &
while :; do sleep 1; done
SH
chmod 755 "$root/bin/workspace"
tar -C "$root" -c . | docker import \
  --change 'ENV PATH=/bin' \
  --change 'CMD ["/bin/workspace"]' \
  - "$tag" >/dev/null
echo "built $tag"
