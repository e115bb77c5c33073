"""The seed's convolutional expert: a ResNet basic block.

    x -> Conv -> Norm -> ReLU -> Dropout -> Conv -> Norm -> (+ skip(x)) -> ReLU

The skip is a 1x1 conv + norm when channels change (always the case inside a PCE layer,
whose patches carry 4 extra positional channels).

Why the convolutions see a padded batch (``bucket_rows``): an expert's batch is the number
of patches routed to it, a different M at every step. On CPU each new input shape makes
oneDNN build (and cache, up to 1024 entries, LRU) new convolution primitives; those
long-lived allocations land between the step's short-lived activations in the glibc
heap, and with sizes that never repeat the freed holes are never reused exactly -- the
heap fragments and a rank's RSS grows epoch after epoch while the live memory stays
flat (benchmarks/memory.py; Fashion-MNIST, 2 ranks: +240/+340 MB in 19 short epochs,
all of it malloc's free-but-held memory). A dense block, whose batch never changes, does
not grow. So every convolution runs on the batch rounded up by ``padded_rows`` (zero
rows; a few dozen shapes per layer instead of hundreds), and only the real rows go on:
convolutions treat rows independently, so the result and the gradients are those of the
unpadded batch, and the norms (BatchNorm statistics depend on the batch) see only the
real rows. The price is at most 7 rows or 1/8 more rows per convolution.

Shape legend: M routed patches (this expert's batch), R = padded_rows(M), S slots of a capacity
buffer, C channels, n side.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def make_norm(kind: str, channels: int) -> nn.Module:
    """BatchNorm as the seed says, or GroupNorm, which does not depend on how many patches
    an expert happened to receive (per-expert batches are variable and can be tiny)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, 8), channels)
    raise ValueError(f"unknown norm {kind!r} (expected 'batch' or 'group')")


# Rows are rounded up to a multiple of max(_MIN_QUANTUM, 2**(floor(log2 M) - 3)): eight sizes
# per octave (< 1/8 extra rows) and multiples of 8 below 64 rows (<= 7 extra rows).
_MIN_QUANTUM = 8
_SIZES_PER_OCTAVE_LOG2 = 3


def padded_rows(num_rows: int) -> int:
    """The batch an expert's convolutions run on for ``num_rows`` real rows (>= num_rows)."""
    quantum = max(_MIN_QUANTUM, 1 << max(0, num_rows.bit_length() - 1 - _SIZES_PER_OCTAVE_LOG2))
    return -(-num_rows // quantum) * quantum


@contextlib.contextmanager
def exact_batches(module: nn.Module) -> Iterator[None]:
    """Within the block, every ``ConvExpert`` in ``module`` runs its convolutions unpadded:
    for counting the model's FLOPs (``pce_dist.flops``), which padding must not inflate."""
    experts = [m for m in module.modules() if isinstance(m, ConvExpert)]
    saved = [m.bucket_rows for m in experts]
    for m in experts:
        m.bucket_rows = False
    try:
        yield
    finally:
        for m, flag in zip(experts, saved):
            m.bucket_rows = flag


def masked_norm(norm: nn.Module, x_MCnn: torch.Tensor, valid_M: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` as if only the rows where ``valid_M`` is true were in the batch: a BatchNorm
    in training takes its statistics (and moves its running ones) over those rows alone; other
    norms, and BatchNorm in eval, treat rows independently and run unchanged.

    Why: in capacity dispatch an expert's buffer has a fixed number of slots, some of them
    empty; statistics over the empty ones would differ from the dropless path's. Static
    shapes, no host sync (an all-empty buffer keeps the running statistics as they were).
    """
    if not (isinstance(norm, nn.BatchNorm2d) and norm.training):
        return norm(x_MCnn)
    x_float = x_MCnn.float()  # statistics in fp32 under bf16 autocast, as cuDNN's BatchNorm keeps them
    w_M111 = valid_M.to(x_float.dtype)[:, None, None, None]
    count = w_M111.sum() * (x_MCnn.shape[2] * x_MCnn.shape[3])
    mean_C = (x_float * w_M111).sum((0, 2, 3)) / count.clamp_min(1)
    centred_MCnn = x_float - mean_C[None, :, None, None]
    var_C = (centred_MCnn.square() * w_M111).sum((0, 2, 3)) / count.clamp_min(1)
    y_MCnn = centred_MCnn * torch.rsqrt(var_C + norm.eps)[None, :, None, None]
    if norm.affine:
        y_MCnn = y_MCnn * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]
    if norm.track_running_stats:
        with torch.no_grad():
            m = norm.momentum if norm.momentum is not None else 0.1  # cumulative averaging is not supported
            unbiased_C = var_C * count / (count - 1).clamp_min(1)
            has_rows = count > 0
            norm.running_mean.copy_(torch.where(has_rows, (1 - m) * norm.running_mean + m * mean_C.detach(),
                                                norm.running_mean))
            norm.running_var.copy_(torch.where(has_rows, (1 - m) * norm.running_var + m * unbiased_C.detach(),
                                               norm.running_var))
            norm.num_batches_tracked.add_(has_rows.to(norm.num_batches_tracked.dtype))  # as if it had not run
    return y_MCnn.to(x_MCnn.dtype)


class ConvExpert(nn.Module):
    """``[M,C_in,n,n] -> [M,C_out,n,n]``.

    An empty batch (M == 0) runs no kernel, so an expert that receives no patch costs
    nothing; its empty result stays attached to the input's autograd graph (``+ x.sum()``
    of an empty tensor is 0), so a backward pass visits the same nodes whatever the
    routing -- collectives inside the graph (expert parallelism) stay matched across ranks.

    ``bucket_rows`` (default) runs the convolutions on ``padded_rows(M)`` rows (see the
    module docstring); a block whose batch size never changes (the dense baseline) passes
    ``False`` and skips the copies.
    """

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int = 3,
                 norm: str = "batch", dropout: float = 0.0, bucket_rows: bool = True) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.bucket_rows = bucket_rows
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

    def forward(self, x_MCnn: torch.Tensor, valid_M: torch.Tensor | None = None) -> torch.Tensor:
        """``valid_M`` (capacity dispatch): which rows are routed patches; the others are empty
        slots of a fixed-size buffer, which the norms leave out of their statistics."""
        if valid_M is not None:
            return self._forward_slots(x_MCnn, valid_M)
        M = x_MCnn.shape[0]
        if M == 0:
            return x_MCnn.new_zeros(0, self.out_channels, *x_MCnn.shape[2:]) + x_MCnn.sum()
        R = padded_rows(M) if self.bucket_rows else M

        def pad(t_MCnn: torch.Tensor) -> torch.Tensor:  # [M,C,n,n] -> [R,C,n,n], zero rows appended
            return F.pad(t_MCnn, (0, 0, 0, 0, 0, 0, 0, R - M)) if R > M else t_MCnn

        x_RCnn = pad(x_MCnn)
        # conv(...)[:M] is a contiguous view of the first M rows: no copy before the norm.
        h_MCnn = self.drop(self.act(self.norm1(self.conv1(x_RCnn)[:M])))
        h_MCnn = self.norm2(self.conv2(pad(h_MCnn))[:M])
        if isinstance(self.skip, nn.Sequential):
            conv, norm = self.skip
            skip_MCnn = norm(conv(x_RCnn)[:M])
        else:
            skip_MCnn = x_MCnn
        return self.act(h_MCnn + skip_MCnn)

    def _forward_slots(self, x_SCnn: torch.Tensor, valid_S: torch.Tensor) -> torch.Tensor:
        """The block on a fixed-size buffer: no padding (the size never changes), masked norms."""
        h_SCnn = self.drop(self.act(masked_norm(self.norm1, self.conv1(x_SCnn), valid_S)))
        h_SCnn = masked_norm(self.norm2, self.conv2(h_SCnn), valid_S)
        if isinstance(self.skip, nn.Sequential):
            conv, norm = self.skip
            skip_SCnn = masked_norm(norm, conv(x_SCnn), valid_S)
        else:
            skip_SCnn = x_SCnn
        return self.act(h_SCnn + skip_SCnn)
