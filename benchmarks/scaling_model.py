"""A step-time model for expert-parallel PCE past this box, next to data-parallel dense.

    python benchmarks/scaling_model.py [--config configs/fashion_mnist.yaml] [--batch-per-gpu 128]
                                       [--imbalance 1.3] [--experts-per-patch 1.04] [--mfu 0.2] [--json]
    python benchmarks/scaling_model.py --measure-routing docs/results/fm_pce_seed0.safetensors

Pure functions on plain numbers: nothing here imports torch (``--measure-routing`` does, lazily).
Three parts, each usable alone:

1. **Bytes per patch from the config** (``layer_geometry``): a routed patch travels to its
   expert with ``C_in + 4`` channels (its content and the 4 positional channels) and comes
   back with ``C_out``, ``n x n`` pixels, ``dtype_bytes`` each.
2. **The all-to-all bytes of one rank** (``rank_a2a_bytes``): what the dropless dispatcher
   (``pce_dist.distributed.dispatch``) must hand to ``all_to_all_single`` for other ranks,
   from the routing counts alone -- pairs whose expert lives on another EP rank times the
   bytes of a row, plus the exchange of E int64 counts. ``benchmarks/rehearsal.py`` checks
   this against the bytes measured at the call on 8 gloo ranks.
3. **Step time** (``pce_step``, ``dense_step``, ``scaling_table``): compute + all-to-all +
   gradient all-reduce + host syncs per GPU, for a given world size, EP size and placement,
   with every assumption a named parameter below (``Cluster``, ``Workload``).

What is measured and what is assumed is spelled out in ``docs/scaling.md``. In short: the
bytes are exact (rehearsed); link speeds, latencies, achieved FLOP/s and overlap are
assumptions; the imbalance and the experts per patch are measured on this box with the
published Fashion-MNIST exports (``--measure-routing``), not at scale.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

COUNT_BYTES = 8  # the dispatcher's counts exchange sends one int64 per global expert
POSITIONAL_CHANNELS = 4  # every patch carries 4 positional channels to its expert (pce_dist.model.patches)


# ----------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class LayerGeometry:
    """One PCE layer as the dispatcher sees it (derived from the model config).

    Attributes:
        in_channels: channels of a dispatched patch: the layer's input + 4 positional ones.
        out_channels: channels of an expert's result (what the return all-to-all carries).
        patch_side: n; a patch is ``n x n`` pixels.
        patches_per_image: the layer's patch grid, ``(map / n) ** 2``.
        map_side: the feature map the layer sees (after its optional 2x downsample).
        router_channels: what the router's 3x3 projection reads (content, + position unless
            ``router_position=false``).
    """

    in_channels: int
    out_channels: int
    patch_side: int
    patches_per_image: int
    map_side: int
    router_channels: int

    def dispatch_row_bytes(self, dtype_bytes: int) -> int:
        return self.in_channels * self.patch_side ** 2 * dtype_bytes

    def return_row_bytes(self, dtype_bytes: int) -> int:
        return self.out_channels * self.patch_side ** 2 * dtype_bytes


def layer_geometry(model_cfg) -> list[LayerGeometry]:
    """The PCE layers of ``model_cfg`` (any object with ``pce_dist.config.ModelConfig``'s fields).

    Mirrors ``pce_dist.config.feature_map_sizes`` and ``PCENet.__init__``: the map is
    ``image_size + 2 * input_pad``, halved before each layer with ``downsample``; layer ``i``
    reads ``stem_channels`` (i = 0) or the previous layer's ``channels``.
    """
    side = model_cfg.image_size + 2 * model_cfg.input_pad
    c_in = model_cfg.stem_channels
    layers = []
    for c_out, n, down in zip(model_cfg.channels, model_cfg.patch_sizes, model_cfg.downsample):
        side = side // 2 if down else side
        if side % n:
            raise ValueError(f"patch size {n} does not divide the {side}x{side} map")
        router_c = c_in + POSITIONAL_CHANNELS if model_cfg.router_position else c_in
        layers.append(LayerGeometry(in_channels=c_in + POSITIONAL_CHANNELS, out_channels=c_out, patch_side=n,
                                    patches_per_image=(side // n) ** 2, map_side=side, router_channels=router_c))
        c_in = c_out
    return layers


def _block_flops(c_in: int, c_out: int, side: int, kernel: int) -> float:
    """Forward FLOPs (multiply-add = 2) of one ``ConvExpert`` on a ``side x side`` input:
    conv k x k c_in->c_out, conv k x k c_out->c_out, and the 1x1 skip conv that exists when
    the channels change (norms, ReLU not counted)."""
    skip = c_in * c_out if c_in != c_out else 0
    return 2.0 * side * side * (c_in * c_out * kernel ** 2 + c_out * c_out * kernel ** 2 + skip)


def expert_flops_per_pair(layer: LayerGeometry, kernel: int = 3) -> float:
    """Forward FLOPs one routed (patch, expert) pair costs its expert."""
    return _block_flops(layer.in_channels, layer.out_channels, layer.patch_side, kernel)


def flops_per_a2a_byte(layer: LayerGeometry, dtype_bytes: int, kernel: int = 3, backward_flops_factor: float = 3.0) -> float:
    """Expert FLOPs (forward + backward) per byte a routed pair puts on the wire (dispatch + return,
    forward + backward). The all-to-alls take as long as the expert compute when this equals
    ``achieved FLOP/s / link bytes/s``; below that, the link is the bottleneck."""
    wire = 2 * (layer.dispatch_row_bytes(dtype_bytes) + layer.return_row_bytes(dtype_bytes))
    return backward_flops_factor * expert_flops_per_pair(layer, kernel) / wire


def forward_flops_per_image(model_cfg, experts_per_patch: list[float] | float | None = None) -> dict[str, float]:
    """Forward FLOPs per image as ``torch.utils.flop_counter`` counts them (convs, matmuls).

    Returns ``{"shared": ..., "experts": ..., "pce": shared + experts, "dense": ...}``: the PCE
    network with ``experts_per_patch`` (per layer, or one figure) pairs per patch, and the
    dense baseline (each PCE layer one block over the whole map, no router).
    """
    m = model_cfg
    layers = layer_geometry(m)
    k = experts_per_patch if experts_per_patch is not None else 1.0
    ks = list(k) if isinstance(k, (list, tuple)) else [float(k)] * len(layers)
    H = m.image_size + 2 * m.input_pad
    stem = 2.0 * H * H * m.in_channels * m.stem_channels * 9
    head = 2.0 * m.channels[-1] * sum(level * level for level in m.head_spp_levels) * m.num_classes
    embed_dim = m.router_dim * sum(level * level for level in m.spp_levels)
    shared = stem + head
    experts = 0.0
    dense = stem + head
    for layer, kl in zip(layers, ks):
        out_proj = 2.0 * layer.map_side ** 2 * layer.out_channels ** 2
        router = layer.patches_per_image * (2.0 * layer.patch_side ** 2 * layer.router_channels * m.router_dim * 9
                                            + 2.0 * embed_dim * m.num_experts)
        shared += out_proj + router
        experts += layer.patches_per_image * kl * expert_flops_per_pair(layer, m.expert_kernel)
        dense += out_proj + _block_flops(layer.in_channels, layer.out_channels, layer.map_side, m.expert_kernel)
    return {"shared": shared, "experts": experts, "pce": shared + experts, "dense": dense}


def parameter_counts(model_cfg) -> dict[str, int]:
    """Parameters: PCE shared, PCE per expert summed over all experts of all layers, dense.

    Counts weights and biases of convs, norms (2 per channel), router keys and the head, as
    ``PCENet`` builds them; used only for the gradient all-reduce bytes.
    """
    m = model_cfg
    layers = layer_geometry(m)
    k = m.expert_kernel
    embed_dim = m.router_dim * sum(level * level for level in m.spp_levels)

    def block(c_in, c_out):  # conv1, norm1, conv2, norm2 (no conv biases), skip conv + norm if channels change
        skip = c_in * c_out + 2 * c_out if c_in != c_out else 0
        return c_in * c_out * k * k + 2 * c_out + c_out * c_out * k * k + 2 * c_out + skip

    stem = m.in_channels * m.stem_channels * 9 + 2 * m.stem_channels
    head = m.channels[-1] * sum(level * level for level in m.head_spp_levels) * m.num_classes + m.num_classes
    shared = dense = stem + head
    experts = 0
    for layer in layers:
        out_proj = layer.out_channels ** 2 + layer.out_channels
        router = layer.router_channels * m.router_dim * 9 + m.router_dim + m.num_experts * embed_dim
        shared += out_proj + router
        dense += out_proj + block(layer.in_channels, layer.out_channels)
        experts += m.num_experts * block(layer.in_channels, layer.out_channels)
    return {"shared": shared, "experts": experts, "dense": dense}


# ----------------------------------------------------------------------------- all-to-all bytes


def counts_exchange_bytes(num_experts: int, ep_size: int, count_bytes: int = COUNT_BYTES) -> int:
    """Bytes a rank sends to the others in the equal-split all-to-all of its E counts (its own
    ``E / ep`` stay home)."""
    return num_experts * count_bytes * (ep_size - 1) // ep_size


def rank_a2a_bytes(sent_pairs: int, received_pairs: int, layer: LayerGeometry, dtype_bytes: int,
                   num_experts: int, ep_size: int, backward: bool = True) -> dict[str, int]:
    """What one rank's dropless dispatcher hands to ``all_to_all_single`` for *other* ranks, one layer.

    Args:
        sent_pairs: routed (patch, expert) pairs of this rank whose expert lives on another EP rank.
        received_pairs: pairs the other ranks of its EP group route to the experts it hosts.
        backward: include the backward exchanges (gradients of the received patches go home,
            gradients of the results go to the hosts); the counts exchange has no backward.

    Returns the four ``pce_dist.distributed.expert_parallel.traffic_stats`` fields.
    """
    if ep_size == 1:
        return {"routed_bytes": 0, "dispatch_bytes": 0, "return_bytes": 0, "backward_bytes": 0}
    in_row, out_row = layer.dispatch_row_bytes(dtype_bytes), layer.return_row_bytes(dtype_bytes)
    return {"routed_bytes": sent_pairs * in_row,
            "dispatch_bytes": sent_pairs * in_row + counts_exchange_bytes(num_experts, ep_size),
            "return_bytes": received_pairs * out_row,
            "backward_bytes": (received_pairs * in_row + sent_pairs * out_row) if backward else 0}


# ----------------------------------------------------------------------------- the cluster


@dataclass(frozen=True)
class Cluster:
    """Links and fixed costs. Defaults: an HGX/DGX H100-class node; every figure is an assumption."""

    gpus_per_node: int = 8  # HGX H100: 8 GPUs on one NVSwitch fabric
    nvlink_bytes_per_s: float = 450e9  # NVLink 4: 900 GB/s bidirectional per GPU = 450 GB/s each way
    ib_bytes_per_s: float = 50e9  # one 400 Gb/s NDR NIC per GPU (DGX H100: 8 NICs) = 50 GB/s each way
    # Share of the link rate a collective reaches on large messages (NCCL "bus bandwidth"
    # typically 70-85 % of the link); the small messages here get less, which the latency
    # terms below stand for.
    link_efficiency: float = 0.7
    # Latency. Order of magnitude of nccl-tests' small-message times (8 x H100: ~10-20 us per
    # all-reduce or all-to-all); the split into parts is a modelling choice:
    collective_launch_s: float = 8e-6  # any collective: kernel launch, proxy handshake, completion
    nvlink_hop_s: float = 1e-6  # one step of a tree/ring between two GPUs of a node (NVSwitch)
    ib_hop_s: float = 4e-6  # one step between nodes (NIC -> switch -> NIC)
    a2a_peer_s: float = 1e-6  # all-to-all: one more send/recv pair to post and progress, per extra peer
    # A dropless layer copies its E counts to the host once per forward (cudaMemcpy + the
    # stream draining up to that point): the GPU idles this long per layer.
    host_sync_s: float = 20e-6
    # Share of the gradient all-reduce hidden behind the backward (DeepSpeed buckets reduce
    # while later layers still compute). 0 = none hidden: the conservative end, for both models.
    grad_overlap: float = 0.0


def group_layout(size: int, stride: int, gpus_per_node: int) -> tuple[int, int]:
    """``(members per node, nodes)`` of a group of ``size`` ranks ``r, r+stride, ...`` when ranks
    fill nodes in order (``pce_dist.distributed.DistEnv``: EP groups are consecutive blocks,
    stride 1; EDP groups take one rank per EP block, stride ``ep_size``)."""
    if size <= 1:
        return 1, 1
    span = (size - 1) * stride + 1  # ranks from the first member to the last
    if span <= gpus_per_node:
        return size, 1
    per_node = max(1, gpus_per_node // stride)
    return per_node, math.ceil(size / per_node)


def allreduce_s(nbytes: float, size: int, stride: int, cluster: Cluster) -> float:
    """Hierarchical all-reduce of ``nbytes`` over a group: reduce-scatter + all-gather inside the
    node over NVLink (ring: ``2 (m-1)/m`` of the bytes), the ``1/m`` shard all-reduced across
    nodes over each GPU's own NIC (``2 (q-1)/q`` of it). Latency: the launch, plus one hop per
    level of a tree (``log2 m`` NVLink hops, ``log2 q`` IB hops) -- NCCL's tree for small messages."""
    if size <= 1 or nbytes <= 0:
        return 0.0
    m, q = group_layout(size, stride, cluster.gpus_per_node)
    t = 0.0
    if m > 1:
        t += 2 * (m - 1) / m * nbytes / (cluster.nvlink_bytes_per_s * cluster.link_efficiency)
    if q > 1:
        t += 2 * (q - 1) / q * (nbytes / m) / (cluster.ib_bytes_per_s * cluster.link_efficiency)
    latency = cluster.collective_launch_s + math.log2(m) * cluster.nvlink_hop_s + math.log2(q) * cluster.ib_hop_s
    return t + latency


def all_to_all_s(nbytes_hot: float, ep_size: int, cluster: Cluster) -> float:
    """One all-to-all in an EP group of consecutive ranks, ``nbytes_hot`` being what the busiest
    rank sends or receives (links are full duplex: the larger of the two sets the time).

    Peers on the same node are reached over NVLink, the others over the GPU's NIC, at the same
    time (H100 nodes: inter-node traffic leaves through the GPU's own NIC, not over NVLink); the
    bytes are spread evenly over the peers (routing destinations assumed uniform).
    """
    if ep_size <= 1:
        return 0.0
    m, q = group_layout(ep_size, 1, cluster.gpus_per_node)
    on_node = (m - 1) / (ep_size - 1)
    t_nv = nbytes_hot * on_node / (cluster.nvlink_bytes_per_s * cluster.link_efficiency)
    t_ib = nbytes_hot * (1 - on_node) / (cluster.ib_bytes_per_s * cluster.link_efficiency)
    latency = (cluster.collective_launch_s + (cluster.nvlink_hop_s if m > 1 else 0.0)
               + (cluster.ib_hop_s if q > 1 else 0.0) + (ep_size - 1) * cluster.a2a_peer_s)
    return max(t_nv, t_ib) + latency


# ----------------------------------------------------------------------------- the workload


@dataclass(frozen=True)
class Workload:
    """What one GPU does per step. Defaults: ``configs/fashion_mnist.yaml`` on an H100 in bf16."""

    batch_per_gpu: int = 128  # the Fashion-MNIST config's per-rank micro-batch
    dtype_bytes: int = 2  # bf16 activations travel (dist.precision=auto on CUDA)
    grad_bytes: int = 4  # gradients are reduced in fp32 (DeepSpeed bf16: fp32 gradient accumulation)
    # (patch, expert) pairs per patch. Measured on the published Fashion-MNIST exports
    # (--measure-routing, test split, 2048 images): 1.04 / 1.00 (seed 0), 1.03 / 1.08 (seed 1).
    experts_per_patch: float = 1.04
    # max/mean routed rows per EP rank in a step. Measured on the same exports (global batch
    # 256, E = 4): ep 2: 1.38 / 1.19 and 1.40 / 1.16 per layer; ep 4: 1.44 / 1.26 and 1.45 / 2.03.
    # Issue 14's balancing targets <= 1.25; 1.3 is taken for every ep_size.
    imbalance: float = 1.3
    peak_flops: float = 989e12  # H100 SXM bf16 dense tensor-core peak
    # Achieved share of peak. An assumption: small convs (36-96 channels on 4x4/8x8 patches)
    # rarely reach more; benchmarks/gpu.py is where it gets measured. Same for PCE and dense.
    mfu: float = 0.2
    # PCE compute time / its FLOPs' time relative to dense (1.0 = PCE runs at dense's FLOP
    # rate). On this CPU box a step runs at 1.31-1.45x dense for 1.05x the FLOPs (issue 14).
    pce_compute_overhead: float = 1.0
    backward_flops_factor: float = 3.0  # forward + backward = 3x the forward FLOPs (2x for the backward)
    dispatch: str = "dropless"  # or "capacity": fixed buffers, equal splits, no host sync
    capacity_factor: float = 2.0  # capacity mode: slots per expert / (patches / E), the config default


@dataclass(frozen=True)
class StepTime:
    """One step of one GPU, seconds, by what it waits for."""

    compute_s: float  # on the busiest rank (imbalance included)
    a2a_s: float  # all-to-alls, forward and backward, every layer
    sync_s: float  # host syncs
    grad_s: float  # gradient all-reduce not hidden behind the backward
    ideal_s: float  # compute with perfect balance, no communication: one GPU's step at this batch

    @property
    def total_s(self) -> float:
        return self.compute_s + self.a2a_s + self.sync_s + self.grad_s

    @property
    def efficiency(self) -> float:
        return self.ideal_s / self.total_s


def pce_layer_loads(layers: list[LayerGeometry], work: Workload, num_experts: int, ep_size: int) -> list[dict]:
    """Per layer, for the mean rank of a step: rows its experts compute, and the bytes its forward
    all-to-alls send to other ranks -- ``dispatch_bytes`` (patches out), ``return_bytes`` (results
    back) and ``side_bytes``, the third, small exchange (dropless: the E counts; capacity: one
    validity byte per slot). The two big exchanges run again backward, gradients the other way,
    as many bytes; the side exchange has no backward."""
    loads = []
    remote = (ep_size - 1) / ep_size  # destinations uniform over the EP group: 1/ep stay home
    for layer in layers:
        patches = work.batch_per_gpu * layer.patches_per_image
        if work.dispatch == "capacity":  # every slot travels and is computed, full or not
            rows = num_experts * math.ceil(work.capacity_factor * patches / num_experts)
            side = rows * remote
        else:
            rows, side = patches * work.experts_per_patch, counts_exchange_bytes(num_experts, ep_size)
        loads.append({"rows": rows,
                      "dispatch_bytes": rows * remote * layer.dispatch_row_bytes(work.dtype_bytes),
                      "return_bytes": rows * remote * layer.return_row_bytes(work.dtype_bytes),
                      "side_bytes": side if ep_size > 1 else 0})
    return loads


def pce_step(model_cfg, work: Workload, cluster: Cluster, world: int, ep_size: int) -> StepTime:
    """Step time of expert-parallel PCE: ``world`` GPUs, EP groups of ``ep_size`` consecutive ranks,
    ``model_cfg.num_experts`` experts per layer."""
    E = model_cfg.num_experts
    if E % ep_size or world % ep_size:
        raise ValueError(f"ep_size {ep_size} must divide num_experts {E} and the world {world}")
    layers = layer_geometry(model_cfg)
    rate = work.peak_flops * work.mfu / work.pce_compute_overhead
    flops = forward_flops_per_image(model_cfg, work.experts_per_patch)
    shared_s = work.backward_flops_factor * flops["shared"] * work.batch_per_gpu / rate
    ideal_s = shared_s + work.backward_flops_factor * flops["experts"] * work.batch_per_gpu / rate
    # The step waits for the busiest rank: it computes `imbalance` times the mean rows, receives
    # that many patches and sends that many results back. Capacity mode: every rank computes
    # exactly its buffers (no imbalance, but the empty slots cost as much as full ones).
    # ep 1: every rank runs its own pairs through all experts -- nothing to wait for.
    hot = 1.0 if work.dispatch == "capacity" or ep_size == 1 else work.imbalance
    compute_s, a2a_s = shared_s, 0.0
    for layer, load in zip(layers, pce_layer_loads(layers, work, E, ep_size)):
        per_row_s = work.backward_flops_factor * expert_flops_per_pair(layer, model_cfg.expert_kernel) / rate
        compute_s += load["rows"] * per_row_s * hot
        if ep_size > 1:  # 5 exchanges: dispatch + return forward, the same two backward, the side one
            a2a_s += 2 * (all_to_all_s(hot * load["dispatch_bytes"], ep_size, cluster)
                          + all_to_all_s(hot * load["return_bytes"], ep_size, cluster))
            a2a_s += all_to_all_s(load["side_bytes"], ep_size, cluster)
    # dropless: one device->host copy of the counts per layer and forward, at any ep_size
    sync_s = cluster.host_sync_s * len(layers) if work.dispatch == "dropless" else 0.0
    params = parameter_counts(model_cfg)
    # shared gradients over every rank; a rank's experts over its EDP group (one rank per EP block)
    grad_s = (1 - cluster.grad_overlap) * (
        allreduce_s(params["shared"] * work.grad_bytes, world, 1, cluster)
        + allreduce_s(params["experts"] / ep_size * work.grad_bytes, world // ep_size, ep_size, cluster))
    return StepTime(compute_s=compute_s, a2a_s=a2a_s, sync_s=sync_s, grad_s=grad_s, ideal_s=ideal_s)


def dense_step(model_cfg, work: Workload, cluster: Cluster, world: int) -> StepTime:
    """Step time of the data-parallel dense baseline (every PCE layer one block over the map)."""
    rate = work.peak_flops * work.mfu
    compute_s = work.backward_flops_factor * forward_flops_per_image(model_cfg)["dense"] * work.batch_per_gpu / rate
    grad_s = (1 - cluster.grad_overlap) * allreduce_s(parameter_counts(model_cfg)["dense"] * work.grad_bytes,
                                                      world, 1, cluster)
    return StepTime(compute_s=compute_s, a2a_s=0.0, sync_s=0.0, grad_s=grad_s, ideal_s=compute_s)


# ----------------------------------------------------------------------------- the table


WORLDS = (8, 64, 512)
ACROSS_EP = 64  # the across-node variant: EP groups of up to 64 ranks (8 nodes), 64 experts per layer


def scaling_table(model_cfg, work: Workload = Workload(), cluster: Cluster = Cluster(),
                  worlds: tuple[int, ...] = WORLDS) -> list[dict]:
    """Rows for ``worlds``: dense DP; PCE data-parallel (8 experts replicated on every GPU, ep 1);
    PCE with EP inside a node (``ep = min(8, world)``, 8 experts, NVLink); PCE with EP groups across nodes (``ep = min(64, world)``, 64 experts, NVLink + IB;
    only past one node); PCE capacity mode inside a node. Each row: step time and its parts (ms), img/s per GPU, efficiency, PCE/dense."""
    rows = []
    for world in worlds:
        dense = dense_step(model_cfg, work, cluster, world)
        variants = [("dense, data-parallel", None, None, work),
                    ("PCE, data-parallel (ep 1)", 1, 8, work),
                    ("PCE, EP in node (NVLink)", min(cluster.gpus_per_node, world), 8, work),
                    ("PCE, EP across nodes (IB)", min(ACROSS_EP, world), ACROSS_EP, work),
                    ("PCE capacity, EP in node", min(cluster.gpus_per_node, world), 8, replace(work, dispatch="capacity"))]
        for name, ep, experts, w in variants:
            if "across" in name and world <= cluster.gpus_per_node:
                continue  # one node: nothing to cross, the in-node row says it
            if experts is None:
                st = dense
            else:
                st = pce_step(replace(model_cfg, num_experts=experts), w, cluster, world, ep)
            rows.append({"world": world, "variant": name, "ep_size": ep or 1, "num_experts": experts,
                         "step_ms": 1e3 * st.total_s, "compute_ms": 1e3 * st.compute_s, "a2a_ms": 1e3 * st.a2a_s,
                         "sync_ms": 1e3 * st.sync_s, "grad_ms": 1e3 * st.grad_s, "ideal_ms": 1e3 * st.ideal_s,
                         "img_per_s_per_gpu": work.batch_per_gpu / st.total_s, "efficiency": st.efficiency,
                         "over_dense": st.total_s / dense.total_s})
    return rows


def markdown(rows: list[dict]) -> str:
    out = ["| GPUs | variant | ep | step ms | compute | all-to-all | host sync | grad all-reduce "
           "| img/s per GPU | efficiency | step / dense |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['world']} | {r['variant']} | {r['ep_size']} | {r['step_ms']:.3f} | {r['compute_ms']:.3f} "
                   f"| {r['a2a_ms']:.3f} | {r['sync_ms']:.3f} | {r['grad_ms']:.3f} | {r['img_per_s_per_gpu']:,.0f} "
                   f"| {r['efficiency']:.2f} | {r['over_dense']:.2f} |")
    return "\n".join(out)


SENSITIVITY = {  # what each assumption is worth: one change at a time from the defaults
    "defaults": ({}, {}),
    "batch 1024 / GPU": ({"batch_per_gpu": 1024}, {}),
    "imbalance 1.0": ({"imbalance": 1.0}, {}),
    "imbalance 2.0": ({"imbalance": 2.0}, {}),
    "MFU 5 % (launch-bound compute)": ({"mfu": 0.05}, {}),
    "MFU 50 %": ({"mfu": 0.5}, {}),
    "latencies / 2": ({}, {"collective_launch_s": 4e-6, "nvlink_hop_s": 0.5e-6, "ib_hop_s": 2e-6,
                           "a2a_peer_s": 0.5e-6}),
    "grad all-reduce fully overlapped": ({}, {"grad_overlap": 1.0}),
}


def sensitivity(model_cfg, work: Workload = Workload(), cluster: Cluster = Cluster()) -> list[dict]:
    """Efficiency and step / dense of the PCE variants under ``SENSITIVITY``'s changes."""
    out = []
    for name, (w, c) in SENSITIVITY.items():
        rows = scaling_table(model_cfg, replace(work, **w), replace(cluster, **c))
        pick = {(r["world"], r["variant"]): r for r in rows}
        inn, across = "PCE, EP in node (NVLink)", "PCE, EP across nodes (IB)"
        out.append({"change": name, "over_dense_ep1_512": pick[(512, "PCE, data-parallel (ep 1)")]["over_dense"],
                    **{f"eff_in_node_{n}": pick[(n, inn)]["efficiency"] for n in WORLDS},
                    "over_dense_in_node_512": pick[(512, inn)]["over_dense"],
                    "eff_across_512": pick[(512, across)]["efficiency"],
                    "over_dense_across_512": pick[(512, across)]["over_dense"],
                    "dense_eff_512": pick[(512, "dense, data-parallel")]["efficiency"]})
    return out


def sensitivity_markdown(rows: list[dict]) -> str:
    out = ["| change | PCE EP in node: efficiency at 8 / 64 / 512 | step / dense at 512 | PCE EP across nodes: "
           "efficiency at 512 | step / dense at 512 | PCE ep 1: step / dense at 512 | dense efficiency at 512 |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        eff = " / ".join(f"{r[f'eff_in_node_{n}']:.2f}" for n in WORLDS)
        out.append(f"| {r['change']} | {eff} | {r['over_dense_in_node_512']:.2f} | {r['eff_across_512']:.2f} "
                   f"| {r['over_dense_across_512']:.2f} | {r['over_dense_ep1_512']:.2f} | {r['dense_eff_512']:.2f} |")
    return "\n".join(out)


# ----------------------------------------------------------------------------- measured inputs


def measure_routing(export: str, data_root: str, batches: int = 8, batch: int = 256) -> dict:
    """Experts per patch and per-EP-rank imbalance of a trained export on the test split (torch).

    Imbalance: per global batch of ``batch`` images, the routed rows each EP rank would
    compute (its block of experts, all patches of the batch), max over ranks / mean; the
    mean over ``batches`` batches, per layer, for every ``ep_size`` that divides E."""
    import dataclasses

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pce_dist.config import config_from_dict
    from pce_dist.data import build_eval_loader
    from pce_dist.export import read_model

    exported = read_model(export)
    model, cfg = exported.model.eval(), config_from_dict(exported.config)
    E = cfg.model.num_experts
    loader = build_eval_loader(dataclasses.replace(cfg.data, root=data_root, batch_size=batch), "test",
                               rank=0, world_size=1)
    eps = [ep for ep in range(2, E + 1) if E % ep == 0]
    pairs, patches, imbalance = None, None, {ep: None for ep in eps}
    seen = 0
    with torch.no_grad():
        for x_BCHW, _, valid_B in loader:
            if seen == batches or int(valid_B.sum()) < batch:
                break
            routes = model(x_BCHW[valid_B.bool()]).routes
            rows = [r.selected_NE.sum(0).double() for r in routes]
            pairs = [float(r.sum()) + (pairs[i] if pairs else 0.0) for i, r in enumerate(rows)]
            patches = [r.selected_NE.shape[0] + (patches[i] if patches else 0) for i, r in enumerate(routes)]
            for ep in eps:
                ratio = [float(r.reshape(ep, -1).sum(1).max() / r.reshape(ep, -1).sum(1).mean()) for r in rows]
                imbalance[ep] = [a + b for a, b in zip(imbalance[ep] or [0.0] * len(ratio), ratio)]
            seen += 1
    return {"export": export, "batches": seen, "batch": batch,
            "experts_per_patch": [p / n for p, n in zip(pairs, patches)],
            "imbalance": {ep: [v / seen for v in vals] for ep, vals in imbalance.items()}}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/fashion_mnist.yaml")
    ap.add_argument("--batch-per-gpu", type=int, default=Workload.batch_per_gpu)
    ap.add_argument("--imbalance", type=float, default=Workload.imbalance)
    ap.add_argument("--experts-per-patch", type=float, default=Workload.experts_per_patch)
    ap.add_argument("--mfu", type=float, default=Workload.mfu)
    ap.add_argument("--pce-compute-overhead", type=float, default=Workload.pce_compute_overhead)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--measure-routing", nargs="*", metavar="EXPORT",
                    help="measure experts/patch and imbalance of trained exports instead (needs torch and the data)")
    ap.add_argument("--data-root", default="data/fashion-mnist")
    args = ap.parse_args(argv)
    repo = Path(__file__).resolve().parents[1]
    if args.measure_routing is not None:
        found = [measure_routing(e, args.data_root) for e in args.measure_routing]
        print(json.dumps(found, indent=2))
        return found
    sys.path.insert(0, str(repo))
    from pce_dist.config import load_config  # pure Python + yaml: no torch

    cfg = load_config(repo / args.config if not Path(args.config).is_absolute() else args.config).model
    work = Workload(batch_per_gpu=args.batch_per_gpu, imbalance=args.imbalance,
                    experts_per_patch=args.experts_per_patch, mfu=args.mfu,
                    pce_compute_overhead=args.pce_compute_overhead)
    cluster = Cluster()
    rows = scaling_table(cfg, work, cluster)
    sens = sensitivity(cfg, work, cluster)
    if args.json:
        print(json.dumps({"workload": asdict(work), "cluster": asdict(cluster), "rows": rows, "sensitivity": sens},
                         indent=2))
    else:
        fl = forward_flops_per_image(cfg, work.experts_per_patch)
        print(f"{args.config}, {work.batch_per_gpu} images per GPU, bf16, experts/patch {work.experts_per_patch}, "
              f"imbalance {work.imbalance}, {work.mfu:.0%} of {work.peak_flops / 1e12:.0f} TFLOP/s; forward "
              f"MFLOP/image: PCE {fl['pce'] / 1e6:.1f}, dense {fl['dense'] / 1e6:.1f}")
        for layer in layer_geometry(cfg):
            print(f"  layer: {layer.patches_per_image} patches of {layer.patch_side}x{layer.patch_side}, "
                  f"dispatch row {layer.dispatch_row_bytes(work.dtype_bytes)} B "
                  f"({layer.in_channels} ch), return row {layer.return_row_bytes(work.dtype_bytes)} B "
                  f"({layer.out_channels} ch), {flops_per_a2a_byte(layer, work.dtype_bytes, cfg.expert_kernel):.0f} "
                  f"expert FLOP per byte moved")
        rate = work.peak_flops * work.mfu
        print(f"  break-even: {rate / (cluster.nvlink_bytes_per_s * cluster.link_efficiency):.0f} FLOP/B on NVLink, "
              f"{rate / (cluster.ib_bytes_per_s * cluster.link_efficiency):.0f} on IB (achieved FLOP/s / link B/s)")
        print(markdown(rows))
        print()
        print(sensitivity_markdown(sens))
    return rows


if __name__ == "__main__":
    main()
