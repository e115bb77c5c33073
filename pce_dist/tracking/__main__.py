"""``python -m pce_dist.tracking replay RUN_DIR`` (see ``pce_dist.tracking.replay``)."""

import sys

from pce_dist.tracking.replay import main

if __name__ == "__main__":
    sys.exit(main())
