"""Diagnostic figures for a run: where the router sends patches, and how that evolves.

Every function is pure: it takes host data (tensors, arrays or lists), writes one PNG to
``path`` and returns the path. Nothing here reads a metric name: series logged under a
name come as arrays (``pce_dist.metrics.usage_over_time``). Nothing here is distributed; the trainer gathers the data
(every rank runs the forward on the fixed images, because the expert-parallel forward
contains all-to-all collectives) and calls these on rank 0 only.

Why ``Figure`` + ``FigureCanvasAgg`` instead of ``pyplot``: pyplot keeps a global
registry of open figures and picks a backend for the whole process (a GUI one on a
desktop, which then fails on a compute node without a display). A bare ``Figure`` bound
to the Agg canvas is garbage-collected like any object, selects no process-wide backend,
and is safe to call from a training loop thousands of times.

Figures are drawn at a fixed ``_DPI`` without ``bbox_inches="tight"`` so an image's pixel
size is ``figsize * _DPI`` -- predictable for tests and for side-by-side comparison of the
same plot across evaluations.

Shape legend: B images, C channels, H/W image size, N = B*P routed patches (row-major
patch grid per image, ``p = gy * grid_w + gx``), E experts, K classes, L PCE layers,
T logged steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

_DPI = 100
_PANEL_IN = 2.2  # inches per image panel: large enough to read a 14x14 patch grid
_MAX_OVERLAY_ALPHA = 0.6  # a weight-1.0 patch still lets the image show through


# ----------------------------------------------------------------------------- helpers


def _array(x: Any) -> np.ndarray:
    """Host float array from a tensor (any dtype/device, bf16 included), array or list."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _figure(width_in: float, height_in: float):
    """A figure bound to the Agg canvas, with no pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=_DPI)
    return path


def expert_colors(num_experts: int) -> np.ndarray:
    """``[E, 4]`` RGBA: expert ``e`` gets the same colour in every plot of this module.

    Qualitative maps (tab10, then tab20) keep neighbouring expert ids distinguishable;
    beyond 20 experts colours are spread evenly around the hue circle.
    """
    from matplotlib import colormaps

    if num_experts <= 10:
        return colormaps["tab10"](np.arange(num_experts))
    if num_experts <= 20:
        return colormaps["tab20"](np.arange(num_experts))
    return colormaps["hsv"](np.arange(num_experts) / num_experts)


def _display_image(image_CHW: np.ndarray) -> tuple[np.ndarray, str | None]:
    """Rescale one normalised image to [0, 1]; RGB as HWC, anything else as grey (channel mean)."""
    lo, hi = image_CHW.min(), image_CHW.max()
    image_CHW = (image_CHW - lo) / (hi - lo) if hi > lo else np.zeros_like(image_CHW)
    if image_CHW.shape[0] == 3:
        return image_CHW.transpose(1, 2, 0), None
    return image_CHW.mean(0), "gray"


def _placeholder(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


# ----------------------------------------------------------------------------- routing maps


def routing_maps(images_BCHW: Any, layer_routes: Sequence[tuple[Any, int, int]], path: str | Path,
                 class_names: Sequence[str] | None = None, labels: Sequence[int] | None = None,
                 predictions: Sequence[int] | None = None, input_pad: int = 0,
                 layer_captions: Sequence[str] | None = None) -> Path:
    """One row per image: the image, then one panel per PCE layer with its patch grid.

    Each patch is coloured by its top-weight expert (same colour for an expert id in
    every layer) with the top weight as opacity, so a confident routing decision reads
    as a solid tile and a split one as a faint tile.

    Args:
        images_BCHW: the images as fed to the model (normalised; rescaled per image here).
        layer_routes: per PCE layer ``(weights_NE, grid_h, grid_w)`` with ``N = B*grid_h*grid_w``
            (``RouteResult.weights_NE`` and ``PCELayer.extractor.grid_h/grid_w``). The grid
            is drawn over the whole image, whatever the layer's feature-map size.
        path: PNG to write.
        class_names: names for ``labels``/``predictions`` (default: the class index).
        labels, predictions: optional per-image class ids, shown above the image.
        input_pad: the model's ``input_pad``: the grid covers the image plus this border, drawn
            around it so the tiles sit where the model's patches are.
        layer_captions: per layer, text under its column title (the trainer passes the
            evaluation's specialisation: max expert share, NMI with class and with position).

    Returns:
        ``path`` as a ``Path``.
    """
    images = _array(images_BCHW)
    if images.ndim != 4:
        raise ValueError(f"images_BCHW must be [B,C,H,W], got shape {images.shape}")
    B, _, H, W = images.shape
    maps = []  # per layer: (expert_BHgWg, weight_BHgWg)
    for layer, (weights, grid_h, grid_w) in enumerate(layer_routes):
        weights_NE = _array(weights)
        if weights_NE.ndim != 2 or weights_NE.shape[0] != B * grid_h * grid_w:
            raise ValueError(f"layer {layer}: weights_NE of shape {weights_NE.shape} does not match "
                             f"{B} images x {grid_h}x{grid_w} patches")
        maps.append((weights_NE.argmax(1).reshape(B, grid_h, grid_w),
                     weights_NE.max(1).clip(0.0, 1.0).reshape(B, grid_h, grid_w)))
    num_experts = max((_array(w).shape[1] for w, _, _ in layer_routes), default=0)
    colors = expert_colors(num_experts)

    def name(k: int) -> str:
        return class_names[k] if class_names is not None and 0 <= k < len(class_names) else str(k)

    cols = 1 + len(maps)
    legend_rows = math.ceil(num_experts / max(1, int(_PANEL_IN * cols / 0.9)))
    fig = _figure(_PANEL_IN * cols, _PANEL_IN * B + 0.3 + 0.2 * legend_rows)
    axes = fig.subplots(B, cols, squeeze=False)
    for b in range(B):
        shown, cmap = _display_image(images[b])
        for col in range(cols):
            ax = axes[b, col]
            ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=1.0, extent=(0, W, H, 0), interpolation="nearest")
            if input_pad:
                ax.set_xlim(-input_pad, W + input_pad)
                ax.set_ylim(H + input_pad, -input_pad)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                parts = [f"y={name(int(labels[b]))}"] if labels is not None else []
                parts += [f"pred={name(int(predictions[b]))}"] if predictions is not None else []
                ax.set_title(" ".join(parts) or "input", fontsize=8)
                continue
            expert, weight = maps[col - 1][0][b], maps[col - 1][1][b]
            overlay = colors[expert].copy()  # [Hg, Wg, 4]
            overlay[..., 3] = weight * _MAX_OVERLAY_ALPHA
            p, Hp, Wp = input_pad, H + 2 * input_pad, W + 2 * input_pad
            ax.imshow(overlay, extent=(-p, W + p, H + p, -p), interpolation="nearest")
            grid_h, grid_w = expert.shape
            for gy in range(1, grid_h):
                ax.axhline(gy * Hp / grid_h - p, color="white", linewidth=0.5)
            for gx in range(1, grid_w):
                ax.axvline(gx * Wp / grid_w - p, color="white", linewidth=0.5)
            if b == 0:
                caption = layer_captions[col - 1] if layer_captions and col - 1 < len(layer_captions) else ""
                ax.set_title(f"layer {col - 1} ({grid_h}x{grid_w})" + (f"\n{caption}" if caption else ""),
                             fontsize=8 if not caption else 6)
    if num_experts:
        from matplotlib.patches import Patch

        handles = [Patch(color=colors[e], label=f"expert {e}") for e in range(num_experts)]
        per_row = max(1, int(_PANEL_IN * cols / 0.9))  # an "expert 10" entry is ~0.9 in wide at 7 pt
        fig.legend(handles=handles, loc="outside lower center", ncol=min(num_experts, per_row), fontsize=7,
                   frameon=False)
    return _save(fig, path)


# ----------------------------------------------------------------------------- usage over time


def expert_usage_over_time(steps_T: Any, usage_TLE: Any, path: str | Path) -> Path:
    """Per layer, one line per expert: the fraction of patches that selected it, vs step.

    Args:
        steps_T: the optimizer step of each logged interval.
        usage_TLE: ``[T, L, E]`` usage per interval, layer and expert (``Trainer.history``
            through ``pce_dist.metrics.usage_over_time``).
        path: PNG to write. With nothing logged yet (``T == 0`` or ``L == 0``) the PNG says
            so rather than failing, so the caller need not special-case the first evaluation.
    """
    steps = _array(steps_T).ravel()
    usage = _array(usage_TLE)
    if usage.size and (usage.ndim != 3 or usage.shape[0] != steps.shape[0]):
        raise ValueError(f"usage_TLE must be [T, L, E] with T = {steps.shape[0]} steps, got shape {usage.shape}")
    num_layers = usage.shape[1] if usage.size else 0
    fig = _figure(6.0, 2.4 * max(1, num_layers))
    if not num_layers:
        _placeholder(fig.subplots(), "no expert usage logged yet")
        return _save(fig, path)
    num_experts = usage.shape[2]
    colors = expert_colors(num_experts)
    axes = fig.subplots(num_layers, 1, squeeze=False, sharex=True)[:, 0]
    for layer, ax in enumerate(axes):
        for expert in range(num_experts):
            ax.plot(steps, usage[:, layer, expert], color=colors[expert], linewidth=1.2, label=f"expert {expert}")
        ax.set_ylim(bottom=0.0)
        ax.set_ylabel("usage")
        ax.set_title(f"layer {layer}: fraction of patches routed to each expert", fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    from matplotlib.lines import Line2D

    # Outside the axes: a legend inside would hide the lines it names once E grows.
    handles = [Line2D([], [], color=colors[e], label=f"expert {e}") for e in range(len(colors))]
    fig.legend(handles=handles, loc="outside right upper", fontsize=7, frameon=False)
    return _save(fig, path)


# ----------------------------------------------------------------------------- thresholds


def threshold_histogram(thresholds_per_layer: Sequence[Any], path: str | Path, bins: int = 30) -> Path:
    """Distribution of the adaptive threshold (``RouteResult.threshold_N``) per layer, with its mean."""
    layers = [_array(t).ravel() for t in thresholds_per_layer]
    fig = _figure(3.0 * max(1, len(layers)), 2.6)
    if not layers:
        _placeholder(fig.subplots(), "no PCE layers")
        return _save(fig, path)
    axes = fig.subplots(1, len(layers), squeeze=False)[0]
    for layer, (ax, values) in enumerate(zip(axes, layers)):
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("threshold")
        values = values[np.isfinite(values)]
        if values.size == 0:
            _placeholder(ax, "no values")
            continue
        ax.hist(values, bins=bins, color="tab:blue", alpha=0.8)
        mean = float(values.mean())
        ax.axvline(mean, color="black", linestyle="--", linewidth=1.0, label=f"mean {mean:.3f}")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("patches")
    return _save(fig, path)


# ----------------------------------------------------------------------------- confusion matrix


def confusion_matrix(cm_KK: Any, path: str | Path, class_names: Sequence[str] | None = None) -> Path:
    """Counts (rows: true class, columns: predicted) with colours normalised per row.

    Row normalisation makes a rare class's errors as visible as a frequent one's; the
    cell text keeps the raw counts. Cell text is dropped above 30 classes (unreadable).
    """
    cm = _array(cm_KK)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"cm_KK must be square [K,K], got shape {cm.shape}")
    K = cm.shape[0]
    totals = cm.sum(1, keepdims=True)
    rates = np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)
    accuracy = float(np.trace(cm) / cm.sum()) if cm.sum() > 0 else math.nan
    side = min(12.0, max(3.5, 0.45 * K + 1.5))
    fig = _figure(side + 1.0, side)
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    names = [str(class_names[k]) if class_names is not None and k < len(class_names) else str(k)
             for k in range(K)]
    if K <= 30:
        ax.set_xticks(range(K), names, rotation=90 if max(map(len, names)) > 3 else 0, fontsize=7)
        ax.set_yticks(range(K), names, fontsize=7)
        for i in range(K):
            for j in range(K):
                ax.text(j, i, f"{cm[i, j]:.0f}", ha="center", va="center", fontsize=7 if K <= 15 else 5,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"accuracy {accuracy:.4f} ({cm.sum():.0f} samples)", fontsize=9)
    return _save(fig, path)
