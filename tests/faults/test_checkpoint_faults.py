"""Faults a user meets in checkpoints and exported models, asserting what the user sees.

* A pickle payload (an object whose ``__reduce__`` calls ``os.system``) in a checkpoint
  file or an exported model, with ``meta.json``'s checksums updated so that it is not just
  skipped as damaged: resume, ``python -m pce_dist.export`` and ``python -m
  pce_dist.evaluate`` refuse it naming the file, and the command never runs (its marker
  file is never created).
* A damaged newest checkpoint (truncated, corrupted, missing file, broken meta.json): the
  resume warns naming the file and continues from the older intact checkpoint; ``latest``
  is whole again after the next save. An explicit ``checkpoint.resume`` that is damaged is
  an error naming the file, never replaced by another checkpoint.
* Secrets in the config never reach ``meta.json`` or an exported model.

The checkpoints come from a short real run (one process, DeepSpeed, the in-memory data of
tests/distributed) made once per module and copied per test.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "distributed"))  # the process harness and in-memory data

import legacy_checkpoint  # noqa: E402
from multiproc import RankFailed, spawn  # noqa: E402
from inmemory import EXACT, GLOBAL_BATCH, InMemoryData, NullTracker  # noqa: E402

from pce_dist.checkpoint import Checkpointer  # noqa: E402
from pce_dist.config import load_config  # noqa: E402
from pce_dist.distributed import DistEnv  # noqa: E402
from pce_dist.export import export, load_exported  # noqa: E402

SECRET = "hunter2-s3cret"
BASE = EXACT + ["model.num_experts=4", "train.phase2_epoch=100", f"data.batch_size={GLOBAL_BATCH}",
                "checkpoint.every_steps=2", f"tracking.tracking_uri=http://alice:{SECRET}@mlflow.example:5055"]
OLD, NEW = "step_00000002", "step_00000004"


class Payload:
    """Unpickling this runs ``touch <marker>``: what a poisoned file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _config(run_dir, overrides):
    return load_config(None, BASE + [f"output_dir={run_dir}"] + overrides)


def _train(rank, world, run_dir, overrides, format2=False):
    """Resume if there is a checkpoint, train, save; returns (resumed from, its step). With
    ``format2``: this rank's DeepSpeed state is added to the last checkpoint as a format-2
    checkpoint had it, and ``(path, what was written)`` is returned."""
    from pce_dist.engine import build_engine
    from pce_dist.train import build_model_for
    from pce_dist.trainer import Trainer

    cfg = _config(run_dir, overrides)
    env = DistEnv.from_environ(cfg.dist).init()
    model = build_model_for(cfg, env)
    engine, _ = build_engine(model, cfg, env, total_steps=cfg.train.max_steps)
    ckpt = Checkpointer(cfg, env, Path(run_dir))
    path = ckpt.find_resume()
    state = ckpt.load(path, model, engine) if path is not None else None
    resumed = (path.name, state.global_step) if path is not None else (None, None)
    trainer = Trainer(cfg, env, model, engine, InMemoryData(env.rank, world, num_batches=8), NullTracker(), ckpt,
                      state=state)
    trainer.fit()
    if format2:
        saved = ckpt.wait()
        return str(saved), legacy_checkpoint.write_partitioned(engine, saved, env.rank)
    return resumed


def _resume_and_continue(rank, world, run_dir, overrides):
    """Resume as train.py does, continue to step 4; returns (resumed from, its step, warnings)."""
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("pce_dist.checkpoint").addHandler(handler)
    name, step = _train(rank, world, run_dir, overrides)
    return name, step, records


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A run with checkpoints at steps 2 and 4 (``latest`` -> step 4)."""
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    spawn(_train, 1, args=(str(run_dir), ["train.max_steps=4"]), timeout_s=120)
    assert (run_dir / "checkpoints" / "latest").read_text() == NEW
    return run_dir


@pytest.fixture
def run(saved_run, tmp_path):
    """A private copy of the saved run, to damage."""
    return Path(shutil.copytree(saved_run, tmp_path / "run"))


def _rewrite(ckpt: Path, name: str, data: bytes) -> None:
    """Replace one file and update meta.json to match, as a careful attacker would."""
    (ckpt / name).write_bytes(data)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"][name] = len(data)
    meta["sha256"][name] = hashlib.sha256(data).hexdigest()
    (ckpt / "meta.json").write_text(json.dumps(meta))


def _poisoned(original: Path, marker: Path) -> bytes:
    """The file's own content plus a payload, as ``torch.save`` bytes."""
    blob = torch.load(original, map_location="cpu", weights_only=True)
    blob["extra"] = Payload(marker)
    path = original.with_name("poison.tmp")
    torch.save(blob, path)
    data = path.read_bytes()
    path.unlink()
    return data


def _single_env_checkpointer(run_dir: Path, overrides: list[str] = ()) -> Checkpointer:
    """A rank-0-of-1 checkpointer in this process: enough for ``find_resume`` (no collectives)."""
    cfg = _config(run_dir, list(overrides))
    return Checkpointer(cfg, DistEnv.from_environ(cfg.dist, environ={}), run_dir)


# ----------------------------------------------------------------------------- payloads


@pytest.mark.parametrize("name", ["shared.pt", "experts_r0.pt", "rank0.pt"])
def test_payload_in_checkpoint_is_refused_on_resume(run, tmp_path, name):
    marker = tmp_path / "pwned"
    ckpt = run / "checkpoints" / NEW
    _rewrite(ckpt, name, _poisoned(ckpt / name, marker))
    with pytest.raises(RankFailed) as failure:
        spawn(_train, 1, args=(str(run), ["train.max_steps=6"]), timeout_s=120)
    assert f"{ckpt / name}: refusing to load it" in str(failure.value)
    assert "posix.system" in str(failure.value)
    assert not marker.exists()


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory):
    """A format-2 ZeRO-1 checkpoint (the only kind with ``zero_r*.pt``; still loaded on its own layout)."""
    run_dir = tmp_path_factory.mktemp("zero") / "run"
    [(path, written)] = spawn(_train, 1, args=(str(run_dir), ["train.max_steps=2", "dist.zero_stage=1"], True),
                              timeout_s=120)
    legacy_checkpoint.as_format2(Path(path), [written])
    return run_dir


def test_payload_in_zero_optimizer_state_is_refused(zero_run, tmp_path):
    """zero_r*.pt (format 2) is loaded with DeepSpeed's three data classes allowed -- and nothing else."""
    run = Path(shutil.copytree(zero_run, tmp_path / "run"))
    marker = tmp_path / "pwned"
    ckpt = run / "checkpoints" / OLD
    with torch.serialization.safe_globals(_deepspeed_classes()):
        _rewrite(ckpt, "zero_r0.pt", _poisoned(ckpt / "zero_r0.pt", marker))
    with pytest.raises(RankFailed) as failure:
        spawn(_train, 1, args=(str(run), ["train.max_steps=4", "dist.zero_stage=1"]), timeout_s=120)
    assert f"{ckpt / 'zero_r0.pt'}: refusing to load it" in str(failure.value)
    assert not marker.exists()


def _deepspeed_classes():
    from pce_dist.checkpoint import _deepspeed_optimizer_globals

    return _deepspeed_optimizer_globals()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_export_cli_refuses_a_poisoned_checkpoint(run, tmp_path):
    marker, out = tmp_path / "pwned", tmp_path / "model.safetensors"
    ckpt = run / "checkpoints" / NEW
    _rewrite(ckpt, "shared.pt", _poisoned(ckpt / "shared.pt", marker))
    proc = _cli("pce_dist.export", str(run / "checkpoints"), str(out))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{ckpt / 'shared.pt'}: refusing to load it" in proc.stderr
    assert not marker.exists() and not out.exists()


def test_evaluate_cli_refuses_a_poisoned_export(saved_run, tmp_path):
    marker, model = tmp_path / "pwned", tmp_path / "model.pt"
    export(saved_run / "checkpoints", model)
    model.write_bytes(_poisoned(model, marker))
    proc = _cli("pce_dist.evaluate", str(model))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{model}: refusing to load it" in proc.stderr
    assert not marker.exists()
    with pytest.raises(ValueError, match="refusing to load it"):  # the library call too
        load_exported(model)
    assert not marker.exists()


# ----------------------------------------------------------------------------- damage


def _truncate(ckpt: Path) -> str:
    data = (ckpt / "experts_r0.pt").read_bytes()
    (ckpt / "experts_r0.pt").write_bytes(data[:len(data) // 2])
    return f"{ckpt / 'experts_r0.pt'}: {len(data) // 2} bytes on disk"


def _flip_byte(ckpt: Path) -> str:
    data = bytearray((ckpt / "shared.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    (ckpt / "shared.pt").write_bytes(bytes(data))
    return f"{ckpt / 'shared.pt'}: sha256"


def _delete(ckpt: Path) -> str:
    (ckpt / "rank0.pt").unlink()
    return f"{ckpt / 'rank0.pt'}: unreadable"


def _break_meta(ckpt: Path) -> str:
    (ckpt / "meta.json").write_text('{"format": 2, "global_')
    return f"{ckpt / 'meta.json'}: unreadable"


@pytest.mark.parametrize("damage", [_truncate, _flip_byte, _delete, _break_meta], ids=lambda f: f.__name__[1:])
def test_damaged_newest_checkpoint_is_skipped_with_a_warning(run, damage, caplog):
    expected = damage(run / "checkpoints" / NEW)
    with caplog.at_level(logging.WARNING, logger="pce_dist.checkpoint"):
        chosen = _single_env_checkpointer(run).find_resume()
    assert chosen == run / "checkpoints" / OLD
    assert any(NEW in m and expected in m for m in caplog.messages), caplog.messages


def test_resume_after_damage_continues_and_latest_is_whole_again(run):
    expected = _truncate(run / "checkpoints" / NEW)
    name, step, warnings = spawn(_resume_and_continue, 1, args=(str(run), ["train.max_steps=4"]), timeout_s=120)[0]
    assert (name, step) == (OLD, 2)
    assert any(expected in w for w in warnings), warnings
    # training went on from step 2 and rewrote step 4: latest names an intact checkpoint again
    assert (run / "checkpoints" / "latest").read_text() == NEW
    assert _single_env_checkpointer(run).find_resume() == run / "checkpoints" / NEW
    name, step, warnings = spawn(_resume_and_continue, 1, args=(str(run), ["train.max_steps=4"]), timeout_s=120)[0]
    assert (name, step, warnings) == (NEW, 4, [])


@pytest.mark.parametrize("latest", [None, "step_0000000", "../../etc"], ids=["missing", "garbled", "outside"])
def test_missing_or_damaged_latest_still_finds_the_newest(run, latest, caplog):
    """A save killed between its rename and writing ``latest``, or a ``latest`` edited by hand."""
    (run / "checkpoints" / "latest").unlink()
    if latest is not None:
        (run / "checkpoints" / "latest").write_text(latest)
    with caplog.at_level(logging.WARNING, logger="pce_dist.checkpoint"):
        assert _single_env_checkpointer(run).find_resume() == run / "checkpoints" / NEW
    assert any("latest" in m for m in caplog.messages), caplog.messages


def test_damaged_explicit_resume_is_an_error_naming_the_file(run):
    expected = _truncate(run / "checkpoints" / NEW)
    ckpt = _single_env_checkpointer(run, [f"checkpoint.resume={run / 'checkpoints' / NEW}"])
    with pytest.raises(ValueError, match="checkpoint.resume") as failure:
        ckpt.find_resume()
    assert expected in str(failure.value)


def test_no_intact_checkpoint_is_an_error_listing_each(run):
    newest, older = _truncate(run / "checkpoints" / NEW), _flip_byte(run / "checkpoints" / OLD)
    with pytest.raises(ValueError, match="no intact checkpoint") as failure:
        _single_env_checkpointer(run).find_resume()
    assert newest in str(failure.value) and older in str(failure.value)


# ----------------------------------------------------------------------------- secrets


def test_secrets_never_reach_meta_or_exports(saved_run, tmp_path):
    meta = (saved_run / "checkpoints" / NEW / "meta.json").read_text()
    assert SECRET not in meta and "alice:***@mlflow.example" in meta
    states = []
    for out in (tmp_path / "model.pt", tmp_path / "model.safetensors"):
        export(saved_run / "checkpoints", out)
        assert SECRET.encode() not in out.read_bytes()
        model, config = load_exported(out)
        assert config["tracking"]["tracking_uri"] == "http://alice:***@mlflow.example:5055"
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()  # both formats hold the same model
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
