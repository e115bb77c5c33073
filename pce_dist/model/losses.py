"""Training objective: cross-entropy + router regularisation, exactly as the seed writes it.

    L_total = CE + alpha * L_confidence + beta * L_collapse  [+ gamma * L_balance]

* ``L_confidence = -(1/BP) sum w log w`` -- the mean routing entropy, on the router's
  softmax probabilities (the seed's ``w_bpe``). Minimising it makes routing confident.
* ``L_collapse = sum_e 1[usage_e < u_min]`` with ``usage_e`` the fraction of patches that
  gave expert e a non-zero filtered weight. An indicator count: it has zero gradient.
  It is computed, added and logged as written; it does not steer training.
* ``L_balance`` (off by default, ``model.balance_weight``): the differentiable
  Switch-Transformer load-balancing term ``E * sum_e f_e * P_e`` (f_e: fraction of patches
  whose top-1 is e; P_e: mean probability of e), minimal (= 1) at uniform usage.

All values stay on device; nothing here syncs to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from .net import PCEOutput
from .routing import RouteResult, entropy


@dataclass
class LossResult:
    total: torch.Tensor
    ce: torch.Tensor
    confidence: torch.Tensor  # summed over layers
    collapse: torch.Tensor  # summed over layers (number of collapsed experts)
    balance: torch.Tensor  # summed over layers


def confidence_loss(routes: RouteResult) -> torch.Tensor:
    return entropy(routes.probs_NE).mean()


def expert_usage(routes: RouteResult) -> torch.Tensor:
    """``[E]`` fraction of items that selected each expert (non-zero filtered weight)."""
    return routes.selected_NE.float().mean(0)


def collapse_count(routes: RouteResult, min_usage: float) -> torch.Tensor:
    return (expert_usage(routes) < min_usage).float().sum()


def balance_loss(routes: RouteResult) -> torch.Tensor:
    num_experts = routes.probs_NE.shape[1]
    expert_E = torch.arange(num_experts, device=routes.probs_NE.device)  # not F.one_hot: no index check on the host
    top1_fraction_E = (routes.probs_NE.argmax(-1, keepdim=True) == expert_E).float().mean(0)
    return num_experts * (top1_fraction_E * routes.probs_NE.mean(0)).sum()


def pce_loss(out: PCEOutput, labels_B: torch.Tensor, cfg: ModelConfig) -> LossResult:
    ce = F.cross_entropy(out.logits_BK.float(), labels_B)
    zero = ce.new_zeros(())
    confidence = sum((confidence_loss(r) for r in out.routes), zero)
    collapse = sum((collapse_count(r, cfg.collapse_usage) for r in out.routes), zero)
    balance = sum((balance_loss(r) for r in out.routes), zero)
    total = ce + cfg.confidence_weight * confidence + cfg.collapse_weight * collapse
    if cfg.balance_weight > 0:
        total = total + cfg.balance_weight * balance
    return LossResult(total=total, ce=ce, confidence=confidence, collapse=collapse, balance=balance)
