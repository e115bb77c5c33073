"""Typed run configuration: dataclasses, strict YAML loading and ``key=value`` overrides.

Why a hand-rolled loader instead of Hydra/OmegaConf: the config is small, and the two
properties we care about -- unknown keys and wrong types are *errors that name the key*,
and the resolved config round-trips through YAML -- take ~150 lines with dataclasses.

Layering, lowest to highest priority:
    dataclass defaults  <  ``configs/*.yaml`` (overrides only)  <  CLI ``key=value``.

Every field carries a comment saying why its default is what it is.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


# ----------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    kind: Literal["pce", "dense"] = "pce"  # "dense": each PCE layer -> one expert block over the whole map (baseline)
    in_channels: int = 1  # must match the data manifest (1 = grayscale, 3 = RGB)
    image_size: int = 28  # input H = W; every patch size must divide the map it is applied to
    # Edge-replicated padding on each side of the input, inside the model, before the stem: lets
    # a 28x28 image give every layer several patches (28+2*2=32 -> 16 -> 8, patches 8 and 4)
    # where 28 -> 14 -> 7 leaves the last layer one 7x7 patch (docs/model.md, "Geometry").
    input_pad: int = 0
    num_classes: int = 10  # must match the data manifest; the head's output size
    stem_channels: int = 32  # a 3x3 conv stem lifts raw pixels before the first routing decision
    stem_norm: Literal["batch", "group"] = "batch"  # "group" makes every op per-sample (exact multi-rank tests)
    channels: list[int] = field(default_factory=lambda: [32, 64])  # output channels per PCE layer
    patch_sizes: list[int] = field(default_factory=lambda: [14, 7])  # progressively smaller patches (seed)
    downsample: list[bool] = field(default_factory=lambda: [False, False])  # 2x avg-pool before the layer
    num_experts: int = 4  # experts per layer (E)
    expert_kernel: int = 3  # ResNet block conv kernel
    expert_norm: Literal["batch", "group"] = "batch"  # seed says BatchNorm; "group" is robust to tiny batches
    expert_dropout: float = 0.1  # the seed's block has Dropout between the convs
    # Expert convs run on the routed batch padded to one of a few sizes (zero rows, <= 1/8 extra):
    # a new batch size every step makes oneDNN build new kernels and fragments the heap (RSS grew
    # ~15 MB/epoch). Same results up to float summation order; off for bit-level comparisons.
    expert_pad_batches: bool = True
    router_dim: int = 8  # seed: conv projection to 8 channels
    spp_levels: list[int] = field(default_factory=lambda: [1, 2, 4])  # seed: SPP pools [1,2,4] -> 8*21 = 168
    spp_pool: Literal["max", "avg"] = "max"  # SPP-net uses max pooling
    temperature: float = 0.1  # softmax(cos/T): cosines live in [-1,1]; T=1 would be near-uniform
    wth_max: float = 0.3  # adaptive threshold weight of (1 - max_weight)
    wth_entropy: float = 0.2  # ... of the normalised routing entropy
    wth_gap: float = 0.3  # ... of the top-1 gap (max_weight - mean of the others)
    mask_sharpness: float = 50.0  # soft mask = sigmoid(sharpness * (w - threshold))
    key_ema_alpha: float = 0.99  # seed's EMA factor for phase-1 key updates
    head_spp_levels: list[int] = field(default_factory=lambda: [1, 2, 4])  # seed: SPP + FC head
    confidence_weight: float = 0.01  # alpha in L_router = alpha*L_confidence + beta*L_collapse
    collapse_weight: float = 0.01  # beta; the seed's collapse term has zero gradient (logged anyway)
    collapse_usage: float = 0.01  # an expert used by fewer than this fraction of patches counts as collapsed
    balance_weight: float = 0.0  # differentiable Switch-style load balancing; 0 = off (seed has none)
    # How selected experts' outputs are combined (docs/model.md, "Gate"): "renormalized" (the seed's
    # filtered weights sum to 1 per patch, so a patch with one expert sends the router no task-loss
    # gradient) or "probs" (the masked probabilities themselves, as Switch/GShard gates: every routed
    # patch's loss reaches the router and, in phase 2, the keys).
    gate: Literal["renormalized", "probs"] = "renormalized"
    # Centre and scale the SPP embeddings (BatchNorm without affine, running statistics in eval)
    # before the cosine: the raw embeddings share a large common component, so every patch is
    # almost equally close to every key (nearest-key cosine ~0.99) and routing cannot see content.
    router_center: bool = False
    # The router sees the patch's 4 positional channels (the seed feeds the extractor's output to
    # router and experts alike). False: the router sees the content channels only, so routing can
    # follow position only through content; the experts still receive the positional channels.
    router_position: bool = True
    # Auxiliary-loss-free balancing: a per-expert bias added to the selection scores only (the
    # weights stay those of the unbiased probabilities); after every optimizer step it moves by
    # this rate times the sign of each expert's load error, from load counts summed over all
    # ranks, so every rank holds the same bias (a buffer: checkpointed). 0 = off.
    bias_balance_rate: float = 0.0
    # How routed patches reach their experts (docs/model.md, "Dispatch"). "dropless": every
    # selected (patch, expert) pair is computed; per-expert batches vary, so each layer copies E
    # counts to the host once per forward. "capacity": every expert gets a fixed buffer of
    # ceil(capacity_factor * patches / num_experts) slots, filled top-1 pairs first; pairs past
    # it are dropped (counted, logged as dispatch/layer<l>/dropped_fraction) and add nothing to
    # their patch. Static shapes: no host sync, CUDA graphs and torch.compile(fullgraph=True)
    # work, the all-to-all uses equal splits, and no rank can get more than its buffers' worth.
    dispatch: Literal["dropless", "capacity"] = "dropless"
    # Slots per expert as a multiple of the balanced top-1 load (patches / num_experts). A patch
    # selects ~1.1-1.5 experts (router/*/experts_per_patch), so below that mean pairs are always
    # dropped; 2.0 drops nothing at the loads measured on Fashion-MNIST while bounding a rank's
    # work at 2x the balanced share. Capacity mode only.
    capacity_factor: float = 2.0


@dataclass
class DataConfig:
    root: str = "data/digits"  # dir or URL prefix of {split}-NNNNNN.tar + manifest.json; "{name}" marks where
    # the file name goes in a pipe: command, e.g. "pipe:curl -s https://host/ds/{name}"
    train_split: str = "train"  # manifest split the model trains on
    val_split: str = ""  # "" = no validation split; used for model selection, never the test split
    eval_split: str = "test"  # reported once at the end (and every evaluation without a val split)
    batch_size: int = 64  # per-rank micro-batch
    num_workers: int = 1  # loader processes per rank
    shuffle_buffer: int = 1000  # sample-level shuffle buffer inside each worker
    resampled: bool = False  # sample shards with replacement (very large data; epochs become nominal)
    samples_per_epoch: int = 0  # resampled only: nominal epoch length; 0 = the train split's size
    train_shards: str = ""  # subset of train shard names, brace pattern ("train-{000000..000009}.tar"); "" = all
    # Damaged data is an error by default: a missing, truncated or checksum-mismatching shard, or an
    # undecodable sample, stops the run naming the culprit. A tolerance > 0 skips and counts such
    # samples instead (reported on rank 0's console and in MLflow) until this fraction of an
    # epoch's planned samples is exceeded -- for huge scraped sets where a few bad files are expected.
    max_skipped_fraction: float = 0.0  # 0 = every damaged sample is an error (see above)
    # How each shard is checked against manifest.json when it is opened: "sha256" (size + digest;
    # hashing costs far less than decoding), "size" (local files: byte size only), "off".
    verify: Literal["sha256", "size", "off"] = "sha256"  # silent damage never trains (see above)
    random_crop_padding: int = 0  # pad-then-crop augmentation in pixels; 0 = off
    hflip: bool = False  # random horizontal flip; off by default (digits are not flip-invariant)
    mean: list[float] = field(default_factory=lambda: [0.5])  # per-channel normalisation
    std: list[float] = field(default_factory=lambda: [0.5])  # (x - mean) / std puts [0, 1] pixels in [-1, 1]


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"  # torch optimizers: no compiled DeepSpeed extension needed
    lr: float = 2e-3  # peak LR, reached after warmup; the schedule multiplies it (engine.lr_lambda)
    weight_decay: float = 0.05  # decoupled (AdamW); never on biases, norms or router keys
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam moments; torch's defaults
    momentum: float = 0.9  # sgd only
    warmup_steps: int = 50  # linear warmup in optimizer steps: fresh Adam moments are noisy
    schedule: Literal["cosine", "constant"] = "cosine"  # after warmup, down to min_lr_ratio * lr
    min_lr_ratio: float = 0.01  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # 0 = off


@dataclass
class TrainConfig:
    seed: int = 0  # same seed + config + world size = same losses (CPU)
    epochs: int = 10  # training length unless max_steps is set
    max_steps: int = 0  # > 0 overrides epochs as the training length
    grad_accum: int = 1  # micro-batches per optimizer step (global batch = batch_size x ranks x this)
    phase2_epoch: int = 150  # seed: keys EMA-updated before this epoch, trained after
    key_init: Literal["kmeans", "random"] = "kmeans"  # seed: keys start at k-means centroids of embeddings
    key_init_batches: int = 4  # batches per rank sampled for the k-means embedding pass
    key_init_samples: int = 20000  # cap on embeddings fed to k-means per layer
    kmeans_iters: int = 25  # Lloyd iterations; the objective has settled by then on these embeddings
    # FAISS trains on a random subsample of this many points per centroid (its own default,
    # 256) and then assigns every sample; 0 = train on every sample. On 100k x 168, k=16 the
    # subsample is ~20x faster at an objective within ~1% (benchmarks/kmeans.py).
    kmeans_max_points_per_centroid: int = 256
    eval_every_epochs: int = 1  # evaluations (with plots) cost a pass over the val/eval split
    log_every_steps: int = 10  # host syncs for logging happen only at this interval


@dataclass
class DistConfig:
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    ep_size: int = 1  # expert-parallel degree; experts of a layer are split over ep_size ranks
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0/1/2 (3 is unsupported with expert parallelism)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    timeout_s: float = 300.0  # every collective fails after this long instead of hanging
    # Each rank's heartbeat file (<output_dir>/logs/heartbeat/) is rewritten this often; a rank
    # whose file goes stale is named as the culprit when a collective times out.
    heartbeat_s: float = 5.0  # seconds; must stay below timeout_s


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0 = only at epoch ends and on request
    keep_last: int = 3  # older complete checkpoints are pruned; > 1 so a damaged newest one has a fallback
    resume: str = ""  # "" = resume from <output_dir>/checkpoints/latest when present
    # Warm start: a checkpoint dir, a run's checkpoints/ dir or a run dir whose weights start a
    # *new* run (new MLflow run, step 0, this config's schedule). Separate from ``resume``
    # because continuing a run and branching off one differ in everything but the weights.
    # Ignored once this run has checkpoints of its own (a preempted warm start resumes itself).
    init_from: str = ""
    # Also take the optimizer moments (Adam m, v, step) with the weights: False by default
    # because a fine-tune usually wants a fresh optimizer for its new LR schedule.
    init_optimizer: bool = False
    # Write in a background thread: the step boundary only copies the state to host memory
    # (training goes on while the files are written); at most one save in flight, a failed
    # one is raised at the next save or at the end of training. False: write inline.
    async_save: bool = True


@dataclass
class TrackingConfig:
    tracking_uri: str = ""  # "" = sqlite:///<output_dir>/mlflow.db (no server needed); env MLFLOW_TRACKING_URI wins
    experiment: str = "pce_dist"  # MLflow experiment: the unit `python -m pce_dist.compare` ranks runs in
    run_name: str = ""  # "" = MLflow picks a name; the run id, not the name, is what resume uses
    # MLflow's own system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py), sampled by one
    # process per node (its lowest rank) as system/node<k>/...: a slow node or a leak on one host shows.
    system_metrics: bool = True
    system_metrics_interval_s: float = 10.0  # seconds between samples (each sample is one request per node)
    # Which nodes sample: "auto" = every node with a tracking server, node 0 only with a file store
    # (several hosts writing one SQLite file on a shared filesystem is unsafe); "all"; "main" = node 0.
    system_metrics_nodes: Literal["auto", "all", "main"] = "auto"
    # At the end of a finished run rank 0 exports the model and logs it in MLflow's PyTorch flavour
    # (artifact "model": signature, input example, the safetensors export beside it).
    log_model: bool = True
    register_as: str = ""  # "" = not registered; else the model registry name of a new version


@dataclass
class RunConfig:
    """The whole run: one section per concern, each a typed dataclass (strict YAML + key=value)."""

    output_dir: str = "runs/default"  # run directory: config.yaml, checkpoints, logs, plots, local MLflow store
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# ----------------------------------------------------------------------------- loading


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"config key '{key}': {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported annotation for '{key}'")  # invariant: not used in sections
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for '{key}'")


def _merge(obj: Any, updates: dict, prefix: str = "") -> None:
    """Apply a nested dict onto a dataclass instance in place, strictly."""
    if not isinstance(updates, dict):
        raise ValueError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ValueError(f"unknown config key '{key}' (known: {sorted(names)})")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _merge(current, value, prefix=f"{key}.")
        else:
            setattr(obj, name, _coerce(value, hints[name], key))


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ValueError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ValueError(f"config key '{key}': cannot parse value {raw!r}: {exc}") from None
    if value is None:
        value = ""
    return key.split("."), value


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``key=value`` strings (values parsed as YAML: ``[32,64]``, ``true``, ``1e-3``)."""
    for item in overrides:
        path, value = _parse_override(item)
        nested: Any = value
        for part in reversed(path):
            nested = {part: nested}
        _merge(cfg, nested)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the YAML file (overrides only), then CLI overrides; validated."""
    cfg = RunConfig()
    if path:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
        try:
            _merge(cfg, loaded)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    apply_overrides(cfg, list(overrides or []))
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> RunConfig:
    """Rebuild a config from ``to_dict`` output (e.g. the YAML saved next to a run)."""
    cfg = RunConfig()
    _merge(cfg, data)
    validate(cfg)
    return cfg


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML, for saving next to a run and logging as an artifact.

    Secrets (a password in a URI, a token in a URL) are masked (``pce_dist.redact``): this
    text is written to files and MLflow; the live values stay in ``cfg``.
    """
    from .redact import redact_obj

    return yaml.safe_dump(redact_obj(to_dict(cfg)), sort_keys=False)


def flatten(cfg: RunConfig) -> dict[str, Any]:
    """``{'model.num_experts': 4, ...}`` -- MLflow params and run comparison."""
    return flatten_dict(to_dict(cfg))


def flatten_dict(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> dotted keys (``flatten`` for a config dict that is not a ``RunConfig``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ----------------------------------------------------------------------------- validation


def _require(cond: bool, key: str, value: Any, why: str) -> None:
    if not cond:
        raise ValueError(f"config key '{key}' = {value!r}: {why}")


def check_expert_layout(ep_size: int, *, world_size: int | None = None, num_experts: int | None = None) -> None:
    """The one check of how experts are laid out on ranks: ``dist.ep_size`` must divide the
    world size (every expert-parallel group needs exactly ep_size ranks) and the number of
    experts (every rank hosts as many). Called by ``validate`` (no world yet),
    ``validate_world`` (the launchers and every rank) and ``DistEnv``."""
    _require(ep_size >= 1, "dist.ep_size", ep_size, "must be >= 1")
    if num_experts is not None:
        _require(num_experts >= 1, "model.num_experts", num_experts, "must be >= 1")
        _require(num_experts % ep_size == 0, "dist.ep_size", ep_size, f"must divide model.num_experts={num_experts}")
    if world_size is not None:
        _require(world_size >= 1, "world size", world_size, "must be >= 1")
        _require(world_size % ep_size == 0, "dist.ep_size", ep_size,
                 f"must divide the world size {world_size} (every expert-parallel group needs exactly "
                 f"ep_size ranks)")


def feature_map_sizes(m: ModelConfig) -> list[int]:
    """Spatial size of the map each PCE layer sees (after its optional downsample)."""
    sizes, size = [], m.image_size + 2 * m.input_pad
    for down in m.downsample:
        if down:
            size //= 2
        sizes.append(size)
    return sizes


def validate(cfg: RunConfig) -> None:
    """Impossible values raise ``ValueError`` naming the key and the value."""
    m = cfg.model
    _require(m.in_channels >= 1, "model.in_channels", m.in_channels, "must be >= 1")
    _require(m.image_size >= 2, "model.image_size", m.image_size, "must be >= 2")
    _require(m.num_classes >= 2, "model.num_classes", m.num_classes, "must be >= 2")
    _require(m.num_experts >= 1, "model.num_experts", m.num_experts, "must be >= 1")
    _require(m.stem_channels >= 1, "model.stem_channels", m.stem_channels, "must be >= 1")
    _require(len(m.channels) >= 1, "model.channels", m.channels, "needs at least one PCE layer")
    for key in ("patch_sizes", "downsample"):
        _require(len(getattr(m, key)) == len(m.channels), f"model.{key}", getattr(m, key),
                 f"needs one entry per layer ({len(m.channels)}, like model.channels)")
    for i, c in enumerate(m.channels):
        _require(c >= 1, f"model.channels[{i}]", c, "must be >= 1")
    _require(m.input_pad >= 0, "model.input_pad", m.input_pad, "must be >= 0")
    size = m.image_size + 2 * m.input_pad
    for i, (p, down) in enumerate(zip(m.patch_sizes, m.downsample)):
        if down:
            _require(size % 2 == 0, f"model.downsample[{i}]", down, f"feature map {size}x{size} is odd")
            size //= 2
        _require(p >= 2, f"model.patch_sizes[{i}]", p, "patches must be at least 2x2")
        _require(size % p == 0, f"model.patch_sizes[{i}]", p,
                 f"does not divide the {size}x{size} feature map of layer {i}")
    _require(m.expert_kernel % 2 == 1, "model.expert_kernel", m.expert_kernel, "must be odd")
    _require(0.0 <= m.expert_dropout < 1.0, "model.expert_dropout", m.expert_dropout, "must be in [0, 1)")
    _require(m.router_dim >= 1, "model.router_dim", m.router_dim, "must be >= 1")
    for key in ("spp_levels", "head_spp_levels"):
        levels = getattr(m, key)
        _require(len(levels) >= 1 and all(v >= 1 for v in levels), f"model.{key}", levels,
                 "needs positive pool sizes")
    _require(m.temperature > 0, "model.temperature", m.temperature, "must be > 0")
    for key in ("wth_max", "wth_entropy", "wth_gap", "confidence_weight", "collapse_weight",
                "balance_weight", "collapse_usage", "bias_balance_rate"):
        _require(getattr(m, key) >= 0, f"model.{key}", getattr(m, key), "must be >= 0")
    _require(m.mask_sharpness > 0, "model.mask_sharpness", m.mask_sharpness, "must be > 0")
    _require(0.0 <= m.key_ema_alpha <= 1.0, "model.key_ema_alpha", m.key_ema_alpha, "must be in [0, 1]")
    _require(m.capacity_factor > 0 and math.isfinite(m.capacity_factor), "model.capacity_factor",
             m.capacity_factor, "must be a positive number (slots per expert / balanced top-1 load)")

    d = cfg.data
    _require(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be >= 1")
    _require(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    _require(d.shuffle_buffer >= 0, "data.shuffle_buffer", d.shuffle_buffer, "must be >= 0")
    _require(d.random_crop_padding >= 0, "data.random_crop_padding", d.random_crop_padding, "must be >= 0")
    _require(len(d.mean) == len(d.std) == m.in_channels, "data.mean", d.mean,
             f"data.mean and data.std need model.in_channels={m.in_channels} entries")
    _require(all(s > 0 for s in d.std), "data.std", d.std, "must be > 0")
    _require(0.0 <= d.max_skipped_fraction < 1.0, "data.max_skipped_fraction", d.max_skipped_fraction,
             "must be in [0, 1) (0 = any damaged sample or shard is an error)")
    _require(d.samples_per_epoch >= 0, "data.samples_per_epoch", d.samples_per_epoch, "must be >= 0")
    _require(d.samples_per_epoch == 0 or d.resampled, "data.samples_per_epoch", d.samples_per_epoch,
             "only applies with data.resampled=true (an exact epoch is the split's size)")

    o = cfg.optim
    _require(o.lr > 0 and math.isfinite(o.lr), "optim.lr", o.lr, "must be a positive number")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", o.betas,
             "needs two values in [0, 1)")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    _require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    _require(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0")

    t = cfg.train
    _require(t.epochs >= 1 or t.max_steps >= 1, "train.epochs", t.epochs,
             "set train.epochs >= 1 or train.max_steps >= 1")
    _require(t.max_steps >= 0, "train.max_steps", t.max_steps, "must be >= 0")
    _require(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "must be >= 1")
    _require(t.phase2_epoch >= 0, "train.phase2_epoch", t.phase2_epoch, "must be >= 0")
    _require(t.key_init_batches >= 1, "train.key_init_batches", t.key_init_batches, "must be >= 1")
    _require(t.key_init_samples >= m.num_experts, "train.key_init_samples", t.key_init_samples,
             f"k-means needs at least num_experts={m.num_experts} samples")
    _require(t.kmeans_iters >= 1, "train.kmeans_iters", t.kmeans_iters, "must be >= 1")
    _require(t.kmeans_max_points_per_centroid >= 0, "train.kmeans_max_points_per_centroid",
             t.kmeans_max_points_per_centroid, "must be >= 0 (0 = every sample)")
    _require(t.eval_every_epochs >= 1, "train.eval_every_epochs", t.eval_every_epochs, "must be >= 1")
    _require(t.log_every_steps >= 1, "train.log_every_steps", t.log_every_steps, "must be >= 1")

    ds = cfg.dist
    check_expert_layout(ds.ep_size, num_experts=m.num_experts)
    _require(ds.zero_stage in (0, 1, 2), "dist.zero_stage", ds.zero_stage,
             "ZeRO-3 is not supported with expert parallelism (DeepSpeed MoE); use 0, 1 or 2")
    _require(ds.timeout_s > 0, "dist.timeout_s", ds.timeout_s, "must be > 0")
    _require(0 < ds.heartbeat_s < ds.timeout_s, "dist.heartbeat_s", ds.heartbeat_s,
             f"must be > 0 and below dist.timeout_s={ds.timeout_s}")

    tr = cfg.tracking
    _require(tr.system_metrics_interval_s > 0, "tracking.system_metrics_interval_s", tr.system_metrics_interval_s,
             "must be > 0 (tracking.system_metrics=false turns sampling off)")

    c = cfg.checkpoint
    _require(c.every_steps >= 0, "checkpoint.every_steps", c.every_steps, "must be >= 0")
    _require(c.keep_last >= 1, "checkpoint.keep_last", c.keep_last, "must be >= 1")
    _require(not (c.resume and c.init_from), "checkpoint.init_from", c.init_from,
             f"cannot be combined with checkpoint.resume={c.resume!r}: resume continues a run, init_from starts "
             "a new one from a checkpoint; set one of them")
    _require(c.init_from or not c.init_optimizer, "checkpoint.init_optimizer", c.init_optimizer,
             "needs checkpoint.init_from=PATH (the checkpoint whose optimizer state to take)")


def validate_world(cfg: RunConfig, world_size: int) -> None:
    """The checks that need the number of ranks; the launchers call it before starting any rank
    and every rank calls it again (``pce_dist.train``), so both fail with the same message."""
    check_expert_layout(cfg.dist.ep_size, world_size=world_size, num_experts=cfg.model.num_experts)
    # DeepSpeed 0.19's ZeRO-1/2 optimizer mishandles expert parameters that have replicas on
    # other ranks: ZeRO-1 and ZeRO-2 leave some unupdated and others wrong (measured,
    # tests/distributed/test_grad_norm.py keeps a strict xfail of both).
    _require(cfg.model.kind == "dense" or cfg.dist.zero_stage == 0 or world_size == cfg.dist.ep_size,
             "dist.zero_stage", cfg.dist.zero_stage,
             f"ZeRO-1/2 needs every expert on exactly one rank (dist.ep_size = world size {world_size}, now "
             f"{cfg.dist.ep_size}): DeepSpeed's partitioned optimizer gets replicated experts wrong; use "
             "dist.zero_stage=0 or dist.ep_size equal to the number of ranks")
