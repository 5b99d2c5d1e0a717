#!/bin/sh
# LabVM container entrypoint. It runs as the container's root, which is an
# unprivileged uid on the host (dockerd userns-remap). It makes the user's own
# account with passwordless sudo, then runs the server as that account.
set -eu
: "${LABVM_USER:?LABVM_USER is not set}"
uid="${LABVM_UID:-1000}"

# Tokens come in a file on a host tmpfs, never in the container's stored config.
if [ -r /.labvm/secrets/env ]; then
  set -a; . /.labvm/secrets/env; set +a
fi

# Ten servers start at once on a small node: each process spawned here is CPU that
# Jupyter's start waits for, so the account is read once and the shell does the parsing.
created=""
if ! entry=$(getent passwd "$LABVM_USER"); then
  if getent passwd "$uid" >/dev/null; then uidopt=""; else uidopt="--uid $uid"; fi
  # "*": no password matches, and sshd does not take the account for locked ("!").
  # shellcheck disable=SC2086
  useradd --create-home --no-log-init --password '*' $uidopt --user-group \
    --shell /bin/bash "$LABVM_USER"
  entry=$(getent passwd "$LABVM_USER")
  created=1
fi
IFS=: read -r _ _ acct_uid acct_gid _ home _ <<EOF
$entry
EOF
[ -d "$home" ] || mkdir -p "$home"

# Files are written only when they change: with the user's disk quota full, any write
# fails, and the server must still start so that they can clean up.
put() { # path mode content
  if [ "$(cat "$1" 2>/dev/null)" != "$3" ]; then printf '%s\n' "$3" > "$1"; fi
  [ "$(stat -c %a "$1")" = "$2" ] || chmod "$2" "$1"
}
put /etc/sudoers.d/labvm-user 440 "$LABVM_USER ALL=(ALL:ALL) NOPASSWD:ALL"

# The GPU allocation, for login shells too (the device nodes enforce it anyway).
put /etc/profile.d/labvm-gpus.sh 644 "export CUDA_VISIBLE_DEVICES=\"${CUDA_VISIBLE_DEVICES:-}\"
export NVIDIA_VISIBLE_DEVICES=\"${NVIDIA_VISIBLE_DEVICES:-none}\""

# sshd, reached only through the hub's SSH gateway (labvm-ssh): the user's keys come
# with the secrets (and change there while it runs); no passwords, no root login. The
# secrets are root's only, so sshd reads the keys as root (a command), not as the user.
# AES-GCM only, as the gateway: OpenSSL does it in hardware, and the OpenSSH client would
# otherwise take its first choice, chacha20-poly1305 (a GiB's scp: 9.4 CPU seconds of
# the machine's against 13.5, bench/ssh.py). Any client that passed the gateway has it.
if [ -x /usr/sbin/sshd ]; then
  mkdir -p -m 755 /run/sshd /run/labvm-sshd  # /run is the container's own tmpfs
  hostkey=/etc/ssh/ssh_host_ed25519_key  # the user's own, kept in their layer
  if [ ! -s "$hostkey" ]; then
    rm -f "$hostkey" "$hostkey.pub"
    ssh-keygen -q -t ed25519 -N '' -C "labvm-$LABVM_USER" -f "$hostkey" 2>/dev/null || {
      hostkey=/run/labvm-sshd/ssh_host_ed25519_key  # disk full: one for this start
      ssh-keygen -q -t ed25519 -N '' -f "$hostkey"; }
  fi
  # sshd refuses a locked account ("!"), as useradd makes them by default (an account
  # from the image, or made by an older LabVM): "*" unlocks it for keys.
  if [ -z "$created" ]; then
    IFS=: read -r _ pw _ <<EOF
$(getent shadow "$LABVM_USER")
EOF
    case "$pw" in '!'*) usermod -p '*' "$LABVM_USER" ;; esac
  fi
  cat > /run/labvm-sshd/sshd_config <<EOF
Port 22
HostKey $hostkey
PidFile /run/labvm-sshd/sshd.pid
AuthorizedKeysFile none
AuthorizedKeysCommand /bin/cat /.labvm/secrets/authorized_keys
AuthorizedKeysCommandUser root
AuthenticationMethods publickey
Ciphers aes128-gcm@openssh.com,aes256-gcm@openssh.com
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
AllowUsers $LABVM_USER
UsePAM no
AllowTcpForwarding yes
PermitOpen localhost:* 127.0.0.1:* [::1]:*
GatewayPorts no
AllowAgentForwarding yes
X11Forwarding no
PrintMotd no
LogLevel VERBOSE
SetEnv CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-} NVIDIA_VISIBLE_DEVICES=${NVIDIA_VISIBLE_DEVICES:-none}
Subsystem sftp internal-sftp
EOF
  /usr/sbin/sshd -f /run/labvm-sshd/sshd_config -E /run/labvm-sshd/sshd.log \
    || echo "labvm: sshd did not start (see /run/labvm-sshd/sshd.log)" >&2
fi

# Jupyter's runtime files (the server's, kernels' connection files) go on the /run
# tmpfs, so a kernel or a terminal still opens when the disk quota is full.
rt="/run/user/$acct_uid"
install -d -m 700 -o "$acct_uid" -g "$acct_gid" "$rt"

cd "$home"
exec setpriv --reuid="$LABVM_USER" --regid="$LABVM_USER" --init-groups \
  env HOME="$home" USER="$LABVM_USER" LOGNAME="$LABVM_USER" SHELL=/bin/bash \
  XDG_RUNTIME_DIR="$rt" JUPYTER_RUNTIME_DIR="$rt/jupyter" "$@"
