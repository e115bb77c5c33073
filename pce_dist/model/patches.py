"""Patch extraction with positional channels, and its exact inverse.

Shape legend: B batch, C channels, H/W map size, n patch side, P = (H/n)*(W/n) patches.
"""

from __future__ import annotations

import torch
from torch import nn


def _coords(num: int) -> torch.Tensor:
    """``num`` evenly spaced values in [-1, 1]; a single position sits at 0."""
    if num == 1:
        return torch.zeros(1)
    return torch.linspace(-1.0, 1.0, num)


class PatchExtractor(nn.Module):
    """``[B,C,H,W] -> [B,P,C+4,n,n]``: non-overlapping n x n patches plus 4 positional channels.

    Channels ``C, C+1`` hold the patch's absolute position in the image (row, column of the
    patch in the patch grid, constant over the patch); ``C+2, C+3`` hold each pixel's
    relative position inside the patch (row, column). All four lie in [-1, 1]. Patches are
    ordered row-major over the grid, so ``p = gy * grid_w + gx``.

    The map size is fixed at construction so the positional channels are a precomputed
    buffer rather than being rebuilt every forward.
    """

    def __init__(self, patch_size: int, height: int, width: int | None = None) -> None:
        super().__init__()
        width = height if width is None else width
        if height % patch_size or width % patch_size:
            raise ValueError(f"patch size {patch_size} does not divide the {height}x{width} map")
        self.patch_size = patch_size
        self.height, self.width = height, width
        self.grid_h, self.grid_w = height // patch_size, width // patch_size
        n = patch_size
        gy, gx = _coords(self.grid_h), _coords(self.grid_w)
        absolute_P2 = torch.stack(torch.meshgrid(gy, gx, indexing="ij"), dim=-1).reshape(-1, 2)
        py, px = torch.meshgrid(_coords(n), _coords(n), indexing="ij")
        relative_2nn = torch.stack([py, px])
        num_patches = self.grid_h * self.grid_w
        pos_P4nn = torch.cat(
            [absolute_P2[:, :, None, None].expand(num_patches, 2, n, n),
             relative_2nn.expand(num_patches, 2, n, n)], dim=1)
        self.register_buffer("pos_P4nn", pos_P4nn.contiguous(), persistent=False)

    @property
    def num_patches(self) -> int:
        return self.grid_h * self.grid_w

    def split(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """``[B,C,H,W] -> [B,P,C,n,n]`` without positional channels (inverse of ``reassemble``)."""
        B, C, H, W = x_BCHW.shape
        if (H, W) != (self.height, self.width):
            raise ValueError(f"expected a {self.height}x{self.width} map, got {H}x{W}")
        n = self.patch_size
        x = x_BCHW.reshape(B, C, self.grid_h, n, self.grid_w, n)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(B, self.num_patches, C, n, n)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        patches_BPCnn = self.split(x_BCHW)
        B = patches_BPCnn.shape[0]
        pos = self.pos_P4nn.to(dtype=patches_BPCnn.dtype).expand(B, *self.pos_P4nn.shape)
        return torch.cat([patches_BPCnn, pos], dim=2)

    def reassemble(self, patches_BPCnn: torch.Tensor) -> torch.Tensor:
        """``[B,P,C',n,n] -> [B,C',H,W]``: the exact inverse of ``split``."""
        B, P, C, n, _ = patches_BPCnn.shape
        if P != self.num_patches or n != self.patch_size:
            raise ValueError(f"expected [B,{self.num_patches},C,{self.patch_size},{self.patch_size}] patches, "
                             f"got {list(patches_BPCnn.shape)}")
        x = patches_BPCnn.reshape(B, self.grid_h, self.grid_w, C, n, n)
        return x.permute(0, 3, 1, 4, 2, 5).reshape(B, C, self.height, self.width)
