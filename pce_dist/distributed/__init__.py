"""Process layout and process groups (``DistEnv``); the patch dispatcher lives beside it.

Names are resolved lazily (PEP 562): the launchers import the stdlib-only submodules
(``heartbeat``, ``rendezvous``, ``slurm``) without paying for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"DistEnv": "env", "free_port": "rendezvous", "expand_nodelist": "slurm",
            "slurm_first_host": "slurm", "slurm_master_port": "slurm"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
