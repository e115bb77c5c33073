"""The scaling model's inputs, checked: all-to-all bytes on real gloo ranks, FLOPs and parameters
against torch's own counts, and the step-time arithmetic on hand-computed cases.

Bytes: ``benchmarks/rehearsal.py`` runs the tiny 2-layer, 8-expert model on 4 ranks
(``ep_size`` 2 and 4: two EP groups of 2, then one of 4), a few training steps each; the
dispatcher measures what it hands to ``all_to_all_single`` for other ranks, and the expectation
is computed from each rank's routing selection (``selected_NE``) and the row sizes the *config*
implies (``scaling_model.layer_geometry``) -- never from the dispatcher's counters. World 4, not
the benchmark's 8, to keep this at CI size; ``python benchmarks/rehearsal.py`` runs 8.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch

# At import (collection) time, before any test starts the fork server: the ranks unpickle
# ``rehearsal._worker`` from this path. Appended, so that benchmarks/data.py, memory.py & co.
# shadow no module of the same name.
sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))

import rehearsal  # noqa: E402
import scaling_model as sm  # noqa: E402

from pce_dist.config import load_config  # noqa: E402


@pytest.fixture(scope="module")
def rehearsal_4_ranks():
    return rehearsal.rehearse(world=4, ep_sizes=[2, 4], num_experts=8, steps=2, batch=4, timeout_s=120)


@pytest.mark.parametrize("ep_size", [2, 4])
def test_measured_all_to_all_bytes_equal_the_prediction(rehearsal_4_ranks, ep_size):
    (s,) = [s for s in rehearsal_4_ranks if s["ep_size"] == ep_size]
    per = 8 // ep_size
    assert s["experts_hosted"] == [list(range(r % ep_size * per, (r % ep_size + 1) * per)) for r in range(4)]
    # the check is not empty: pairs leave every rank, and some patches took two experts
    assert s["predicted"]["routed_bytes"] > 0 and s["experts_per_patch"] > 1.0
    assert s["exact"], s["mismatches"]
    assert s["measured"] == s["predicted"]
    assert s["ratio"] == 1.0
    # the only bytes beyond the routed patches (both ways, forward and backward) are the counts
    assert 1.0 < s["ratio_to_payload_only"] < 1.01


def test_prediction_counts_only_remote_pairs():
    """``rehearsal.predict`` on a hand-made routing: 2 ranks, ep 2, 4 experts (rank 0 hosts 0-1)."""
    cfg = load_config(None, rehearsal.model_overrides(4, 2)).model
    layers = sm.layer_geometry(cfg)[:1]  # layer 0: 10 channels out, 8 back, 4x4 patches
    sel0 = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0]], dtype=torch.bool)  # 2 pairs to rank 1
    sel1 = torch.tensor([[0, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)  # 1 pair to rank 0
    r0, r1 = rehearsal.predict([[sel0], [sel1]], layers, num_experts=4, ep_size=2)
    in_row, out_row = 10 * 16 * 4, 8 * 16 * 4
    counts = 4 * 8 // 2  # 2 of the 4 int64 counts leave the rank
    assert r0 == {"routed_bytes": 2 * in_row, "dispatch_bytes": 2 * in_row + counts, "return_bytes": 1 * out_row,
                  "backward_bytes": 1 * in_row + 2 * out_row}
    assert r1 == {"routed_bytes": 1 * in_row, "dispatch_bytes": 1 * in_row + counts, "return_bytes": 2 * out_row,
                  "backward_bytes": 2 * in_row + 1 * out_row}


def test_geometry_flops_and_params_match_the_model():
    """Row sizes against the patches the model extracts; FLOPs against ``torch.utils.flop_counter``
    (``pce_dist.flops``) with the routing the model took; parameters against the model's."""
    from pce_dist.flops import measure
    from pce_dist.model import build_model
    from pce_dist.model.net import is_expert_name

    cfg = load_config(None, rehearsal.model_overrides(8, 1))
    model = rehearsal._routed_model(cfg, seed=0)
    shapes = []
    for layer in model.pce_layers():
        layer.extractor.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape[1:])))
    cost = measure(model, torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(3)))
    assert min(cost.experts_per_patch) > 1.0  # a routing with second experts, or k would not be tested
    layers = sm.layer_geometry(cfg.model)
    assert [(g.patches_per_image, g.in_channels, g.patch_side, g.patch_side) for g in layers] == shapes
    flops = sm.forward_flops_per_image(cfg.model, cost.experts_per_patch)
    assert flops["pce"] == pytest.approx(cost.forward_flops_per_image, rel=1e-9)
    fashion = Path(__file__).resolve().parents[2] / "configs" / "fashion_mnist.yaml"
    for kind in ("pce", "dense"):
        fm = load_config(fashion, [f"model.kind={kind}"]).model
        torch.manual_seed(0)
        net = build_model(fm)
        params = sm.parameter_counts(fm)
        total = sum(p.numel() for p in net.parameters())
        experts = sum(p.numel() for n, p in net.named_parameters() if is_expert_name(n))
        if kind == "pce":
            assert (params["shared"], params["experts"]) == (total - experts, experts)
        else:
            assert params["dense"] == total
            dense_flops = measure(net, torch.randn(4, 1, 28, 28)).forward_flops_per_image
            assert sm.forward_flops_per_image(fm)["dense"] == pytest.approx(dense_flops, rel=1e-9)


def test_fashion_mnist_rows_and_rank_bytes_by_hand():
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "fashion_mnist.yaml").model
    l0, l1 = sm.layer_geometry(cfg)
    # 32x32 (28 + 2*2) -> pool 16x16: four 8x8 patches of 32 + 4 channels, back with 48;
    # -> pool 8x8: four 4x4 patches of 48 + 4, back with 96
    assert (l0.in_channels, l0.out_channels, l0.patch_side, l0.patches_per_image) == (36, 48, 8, 4)
    assert (l1.in_channels, l1.out_channels, l1.patch_side, l1.patches_per_image) == (52, 96, 4, 4)
    assert (l0.dispatch_row_bytes(2), l0.return_row_bytes(2)) == (36 * 64 * 2, 48 * 64 * 2) == (4608, 6144)
    assert (l1.dispatch_row_bytes(2), l1.return_row_bytes(2)) == (1664, 3072)
    # 3 pairs out, 5 in, fp32, E = 8, ep = 4: 6 of the 8 counts leave the rank
    assert sm.rank_a2a_bytes(3, 5, l0, 4, num_experts=8, ep_size=4) == {
        "routed_bytes": 27648, "dispatch_bytes": 27648 + 48, "return_bytes": 61440, "backward_bytes": 46080 + 36864}
    assert sm.rank_a2a_bytes(3, 5, l0, 4, num_experts=8, ep_size=1) == dict.fromkeys(
        ("routed_bytes", "dispatch_bytes", "return_bytes", "backward_bytes"), 0)
    # 128 images x 4 patches x 1.04 pairs = 532.48 rows; ep 4 (E = 4): 3/4 of them leave
    work = sm.Workload(batch_per_gpu=128, experts_per_patch=1.04, dtype_bytes=2)
    load0 = sm.pce_layer_loads([l0], work, num_experts=4, ep_size=4)[0]
    assert load0["rows"] == pytest.approx(532.48)
    assert load0["dispatch_bytes"] == pytest.approx(532.48 * 0.75 * 4608)
    assert load0["return_bytes"] == pytest.approx(532.48 * 0.75 * 6144)
    assert load0["side_bytes"] == 24  # the counts: 3 of 4 int64 leave


def test_link_arithmetic_by_hand():
    c = sm.Cluster(gpus_per_node=8, nvlink_bytes_per_s=100e9, ib_bytes_per_s=10e9, link_efficiency=1.0,
                   collective_launch_s=1e-6, nvlink_hop_s=1e-6, ib_hop_s=2e-6, a2a_peer_s=0.0)
    assert sm.group_layout(8, 1, 8) == (8, 1)  # an EP group of 8: one node
    assert sm.group_layout(8, 8, 8) == (1, 8)  # its EDP group at 64 GPUs: one rank per node
    assert sm.group_layout(8, 2, 8) == (4, 2)  # EDP of world 16, ep 2: ranks 0,2,..,14
    # 800 MB from the busiest rank: in one node all over NVLink (launch + one NVLink hop) ...
    assert sm.all_to_all_s(8e8, 8, c) == pytest.approx(8e8 / 100e9 + 2e-6)
    # ... across 2 nodes (ep 16): 7 of 15 peers on NVLink, 8 over IB, at the same time (+ an IB hop)
    assert sm.all_to_all_s(8e8, 16, c) == pytest.approx(max(8e8 * 7 / 15 / 100e9, 8e8 * 8 / 15 / 10e9) + 4e-6)
    # hierarchical all-reduce over 16 ranks (2 nodes of 8): 2*7/8 of S on NVLink, 2*1/2 of S/8 on IB;
    # latency: launch + log2(8) NVLink hops + log2(2) IB hops
    assert sm.allreduce_s(8e8, 16, 1, c) == pytest.approx(14e-3 + 10e-3 + 1e-6 + 3e-6 + 2e-6)
    assert sm.allreduce_s(8e8, 1, 1, c) == 0.0


def test_step_model_limits():
    """Free links: the step is compute alone, and efficiency = balanced / imbalanced compute."""
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "fashion_mnist.yaml").model
    free = sm.Cluster(nvlink_bytes_per_s=math.inf, ib_bytes_per_s=math.inf, collective_launch_s=0.0,
                      nvlink_hop_s=0.0, ib_hop_s=0.0, a2a_peer_s=0.0, host_sync_s=0.0)
    work = sm.Workload(imbalance=1.5, experts_per_patch=1.0, mfu=1.0, peak_flops=1e12)
    st = sm.pce_step(cfg, work, free, world=64, ep_size=4)
    flops = sm.forward_flops_per_image(cfg, 1.0)
    assert (st.a2a_s, st.grad_s, st.sync_s) == (0.0, 0.0, 0.0)
    assert st.ideal_s == pytest.approx(3 * 128 * flops["pce"] / 1e12)
    assert st.total_s == pytest.approx(3 * 128 * (flops["shared"] + 1.5 * flops["experts"]) / 1e12)
    dense = sm.dense_step(cfg, work, free, world=64)
    assert dense.efficiency == 1.0 and dense.total_s == pytest.approx(3 * 128 * flops["dense"] / 1e12)
    # real links only add time, and more so across nodes
    near = sm.pce_step(cfg, work, sm.Cluster(), world=64, ep_size=4)
    assert near.total_s > st.total_s and near.a2a_s > 0
    across = sm.pce_step(dataclasses.replace(cfg, num_experts=64), work, sm.Cluster(), world=64, ep_size=64)
    assert across.a2a_s > near.a2a_s
    rows = sm.scaling_table(cfg)
    assert [r["world"] for r in rows] == [8] * 4 + [64] * 5 + [512] * 5  # no "across nodes" in one node
    assert all(0 < r["efficiency"] <= 1 for r in rows)
