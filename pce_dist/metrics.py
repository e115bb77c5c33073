"""Every metric name pce_dist logs, and the typed sums the values come from.

This is the one module that spells a metric name. The trainer, the standalone evaluator,
``compare``/``runs`` and the docs take names from here; nothing parses a name back. A
reader that wants a series (the usage plot) looks it up under the name built here
(``usage_over_time``), and gets arrays.

Schema. ``<p>`` is the phase prefix: ``train`` for training, ``eval`` for
``data.eval_split``, the split's own name for any other split (``val``); see ``eval_prefix``.

    train/loss, train/ce, train/confidence, train/collapse   mean per micro-batch of the log interval
    train/accuracy, train/lr, train/epoch, train/phase
    train/grad_norm                                          mean per optimizer step of the log interval:
                                                             the global norm before clipping (pce_dist.grad_norm)
    <p>/loss, <p>/accuracy, <p>/samples                      one evaluation of a split
    router/<p>/layer<l>/usage/expert<e>                      fraction of layer l's patches that selected e
    router/<p>/layer<l>/entropy                              mean routing entropy per patch    (evaluations)
    router/<p>/layer<l>/threshold                            mean adaptive threshold            (evaluations)
    router/<p>/layer<l>/experts_per_patch                    mean number of selected experts    (evaluations)
    router/<p>/layer<l>/collapse                             experts with usage < collapse_usage (evaluations)
    router/<p>/layer<l>/max_share, .../usage_entropy         the chosen (top-weight) expert's load: largest
                                                             share, entropy of the shares / log E (evaluations)
    router/<p>/layer<l>/nmi_class, .../nmi_position          NMI of the chosen expert with the class and with
                                                             the patch position: content vs place (evaluations)
    perf/img_per_s, perf/step_time_s
    comm/routed_bytes_per_step, comm/dispatch_bytes_per_step, comm/return_bytes_per_step
    dispatch/expert_patches_per_step                         patches the experts of one rank compute per
                                                             optimizer step, mean over ranks, all layers
    dispatch/rank_imbalance                                  sum over layers of the busiest rank's expert
                                                             patches / sum of the mean: the factor by which
                                                             the step waits on the slowest rank (1 = balanced)
    dispatch/layer<l>/rank_imbalance                         the same for one layer: max / mean over ranks
    dispatch/layer<l>/dropped_fraction                       selected pairs capacity dispatch dropped
    keyinit/seconds_total, keyinit/layer<l>/objective, keyinit/layer<l>/kmeans_seconds,
    keyinit/layer<l>/mean_nearest_cos                        the k-means sample's mean cosine to its nearest key
    data/<count>                                             samples_skipped, samples_padded, shards_failed, ...
    cost/total_params, cost/active_params, cost/fwd_mflop_per_img, cost/experts_per_patch/layer<l>
                                                             (``python -m pce_dist.evaluate`` only)
    system/node<k>/<name>                                    MLflow's own system metrics, one series per
                                                             node (cpu_utilization_percentage, gpu_0_...);
                                                             named by MLflow, step = sample index

Why the router family carries the phase: training and every evaluated split are separate
series of the same quantities, laid out alike. Before, training logged
``router/usage/layer<l>/expert<e>``, evaluations ``router/eval_usage/layer<l>/expert<e>``
and ``router/layer<l>/<stat>`` -- and the val and test evaluations wrote the same
``router/layer<l>/entropy``. ``router/`` stays the first segment (not ``train/router/...``)
because MLflow groups charts by it: the routing diagnostics stay one group, the layer next
so one layer's statistics sit together.

Why this module imports neither torch nor numpy at import time: ``compare`` and ``runs``
read names from here and should not pay for torch; the accumulators import it where they
make tensors (callers have imported it already, so that is a dictionary look-up).

Accumulators: each keeps its running sums in *one* device tensor, so the hot path is one
add per micro-batch and a log interval or an evaluation is one all-reduce and one
``.tolist()``. Named fields (``add(loss=..., ...)``, ``TrainInterval.accuracy``) replace
positions; the layout of the flat tensor is written down once, here.

Shape legend: L PCE layers, E experts, K classes, N routed patches, B images.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

AllReduce = Callable[["torch.Tensor"], "torch.Tensor"]  # sums in place over the ranks, returns its argument

# ----------------------------------------------------------------------------- names

TRAIN = "train"  # the phase prefix of training
EVAL = "eval"  # the phase prefix of data.eval_split


def eval_prefix(split: str, eval_split: str) -> str:
    """The phase prefix of an evaluated ``split``: ``eval`` for ``data.eval_split``, else the split's name."""
    return EVAL if split == eval_split else split


def split_metric(prefix: str, stat: str) -> str:
    """``<prefix>/<stat>``: ``split_metric("val", "accuracy") == "val/accuracy"``."""
    return f"{prefix}/{stat}"


TRAIN_LOSS = split_metric(TRAIN, "loss")
TRAIN_CE = split_metric(TRAIN, "ce")
TRAIN_CONFIDENCE = split_metric(TRAIN, "confidence")
TRAIN_COLLAPSE = split_metric(TRAIN, "collapse")
TRAIN_ACCURACY = split_metric(TRAIN, "accuracy")
TRAIN_LR = split_metric(TRAIN, "lr")
TRAIN_EPOCH = split_metric(TRAIN, "epoch")
TRAIN_PHASE = split_metric(TRAIN, "phase")  # 1: keys moved by the EMA, 2: keys trained
TRAIN_GRAD_NORM = split_metric(TRAIN, "grad_norm")  # global, before clipping; mean per optimizer step

EVAL_LOSS = split_metric(EVAL, "loss")
EVAL_ACCURACY = split_metric(EVAL, "accuracy")
VAL_ACCURACY = split_metric("val", "accuracy")  # the validation split as configs/ name it

PERF_IMG_PER_S = "perf/img_per_s"  # over all ranks, evaluation and checkpoint time excluded
PERF_STEP_TIME_S = "perf/step_time_s"  # per optimizer step

COMM_ROUTED_BYTES = "comm/routed_bytes_per_step"
COMM_DISPATCH_BYTES = "comm/dispatch_bytes_per_step"
COMM_RETURN_BYTES = "comm/return_bytes_per_step"

DISPATCH_EXPERT_PATCHES = "dispatch/expert_patches_per_step"
DISPATCH_RANK_IMBALANCE = "dispatch/rank_imbalance"
DISPATCH_LAYER_STATS = ("rank_imbalance", "dropped_fraction")


def dispatch_layer(layer: int, stat: str) -> str:
    """``dispatch/layer<l>/<stat>`` for a ``stat`` of ``DISPATCH_LAYER_STATS``."""
    if stat not in DISPATCH_LAYER_STATS:
        raise ValueError(f"unknown dispatch statistic {stat!r}; one of {DISPATCH_LAYER_STATS}")
    return f"dispatch/layer{layer}/{stat}"


def dispatch_metrics(rows_RL: Sequence[Sequence[float]], pairs_L: Sequence[float], dropped_L: Sequence[float],
                     steps: int) -> dict[str, float]:
    """Expert work per rank and drops of one log interval.

    Args:
        rows_RL: patches rank r's experts computed in layer l over the interval (every rank's row).
        pairs_L, dropped_L: selected and dropped (patch, expert) pairs per layer, summed over ranks.
        steps: optimizer steps in the interval.

    Why the whole-step imbalance sums the per-layer maxima: every layer's all-to-all waits for
    the slowest rank of that layer, so the step costs the sum of the layers' slowest ranks.
    """
    if not rows_RL or not rows_RL[0]:
        return {}
    num_ranks, num_layers = len(rows_RL), len(rows_RL[0])
    mean_L = [sum(r[layer] for r in rows_RL) / num_ranks for layer in range(num_layers)]
    max_L = [max(r[layer] for r in rows_RL) for layer in range(num_layers)]
    out = {DISPATCH_EXPERT_PATCHES: sum(mean_L) / max(1, steps),
           DISPATCH_RANK_IMBALANCE: sum(max_L) / sum(mean_L) if sum(mean_L) else 1.0}
    for layer in range(num_layers):
        out[dispatch_layer(layer, "rank_imbalance")] = max_L[layer] / mean_L[layer] if mean_L[layer] else 1.0
        out[dispatch_layer(layer, "dropped_fraction")] = dropped_L[layer] / pairs_L[layer] if pairs_L[layer] else 0.0
    return out


KEYINIT_SECONDS_TOTAL = "keyinit/seconds_total"

SYSTEM_PREFIX = "system/"  # MLflow's system metrics: measurements of the machine, not of training


def system_node(node_rank: int) -> str:
    """The node id in ``system/<node id>/...`` (``pce_dist.tracking.system``)."""
    return f"node{node_rank}"

COST_TOTAL_PARAMS = "cost/total_params"
COST_ACTIVE_PARAMS = "cost/active_params"
COST_FWD_MFLOP_PER_IMG = "cost/fwd_mflop_per_img"

# per layer, at evaluations; the last four read the top-weight ("chosen") expert of each patch:
# max_share (largest fraction of patches one expert gets), usage_entropy (entropy of those shares
# / log E: 1 = uniform), nmi_class and nmi_position (normalised mutual information of the chosen
# expert with the image's class and with the patch's position: content versus place)
ROUTER_STATS = ("entropy", "threshold", "experts_per_patch", "collapse", "max_share", "usage_entropy",
                "nmi_class", "nmi_position")
SPECIALISATION_STATS = ROUTER_STATS[4:]


_COMPARED_SPECIALISATION = ("max_share", "nmi_class", "nmi_position")  # the columns ``compare`` adds


def is_compared_specialisation(key: str) -> bool:
    """``router/eval/layer<l>/{max_share,nmi_class,nmi_position}``: ``compare`` shows these of every layer."""
    parts = key.split("/")
    return (len(parts) == 4 and parts[0] == "router" and parts[1] == EVAL and parts[2].startswith("layer")
            and parts[3] in _COMPARED_SPECIALISATION)


def specialisation_caption(metrics: dict[str, float], prefix: str, layer: int) -> str:
    """``"max share 0.31\\nNMI class 0.22 / pos 0.04"`` for a layer, from evaluation metrics;
    "" when they are missing. The routing figure's panel titles: place versus content at a glance."""
    keys = [router_stat(prefix, layer, s) for s in _COMPARED_SPECIALISATION]
    if not all(k in metrics for k in keys):
        return ""
    share, cls, pos = (metrics[k] for k in keys)
    return f"max share {share:.2f}\nNMI class {cls:.2f} / pos {pos:.2f}"


def router_usage(prefix: str, layer: int, expert: int) -> str:
    """``router/<prefix>/layer<l>/usage/expert<e>``: fraction of the layer's patches that selected the expert."""
    return f"router/{prefix}/layer{layer}/usage/expert{expert}"


def router_stat(prefix: str, layer: int, stat: str) -> str:
    """``router/<prefix>/layer<l>/<stat>`` for a ``stat`` of ``ROUTER_STATS``."""
    if stat not in ROUTER_STATS:
        raise ValueError(f"unknown router statistic {stat!r}; one of {ROUTER_STATS}")
    return f"router/{prefix}/layer{layer}/{stat}"


def keyinit_nearest_cos(layer: int) -> str:
    """Mean cosine of the k-means sample to its nearest initial key: ~1 means every patch looks alike."""
    return f"keyinit/layer{layer}/mean_nearest_cos"


def keyinit_objective(layer: int) -> str:
    return f"keyinit/layer{layer}/objective"


def keyinit_kmeans_seconds(layer: int) -> str:
    return f"keyinit/layer{layer}/kmeans_seconds"


def data_metric(count: str) -> str:
    """``data/<count>``: a data-pipeline counter summed over the ranks (``samples_skipped``, ...)."""
    return f"data/{count}"


def cost_experts_per_patch(layer: int) -> str:
    return f"cost/experts_per_patch/layer{layer}"


# Headline metrics: ``compare`` reads their whole history to find the best value.
SUMMARY_METRICS = (EVAL_ACCURACY, EVAL_LOSS, VAL_ACCURACY, PERF_IMG_PER_S)

_HIGHER_IS_BETTER = ("accuracy", "acc", "top1", "top5", "f1", "precision", "recall", "img_per_s", "samples_per_s",
                     "throughput")
_LOWER_IS_BETTER = ("loss", "ce", "error", "err", "step_time_s", "seconds")


def metric_goal(key: str) -> str | None:
    """``"max"`` for accuracy-like names, ``"min"`` for loss-like ones, ``None`` when "best" has no meaning.

    Decided by the last path component (``eval/accuracy`` -> ``accuracy``), so every split
    and prefix follows the same rule -- also for names logged by someone else.
    """
    name = key.rsplit("/", 1)[-1].lower()
    if name in _HIGHER_IS_BETTER:
        return "max"
    if name in _LOWER_IS_BETTER:
        return "min"
    return None


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainInterval:
    """One log interval, reduced over the ranks: means and totals with names."""

    loss: float  # mean per micro-batch
    ce: float
    confidence: float
    collapse: float
    accuracy: float  # correct / samples
    samples: float  # over all ranks
    micro_steps: int  # on one rank (every rank runs the same number)
    elapsed_s: float
    usage_LE: list[list[float]]  # fraction of patches that selected each expert, mean per micro-batch
    grad_norm: float | None = None  # mean per optimizer step; None when no step was counted


@dataclass
class TrainAccumulator:
    """Running sums of one training log interval, in one device tensor.

    Layout of ``sums``: ``[loss, ce, confidence, collapse, correct, usage_LE...]``
    (``usage_LE`` row-major). The number of samples is known on the host (the batch size),
    so it is counted there and appended only when reducing: the hot path copies nothing
    from host to device. The global gradient norm is the same on every rank: its sum over
    the optimizer steps stays out of the all-reduce and joins the one host copy.
    """

    sums: torch.Tensor  # [len(_SUMS) + L*E] float32
    num_layers: int
    num_experts: int
    micro_steps: int = 0  # on this rank
    samples: int = 0  # on this rank
    start_s: float = field(default_factory=time.perf_counter)
    grad_norm_sum: torch.Tensor | None = None  # [1] sum over this interval's optimizer steps
    optimizer_steps: int = 0

    _SUMS = ("loss", "ce", "confidence", "collapse", "correct")

    @classmethod
    def zeros(cls, num_layers: int, num_experts: int, device: Any) -> TrainAccumulator:
        import torch

        return cls(torch.zeros(len(cls._SUMS) + num_layers * num_experts, device=device), num_layers, num_experts)

    def add(self, *, loss: torch.Tensor, ce: torch.Tensor, confidence: torch.Tensor, collapse: torch.Tensor,
            correct: torch.Tensor, selected_NE: Sequence[torch.Tensor], samples: int) -> None:
        """One micro-batch: scalar loss terms, the number of correct predictions, per layer the
        ``[N, E]`` selection mask (``RouteResult.selected_NE``), and the batch size. No host sync."""
        import torch

        parts = [torch.stack([loss.detach().float(), ce.detach().float(), confidence.detach().float(),
                              collapse.detach().float(), correct.detach().float()])]
        if selected_NE:
            parts.append(torch.stack([s.float().mean(0) for s in selected_NE]).flatten())
        self.sums += torch.cat(parts)
        self.micro_steps += 1
        self.samples += samples

    def state_dict(self) -> dict[str, Any]:
        """This rank's part of an unfinished log interval, as plain tensors and ints.

        Why: a checkpoint falls inside a log interval whenever ``checkpoint.every_steps`` is
        not a multiple of ``train.log_every_steps``; a resume that started the interval afresh
        would log the mean of a shorter window at the next log step than the uninterrupted
        run did. The checkpointer stores this in ``rank{r}.pt`` (loadable with
        ``weights_only=True``). ``start_s`` is left out: timing cannot be carried over a kill.
        """
        return {"sums": self.sums.detach().cpu().clone(), "micro_steps": self.micro_steps,
                "samples": self.samples, "num_layers": self.num_layers, "num_experts": self.num_experts,
                "grad_norm_sum": None if self.grad_norm_sum is None else self.grad_norm_sum.detach().cpu().clone(),
                "optimizer_steps": self.optimizer_steps}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], device: Any) -> TrainAccumulator:
        """The interval ``state_dict`` described, continued on ``device`` (same sums, bit for bit).

        Raises ``ValueError`` when the stored layout is not a ``[5 + L*E]`` vector of its own
        ``num_layers``/``num_experts`` (the caller checks those against the model).
        """
        L, E = int(state["num_layers"]), int(state["num_experts"])
        sums = state["sums"]
        if tuple(sums.shape) != (len(cls._SUMS) + L * E,):
            raise ValueError(f"stored log interval has {tuple(sums.shape)} sums, expected {len(cls._SUMS) + L * E}")
        norm = state.get("grad_norm_sum")
        return cls(sums.to(device=device, dtype=sums.dtype).clone(), L, E, micro_steps=int(state["micro_steps"]),
                   samples=int(state["samples"]), grad_norm_sum=None if norm is None else norm.to(device).clone(),
                   optimizer_steps=int(state.get("optimizer_steps", 0)))

    def add_grad_norm(self, norm: torch.Tensor) -> None:
        """One optimizer step's global gradient norm (a device scalar, equal on every rank). No host sync."""
        norm = norm.detach().float().reshape(1)
        self.grad_norm_sum = norm.clone() if self.grad_norm_sum is None else self.grad_norm_sum + norm
        self.optimizer_steps += 1

    def reduce(self, all_reduce: AllReduce, world_size: int) -> TrainInterval:
        """One all-reduce and one host sync; every rank gets the same interval."""
        import torch

        samples = self.sums.new_full((1,), float(self.samples))  # a fill, no host->device copy
        reduced = all_reduce(torch.cat([self.sums, samples]))
        grad_norm = None
        if self.grad_norm_sum is not None:
            *values, norm_sum = torch.cat([reduced, self.grad_norm_sum.to(reduced.device)]).tolist()
            grad_norm = norm_sum / self.optimizer_steps
        else:
            values = reduced.tolist()
        sums = dict(zip(self._SUMS, values))
        sums["samples"] = values[-1]
        micro_all = max(1, self.micro_steps * world_size)
        usage = [u / micro_all for u in values[len(self._SUMS):-1]]
        E = self.num_experts
        return TrainInterval(
            loss=sums["loss"] / micro_all, ce=sums["ce"] / micro_all, confidence=sums["confidence"] / micro_all,
            collapse=sums["collapse"] / micro_all, accuracy=sums["correct"] / max(1.0, sums["samples"]),
            samples=sums["samples"], micro_steps=self.micro_steps, elapsed_s=time.perf_counter() - self.start_s,
            usage_LE=[usage[layer * E:(layer + 1) * E] for layer in range(self.num_layers)], grad_norm=grad_norm)


def train_metrics(interval: TrainInterval, *, lr: float, epoch: int, phase: int, grad_accum: int,
                  traffic: Mapping[str, int]) -> dict[str, float]:
    """The named metrics of one log interval.

    Args:
        traffic: all-to-all bytes of this rank over the interval (``traffic_stats``:
            ``routed_bytes``, ``dispatch_bytes``, ``return_bytes``); ``comm/*`` is logged
            only when patches were exchanged.
    """
    out = {
        TRAIN_LOSS: interval.loss, TRAIN_CE: interval.ce, TRAIN_CONFIDENCE: interval.confidence,
        TRAIN_COLLAPSE: interval.collapse, TRAIN_ACCURACY: interval.accuracy, TRAIN_LR: lr,
        TRAIN_EPOCH: epoch, TRAIN_PHASE: phase,
        PERF_IMG_PER_S: interval.samples / max(interval.elapsed_s, 1e-9),
        PERF_STEP_TIME_S: interval.elapsed_s / max(1, interval.micro_steps) * grad_accum,
    }
    if interval.grad_norm is not None:
        out[TRAIN_GRAD_NORM] = interval.grad_norm
    steps = max(1, interval.micro_steps // grad_accum)
    if traffic["routed_bytes"]:
        out[COMM_ROUTED_BYTES] = traffic["routed_bytes"] / steps
        out[COMM_DISPATCH_BYTES] = traffic["dispatch_bytes"] / steps
        out[COMM_RETURN_BYTES] = traffic["return_bytes"] / steps
    out.update(usage_metrics(TRAIN, interval.usage_LE))
    return out


def usage_metrics(prefix: str, usage_LE: Sequence[Sequence[float]]) -> dict[str, float]:
    return {router_usage(prefix, layer, e): u for layer, row in enumerate(usage_LE) for e, u in enumerate(row)}


def usage_over_time(rows: Sequence[Mapping[str, Any]], num_layers: int, num_experts: int,
                    prefix: str = TRAIN) -> tuple[np.ndarray, np.ndarray]:
    """``(steps_T, usage_TLE)`` from logged rows (``Trainer.history``: ``{"step": s, name: value}``).

    Rows without this prefix's usage (or without ``step``) are skipped; with none, ``T == 0``.
    """
    import numpy as np

    names = [[router_usage(prefix, layer, e) for e in range(num_experts)] for layer in range(num_layers)]
    kept = [row for row in rows if "step" in row and all(n in row for layer in names for n in layer)]
    steps_T = np.array([float(row["step"]) for row in kept])
    usage_TLE = np.array([[[float(row[n]) for n in layer] for layer in names] for row in kept],
                         dtype=np.float64).reshape(len(kept), num_layers, num_experts)
    return steps_T, usage_TLE


def keyinit_metrics(seconds: float, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Key initialisation: the total time and, per k-means layer, its objective and time."""
    out = {KEYINIT_SECONDS_TOTAL: seconds}
    for r in records:
        if "objective" in r:
            out[keyinit_objective(r["layer"])] = r["objective"]
            out[keyinit_kmeans_seconds(r["layer"])] = r["seconds"]
        if "mean_nearest_cos" in r:
            out[keyinit_nearest_cos(r["layer"])] = r["mean_nearest_cos"]
    return out


def data_metrics(counts: Mapping[str, float]) -> dict[str, float]:
    return {data_metric(k): v for k, v in counts.items()}


def cost_metrics(cost: Any) -> dict[str, float]:
    """What one image costs (``pce_dist.flops.Cost``)."""
    out = {COST_TOTAL_PARAMS: float(cost.total_params), COST_ACTIVE_PARAMS: cost.active_params,
           COST_FWD_MFLOP_PER_IMG: cost.forward_flops_per_image / 1e6}
    out.update({cost_experts_per_patch(i): k for i, k in enumerate(cost.experts_per_patch)})
    return out


# ----------------------------------------------------------------------------- evaluation


def _entropy(counts: Sequence[float]) -> float:
    total = sum(counts)
    return -sum(c / total * math.log(c / total) for c in counts if c > 0) if total > 0 else 0.0


def normalized_mutual_information(joint: Sequence[Sequence[float]]) -> float:
    """NMI of two variables from their joint counts ``joint[x][y]``: ``I(X;Y) / mean(H(X), H(Y))``.

    The arithmetic-mean normalisation of scikit-learn's ``normalized_mutual_info_score``
    (its default): 0 for independent variables, 1 when each determines the other. A
    variable that takes one value only has no information to share: 0 (not 0/0).
    """
    rows = [sum(r) for r in joint]
    cols = [sum(c) for c in zip(*joint)]
    total = sum(rows)
    if total <= 0:
        return 0.0
    h_x, h_y = _entropy(rows), _entropy(cols)
    if h_x == 0.0 or h_y == 0.0:
        return 0.0
    mi = sum(c / total * math.log(c * total / (rows[i] * cols[j]))
             for i, r in enumerate(joint) for j, c in enumerate(r) if c > 0)
    return max(0.0, mi) / ((h_x + h_y) / 2)


def specialisation(expert_class_EK: Sequence[Sequence[float]],
                   expert_position_EP: Sequence[Sequence[float]]) -> dict[str, float]:
    """``SPECIALISATION_STATS`` of one layer from its chosen-expert x class / x position counts."""
    shares = [sum(r) for r in expert_class_EK]
    total = sum(shares)
    num_experts = len(shares)
    return {
        "max_share": max(shares) / total if total > 0 else 0.0,
        "usage_entropy": _entropy(shares) / math.log(num_experts) if num_experts > 1 else 0.0,
        "nmi_class": normalized_mutual_information(expert_class_EK),
        "nmi_position": normalized_mutual_information(expert_position_EP),
    }


@dataclass
class EvalAccumulator:
    """Sums of one evaluation, in one device tensor (one all-reduce for the whole evaluation).

    Layout of ``flat``: ``[loss, correct, count]``, then per layer ``[entropy, threshold,
    items, usage_E...]`` (sums over valid patches), then the confusion counts ``[K*K]``
    (row: true class, column: predicted), then -- when ``num_patches`` gives each layer's
    patches per image -- per layer the counts of the chosen (top-weight) expert by class
    ``[E*K]`` and by patch position ``[E*P_l]``. The properties are views into ``flat``.
    """

    flat: torch.Tensor
    num_layers: int
    num_experts: int
    num_classes: int
    num_patches: tuple[int, ...] = ()  # per layer; () = no specialisation counts

    _SUMS = ("loss", "correct", "count")
    _LAYER = ("entropy", "threshold", "items")  # then usage_E

    @classmethod
    def zeros(cls, num_layers: int, num_experts: int, num_classes: int, device: Any,
              num_patches: Sequence[int] = ()) -> EvalAccumulator:
        import torch

        if num_patches and len(num_patches) != num_layers:
            raise ValueError(f"num_patches needs one entry per layer ({num_layers}), got {list(num_patches)}")
        size = (len(cls._SUMS) + num_layers * (len(cls._LAYER) + num_experts) + num_classes * num_classes
                + sum(num_experts * (num_classes + p) for p in num_patches))
        return cls(torch.zeros(size, device=device), num_layers, num_experts, num_classes, tuple(num_patches))

    def _cm_start(self) -> int:
        return len(self._SUMS) + self.num_layers * (len(self._LAYER) + self.num_experts)

    def specialisation_tables(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(expert x class [E, K], expert x position [E, P_l])`` counts of one layer."""
        E, K = self.num_experts, self.num_classes
        start = self._cm_start() + K * K + sum(E * (K + p) for p in self.num_patches[:layer])
        P = self.num_patches[layer]
        return (self.flat[start:start + E * K].view(E, K), self.flat[start + E * K:start + E * (K + P)].view(E, P))

    @property
    def sums_S(self) -> torch.Tensor:
        """``[loss, correct, count]``."""
        return self.flat[:len(self._SUMS)]

    @property
    def layers_LS(self) -> torch.Tensor:
        """``[L, 3 + E]``: ``[entropy, threshold, items, usage_E...]`` per layer."""
        start = len(self._SUMS)
        width = len(self._LAYER) + self.num_experts
        return self.flat[start:start + self.num_layers * width].view(self.num_layers, width)

    @property
    def cm_KK(self) -> torch.Tensor:
        K = self.num_classes
        return self.flat[self._cm_start():self._cm_start() + K * K].view(K, K)

    def add_batch(self, *, loss_B: torch.Tensor, pred_B: torch.Tensor, labels_B: torch.Tensor,
                  valid_B: torch.Tensor) -> None:
        """Per-sample loss and prediction; ``valid_B`` (float 0/1) masks padding samples."""
        import torch

        self.sums_S.add_(torch.stack([(loss_B * valid_B).sum(), ((pred_B == labels_B).float() * valid_B).sum(),
                                      valid_B.sum()]))
        self.cm_KK.view(-1).index_add_(0, labels_B * self.num_classes + pred_B, valid_B)

    def add_layer(self, layer: int, *, entropy_N: torch.Tensor, threshold_N: torch.Tensor,
                  selected_NE: torch.Tensor, valid_N: torch.Tensor, chosen_N: torch.Tensor | None = None,
                  labels_B: torch.Tensor | None = None) -> None:
        """One PCE layer's per-patch entropy, threshold and selection mask, masked by ``valid_N``;
        with ``num_patches``, also the chosen expert of each patch (``chosen_N``, patches in
        image-major order ``n = b * P + p``) against its image's label and its position."""
        import torch

        self.layers_LS[layer].add_(torch.cat([torch.stack([(entropy_N * valid_N).sum(),
                                                           (threshold_N.float() * valid_N).sum(), valid_N.sum()]),
                                              (selected_NE.float() * valid_N[:, None]).sum(0)]))
        if not self.num_patches:
            return
        if chosen_N is None or labels_B is None:
            raise ValueError("this accumulator counts specialisation: add_layer needs chosen_N and labels_B")
        expert_class_EK, expert_position_EP = self.specialisation_tables(layer)
        P = self.num_patches[layer]
        labels_N = labels_B.repeat_interleave(P)
        position_N = torch.arange(chosen_N.shape[0], device=chosen_N.device) % P
        expert_class_EK.view(-1).index_add_(0, chosen_N * self.num_classes + labels_N, valid_N)
        expert_position_EP.view(-1).index_add_(0, chosen_N * P + position_N, valid_N)

    def reduce(self, all_reduce: AllReduce) -> EvalAccumulator:
        """Sum over the ranks, in place; returns ``self``."""
        self.flat = all_reduce(self.flat)
        return self


def eval_metrics(acc: EvalAccumulator, *, prefix: str, collapse_usage: float, split: str = "") -> dict[str, float]:
    """The named metrics of one (reduced) evaluation.

    Raises ``ValueError`` naming ``split`` (default: ``prefix``) when no valid sample was
    counted: an accuracy over zero samples would read as a real (terrible) result.
    """
    loss, correct, count = acc.sums_S.tolist()
    if count <= 0:
        raise ValueError(f"evaluation of split {split or prefix!r} saw no valid sample (on any rank): "
                         f"nothing to report; check the split in manifest.json and the data warnings above")
    out = {split_metric(prefix, "loss"): loss / count, split_metric(prefix, "accuracy"): correct / count,
           split_metric(prefix, "samples"): count}
    for layer, (entropy, threshold, items, *usage_sums) in enumerate(acc.layers_LS.tolist()):
        items = max(items, 1.0)
        usage = [u / items for u in usage_sums]
        out[router_stat(prefix, layer, "entropy")] = entropy / items
        out[router_stat(prefix, layer, "threshold")] = threshold / items
        out[router_stat(prefix, layer, "experts_per_patch")] = sum(usage)
        out[router_stat(prefix, layer, "collapse")] = float(sum(u < collapse_usage for u in usage))
        out.update({router_usage(prefix, layer, e): u for e, u in enumerate(usage)})
        if acc.num_patches:
            tables = [t.tolist() for t in acc.specialisation_tables(layer)]
            out.update({router_stat(prefix, layer, k): v for k, v in specialisation(*tables).items()})
    return out
