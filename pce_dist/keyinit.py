"""Router key initialisation by k-means over sampled patch embeddings, layer by layer.

Layer l's inputs depend on the routing of layers < l, so layers are initialised in order:
layer 0 from embeddings of the untouched network, then layer 1 from embeddings computed
with layer 0's new keys, and so on -- one sampled pass per layer.

Keys are compared to embeddings by cosine similarity, so k-means runs on unit-normalised
embeddings with spherical centroids (FAISS ``spherical=True``); the unit centroids become
the keys (the seed's ``keys = centroids / ||centroids||``).

Distribution stays outside: the caller passes ``gather`` (all ranks' samples -> the
main process, ``None`` elsewhere) and ``broadcast`` (main's keys -> every rank).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from .model.net import PCENet

log = logging.getLogger(__name__)


@dataclass
class KMeansResult:
    centroids_KD: np.ndarray
    objective: float  # sum over samples of (1 - cosine to the nearest unit centroid); lower is better
    seconds: float
    gpu: bool


def kmeans(x_ND: np.ndarray, k: int, *, niter: int = 25, seed: int = 0, gpu: bool | None = None,
           max_points_per_centroid: int = 256) -> KMeansResult:
    """FAISS k-means on unit-normalised rows; GPU when ``gpu`` (default: when FAISS sees one).

    The centroids are trained on a seeded random subsample of ``max_points_per_centroid * k``
    rows (FAISS's own default; 0 = every row): Lloyd iterations on more points barely move
    the objective, which is then measured on *every* row. Deterministic for a given seed on
    CPU (checked by the unit tests).
    """
    import faiss  # imported lazily: importing pce_dist must stay cheap

    x = np.array(x_ND, dtype=np.float32, order="C", copy=True)  # never normalise the caller's array
    if x.ndim != 2 or x.shape[0] < k:
        raise ValueError(f"k-means needs at least k={k} samples of shape [N, D], got {x.shape}")
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if gpu is None:
        gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    start = time.perf_counter()
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, gpu=bool(gpu),
                      max_points_per_centroid=max_points_per_centroid or x.shape[0] // k + 1, verbose=False)
    km.train(x)
    cosines, _ = km.index.search(x, 1)  # spherical: the index is inner product, i.e. cosine
    seconds = time.perf_counter() - start
    return KMeansResult(centroids_KD=km.centroids.copy(), objective=float(x.shape[0] - cosines.sum(dtype=np.float64)),
                        seconds=seconds, gpu=bool(gpu))


@torch.no_grad()
def layer_embeddings(model: PCENet, batches: Iterable[torch.Tensor], layer: int, max_samples: int,
                     seed: int) -> torch.Tensor:
    """Router embeddings of PCE layer ``layer`` over ``batches``, subsampled to ``max_samples``."""
    chunks = [model(x_BCHW).routes[layer].embeddings_ND.float().cpu() for x_BCHW in batches]
    emb_ND = torch.cat(chunks)
    if emb_ND.shape[0] > max_samples:
        gen = torch.Generator().manual_seed(seed + layer)
        emb_ND = emb_ND[torch.randperm(emb_ND.shape[0], generator=gen)[:max_samples]]
    return emb_ND


def init_keys(model: PCENet, batches: list[torch.Tensor], *, max_samples: int = 20000, niter: int = 25,
              max_points_per_centroid: int = 256, seed: int = 0, method: str = "kmeans",
              gather: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
              broadcast: Callable[[torch.Tensor | None, tuple[int, int]], torch.Tensor] | None = None) -> list[dict]:
    """Initialise every router's keys; returns one record per layer (time, objective, samples).

    ``batches`` are input images ``[B,C,H,W]`` on the model's device. ``gather`` returns
    the concatenated samples of all ranks on the main process and ``None`` elsewhere;
    ``broadcast(t, shape)`` sends the main process's ``t`` (the keys; with centring, the keys
    and the centre as one ``[E + 1, D]`` tensor) to all, where ``t`` is ``None`` and ``shape``
    says what arrives. Both default to single-process.
    """
    gather = gather or (lambda t: t)
    broadcast = broadcast or (lambda t, shape: t)
    was_training = model.training
    model.eval()
    records = []
    try:
        for layer, router in enumerate(model.routers()):
            emb_ND = layer_embeddings(model, batches, layer, max_samples, seed)
            all_ND = gather(emb_ND)
            keys_ED = None
            record: dict = {"layer": layer}
            center_D = None
            if all_ND is not None and router.center_mean is not None:
                # centring: the sample's mean is the running mean's start; k-means sees centred points
                # (the sample was embedded with the current mean, so add it back first)
                raw_ND = all_ND + router.center_mean.cpu()
                center_D = raw_ND.mean(0)
                all_ND = raw_ND - center_D
            if all_ND is not None:
                if method == "kmeans":
                    result = kmeans(all_ND.numpy(), router.num_experts, niter=niter, seed=seed + layer,
                                    max_points_per_centroid=max_points_per_centroid)
                    keys_ED = torch.from_numpy(result.centroids_KD)
                    record.update(samples=int(all_ND.shape[0]), objective=result.objective,
                                  seconds=result.seconds, gpu=result.gpu)
                elif method == "random":
                    gen = torch.Generator().manual_seed(seed + layer)
                    keys_ED = torch.randn(router.num_experts, router.embed_dim, generator=gen)
                    record.update(samples=0, objective=float("nan"), seconds=0.0, gpu=False)
                else:
                    raise ValueError(f"unknown key init method {method!r} (train.key_init)")
                keys_ED = F.normalize(keys_ED.float(), dim=-1)
                record["mean_nearest_cos"] = float((F.normalize(all_ND, dim=-1) @ keys_ED.t()).max(1).values.mean())
            if router.center_mean is not None:  # keys and centre travel together: [E + 1, D]
                sent = None if keys_ED is None else torch.cat([keys_ED, center_D[None].float()])
                received = broadcast(sent, (router.num_experts + 1, router.embed_dim))
                keys_ED = received[:-1]
                router.set_center(received[-1].to(router.center_mean.device))
            else:
                keys_ED = broadcast(keys_ED, (router.num_experts, router.embed_dim))
            router.set_keys(keys_ED.to(router.keys.device))
            records.append(record)
            log.info("router keys of layer %d initialised: %s", layer, record)
    finally:
        model.train(was_training)
    return records
