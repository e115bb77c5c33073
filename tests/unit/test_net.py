import pytest
import torch

from pce_dist.config import load_config
from pce_dist.model import PCENet, build_model, pce_loss


@pytest.mark.parametrize("overrides,shape", [
    ([], (2, 1, 28, 28)),
    (["model.in_channels=3", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]", "model.image_size=32",
      "model.patch_sizes=[8,4]", "model.downsample=[false,true]"], (2, 3, 32, 32)),
    (["model.image_size=8", "model.patch_sizes=[4,2]", "model.channels=[8,16]", "model.num_experts=8"], (2, 1, 8, 8)),
    (["model.kind=dense"], (2, 1, 28, 28)),
    (["model.expert_norm=group", "model.channels=[8,8,8]", "model.patch_sizes=[14,7,2]",
      "model.downsample=[false,false,true]"], (2, 1, 28, 28)),
])
def test_forward_backward_shapes(overrides, shape):
    cfg = load_config(None, overrides)
    model = build_model(cfg.model)
    x = torch.randn(*shape)
    out = model(x)
    assert out.logits_BK.shape == (shape[0], cfg.model.num_classes)
    n_layers = 0 if cfg.model.kind == "dense" else len(cfg.model.channels)
    assert len(out.routes) == n_layers
    loss = pce_loss(out, torch.zeros(shape[0], dtype=torch.long), cfg.model)
    loss.total.backward()
    assert torch.isfinite(loss.total)
    assert model.head.weight.grad is not None


def test_keys_get_gradients_only_in_phase_two():
    cfg = load_config(None, ["model.expert_dropout=0.0", "model.confidence_weight=1.0"])
    model = build_model(cfg.model)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    pce_loss(model(x), y, cfg.model).total.backward()
    for router in model.routers():
        assert router.keys.grad is None
        assert router.proj.weight.grad is not None
    model.zero_grad(set_to_none=True)
    model.set_keys_trainable(True)
    pce_loss(model(x), y, cfg.model).total.backward()
    for router in model.routers():
        assert router.keys.grad is not None and router.keys.grad.abs().sum() > 0


def test_ema_update_keeps_unit_norm_and_moves_keys():
    cfg = load_config(None, [])
    model = build_model(cfg.model).train()
    out = model(torch.randn(4, 1, 28, 28))
    before = [r.keys.detach().clone() for r in model.routers()]
    model.update_keys_ema([(r.sum_wemb_ED, r.sum_w_E) for r in out.routes])
    for router, old in zip(model.routers(), before):
        assert torch.allclose(router.keys.norm(dim=1), torch.ones(cfg.model.num_experts), atol=1e-6)
        assert not torch.equal(router.keys, old)


def test_same_seed_same_losses():
    cfg = load_config(None, [])

    def losses():
        torch.manual_seed(123)
        model = build_model(cfg.model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(5)
        out = []
        for _ in range(3):
            x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
            loss = pce_loss(model(x), y, cfg.model).total
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        return out

    assert losses() == losses()


def test_pce_net_is_pure_tensor_code():
    import ast
    import pathlib

    import pce_dist.model as pkg
    forbidden = {"torch.distributed", "deepspeed", "mlflow", "webdataset", "os", "submitit"}
    for path in pathlib.Path(pkg.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not any(name == f or name.startswith(f + ".") for f in forbidden), (path.name, name)
    assert isinstance(build_model(load_config().model), PCENet)
