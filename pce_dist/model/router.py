"""The PCE router: conv projection -> SPP embedding -> cosine routing against unit keys.

Shape legend: N patches (B*P), C input channels (incl. the 4 positional ones), n patch
side, R router_dim, D = R * sum(level^2) embedding size, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .routing import RouteResult, ema_keys, route
from .specs import RouterSpec


def spp(x_NCHW: torch.Tensor, levels: list[int], pool: str = "max") -> torch.Tensor:
    """Spatial pyramid pooling: ``[N,C,H,W] -> [N, C*sum(l*l)]``, fixed size for any H, W."""
    pool_fn = F.adaptive_max_pool2d if pool == "max" else F.adaptive_avg_pool2d
    return torch.cat([pool_fn(x_NCHW, level).flatten(1) for level in levels], dim=1)


class Router(nn.Module):
    """Routes patches to experts by cosine similarity of SPP embeddings to learned keys.

    The projection has no nonlinearity: a ReLU would make every embedding non-negative
    and squeeze cosine similarities into [0, 1].

    Keys are a ``nn.Parameter`` from the start so that an optimizer built once (DeepSpeed
    builds its param groups at engine creation) already holds them; in phase 1 the
    forward pass detaches them (no gradient, ``keys.grad`` stays ``None``) and the trainer
    moves them by ``update_keys_ema``. ``set_keys_trainable(True)`` starts phase 2.
    """

    def __init__(self, in_channels: int, num_experts: int, spec: RouterSpec = RouterSpec()) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.spec = spec
        self.spp_levels = list(spec.spp_levels)
        self.proj = nn.Conv2d(in_channels, spec.dim, kernel_size=3, padding=1)
        self.embed_dim = spec.embed_dim
        self.keys = nn.Parameter(F.normalize(torch.randn(num_experts, self.embed_dim), dim=-1))
        self.keys_trainable = False

    def embed(self, patches_NCnn: torch.Tensor) -> torch.Tensor:
        """``[N,C,n,n] -> [N,D]`` patch embeddings (used by routing and by k-means init)."""
        return spp(self.proj(patches_NCnn), self.spp_levels, self.spec.spp_pool)

    def forward(self, patches_NCnn: torch.Tensor) -> RouteResult:
        embeddings_ND = self.embed(patches_NCnn)
        keys_ED = self.keys if self.keys_trainable else self.keys.detach()
        return route(embeddings_ND, keys_ED, temperature=self.spec.temperature, wth=self.spec.wth,
                     mask_sharpness=self.spec.mask_sharpness, with_stats=self.training)

    def set_keys_trainable(self, trainable: bool) -> None:
        self.keys_trainable = bool(trainable)

    @torch.no_grad()
    def set_keys(self, keys_ED: torch.Tensor) -> None:
        """Replace the keys (e.g. by k-means centroids); stored unit-norm."""
        if keys_ED.shape != self.keys.shape:
            raise ValueError(f"keys must be {list(self.keys.shape)}, got {list(keys_ED.shape)}")
        self.keys.copy_(F.normalize(keys_ED.to(self.keys), dim=-1))

    @torch.no_grad()
    def update_keys_ema(self, sum_wemb_ED: torch.Tensor, sum_w_E: torch.Tensor) -> None:
        """Phase-1 EMA step from statistics already reduced over all data-parallel ranks."""
        self.keys.copy_(ema_keys(self.keys.float(), sum_wemb_ED.float(), sum_w_E.float(),
                                 self.spec.ema_alpha).to(self.keys.dtype))
