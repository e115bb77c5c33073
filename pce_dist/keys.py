"""The router keys' life in training, in one place: phase switch, EMA, reduction, master sync.

Phase 1 (epoch < ``train.phase2_epoch``): keys are detached in the forward and moved by the
EMA. The statistics of every micro-batch of an optimizer step are summed locally
(``accumulate``, on the device: no host sync), then all-reduced over the data-parallel
group once per optimizer step and applied once (``after_optimizer_step``) -- so every rank
holds bit-identical keys and gradient accumulation does not double count.

Phase 2: keys are trained by the optimizer, then projected back onto the unit sphere after
every step.

Either way a key written outside the optimizer must also be written into DeepSpeed's fp32
master copy: ZeRO-1/2 and DeepSpeed's bf16 optimizer copy their master weights over the
model's parameters after every step, so a direct write (EMA, k-means init, re-normalisation)
would be undone at the next step (``sync_master``; a no-op without master copies).

With ``model.router_center`` the same all-reduce carries each layer's raw-embedding sum, and
the running mean that centring subtracts takes one EMA step (``Router.update_center``).

With ``model.bias_balance_rate > 0`` the same step also moves each router's selection bias
(auxiliary-loss-free balancing, ``Router.update_select_bias``) from the load counts of the
step's micro-batches, summed over every rank in the same all-reduce: every rank applies
the same update, so the biases stay identical without a broadcast.

Why not an optimizer-step hook (as torchtitan does for its expert bias): under ZeRO the
torch optimizer's step runs inside DeepSpeed's, before DeepSpeed copies the master weights
back, so a hook would write keys that the copy then overwrites. The trainer calls
``after_optimizer_step`` right after ``engine.step()`` at each accumulation boundary instead.
"""

from __future__ import annotations

import torch

from .distributed.env import DistEnv
from .model.net import PCENet
from .model.routing import RouteResult


class KeyUpdater:
    """Owns every change of the router keys after key init (see the module docstring)."""

    def __init__(self, model: PCENet, env: DistEnv) -> None:
        self.model, self.env = model, env
        self.phase2 = False
        self._stats: list[torch.Tensor] | None = None  # per layer: [E*D + E] sums of this window
        self.bias_rate = float(model.cfg.bias_balance_rate)
        self._load: list[torch.Tensor] | None = None  # per layer: [E] selected items of this window
        self.center = bool(model.cfg.router_center)
        self._center: list[torch.Tensor] | None = None  # per layer: [D + 1] raw-embedding sum, count

    def start_epoch(self, phase2: bool) -> None:
        """Detached (EMA) keys in phase 1, trainable keys in phase 2."""
        self.phase2 = phase2
        self.model.set_keys_trainable(phase2)
        self._stats = None

    def accumulate(self, routes: list[RouteResult]) -> None:
        """Add one micro-batch's EMA statistics (phase 1 only) and, with the selection bias, its
        load counts (both phases); device tensors, no host sync."""
        if not routes:
            return
        if self.bias_rate > 0:
            load = [r.selected_NE.float().sum(0) for r in routes]
            self._load = load if self._load is None else [a + b for a, b in zip(self._load, load)]
        if self.center:  # routes carry centred embeddings; + N * mean gives the raw sum
            sums = [torch.cat([(r.embeddings_ND.float().sum(0) + r.embeddings_ND.shape[0] * router.center_mean),
                               r.embeddings_ND.new_full((1,), float(r.embeddings_ND.shape[0]))])
                    for r, router in zip(routes, self.model.routers(), strict=True)]
            self._center = sums if self._center is None else [a + b for a, b in zip(self._center, sums)]
        if self.phase2:
            return
        stats = [torch.cat([r.sum_wemb_ED.float().flatten(), r.sum_w_E.float()]) for r in routes]
        self._stats = stats if self._stats is None else [a + s for a, s in zip(self._stats, stats)]

    def after_optimizer_step(self) -> None:
        """At an accumulation boundary: one all-reduce and one EMA step (phase 1), or the
        re-normalisation of the trained keys (phase 2); then the master copies."""
        routers = self.model.routers()
        if not routers:
            return
        # one all-reduce for everything of this step: EMA sums (phase 1), load counts, centring sums
        parts = (self._stats or []) + (self._load or []) + (self._center or [])
        flat = self.env.all_reduce(torch.cat(parts)) if parts else None
        offset = 0
        if self._stats is not None:
            per_layer = []
            for router in routers:
                E, D = router.keys.shape
                per_layer.append((flat[offset:offset + E * D].view(E, D), flat[offset + E * D:offset + E * D + E]))
                offset += E * D + E
            self.model.update_keys_ema(per_layer)
        if self._load is not None:
            for router in routers:
                E = router.num_experts
                router.update_select_bias(flat[offset:offset + E], self.bias_rate)
                offset += E
        if self._center is not None:
            for router in routers:
                D = router.embed_dim
                router.update_center(flat[offset:offset + D], flat[offset + D])
                offset += D + 1
        self._stats = self._load = self._center = None
        if self.phase2:
            self.model.normalize_keys()
        self.sync_master()

    def sync_master(self) -> None:
        """Write the keys into DeepSpeed's fp32 master copies (after any direct write)."""
        from deepspeed.utils import safe_set_full_fp32_param

        for router in self.model.routers():
            safe_set_full_fp32_param(router.keys, router.keys.detach().float())
