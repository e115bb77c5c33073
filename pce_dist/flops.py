"""Parameter and FLOP accounting for PCE and the dense baseline.

*Active* means what one image actually uses: the sparse dispatch runs only the selected
experts, so counting the FLOPs of a real forward (``torch.utils.flop_counter``) gives the
active FLOPs directly; active parameters are the shared ones plus, per PCE layer, the
parameters of one expert times the mean number of experts each patch selects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .model.experts import exact_batches
from .model.net import PCENet, is_expert_name


@dataclass
class Cost:
    total_params: int
    active_params: float  # per image, averaged over the batch's routing
    forward_flops_per_image: float  # multiply-add = 2 FLOPs, as torch's counter does
    experts_per_patch: list[float]  # per PCE layer

    def as_dict(self) -> dict:
        return {"total_params": self.total_params, "active_params": self.active_params,
                "forward_flops_per_image": self.forward_flops_per_image, "experts_per_patch": self.experts_per_patch}


@torch.no_grad()
def measure(model: PCENet, x_BCHW: torch.Tensor) -> Cost:
    """Costs of ``model`` on the batch ``x_BCHW`` (eval mode: no dropout, fixed BN statistics)."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, exact_batches(model):  # the model's FLOPs, not the expert batch padding's
        out = model(x_BCHW)
    model.train(was_training)
    total = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for name, p in model.named_parameters() if is_expert_name(name))
    active = float(total - expert_params)
    per_patch = []
    for layer, routes in zip(model.pce_layers(), out.routes):
        k = routes.selected_NE.sum(1).float().mean().item()
        per_patch.append(k)
        one_expert = sum(p.numel() for p in next(iter(layer.experts.values())).parameters())
        active += k * one_expert
    return Cost(total_params=total, active_params=active,
                forward_flops_per_image=counter.get_total_flops() / x_BCHW.shape[0], experts_per_patch=per_patch)
