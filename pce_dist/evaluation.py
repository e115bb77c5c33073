"""Evaluation arithmetic shared by the distributed trainer and the standalone evaluator.

``accumulate`` runs a model over an evaluation loader and keeps device-side sums in an
``EvalAccumulator`` (masked by ``valid``, so padding samples that equalise ranks count for
nothing); ``pce_dist.metrics.eval_metrics`` turns the (possibly all-reduced) sums into
named metrics. Splitting the two lets the trainer all-reduce between them, once per
evaluation. An evaluation that counted no valid sample is an error in ``eval_metrics``,
after the all-reduce: one rank may rightly hold none.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from .metrics import EvalAccumulator
from .model.net import PCEOutput


@torch.no_grad()
def accumulate(forward: Callable[[torch.Tensor], PCEOutput], loader: Iterable, *, device: torch.device,
               dtype: torch.dtype, num_layers: int, num_experts: int, num_classes: int,
               num_patches: Sequence[int] = ()) -> EvalAccumulator:
    """Sums over the ``(x, y, valid)`` batches of ``loader``: loss, correct, count, confusion
    counts, and per PCE layer the routing entropy, threshold and expert usage of valid patches;
    with ``num_patches`` (patches per image of each layer) also the chosen expert by class and
    by position (``metrics.SPECIALISATION_STATS``)."""
    acc = EvalAccumulator.zeros(num_layers, num_experts, num_classes, device, num_patches=num_patches)
    for x, y, valid in loader:
        x, y = x.to(device, dtype), y.to(device)
        valid = valid.to(device).float()
        out = forward(x)
        acc.add_batch(loss_B=F.cross_entropy(out.logits_BK.float(), y, reduction="none"),
                      pred_B=out.logits_BK.argmax(1), labels_B=y, valid_B=valid)
        for layer, r in enumerate(out.routes):
            valid_N = valid.repeat_interleave(r.probs_NE.shape[0] // valid.shape[0])
            probs = r.probs_NE.float()
            entropy_N = -(probs * torch.log(probs.clamp_min(1e-12))).sum(1)
            acc.add_layer(layer, entropy_N=entropy_N, threshold_N=r.threshold_N, selected_NE=r.selected_NE,
                          valid_N=valid_N, chosen_N=r.weights_NE.argmax(1), labels_B=y)
    return acc
