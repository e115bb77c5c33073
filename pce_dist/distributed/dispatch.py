"""Expert-parallel dispatch: the only code that moves patches between ranks.

Experts of a layer are placed contiguously: EP rank r hosts global experts
``[r*E_local, (r+1)*E_local)``. Because ``plan_routes`` lists routed pairs expert-major,
they are already grouped by destination rank, so one ``all_to_all_single`` with uneven
splits sends every routed patch to the rank that hosts its expert.

Per layer and forward:
  1. counts: each rank sends the number of pairs it routes to each global expert
     (an equal-split all-to-all of E integers), then ONE host sync fetches both what it
     sends and what it will receive;
  2. patches: uneven all-to-all of the routed patches (only routed patches travel);
  3. the received rows (grouped by source rank) are regrouped by local expert with one
     stable permutation; each local expert runs once;
  4. results: the inverse all-to-all returns every result to the rank that owns the patch,
     where ``combine`` applies the routing weight.
The routing weights never travel: applying them at home is the same sum and keeps the
router's gradient local. Both all-to-alls are autograd functions whose backward is the
reverse all-to-all. A rank with nothing to send or receive still joins every collective.

Traffic is measured, not derived: every exchange goes through ``_all_to_all``, the one
call of ``all_to_all_single`` here, which counts the bytes of the input tensor it hands
over that are addressed to *other* ranks (the slice a rank sends itself is a local copy).
``DispatchStats.routed_bytes`` is the independent figure: routed pairs to remote experts
times the bytes of one patch, computed from the counts.

Shape legend: N items, E experts (global), M routed pairs sent, R rows received.
"""

from __future__ import annotations

import math
import torch
import torch.distributed as dist
from torch import nn

from ..model.dispatch import DispatchStats, capacity, combine, plan_routes, plan_slots, run_expert_slots, run_experts


def _bytes_to_others(x: torch.Tensor, input_splits: list[int] | None, group) -> int:
    """Bytes of ``x`` that ``all_to_all_single`` sends to the other ranks of ``group``:
    all of it but this rank's own split (an equal split when ``input_splits`` is None)."""
    nbytes = x.element_size() * x.numel()
    size, me = dist.get_world_size(group), dist.get_rank(group)
    if input_splits is None:
        return nbytes - nbytes // size
    row_bytes = x.element_size() * math.prod(x.shape[1:])
    return nbytes - input_splits[me] * row_bytes


def _all_to_all(out: torch.Tensor, x: torch.Tensor, output_splits: list[int] | None,
                input_splits: list[int] | None, group, stats: DispatchStats | None, field: str) -> None:
    """The dispatcher's only ``all_to_all_single``; adds what ``x`` sends to other ranks to
    ``stats.<field>``."""
    x = x.contiguous()
    dist.all_to_all_single(out, x, output_split_sizes=output_splits, input_split_sizes=input_splits, group=group)
    if stats is not None:
        setattr(stats, field, getattr(stats, field) + _bytes_to_others(x, input_splits, group))


class _AllToAll(torch.autograd.Function):
    """Uneven ``all_to_all_single`` along dim 0; backward sends gradients back the same way.

    ``anchor`` (a leaf that requires grad) is an input only so that the output requires
    grad on *every* rank: a rank that sends or receives no rows would otherwise end up with
    a result disconnected from the graph, skip this backward, and leave the other ranks
    waiting in the reverse all-to-all. Not a parameter: it gets no gradient, and an
    optimizer's per-parameter gradient hook (DeepSpeed ZeRO-2 reduces in one) would fire
    for it with none, which ZeRO-2 cannot take. Forward bytes go to ``stats.<field>``, backward
    bytes to ``stats.backward_bytes``.
    """

    @staticmethod
    def forward(ctx, x, output_splits: list[int], input_splits: list[int], group, anchor,
                stats: DispatchStats | None, field: str):
        ctx.group, ctx.output_splits, ctx.input_splits, ctx.stats = group, output_splits, input_splits, stats
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        _all_to_all(out, x, output_splits, input_splits, group, stats, field)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = grad_out.new_empty((sum(ctx.input_splits), *grad_out.shape[1:]))
        _all_to_all(grad_in, grad_out, ctx.input_splits, ctx.output_splits, ctx.group, ctx.stats, "backward_bytes")
        return grad_in, None, None, None, None, None, None


class AllToAllDispatcher:
    """Routes patches to the EP rank hosting their expert and brings the results back."""

    def __init__(self, group, ep_size: int, ep_rank: int, local_expert_ids: list[int]) -> None:
        self.group = group
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.local_expert_ids = list(local_expert_ids)
        self.stats = DispatchStats()

    def _check_experts(self, experts: nn.ModuleDict) -> None:
        if sorted(int(k) for k in experts.keys()) != self.local_expert_ids:
            raise ValueError(f"rank hosts experts {sorted(experts.keys())}, expected {self.local_expert_ids}")

    def __call__(self, x_NCnn: torch.Tensor, weights_NE: torch.Tensor, experts: nn.ModuleDict) -> torch.Tensor:
        N, E = weights_NE.shape
        ep, e_local = self.ep_size, E // self.ep_size
        self._check_experts(experts)

        # 1. counts: send[e] pairs for global expert e; recv[s*E_local + j] from source s for local j.
        send_counts_E = (weights_NE > 0).sum(dim=0)
        recv_counts_E = torch.empty_like(send_counts_E)
        _all_to_all(recv_counts_E, send_counts_E, None, None, self.group, self.stats, "dispatch_bytes")
        both = torch.cat([send_counts_E, recv_counts_E]).tolist()  # the layer's one host sync
        send, recv = both[:E], both[E:]
        input_splits = [sum(send[d * e_local:(d + 1) * e_local]) for d in range(ep)]
        output_splits = [sum(recv[s * e_local:(s + 1) * e_local]) for s in range(ep)]

        # 2. routed patches to their expert's rank.
        plan = plan_routes(weights_NE, counts=send)
        x_MCnn = x_NCnn.index_select(0, plan.item_M)
        anchor = x_NCnn.new_zeros((), requires_grad=True)
        x_RCnn = _AllToAll.apply(x_MCnn, output_splits, input_splits, self.group, anchor, self.stats, "dispatch_bytes")

        # 3. regroup received rows (source-major) by local expert; run each expert once.
        local_R = torch.repeat_interleave(torch.arange(e_local, device=x_NCnn.device).repeat(ep),
                                          recv_counts_E.to(x_NCnn.device), output_size=sum(recv))
        order_R = torch.argsort(local_R, stable=True)
        counts_local = [sum(recv[s * e_local + j] for s in range(ep)) for j in range(e_local)]
        y_sorted = run_experts(x_RCnn.index_select(0, order_R), counts_local, self.local_expert_ids, experts)
        inverse_R = torch.empty_like(order_R)
        inverse_R[order_R] = torch.arange(order_R.numel(), device=order_R.device)
        y_RCnn = y_sorted.index_select(0, inverse_R)

        # 4. results back home, weighted and summed per patch.
        y_MCnn = _AllToAll.apply(y_RCnn, input_splits, output_splits, self.group, anchor, self.stats, "return_bytes")
        row_bytes = x_MCnn.element_size() * math.prod(x_MCnn.shape[1:])
        self.stats.count(experts.training, routed_bytes=(sum(input_splits) - input_splits[self.ep_rank]) * row_bytes,
                         expert_rows=sum(recv), pairs=sum(send))
        return combine(y_MCnn, plan.item_M, plan.weight_M, N)


class AllToAllCapacityDispatcher(AllToAllDispatcher):
    """Capacity dispatch across EP ranks (``model.dispatch=capacity``): no host sync, equal splits.

    Each rank fills ``E`` buffers of ``capacity(N_local)`` slots (``plan_slots``); the buffers
    are expert-major, so rank d's experts' buffers are one contiguous block and one
    equal-split all-to-all sends every block to its rank -- the empty slots travel too (that
    is the price of static shapes: ``capacity_factor`` times the balanced load, whatever the
    routing). The slots' validity (which rows are pairs) travels alongside, one byte a slot,
    so the experts' BatchNorm statistics leave the empty ones out. A local expert then runs
    once on its slots from every source rank, ``ep * capacity`` rows; the results go back
    by the reverse exchange and are weighted at home, as in the dropless path.
    Per-rank expert work is bounded by ``e_local * ep * capacity`` rows, so no rank can be
    loaded more than ``capacity_factor`` times the balanced share.
    """

    def __init__(self, group, ep_size: int, ep_rank: int, local_expert_ids: list[int], capacity_factor: float) -> None:
        super().__init__(group, ep_size, ep_rank, local_expert_ids)
        self.capacity_factor = capacity_factor

    def __call__(self, x_NCnn: torch.Tensor, weights_NE: torch.Tensor, experts: nn.ModuleDict) -> torch.Tensor:
        N, E = weights_NE.shape
        ep, e_local = self.ep_size, E // self.ep_size
        self._check_experts(experts)
        plan = plan_slots(weights_NE, capacity(N, E, self.capacity_factor))
        slots = plan.capacity
        splits = [e_local * slots] * ep  # equal: known from the shapes, never from the routing
        x_SCnn = x_NCnn.index_select(0, plan.item_S)
        anchor = x_NCnn.new_zeros((), requires_grad=True)
        # received [source rank, local expert, slot] -> [local expert, source rank * slot]
        x_RCnn = _AllToAll.apply(x_SCnn, splits, splits, self.group, anchor, self.stats, "dispatch_bytes")
        valid_R = torch.empty(E * slots, dtype=torch.uint8, device=x_NCnn.device)
        _all_to_all(valid_R, plan.valid_S.to(torch.uint8), splits, splits, self.group, self.stats, "dispatch_bytes")
        row_shape = x_RCnn.shape[1:]
        by_expert_RCnn = x_RCnn.reshape(ep, e_local, slots, *row_shape).transpose(0, 1).reshape(E * slots, *row_shape)
        valid_by_expert_R = valid_R.reshape(ep, e_local, slots).transpose(0, 1).reshape(-1).bool()
        y_RCnn = run_expert_slots(by_expert_RCnn, valid_by_expert_R, self.local_expert_ids, experts)
        out_shape = y_RCnn.shape[1:]
        y_RCnn = y_RCnn.reshape(e_local, ep, slots, *out_shape).transpose(0, 1).reshape(E * slots, *out_shape)
        y_SCnn = _AllToAll.apply(y_RCnn, splits, splits, self.group, anchor, self.stats, "return_bytes")
        row_bytes = x_SCnn.element_size() * math.prod(row_shape)
        mine = slice(self.ep_rank * e_local * slots, (self.ep_rank + 1) * e_local * slots)
        remote_pairs = plan.valid_S.sum() - plan.valid_S[mine].sum()
        self.stats.count(experts.training, routed_bytes=remote_pairs * row_bytes,
                         expert_rows=valid_by_expert_R.sum(), pairs=plan.pairs, dropped=plan.dropped)
        return combine(y_SCnn, plan.item_S, plan.weight_S, N)
