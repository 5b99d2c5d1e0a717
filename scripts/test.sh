#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 machine, as root: installs and starts every
# real component it needs (dockerd, configurable-http-proxy, MooseFS, chromium), then runs
# lint and pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/ruff check .
exec .venv/bin/pytest -ra "$@"
