"""``pce_dist.predict``: image preparation, the predictions and the routing it reports, the CLI's errors.

The trained-model behaviour (a known image gets its class; an MLflow URI works) is checked on
a real run in tests/cluster/test_tutorial.py; here the model is a small untrained one, whose
outputs are compared with the network's own forward pass.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pce_dist import predict as predict_cli
from pce_dist.config import RunConfig, load_config, to_dict
from pce_dist.data import normalize
from pce_dist.export import read_export, read_model, save_export
from pce_dist.model import build_model

CLASSES = ["cat", "dog", "fish"]


def _exported(tmp_path, kind="pce", suffix=".safetensors"):
    cfg: RunConfig = load_config(None, [f"model.kind={kind}", "model.in_channels=3", "model.image_size=16",
                                        "model.num_classes=3", "model.stem_channels=8", "model.channels=[8,16]",
                                        "model.patch_sizes=[8,4]", "model.downsample=[false,true]",
                                        "data.mean=[0.5,0.4,0.3]", "data.std=[0.2,0.25,0.3]"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    return save_export(model, to_dict(cfg), tmp_path / f"model{suffix}", CLASSES), model, cfg


def _jpeg(path, size, colour=(200, 30, 30)):
    rng = np.random.default_rng(sum(size))
    pixels = np.clip(np.array(colour) + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, "RGB").save(path, quality=95)
    return path


def test_load_image_converts_and_resizes_as_data_prep(tmp_path):
    from data_prep.imagefolder import resize_center_crop

    path = _jpeg(tmp_path / "wide.jpg", (45, 23))
    rgb = predict_cli.load_image(path, channels=3, size=16)
    assert rgb.shape == (3, 16, 16) and rgb.dtype == np.uint8
    with Image.open(path) as im:  # the ImageFolder rule: shorter side to 16, centre crop
        expected = np.asarray(resize_center_crop(im.convert("RGB"), 16)).transpose(2, 0, 1)
    assert np.array_equal(rgb, expected)
    gray = predict_cli.load_image(path, channels=1, size=16)
    assert gray.shape == (1, 16, 16)
    same = _jpeg(tmp_path / "exact.jpg", (16, 16))
    with Image.open(same) as im:  # already the model's size: not resampled
        assert np.array_equal(predict_cli.load_image(same, 3, 16), np.asarray(im.convert("RGB")).transpose(2, 0, 1))


def test_predictions_are_the_networks_own_outputs(tmp_path):
    path, model, cfg = _exported(tmp_path)
    images = [str(_jpeg(tmp_path / f"{i}.jpg", size)) for i, size in enumerate([(16, 16), (33, 57), (80, 20)])]
    exported = read_export(path)
    assert exported.class_names == CLASSES
    preds, x_BCHW, layers = predict_cli.predict(exported, images, top_k=2)

    raw = np.stack([predict_cli.load_image(p, 3, 16) for p in images])
    assert torch.equal(x_BCHW, torch.from_numpy(normalize(raw, cfg.data.mean, cfg.data.std)))
    with torch.no_grad():
        out = model(x_BCHW)
    probs_BK = out.logits_BK.softmax(1)
    for b, pred in enumerate(preds):
        assert pred.image == images[b] and len(pred.top) == 2
        best = int(probs_BK[b].argmax())
        assert pred.top[0][:2] == (best, CLASSES[best])
        assert pred.top[0][2] == pytest.approx(float(probs_BK[b, best]))
        assert pred.top[0][2] >= pred.top[1][2]
        # layer 0: 16x16 map, 8x8 patches -> 2x2; layer 1: 8x8 map, 4x4 patches -> 2x2
        for layer, (route, grid) in enumerate(zip(out.routes, pred.experts)):
            assert np.array(grid).shape == (2, 2)
            assert np.array(grid).ravel().tolist() == route.weights_NE.argmax(1).reshape(3, 4)[b].tolist()
    assert [(gh, gw) for _, gh, gw in layers] == [(2, 2), (2, 2)]


def test_cli_prints_json_and_writes_a_routing_png(tmp_path, capsys):
    path, _, _ = _exported(tmp_path, suffix=".pt")
    image = _jpeg(tmp_path / "x.jpg", (31, 29))
    png = tmp_path / "routing.png"
    assert predict_cli.main([str(path), str(image), "--json", "--top-k", "5", "--routing-png", str(png)]) == 0
    answer = json.loads(capsys.readouterr().out)
    (pred,) = answer["predictions"]
    assert len(pred["top"]) == 3  # top-k capped at the number of classes
    assert sum(t["probability"] for t in pred["top"]) == pytest.approx(1.0, abs=1e-5)
    assert {t["class"] for t in pred["top"]} == set(CLASSES)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 100


def test_cli_errors_name_the_culprit(tmp_path, capsys):
    path, _, _ = _exported(tmp_path)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    assert predict_cli.main([str(path), str(bad)]) == 2
    assert f"{bad}: cannot read the image" in capsys.readouterr().err
    assert predict_cli.main([str(tmp_path / "missing.safetensors"), str(bad)]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    dense, _, _ = _exported(tmp_path / "dense", kind="dense")
    assert predict_cli.main([str(dense), str(_jpeg(tmp_path / "ok.jpg", (16, 16))), "--routing-png",
                             str(tmp_path / "r.png")]) == 2
    assert "dense model has no routing" in capsys.readouterr().err
    assert not (tmp_path / "r.png").exists()


def test_read_model_refuses_an_mlflow_dir_that_is_not_pce_dist(tmp_path):
    (tmp_path / "MLmodel").write_text("flavors:\n  python_function:\n    loader_module: x\n")
    with pytest.raises(ValueError, match="not a pce_dist model"):
        read_model(str(tmp_path))
