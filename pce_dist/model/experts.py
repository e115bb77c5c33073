"""The seed's convolutional expert: a ResNet basic block.

    x -> Conv -> Norm -> ReLU -> Dropout -> Conv -> Norm -> (+ skip(x)) -> ReLU

The skip is a 1x1 conv + norm when channels change (always the case inside a PCE layer,
whose patches carry 4 extra positional channels).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def make_norm(kind: str, channels: int) -> nn.Module:
    """BatchNorm as the seed says, or GroupNorm, which does not depend on how many patches
    an expert happened to receive (per-expert batches are variable and can be tiny)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, 8), channels)
    raise ValueError(f"unknown norm {kind!r} (expected 'batch' or 'group')")


class ConvExpert(nn.Module):
    """``[M,C_in,n,n] -> [M,C_out,n,n]``.

    An empty batch (M == 0) runs no kernel, so an expert that receives no patch costs
    nothing; its empty result stays attached to the input's autograd graph (``+ x.sum()``
    of an empty tensor is 0), so a backward pass visits the same nodes whatever the
    routing -- collectives inside the graph (expert parallelism) stay matched across ranks.
    """

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int = 3,
                 norm: str = "batch", dropout: float = 0.0) -> None:
        super().__init__()
        self.out_channels = out_channels
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size, padding=pad, bias=False)
        self.norm1 = make_norm(norm, out_channels)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size, padding=pad, bias=False)
        self.norm2 = make_norm(norm, out_channels)
        self.skip: nn.Module = nn.Identity()
        if in_channels != out_channels:
            self.skip = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                      make_norm(norm, out_channels))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x_MCnn: torch.Tensor) -> torch.Tensor:
        if x_MCnn.shape[0] == 0:
            return x_MCnn.new_zeros(0, self.out_channels, *x_MCnn.shape[2:]) + x_MCnn.sum()
        h = self.drop(self.act(self.norm1(self.conv1(x_MCnn))))
        h = self.norm2(self.conv2(h))
        return self.act(h + self.skip(x_MCnn))
