"""Expert parallelism at the model level: ``parallelize_experts`` + the all-to-all dispatcher
against one process, and the all-to-all traffic against the routing weights.

Each rank takes its slice of the same global batch; the reference is one process holding
every expert and the whole batch. The model is a one-PCE-layer ``PCENet`` with GroupNorm in
the stem (BatchNorm in the experts is exact too: an expert sees the same rows, in the same
order, on its host rank as in one process), placed by the real wiring. Gradients of the
global mean loss: shared parameters are averaged over ranks; an expert's gradient is the
sum over the ranks holding it, divided by the world size (the all-to-all backward already
summed the contributions of every rank in its EP group) -- DeepSpeed's MoE reduction, done
by hand here.

Traffic: the dispatcher measures the bytes it hands to ``all_to_all_single`` for other
ranks; the tests compute what that must be from the routing weights alone -- (patch,
expert) pairs whose expert lives on another rank, times the bytes of one patch read off the
patch extractor -- plus the exchange of E int64 counts.

Tolerance: 1e-5 relative. The two runs do the same arithmetic except that reductions over
the batch (the mean loss, BatchNorm statistics over an expert's rows, weight gradients)
are summed in a different order across processes, which moves float32 results by a few ulp.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from multiproc import spawn

from pce_dist.config import load_config
from pce_dist.distributed import DistEnv
from pce_dist.distributed.expert_parallel import parallelize_experts, take_dispatch_stats, traffic_stats
from pce_dist.model import build_model, pce_loss

GLOBAL_BATCH = 8
COUNT_BYTES = 8  # one int64 count per global expert in the counts exchange


def _config(num_experts: int, norm: str, ep_size: int = 1, routing: tuple[str, ...] = ()):
    return load_config(None, [
        f"model.num_experts={num_experts}", f"model.expert_norm={norm}", "model.stem_norm=group",
        "model.expert_dropout=0.0", "model.image_size=8", "model.stem_channels=6", "model.channels=[8]",
        "model.patch_sizes=[4]", "model.downsample=[false]", "model.num_classes=4", "model.temperature=0.3",
        f"dist.ep_size={ep_size}", "dist.timeout_s=30", *routing])


def _model(cfg):
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    with torch.no_grad():  # routing state as training would have moved it: not the trivial zeros
        for router in model.routers():
            if router.select_bias is not None:
                router.select_bias.copy_(torch.linspace(-0.5, 0.5, router.num_experts))
            if router.center_mean is not None:
                g = torch.Generator().manual_seed(2)
                router.center_mean.copy_(0.1 * torch.randn(router.embed_dim, generator=g))
    return model


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=g), torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)


def _loss(out, y):
    return F.cross_entropy(out.logits_BK, y) + sum(r.weights_NE.square().mean() for r in out.routes)


def _record_patch_shapes(model) -> list[tuple[int, ...]]:
    """Fills with ``[C, n, n]`` of the patches each PCE layer extracts, in forward order."""
    shapes: list[tuple[int, ...]] = []
    for layer in model.pce_layers():
        layer.extractor.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape[2:])))
    return shapes


def _reference(num_experts, norm, routing=()):
    cfg = _config(num_experts, norm, routing=routing)
    model = _model(cfg)
    x, y = _data()
    x.requires_grad_(True)
    loss = _loss(model(x), y)
    loss.backward()
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
    return {"logits": model(x).logits_BK.detach(), "loss": loss.item(), "grads": grads, "x_grad": x.grad}


def _ep_worker(rank, world_size, num_experts, norm, ep_size, routing=()):
    cfg = _config(num_experts, norm, ep_size, routing)
    env = DistEnv.from_environ(cfg.dist).init()
    model = parallelize_experts(_model(cfg), env)
    shapes = _record_patch_shapes(model)
    x_all, y_all = _data()
    per = GLOBAL_BATCH // world_size
    x = x_all[rank * per:(rank + 1) * per].clone().requires_grad_(True)
    out = model(x)
    loss = _loss(out, y_all[rank * per:(rank + 1) * per])
    loss.backward()
    traffic = traffic_stats(model)  # this forward and backward
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g, group=env.edp_group if ".experts." in name else env.dp_group)
        grads[name] = g / world_size
    loss_t = torch.tensor([loss.item()])
    dist.all_reduce(loss_t)
    # d(local mean)/dx = world_size * d(global mean)/dx
    return {"logits": model(x).logits_BK.detach(), "loss": loss_t.item() / world_size, "grads": grads,
            "x_grad": x.grad / world_size, "experts": sorted(model.pce_layers()[0].experts.keys()),
            "selected": [r.selected_NE for r in out.routes], "patch_shapes": shapes[:len(out.routes)],
            "marked": {n: (getattr(p, "allreduce", True), getattr(p, "group_name", None))
                       for n, p in model.named_parameters() if ".experts." in n},
            "traffic": traffic}


def _expected_traffic(results, num_experts, ep_size, out_channels, backward: bool) -> list[dict[str, int]]:
    """Per rank, from the routing weights only: what the all-to-alls must carry to other ranks."""
    hosted = [list(range(r * num_experts // ep_size, (r + 1) * num_experts // ep_size)) for r in range(ep_size)]
    expected = []
    for r, res in enumerate(results):
        exp = {"routed_bytes": 0, "dispatch_bytes": 0, "return_bytes": 0, "backward_bytes": 0}
        for layer, (selected_NE, (c, n, _)) in enumerate(zip(res["selected"], res["patch_shapes"])):
            in_row, out_row = 4 * c * n * n, 4 * out_channels[layer] * n * n  # float32 rows
            remote = [e for e in range(num_experts) if e not in hosted[r]]
            sent = int(selected_NE[:, remote].sum())  # pairs leaving this rank
            received = sum(int(other["selected"][layer][:, hosted[r]].sum())
                           for s, other in enumerate(results) if s != r)
            exp["routed_bytes"] += sent * in_row
            exp["dispatch_bytes"] += sent * in_row + num_experts * COUNT_BYTES * (ep_size - 1) // ep_size
            exp["return_bytes"] += received * out_row
            if backward:  # gradients of the received patches go home, of the results to the hosts
                exp["backward_bytes"] += received * in_row + sent * out_row
        expected.append(exp)
    return expected


_ROUTING = {"seed": (), "gate=probs": ("model.gate=probs",), "centred": ("model.router_center=true",),
            "bias": ("model.bias_balance_rate=0.05",),
            "all": ("model.gate=probs", "model.router_center=true", "model.bias_balance_rate=0.05"),
            "content": ("model.router_position=false", "model.router_center=true"),
            # 4x the balanced load: the slots hold every pair, so capacity must equal one process
            "capacity": ("model.dispatch=capacity", "model.capacity_factor=4.0")}


def _expected_capacity_traffic(results, num_experts, ep_size, out_channels, capacity_factor):
    """Capacity dispatch: whole buffers travel (equal splits), one validity byte per slot;
    ``routed_bytes`` still counts the pairs only, from the routing weights."""
    hosted = [list(range(r * num_experts // ep_size, (r + 1) * num_experts // ep_size)) for r in range(ep_size)]
    expected = []
    for r, res in enumerate(results):
        exp = {"routed_bytes": 0, "dispatch_bytes": 0, "return_bytes": 0, "backward_bytes": 0}
        for layer, (selected_NE, (c, n, _)) in enumerate(zip(res["selected"], res["patch_shapes"])):
            N = selected_NE.shape[0]
            slots = min(N, -(-int(capacity_factor * N) // num_experts))
            remote_slots = num_experts * slots * (ep_size - 1) // ep_size
            in_row, out_row = 4 * c * n * n, 4 * out_channels[layer] * n * n
            remote = [e for e in range(num_experts) if e not in hosted[r]]
            exp["routed_bytes"] += int(selected_NE[:, remote].sum()) * in_row
            exp["dispatch_bytes"] += remote_slots * (in_row + 1)
            exp["return_bytes"] += remote_slots * out_row
            exp["backward_bytes"] += remote_slots * (in_row + out_row)
        expected.append(exp)
    return expected


@pytest.mark.parametrize("num_experts,norm,ep_size,routing", [
    (4, "group", 2, "seed"), (4, "batch", 2, "seed"), (2, "batch", 2, "seed"), (4, "group", 1, "seed"),
    (4, "group", 2, "gate=probs"), (4, "group", 2, "centred"), (4, "group", 2, "bias"), (4, "group", 2, "all"),
    (4, "group", 2, "content"), (4, "batch", 2, "capacity")])
def test_ep_model_matches_single_process(num_experts, norm, ep_size, routing):
    ref = _reference(num_experts, norm, _ROUTING[routing])
    results = spawn(_ep_worker, 2, args=(num_experts, norm, ep_size, _ROUTING[routing]), timeout_s=120)
    torch.testing.assert_close(torch.cat([r["logits"] for r in results]), ref["logits"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in results]), ref["x_grad"], rtol=1e-5, atol=1e-7)
    assert results[0]["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    for rank, r in enumerate(results):
        per_rank = num_experts // ep_size
        assert r["experts"] == [str(e) for e in range(rank % ep_size * per_rank, (rank % ep_size + 1) * per_rank)]
        assert r["marked"] and set(r["marked"].values()) == {(False, f"ep_size_{ep_size}")}
        assert set(r["grads"]) == set(ref["grads"]) - {n for n in ref["grads"] if ".experts." in n
                                                       and n.split(".experts.")[1].split(".")[0] not in r["experts"]}
        for name, g in r["grads"].items():
            torch.testing.assert_close(g, ref["grads"][name], rtol=1e-5, atol=1e-7, msg=f"rank {rank}: {name}")
    if ep_size == 1:  # every expert at home: no all-to-all at all
        assert all(v == 0 for r in results for v in r["traffic"].values())
        return
    if routing == "capacity":
        expected = _expected_capacity_traffic(results, num_experts, ep_size, [8], capacity_factor=4.0)
        assert [r["traffic"] for r in results] == expected and expected[0]["routed_bytes"] > 0
        return
    expected = _expected_traffic(results, num_experts, ep_size, [8], backward=True)
    for rank, (r, exp) in enumerate(zip(results, expected)):
        assert exp["routed_bytes"] > 0, "the routing sent nothing to the other rank: the check would be empty"
        assert r["traffic"] == exp, f"rank {rank}"
        sent, routed = r["traffic"]["dispatch_bytes"], exp["routed_bytes"]
        assert routed < sent <= 1.1 * routed  # the figure of docs/benchmarks.md, measured


def _skewed_worker(rank, world_size, routing=()):
    """Every patch of every rank routes to expert 0 (on rank 0): rank 1's experts get nothing,
    and rank 1 receives zero rows -- every collective must still complete."""
    cfg = _config(4, "batch", ep_size=2, routing=routing)
    env = DistEnv.from_environ(cfg.dist).init()
    model = _model(cfg)
    router = model.routers()[0]
    with torch.no_grad():
        router.keys.zero_()
        router.keys[:, 0] = -1.0
        router.keys[0, 0] = 1.0
        router.proj.weight.zero_()
        router.proj.bias.fill_(1.0)  # every embedding = +1s: aligned with key 0 only
    model = parallelize_experts(model, env)
    shapes = _record_patch_shapes(model)
    x = torch.randn(3, 1, 8, 8, requires_grad=True)
    out = model(x)
    (selected_NE,) = [r.selected_NE for r in out.routes]
    assert selected_NE[:, 0].all() and not selected_NE[:, 1:].any()
    out.logits_BK.sum().backward()
    layer = model.pce_layers()[0]
    if routing:  # capacity: what the dispatcher counted
        traffic, work_L3 = take_dispatch_stats(model, torch.device("cpu"))
        return {"finite": bool(torch.isfinite(out.logits_BK).all()), "work": work_L3[0].tolist(),
                "patches": selected_NE.shape[0], "x_grad": x.grad is not None}
    return {"finite": bool(torch.isfinite(out.logits_BK).all()), "x_grad": x.grad is not None,
            "expert_grads": {k: any(p.grad is not None for p in e.parameters()) for k, e in layer.experts.items()},
            "selected": [selected_NE], "patch_shapes": shapes, "traffic": traffic_stats(model)}


def test_zero_patches_for_an_expert_and_a_rank():
    r0, r1 = spawn(_skewed_worker, 2, timeout_s=90)
    assert r0["finite"] and r1["finite"] and r0["x_grad"] and r1["x_grad"]
    assert r0["expert_grads"] == {"0": True, "1": False}
    assert r1["expert_grads"] == {"2": False, "3": False}
    expected = _expected_traffic([r0, r1], 4, 2, [8], backward=True)
    assert r0["traffic"] == expected[0] and r0["traffic"]["routed_bytes"] == 0  # nothing leaves rank 0
    assert r1["traffic"] == expected[1] and r1["traffic"]["return_bytes"] == 0  # nothing comes to rank 1


def test_capacity_drops_what_does_not_fit_and_bounds_each_rank():
    """All patches want expert 0; with capacity_factor 1 it takes ceil(N/4) of each rank's N
    patches, the rest are dropped and counted, and rank 0 computes exactly its two buffers' rows."""
    r0, r1 = spawn(_skewed_worker, 2, args=(("model.dispatch=capacity", "model.capacity_factor=1.0"),), timeout_s=90)
    n = r0["patches"]
    slots = -(-n // 4)
    assert r0["finite"] and r1["finite"] and r0["x_grad"] and r1["x_grad"]
    assert r0["work"] == [2 * slots, n, n - slots]  # [expert rows, pairs, dropped]: both ranks' buffers for expert 0
    assert r1["work"] == [0, n, n - slots]  # rank 1's experts get nothing; its own pairs were dropped alike


def _net_worker(rank, world_size):
    cfg = load_config(None, ["model.num_experts=4", "dist.ep_size=2", "model.expert_dropout=0.0"])
    env = DistEnv.from_environ(cfg.dist).init()
    torch.manual_seed(0)
    model = parallelize_experts(build_model(cfg.model), env).eval()
    shapes = _record_patch_shapes(model)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 1, 28, 28, generator=g), torch.randint(0, 10, (4,), generator=g)
    out = model(x[rank * 2:(rank + 1) * 2])
    loss = pce_loss(out, y[rank * 2:(rank + 1) * 2], cfg.model)
    return {"logits": out.logits_BK.detach(), "experts": sorted(model.pce_layers()[0].experts.keys()),
            "marked": all(getattr(p, "allreduce", True) is False for n, p in model.named_parameters() if ".experts." in n),
            "selected": [r.selected_NE for r in out.routes], "patch_shapes": shapes,
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
    # two PCE layers, forward only: no backward traffic
    traffic = _expected_traffic([r0, r1], 4, 2, cfg.model.channels, backward=False)
    assert [r0["traffic"], r1["traffic"]] == traffic and traffic[0]["routed_bytes"] > 0
