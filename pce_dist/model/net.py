"""PCENet: stem -> stack of PCE layers (progressively smaller patches) -> SPP + FC head.

Shape legend: B batch, C channels, H/W map size, K classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..config import ModelConfig, feature_map_sizes
from .experts import make_norm
from .layer import DenseLayer, PCELayer
from .router import Router, spp
from .routing import RouteResult
from .specs import ExpertSpec, RouterSpec


@dataclass
class PCEOutput:
    logits_BK: torch.Tensor
    routes: list[RouteResult]  # one per PCE layer (empty for the dense baseline)


class PCENet(nn.Module):
    """Positional Convolution Experts classifier, built from a ``ModelConfig``.

    The stem (3x3 conv + norm + ReLU) lifts raw pixels to ``stem_channels`` so the first
    router sees features, not intensities. Layer ``i`` optionally halves the map
    (2x2 average pool) before extracting ``patch_sizes[i]`` patches.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_channels, cfg.stem_channels, 3, padding=1, bias=False),
            make_norm(cfg.stem_norm, cfg.stem_channels), nn.ReLU(inplace=True))
        expert, router = ExpertSpec.from_config(cfg), RouterSpec.from_config(cfg)
        self.downsample = nn.ModuleList()
        self.layers = nn.ModuleList()
        in_ch = cfg.stem_channels
        for i, (out_ch, size) in enumerate(zip(cfg.channels, feature_map_sizes(cfg))):
            self.downsample.append(nn.AvgPool2d(2) if cfg.downsample[i] else nn.Identity())
            if cfg.kind == "dense":
                layer: nn.Module = DenseLayer(in_ch, out_ch, map_size=size, expert=expert)
            else:
                layer = PCELayer(in_ch, out_ch, patch_size=cfg.patch_sizes[i], map_size=size,
                                 num_experts=cfg.num_experts, expert=expert, router=router)
            self.layers.append(layer)
            in_ch = out_ch
        head_dim = in_ch * sum(level * level for level in cfg.head_spp_levels)
        self.head = nn.Linear(head_dim, cfg.num_classes)

    def forward(self, x_BCHW: torch.Tensor) -> PCEOutput:
        if self.cfg.input_pad:  # replicate, not zeros: a constant border would be a false edge
            pad = self.cfg.input_pad
            x_BCHW = F.pad(x_BCHW, (pad, pad, pad, pad), mode="replicate")
        h = self.stem(x_BCHW)
        routes: list[RouteResult] = []
        for down, layer in zip(self.downsample, self.layers):
            h, layer_routes = layer(down(h))
            if layer_routes is not None:
                routes.append(layer_routes)
        logits_BK = self.head(spp(h, self.cfg.head_spp_levels, self.cfg.spp_pool))
        return PCEOutput(logits_BK=logits_BK, routes=routes)

    # --- router helpers used by the trainer (phases, EMA, key init) -----------------

    def pce_layers(self) -> list[PCELayer]:
        return [layer for layer in self.layers if isinstance(layer, PCELayer)]

    def routers(self) -> list[Router]:
        return [layer.router for layer in self.pce_layers()]

    def patches_per_image(self) -> list[int]:
        """Patches each PCE layer routes per image (its patch grid's size)."""
        return [layer.extractor.num_patches for layer in self.pce_layers()]

    def set_keys_trainable(self, trainable: bool) -> None:
        for router in self.routers():
            router.set_keys_trainable(trainable)

    def normalize_keys(self) -> None:
        """Re-project trained (phase-2) keys to unit norm after an optimizer step."""
        for router in self.routers():
            router.set_keys(router.keys.detach())

    def update_keys_ema(self, stats: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """``stats[l] = (sum_wemb_ED, sum_w_E)`` of layer l, already reduced across ranks."""
        for router, (sum_wemb_ED, sum_w_E) in zip(self.routers(), stats, strict=True):
            router.update_keys_ema(sum_wemb_ED, sum_w_E)

    def expert_parameter_names(self) -> list[str]:
        """Names of parameters that belong to one expert (reduced per expert, not globally)."""
        return [name for name, _ in self.named_parameters() if is_expert_name(name)]


def is_expert_name(name: str) -> bool:
    """Whether a parameter or buffer name (``layers.0.experts.3.conv1.weight``) belongs to one
    expert: the one test every module that treats experts apart (reduction groups, norm
    statistics, checkpoint shards, active-parameter counts) uses."""
    return ".experts." in name


def build_model(cfg: ModelConfig) -> PCENet:
    return PCENet(cfg)


class PCEClassifier(nn.Module):
    """``PCENet`` that returns only the logits ``[B, K]``.

    MLflow's PyTorch flavour, its pyfunc wrapper and model serving expect one tensor in and
    one tensor out; ``PCEOutput`` also carries the routing, which ``pce_dist.predict``
    reads from the ``net`` inside.
    """

    def __init__(self, net: PCENet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.net(x_BCHW).logits_BK
