"""The clipping norm under expert parallelism is the single-process norm (``pce_dist.grad_norm``).

One optimizer step on one global batch (the ``EXACT`` configs of ``inmemory``: per-sample
operations only), on one process and on 2 and 4 ranks with ``ep_size`` 2 and 4, ZeRO 0/1/2.
The expectations are computed here, from the single process's unclipped gradients, in
float64: the norm ``sqrt(sum g^2)`` and the clipped gradient ``g * min(1, c / (norm + 1e-6))``.
A clip of 1.0 bites (the norm is about 4.7). Before ``pce_dist.grad_norm``, DeepSpeed's
ZeRO-0 clipping used the mean of the per-rank norms: 3.860 on 2 ranks, 3.351 on 4 ranks
(``ep_size`` 4) -- these tests fail on that.

SGD with no weight decay: the first step is ``w1 = w0 - lr * g_clipped`` (the momentum
buffer starts as the gradient), so the weights after the step measure the clipped gradient
at every ZeRO stage, also where DeepSpeed keeps it inside its partitions (ZeRO-1/2).
"""

from __future__ import annotations

import pytest
import torch
from inmemory import EXACT, GLOBAL_BATCH, rank_batch
from multiproc import spawn

from pce_dist.config import load_config
from pce_dist.distributed import DistEnv
from pce_dist.engine import build_engine
from pce_dist.grad_norm import GradClipper
from pce_dist.model import pce_loss
from pce_dist.train import build_model_for

CLIP = 1.0
LR = 0.01


def _one_step(rank, world, ep_size, zero_stage):
    cfg = load_config(None, EXACT + [f"data.batch_size={GLOBAL_BATCH // world}", f"dist.ep_size={ep_size}",
                                     "model.num_experts=4", f"dist.zero_stage={zero_stage}", f"optim.grad_clip={CLIP}",
                                     "optim.weight_decay=0", f"optim.lr={LR}"])
    env = DistEnv.from_environ(cfg.dist).init()
    model = build_model_for(cfg, env)
    engine, _ = build_engine(model, cfg, env, total_steps=1)
    model.set_keys_trainable(True)
    x, y = rank_batch(env.rank, world)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine.backward(pce_loss(engine(x), y, cfg.model).total)
    raw = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}  # ZeRO-0 only
    clipped = {}
    if zero_stage == 0:  # the gradients the optimizer sees, after clipping
        step = engine.optimizer.step

        def capture(*args, **kwargs):
            clipped.update({n: p.grad.detach().clone() for n, p in model.named_parameters()})
            return step(*args, **kwargs)

        engine.optimizer.step = capture
    norm = GradClipper(cfg.optim.grad_clip, zero_stage, env).step(engine)
    w1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"norm": float(norm), "raw": raw, "clipped": clipped, "w0": w0, "w1": w1}


@pytest.fixture(scope="module")
def reference():
    """One process: its unclipped gradients, the norm and clipped gradients computed from them here."""
    ref = spawn(_one_step, 1, args=(1, 0), timeout_s=180)[0]
    norm = torch.sqrt(sum(g.double().square().sum() for g in ref["raw"].values())).item()
    coef = min(1.0, CLIP / (norm + 1e-6))
    assert coef < 0.5, f"the clip must bite: norm {norm}"
    ref["expected_norm"] = norm
    ref["expected_clipped"] = {n: (g.double() * coef).float() for n, g in ref["raw"].items()}
    return ref


def _check(results, reference, zero_stage):
    want = reference["expected_norm"]
    for rank, r in enumerate(results):
        assert r["norm"] == pytest.approx(want, rel=1e-6), f"rank {rank}: norm {r['norm']} != single-process {want}"
        for name, g in reference["expected_clipped"].items():
            if name not in r["w1"]:
                assert ".experts." in name  # an expert this rank does not host
                continue
            if zero_stage == 0:
                torch.testing.assert_close(r["clipped"][name], g, rtol=1e-5, atol=1e-7, msg=f"rank {rank}: {name}")
            torch.testing.assert_close(r["w1"][name], r["w0"][name] - LR * g, rtol=1e-5, atol=1e-7,
                                       msg=f"rank {rank}: {name} after the step")
    for name, w in results[0]["w1"].items():  # replicas of an expert, and shared weights, stay identical
        for other in results[1:]:
            if name in other["w1"]:
                assert torch.equal(w, other["w1"][name]), name


def test_single_process_clips_by_its_norm(reference):
    assert reference["norm"] == pytest.approx(reference["expected_norm"], rel=1e-6)
    _check([reference], reference, zero_stage=0)


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_two_ranks_ep2_norm_and_clipped_gradients(reference, zero_stage):
    _check(spawn(_one_step, 2, args=(2, zero_stage), timeout_s=240), reference, zero_stage)


# ZeRO-1/2 with expert replicas (world 4, ep_size 2) is wrong in DeepSpeed 0.19.8 before any
# norm is taken: the experts of EP rank 0 get wrong gradients (clip off: 36 of 51 parameters
# differ from one process after the step, 18 of them not updated at all) and DeepSpeed's norm
# is 4.445 instead of 4.706; ZeRO-2 the same (it used to crash in the first backward, on the
# all-to-all's anchor: a parameter that got no gradient; the anchor is no parameter now).
_EDP_ZERO = pytest.mark.xfail(strict=True, reason="DeepSpeed 0.19.8 ZeRO-1/2 mis-reduce replicated experts")


@pytest.mark.parametrize("ep_size,zero_stage", [(2, 0), (4, 0), (4, 2), pytest.param(2, 1, marks=_EDP_ZERO),
                                               pytest.param(2, 2, marks=_EDP_ZERO)])
def test_four_ranks_norm_and_clipped_gradients(reference, ep_size, zero_stage):
    """ep_size 2: each expert on two ranks (EDP replicas, counted once); ep_size 4: one rank each."""
    _check(spawn(_one_step, 4, args=(ep_size, zero_stage), timeout_s=360), reference, zero_stage)
