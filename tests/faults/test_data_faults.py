"""Damaged or hostile data: what the user sees -- the run fails and the culprit is named.

One test per fault a user met (each used to exit 0): a truncated train shard, random bytes
inside one, a deleted shard, a manifest whose sample count or digest does not fit the
shard, a deleted test shard (reported as ``test accuracy: 0.0000``), and a manifest name
that a ``pipe:`` root pasted into the shell. Loader-level checks are fast and run the real
pipeline on a copy of the digits shards (``data_prep`` output, 128 samples per shard);
the end-to-end ones run ``launch/local.py --nproc 2`` as a user does and look at the exit
status and the console.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from runs import digits_args, finish, launch, mlflow_run
from webdataset.gopen import gopen

from pce_dist import metrics
from pce_dist.config import DataConfig, load_config
from pce_dist.data import (CorruptDataError, build_eval_loader, build_train_loader, read_manifest,
                           resolve_url)
from pce_dist.data_plan import plan_train

REPO = Path(__file__).resolve().parents[2]
E2E_STEPS = "train.max_steps=2"  # enough to start training; the faults below hit the first batches


@pytest.fixture
def shards(tmp_path, digits_root) -> Path:
    """A private copy of the digits shards, to damage."""
    return Path(shutil.copytree(digits_root, tmp_path / "shards"))


def cfg_for(root, **kw) -> DataConfig:
    return DataConfig(**{"root": str(root), "batch_size": 32, "num_workers": 1, "mean": [0.5], "std": [0.5], **kw})


def run_train_epoch(cfg: DataConfig, world_size: int = 2) -> list[dict]:
    """Every rank's loader for epoch 0, fully iterated; their stats."""
    stats = []
    for rank in range(world_size):
        loader = build_train_loader(cfg, rank=rank, world_size=world_size, seed=0, epoch=0)
        assert sum(1 for _ in loader) == len(loader)
        stats.append(loader.stats())
    return stats


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def scramble_middle(path: Path, num_bytes: int = 64 * 1024) -> None:
    data = bytearray(path.read_bytes())
    start = (len(data) - num_bytes) // 2
    data[start:start + num_bytes] = random.Random(0).randbytes(num_bytes)
    path.write_bytes(bytes(data))


def edit_manifest(root: Path, edit) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


# ----------------------------------------------------------------------------- damaged train shards


@pytest.mark.parametrize("verify,has_size", [("sha256", True), ("sha256", False), ("size", True), ("off", True)])
def test_truncated_train_shard_stops_the_epoch_naming_it(shards, verify, has_size):
    """Half a shard used to cost 483 of 704 slots, refilled with repeats, and exit 0."""
    truncate(shards / "train-000003.tar")
    if not has_size:  # a manifest written before sizes were recorded: the digest still catches it
        edit_manifest(shards, lambda m: [s.pop("size") for s in m["splits"]["train"]["shards"]])
    with pytest.raises(CorruptDataError, match=r"shard \S*train-000003\.tar"):
        run_train_epoch(cfg_for(shards, verify=verify))


@pytest.mark.parametrize("verify", ["sha256", "off"])
def test_random_bytes_inside_a_shard_stop_the_epoch_naming_it(shards, verify):
    scramble_middle(shards / "train-000005.tar")
    with pytest.raises(CorruptDataError, match=r"train-000005\.tar"):
        run_train_epoch(cfg_for(shards, verify=verify))


@pytest.mark.parametrize("verify", ["sha256", "off"])
def test_deleted_train_shard_stops_the_epoch_naming_it(shards, verify):
    (shards / "train-000007.tar").unlink()
    with pytest.raises(CorruptDataError, match=r"train-000007\.tar: file missing"):
        run_train_epoch(cfg_for(shards, verify=verify))


def test_manifest_undercounting_a_shard_is_detected(shards):
    """Lowering one shard's num_samples (split total kept consistent) silently dropped its tail.

    The shard's bytes and digest are untouched: only the reader that ends its slice at the
    shard's last listed sample, and finds one more, can tell. Batch 2 over 1374 samples uses
    every sample, so every slice runs to its shard's end.
    """
    def lower(m):
        m["splits"]["train"]["shards"][0]["num_samples"] -= 64
        m["splits"]["train"]["num_samples"] -= 64
    edit_manifest(shards, lower)
    with pytest.raises(CorruptDataError, match=r"train-000000\.tar: holds more than the 64 samples"):
        run_train_epoch(cfg_for(shards, batch_size=2), world_size=1)


@pytest.mark.parametrize("root", ["{shards}", "pipe:cat {shards}/{{name}}"], ids=["local", "pipe"])
def test_the_last_shard_of_an_eval_split_is_checked_too(shards, root):
    """Eval has no shuffle buffer to pull the tar stage past its last sample: the batch stage does.

    356 samples in batches of 4 fill the last batch exactly, so nothing else pulls further.
    """
    def lower(m):
        m["splits"]["test"]["shards"][-1]["num_samples"] -= 3
        m["splits"]["test"]["num_samples"] -= 3
    edit_manifest(shards, lower)
    with pytest.raises(CorruptDataError, match=r"test-000002\.tar: holds more than the 100 samples"):
        list(build_eval_loader(cfg_for(root.format(shards=shards), batch_size=4), "test", rank=0, world_size=1))


def test_manifest_overcounting_a_shard_is_detected(shards):
    def raise_count(m):
        m["splits"]["train"]["shards"][2]["num_samples"] += 5
        m["splits"]["train"]["num_samples"] += 5
    edit_manifest(shards, raise_count)
    with pytest.raises(CorruptDataError, match=r"train-000002\.tar: ended after 128 samples"):
        run_train_epoch(cfg_for(shards, batch_size=1), world_size=1)


def test_manifest_sha256_is_checked(shards):
    """The digest was recorded but never compared: a shard replaced by another went unnoticed."""
    shutil.copy(shards / "train-000001.tar", shards / "train-000004.tar")  # same size, other samples
    with pytest.raises(CorruptDataError, match=r"train-000004\.tar: sha256 .* does not match"):
        run_train_epoch(cfg_for(shards))
    run_train_epoch(cfg_for(shards, verify="size"))  # what the cheaper check lets through


def test_pipe_streams_are_verified_while_streaming(shards):
    """No stat, no second read for a stream: hashed as read, the rest drained, then compared.

    The last byte of a shard is tar padding no reader parses, so only the digest sees it.
    """
    path = shards / "train-000006.tar"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    piped = f"pipe:cat {shards}/{{name}}"
    with pytest.raises(CorruptDataError, match=r"train-000006\.tar: sha256 .* streamed bytes"):
        run_train_epoch(cfg_for(piped))
    run_train_epoch(cfg_for(piped, verify="off"))
    truncate(path)
    with pytest.raises(CorruptDataError, match=r"train-000006\.tar"):
        run_train_epoch(cfg_for(piped, verify="size"))


# ----------------------------------------------------------------------------- tolerance


def test_a_tolerance_skips_counts_and_still_has_a_limit(shards, caplog):
    truncate(shards / "train-000003.tar")
    with caplog.at_level(logging.WARNING, logger="pce_dist.data"):  # in-process loading: caplog sees it
        stats = run_train_epoch(cfg_for(shards, max_skipped_fraction=0.5, num_workers=0))
    skipped = sum(s["samples_skipped"] for s in stats)
    assert 0 < skipped <= 128  # the shard's planned samples, on whichever ranks read it
    assert sum(s["samples_padded"] for s in stats) == skipped  # the only case that pads with repeats
    assert sum(s["shards_failed"] for s in stats) >= 1
    assert "train-000003.tar" in caplog.text
    with pytest.raises(CorruptDataError, match=r"rank \d loader process 0 skipped \d+ of its 704 planned samples, "
                                               r"more than data.max_skipped_fraction=0.01 allows"):
        run_train_epoch(cfg_for(shards, max_skipped_fraction=0.01))


# ----------------------------------------------------------------------------- eval split


def test_deleted_test_shard_is_an_error_not_an_accuracy(shards):
    """It used to print ``test accuracy: 0.0000`` on 0 samples."""
    (shards / "test-000000.tar").unlink()
    with pytest.raises(CorruptDataError, match=r"test-000000\.tar: file missing"):
        list(build_eval_loader(cfg_for(shards), "test", rank=0, world_size=2))


def test_empty_eval_split_is_an_error(shards):
    edit_manifest(shards, lambda m: m["splits"].update(test={"num_samples": 0, "shards": []}))
    with pytest.raises(ValueError, match=r"manifest.json: split 'test' has no samples"):
        build_eval_loader(cfg_for(shards), "test", rank=0, world_size=1)


def test_metrics_over_no_valid_sample_name_the_split():
    """What the trainer computes after the all-reduce when every rank counted nothing."""
    empty = metrics.EvalAccumulator.zeros(num_layers=2, num_experts=4, num_classes=2, device="cpu")
    with pytest.raises(ValueError, match=r"split 'test' saw no valid sample"):
        metrics.eval_metrics(empty, prefix="eval", split="test", collapse_usage=0.01)
    ok = metrics.EvalAccumulator.zeros(num_layers=2, num_experts=4, num_classes=2, device="cpu")
    ok.sums_S.copy_(torch.tensor([3.0, 2.0, 4.0]))
    ok.layers_LS.fill_(1.0)
    out = metrics.eval_metrics(ok, prefix="eval", collapse_usage=0.01)
    assert out["eval/accuracy"] == 0.5 and out["eval/samples"] == 4.0


# ----------------------------------------------------------------------------- hostile names


@pytest.mark.parametrize("template", ["train-000000.tar; touch {marker}", "$(touch {marker}).tar",
                                      "`touch {marker}`", "train-000000.tar\ntouch {marker}",
                                      "../train-000000.tar", "train-000000.tar|touch {marker}"])
def test_pipe_root_never_runs_a_manifest_name(shards, tmp_path, template):
    marker = tmp_path / "injected"
    bad_name = template.format(marker=marker)
    edit_manifest(shards, lambda m: m["splits"]["train"]["shards"][0].update(name=bad_name))
    with pytest.raises(ValueError, match=re.escape("manifest.json: invalid manifest: split 'train' lists shard "
                                                   f"name {bad_name!r}")):
        read_manifest(f"pipe:cat {shards}/{{name}}")
    assert not marker.exists()


def test_names_are_shell_quoted_in_pipe_commands(tmp_path):
    """The second line of defence, should a name ever get past the pattern."""
    marker = tmp_path / "injected"
    url = resolve_url(f"pipe:cat {tmp_path}/{{name}}", f"x; touch {marker}")
    assert url == f"pipe:cat {tmp_path}/'x; touch {marker}'"
    with pytest.raises(OSError, match="exit 1"):
        with gopen(url) as stream:  # cat of a file with that odd name: fails, runs nothing
            stream.read()
    assert not marker.exists()


# ----------------------------------------------------------------------------- end to end


def rank1_first_shard(root: Path) -> str:
    """The shard rank 1 of 2 reads first in epoch 0 of the digits run: it fails in key init."""
    cfg = load_config(REPO / "configs" / "digits.yaml", [f"data.root={root}"])
    manifest = read_manifest(root)
    num_batches = len(build_train_loader(cfg.data, rank=1, world_size=2, seed=cfg.train.seed, epoch=0,
                                         manifest=manifest))
    plans = plan_train(manifest.shards("train"), num_batches=num_batches, rank=1, world_size=2,
                       batch_size=cfg.data.batch_size, num_workers=max(1, cfg.data.num_workers),
                       seed=cfg.train.seed, epoch=0)
    return plans[0].slices[0].shard.name


@pytest.mark.slow
def test_run_with_a_truncated_train_shard_fails_naming_it(tmp_path, shards):
    name = rank1_first_shard(shards)
    truncate(shards / name)
    proc = launch(digits_args(tmp_path / "run", shards, E2E_STEPS))
    stdout = finish(proc)
    assert proc.returncode != 0, stdout[-3000:]
    assert re.search(rf"CorruptDataError: shard \S*{re.escape(name)}: \d+ bytes but manifest.json says", stdout), \
        stdout[-3000:]
    assert "accuracy:" not in stdout


@pytest.mark.slow
def test_run_with_a_deleted_test_shard_fails_naming_it(tmp_path, shards):
    (shards / "test-000000.tar").unlink()
    proc = launch(digits_args(tmp_path / "run", shards, E2E_STEPS))
    stdout = finish(proc)
    assert proc.returncode != 0, stdout[-3000:]
    assert re.search(r"CorruptDataError: shard \S*test-000000\.tar: file missing", stdout), stdout[-3000:]
    assert "test accuracy" not in stdout


@pytest.mark.slow
def test_run_under_a_tolerance_finishes_and_reports_the_skipped_samples(tmp_path, shards):
    """Needs the trainer's epoch-end report (all-reduced ``stats()``: console and MLflow)."""
    truncate(shards / rank1_first_shard(shards))
    out = tmp_path / "run"
    proc = launch(digits_args(out, shards, E2E_STEPS, "data.max_skipped_fraction=0.5"))
    stdout = finish(proc)
    assert proc.returncode == 0, stdout[-3000:]
    assert "samples skipped" in stdout, stdout[-3000:]
    _, run = mlflow_run(out)
    assert run.data.metrics["data/samples_skipped"] > 0
    assert run.data.metrics["data/shards_failed"] >= 1
