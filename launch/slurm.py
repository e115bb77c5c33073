"""Submit training to SLURM with submitit (docs/slurm.md).

    python launch/slurm.py --nodes 2 [--gpus-per-node 8] [--partition P] [--time 1-00:00:00]
        [--config configs/X.yaml] [--output-dir DIR] [--dry-run] [key=value ...]

A command line only: the launcher, and the ``TrainJob`` every task runs, are
``pce_dist.launch.slurm``, so submitit pickles the job by reference.
"""

import sys
from pathlib import Path

_REPO = str(Path(__file__).resolve().parents[1])
if _REPO not in sys.path:  # `python launch/slurm.py` puts launch/, not the repo, on the path
    sys.path.insert(1, _REPO)

from pce_dist.launch.slurm import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
