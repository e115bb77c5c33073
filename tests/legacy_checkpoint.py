"""Format-2 checkpoints of ZeRO-1/2 runs, as the previous pce_dist wrote them (shared helper).

That format kept DeepSpeed's own optimizer ``state_dict`` of every rank in ``zero_r*.pt``
and no optimizer state by name. pce_dist no longer writes it but still loads it on the
layout that wrote it, so tests make one from a checkpoint of today's format: each rank adds
its partitioned state (``write_partitioned``, inside the run), then ``as_format2`` rewrites
``meta.json`` and drops the by-name state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pce_dist.checkpoint import _atomic_save, _deepspeed_optimizer_globals, zero_file


def write_partitioned(engine: Any, ckpt_dir: Path, rank: int) -> tuple[int, int, str]:
    """This rank's DeepSpeed optimizer ``state_dict`` as ``zero_r{rank}.pt``; ``(rank, size, sha256)``."""
    size, digest = _atomic_save(engine.optimizer.state_dict(), Path(ckpt_dir) / zero_file(rank),
                                allow=_deepspeed_optimizer_globals())
    return rank, size, digest


def as_format2(ckpt_dir: Path, written: list[tuple[int, int, str]]) -> None:
    """Turn ``ckpt_dir`` (with every rank's ``zero_r*.pt`` written) into a format-2 checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    meta = json.loads((ckpt_dir / "meta.json").read_text())
    for rank, size, digest in written:
        meta["files"][zero_file(rank)], meta["sha256"][zero_file(rank)] = size, digest
    for name in [n for n in meta["files"] if n.startswith(("shared", "experts"))]:
        blob = torch.load(ckpt_dir / name, weights_only=True)
        blob["optimizer"] = {}
        meta["files"][name], meta["sha256"][name] = _atomic_save(blob, ckpt_dir / name)
    meta.update(format=2, portable_optimizer=False)
    (ckpt_dir / "meta.json").write_text(json.dumps(meta, indent=1))
