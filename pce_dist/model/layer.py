"""One PCE layer: extract -> route -> sparse dispatch -> weighted sum -> reassemble -> conv1x1.

Also the dense baseline layer, which replaces routing by a single expert block over the
whole feature map (same positional channels, same conv1x1), so that PCE-vs-dense
comparisons differ only in routing.

Shape legend: B batch, P patches, C channels, n patch side, N = B*P, E experts.
"""

from __future__ import annotations

import torch
from torch import nn

from .dispatch import Dispatcher, make_local_dispatcher
from .experts import ConvExpert
from .patches import PatchExtractor
from .router import Router
from .routing import RouteResult
from .specs import ExpertSpec, RouterSpec


class PCELayer(nn.Module):
    """``[B,C_in,H,W] -> ([B,C_out,H,W], RouteResult)``.

    ``experts`` is a ``ModuleDict`` keyed by *global* expert id, so a rank that hosts only
    some experts (expert parallelism) still names each parameter by its global id --
    checkpoints and gradient-reduction groups rely on that. The dispatcher is a plain
    attribute (no parameters); the distributed setup swaps it for the all-to-all one and
    drops the experts this rank does not host (``keep_experts``).
    """

    def __init__(self, in_channels: int, out_channels: int, *, patch_size: int, map_size: int,
                 num_experts: int, expert: ExpertSpec = ExpertSpec(), router: RouterSpec = RouterSpec()) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.extractor = PatchExtractor(patch_size, map_size)
        # The router reads the first ``router_channels`` of each patch: content, then (unless
        # model.router_position=false) the 4 positional channels the experts always get.
        self.router_channels = in_channels + 4 if router.position else in_channels
        self.router = Router(self.router_channels, num_experts, router)
        self.experts = nn.ModuleDict({
            str(e): ConvExpert(in_channels + 4, out_channels, kernel_size=expert.kernel,
                               norm=expert.norm, dropout=expert.dropout, bucket_rows=expert.pad_batches)
            for e in range(num_experts)
        })
        self.out_proj = nn.Conv2d(out_channels, out_channels, kernel_size=1)
        self.dispatch_mode, self.capacity_factor = expert.dispatch, expert.capacity_factor
        self.dispatcher: Dispatcher = make_local_dispatcher(expert.dispatch, expert.capacity_factor)

    def keep_experts(self, expert_ids: list[int]) -> None:
        """Drop every expert not in ``expert_ids`` (used when placing experts on ranks)."""
        for key in list(self.experts.keys()):
            if int(key) not in expert_ids:
                del self.experts[key]

    def forward(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, RouteResult]:
        patches_BPCnn = self.extractor(x_BCHW)
        B, P, C, n, _ = patches_BPCnn.shape
        patches_NCnn = patches_BPCnn.reshape(B * P, C, n, n)
        routes = self.router(patches_NCnn[:, :self.router_channels])  # a view: content (+ position) channels
        y_NCnn = self.dispatcher(patches_NCnn, routes.weights_NE, self.experts)
        y_BCHW = self.extractor.reassemble(y_NCnn.reshape(B, P, *y_NCnn.shape[1:]))
        return self.out_proj(y_BCHW), routes


class DenseLayer(nn.Module):
    """The dense baseline: one expert block over the whole map (one "patch" of size H)."""

    def __init__(self, in_channels: int, out_channels: int, *, map_size: int,
                 expert: ExpertSpec = ExpertSpec()) -> None:
        super().__init__()
        self.extractor = PatchExtractor(map_size, map_size)
        self.block = ConvExpert(in_channels + 4, out_channels, kernel_size=expert.kernel,
                                norm=expert.norm, dropout=expert.dropout, bucket_rows=False)  # fixed batch
        self.out_proj = nn.Conv2d(out_channels, out_channels, kernel_size=1)

    def forward(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, None]:
        x_B1CHW = self.extractor(x_BCHW)
        return self.out_proj(self.block(x_B1CHW[:, 0])), None
