import ast
import pathlib

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
    (["model.input_pad=2", "model.patch_sizes=[8,4]", "model.downsample=[true,true]"], (2, 1, 28, 28)),
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


def test_input_pad_gives_the_last_layer_several_patches_and_replicates_the_border():
    """28 -> pad 2 -> 32 -> 16 -> 8: layers of 2x2 and 2x2 patches where 28 -> 14 -> 7 has one."""
    cfg = load_config(None, ["model.input_pad=2", "model.patch_sizes=[8,4]", "model.downsample=[true,true]"])
    model = build_model(cfg.model)
    assert model.patches_per_image() == [4, 4]
    plain = build_model(load_config(None, ["model.patch_sizes=[7,7]", "model.downsample=[true,true]"]).model)
    assert plain.patches_per_image() == [4, 1]
    # a constant image stays constant through replicate padding: the stem sees no border edge
    seen = {}
    model.stem.register_forward_pre_hook(lambda mod, inp: seen.update(x=inp[0]))
    model.eval()(torch.full((1, 1, 28, 28), -0.8))
    assert seen["x"].shape == (1, 1, 32, 32) and torch.all(seen["x"] == -0.8)


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


# Pure tensor code: pce_dist.model imports none of these, directly, lazily inside a function,
# through a relative import, or through another pce_dist module it imports. Two apply to the
# model's own files only: "os" (the model never reads the environment) and pce_dist.distributed,
# whose names resolve lazily (PEP 562), so its imports cannot be followed by reading files.
_IMPURE = ("torch.distributed", "deepspeed", "mlflow", "webdataset", "submitit")
_MODEL_ONLY = ("os", "pce_dist.distributed")
_PKG_ROOT = pathlib.Path(__file__).resolve().parents[2] / "pce_dist"


def _imported_modules(source: str, module: str, is_package: bool) -> list[str]:
    """Absolute names of everything ``source`` (module ``module``) imports, anywhere in its
    tree; relative imports are resolved against the module's package, and ``from a import b``
    yields both ``a`` and ``a.b`` (b may be a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    raise ValueError(f"{module}: relative import beyond the top-level package")
                base = ".".join(parts[:len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


def _source_of(module: str) -> tuple[str, bool] | None:
    """(source, is_package) of a pce_dist module, None when ``module`` is not one."""
    parts = module.split(".")
    if parts[0] != "pce_dist":
        return None
    base = _PKG_ROOT.joinpath(*parts[1:])
    if (base / "__init__.py").is_file():
        return (base / "__init__.py").read_text(), True
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py").read_text(), False
    return None


def _purity_violations(extra: dict[str, str] | None = None) -> list[str]:
    """Every forbidden import reachable from pce_dist.model, as "importer -> ... -> name".

    ``extra`` adds (or replaces) model modules by source text, to test the checker itself."""
    extra = extra or {}
    model_modules = {f"pce_dist.model.{p.stem}" for p in (_PKG_ROOT / "model").glob("*.py") if p.stem != "__init__"}
    todo = [(m, m) for m in sorted(model_modules | set(extra) | {"pce_dist.model"})]
    seen, violations = set(), []
    while todo:
        module, chain = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        found = (extra[module], False) if module in extra else _source_of(module)
        if found is None:
            continue
        in_model = module == "pce_dist.model" or module.startswith("pce_dist.model.")
        forbidden = _IMPURE + (_MODEL_ONLY if in_model else ())
        for name in _imported_modules(found[0], module, found[1]):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                violations.append(f"{chain} -> {name}")
            parts = name.split(".")  # importing a.b.c runs a, a.b and a.b.c
            todo += [(".".join(parts[:i]), f"{chain} -> {'.'.join(parts[:i])}") for i in range(1, len(parts) + 1)]
    return violations


def test_pce_net_is_pure_tensor_code():
    assert _purity_violations() == []
    assert isinstance(build_model(load_config().model), PCENet)


@pytest.mark.parametrize("source", [
    "from ..distributed import DistEnv",  # relative, resolved against pce_dist.model
    "from .. import trainer",  # a sibling package module, reached through its own imports
    "from torch import distributed as dist",
    "def f():\n    import deepspeed\n",  # lazy
    "from os import environ",
])
def test_purity_check_catches_what_it_forbids(source):
    assert _purity_violations({"pce_dist.model.fake": source}), source
