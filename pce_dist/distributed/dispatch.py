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
``TrafficStats.routed_bytes`` is the independent figure: routed pairs to remote experts
times the bytes of one patch, computed from the counts.

Shape legend: N items, E experts (global), M routed pairs sent, R rows received.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..model.dispatch import combine, plan_routes, run_experts


@dataclass
class TrafficStats:
    """Traffic to *other* ranks, accumulated until ``reset``.

    ``routed_bytes``: the payload of the routed patches that leave this rank, computed from
    the routing counts; ``dispatch_bytes``: what the forward dispatch exchanges (counts and
    patches) actually handed to ``all_to_all_single`` for other ranks; ``return_bytes``:
    the same for the results travelling back; ``backward_bytes``: both reverse exchanges
    of the backward pass.
    """

    routed_bytes: int = 0
    dispatch_bytes: int = 0
    return_bytes: int = 0
    backward_bytes: int = 0
    calls: int = 0

    def reset(self) -> None:
        self.routed_bytes = self.dispatch_bytes = self.return_bytes = self.backward_bytes = self.calls = 0


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
                input_splits: list[int] | None, group, stats: TrafficStats | None, field: str) -> None:
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
                stats: TrafficStats | None, field: str):
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
        self.stats = TrafficStats()

    def __call__(self, x_NCnn: torch.Tensor, weights_NE: torch.Tensor, experts: nn.ModuleDict) -> torch.Tensor:
        N, E = weights_NE.shape
        ep, e_local = self.ep_size, E // self.ep_size
        if sorted(int(k) for k in experts.keys()) != self.local_expert_ids:
            raise ValueError(f"rank hosts experts {sorted(experts.keys())}, expected {self.local_expert_ids}")

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
        self.stats.routed_bytes += (sum(input_splits) - input_splits[self.ep_rank]) * row_bytes
        self.stats.calls += 1
        return combine(y_MCnn, plan.item_M, plan.weight_M, N)
