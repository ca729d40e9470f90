#!/usr/bin/env bash
# gpugate demo workspace entrypoint (PID 1 is tini). Creates the login user from the environment
# the gpugate API sets, writes the login banner, then runs sshd (22), JupyterLab (8888) and marimo
# (8080) and stops the container when any of them exits.
#
#   GPUGATE_USERNAME         login user (default remotegpu; GPUGATE_USER is accepted too)
#   GPUGATE_PASSWORD         its password (SSH password login); unset: key login only
#   GPUGATE_SSH_PUBLIC_KEYS  authorized keys, one per line (the user's ~/.ssh/authorized_keys)
#   GPUGATE_ACCOUNT_KEYS     the owner's account keys, one per line, and
#   GPUGATE_ACCOUNT_KEYS_GENERATION  their generation: kept current by gpugate-account-keys
#   GPUGATE_PASSWORD_LOGIN   yes (default) or no: whether sshd takes the password
#   GPUGATE_SSH_HOST_KEY     the workspace's SSH host key (OpenSSH Ed25519 private key), the same
#                            for its whole life; unset: keys made for this container
#   GPUGATE_SSH_HOST_CERT    its certificate from the deployment's SSH host CA (optional)
#   GPUGATE_JUPYTER_TOKEN    JupyterLab's token (JUPYTER_TOKEN is accepted too); unset: a random
#                            one nobody is told
#   GPUGATE_CODE_PASSWORD    marimo's login password on the code port; default GPUGATE_PASSWORD
#                            (what the API shows as the code-server password), else the token
#   GPUGATE_ENV_ID           environment id (the API also sets it as the hostname)
#   GPUGATE_SSH_PORT, GPUGATE_JUPYTER_PORT, GPUGATE_CODE_PORT
#                            public gateway ports, shown in the login banner
#   GPUGATE_DOMAIN           public domain (e.g. gpu.example.com), shown in the login banner
#   GPUGATE_SERVICES         services to run; default: those with a GPUGATE_*_PORT above, or
#                            "ssh jupyter code" when none is set
set -euo pipefail

log() { echo "gpugate-workspace: $*" >&2; }
die() { log "$*"; exit 64; }

user=${GPUGATE_USERNAME:-${GPUGATE_USER:-remotegpu}}
password=${GPUGATE_PASSWORD:-}
keys=${GPUGATE_SSH_PUBLIC_KEYS:-}
account_keys=${GPUGATE_ACCOUNT_KEYS:-}
account_generation=${GPUGATE_ACCOUNT_KEYS_GENERATION:-0}
password_login=${GPUGATE_PASSWORD_LOGIN:-yes}
token=${GPUGATE_JUPYTER_TOKEN:-${JUPYTER_TOKEN:-}}
code_password=${GPUGATE_CODE_PASSWORD:-$password}
host_key=${GPUGATE_SSH_HOST_KEY:-}
host_cert=${GPUGATE_SSH_HOST_CERT:-}
env_id=${GPUGATE_ENV_ID:-$(hostname)}
# Default services: those the API gave a public port (a workspace created with only "ssh" runs
# only sshd), or all three when no port is given (a plain `docker run`).
ported="${GPUGATE_SSH_PORT:+ssh }${GPUGATE_JUPYTER_PORT:+jupyter }${GPUGATE_CODE_PORT:+code}"
services=" ${GPUGATE_SERVICES:-${ported:-ssh jupyter code}} "
# Secrets stay out of every child's environment (sessions, kernels, terminals).
unset GPUGATE_PASSWORD GPUGATE_JUPYTER_TOKEN JUPYTER_TOKEN GPUGATE_CODE_PASSWORD GPUGATE_SSH_HOST_KEY GPUGATE_SSH_HOST_CERT
unset GPUGATE_ACCOUNT_KEYS GPUGATE_ACCOUNT_KEYS_GENERATION GPUGATE_PASSWORD_LOGIN

[[ $user =~ ^[a-z_][a-z0-9_-]{0,31}$ ]] || die "GPUGATE_USERNAME '$user' is not a valid user name ([a-z_][a-z0-9_-]{0,31})"
[[ $password != *$'\n'* ]] || die "GPUGATE_PASSWORD must not contain a newline"

# --- the login user -------------------------------------------------------------------------
# The home may exist already: gpugate mounts the workspace's own volume on /home/<user>, empty
# and owned by root the first time, the user's files after a stop and start (which re-creates
# the container, so the user is made again, with the same uid). useradd leaves an existing
# directory alone (no skeleton files, root stays its owner), so both are settled below.
if uid=$(id -u "$user" 2>/dev/null); then
  ((uid >= 1000)) || die "GPUGATE_USERNAME '$user' is a system account"
else
  # (On an existing home it warns that it copies no skeleton files; the warning is harmless.)
  useradd --create-home --home-dir "/home/$user" --shell /bin/bash --uid "${GPUGATE_UID:-1000}" --user-group "$user"
fi
home=$(getent passwd "$user" | cut -d: -f6)
if [[ -d $home ]]; then
  # A fresh volume: the skeleton files. A home with files keeps them as they are.
  if [[ -z $(ls -A "$home") && -d /etc/skel ]]; then
    cp -a /etc/skel/. "$home/"
    chown -R "$user:" "$home"
  fi
  # Only the top directory (never recursively: a home may hold millions of files).
  chown "$user:" "$home"
fi
if [[ -n $password ]]; then
  printf '%s:%s\n' "$user" "$password" | chpasswd
else
  usermod -p '*' "$user" # no password: key login still works (a '!' lock would refuse it)
fi
install -d -m 0700 -o "$user" -g "$user" "$home/.ssh"
printf '%s\n' "$keys" | sed '/^[[:space:]]*$/d' >"$home/.ssh/authorized_keys"
chown "$user:" "$home/.ssh/authorized_keys"
chmod 0600 "$home/.ssh/authorized_keys"
# The owner's account keys (later changes come by `docker exec ... gpugate-account-keys`).
mapfile -t account < <(printf '%s\n' "$account_keys" | sed '/^[[:space:]]*$/d')
gpugate-account-keys "$account_generation" "$password_login" "${account[@]}" >/dev/null ||
  die "GPUGATE_ACCOUNT_KEYS_GENERATION or GPUGATE_PASSWORD_LOGIN is invalid (see above)"
[[ ( -n $password && $password_login == yes ) || -s $home/.ssh/authorized_keys || ${#account[@]} -gt 0 ]] ||
  log "warning: no SSH key is set and password login is off or without a password; nobody can log in over SSH"
echo "AllowUsers $user" >/etc/ssh/sshd_config.d/20-gpugate-user.conf

# Login sessions do not inherit the container's environment; pass on what a GPU user needs
# (never the GPUGATE_* secrets, which are unset above).
env | grep -E '^(NVIDIA_[A-Z_]*|CUDA_[A-Z_]*|LD_LIBRARY_PATH|GPUGATE_ENV_ID)=' >/etc/environment || true

# --- login banner -----------------------------------------------------------------------------
host=${GPUGATE_DOMAIN:+$env_id.ssh.$GPUGATE_DOMAIN}
{
  echo
  echo "  gpugate workspace $env_id"
  [[ -n ${GPUGATE_SSH_PORT:-} ]] && echo "  ssh:     ssh -p $GPUGATE_SSH_PORT $user@${host:-<gateway host>}"
  [[ -n ${GPUGATE_JUPYTER_PORT:-} ]] && echo "  jupyter: port $GPUGATE_JUPYTER_PORT${GPUGATE_DOMAIN:+ on $env_id.jupyter.$GPUGATE_DOMAIN}"
  [[ -n ${GPUGATE_CODE_PORT:-} ]] && echo "  code:    port $GPUGATE_CODE_PORT${GPUGATE_DOMAIN:+ on $env_id.code.$GPUGATE_DOMAIN}"
  echo
} >/etc/motd

# --- services -----------------------------------------------------------------------------------
# Runs a web service as the user with a minimal environment, replacing the calling (background)
# subshell, so the recorded pid is the service's and no parent keeps its arguments visible.
as_user() {
  exec setpriv --reuid="$user" --regid="$user" --init-groups -- env -i HOME="$home" USER="$user" \
    LOGNAME="$user" SHELL=/bin/bash LANG="${LANG:-C.UTF-8}" \
    PATH="/opt/jupyter/bin:/usr/local/bin:/usr/bin:/bin" \
    ${LD_LIBRARY_PATH:+LD_LIBRARY_PATH="$LD_LIBRARY_PATH"} "$@"
}
if [[ -z $token && ( $services == *" jupyter "* || $services == *" code "* ) ]]; then
  token=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
  log "GPUGATE_JUPYTER_TOKEN is not set; generated a random token (not logged)"
fi

pids=()
if [[ $services == *" ssh "* ]]; then
  hostkey_file=/etc/ssh/ssh_host_ed25519_key
  if [[ -n $host_key ]]; then
    # The workspace's own host key (the same after every start, on any host): clients that
    # trust the deployment's host CA, or saw this key once, never get a warning.
    install -m 0600 /dev/null "$hostkey_file"
    printf '%s\n' "$host_key" >"$hostkey_file"
    ssh-keygen -y -f "$hostkey_file" >"$hostkey_file.pub" || die "GPUGATE_SSH_HOST_KEY is not an OpenSSH private key"
    keyconf="HostKey $hostkey_file"
    if [[ -n $host_cert ]]; then
      printf '%s\n' "$host_cert" >"$hostkey_file-cert.pub"
      keyconf+=$'\n'"HostCertificate $hostkey_file-cert.pub"
    fi
  else
    # Per-container host keys: a key baked into the image would be shared by every workspace.
    keyconf=""
    for t in ed25519 ecdsa; do
      [[ -f /etc/ssh/ssh_host_${t}_key ]] || ssh-keygen -q -t "$t" -N '' -f "/etc/ssh/ssh_host_${t}_key"
      keyconf+="HostKey /etc/ssh/ssh_host_${t}_key"$'\n'
    done
  fi
  printf '%s\n' "$keyconf" >/etc/ssh/sshd_config.d/15-gpugate-hostkeys.conf
  mkdir -p /run/sshd
  /usr/sbin/sshd -D -e &
  pids+=($!)
fi
# Web services start in the user's home; their secret reaches them through the environment or
# stdin, never through a command line that ps would show (marimo runs --quiet: its start-up banner
# would print the token into the container log).
cd "$home"
if [[ $services == *" jupyter "* ]]; then
  as_user JUPYTER_TOKEN="$token" jupyter lab --no-browser --ip=0.0.0.0 --port=8888 \
    --ServerApp.allow_remote_access=True --ServerApp.root_dir="$home" &
  pids+=($!)
fi
if [[ $services == *" code "* ]]; then
  as_user marimo --quiet --log-level warn edit --headless --skip-update-check --host 0.0.0.0 --port 8080 \
    --token-password-file - "$home" <<<"${code_password:-$token}" &
  pids+=($!)
fi
((${#pids[@]})) || die "GPUGATE_SERVICES='${GPUGATE_SERVICES:-}' names no known service (ssh jupyter code)"
log "started$(printf " %s" $services) for $user in $env_id"

# The container lives as long as every service does; docker stop reaches them all through tini -g.
status=0
wait -n "${pids[@]}" || status=$?
log "a service exited (status $status); stopping the workspace"
kill "${pids[@]}" 2>/dev/null || true
wait || true
exit $((status ? status : 1))
