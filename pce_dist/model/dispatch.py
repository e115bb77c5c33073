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

Capacity dispatch (``model.dispatch=capacity``, ``CapacityDispatcher``): the same sum over
the pairs that fit into a fixed buffer of ``capacity`` slots per expert, filled top-1 pairs
first, then the others, each group in item order. Every shape is static -- the slot of a
pair is a cumulative sum over the selection mask, the buffer one ``index_select`` -- so
nothing is copied to the host, and a layer compiles with ``torch.compile(fullgraph=True)``.
Empty slots carry a copy of item 0 that no weight multiplies; the experts leave them out of
their BatchNorm statistics (``experts.masked_norm``). With nothing dropped it computes what
the dropless path computes (tests/unit/test_capacity.py).

Shape legend: N items, E experts, M routed (item, expert) pairs, S = E*capacity slots,
C/C' channels, n side.
"""

from __future__ import annotations

import math
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


@dataclass
class DispatchStats:
    """What one layer's dispatcher did since the last ``reset`` (read at log intervals).

    ``expert_rows``: routed patches this process's experts computed (its share of the
    layer's expert work); ``pairs``: (patch, expert) pairs the router selected on this
    process; ``dropped``: those of them capacity dispatch left out. Host ints where the
    dispatch knows them on the host anyway (dropless), device tensors otherwise (capacity:
    reading them is the log interval's business, never the forward's). The traffic fields
    are the expert-parallel dispatcher's (``pce_dist.distributed.dispatch``): ``routed_bytes``
    the payload of routed patches that leave this rank, computed from the counts;
    ``dispatch_bytes``/``return_bytes``/``backward_bytes`` what ``all_to_all_single`` was
    handed for other ranks, measured at the call.
    """

    expert_rows: int | torch.Tensor = 0
    pairs: int | torch.Tensor = 0
    dropped: int | torch.Tensor = 0
    routed_bytes: int | torch.Tensor = 0
    dispatch_bytes: int = 0
    return_bytes: int = 0
    backward_bytes: int = 0

    WORK = ("expert_rows", "pairs", "dropped")  # per layer, compute: not summed over layers by readers
    TRAFFIC = ("routed_bytes", "dispatch_bytes", "return_bytes", "backward_bytes")
    FIELDS = WORK + TRAFFIC

    def count(self, training: bool, **values) -> None:
        """Add one forward's counts; the work fields only in training (evaluation is not a step's work)."""
        for key, value in values.items():
            if training or key not in self.WORK:
                setattr(self, key, getattr(self, key) + (value.detach() if isinstance(value, torch.Tensor) else value))

    def reset(self) -> None:
        for key in self.FIELDS:
            setattr(self, key, 0)


def capacity(num_items: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert: ``ceil(capacity_factor * N / E)``, at most N (a patch selects an expert once)."""
    return max(1, min(num_items, math.ceil(capacity_factor * num_items / num_experts)))


@dataclass
class SlotPlan:
    """The selected pairs placed into ``E`` buffers of ``capacity`` slots, expert-major.

    Attributes:
        item_S: the item each slot reads (0 for an empty slot: a real row, never weighted).
        weight_S: the routing weight of each slot's pair (0 for an empty slot).
        valid_S: which slots hold a pair.
        pairs: selected pairs (device scalar); dropped: those that did not fit.
    """

    item_S: torch.Tensor
    weight_S: torch.Tensor
    valid_S: torch.Tensor
    capacity: int
    pairs: torch.Tensor
    dropped: torch.Tensor


def plan_slots(weights_NE: torch.Tensor, slots: int) -> SlotPlan:
    """Place every selected (item, expert) pair in its expert's buffer, top-1 pairs first.

    Why top-1 first: a patch whose highest-weight expert is full loses most of its output;
    one whose secondary expert is full loses a small, renormalised share. So the buffer
    takes every patch's first choice before any second choice (GShard does the same).
    """
    N, E = weights_NE.shape
    selected_NE = weights_NE > 0
    expert_E = torch.arange(E, device=weights_NE.device)
    primary_NE = (weights_NE.argmax(dim=1, keepdim=True) == expert_E) & selected_NE
    secondary_NE = selected_NE & ~primary_NE
    primary_pos_NE = torch.cumsum(primary_NE, dim=0) - 1
    secondary_pos_NE = primary_NE.sum(dim=0, keepdim=True) + torch.cumsum(secondary_NE, dim=0) - 1
    pos_NE = torch.where(primary_NE, primary_pos_NE, secondary_pos_NE)
    keep_NE = selected_NE & (pos_NE < slots)
    num_slots = E * slots
    slot_NE = torch.where(keep_NE, expert_E * slots + pos_NE, num_slots)  # dropped pairs -> one spare slot
    item_NE = torch.arange(N, device=weights_NE.device)[:, None].expand(N, E)
    item_S = torch.full((num_slots + 1,), N, dtype=torch.long, device=weights_NE.device)
    item_S = item_S.scatter(0, slot_NE.reshape(-1), item_NE.reshape(-1))[:num_slots]
    valid_S = item_S < N
    item_S = torch.where(valid_S, item_S, 0)
    expert_S = torch.arange(num_slots, device=weights_NE.device) // slots
    weight_S = weights_NE[item_S, expert_S] * valid_S
    pairs = selected_NE.sum()
    return SlotPlan(item_S=item_S, weight_S=weight_S, valid_S=valid_S, capacity=slots, pairs=pairs,
                    dropped=pairs - keep_NE.sum())


def run_expert_slots(x_SCnn: torch.Tensor, valid_S: torch.Tensor, expert_ids: list[int],
                     experts: nn.ModuleDict) -> torch.Tensor:
    """Run expert ``expert_ids[k]`` on the k-th of ``len(expert_ids)`` equal slices of slots."""
    chunks = zip(expert_ids, x_SCnn.chunk(len(expert_ids)), valid_S.chunk(len(expert_ids)))
    return torch.cat([experts[str(e)](x, valid) for e, x, valid in chunks])


class Dispatcher(Protocol):
    def __call__(self, x_NCnn: torch.Tensor, weights_NE: torch.Tensor, experts: nn.ModuleDict) -> torch.Tensor:
        ...


def _require_all_experts(name: str, num_experts: int, experts: nn.ModuleDict) -> None:
    if len(experts) != num_experts:
        raise ValueError(f"{name} needs all {num_experts} experts, this module holds {len(experts)}")


class LocalDispatcher:
    """Every expert lives in this process (expert-parallel degree 1); dropless."""

    def __init__(self) -> None:
        self.stats = DispatchStats()

    def __call__(self, x_NCnn: torch.Tensor, weights_NE: torch.Tensor, experts: nn.ModuleDict) -> torch.Tensor:
        num_experts = weights_NE.shape[1]
        _require_all_experts("LocalDispatcher", num_experts, experts)
        plan = plan_routes(weights_NE)
        y_MCnn = run_experts(x_NCnn.index_select(0, plan.item_M), plan.counts, list(range(num_experts)), experts)
        M = sum(plan.counts)
        self.stats.count(experts.training, expert_rows=M, pairs=M)
        return combine(y_MCnn, plan.item_M, plan.weight_M, x_NCnn.shape[0])


class CapacityDispatcher:
    """Every expert in this process, fixed-size buffers (``model.dispatch=capacity``): no host sync."""

    def __init__(self, capacity_factor: float) -> None:
        self.capacity_factor = capacity_factor
        self.stats = DispatchStats()

    def __call__(self, x_NCnn: torch.Tensor, weights_NE: torch.Tensor, experts: nn.ModuleDict) -> torch.Tensor:
        N, E = weights_NE.shape
        _require_all_experts("CapacityDispatcher", E, experts)
        plan = plan_slots(weights_NE, capacity(N, E, self.capacity_factor))
        y_SCnn = run_expert_slots(x_NCnn.index_select(0, plan.item_S), plan.valid_S, list(range(E)), experts)
        self.stats.count(experts.training, expert_rows=plan.valid_S.sum(), pairs=plan.pairs, dropped=plan.dropped)
        return combine(y_SCnn, plan.item_S, plan.weight_S, N)


def make_local_dispatcher(mode: str, capacity_factor: float) -> Dispatcher:
    """The single-process dispatcher of ``model.dispatch``."""
    if mode == "dropless":
        return LocalDispatcher()
    if mode == "capacity":
        return CapacityDispatcher(capacity_factor)
    raise ValueError(f"model.dispatch must be 'dropless' or 'capacity', got {mode!r}")


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
