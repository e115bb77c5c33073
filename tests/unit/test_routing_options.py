"""The routing options that let the router learn what PCE is for (docs/model.md, "Routing that learns").

* ``model.gate=probs``: a patch routed to a single expert still sends the task loss's gradient
  to the router and (phase 2) to the keys; the seed's renormalised gate sends none.
* ``model.router_center``: the embeddings lose their common component (running mean set at
  key init, moved by an EMA).
* ``model.bias_balance_rate``: the selection bias moves load toward uniform on a skewed batch,
  changes the selection only (weights stay the unbiased probabilities), and is a checkpointed buffer.
* ``model.router_position=false``: the router sees content only -- identical patches at
  different places route identically; with the seed's positional channels they do not.
* the specialisation metrics equal hand-computed values and scikit-learn's NMI.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pce_dist import metrics
from pce_dist.config import load_config
from pce_dist.model import Router, RouterSpec, build_model, route
from pce_dist.model.routing import ThresholdWeights

WTH = ThresholdWeights()


def _one_expert_batch():
    """Embeddings each aligned with one key: every item selects exactly one expert."""
    keys_ED = torch.eye(4, 6)
    noise_ND = 0.01 * torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    emb_ND = torch.eye(4, 6)[[0, 1, 2, 3, 0, 1]] * 3.0 + noise_ND
    return emb_ND, keys_ED


@pytest.mark.parametrize("gate,reaches", [("probs", True), ("renormalized", False)])
def test_a_patch_routed_to_one_expert_sends_task_gradient_to_the_router(gate, reaches):
    emb_ND, keys_ED = _one_expert_batch()
    emb_ND.requires_grad_(True)
    keys_ED.requires_grad_(True)
    r = route(emb_ND, keys_ED, temperature=0.1, wth=WTH, mask_sharpness=50.0, gate=gate)
    assert (r.selected_NE.sum(1) == 1).all(), "the case needs single-expert items"
    expert_out_NE = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))  # what each expert would return
    task = (r.weights_NE * expert_out_NE).sum()  # the combined output enters the task loss linearly
    task.backward()
    emb_grad, key_grad = emb_ND.grad.abs().sum(), keys_ED.grad.abs().sum()
    if reaches:
        assert emb_grad > 1e-6 and key_grad > 1e-6
        assert (r.weights_NE.sum(1) < 1).all()  # the gate is the router's confidence, not renormalised to 1
    else:
        assert emb_grad == 0 and key_grad == 0  # weight exactly 1: the seed's variant is blind here
        torch.testing.assert_close(r.weights_NE.sum(1), torch.ones(6))


def test_the_gate_reaches_the_router_parameters_in_a_network():
    cfg = load_config(None, ["model.gate=probs", "model.image_size=8", "model.patch_sizes=[4,2]",
                             "model.channels=[8,8]", "model.stem_channels=8"])
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    model.set_keys_trainable(True)
    out = model(torch.randn(4, 1, 8, 8))
    F.cross_entropy(out.logits_BK, torch.tensor([0, 1, 2, 3])).backward()  # the task loss only
    for router in model.routers():
        assert router.proj.weight.grad.abs().sum() > 0 and router.keys.grad.abs().sum() > 0


def test_selection_bias_changes_the_selection_not_the_weights():
    emb_ND, keys_ED = _one_expert_batch()
    plain = route(emb_ND, keys_ED, temperature=0.1, wth=WTH, mask_sharpness=50.0, gate="probs")
    bias_E = torch.tensor([-100.0, 0.0, 0.0, 0.0])  # expert 0 may never be selected
    biased = route(emb_ND, keys_ED, temperature=0.1, wth=WTH, mask_sharpness=50.0, gate="probs",
                   select_bias_E=bias_E)
    assert plain.selected_NE[:, 0].any() and not biased.selected_NE[:, 0].any()
    torch.testing.assert_close(biased.probs_NE, plain.probs_NE)  # the gate values come from unbiased scores
    both = plain.selected_NE & biased.selected_NE
    torch.testing.assert_close(biased.weights_NE[both], plain.weights_NE[both])


def test_bias_balancer_moves_a_skewed_load_toward_uniform():
    """Every item prefers expert 0 a little: the bias steps by the sign of the load error until
    the load spreads; the selection then follows the scores plus the bias."""
    spec = RouterSpec(dim=2, spp_levels=(1,), temperature=0.1, select_bias=True)
    router = Router(3, 4, spec)
    g = torch.Generator().manual_seed(0)
    keys_ED = F.normalize(torch.randn(4, 2, generator=g), dim=-1)
    emb_ND = keys_ED[0] + 0.6 * torch.randn(256, 2, generator=g)  # centred on key 0
    router.set_keys(keys_ED)

    def load() -> torch.Tensor:
        r = route(emb_ND, router.keys, temperature=0.1, wth=spec.wth, mask_sharpness=50.0,
                  select_bias_E=router.select_bias)
        return r.selected_NE.float().sum(0)

    before = load()
    assert before.max() / before.sum() > 0.5, f"the case is not skewed: {before}"
    for _ in range(300):
        router.update_select_bias(load(), rate=0.05)
    after = load()
    assert after.max() / after.sum() < 0.35, (before, after)  # 4 experts: uniform is 0.25
    assert after.min() > 0, f"an expert still gets nothing: {after}"
    assert router.select_bias[0] < 0 and "select_bias" in router.state_dict()  # a checkpointed buffer


def test_balancer_step_is_the_sign_of_the_load_error():
    router = Router(3, 3, RouterSpec(dim=2, spp_levels=(1,), select_bias=True))
    router.update_select_bias(torch.tensor([10.0, 5.0, 0.0]), rate=0.5)
    assert router.select_bias.tolist() == [-0.5, 0.0, 0.5]


def test_centring_subtracts_the_running_mean_from_the_embeddings():
    router = Router(3, 4, RouterSpec(dim=2, spp_levels=(1, 2), center=True)).eval()
    patches_NCnn = torch.randn(5, 3, 4, 4)
    raw_ND = router.raw_embed(patches_NCnn)
    torch.testing.assert_close(router.embed(patches_NCnn), raw_ND)  # mean 0 until key init sets it
    mean_D = raw_ND.mean(0)
    router.set_center(mean_D)
    torch.testing.assert_close(router.embed(patches_NCnn).mean(0), torch.zeros(router.embed_dim), atol=1e-6,
                               rtol=0)
    router.update_center(raw_ND.sum(0) + 5 * torch.ones(router.embed_dim), torch.tensor(5.0))
    torch.testing.assert_close(router.center_mean, 0.99 * mean_D + 0.01 * (mean_D + 1))
    router.update_center(torch.zeros(router.embed_dim), torch.tensor(0.0))  # an empty batch: unchanged
    torch.testing.assert_close(router.center_mean, 0.99 * mean_D + 0.01 * (mean_D + 1))
    assert "center_mean" in router.state_dict()


@pytest.mark.parametrize("sees_position", [True, False])
def test_a_router_without_positional_channels_routes_identical_patches_alike(sees_position):
    from pce_dist.model import PCELayer

    torch.manual_seed(0)
    layer = PCELayer(3, 4, patch_size=4, map_size=8, num_experts=4,
                     router=RouterSpec(dim=4, spp_levels=(1, 2), position=sees_position)).eval()
    assert layer.router.proj.in_channels == (3 + 4 if sees_position else 3)
    x_BCHW = torch.randn(1, 3, 4, 4).repeat(1, 1, 2, 2)  # four identical 4x4 patches
    _, routes = layer(x_BCHW)
    spread = (routes.weights_NE - routes.weights_NE[:1]).abs().max().item()
    assert (spread > 1e-3) if sees_position else (spread < 1e-6)


def test_centred_key_init_separates_what_the_raw_embeddings_blur():
    """A common offset makes every embedding point the same way (nearest-key cosine ~1); with
    centring, k-means sees the differences and the nearest-key cosine falls."""
    from pce_dist.keyinit import init_keys

    records = {}
    for center in (False, True):
        cfg = load_config(None, ["model.image_size=8", "model.patch_sizes=[4]", "model.channels=[8]",
                                 "model.downsample=[false]", "model.stem_channels=8", f"model.router_center={center}"])
        torch.manual_seed(0)
        model = build_model(cfg.model)
        with torch.no_grad():
            model.routers()[0].proj.bias.fill_(3.0)  # a large component common to every patch
        batches = [torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
        (records[center],) = init_keys(model, batches, niter=10)
        if center:
            router = model.routers()[0]
            assert router.center_mean.abs().sum() > 0
            emb = torch.cat([model.eval()(x).routes[0].embeddings_ND for x in batches])  # as key init saw them
            assert emb.mean(0).abs().max() < 1e-4  # centred by the sample's mean
    assert records[False]["mean_nearest_cos"] > 0.95
    assert records[True]["mean_nearest_cos"] < records[False]["mean_nearest_cos"] - 0.1  # 0.81 vs 1.00 here


# ----------------------------------------------------------------------------- specialisation metrics


def test_nmi_equals_scikit_learn():
    from sklearn.metrics import normalized_mutual_info_score

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (300,), generator=g)
    y = (x + torch.randint(0, 2, (300,), generator=g)) % 5  # dependent, not a function
    joint = torch.zeros(4, 5)
    joint.index_put_((x, y), torch.ones(300), accumulate=True)
    assert metrics.normalized_mutual_information(joint.tolist()) == pytest.approx(
        normalized_mutual_info_score(x.numpy(), y.numpy()), abs=1e-9)
    assert metrics.normalized_mutual_information([[5, 0], [0, 7]]) == pytest.approx(1.0)
    assert metrics.normalized_mutual_information([[2, 2], [3, 3]]) == pytest.approx(0.0, abs=1e-12)
    assert metrics.normalized_mutual_information([[4, 6]]) == 0.0  # one expert only: nothing shared


def test_specialisation_by_hand():
    # 2 experts, 2 classes, 2 positions; 8 patches: expert 0 takes class 0 wherever it is
    expert_class = [[4, 0], [1, 3]]
    expert_position = [[2, 2], [2, 2]]
    out = metrics.specialisation(expert_class, expert_position)
    assert out["max_share"] == pytest.approx(0.5)  # 4 patches each
    p = [4 / 8, 4 / 8]
    assert out["usage_entropy"] == pytest.approx(-sum(q * math.log(q) for q in p) / math.log(2))
    assert out["nmi_position"] == pytest.approx(0.0, abs=1e-12) and out["nmi_class"] > 0.3


def test_eval_accumulator_counts_the_chosen_expert_by_class_and_position():
    acc = metrics.EvalAccumulator.zeros(num_layers=1, num_experts=2, num_classes=2, device="cpu", num_patches=[2])
    # 2 images x 2 patches; the second image is padding
    chosen_N = torch.tensor([0, 1, 1, 1])
    acc.add_layer(0, entropy_N=torch.zeros(4), threshold_N=torch.zeros(4),
                  selected_NE=F.one_hot(chosen_N, 2).bool(), valid_N=torch.tensor([1.0, 1.0, 0.0, 0.0]),
                  chosen_N=chosen_N, labels_B=torch.tensor([1, 0]))
    acc.add_batch(loss_B=torch.zeros(2), pred_B=torch.tensor([1, 0]), labels_B=torch.tensor([1, 0]),
                  valid_B=torch.tensor([1.0, 0.0]))
    expert_class, expert_position = acc.specialisation_tables(0)
    assert expert_class.tolist() == [[0, 1], [0, 1]] and expert_position.tolist() == [[1, 0], [0, 1]]
    assert acc.cm_KK.tolist() == [[0, 0], [0, 1]]  # the confusion counts did not move
    out = metrics.eval_metrics(acc, prefix="val", collapse_usage=0.01)
    assert out["router/val/layer0/max_share"] == 0.5 and out["router/val/layer0/nmi_position"] == pytest.approx(1.0)
    assert out["router/val/layer0/nmi_class"] == 0.0  # one class among the valid patches
