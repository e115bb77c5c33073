"""``pce_dist.metrics``: the names, the typed accumulators, and the one router schema.

Expectations are computed by hand (or from the raw per-batch values with plain Python),
never by calling the code under test a second time.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pce_dist import evaluation, metrics
from pce_dist.config import load_config
from pce_dist.model import build_model

PACKAGE = Path(metrics.__file__).resolve().parent


# ----------------------------------------------------------------------------- names


def test_names_users_rely_on_are_unchanged():
    assert (metrics.TRAIN_LOSS, metrics.TRAIN_ACCURACY, metrics.EVAL_ACCURACY, metrics.VAL_ACCURACY) == \
        ("train/loss", "train/accuracy", "eval/accuracy", "val/accuracy")
    assert metrics.PERF_IMG_PER_S == "perf/img_per_s"
    assert (metrics.COMM_ROUTED_BYTES, metrics.COMM_DISPATCH_BYTES, metrics.COMM_RETURN_BYTES) == \
        ("comm/routed_bytes_per_step", "comm/dispatch_bytes_per_step", "comm/return_bytes_per_step")
    assert metrics.data_metric("samples_skipped") == "data/samples_skipped"
    assert metrics.keyinit_objective(1) == "keyinit/layer1/objective"
    assert metrics.SUMMARY_METRICS == ("eval/accuracy", "eval/loss", "val/accuracy", "perf/img_per_s")


def test_router_schema_carries_the_phase():
    assert metrics.router_usage("train", 0, 3) == "router/train/layer0/usage/expert3"
    assert metrics.router_usage("val", 1, 0) == "router/val/layer1/usage/expert0"
    assert metrics.router_stat("eval", 1, "entropy") == "router/eval/layer1/entropy"
    with pytest.raises(ValueError, match="unknown router statistic 'entropie'"):
        metrics.router_stat("eval", 0, "entropie")


@pytest.mark.parametrize("split,prefix", [("test", "eval"), ("val", "val"), ("holdout", "holdout")])
def test_eval_prefix(split, prefix):
    assert metrics.eval_prefix(split, eval_split="test") == prefix


@pytest.mark.parametrize("key,goal", [("eval/accuracy", "max"), ("val/accuracy", "max"), ("train/loss", "min"),
                                      ("perf/img_per_s", "max"), ("perf/step_time_s", "min"),
                                      ("router/val/layer0/entropy", None), ("router/train/layer0/usage/expert3", None)])
def test_metric_goal(key, goal):
    assert metrics.metric_goal(key) == goal


_NAME_LIKE = re.compile(r"^(train|eval|val|router|comm|perf|keyinit|cost|data)/[a-z0-9_{}/]*$")


def _string_literals(tree: ast.AST):
    """Plain strings and the leading literal part of f-strings."""
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            yield node.lineno, str(node.values[0].value)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def test_metric_names_are_spelled_only_in_the_metrics_module():
    """A metric name literal anywhere else in the package is a second owner of the schema."""
    allowed = {("config.py", "data/digits")}  # a dataset path, not a metric
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "metrics.py" and path.parent == PACKAGE:
            continue
        rel = path.relative_to(PACKAGE).as_posix()
        for lineno, text in _string_literals(ast.parse(path.read_text())):
            if _NAME_LIKE.match(text) and (rel, text) not in allowed:
                found.append(f"pce_dist/{rel}:{lineno}: {text!r}")
    assert not found, "metric names built outside pce_dist/metrics.py:\n" + "\n".join(found)


def test_the_metrics_module_imports_no_torch_for_readers():
    """``compare`` and ``runs`` read names from it; a torch import would cost them seconds."""
    import subprocess
    import sys

    code = "import sys, pce_dist.compare; print('torch' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ----------------------------------------------------------------------------- training


def _micro_batch(loss, ce, confidence, collapse, correct, selected):
    t = torch.tensor
    return dict(loss=t(loss), ce=t(ce), confidence=t(confidence), collapse=t(collapse), correct=t(correct),
                selected_NE=[t(s, dtype=torch.bool) for s in selected])


# two ranks, two micro-batches each, 2 layers x 3 experts; selected masks are [N, E] per layer
_RANKS = [
    [(_micro_batch(1.0, 0.8, 0.1, 0.0, 3, [[[1, 0, 0], [1, 1, 0]], [[0, 0, 1], [0, 0, 1]]]), 4),
     (_micro_batch(3.0, 2.0, 0.3, 1.0, 1, [[[0, 1, 0], [0, 1, 0]], [[1, 0, 0], [0, 0, 1]]]), 4)],
    [(_micro_batch(2.0, 1.0, 0.2, 0.0, 2, [[[1, 0, 1], [0, 0, 1]], [[0, 1, 0], [0, 1, 0]]]), 4),
     (_micro_batch(6.0, 5.0, 0.6, 2.0, 0, [[[0, 0, 0], [1, 1, 1]], [[1, 1, 0], [1, 0, 0]]]), 2)],
]


def _accumulate(rank_batches):
    acc = metrics.TrainAccumulator.zeros(num_layers=2, num_experts=3, device="cpu")
    for batch, samples in rank_batches:
        acc.add(**batch, samples=samples)
    return acc


class _SumOverRanks:
    """An all-reduce over simulated ranks: adds every other rank's tensor; counts its calls."""

    def __init__(self, others):
        self.others, self.calls = others, []

    def __call__(self, t):
        self.calls.append(t.clone())
        for other in self.others:
            t += other
        return t


def test_train_accumulator_reduces_to_the_hand_computed_interval():
    accs = [_accumulate(batches) for batches in _RANKS]
    # what rank 1 hands to its all-reduce, to be summed into rank 0's
    rank1 = torch.cat([accs[1].sums, torch.tensor([float(accs[1].samples)])])
    reduce = _SumOverRanks([rank1])
    interval = accs[0].reduce(reduce, world_size=2)

    assert len(reduce.calls) == 1 and reduce.calls[0].numel() == 5 + 2 * 3 + 1  # one all-reduce, one vector
    assert interval.loss == pytest.approx((1 + 3 + 2 + 6) / 4)  # mean over 4 micro-batches
    assert interval.ce == pytest.approx((0.8 + 2 + 1 + 5) / 4)
    assert interval.confidence == pytest.approx((0.1 + 0.3 + 0.2 + 0.6) / 4)
    assert interval.collapse == pytest.approx((0 + 1 + 0 + 2) / 4)
    assert interval.samples == 14 and interval.accuracy == pytest.approx(6 / 14)
    assert interval.micro_steps == 2
    # usage: per micro-batch the fraction of patches selecting each expert, then the mean
    layer0 = np.mean([[1, 0.5, 0], [0, 1, 0], [0.5, 0, 1], [0.5, 0.5, 0.5]], axis=0)
    layer1 = np.mean([[0, 0, 1], [0.5, 0, 0.5], [0, 1, 0], [1, 0.5, 0]], axis=0)
    np.testing.assert_allclose(interval.usage_LE, [layer0, layer1])


def test_accumulating_never_syncs_with_the_host():
    """The hot path (``add``) and the evaluation loop's sums stay on the device: counted by
    instrumentation on any device (``pce_dist.host_syncs``), and by CUDA's detector where there is one."""
    from pce_dist.host_syncs import HostSyncCounter

    device = "cuda" if torch.cuda.is_available() else "cpu"
    batches = [({k: [s.to(device) for s in v] if k == "selected_NE" else v.to(device) for k, v in batch.items()},
                samples) for batch, samples in _RANKS[0]]
    train = metrics.TrainAccumulator.zeros(num_layers=2, num_experts=3, device=device)
    evals = metrics.EvalAccumulator.zeros(num_layers=1, num_experts=3, num_classes=4, device=device)
    labels, valid = torch.tensor([0, 3], device=device), torch.ones(2, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        with HostSyncCounter() as syncs:
            for batch, samples in batches:
                train.add(**batch, samples=samples)
                evals.add_batch(loss_B=valid, pred_B=labels, labels_B=labels, valid_B=valid)
                evals.add_layer(0, entropy_N=valid, threshold_N=valid, selected_NE=batch["selected_NE"][0],
                                valid_N=valid)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    assert syncs.total == 0, dict(syncs.by_kind)
    with HostSyncCounter() as syncs:  # the log interval is where the one sync is
        assert train.reduce(lambda t: t, world_size=1).samples == 8
    assert syncs.total == 1, dict(syncs.by_kind)


def test_train_accumulator_without_pce_layers():
    acc = metrics.TrainAccumulator.zeros(num_layers=0, num_experts=4, device="cpu")
    acc.add(**{**_micro_batch(2.0, 2.0, 0.0, 0.0, 5, []), "samples": 8})
    interval = acc.reduce(lambda t: t, world_size=1)
    assert interval.loss == 2.0 and interval.accuracy == 5 / 8 and interval.usage_LE == []


def test_train_metrics_names_and_values():
    interval = metrics.TrainInterval(loss=1.5, ce=1.0, confidence=0.2, collapse=0.0, accuracy=0.5, samples=400.0,
                                     micro_steps=8, elapsed_s=2.0, usage_LE=[[0.25, 0.75]])
    traffic = {"routed_bytes": 4000, "dispatch_bytes": 4040, "return_bytes": 4000}
    out = metrics.train_metrics(interval, lr=0.1, epoch=3, phase=1, grad_accum=2, traffic=traffic)
    assert out["train/loss"] == 1.5 and out["train/accuracy"] == 0.5 and out["train/lr"] == 0.1
    assert out["train/epoch"] == 3 and out["train/phase"] == 1
    assert out["perf/img_per_s"] == 200.0 and out["perf/step_time_s"] == 0.5  # 2 s / 8 micro * 2 per step
    assert out["comm/routed_bytes_per_step"] == 1000.0 and out["comm/dispatch_bytes_per_step"] == 1010.0
    assert out["router/train/layer0/usage/expert1"] == 0.75
    quiet = metrics.train_metrics(interval, lr=0.1, epoch=3, phase=1, grad_accum=2,
                                  traffic={"routed_bytes": 0, "dispatch_bytes": 0, "return_bytes": 0})
    assert not any(k.startswith("comm/") for k in quiet)  # no exchange (ep_size 1): no comm metrics


def test_usage_over_time_gives_arrays_from_logged_rows():
    usage = np.random.default_rng(0).random((3, 2, 4))
    interval = dict(loss=1.0, ce=1.0, confidence=0.0, collapse=0.0, accuracy=0.0, samples=1.0, micro_steps=1,
                    elapsed_s=1.0)
    rows = [{"step": 10 * (t + 1), **metrics.train_metrics(
        metrics.TrainInterval(**interval, usage_LE=usage[t].tolist()), lr=0.0, epoch=0, phase=1, grad_accum=1,
        traffic={"routed_bytes": 0})} for t in range(3)]
    rows.insert(1, {"step": 15, "train/loss": 1.0})  # a row without usage is skipped
    steps_T, usage_TLE = metrics.usage_over_time(rows, num_layers=2, num_experts=4)
    np.testing.assert_array_equal(steps_T, [10, 20, 30])
    np.testing.assert_array_equal(usage_TLE, usage)
    steps_T, usage_TLE = metrics.usage_over_time([], num_layers=2, num_experts=4)
    assert steps_T.shape == (0,) and usage_TLE.shape == (0, 2, 4)


def test_keyinit_metrics():
    records = [{"layer": 0, "objective": 3.5, "seconds": 0.25}, {"layer": 1, "method": "random"}]
    assert metrics.keyinit_metrics(1.5, records) == {"keyinit/seconds_total": 1.5, "keyinit/layer0/objective": 3.5,
                                                     "keyinit/layer0/kmeans_seconds": 0.25}


# ----------------------------------------------------------------------------- evaluation


def test_eval_accumulator_by_hand():
    acc = metrics.EvalAccumulator.zeros(num_layers=1, num_experts=2, num_classes=3, device="cpu")
    acc.add_batch(loss_B=torch.tensor([1.0, 2.0, 4.0]), pred_B=torch.tensor([0, 2, 1]),
                  labels_B=torch.tensor([0, 1, 1]), valid_B=torch.tensor([1.0, 1.0, 0.0]))  # last one: padding
    acc.add_layer(0, entropy_N=torch.tensor([0.5, 1.0, 9.0]), threshold_N=torch.tensor([0.1, 0.3, 9.0]),
                  selected_NE=torch.tensor([[1, 0], [1, 1], [1, 1]], dtype=torch.bool),
                  valid_N=torch.tensor([1.0, 1.0, 0.0]))
    cm = torch.zeros(3, 3)
    cm[0, 0] = cm[1, 2] = 1
    assert torch.equal(acc.cm_KK, cm)
    out = metrics.eval_metrics(acc, prefix="val", collapse_usage=0.6)
    assert out == pytest.approx({
        "val/loss": 1.5, "val/accuracy": 0.5, "val/samples": 2.0,
        "router/val/layer0/entropy": 0.75, "router/val/layer0/threshold": 0.2,
        "router/val/layer0/experts_per_patch": 1.5, "router/val/layer0/collapse": 1.0,  # expert 1: 0.5 < 0.6
        "router/val/layer0/usage/expert0": 1.0, "router/val/layer0/usage/expert1": 0.5})


def test_eval_over_no_valid_sample_names_the_split():
    acc = metrics.EvalAccumulator.zeros(num_layers=2, num_experts=4, num_classes=2, device="cpu")
    with pytest.raises(ValueError, match=r"split 'test' saw no valid sample"):
        metrics.eval_metrics(acc, prefix="eval", split="test", collapse_usage=0.01)


_TINY = ["model.image_size=8", "model.patch_sizes=[4,2]", "model.channels=[8,8]", "model.stem_channels=8"]


@pytest.fixture(scope="module")
def tiny_model():
    cfg = load_config(None, _TINY)
    torch.manual_seed(0)
    return cfg, build_model(cfg.model).eval()


def _accumulate_eval(cfg, model, batches):
    return evaluation.accumulate(model, batches, device=torch.device("cpu"), dtype=torch.float32,
                                 num_layers=len(model.routers()), num_experts=cfg.model.num_experts,
                                 num_classes=cfg.model.num_classes)


def test_evaluation_split_over_ranks_equals_one_process(tiny_model):
    """Two simulated ranks (one padded with a repeat marked invalid), one all-reduce of one
    tensor each: the metrics equal a single process over the same samples."""
    cfg, model = tiny_model
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 1, 8, 8, generator=g), torch.randint(0, cfg.model.num_classes, (7,), generator=g)
    whole = _accumulate_eval(cfg, model, [(x[:4], y[:4], torch.ones(4)), (x[4:], y[4:], torch.ones(3))])
    rank0 = _accumulate_eval(cfg, model, [(x[:4], y[:4], torch.ones(4))])
    rank1 = _accumulate_eval(cfg, model, [(torch.cat([x[4:], x[:1]]), torch.cat([y[4:], y[:1]]),
                                          torch.tensor([1.0, 1.0, 1.0, 0.0]))])
    reduce = _SumOverRanks([rank1.flat])
    reduced = rank0.reduce(reduce)
    assert len(reduce.calls) == 1
    expected = metrics.eval_metrics(whole, prefix="eval", collapse_usage=cfg.model.collapse_usage)
    got = metrics.eval_metrics(reduced, prefix="eval", collapse_usage=cfg.model.collapse_usage)
    assert got.keys() == expected.keys() and got == pytest.approx(expected, rel=1e-5)
    assert got["eval/samples"] == 7.0
    assert torch.equal(reduced.cm_KK, whole.cm_KK) and reduced.cm_KK.sum() == 7
    assert got["eval/accuracy"] == pytest.approx((model(x).logits_BK.argmax(1) == y).float().mean().item())


def test_training_and_evaluation_share_one_router_schema(tiny_model):
    """The usage names of a training interval and of an evaluation differ only in the phase."""
    cfg, model = tiny_model
    L, E = len(model.routers()), cfg.model.num_experts
    interval = metrics.TrainInterval(loss=0.0, ce=0.0, confidence=0.0, collapse=0.0, accuracy=0.0, samples=1.0,
                                     micro_steps=1, elapsed_s=1.0, usage_LE=[[0.0] * E] * L)
    train = {k for k in metrics.train_metrics(interval, lr=0.0, epoch=0, phase=1, grad_accum=1,
                                              traffic={"routed_bytes": 0}) if k.startswith("router/")}
    x = torch.randn(2, 1, 8, 8)
    acc = _accumulate_eval(cfg, model, [(x, torch.zeros(2, dtype=torch.long), torch.ones(2))])
    evaluated = {k for k in metrics.eval_metrics(acc, prefix="val", collapse_usage=0.01) if k.startswith("router/")}
    assert len(train) == L * E
    assert {k.replace("router/train/", "router/val/") for k in train} <= evaluated
    assert all(re.fullmatch(r"router/val/layer\d+/(usage/expert\d+|entropy|threshold|experts_per_patch|collapse)",
                            k) for k in evaluated)


def test_specialisation_caption_reads_the_evaluation_metrics():
    from pce_dist import metrics as m
    values = {m.router_stat("val", 1, "max_share"): 0.4, m.router_stat("val", 1, "nmi_class"): 0.123,
              m.router_stat("val", 1, "nmi_position"): 0.05}
    assert m.specialisation_caption(values, "val", 1) == "max share 0.40\nNMI class 0.12 / pos 0.05"
    assert m.specialisation_caption(values, "val", 0) == ""  # a layer without the metrics: no caption


def test_dispatch_metrics_wait_for_the_busiest_rank_of_every_layer():
    # 2 ranks, 2 layers, 4 steps: layer 0 rows 30/10 (max/mean 1.5), layer 1 10/30 (1.5); the
    # step waits for rank 0 in layer 0 and rank 1 in layer 1: (30 + 30) / (20 + 20) = 1.5,
    # although each rank's total (40) is the same
    out = metrics.dispatch_metrics([[30, 10], [10, 30]], pairs_L=[40, 50], dropped_L=[0, 5], steps=4)
    assert out[metrics.DISPATCH_RANK_IMBALANCE] == pytest.approx(1.5)
    assert out[metrics.dispatch_layer(0, "rank_imbalance")] == pytest.approx(1.5)
    assert out[metrics.dispatch_layer(1, "dropped_fraction")] == pytest.approx(0.1)
    assert out[metrics.dispatch_layer(0, "dropped_fraction")] == 0.0
    assert out[metrics.DISPATCH_EXPERT_PATCHES] == pytest.approx((20 + 20) / 4)
    balanced = metrics.dispatch_metrics([[5, 7], [5, 7]], pairs_L=[10, 14], dropped_L=[0, 0], steps=1)
    assert balanced[metrics.DISPATCH_RANK_IMBALANCE] == 1.0
    assert metrics.dispatch_metrics([], [], [], steps=1) == {}
    with pytest.raises(ValueError, match="unknown dispatch statistic"):
        metrics.dispatch_layer(0, "imbalance")
