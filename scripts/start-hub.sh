#!/usr/bin/env bash
# The main job: set up this Debian 12 machine as a one-node LabVM and start JupyterHub
# at http://127.0.0.1:8000 (local layer store, this machine as the only node). As root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cat <<'MSG'

LabVM is starting at http://127.0.0.1:8000

How to log in:
  1. Open http://127.0.0.1:8000/hub/signup and sign up with the username "admin"
     and a password of your choice (stored only as a bcrypt hash). "admin" is the admin.
  2. Log in at http://127.0.0.1:8000/hub/login as admin.
  3. Other people sign up the same way; approve them at http://127.0.0.1:8000/hub/authorize
  4. Start a server: choose GPUs on the form, then JupyterLab opens in your own container,
     where `sudo` makes you root (apt-get install works) and everything you write is kept.

MSG
exec .venv/bin/jupyterhub -f jupyterhub_config.py
