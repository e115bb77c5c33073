"""The diagnostic plots: valid PNGs of the expected size from a real tiny PCENet forward."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pce_dist import plots
from pce_dist.config import load_config
from pce_dist.model import build_model

_TINY = ["model.image_size=8", "model.patch_sizes=[4,2]", "model.channels=[8,8]", "model.stem_channels=8"]
_RGB = ["model.in_channels=3", "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]"]
_PX = plots._PANEL_IN * plots._DPI  # pixels per routing-map panel


@pytest.fixture(scope="module")
def gray_forward():
    return _forward(_TINY)


def _forward(overrides: list[str], num_images: int = 3):
    """What the trainer collects at an evaluation: images, the output, per layer (weights, grid)."""
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    x = torch.randn(num_images, cfg.model.in_channels, 8, 8)
    with torch.no_grad():
        out = model(x)
    layer_routes = [(r.weights_NE, layer.extractor.grid_h, layer.extractor.grid_w)
                    for r, layer in zip(out.routes, model.pce_layers())]
    return x, out, layer_routes


def _open_png(path) -> Image.Image:
    assert path.stat().st_size > 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    image = Image.open(path)
    image.load()
    return image


@pytest.mark.parametrize("rgb", [False, True], ids=["gray", "rgb"])
def test_routing_maps_from_a_real_forward(tmp_path, gray_forward, rgb):
    x, out, layer_routes = _forward(_TINY + _RGB) if rgb else gray_forward
    assert [grid for _, *grid in layer_routes] == [[2, 2], [4, 4]]
    path = plots.routing_maps(x, layer_routes, tmp_path / "maps" / "routing.png", class_names=list("abcdefghij"),
                              labels=[0, 1, 2], predictions=out.logits_BK.argmax(1).tolist())
    width, height = _open_png(path).size
    assert width == round(3 * _PX)  # input + one panel per PCE layer
    assert 3 * _PX < height < 3 * _PX + 100  # three image rows + the legend


def test_routing_maps_colour_patches_by_top_expert(tmp_path):
    """A black image, 2x2 patches routed one-hot to experts 0..3: each expert's tile colour shows."""
    weights_NE = torch.eye(4)  # one image, patch p -> expert p with weight 1
    path = plots.routing_maps(torch.zeros(1, 1, 8, 8), [(weights_NE, 2, 2)], tmp_path / "r.png")
    pixels = np.asarray(_open_png(path).convert("RGB")).reshape(-1, 3).astype(int)
    for rgba in plots.expert_colors(4):
        tile = np.round(255 * plots._MAX_OVERLAY_ALPHA * rgba[:3])  # alpha-blended over black
        assert (np.abs(pixels - tile).max(1) <= 2).sum() > 1000, rgba


def test_routing_maps_draw_the_padded_grid_and_the_layer_captions(tmp_path):
    """With the model's input_pad the tiles extend past the image (where the patches are), and a
    caption makes the column title taller; the figure keeps its size."""
    weights_NE = torch.eye(4)
    plain = plots.routing_maps(torch.zeros(1, 1, 8, 8), [(weights_NE, 2, 2)], tmp_path / "a.png")
    padded = plots.routing_maps(torch.zeros(1, 1, 8, 8), [(weights_NE, 2, 2)], tmp_path / "b.png", input_pad=2,
                                layer_captions=["max share 0.25\nNMI class 0.10 / pos 0.90"])
    assert _open_png(plain).size == _open_png(padded).size
    a = np.asarray(_open_png(plain).convert("RGB")).astype(int)
    b = np.asarray(_open_png(padded).convert("RGB")).astype(int)
    assert (np.abs(a - b).sum(-1) > 30).mean() > 0.01  # the panel differs, not only by a few pixels


def test_routing_maps_rejects_mismatched_routes(tmp_path):
    with pytest.raises(ValueError, match="does not match"):
        plots.routing_maps(torch.zeros(2, 1, 8, 8), [(torch.ones(4, 4), 2, 2)], tmp_path / "r.png")


def test_expert_usage_over_time(tmp_path):
    steps_T = np.arange(10, 60, 10)
    usage_TLE = np.array([[[(s * (e + 1)) % 7 / 7 for e in range(4)] for _ in range(2)] for s in steps_T])
    image = _open_png(plots.expert_usage_over_time(steps_T, usage_TLE, tmp_path / "usage.png"))
    assert image.size[0] >= 600 and image.size[1] == round(2 * 2.4 * plots._DPI)  # one subplot per layer
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    for rgba in plots.expert_colors(4):  # every expert's line is drawn in its colour (its legend entry alone: ~45 px)
        assert (np.abs(pixels - np.round(255 * rgba[:3])).max(1) <= 2).sum() > 200, rgba
    empty = np.zeros((0, 2, 4))  # first evaluation: nothing logged yet
    _open_png(plots.expert_usage_over_time(np.zeros(0), empty, tmp_path / "empty.png"))
    with pytest.raises(ValueError, match=r"\[T, L, E\] with T = 5"):
        plots.expert_usage_over_time(steps_T, usage_TLE[:3], tmp_path / "bad.png")


def test_threshold_histogram_from_a_real_forward(tmp_path, gray_forward):
    _, out, _ = gray_forward
    image = _open_png(plots.threshold_histogram([r.threshold_N for r in out.routes], tmp_path / "th.png"))
    assert image.size == (round(2 * 3.0 * plots._DPI), round(2.6 * plots._DPI))


def test_confusion_matrix(tmp_path):
    cm = torch.tensor([[5, 1, 0], [2, 3, 0], [0, 0, 0]])  # an absent class keeps a zero row
    image = _open_png(plots.confusion_matrix(cm, tmp_path / "cm.png", class_names=["zero", "one", "two"]))
    assert image.size[0] > image.size[1] > 300
    with pytest.raises(ValueError, match="square"):
        plots.confusion_matrix(np.zeros((2, 3)), tmp_path / "bad.png")


def test_no_pyplot_figures_left_open(tmp_path):
    plots.confusion_matrix(np.eye(2), tmp_path / "cm.png")
    pyplot = sys.modules.get("matplotlib.pyplot")
    assert pyplot is None or pyplot.get_fignums() == []
