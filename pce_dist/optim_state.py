"""Optimizer state by parameter name, whatever layout DeepSpeed keeps it in.

Why: a checkpoint that stores what DeepSpeed's ZeRO-1/2 or bf16 optimizer holds as such
(flat fp32 partitions, one per rank) can only be loaded by the same world size, ``ep_size``
and ZeRO stage. Stored by parameter name -- the full fp32 master weight and every moment of
each parameter -- it loads on any layout: each rank takes what it now holds.

Three layouts, one interface (``gather`` -> ``(masters, moments)``, ``scatter``):
* ZeRO-0 in fp32: DeepSpeed steps our torch optimizer directly; its ``state[p]`` is by
  parameter already, and the model's weights are the masters.
* ZeRO-1/2 (fp32 or bf16) and bf16 at ZeRO-0: DeepSpeed's optimizer steps a torch
  optimizer over flat fp32 partitions; each model parameter maps onto a fragment of one
  rank's partition. DeepSpeed's fragment API (``deepspeed.utils.safe_get_full_fp32_param``,
  ``safe_get_full_optimizer_state`` and the ``safe_set_*`` pair, checked against 0.19.8)
  assembles a full tensor (an all-reduce over the parameter's data-parallel group: the
  world for shared parameters, the expert-data-parallel group for experts) and writes this
  rank's fragment back.

``gather`` is a collective: every rank calls it, at the same point, with its own model.
Moments are per-element (Adam's ``exp_avg``/``exp_avg_sq``, SGD's ``momentum_buffer``);
scalars (Adam's ``step``) are per parameter in torch and per flat group in DeepSpeed: a
group's is written to each of its parameters, and a group built from per-parameter
counts takes the largest (the group's number of optimizer steps; a parameter that had no
gradient in some step has a smaller count at ZeRO-0, which a flat group cannot keep).
"""

from __future__ import annotations

from typing import Any

import torch

from . import compat


def _names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def _elementwise(value: Any, like: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.shape == like.shape and value.dim() > 0


def gather(model: torch.nn.Module, optimizer: Any) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """``(fp32 master weights, optimizer state)`` of every parameter the optimizer steps, by
    name, as full tensors on the host; no masters at ZeRO-0 in fp32 (the model's weights are
    they). A collective under ZeRO-1/2 and bf16 (see above)."""
    names = _names(model)
    groups = compat.flat_fp32_groups(optimizer)
    if groups is None:  # a torch optimizer over the model's own fp32 parameters: they are the masters
        masters, state = {}, {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if optimizer.state.get(p):
                    state[names[id(p)]] = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v)
                                           for k, v in optimizer.state[p].items()}
        return masters, state
    from deepspeed.utils import lazy_init_hp_params_optimizer_state, safe_get_full_fp32_param, \
        safe_get_full_optimizer_state

    base_state = compat.base_optimizer(optimizer).state
    masters, state = {}, {}
    for lp_params, flat in groups:
        flat_state = base_state.get(flat) or {}
        if flat_state:
            # DeepSpeed 0.19.8 points the parameters' fragments at the moments once, after
            # stepping its *first* group, when the others have no moments yet (their
            # fragments then hold none); point them again, as DeepSpeed itself does
            lazy_init_hp_params_optimizer_state(lp_params, flat, base_state)
        moments = sorted(k for k, v in flat_state.items() if _elementwise(v, flat))
        scalars = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v)
                   for k, v in flat_state.items() if k not in moments}
        for p in lp_params:  # the same order on every rank of p's group: DeepSpeed built both
            name = names[id(p)]
            masters[name] = safe_get_full_fp32_param(p).detach().cpu()
            if flat_state:
                state[name] = {k: safe_get_full_optimizer_state(p, k).detach().cpu() for k in moments}
                state[name].update({k: (v.clone() if torch.is_tensor(v) else v) for k, v in scalars.items()})
    return masters, state


def scatter(model: torch.nn.Module, optimizer: Any, masters: dict[str, torch.Tensor], state: dict[str, dict]) -> None:
    """Write the masters and optimizer state ``gather`` returned (from any layout) into this
    rank's optimizer. The model's own weights must already hold ``masters`` (a
    ``load_state_dict``); parameters absent from ``state`` keep a fresh state. No collective."""
    names = _names(model)
    groups = compat.flat_fp32_groups(optimizer)
    if groups is None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                name = names[id(p)]
                if name in state:
                    optimizer.state[p] = {k: (v.to(p.device) if torch.is_tensor(v) and v.dim() > 0 else v)
                                          for k, v in state[name].items()}
        return
    from deepspeed.utils import lazy_init_hp_params_optimizer_state, safe_set_full_fp32_param, \
        safe_set_full_optimizer_state

    base_state = compat.base_optimizer(optimizer).state
    for lp_params, flat in groups:
        for p in lp_params:
            name = names[id(p)]
            if name in masters:
                safe_set_full_fp32_param(p, masters[name].to(flat.device, torch.float32))
        saved = [state[names[id(p)]] for p in lp_params if names[id(p)] in state]
        if not saved:
            continue
        if not base_state.get(flat):  # nothing stepped yet: build the flat group's state
            base_state[flat] = _flat_state(saved, flat)
        # (re)point every parameter's fragment at the group's moments, as DeepSpeed does
        # lazily at its first step
        lazy_init_hp_params_optimizer_state(lp_params, flat, base_state)
        for p in lp_params:
            for key, value in state.get(names[id(p)], {}).items():
                if _elementwise(value, p):
                    safe_set_full_optimizer_state(p, value.to(flat.device, torch.float32), key)
        for key, value in _group_scalars(saved).items():
            base_state[flat][key] = value.to(flat.device) if torch.is_tensor(value) else value


def _flat_state(saved: list[dict], flat: torch.Tensor) -> dict:
    """Zeros for every per-element key of the saved states, shaped like the flat partition."""
    keys = {k for s in saved for k, v in s.items() if torch.is_tensor(v) and v.dim() > 0}
    state = {k: torch.zeros_like(flat) for k in sorted(keys)}
    state.update(_group_scalars(saved))
    return state


def _group_scalars(saved: list[dict]) -> dict:
    """One value per scalar key for a flat group: the largest over its parameters."""
    out: dict = {}
    for s in saved:
        for k, v in s.items():
            if torch.is_tensor(v) and v.dim() > 0:
                continue
            if k not in out or float(v) > float(out[k]):
                out[k] = v.clone() if torch.is_tensor(v) else v
    return out
