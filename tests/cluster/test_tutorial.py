"""``docs/tutorial.md``, run as written, then what it promises is checked.

The tutorial's ``bash`` blocks run in order, each in a fresh ``bash -euo pipefail``, in a
scratch directory that links the repository's ``launch``, ``configs``, ``data_prep``,
``pyproject.toml`` and ``.venv`` and holds what a user brings: ``my_images/`` (an
ImageFolder of real JPEG files written with Pillow: three colour classes, RGB, odd sizes,
train and test splits) and ``photo.jpg`` (a red image of yet another size). Two markers in
the page tell the runner what a block is: ``<!-- tutorial: server URL -->`` before a
command that serves until stopped (started, probed at URL on a free port, stopped), and
the SLURM block (found by ``launch/slurm.py`` in it) is followed by waiting for its job.
``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL=1`` (MLflow's own variable, exported to the
job by sbatch) makes the short runs sample their nodes more than once.

This is the RGB end-to-end test too: shards from JPEGs, 2 ranks locally and 2 SLURM nodes,
export in both formats, predict (files and an MLflow registry URI), and the logged MLflow
model loaded with stock ``mlflow.pytorch.load_model`` in a fresh process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pce_dist.distributed.rendezvous import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TUTORIAL = REPO / "docs" / "tutorial.md"
LINKED = ("launch", "configs", "data_prep", "pyproject.toml", ".venv")
CLASSES = {"red": (205, 45, 40), "green": (45, 170, 60), "blue": (40, 70, 210)}
PER_CLASS = {"train": 36, "test": 8}
BLOCK_TIMEOUT_S = 420
JOB_TIMEOUT_S = 300
_BLOCK = re.compile(r"(?:<!-- tutorial: (?P<marker>[^>]*?) -->\n)?```bash\n(?P<code>.*?)\n```", re.S)


def tutorial_blocks() -> list[tuple[str, str]]:
    """(marker or "", code) of every ``bash`` block of the tutorial, in order."""
    return [(m.group("marker") or "", m.group("code")) for m in _BLOCK.finditer(TUTORIAL.read_text())]


def colour_image(rng: np.random.Generator, colour: tuple[int, int, int], width: int, height: int) -> Image.Image:
    """Mostly ``colour`` with noise, plus one rectangle of a random colour over <= 1/4 of the area."""
    base = np.array(colour, dtype=np.float32)
    pixels = np.clip(base + rng.normal(0, 25, size=(height, width, 3)), 0, 255)
    h, w = rng.integers(height // 4, height // 2 + 1), rng.integers(width // 4, width // 2 + 1)
    top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
    pixels[top:top + h, left:left + w] = rng.integers(0, 256, size=3)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def make_workdir(root: Path) -> None:
    rng = np.random.default_rng(0)
    for name in LINKED:
        (root / name).symlink_to(REPO / name)
    for split, count in PER_CLASS.items():
        for cls, colour in CLASSES.items():
            folder = root / "my_images" / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                size = (int(rng.integers(21, 71)), int(rng.integers(19, 67)))  # odd, non-square sizes
                colour_image(rng, colour, *size).save(folder / f"{i:04d}.jpg", quality=90)
    colour_image(rng, CLASSES["red"], 77, 51).save(root / "photo.jpg", quality=90)


def run_server(code: str, url: str, cwd: Path, env: dict[str, str]) -> str:
    """Start the serving command on a free port, wait until ``url`` answers, stop it."""
    port = free_port()
    code = code.replace(f"--port {url.rsplit(':', 1)[1]}", f"--port {port}")
    assert f"--port {port}" in code, code
    proc = subprocess.Popen(["bash", "-c", code], cwd=cwd, env=dict(env, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"{code} exited {proc.returncode}: {proc.stdout.read()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                    if reply.status == 200:
                        body = reply.read().decode()
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"{code}: no answer on port {port}"
            time.sleep(0.5)
        search = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search", method="POST",
                                        data=json.dumps({"experiment_ids": ["1"]}).encode(),
                                        headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(search, timeout=10) as reply:  # the UI's API sees the run
            runs = json.loads(reply.read()).get("runs", [])
        assert len(runs) == 1, runs
        return body
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=30)


def wait_for_job(cluster, output: str) -> str:
    match = re.search(r"^job id:\s+(\d+)$", output, re.M)
    assert match, output
    job_id = match.group(1)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        state, reason = cluster.job_state(job_id)
        if state not in {"RUNNING", "COMPLETING", "PENDING", "CONFIGURING", "UNKNOWN"}:
            return state
        assert time.monotonic() < deadline, f"job {job_id} still {state} ({reason})"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def tutorial(slurm_cluster, tmp_path_factory):
    """Runs every block; returns (scratch dir, {block index: its stdout})."""
    work = tmp_path_factory.mktemp("tutorial")
    make_workdir(work)
    env = dict(slurm_cluster.client_env(), PATH=f"{work / '.venv' / 'bin'}:{os.environ['PATH']}",
               MLFLOW_DISABLE_TELEMETRY="true", MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    outputs: dict[int, str] = {}
    blocks = tutorial_blocks()
    assert len(blocks) >= 10, "the tutorial lost its commands"
    for i, (marker, code) in enumerate(blocks):
        t0 = time.monotonic()
        if marker.startswith("server "):
            outputs[i] = run_server(code, marker.split()[1], work, env)
        else:
            proc = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=work, env=env, capture_output=True,
                                  text=True, timeout=BLOCK_TIMEOUT_S, stdin=subprocess.DEVNULL)
            outputs[i] = proc.stdout
            assert proc.returncode == 0, (f"tutorial block {i} exited {proc.returncode}:\n{code}\n"
                                          f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            if "launch/slurm.py" in code:
                state = wait_for_job(slurm_cluster, proc.stdout)
                job_log = "\n".join(p.read_text(errors="replace")[-2000:]
                                    for p in sorted((work / "runs" / "slurm" / "slurm").rglob("*_log.err")))
                assert state == "COMPLETED", f"the tutorial's SLURM job ended {state}:\n{job_log}"
        print(f"tutorial block {i}: {time.monotonic() - t0:.1f} s")
    return work, outputs


def _block_output(outputs: dict[int, str], needle: str) -> str:
    blocks = tutorial_blocks()
    found = [outputs[i] for i, (_, code) in enumerate(blocks) if needle in code]
    assert found, needle
    return found[0]


def test_local_run_learns_the_classes_and_predict_names_them(tutorial):
    work, outputs = tutorial
    train_out = _block_output(outputs, "launch/local.py")
    accuracy = float(re.search(r"^test accuracy: ([0-9.]+)$", train_out, re.M).group(1))
    assert accuracy >= 0.9, train_out[-2000:]  # three colour classes: nothing left to guess
    assert re.search(r"^MLflow model: models:/m-[0-9a-f]+$", train_out, re.M), train_out[-2000:]

    printed = _block_output(outputs, "predict runs/local/model.safetensors")
    assert re.search(r"^photo\.jpg: red [0-9.]+", printed, re.M), printed
    assert re.search(r"layer 0 experts \(4x4 patches", printed) and re.search(r"layer 1 experts \(2x2", printed)
    with Image.open(work / "photo_routing.png") as im:
        assert im.format == "PNG" and im.width > 200 and im.height > 100

    printed = _block_output(outputs, "predict models:/my_classifier/1")
    answer = json.loads(printed[printed.index("{"):])
    top = answer["predictions"][0]["top"]
    assert top[0]["class"] == "red" and top[0]["probability"] > 0.5, top
    assert [len(grid) for grid in answer["predictions"][0]["experts"]] == [4, 2]


def test_slurm_run_logs_system_metrics_per_node(tutorial):
    work, _ = tutorial
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'runs' / 'slurm' / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.tags["world_size"] == "2" and run.info.status == "FINISHED"
    assert re.fullmatch(r"node0=[^,]+,node1=[^,]+", run.data.tags["nodes"]), run.data.tags  # which host is which
    system = sorted(k for k in run.data.metrics if k.startswith("system/"))
    for node in ("node0", "node1"):  # one sampler per node, each its own series
        key = f"system/{node}/cpu_utilization_percentage"
        assert key in system, system
        assert len(client.get_metric_history(run.info.run_id, key)) >= 2
        assert f"system/{node}/system_memory_usage_megabytes" in system
    assert {k.split("/")[1] for k in system} == {"node0", "node1"}, system
    assert not any(k.startswith("system/") for k in run.data.params)


def test_logged_model_loads_with_stock_mlflow_and_scores_as_the_export(tutorial):
    """A fresh process: ``mlflow.pytorch.load_model`` on the registered model, the test split through
    pce_dist's loader; the accuracy equals ``pce_dist.evaluate`` on the safetensors export."""
    work, outputs = tutorial
    evaluated = subprocess.run([sys.executable, "-m", "pce_dist.evaluate", "runs/local/model.safetensors", "--json"],
                               cwd=work, capture_output=True, text=True, timeout=120)
    assert evaluated.returncode == 0, evaluated.stderr
    expected = json.loads(evaluated.stdout)["eval/accuracy"]
    script = """
import inspect, json, sys, mlflow, mlflow.pytorch, torch
mlflow.set_tracking_uri("sqlite:///runs/local/mlflow.db")
assert "pce_dist" not in sys.modules
model = mlflow.pytorch.load_model("models:/my_classifier/1").eval()
code_file = inspect.getfile(type(model))  # the model's own copy of pce_dist (code_paths), not the checkout's
info = mlflow.models.get_model_info("models:/my_classifier/1")
from pce_dist.config import load_config
from pce_dist.data import build_eval_loader
cfg = load_config("runs/local/config.yaml", [])
correct = total = 0
with torch.no_grad():
    for x_BCHW, y_B, valid_B in build_eval_loader(cfg.data, "test", rank=0, world_size=1):
        pred_B = model(x_BCHW).argmax(1)
        correct += int(((pred_B == y_B) & valid_B).sum()); total += int(valid_B.sum())
print(json.dumps({"accuracy": correct / total, "total": total, "module": type(model).__name__, "code": code_file,
                  "signature": str(info.signature.inputs), "meta": info.metadata["pce_dist"]}))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=work, capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["total"] == PER_CLASS["test"] * len(CLASSES)
    assert got["accuracy"] == expected, (got, expected)
    assert got["module"] == "PCEClassifier" and "-1, 3, 32, 32" in got["signature"]
    assert "/code/pce_dist/model/net.py" in got["code"] and str(REPO) not in got["code"], got["code"]
    assert got["meta"]["class_names"] == sorted(CLASSES) and got["meta"]["mean"] == [0.5, 0.5, 0.5]


def test_exports_compare_and_ui_blocks_did_what_the_page_says(tutorial):
    import torch

    work, outputs = tutorial
    blob = torch.load(work / "runs" / "slurm" / "model.pt", weights_only=True)  # no code runs
    assert blob["class_names"] == sorted(CLASSES) and "config" in blob
    assert "logged runs/slurm/model.safetensors as MLflow model models:/m-" in _block_output(outputs, "--mlflow")
    table = _block_output(outputs, "pce_dist.compare")
    assert "runs/local" in table and "runs/slurm" in table and "train.seed" in table, table
    assert "OK" in _block_output(outputs, "mlflow ui")
