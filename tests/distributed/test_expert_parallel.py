"""Expert parallelism at the model level: the all-to-all dispatcher against one process.

Each rank takes its slice of the same global batch; the reference is one process holding
every expert and the whole batch. Gradients of the global mean loss: shared parameters
are averaged over ranks; an expert's gradient is the sum over the ranks holding it,
divided by the world size (the all-to-all backward already summed the contributions of
every rank in its EP group) -- DeepSpeed's MoE reduction, done by hand here.

Tolerance: 1e-5 relative. The two runs do the same arithmetic except that reductions over
the batch (the mean loss, BatchNorm statistics over an expert's rows, weight gradients)
are summed in a different order across processes, which moves float32 results by a few ulp.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from multiproc import spawn

from pce_dist.config import DistConfig, load_config
from pce_dist.distributed import DistEnv
from pce_dist.distributed.expert_parallel import parallelize_experts, traffic_stats
from pce_dist.model import PCELayer, build_model, pce_loss

GLOBAL_BATCH = 8


def _layer(num_experts: int, norm: str) -> PCELayer:
    torch.manual_seed(0)
    layer = PCELayer(6, 8, patch_size=4, map_size=8, num_experts=num_experts, expert_norm=norm,
                     expert_dropout=0.0, temperature=0.3)
    return layer


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 6, 8, 8, generator=g), torch.randn(GLOBAL_BATCH, 8, 8, 8, generator=g)


def _layer_loss(layer, x, target):
    y, routes = layer(x)
    return (y - target).square().mean() + routes.weights_NE.square().mean()


def _reference_layer(num_experts, norm):
    layer = _layer(num_experts, norm).train()
    x, target = _data()
    x.requires_grad_(True)
    loss = _layer_loss(layer, x, target)
    loss.backward()
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in layer.named_parameters()}
    return {"y": layer(x)[0].detach(), "loss": loss.item(), "grads": grads,
            "x_grad": x.grad}


def parallelize_experts_layer(layer, env):
    """Keep this rank's experts of one layer and install the all-to-all dispatcher."""
    from pce_dist.distributed.dispatch import AllToAllDispatcher
    ids = env.local_expert_ids(layer.num_experts)
    layer.keep_experts(ids)
    layer.dispatcher = AllToAllDispatcher(env.ep_group, env.ep_size, env.ep_rank, ids)


def _ep_layer_worker(rank, world_size, num_experts, norm, ep_size):
    env = DistEnv.from_environ(DistConfig(ep_size=ep_size, timeout_s=30)).init()
    layer = _layer(num_experts, norm).train()
    if ep_size > 1:
        parallelize_experts_layer(layer, env)
    x_all, target_all = _data()
    per = GLOBAL_BATCH // world_size
    x = x_all[rank * per:(rank + 1) * per].clone().requires_grad_(True)
    loss = _layer_loss(layer, x, target_all[rank * per:(rank + 1) * per])
    loss.backward()
    grads = {}
    for name, p in layer.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        group = env.edp_group if ".experts." in name or name.startswith("experts.") else env.dp_group
        dist.all_reduce(g, group=group)
        grads[name] = g / world_size
    loss_t = torch.tensor([loss.item()])
    dist.all_reduce(loss_t)
    y = layer(x)[0].detach()
    stats = layer.dispatcher.stats if ep_size > 1 else None
    # d(local mean)/dx = world_size * d(global mean)/dx
    return {"y": y, "loss": loss_t.item() / world_size, "grads": grads, "x_grad": x.grad / world_size,
            "experts": sorted(layer.experts.keys()),
            "routed": stats.routed_bytes if stats else 0, "dispatched": stats.dispatch_bytes if stats else 0}


@pytest.mark.parametrize("num_experts,norm,ep_size", [(4, "group", 2), (4, "batch", 2), (2, "batch", 2), (4, "group", 1)])
def test_ep_layer_matches_single_process(num_experts, norm, ep_size):
    ref = _reference_layer(num_experts, norm)
    results = spawn(_ep_layer_worker, 2, args=(num_experts, norm, ep_size), timeout_s=90)
    per = GLOBAL_BATCH // 2
    y = torch.cat([r["y"] for r in results])
    torch.testing.assert_close(y, ref["y"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in results]), ref["x_grad"], rtol=1e-5, atol=1e-7)
    assert results[0]["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    for rank, r in enumerate(results):
        expected_ids = [str(e) for e in range(rank * num_experts // ep_size, (rank + 1) * num_experts // ep_size)] \
            if ep_size > 1 else [str(e) for e in range(num_experts)]
        assert r["experts"] == expected_ids
        for name, g in r["grads"].items():
            torch.testing.assert_close(g, ref["grads"][name], rtol=1e-5, atol=1e-7, msg=f"rank {rank}: {name}")
    assert per * 2 == GLOBAL_BATCH
    if ep_size > 1:
        assert all(r["routed"] > 0 for r in results)
        for r in results:  # counts exchange is the only overhead on top of the routed patches
            assert r["routed"] <= r["dispatched"] <= 1.1 * r["routed"]


def _skewed_worker(rank, world_size):
    """Every patch of every rank routes to expert 0 (on rank 0): rank 1's experts get nothing,
    and rank 1 receives zero rows -- every collective must still complete."""
    env = DistEnv.from_environ(DistConfig(ep_size=2, timeout_s=30)).init()
    layer = _layer(4, "batch").train()
    with torch.no_grad():
        layer.router.keys.zero_()
        layer.router.keys[:, 0] = -1.0
        layer.router.keys[0, 0] = 1.0
        layer.router.proj.weight.zero_()
        layer.router.proj.bias.fill_(1.0)  # every embedding = +1s: aligned with key 0 only
    parallelize_experts_layer(layer, env)
    x = torch.randn(3, 6, 8, 8, requires_grad=True)
    y, routes = layer(x)
    assert routes.selected_NE[:, 0].all() and not routes.selected_NE[:, 1:].any()
    y.sum().backward()
    return {"finite": bool(torch.isfinite(y).all()), "x_grad": x.grad is not None,
            "expert_grads": {k: any(p.grad is not None for p in e.parameters()) for k, e in layer.experts.items()}}


def test_zero_patches_for_an_expert_and_a_rank():
    r0, r1 = spawn(_skewed_worker, 2, timeout_s=60)
    assert r0["finite"] and r1["finite"] and r0["x_grad"] and r1["x_grad"]
    assert r0["expert_grads"] == {"0": True, "1": False}
    assert r1["expert_grads"] == {"2": False, "3": False}


def _net_worker(rank, world_size):
    cfg = load_config(None, ["model.num_experts=4", "dist.ep_size=2", "model.expert_dropout=0.0"])
    env = DistEnv.from_environ(cfg.dist).init()
    torch.manual_seed(0)
    model = parallelize_experts(build_model(cfg.model), env).eval()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 1, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g)
    out = model(x[rank * 2:(rank + 1) * 2])
    loss = pce_loss(out, y[rank * 2:(rank + 1) * 2], cfg.model)
    return {"logits": out.logits_BK.detach(), "experts": sorted(model.pce_layers()[0].experts.keys()),
            "marked": all(getattr(p, "allreduce", True) is False for n, p in model.named_parameters() if ".experts." in n),
            "traffic": traffic_stats(model), "loss": loss.ce.item()}


def test_parallelized_net_matches_single_process_in_eval():
    cfg = load_config(None, ["model.num_experts=4", "model.expert_dropout=0.0"])
    torch.manual_seed(0)
    ref = build_model(cfg.model).eval()
    g = torch.Generator().manual_seed(3)
    x, _ = torch.randn(4, 1, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g)
    expected = ref(x).logits_BK.detach()
    r0, r1 = spawn(_net_worker, 2, timeout_s=90)
    torch.testing.assert_close(torch.cat([r0["logits"], r1["logits"]]), expected, rtol=1e-5, atol=1e-6)
    assert r0["experts"] == ["0", "1"] and r1["experts"] == ["2", "3"]
    assert r0["marked"] and r1["marked"]
    assert r0["traffic"]["routed_bytes"] > 0
