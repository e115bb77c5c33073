import pytest
import yaml

from pce_dist.config import RunConfig, config_from_dict, flatten, load_config, to_yaml


def test_defaults_validate_and_roundtrip(tmp_path):
    cfg = load_config()
    again = config_from_dict(yaml.safe_load(to_yaml(cfg)))
    assert again == cfg
    assert isinstance(cfg, RunConfig)
    assert flatten(cfg)["model.num_experts"] == cfg.model.num_experts


def test_yaml_then_cli_overrides(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("model:\n  num_experts: 8\noptim:\n  lr: 0.01\n")
    cfg = load_config(path, ["model.num_experts=16", "optim.lr=1e-3", "model.channels=[16,32]"])
    assert cfg.model.num_experts == 16
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.model.channels == [16, 32]
    assert isinstance(load_config(None, ["optim.lr=1"]).optim.lr, float)  # ints widen to float


@pytest.mark.parametrize("override,key", [
    (["model.num_experts=0"], "model.num_experts"),
    (["model.patch_sizes=[5,7]"], "model.patch_sizes[0]"),
    (["model.patch_sizes=[14]"], "model.patch_sizes"),
    (["model.input_pad=-1"], "model.input_pad"),
    (["model.input_pad=1", "model.patch_sizes=[14,7]"], "model.patch_sizes[0]"),  # 30x30 map
    (["model.num_expertz=3"], "model.num_expertz"),
    (["model.num_experts=four"], "model.num_experts"),
    (["model.num_experts=2.5"], "model.num_experts"),
    (["model.expert_norm=layer"], "model.expert_norm"),
    (["model.downsample=[true,maybe]"], "model.downsample[1]"),
    (["dist.ep_size=3"], "dist.ep_size"),
    (["dist.zero_stage=3"], "dist.zero_stage"),
    (["optim.lr=-1"], "optim.lr"),
    (["data.mean=[0.5,0.5]"], "data.mean"),
    (["model.temperature=0"], "model.temperature"),
    (["train.epochs=0"], "train.epochs"),
    (["tracking.system_metrics_interval_s=0"], "tracking.system_metrics_interval_s"),
    (["bogus.key=1"], "bogus"),
    (["model=3"], "model"),
])
def test_errors_name_the_key_and_value(override, key):
    with pytest.raises(ValueError) as exc:
        load_config(None, override)
    assert f"'{key}'" in str(exc.value)


def test_bad_yaml_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  nope: 1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*model\.nope"):
        load_config(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["model.num_experts"])


def test_every_shipped_config_loads():
    import pathlib

    configs = sorted((pathlib.Path(__file__).parents[2] / "configs").glob("*.yaml"))
    assert configs, "configs/ holds no YAML"
    for path in configs:
        load_config(path)
