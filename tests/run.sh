#!/usr/bin/env bash
# The README's test command: set up .venv (idempotent) and run every test folder --
# unit, distributed, cluster and e2e. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/launch/setup.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest tests "$@"
