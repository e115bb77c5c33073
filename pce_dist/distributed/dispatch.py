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

Shape legend: N items, E experts (global), M routed pairs sent, R rows received.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..model.dispatch import combine, plan_routes, run_experts


class _AllToAll(torch.autograd.Function):
    """Uneven ``all_to_all_single`` along dim 0; backward sends gradients back the same way.

    ``anchor`` (an expert parameter) is an input only so that the output requires grad on
    *every* rank: a rank that sends or receives no rows would otherwise end up with a
    result disconnected from the graph, skip this backward, and leave the other ranks
    waiting in the reverse all-to-all.
    """

    @staticmethod
    def forward(ctx, x, output_splits: list[int], input_splits: list[int], group, anchor):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=output_splits,
                               input_split_sizes=input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = grad_out.new_empty((sum(ctx.input_splits), *grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), output_split_sizes=ctx.input_splits,
                               input_split_sizes=ctx.output_splits, group=ctx.group)
        return grad_in, None, None, None, None


@dataclass
class TrafficStats:
    """Forward-pass traffic to *other* ranks, accumulated until ``reset``.

    ``routed_bytes`` is the payload of the routed patches that leave this rank;
    ``dispatch_bytes`` what the dispatch all-to-all actually sends (patches + counts);
    ``return_bytes`` the results travelling back. Backward moves the same amounts again.
    """

    routed_bytes: int = 0
    dispatch_bytes: int = 0
    return_bytes: int = 0
    calls: int = 0

    def reset(self) -> None:
        self.routed_bytes = self.dispatch_bytes = self.return_bytes = self.calls = 0


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
        dist.all_to_all_single(recv_counts_E, send_counts_E, group=self.group)
        both = torch.cat([send_counts_E, recv_counts_E]).tolist()  # the layer's one host sync
        send, recv = both[:E], both[E:]
        input_splits = [sum(send[d * e_local:(d + 1) * e_local]) for d in range(ep)]
        output_splits = [sum(recv[s * e_local:(s + 1) * e_local]) for s in range(ep)]

        # 2. routed patches to their expert's rank.
        plan = plan_routes(weights_NE, counts=send)
        x_MCnn = x_NCnn.index_select(0, plan.item_M)
        anchor = next(iter(experts.parameters()))
        x_RCnn = _AllToAll.apply(x_MCnn, output_splits, input_splits, self.group, anchor)

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
        y_MCnn = _AllToAll.apply(y_RCnn, input_splits, output_splits, self.group, anchor)
        self._count(x_MCnn, y_RCnn, input_splits, output_splits, send_counts_E)
        return combine(y_MCnn, plan.item_M, plan.weight_M, N)

    def _count(self, x_MCnn, y_RCnn, input_splits, output_splits, counts_E) -> None:
        row_in = math.prod(x_MCnn.shape[1:]) * x_MCnn.element_size()
        row_out = math.prod(y_RCnn.shape[1:]) * y_RCnn.element_size()
        rows_out = sum(input_splits) - input_splits[self.ep_rank]
        rows_back = sum(output_splits) - output_splits[self.ep_rank]
        count_bytes = counts_E.element_size() * counts_E.numel() * (self.ep_size - 1) // self.ep_size
        self.stats.routed_bytes += rows_out * row_in
        self.stats.dispatch_bytes += rows_out * row_in + count_bytes
        self.stats.return_bytes += rows_back * row_out
        self.stats.calls += 1
