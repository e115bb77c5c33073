"""Preemption as it happens: a 2-rank run is SIGKILLed after a mid-epoch checkpoint and
relaunched with the same command; it must end exactly where the uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from e2e_runs import launch, mlflow_run, run_to_end

OVERRIDES = ["dist.ep_size=2", "train.max_steps=30", "checkpoint.every_steps=8", "train.log_every_steps=1",
             "checkpoint.keep_last=10"]


def _args(out: Path, root: Path) -> list[str]:
    return ["--nproc", "2", "--config", "configs/digits.yaml", "--output-dir", str(out), *OVERRIDES, f"data.root={root}"]


def _run(out: Path, root: Path, timeout: float = 300) -> str:
    return run_to_end(_args(out, root), timeout)


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(ckpt.glob("*.pt")):
        if f.name.startswith(("shared", "experts")):
            blob = torch.load(f, map_location="cpu", weights_only=True)
            out.update({f"{f.name}:model:{k}": v for k, v in blob["model"].items()})
            for name, state in blob["optimizer"].items():
                out.update({f"{f.name}:optim:{name}:{k}": v for k, v in state.items() if torch.is_tensor(v)})
    return out


def _loss_by_step(run_dir: Path) -> dict[int, float]:
    client, run = mlflow_run(run_dir)
    history = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: (m.step, m.timestamp))
    return {m.step: m.value for m in history}  # the latest value logged for each step


@pytest.mark.slow
def test_sigkill_then_relaunch_is_bit_identical(tmp_path, digits_root):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    _run(reference, digits_root)

    proc = launch(_args(resumed, digits_root), start_new_session=True)
    latest = resumed / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (latest.exists() and latest.read_text() == "step_00000008"):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, no chance to clean up
    proc.communicate(timeout=30)
    assert latest.read_text() == "step_00000008", "the kill did not land after the first checkpoint"

    started = time.monotonic()
    stdout = _run(resumed, digits_root)
    relaunch_s = time.monotonic() - started
    assert "resumed from" in (resumed / "logs" / "rank0.log").read_text()

    final = "step_00000030"
    a, b = _tensors(reference / "checkpoints" / final), _tensors(resumed / "checkpoints" / final)
    assert a.keys() == b.keys() and any(":optim:" in k for k in a)
    assert sum(".experts." in k for k in a) > 0
    for key in a:  # every tensor, every expert, optimizer state included
        assert torch.equal(a[key], b[key]), key
    loss_a, loss_b = _loss_by_step(reference), _loss_by_step(resumed)
    assert sorted(loss_a) == sorted(loss_b) == list(range(1, 31))
    assert all(loss_a[s] == loss_b[s] for s in range(9, 31)), "loss history differs after the resume point"
    _, run = mlflow_run(resumed)  # one MLflow run, continued
    assert run.data.tags["restart_count"] == "1" and run.info.status == "FINISHED"
    print(f"relaunch to finish: {relaunch_s:.1f} s")
