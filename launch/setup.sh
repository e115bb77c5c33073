#!/usr/bin/env bash
# Idempotent set-up of the project's virtual environment in .venv.
#
#   PCE_TORCH_SPEC  which torch to install first (default torch==2.13.0: the CPU build on
#                   this machine's disk; on a GPU cluster pass your CUDA build, e.g. "torch").
#   PCE_VENV        where to put the venv (default .venv in the repo root).
set -euo pipefail
root="$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)"  # the repo this script is in, even through a symlink
venv="${PCE_VENV:-$root/.venv}"
torch_spec="${PCE_TORCH_SPEC:-torch==2.13.0}"
stamp="$venv/.pce_setup_stamp"
want="$(cat "$root/pyproject.toml" | sha256sum | cut -c1-16) $torch_spec"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# torch first: the package's own range then accepts it and downloads nothing more.
"$venv/bin/python" -m pip install -q "$torch_spec"
"$venv/bin/python" -m pip install -q -e "$root[test]"
echo "$want" > "$stamp"
echo "set-up done: $venv"
