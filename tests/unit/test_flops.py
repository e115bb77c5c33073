import pytest
import torch

from pce_dist.config import load_config
from pce_dist.flops import measure
from pce_dist.model import build_model

SMALL = ["model.image_size=16", "model.patch_sizes=[8,4]", "model.channels=[16,16]", "model.stem_channels=8"]


def _cost(overrides):
    cfg = load_config(None, SMALL + overrides)
    torch.manual_seed(0)
    return measure(build_model(cfg.model), torch.randn(8, 1, 16, 16))


def test_dense_active_equals_total_and_pce_counts_only_selected_experts():
    dense = _cost(["model.kind=dense"])
    assert dense.active_params == dense.total_params and dense.experts_per_patch == []
    sparse = _cost(["model.num_experts=4"])
    everyone = _cost(["model.num_experts=4", "model.wth_max=0", "model.wth_entropy=0", "model.wth_gap=0"])
    assert everyone.experts_per_patch == [4.0, 4.0]  # threshold 0: every expert computes
    assert sparse.active_params < sparse.total_params
    # the counter sees the executed convolutions: 4 experts per patch cost more than ~1
    assert everyone.forward_flops_per_image > 2.5 * sparse.forward_flops_per_image / max(sparse.experts_per_patch)
    # one expert per patch = the dense block's FLOPs + the routers' 3x3 projections (C+4 -> 8) over each map
    router = sum(2 * 9 * (c_in + 4) * 8 * 16 * 16 for c_in in (8, 16))
    assert sparse.experts_per_patch == [1.0, 1.0]
    assert sparse.forward_flops_per_image - dense.forward_flops_per_image == pytest.approx(router, rel=0.05)
