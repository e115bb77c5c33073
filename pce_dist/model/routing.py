"""Routing math as pure functions: similarity -> softmax -> adaptive threshold -> mask.

Nothing here holds state; ``route`` returns everything a caller needs in one
``RouteResult`` so that losses, metrics and the EMA key update read the same numbers.

Shape legend: N routed items (N = B*P patches), E experts, D embedding size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ThresholdWeights:
    """Weights of the seed's adaptive threshold components (``wth_*``)."""

    max: float = 0.3
    entropy: float = 0.2
    gap: float = 0.3


@dataclass
class RouteResult:
    """One router call. All tensors are on the input's device; nothing is synced to host.

    Attributes:
        probs_NE: softmax(cos / T), rows sum to 1.
        weights_NE: filtered weights: probs * soft_mask on the hard-selected experts (renormalised
            so each row sums to 1 with the seed's gate); > 0 exactly where an expert is selected.
        embeddings_ND: SPP patch embeddings as routed (centred with ``model.router_center``; not unit-normalised).
        threshold_N: the adaptive threshold of each item.
        sum_w_E: sum_j w_ej (detached) -- EMA denominator.
        sum_wemb_ED: sum_j w_ej * unit(embedding_j) (detached) -- EMA numerator.
    """

    probs_NE: torch.Tensor
    weights_NE: torch.Tensor
    embeddings_ND: torch.Tensor
    threshold_N: torch.Tensor
    sum_w_E: torch.Tensor
    sum_wemb_ED: torch.Tensor

    @property
    def selected_NE(self) -> torch.Tensor:
        """Hard selection: which (item, expert) pairs are computed."""
        return self.weights_NE > 0


def entropy(probs_NE: torch.Tensor) -> torch.Tensor:
    """Shannon entropy per row, with 0 * log 0 = 0."""
    return -(probs_NE * torch.log(probs_NE.clamp_min(torch.finfo(probs_NE.dtype).tiny))).sum(-1)


def adaptive_threshold(probs_NE: torch.Tensor, wth: ThresholdWeights) -> torch.Tensor:
    """The seed's threshold: ``wth.max*(1-max_w) + wth.entropy*H/log(E) + wth.gap*gap``.

    ``gap`` is the top-1 probability minus the mean probability of the other experts
    (the seed: "the gap between the most useful expert and all others"); the entropy term
    uses the *normalised* entropy (the seed defines ``entropy_component = norm_entropy``).
    For E == 1 all three components are degenerate; the threshold is then irrelevant
    because the top-1 expert is always kept.
    """
    num_experts = probs_NE.shape[-1]
    pmax_N = probs_NE.max(dim=-1).values
    max_component_N = 1.0 - pmax_N
    if num_experts > 1:
        entropy_component_N = entropy(probs_NE) / math.log(num_experts)
        gap_component_N = pmax_N - (1.0 - pmax_N) / (num_experts - 1)
    else:
        entropy_component_N = torch.zeros_like(pmax_N)
        gap_component_N = torch.ones_like(pmax_N)
    return wth.max * max_component_N + wth.entropy * entropy_component_N + wth.gap * gap_component_N


GATES = ("renormalized", "probs")


def route(
    embeddings_ND: torch.Tensor,
    keys_ED: torch.Tensor,
    *,
    temperature: float,
    wth: ThresholdWeights,
    mask_sharpness: float,
    with_stats: bool = True,
    gate: str = "renormalized",
    select_bias_E: torch.Tensor | None = None,
) -> RouteResult:
    """Route N embeddings to E experts.

    Gradient flow: ``filtered = probs * sigmoid(s*(probs - threshold)) * hard``. The hard
    selection ``hard`` (prob >= threshold, top-1 always kept) is a constant 0/1 factor:
    selected entries receive gradient through ``probs`` and through the soft mask
    (including the threshold's own dependence on ``probs``); unselected entries receive
    none. ``gate`` says how ``filtered`` becomes the combination weights:

    * ``"renormalized"`` (the seed): ``filtered / sum(filtered)``. With a single selected
      expert the weight is exactly 1, so the task loss sends no gradient to the router for
      that item -- the router then learns from the confidence loss and from items routed
      to several experts;
    * ``"probs"``: ``filtered`` itself (Switch/GShard-style): the expert output is scaled by
      the router's confidence, so every routed item's task loss reaches the router.

    ``select_bias_E`` (auxiliary-loss-free balancing) is added to the logits for the *hard
    selection only*: which experts compute an item follows ``softmax(cos/T + bias)`` and its
    threshold, while the weights keep the unbiased probabilities, so the bias steers load
    without distorting what the experts' outputs are multiplied by.
    """
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    emb_unit_ND = F.normalize(embeddings_ND, dim=-1)
    keys_unit_ED = F.normalize(keys_ED, dim=-1)
    cos_NE = emb_unit_ND @ keys_unit_ED.t()
    logits_NE = cos_NE / temperature
    probs_NE = torch.softmax(logits_NE, dim=-1)
    threshold_N = adaptive_threshold(probs_NE, wth)
    soft_mask_NE = torch.sigmoid(mask_sharpness * (probs_NE - threshold_N[:, None]))
    with torch.no_grad():  # the selection is a constant factor either way
        if select_bias_E is None:
            select_NE, select_threshold_N = probs_NE, threshold_N
        else:
            select_NE = torch.softmax(logits_NE + select_bias_E.to(logits_NE.dtype), dim=-1)
            select_threshold_N = adaptive_threshold(select_NE, wth)
        # top-1 as a comparison, not F.one_hot: one_hot checks its indices on the host
        top1_NE = select_NE.argmax(dim=-1, keepdim=True) == torch.arange(probs_NE.shape[-1], device=probs_NE.device)
        hard_NE = (select_NE >= select_threshold_N[:, None]) | top1_NE
    filtered_NE = probs_NE * soft_mask_NE * hard_NE
    if gate == "renormalized":
        # The top-1 expert is always hard-selected; clamp only guards a soft mask underflowing to 0.
        weights_NE = filtered_NE / filtered_NE.sum(-1, keepdim=True).clamp_min(torch.finfo(probs_NE.dtype).tiny)
    else:
        # Never exactly 0 where selected (the dispatch computes where weight > 0): floor at tiny.
        weights_NE = torch.where(hard_NE, filtered_NE.clamp_min(torch.finfo(probs_NE.dtype).tiny), filtered_NE)
    if with_stats:
        w_det_NE = weights_NE.detach()
        sum_w_E = w_det_NE.sum(0)
        sum_wemb_ED = w_det_NE.t() @ emb_unit_ND.detach()
    else:
        sum_w_E = probs_NE.new_zeros(probs_NE.shape[-1])
        sum_wemb_ED = keys_ED.new_zeros(keys_ED.shape)
    return RouteResult(probs_NE=probs_NE, weights_NE=weights_NE, embeddings_ND=embeddings_ND,
                       threshold_N=threshold_N, sum_w_E=sum_w_E, sum_wemb_ED=sum_wemb_ED)


def ema_keys(keys_ED: torch.Tensor, sum_wemb_ED: torch.Tensor, sum_w_E: torch.Tensor,
             alpha: float) -> torch.Tensor:
    """The seed's EMA: ``k <- alpha*k + (1-alpha) * sum_j w_j e_j / sum_j w_j``, then unit-norm.

    Experts that received no weight keep their key (no division by zero, no host sync).
    The statistics must already be summed over every data-parallel rank.
    """
    has_mass_E = sum_w_E > 0
    mean_ED = sum_wemb_ED / sum_w_E.clamp_min(torch.finfo(sum_w_E.dtype).tiny)[:, None]
    updated_ED = alpha * keys_ED + (1.0 - alpha) * mean_ED
    return torch.where(has_mass_E[:, None], F.normalize(updated_ED, dim=-1), keys_ED)
