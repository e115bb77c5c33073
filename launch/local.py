"""Run N training ranks on this machine; they start together and stop together.

    python launch/local.py --nproc 2 [--config configs/X.yaml] [--output-dir DIR] [key=value ...]

A command line only: the launcher is ``pce_dist.launch.local`` (its docstring says what it
does on failures, signals and hangs). Standard library only before that import, so it
starts instantly.
"""

import sys
from pathlib import Path

_REPO = str(Path(__file__).resolve().parents[1])
if _REPO not in sys.path:  # `python launch/local.py` puts launch/, not the repo, on the path
    sys.path.insert(1, _REPO)

from pce_dist.launch.local import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
