"""The sparse path must equal the dense reference path (outputs and gradients)."""

import copy

import pytest
import torch

from pce_dist.model import DenseReferenceDispatcher, ExpertSpec, PCELayer, RouterSpec, plan_routes


def _layer(norm="group", E=4, seed=0):
    torch.manual_seed(seed)
    return PCELayer(6, 8, patch_size=4, map_size=8, num_experts=E, expert=ExpertSpec(norm=norm),
                    router=RouterSpec(temperature=0.2))


def _run(layer, x):
    x = x.clone().requires_grad_(True)
    y, routes = layer(x)
    loss = (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum() + routes.weights_NE.pow(2).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), x.grad.clone(), grads, routes


@pytest.mark.parametrize("norm,train", [("group", True), ("group", False), ("batch", False)])
@pytest.mark.parametrize("E", [1, 4, 7])
def test_sparse_equals_dense_reference(norm, train, E):
    sparse = _layer(norm, E)
    dense = copy.deepcopy(sparse)
    dense.dispatcher = DenseReferenceDispatcher()
    sparse.train(train), dense.train(train)
    x = torch.randn(5, 6, 8, 8)
    y_s, gx_s, g_s, routes = _run(sparse, x)
    y_d, gx_d, g_d, _ = _run(dense, x)
    assert routes.selected_NE.sum() < routes.selected_NE.numel() or E == 1  # really sparse
    torch.testing.assert_close(y_s, y_d, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_s, gx_d, rtol=1e-5, atol=1e-5)
    assert g_s.keys() <= g_d.keys()
    for name in g_d:
        if name in g_s:
            torch.testing.assert_close(g_s[name], g_d[name], rtol=1e-4, atol=1e-5, msg=name)
        else:  # an expert nobody routed to: its dense-path gradient is exactly zero
            assert torch.count_nonzero(g_d[name]) == 0, name


def test_expert_without_patches_is_harmless():
    layer = _layer("batch", E=4)
    layer.train()
    with torch.no_grad():  # route everything to expert 0: keys 1..3 opposite to key 0
        layer.router.keys[1:] = -layer.router.keys[0]
    # make every embedding align with key 0 by giving the projection a constant bias
    x = torch.randn(3, 6, 8, 8)
    emb = layer.router.embed(layer.extractor(x).reshape(-1, 10, 4, 4))
    mean_dir = torch.nn.functional.normalize(emb.mean(0), dim=0)
    with torch.no_grad():
        layer.router.keys[0] = mean_dir
        layer.router.keys[1:] = -mean_dir
    before = copy.deepcopy(layer.experts["2"].state_dict())
    y, routes = layer(x)
    assert routes.selected_NE[:, 0].all() and not routes.selected_NE[:, 1:].any()
    y.sum().backward()
    assert torch.isfinite(y).all()
    for name, p in layer.experts["2"].named_parameters():
        assert p.grad is None, name
    for k, v in layer.experts["2"].state_dict().items():  # BN running stats untouched
        assert torch.equal(v, before[k]), k


def test_plan_routes_is_expert_major():
    w = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    plan = plan_routes(w)
    assert plan.counts == [2, 2, 1]
    assert plan.expert_M.tolist() == [0, 0, 1, 1, 2]
    assert plan.item_M.tolist() == [1, 3, 0, 1, 2]
    assert plan.weight_M.tolist() == [0.5, 1.0, 1.0, 0.5, 1.0]


def test_local_dispatcher_needs_all_experts():
    layer = _layer()
    layer.keep_experts([0, 1])
    with pytest.raises(ValueError, match="needs all 4 experts"):
        layer(torch.randn(1, 6, 8, 8))


def test_keep_experts_names_by_global_id():
    layer = _layer(E=4)
    layer.keep_experts([2, 3])
    assert sorted(layer.experts.keys()) == ["2", "3"]
    assert any(n.startswith("experts.3.") for n, _ in layer.named_parameters())
