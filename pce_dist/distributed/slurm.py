"""SLURM helpers for ``DistEnv``: the rendezvous host and port, derived the same on every task.

Every task of a job step must agree on MASTER_ADDR/MASTER_PORT without talking to each
other first, so both are pure functions of variables SLURM gives every task:

* host: the first node of the step's node list (rank 0 runs there under SLURM's default
  block distribution). ``scontrol show hostnames`` is the authority on SLURM's
  compressed syntax; the pure-Python expander below covers the common forms
  (``node[1-4,7],gpu[01-02]-ib,login``) for machines where scontrol is missing or fails.
* port: a hash of the job id into [20000, 30000) -- below Linux's default ephemeral range
  (32768+), so outgoing connections of other processes do not take it, and different jobs
  sharing a node rarely collide.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import zlib

_PORT_BASE = 20000
_PORT_SPAN = 10000


def slurm_master_port(job_id: str) -> int:
    """Deterministic rendezvous port for a SLURM job id (numeric ids map linearly)."""
    job_id = job_id.strip()
    n = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return _PORT_BASE + n % _PORT_SPAN


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: ``a[1,2],b`` -> ``['a[1,2]', 'b']``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in SLURM node list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in SLURM node list {text!r}")
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_ranges(spec: str, nodelist: str) -> list[str]:
    """``01-03,7`` -> ``['01', '02', '03', '7']``; zero padding follows the range start."""
    out = []
    for item in spec.split(","):
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"cannot parse range {item!r} in SLURM node list {nodelist!r}")
        if not sep:
            out.append(lo)
            continue
        width = len(lo) if lo.startswith("0") else 0
        out.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list without scontrol (every bracket group, in order)."""
    hosts: list[str] = []
    for part in _split_top_level(nodelist.strip()):
        # pieces alternate literal text and bracket contents: "gpu[1-2]-ib" -> gpu, 1-2, -ib
        pieces = re.split(r"\[([^\]]*)\]", part)
        choices = [[p] if i % 2 == 0 else _expand_ranges(p, nodelist) for i, p in enumerate(pieces)]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def slurm_first_host(nodelist: str, timeout_s: float = 10.0) -> str:
    """First host of a SLURM node list: ``scontrol show hostnames``, else the local parser."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=timeout_s, check=True).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass  # a broken scontrol should not stop a job whose node list we can read ourselves
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise ValueError(f"SLURM node list {nodelist!r} names no hosts")
    return hosts[0]
