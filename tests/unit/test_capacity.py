"""Capacity dispatch (``model.dispatch=capacity``): the dropless result when nothing is dropped,
top-1-first slot filling and counted drops when something is, BatchNorm statistics over the
filled slots only, no host sync anywhere in forward and backward, and a layer that compiles
with ``fullgraph=True``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pce_dist.config import load_config
from pce_dist.host_syncs import HostSyncCounter
from pce_dist.model import build_model, pce_loss
from pce_dist.model.dispatch import CapacityDispatcher, LocalDispatcher, capacity, plan_slots
from pce_dist.model.experts import masked_norm

SMALL = ["model.image_size=16", "model.stem_channels=6", "model.channels=[8,12]", "model.patch_sizes=[8,4]",
         "model.downsample=[false,true]", "model.expert_dropout=0.0", "model.temperature=0.5",
         "model.wth_max=0.0", "model.wth_gap=0.0"]  # threshold ~0.2 of near-uniform probabilities: 1-4 experts a patch


def _pair(overrides=(), factor=4.0):
    """The same initialised net twice: dropless (unpadded, for exact comparison) and capacity."""
    cfg = load_config(None, SMALL + list(overrides))
    torch.manual_seed(0)
    dropless = build_model(cfg.model).train()
    for layer in dropless.pce_layers():
        for expert in layer.experts.values():
            expert.bucket_rows = False
    capacity_net = copy.deepcopy(dropless)
    for layer in capacity_net.pce_layers():
        layer.dispatcher = CapacityDispatcher(factor)
    return cfg, dropless, capacity_net


def _batch(n=12):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_capacity_equals_dropless_when_nothing_is_dropped(norm):
    cfg, dropless, capacity_net = _pair([f"model.expert_norm={norm}"])
    x, y = _batch()
    outs = []
    for net in (dropless, capacity_net):
        out = net(x)
        pce_loss(out, y, cfg.model).total.backward()
        outs.append(out)
    selected = [r.selected_NE for r in outs[0].routes]
    assert any((s.sum(1) > 1).any() for s in selected), "no patch chose two experts: secondary slots untested"
    torch.testing.assert_close(outs[1].logits_BK, outs[0].logits_BK, rtol=1e-5, atol=1e-6)
    for (name, p0), p1 in zip(dropless.named_parameters(), capacity_net.parameters()):
        if p0.grad is None:
            assert p1.grad is None or not p1.grad.any(), name
            continue
        torch.testing.assert_close(p1.grad, p0.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, b0), b1 in zip(dropless.named_buffers(), capacity_net.buffers()):  # running stats, batch counts
        torch.testing.assert_close(b1, b0, rtol=1e-5, atol=1e-6, msg=name)
    for layer in capacity_net.pce_layers():
        assert int(layer.dispatcher.stats.dropped) == 0
        assert int(layer.dispatcher.stats.pairs) == int(layer.dispatcher.stats.expert_rows) > 0
    # the same in eval (running statistics, rows independent)
    dropless.eval(), capacity_net.eval()
    torch.testing.assert_close(capacity_net(x).logits_BK, dropless(x).logits_BK, rtol=1e-5, atol=1e-6)


def test_slots_take_every_first_choice_before_any_second_and_count_the_rest():
    # 5 items, 2 experts; items 0-2 prefer expert 0, items 3-4 expert 1; items 0 and 3 select both
    weights_NE = torch.tensor([[0.6, 0.4], [1.0, 0.0], [1.0, 0.0], [0.3, 0.7], [0.0, 1.0]])
    plan = plan_slots(weights_NE, slots=3)
    expert0, expert1 = plan.item_S[:3].tolist(), plan.item_S[3:].tolist()
    assert expert0 == [0, 1, 2]  # item 3's second choice found expert 0 full
    assert expert1 == [3, 4, 0] and plan.valid_S.tolist() == [True] * 5 + [True]  # item 0's second choice fits
    assert int(plan.pairs) == 7 and int(plan.dropped) == 1
    torch.testing.assert_close(plan.weight_S, torch.tensor([0.6, 1.0, 1.0, 0.7, 1.0, 0.4]))
    tight = plan_slots(weights_NE, slots=2)
    assert tight.item_S.tolist()[:2] == [0, 1] and tight.item_S.tolist()[2:] == [3, 4]  # first choices win
    assert int(tight.dropped) == 3  # item 2 (first choice) and both second choices
    assert capacity(num_items=10, num_experts=4, capacity_factor=1.0) == 3
    assert capacity(num_items=10, num_experts=4, capacity_factor=100.0) == 10  # never more than N


def test_a_dropped_pair_adds_nothing_to_its_patch():
    weights_NE = torch.tensor([[0.6, 0.4], [1.0, 0.0], [0.0, 1.0]])
    experts = nn.ModuleDict({"0": nn.Identity(), "1": nn.Identity()})
    x_NCnn = torch.arange(3.0).reshape(3, 1, 1, 1) + 1
    for m in experts.values():  # identity experts that take the slot mask
        m.forward = lambda x, valid=None: x
    dispatcher = CapacityDispatcher(capacity_factor=2 / 3)  # ceil(2/3 * 3 / 2) = 1 slot per expert
    out = dispatcher(x_NCnn, weights_NE, experts)
    # expert 0 keeps item 0 (weight 0.6), expert 1 keeps item 2; item 1 and item 0's second pair dropped
    torch.testing.assert_close(out.flatten(), torch.tensor([0.6 * 1, 0.0, 1.0 * 3]))
    assert int(dispatcher.stats.dropped) == 2 and int(dispatcher.stats.pairs) == 4


def test_masked_batch_norm_is_batch_norm_over_the_filled_slots():
    torch.manual_seed(0)
    norm, ref = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
    with torch.no_grad():
        norm.weight.uniform_(), norm.bias.uniform_()
    ref.load_state_dict(norm.state_dict())
    x = torch.randn(6, 3, 2, 2)
    valid = torch.tensor([True, False, True, True, False, True])
    torch.testing.assert_close(masked_norm(norm, x, valid)[valid], ref(x[valid]), rtol=1e-5, atol=1e-6)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(norm.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    before = copy.deepcopy(norm.state_dict())
    masked_norm(norm, x, torch.zeros(6, dtype=torch.bool))  # an empty buffer moves nothing
    for key, value in before.items():
        torch.testing.assert_close(norm.state_dict()[key], value, msg=key)


@pytest.mark.parametrize("mode,expected", [("dropless", "one per layer"), ("capacity", 0)])
def test_host_syncs_per_training_step(mode, expected):
    cfg = load_config(None, SMALL + [f"model.dispatch={mode}"])
    torch.manual_seed(0)
    net = build_model(cfg.model).train()
    x, y = _batch()
    with HostSyncCounter() as syncs:
        pce_loss(net(x), y, cfg.model).total.backward()
    want = len(net.pce_layers()) if expected == "one per layer" else expected
    assert syncs.total == want, dict(syncs.by_kind)


def test_the_sync_counter_sees_each_kind():
    t = torch.tensor([0.0, 2.0, 3.0])
    with HostSyncCounter() as syncs:
        t.tolist(), t[1].item(), bool(t[0]), t.nonzero(), t[t > 1], torch.repeat_interleave(torch.tensor([1, 2]))
        torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)  # told the size: no sync
    assert dict(syncs.by_kind) == {"tolist": 1, "item": 2, "nonzero.default": 1, "index_bool_mask": 1,
                                   "repeat_interleave": 1}


def test_dispatchers_of_the_config():
    cfg = load_config(None, SMALL + ["model.dispatch=capacity", "model.capacity_factor=1.5"])
    layers = build_model(cfg.model).pce_layers()
    assert all(isinstance(layer.dispatcher, CapacityDispatcher) and layer.dispatcher.capacity_factor == 1.5
               for layer in layers)
    assert all(isinstance(layer.dispatcher, LocalDispatcher) for layer in build_model(load_config(None, SMALL).model)
               .pce_layers())
    with pytest.raises(ValueError, match="model.capacity_factor"):
        load_config(None, SMALL + ["model.capacity_factor=0"])


def test_capacity_layer_compiles_without_graph_breaks():
    """``fullgraph=True`` raises at the first graph break; the dropless layer (its count copy)
    must, the capacity layer must not. ``aot_eager`` traces forward and backward without
    generating kernels, so this checks capture in seconds; speed is benchmarks/gpu.py's."""
    torch._dynamo.reset()
    cfg, dropless, capacity_net = _pair(factor=2.0)
    x = capacity_net.stem(torch.randn(4, 1, 16, 16)).detach()
    layer = torch.compile(capacity_net.layers[0], fullgraph=True, backend="aot_eager")
    for _ in range(2):  # the first call counts into fresh (int) counters, later ones into tensors
        y, routes = layer(x)
        y.sum().backward()
    assert routes.weights_NE.shape == (4 * 4, cfg.model.num_experts)
    with torch._dynamo.config.patch(error_on_recompile=True):  # static shapes, no guard on a counter value
        for _ in range(2):
            layer(x)[0].sum().backward()
    with pytest.raises(Exception, match="(?i)graph break|data-dependent|tolist|Unsupported"):
        torch.compile(dropless.layers[0], fullgraph=True, backend="aot_eager")(x)
    torch._dynamo.reset()
