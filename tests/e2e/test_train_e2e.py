"""The main job as a user runs it: launch/local.py with 2 ranks and ep_size 2 on digits."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from e2e_runs import launch, mlflow_run

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_main_job_trains_logs_and_exports(tmp_path, digits_root):
    out = tmp_path / "run"
    proc = launch(["--nproc", "2", "--config", "configs/digits.yaml", "--output-dir", str(out),
                   f"data.root={digits_root}", "dist.ep_size=2", "train.epochs=3", "train.log_every_steps=4"])
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout[-3000:]
    accuracy = float(re.search(r"test accuracy: ([0-9.]+)", stdout).group(1))
    assert accuracy > 0.7, stdout[-2000:]
    assert "MLflow run:" in stdout and "checkpoints:" in stdout
    assert len(re.findall(r"test at epoch [123]/3 \(step \d+\): accuracy 0\.\d{4}", stdout)) == 3  # one line per eval

    client, run = mlflow_run(out)
    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2" and run.data.tags["ep_size"] == "2"
    assert run.data.params["model.num_experts"] == "4" and run.data.params["dist.ep_size"] == "2"
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]
    assert len(losses) >= 6
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3  # the loss really decreases
    assert run.data.metrics["eval/accuracy"] == pytest.approx(accuracy, abs=1e-4)
    assert "router/train/layer0/usage/expert3" in run.data.metrics
    # sent: measured at the all_to_all_single call; routed: computed from the routing counts
    # (tests/distributed/test_expert_parallel.py checks both against the routing weights)
    sent, routed = run.data.metrics["comm/dispatch_bytes_per_step"], run.data.metrics["comm/routed_bytes_per_step"]
    assert routed < sent <= 1.1 * routed  # the counts exchange is the only overhead
    evaluations = [a.path for a in client.list_artifacts(run.info.run_id, "plots")]
    assert len(evaluations) == 3  # one folder of pictures per evaluation
    last = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, evaluations[-1])}
    assert last == {"routing_maps.png", "expert_usage.png", "thresholds.png", "confusion_matrix.png"}

    # export -> a fresh process with no DeepSpeed -> the same accuracy as the distributed evaluation
    model = tmp_path / "model.pt"
    subprocess.run([sys.executable, "-m", "pce_dist.export", str(out / "checkpoints"), str(model)], cwd=REPO,
                   check=True, capture_output=True, text=True)
    evaluated = subprocess.run([sys.executable, "-m", "pce_dist.evaluate", str(model), "--data-root", str(digits_root)],
                               cwd=REPO, check=True, capture_output=True, text=True).stdout
    assert float(re.search(r"accuracy: ([0-9.]+)", evaluated).group(1)) == pytest.approx(accuracy, abs=1e-4)
    cost = re.search(r"params: ([0-9,]+) total, ([0-9,]+) active per image; forward ([0-9.]+) MFLOP/image", evaluated)
    total, active = (int(cost.group(i).replace(",", "")) for i in (1, 2))
    assert active < total and float(cost.group(3)) > 0  # 4 experts, about one active per patch


def _rank_process(launcher_pid: int, rank: int) -> psutil.Process | None:
    try:
        children = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for child in children:
        try:
            if child.environ().get("RANK") == str(rank) and "pce_dist.train" in " ".join(child.cmdline()):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


@pytest.mark.slow
def test_killed_rank_fails_the_job_quickly(tmp_path, digits_root):
    out = tmp_path / "run"
    proc = launch(["--nproc", "2", "--config", "configs/digits.yaml", "--output-dir", str(out),
                   f"data.root={digits_root}", "dist.ep_size=2", "train.epochs=50", "dist.timeout_s=30"],
                  start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        victim = None
        while time.monotonic() < deadline:  # wait until training runs (first checkpoint or progress)
            if (out / "logs" / "rank0.log").exists() and "epoch 0" in (out / "logs" / "rank0.log").read_text():
                victim, survivor = _rank_process(proc.pid, 1), _rank_process(proc.pid, 0)
                if victim and survivor:
                    break
            time.sleep(0.5)
        assert victim is not None, "training never started"
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        stdout, _ = proc.communicate(timeout=60)
        elapsed = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert elapsed < 30, f"launcher took {elapsed:.1f} s to notice the dead rank"
    assert "rank 1" in stdout, stdout[-2000:]
    survivor.wait(timeout=10)  # the other rank was stopped too, not left behind
    assert not survivor.is_running()
