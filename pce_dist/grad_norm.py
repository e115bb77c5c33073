"""The true global gradient norm under expert parallelism, and clipping by it.

"Global" means the norm a single process would compute on the same global batch: every
shared gradient counted once, every expert's gradient counted once -- summed over the
expert-parallel (EP) group, whose ranks hold *different* experts, and not over the
expert-data-parallel (EDP) replicas, which hold the *same* expert.

What DeepSpeed 0.19.8 does, per ZeRO stage (read in its source, measured in
``tests/distributed/test_grad_norm.py``):

* **ZeRO-0** (``DeepSpeedEngine.clip_fp32_gradients`` -> ``runtime.utils.clip_grad_norm_``):
  each rank takes the norm of *its own* gradients (shared + the experts it hosts) and the
  ranks average those norms over the data-parallel group. That is neither the global norm
  nor the same on any other layout: on the test model the single-process norm is 4.706,
  DeepSpeed uses 3.860 with 2 ranks (``ep_size`` 2) and 3.351 with 4 ranks (``ep_size`` 4),
  so it clips 18-29 % harder than one process would. (bf16 at ZeRO-0 runs DeepSpeed's
  FP16_Optimizer wrapper instead, with a norm of its own; it reads ``.grad`` in its step,
  so the clipping below applies there too -- bf16 is not run on CPU, so not measured.)
* **ZeRO-1/2** (``DeepSpeedZeroOptimizer.scaled_global_norm``): each rank squares its
  *partition* of every group's flat gradient and the squares are summed over the whole
  data-parallel group. Partitions are disjoint -- shared groups over all ranks, expert
  groups over the EDP group, and EP ranks hold different experts -- so the sum counts
  everything once: the true global norm (then "averaged" over the EDP group, a no-op on a
  value that is already equal there). Measured equal to the single-process norm where each
  expert lives on one rank (world size == ``ep_size``). With expert replicas (world 4,
  ``ep_size`` 2) DeepSpeed 0.19.8's ZeRO-1 already mis-reduces the expert gradients of EP
  rank 0 (the norm reads 4.445 for 4.706 because the gradients are wrong), and so does
  ZeRO-2; that layout is unsupported at ZeRO-1/2 (``docs/distributed.md``).

So this module clips by the true norm on every stage, with one owner:
* ZeRO-0: DeepSpeed's clipping is switched off (``deepspeed_gradient_clipping`` gives 0)
  and ``GradClipper`` computes the norm itself at the accumulation boundary, after
  DeepSpeed has reduced the gradients and before the optimizer step: shared gradients are
  identical on every rank (counted locally), this rank's expert gradients are already
  reduced over the EDP group, and their squares are summed over the EP group in one
  all-reduce of one scalar (``DistEnv.all_reduce(..., group="ep")``). The gradients are
  then scaled by ``min(1, max_norm / (norm + 1e-6))`` -- the factor of
  ``torch.nn.utils.clip_grad_norm_`` and of DeepSpeed.
* ZeRO-1/2: the gradients live in DeepSpeed's flat partitions, reachable only through
  private attributes (``averaged_gradients``, ``_hp_mapping``; the public fragment API
  reads local gradients only at ZeRO-3, and ``safe_get_full_grad`` costs one all-reduce
  per parameter). DeepSpeed's own norm is already the global one there, so DeepSpeed
  clips (same factor) and ``GradClipper`` reads that norm back after the step.

Either way ``GradClipper.step`` returns the norm before clipping as a device tensor -- no
host sync; the trainer averages it over the log window (``metrics.TrainAccumulator``).
"""

from __future__ import annotations

from typing import Any

import torch

from .distributed.env import DistEnv

EPS = 1e-6  # in the clip factor max_norm / (norm + EPS), as torch and DeepSpeed have it


def deepspeed_gradient_clipping(max_norm: float, zero_stage: int) -> float:
    """DeepSpeed's ``gradient_clipping``: 0 at ZeRO-0, where ``GradClipper`` clips instead."""
    return 0.0 if zero_stage == 0 else max_norm


def _is_expert(param: torch.nn.Parameter) -> bool:
    """Marked by ``parallelize_experts`` the way DeepSpeed recognises expert parameters."""
    return getattr(param, "allreduce", True) is False


def _sum_of_squares(grads: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if not grads:
        return like.new_zeros(())
    return torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]).square().sum()


def global_grad_norm(params: list[torch.nn.Parameter], env: DistEnv) -> torch.Tensor:
    """The global 2-norm of the ``.grad`` of ``params`` (already reduced by DeepSpeed), float32 scalar.

    Shared gradients are equal on every rank and count once; expert gradients are summed
    over the EP group (one all-reduce of one scalar; a no-op when ``ep_size`` is 1).
    """
    shared = [p.grad for p in params if p.grad is not None and not _is_expert(p)]
    expert = [p.grad for p in params if p.grad is not None and _is_expert(p)]
    like = (shared or expert)[0]
    expert_sq = env.all_reduce(_sum_of_squares(expert, like).reshape(1), group="ep")
    return (_sum_of_squares(shared, like) + expert_sq[0]).sqrt()


def clip_grads_(params: list[torch.nn.Parameter], max_norm: float, norm: torch.Tensor) -> None:
    """Scale every ``.grad`` by ``min(1, max_norm / (norm + EPS))``, on the device."""
    coef = (max_norm / (norm + EPS)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.dtype))


class GradClipper:
    """Steps the engine, clipping by the true global norm at every accumulation boundary.

    Args:
        max_norm: ``optim.grad_clip``; 0 computes and returns the norm without clipping.
        zero_stage: ``dist.zero_stage`` (0, 1 or 2; ``config.validate`` refuses 3).
    """

    def __init__(self, max_norm: float, zero_stage: int, env: DistEnv) -> None:
        self.max_norm, self.zero_stage, self.env = max_norm, zero_stage, env
        self._checked = zero_stage == 0

    def step(self, engine: Any) -> torch.Tensor | None:
        """``engine.step()``; at the boundary also the norm before clipping (device scalar), else None."""
        if not engine.is_gradient_accumulation_boundary():
            engine.step()
            return None
        if self.zero_stage == 0:
            params = [p for p in engine.module.parameters() if p.grad is not None]
            norm = global_grad_norm(params, self.env)
            if self.max_norm > 0:
                clip_grads_(params, self.max_norm, norm)
            engine.step()
            return norm
        if not self._checked:
            self._check_zero_optimizer(engine)
            self._checked = True
        engine.step()  # DeepSpeed's ZeRO-1/2 norm is the global one: it clips by it
        norm = engine.get_global_grad_norm()
        return torch.as_tensor(norm, dtype=torch.float32, device=self.env.device)

    @staticmethod
    def _check_zero_optimizer(engine: Any) -> None:
        """The ZeRO-1/2 norm was checked for ``DeepSpeedZeroOptimizer`` only; DeepSpeed picks its
        BF16_Optimizer instead when bf16 is combined with fp32 gradient accumulation (never
        configured by ``pce_dist.engine``)."""
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        if not isinstance(engine.optimizer, DeepSpeedZeroOptimizer):
            raise RuntimeError(f"ZeRO stage {engine.zero_optimization_stage()} runs {type(engine.optimizer).__name__}, "
                               "whose gradient norm under expert parallelism is not checked; pce_dist supports "
                               "DeepSpeedZeroOptimizer at ZeRO-1/2")
