#!/usr/bin/env bash
# The main job: set up this Debian 12 machine as a one-node LabVM and start JupyterHub
# at http://127.0.0.1:8000 (local layer store, this machine as the only node). As root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Log-in accounts are this machine's (PAM). Make the admin account once, with a random
# password shown only here (it is stored only as a hash in /etc/shadow).
getent group labvm-users >/dev/null || groupadd --system labvm-users
getent group labvm-admins >/dev/null || groupadd --system labvm-admins
first_password=""
if ! id labvm-admin >/dev/null 2>&1; then
  useradd --no-create-home --shell /usr/sbin/nologin -G labvm-users,labvm-admins labvm-admin
  first_password=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
  echo "labvm-admin:$first_password" | chpasswd
fi

cat <<MSG

LabVM is starting at http://127.0.0.1:8000

How to log in:
  Open http://127.0.0.1:8000 and log in as "labvm-admin".
MSG
if [[ -n $first_password ]]; then
  echo "  Its password, shown this once: $first_password"
  echo "  (change it with: passwd labvm-admin)"
else
  echo "  Its password was shown when it was made; reset it with: passwd labvm-admin"
fi
cat <<'MSG'

  Add a user:    useradd alice && passwd alice && usermod -aG labvm-users alice
  Add an admin:  usermod -aG labvm-users,labvm-admins bob
  Then start a server: choose GPUs on the form; JupyterLab opens in your own container,
  where `sudo` makes you root (apt-get install works) and everything you write is kept.

MSG
exec .venv/bin/jupyterhub -f jupyterhub_config.py
