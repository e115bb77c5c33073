"""Exact logged history after a kill at any moment: the whole job (launcher and both ranks)
is SIGKILLed at a seeded random step between two checkpoints, relaunched with the same
command, and every metric the run ends up with in MLflow -- at every step, every value --
must equal what the uninterrupted run logged there.

Why the steps are chosen as they are: a logged train value is the mean over a window of
``train.log_every_steps`` (10) steps, checkpoints come every 5. A kill after the checkpoint
of step 15, 25 or 35 resumes *inside* a window (16..20 of 11..20), which is what the
checkpoint's stored log interval must bridge; a kill after step 10/20/30 would resume at a
window boundary and prove nothing. Step 22 is an epoch end (evaluation, epoch checkpoint):
a kill after 25 also checks the window that restarted there and the all-to-all traffic
counters, which carry evaluation traffic into the next window; the evaluation at step 22 or
40 checks the loader's per-epoch counts (``data/batches``, ``data/samples_seen``), which a
resumed loader counts only from its resume point.

Not compared (docs/checkpoints.md): timings, which differ between any two runs (``perf/*``,
``keyinit/*seconds*``), and the two loader counts that describe the resume itself
(``data/start_step``, ``data/samples_resumed_over``: 0 without one).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
from e2e_runs import launch, metric_histories, run_to_end

from pce_dist import metrics as names

OVERRIDES = ["dist.ep_size=2", "train.max_steps=40", "checkpoint.every_steps=5", "train.log_every_steps=10",
             "checkpoint.keep_last=10", "dist.heartbeat_s=0.1"]
SEEDS = (0, 1)
# timings and the machine's own numbers (MLflow's system metrics) are no training values
NOT_COMPARED = ("perf/", names.SYSTEM_PREFIX, "keyinit/seconds_total", "data/start_step",
                "data/samples_resumed_over")


def _compared(histories: dict) -> dict:
    return {k: v for k, v in histories.items() if not k.startswith(NOT_COMPARED) and not k.endswith("_seconds")}


def _args(out: Path, root: Path) -> list[str]:
    return ["--nproc", "2", "--config", "configs/digits.yaml", "--output-dir", str(out), *OVERRIDES, f"data.root={root}"]


def _run(out: Path, root: Path, timeout: float = 400) -> str:
    return run_to_end(_args(out, root), timeout)


def _step(out: Path) -> int:
    """The optimizer step rank 0 reported last (its heartbeat file; written every 0.1 s)."""
    try:
        return json.loads((out / "logs" / "heartbeat" / "rank0.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def _kill_at(out: Path, root: Path, step: int, timeout: float = 300) -> int:
    """Start the run and SIGKILL its whole process group once rank 0 is at ``step``; returns the
    step the newest checkpoint then holds (what the relaunch resumes from)."""
    proc = launch(_args(out, root), start_new_session=True)
    deadline = time.monotonic() + timeout
    while _step(out) < step:
        assert proc.poll() is None, f"the run ended before step {step}: {proc.communicate()[0][-2000:]}"
        assert time.monotonic() < deadline, f"step {step} not reached in {timeout} s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # launcher and ranks: nothing is flushed, nothing cleans up
    proc.communicate(timeout=30)
    return int((out / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits_root):
    out = tmp_path_factory.mktemp("reference")
    _run(out, digits_root)
    return _compared(metric_histories(out))


def _mismatches(expected: dict, got: dict) -> list[str]:
    """Every (metric, step) whose values differ, or that only one run logged."""
    problems = []
    for name in sorted(set(expected) | set(got)):
        want, have = expected.get(name, {}), got.get(name, {})
        for step in sorted(set(want) | set(have)):
            if step not in have or step not in want or any(v != want[step][-1] for v in have[step]):
                problems.append(f"{name}@{step}: uninterrupted {want.get(step)}, resumed {have.get(step)}")
    return problems


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_kill_anywhere_then_relaunch_logs_the_uninterrupted_history(tmp_path, digits_root, reference, seed):
    rng = random.Random(seed)
    checkpoint = rng.choice([15, 25, 35])  # resumes inside a log window (see the module docstring)
    target = checkpoint + rng.randint(1, 2)
    out = tmp_path / "run"
    resumed_from = _kill_at(out, digits_root, target)
    assert resumed_from % 10 != 0, f"seed {seed}: the kill landed at a window boundary (step {resumed_from})"

    stdout = _run(out, digits_root)
    assert f"resumed from {out / 'checkpoints' / f'step_{resumed_from:08d}'}" in (out / "logs" / "rank0.log").read_text()
    got = _compared(metric_histories(out))
    assert any(name.startswith("comm/") for name in reference), "no all-to-all traffic metric to compare"
    assert len(reference["train/loss"]) == 4 and "data/batches" in reference
    problems = _mismatches(reference, got)
    assert not problems, f"seed {seed}, resumed from step {resumed_from}:\n" + "\n".join(problems[:20])
    print(f"seed {seed}: killed at step >= {target}, resumed from {resumed_from}; "
          f"{sum(len(s) for s in got.values())} (metric, step) pairs equal")
