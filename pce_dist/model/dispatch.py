"""Sparse expert dispatch: the interface, the single-process implementation, and the
dense reference path the tests compare it with.

A dispatcher maps ``(items [N,C,n,n], weights [N,E], experts) -> [N,C',n,n]`` where
``out_i = sum_e weights[i,e] * expert_e(item_i)`` over the experts with non-zero weight.
It holds no parameters. ``LocalDispatcher`` runs every expert in this process; the
expert-parallel all-to-all dispatcher (``pce_dist.distributed.dispatch``) implements the
same call and is the only code that moves patches between ranks.

How the sparse path works (and why):
  * one permutation: the selected (item, expert) pairs are listed expert-major with a
    single ``nonzero`` over the transposed mask, so one ``index_select`` gathers every
    routed item (its backward is one ``index_add`` -- not one full-size zero tensor per
    expert, as a per-expert ``index_select`` would build);
  * each expert runs once, on its contiguous slice;
  * one ``index_add`` scatters the weighted results back.

Host syncs: a variable-sized batch per expert needs the per-expert counts on the host to
slice the gathered tensor, so there is exactly one device->host copy of E integers per
layer (the same counts the all-to-all must exchange anyway). ``nonzero_static`` is given
the total so it does not sync a second time.

Shape legend: N items, E experts, M routed (item, expert) pairs, C/C' channels, n side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


@dataclass
class RoutePlan:
    """Routed pairs sorted by expert id.

    Attributes:
        item_M: index of the item each pair reads.
        expert_M: global expert id of each pair (non-decreasing).
        weight_M: routing weight of each pair.
        counts_E: pairs per expert (device tensor).
        counts: the same on the host (the layer's one sync).
    """

    item_M: torch.Tensor
    expert_M: torch.Tensor
    weight_M: torch.Tensor
    counts_E: torch.Tensor
    counts: list[int]


def plan_routes(weights_NE: torch.Tensor, counts: list[int] | None = None) -> RoutePlan:
    """List the selected (item, expert) pairs expert-major.

    ``counts`` (pairs per expert, on the host) may be passed by a caller that already
    synced them -- the all-to-all dispatcher fetches them together with the counts it
    receives, so the layer still syncs once.
    """
    N, E = weights_NE.shape
    selected_EN = (weights_NE > 0).t()
    counts_E = selected_EN.sum(dim=1)
    if counts is None:
        counts = counts_E.tolist()
    flat_M = torch.nonzero_static(selected_EN.reshape(-1), size=sum(counts)).squeeze(1)
    item_M = flat_M % N
    expert_M = torch.div(flat_M, N, rounding_mode="floor")
    return RoutePlan(item_M=item_M, expert_M=expert_M, weight_M=weights_NE[item_M, expert_M],
                     counts_E=counts_E, counts=counts)


def run_experts(x_MCnn: torch.Tensor, counts: list[int], expert_ids: list[int],
                experts: nn.ModuleDict) -> torch.Tensor:
    """Run expert ``expert_ids[k]`` on the k-th contiguous slice of ``counts[k]`` rows."""
    outputs = [experts[str(e)](chunk) for e, chunk in zip(expert_ids, torch.split(x_MCnn, counts)) if chunk.shape[0]]
    if not outputs:  # no routed rows here: keep the graph connected to the inputs
        first = experts[str(expert_ids[0])]
        return first(x_MCnn[:0])
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


def combine(y_MCnn: torch.Tensor, item_M: torch.Tensor, weight_M: torch.Tensor, num_items: int) -> torch.Tensor:
    """``out[item] += weight * y`` for every routed pair -> ``[N, C', n, n]``."""
    weighted = y_MCnn * weight_M.to(y_MCnn.dtype)[:, None, None, None]
    out = y_MCnn.new_zeros((num_items, *y_MCnn.shape[1:]))
    return out.index_add(0, item_M, weighted)


class Dispatcher(Protocol):
    def __call__(self, x_NCnn: torch.Tensor, weights_NE: torch.Tensor, experts: nn.ModuleDict) -> torch.Tensor:
        ...


class LocalDispatcher:
    """Every expert lives in this process (expert-parallel degree 1)."""

    def __call__(self, x_NCnn: torch.Tensor, weights_NE: torch.Tensor, experts: nn.ModuleDict) -> torch.Tensor:
        num_experts = weights_NE.shape[1]
        if len(experts) != num_experts:
            raise ValueError(f"LocalDispatcher needs all {num_experts} experts, this module holds {len(experts)}")
        plan = plan_routes(weights_NE)
        y_MCnn = run_experts(x_NCnn.index_select(0, plan.item_M), plan.counts, list(range(num_experts)), experts)
        return combine(y_MCnn, plan.item_M, plan.weight_M, x_NCnn.shape[0])


class DenseReferenceDispatcher:
    """Every expert on every item, then weighted: the definition the sparse path must match.

    Same outputs and gradients as the sparse path whenever the experts treat items
    independently (GroupNorm, or BatchNorm in eval mode; dropout off) -- in training,
    BatchNorm statistics depend on which items an expert sees, which differs by design.
    """

    def __call__(self, x_NCnn: torch.Tensor, weights_NE: torch.Tensor, experts: nn.ModuleDict) -> torch.Tensor:
        out = None
        for e in range(weights_NE.shape[1]):
            term = weights_NE[:, e, None, None, None] * experts[str(e)](x_NCnn)
            out = term if out is None else out + term
        return out
