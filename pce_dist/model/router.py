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
        # Centring (spec.center): the embeddings minus their running mean. A buffer, not batch
        # statistics: it is set from the k-means sample at key init and then moved by the EMA of
        # all-reduced batch means (keys.KeyUpdater), so every rank -- and one process -- uses the
        # same value, and expert parallelism stays exact. (BatchNorm would centre each rank's
        # batch by its own mean.)
        if spec.center:
            self.register_buffer("center_mean", torch.zeros(self.embed_dim))
        else:
            self.center_mean = None
        if spec.select_bias:  # moved by keys.KeyUpdater after each optimizer step, never by the optimizer
            self.register_buffer("select_bias", torch.zeros(num_experts))
        else:
            self.select_bias = None

    def raw_embed(self, patches_NCnn: torch.Tensor) -> torch.Tensor:
        """``[N,C,n,n] -> [N,D]`` SPP embeddings before centring."""
        return spp(self.proj(patches_NCnn), self.spp_levels, self.spec.spp_pool)

    def embed(self, patches_NCnn: torch.Tensor) -> torch.Tensor:
        """``[N,C,n,n] -> [N,D]`` patch embeddings as routed (used by routing and by k-means init)."""
        embeddings_ND = self.raw_embed(patches_NCnn)
        return embeddings_ND if self.center_mean is None else embeddings_ND - self.center_mean.to(embeddings_ND)

    def forward(self, patches_NCnn: torch.Tensor) -> RouteResult:
        embeddings_ND = self.embed(patches_NCnn)
        keys_ED = self.keys if self.keys_trainable else self.keys.detach()
        return route(embeddings_ND, keys_ED, temperature=self.spec.temperature, wth=self.spec.wth,
                     mask_sharpness=self.spec.mask_sharpness, with_stats=self.training, gate=self.spec.gate,
                     select_bias_E=self.select_bias)

    @torch.no_grad()
    def set_center(self, mean_D: torch.Tensor) -> None:
        """Set the running mean that centring subtracts (key init: the k-means sample's mean)."""
        if self.center_mean is None:
            raise RuntimeError("this router does not centre its embeddings (model.router_center = false)")
        self.center_mean.copy_(mean_D.to(self.center_mean))

    @torch.no_grad()
    def update_center(self, sum_raw_D: torch.Tensor, count: torch.Tensor) -> None:
        """EMA step of the running mean from a batch's raw-embedding sum and count (all ranks summed)."""
        alpha = self.spec.ema_alpha
        batch_mean_D = (sum_raw_D / count.clamp_min(1)).to(self.center_mean)
        updated_D = alpha * self.center_mean + (1.0 - alpha) * batch_mean_D
        self.center_mean.copy_(torch.where(count > 0, updated_D, self.center_mean))  # no host sync

    @torch.no_grad()
    def update_select_bias(self, load_E: torch.Tensor, rate: float) -> None:
        """One balancing step from the load (selected items per expert) summed over every rank.

        ``bias += rate * sign(mean load - load)``: an overloaded expert's bias goes down by
        ``rate``, an underloaded one's up; equal loads leave it. Identical inputs on every
        rank give identical biases (no further collective).
        """
        if self.select_bias is None:
            raise RuntimeError("this router has no selection bias (model.bias_balance_rate = 0)")
        load_E = load_E.to(self.select_bias)
        self.select_bias += rate * torch.sign(load_E.mean() - load_E)

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
