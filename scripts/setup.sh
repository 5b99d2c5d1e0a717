#!/usr/bin/env bash
# Idempotent set-up of a Debian 12 node for LabVM, run as root.
#   scripts/setup.sh          what the hub needs: docker.io, configurable-http-proxy,
#                             the Python package in .venv, dockerd running, images built
#   scripts/setup.sh --test   also what the test suite needs (MooseFS, chromium, ...)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WITH_TEST=0
[[ "${1:-}" == "--test" ]] && WITH_TEST=1
STATE=${LABVM_STATE_DIR:-/var/lib/labvm}
LOGS=/var/log/labvm
mkdir -p "$STATE" "$LOGS"

say() { printf '[setup] %s\n' "$*"; }

# --- Debian packages --------------------------------------------------------
pkgs=()
have() { command -v "$1" >/dev/null 2>&1; }
have dockerd || pkgs+=(docker.io)
have debootstrap || pkgs+=(debootstrap)
have node || pkgs+=(nodejs)
have npm || pkgs+=(npm)
have setfattr || pkgs+=(attr)
have rsync || pkgs+=(rsync)
have ssh || pkgs+=(openssh-client)  # ssh-keygen; the SSH tests and bench/ssh.py
have ip || pkgs+=(iproute2)
have openssl || pkgs+=(openssl)  # node agents make their TLS certificates
have nsenter || pkgs+=(util-linux)
have iptables || pkgs+=(iptables)
have mkfs.btrfs || pkgs+=(btrfs-progs)  # the uppers' file system, with disk quotas
if ((WITH_TEST)); then
  have mfsmaster || pkgs+=(moosefs-master)
  have mfschunkserver || pkgs+=(moosefs-chunkserver)
  have mfsmount || pkgs+=(moosefs-client)
  have mfsmakesnapshot || pkgs+=(moosefs-client)
  have chromium || pkgs+=(chromium)
fi
# Readable text in the browser's screenshots of JupyterLab and noVNC (test_desktop.py).
if ((WITH_TEST)); then
  [[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]] || pkgs+=(fonts-dejavu-core)
fi
if ((${#pkgs[@]})); then
  say "installing Debian packages: ${pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi

# --- configurable-http-proxy ------------------------------------------------
if ! have configurable-http-proxy; then
  say "installing configurable-http-proxy from npm"
  npm install -g --silent configurable-http-proxy >/dev/null
fi

# --- Python package ---------------------------------------------------------
if [[ ! -x .venv/bin/python ]]; then
  say "creating .venv"
  python3 -m venv .venv
fi
extras=""
((WITH_TEST)) && extras="[test]"
stamp=.venv/.labvm-installed-$(sha256sum pyproject.toml | cut -c1-16)${extras:+-test}
if [[ ! -e $stamp ]]; then
  say "installing labvm-spawner$extras into .venv"
  .venv/bin/pip install -q -e ".$extras"
  touch "$stamp"
fi

# --- dockerd, with user namespaces ------------------------------------------
# Container root must never be host root: every container runs in dockerd's
# userns-remap range (the 'dockremap' subordinate ids). live-restore: servers keep
# running while dockerd restarts (unattended-upgrades does).
if ! docker info >/dev/null 2>&1; then
  say "starting dockerd (userns-remap)"
  mkdir -p /etc/labvm
  cat > /etc/labvm/dockerd.json <<'JSON'
{
  "userns-remap": "default",
  "live-restore": true,
  "storage-driver": "overlay2",
  "log-driver": "json-file",
  "log-opts": {"max-size": "10m", "max-file": "2"}
}
JSON
  setsid nohup dockerd --config-file /etc/labvm/dockerd.json >"$LOGS/dockerd.log" 2>&1 < /dev/null &
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start; see $LOGS/dockerd.log" >&2; exit 1; }
fi
if ! docker info --format '{{.SecurityOptions}}' | grep -q userns; then
  echo "dockerd runs without userns-remap: LabVM refuses to run containers whose root is host root." >&2
  echo "Restart dockerd with \"userns-remap\": \"default\" (see /etc/labvm/dockerd.json)." >&2
  exit 1
fi

# --- the uppers' file system, with disk quotas --------------------------------
# A btrfs with quotas at $STATE/uppers (a sparse file here; scripts/upperfs.sh says how
# to give it a disk). LABVM_UPPERS_FS=plain keeps uppers on the node's disk, unlimited.
if [[ ${LABVM_UPPERS_FS:-quota} == quota ]] && ! scripts/upperfs.sh status "$STATE" >/dev/null 2>&1; then
  say "making the uppers' file system (btrfs with quotas) at $STATE/uppers"
  scripts/upperfs.sh up "$STATE" >/dev/null ||
    say "WARNING: no disk quotas on this node; servers with a 'disk' policy are refused here"
fi

# --- images (cached by content) ---------------------------------------------
say "building images (cached by content)"
.venv/bin/labvm image build
say "ready"
