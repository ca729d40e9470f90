#!/usr/bin/env bash
# Makes the TLS material of a development gateway: a development CA, made once and kept, and one
# server certificate for every access host name (*.ssh, *.jupyter, *.code, *.rdp.DOMAIN).
#
#   scripts/tls-dev.sh DIR DOMAIN [WORKER_GROUP]
#
# First run: DIR/ca.crt + ca.key (the CA, 10 years) and DIR/gateway.crt + gateway.key (EC P-256,
# 825 days, the most Apple's clients accept), plus DIR/README. Later runs keep the CA (users
# trusted it; it is never made again) and re-issue gateway.crt only when it is missing, expires
# within 30 days, does not cover DOMAIN (the domain changed), is not signed by ca.crt or does not
# match gateway.key. A run that changes nothing prints one line, "tls: kept ...".
#
# Every file is written to a temporary name in DIR and renamed into place, so a reader never sees
# half a file: nginx's workers load a certificate named by a variable at handshake time, so a
# rename is all a rotation needs (no reload). WORKER_GROUP (default nogroup, nginx.conf's `user`)
# is given gateway.key and DIR when this runs as root and the group exists. GPUGATE_TLS_CERT_DAYS
# (1 to 825, default 825) shortens gateway.crt's life, e.g. to try the renewal (under 31, every
# run renews it). `make up` (scripts/up.sh) runs it with .gpugate/tls and GPUGATE_DOMAIN. Needs
# the openssl command (1.1.1 or newer).
set -euo pipefail

services=(ssh jupyter code rdp)
ca_days=3650
renew_days=30

say() { printf 'tls: %s\n' "$*"; }
warn() { printf 'tls: warning: %s\n' "$*" >&2; }
die() { printf 'tls-dev: %s\n' "$*" >&2; exit 1; }

(($# >= 2 && $# <= 3)) || { echo "usage: $0 DIR DOMAIN [WORKER_GROUP]" >&2; exit 64; }
dir=${1%/}
domain=$2
group=${3:-nogroup}
days=${GPUGATE_TLS_CERT_DAYS:-825}

command -v openssl >/dev/null || die "the openssl command is missing (Debian: apt-get install openssl)"
label='[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?'
if ((${#domain} > 253)) || [[ ! $domain =~ ^$label(\.$label)+$ || ${domain##*.} =~ ^[0-9]+$ ]]; then
  die "domain \"$domain\" is not a DNS name: two or more labels of a-z, 0-9 and inner '-'" \
    "(e.g. gpu.example.com; lowercase, no trailing dot, not an IP address)"
fi
if [[ ! $days =~ ^[0-9]+$ ]] || ((days < 1 || days > 825)); then
  die "GPUGATE_TLS_CERT_DAYS=$days: a number of days from 1 to 825"
fi
[[ -n $dir ]] || die "DIR is empty"

mkdir -p "$dir" 2>/dev/null || die "cannot create $dir"
[[ -d $dir && -w $dir ]] || die "$dir is not a writable directory"
chmod 0750 "$dir" 2>/dev/null || die "cannot change the mode of $dir (not its owner?)"
# Every file starts private; the public ones are opened up by name below.
umask 077
work=$(mktemp -d "$dir/.tls-dev.XXXXXX" 2>/dev/null) || die "cannot write in $dir"
trap 'rm -rf "$work"' EXIT

# nginx loads a certificate named by variables (one per TLS server name) in its workers, at
# handshake time, not in the master at start-up: the workers' group must read gateway.key, so it
# gets that group and mode 0640, and the directory 0750 with the same group. ca.key stays 0600:
# no worker ever reads it.
worker_gid=
if getent group "$group" >/dev/null; then
  worker_gid=$(getent group "$group" | cut -d: -f3)
fi
give_group() { # FILE...: the workers' group, where we may give it
  if [[ -n $worker_gid && $(id -u) == 0 ]]; then
    chgrp "$group" "$@"
  fi
}

# One configuration for both certificates, so the system's openssl.cnf adds nothing to them.
cnf=$work/openssl.cnf
sans=$(printf 'DNS:*.%s.'"$domain"', ' "${services[@]}")
cat >"$cnf" <<EOF
[req]
distinguished_name = dn
[dn]
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[gateway_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = ${sans%, }
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF

# same_key CERT KEY: the certificate's public key is the key's.
same_key() {
  [[ $(openssl x509 -noout -pubkey -in "$1" 2>/dev/null) == "$(openssl pkey -pubout -in "$2" 2>/dev/null)" ]]
}

# covers CERT: its subjectAltName names every service's wildcard under $domain.
covers() {
  local names s
  names=$(openssl x509 -noout -ext subjectAltName -in "$1" 2>/dev/null | tr ',' '\n' | tr -d ' ') ||
    return 1
  for s in "${services[@]}"; do
    grep -qxF "DNS:*.$s.$domain" <<<"$names" || return 1
  done
}

# why_issue: why gateway.crt must be issued again; nothing when it is good.
why_issue() {
  local crt=$dir/gateway.crt key=$dir/gateway.key
  if [[ ! -f $crt ]]; then
    echo "there was none"
  elif [[ ! -f $key ]]; then
    echo "gateway.key was missing"
  elif ! openssl verify -CAfile "$dir/ca.crt" "$crt" >/dev/null 2>&1; then
    echo "the old one was not signed by ca.crt, or had expired"
  elif ! same_key "$crt" "$key"; then
    echo "the old one did not match gateway.key"
  elif ! openssl x509 -noout -checkend $((renew_days * 86400)) -in "$crt" >/dev/null; then
    echo "the old one expired within $renew_days days"
  elif ! covers "$crt"; then
    echo "the old one did not cover $domain"
  fi
}

until_date() { openssl x509 -noout -enddate -in "$1" | cut -d= -f2; }

made=0

# The CA. Its key is renamed into place before its certificate, so a certificate someone could
# have trusted always has its key beside it.
if [[ ! -e $dir/ca.crt && ! -e $dir/ca.key ]]; then
  openssl req -x509 -new -config "$cnf" -extensions ca_ext -sha256 -days "$ca_days" \
    -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$work/ca.key" \
    -subj "/CN=gpugate development CA ($domain)" -out "$work/ca.crt" 2>"$work/err" ||
    die "openssl could not make the CA: $(cat "$work/err")"
  chmod 0600 "$work/ca.key"
  chmod 0644 "$work/ca.crt"
  mv -f "$work/ca.key" "$dir/ca.key"
  mv -f "$work/ca.crt" "$dir/ca.crt"
  say "created the development CA $dir/ca.crt ($ca_days days; trust it once, see $dir/README)"
  made=1
elif [[ ! -f $dir/ca.crt || ! -f $dir/ca.key ]]; then
  die "$dir has only one of ca.crt and ca.key: restore the other, or remove both to make a new CA" \
    "(everyone who trusted the old one must then trust the new one)"
elif ! same_key "$dir/ca.crt" "$dir/ca.key"; then
  die "$dir/ca.key is not the key of $dir/ca.crt: restore the pair, or remove both to make a new CA"
fi
chmod 0600 "$dir/ca.key"
chmod 0644 "$dir/ca.crt"
if ! openssl x509 -noout -checkend $((days * 86400)) -in "$dir/ca.crt" >/dev/null; then
  warn "the CA expires on $(until_date "$dir/ca.crt"), before a new gateway.crt would; remove" \
    "ca.crt and ca.key to make a new CA (everyone trusts the new one again)"
fi

# The gateway's certificate.
why=$(why_issue)
if [[ -n $why ]]; then
  if ! {
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/gateway.key" &&
      openssl req -new -config "$cnf" -key "$work/gateway.key" -subj "/CN=gpugate gateway ($domain)" \
        -out "$work/gateway.csr" &&
      openssl x509 -req -in "$work/gateway.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
        -set_serial "0x$(openssl rand -hex 16)" -sha256 -days "$days" \
        -extfile "$cnf" -extensions gateway_ext -out "$work/gateway.crt"
  } 2>"$work/err"; then
    die "openssl could not issue gateway.crt: $(cat "$work/err")"
  fi
  chmod 0640 "$work/gateway.key"
  give_group "$work/gateway.key"
  chmod 0644 "$work/gateway.crt"
  # Key, then certificate: back to back, after everything is made. A handshake that loads the
  # pair between the two renames fails; the next one sees both.
  mv -f "$work/gateway.key" "$dir/gateway.key"
  mv -f "$work/gateway.crt" "$dir/gateway.crt"
  say "issued $dir/gateway.crt for *.{$(IFS=,; echo "${services[*]}")}.$domain until" \
    "$(until_date "$dir/gateway.crt") ($why)"
  made=1
fi
chmod 0640 "$dir/gateway.key"
give_group "$dir/gateway.key" "$dir"
# gateway.pem: the key and the certificate in one file, which is what nginx.conf names (for
# ssl_certificate and ssl_certificate_key alike): one rename replaces both at once, so no
# handshake ever loads a new key with an old certificate.
cat "$dir/gateway.key" "$dir/gateway.crt" >"$work/gateway.pem"
if ! cmp -s "$work/gateway.pem" "$dir/gateway.pem"; then
  chmod 0640 "$work/gateway.pem"
  give_group "$work/gateway.pem"
  mv -f "$work/gateway.pem" "$dir/gateway.pem"
  ((made)) || say "wrote $dir/gateway.pem (gateway.key + gateway.crt)"
fi
chmod 0640 "$dir/gateway.pem"
give_group "$dir/gateway.pem"
if [[ -n $worker_gid && $(stat -c %g "$dir/gateway.key") != "$worker_gid" ]]; then
  warn "$dir/gateway.key is not in group $group (run as root to give it): nginx workers of that" \
    "group cannot read it"
fi

# DIR/README, rewritten only when its text changes (it names the domain).
cat >"$work/README" <<EOF
Development TLS material of a gpugate gateway for $domain, made by scripts/tls-dev.sh
(\`make up\`). Not for production: there, use certificates from your own CA or a public one.

ca.crt       the development CA's certificate ($ca_days days). Trust it once; it is never made
             again (remove ca.crt and ca.key to get a new one, which everyone trusts again).
ca.key       the CA's private key (mode 0600). It can sign a certificate for any name, and every
             machine that trusts ca.crt believes it: keep it here, never copy it.
gateway.crt  the gateway's certificate, signed by ca.crt, for
             $(printf '*.%s.'"$domain"'\n' "${services[@]}" | paste -sd ' ')
             (825 days at most; re-issued by the script 30 days before it expires).
gateway.key  its private key (EC P-256, mode 0640, group of nginx's workers: they load it at
             each TLS handshake).
gateway.pem  gateway.key and gateway.crt in one file (mode 0640, same group): what nginx.conf
             names, so that one rename replaces key and certificate together.

Trust ca.crt:
  one command:    curl --cacert ca.crt https://<id>.jupyter.$domain:<tls port>/
  Debian, Ubuntu: cp ca.crt /usr/local/share/ca-certificates/gpugate-dev.crt && update-ca-certificates
  macOS:          security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain ca.crt
  Firefox keeps its own list: Settings, Privacy & Security, View Certificates, Authorities, Import.

Rotate the gateway's certificate (yours, or the script's): write the new key followed by the new
certificate to a temporary file in this folder and rename it over gateway.pem (mv in the same
folder, never copy onto it; the script does this for gateway.key, gateway.crt and gateway.pem). nginx is not reloaded: new handshakes use the new pair once the
gateway's certificate cache entry expires (its validity), open connections keep the old one.
EOF
if ! cmp -s "$work/README" "$dir/README"; then
  chmod 0644 "$work/README"
  mv -f "$work/README" "$dir/README"
  ((made)) || say "wrote $dir/README"
fi

if ((!made)); then
  say "kept $dir (CA and gateway.crt for *.{$(IFS=,; echo "${services[*]}")}.$domain until" \
    "$(until_date "$dir/gateway.crt"))"
fi
