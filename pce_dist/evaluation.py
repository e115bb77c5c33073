"""Evaluation arithmetic shared by the distributed trainer and the standalone evaluator.

``accumulate`` runs a model over an evaluation loader and keeps device-side sums (masked
by ``valid``, so padding samples that equalise ranks count for nothing); ``metrics`` turns
the (possibly all-reduced) sums into named metrics. Splitting the two lets the trainer
all-reduce between them, once per evaluation. An evaluation that counted no valid sample
is an error in ``metrics``, after the all-reduce: one rank may rightly hold none.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .model.net import PCEOutput


@torch.no_grad()
def accumulate(forward: Callable[[torch.Tensor], PCEOutput], loader: Iterable, *, device: torch.device,
               dtype: torch.dtype, num_layers: int, num_experts: int,
               num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``sums = [loss, correct, count]``, ``layer_sums[l] = [entropy, threshold, items,
    usage_E...]`` and the confusion counts ``cm_KK[true, predicted]``."""
    sums = torch.zeros(3, device=device)
    layer_sums = torch.zeros(num_layers, 3 + num_experts, device=device)
    cm_KK = torch.zeros(num_classes * num_classes, device=device)
    for x, y, valid in loader:
        x, y = x.to(device, dtype), y.to(device)
        valid = valid.to(device).float()
        out = forward(x)
        loss_B = F.cross_entropy(out.logits_BK.float(), y, reduction="none")
        pred_B = out.logits_BK.argmax(1)
        sums += torch.stack([(loss_B * valid).sum(), ((pred_B == y).float() * valid).sum(), valid.sum()])
        cm_KK.index_add_(0, y * num_classes + pred_B, valid)
        for layer, r in enumerate(out.routes):
            valid_N = valid.repeat_interleave(r.probs_NE.shape[0] // valid.shape[0])
            probs = r.probs_NE.float()
            entropy_N = -(probs * torch.log(probs.clamp_min(1e-12))).sum(1)
            layer_sums[layer, 0] += (entropy_N * valid_N).sum()
            layer_sums[layer, 1] += (r.threshold_N.float() * valid_N).sum()
            layer_sums[layer, 2] += valid_N.sum()
            layer_sums[layer, 3:] += (r.selected_NE.float() * valid_N[:, None]).sum(0)
    return sums, layer_sums, cm_KK.view(num_classes, num_classes)


def metrics(sums: torch.Tensor, layer_sums: torch.Tensor, *, prefix: str, collapse_usage: float,
            split: str = "") -> dict[str, float]:
    """Named metrics from the (all-reduced) sums of ``accumulate``.

    Raises ``ValueError`` naming ``split`` (default: ``prefix``) when no valid sample was
    counted: an accuracy over zero samples would read as a real (terrible) result.
    """
    loss, correct, count = sums.tolist()
    if count <= 0:
        raise ValueError(f"evaluation of split {split or prefix!r} saw no valid sample (on any rank): "
                         f"nothing to report; check the split in manifest.json and the data warnings above")
    out = {f"{prefix}/loss": loss / count, f"{prefix}/accuracy": correct / count, f"{prefix}/samples": count}
    for layer, row in enumerate(layer_sums.tolist()):
        items = max(row[2], 1.0)
        usage = [u / items for u in row[3:]]
        out[f"router/layer{layer}/entropy"] = row[0] / items
        out[f"router/layer{layer}/threshold"] = row[1] / items
        out[f"router/layer{layer}/experts_per_patch"] = sum(usage)
        out[f"router/layer{layer}/collapse"] = float(sum(u < collapse_usage for u in usage))
        for e, u in enumerate(usage):
            out[f"router/eval_usage/layer{layer}/expert{e}"] = u
    return out
