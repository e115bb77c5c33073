"""The router's and the experts' settings as two objects, built from ``ModelConfig`` once.

Why: the network, the layer and the router each need a handful of these settings; passed as
loose keyword arguments they had to be repeated at every level (15 of them, 4 files to edit
for one new router option). Now a new router option is a field here, a field in
``ModelConfig`` and its use in ``router.py``; ``net.py`` and ``layer.py`` pass the object on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ModelConfig
from .routing import ThresholdWeights


@dataclass(frozen=True)
class ExpertSpec:
    """One expert block (a ResNet block of two convs, see ``experts.ConvExpert``)."""

    kernel: int = 3
    norm: str = "batch"
    dropout: float = 0.0
    pad_batches: bool = True  # see ``experts.padded_rows``
    dispatch: str = "dropless"  # how routed patches reach the experts (ModelConfig.dispatch)
    capacity_factor: float = 2.0  # capacity dispatch only (ModelConfig.capacity_factor)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> ExpertSpec:
        return cls(kernel=cfg.expert_kernel, norm=cfg.expert_norm, dropout=cfg.expert_dropout,
                   pad_batches=cfg.expert_pad_batches, dispatch=cfg.dispatch, capacity_factor=cfg.capacity_factor)


@dataclass(frozen=True)
class RouterSpec:
    """One router: projection width, SPP embedding, cosine softmax, threshold, mask, EMA."""

    dim: int = 8
    spp_levels: tuple[int, ...] = (1, 2, 4)
    spp_pool: str = "max"
    temperature: float = 0.1
    wth: ThresholdWeights = field(default_factory=ThresholdWeights)
    mask_sharpness: float = 50.0
    ema_alpha: float = 0.99
    gate: str = "renormalized"  # see ModelConfig.gate
    center: bool = False  # see ModelConfig.router_center
    select_bias: bool = False  # a selection bias buffer exists (ModelConfig.bias_balance_rate > 0)
    position: bool = True  # see ModelConfig.router_position

    @property
    def embed_dim(self) -> int:
        """D: ``dim`` channels pooled at every SPP level."""
        return self.dim * sum(level * level for level in self.spp_levels)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> RouterSpec:
        return cls(dim=cfg.router_dim, spp_levels=tuple(cfg.spp_levels), spp_pool=cfg.spp_pool,
                   temperature=cfg.temperature,
                   wth=ThresholdWeights(max=cfg.wth_max, entropy=cfg.wth_entropy, gap=cfg.wth_gap),
                   mask_sharpness=cfg.mask_sharpness, ema_alpha=cfg.key_ema_alpha, gate=cfg.gate,
                   center=cfg.router_center, select_bias=cfg.bias_balance_rate > 0,
                   position=cfg.router_position)
