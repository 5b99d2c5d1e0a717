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

if ! getent passwd "$LABVM_USER" >/dev/null; then
  if getent passwd "$uid" >/dev/null; then uidopt=""; else uidopt="--uid $uid"; fi
  # shellcheck disable=SC2086
  useradd --create-home $uidopt --user-group --shell /bin/bash "$LABVM_USER"
fi
home=$(getent passwd "$LABVM_USER" | cut -d: -f6)
mkdir -p "$home"
printf '%s ALL=(ALL:ALL) NOPASSWD:ALL\n' "$LABVM_USER" > /etc/sudoers.d/labvm-user
chmod 0440 /etc/sudoers.d/labvm-user

# The GPU allocation, for login shells too (the device nodes enforce it anyway).
cat > /etc/profile.d/labvm-gpus.sh <<PROFILE
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-}"
export NVIDIA_VISIBLE_DEVICES="${NVIDIA_VISIBLE_DEVICES:-none}"
PROFILE

cd "$home"
exec setpriv --reuid="$LABVM_USER" --regid="$LABVM_USER" --init-groups \
  env HOME="$home" USER="$LABVM_USER" LOGNAME="$LABVM_USER" SHELL=/bin/bash "$@"
