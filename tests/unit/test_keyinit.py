import numpy as np
import pytest
import torch

from pce_dist.config import load_config
from pce_dist.keyinit import init_keys, kmeans
from pce_dist.model import build_model


def _clusters(seed=0, k=4, d=16, per=200):
    rng = np.random.default_rng(seed)
    centers = np.linalg.qr(rng.normal(size=(d, d)))[0][:k]
    x = np.concatenate([c + 0.05 * rng.normal(size=(per, d)) for c in centers]).astype(np.float32)
    return x, centers


def test_kmeans_recovers_separated_directions_and_is_deterministic():
    x, centers = _clusters()
    a = kmeans(x, 4, niter=20, seed=3)
    b = kmeans(x, 4, niter=20, seed=3)
    np.testing.assert_array_equal(a.centroids_KD, b.centroids_KD)
    assert a.objective == b.objective
    sims = a.centroids_KD @ centers.T  # each true center matched by one unit centroid
    assert np.allclose(np.sort(sims.max(0)), 1.0, atol=0.01)
    np.testing.assert_allclose(np.linalg.norm(a.centroids_KD, axis=1), 1.0, atol=1e-5)


def test_subsampled_kmeans_is_deterministic_and_scored_on_every_row():
    x, centers = _clusters(k=4, d=16, per=2000)  # 8000 rows; 64 points per centroid -> trained on 256
    sub = kmeans(x, 4, niter=20, seed=1, max_points_per_centroid=64)
    again = kmeans(x, 4, niter=20, seed=1, max_points_per_centroid=64)
    full = kmeans(x, 4, niter=20, seed=1, max_points_per_centroid=0)
    np.testing.assert_array_equal(sub.centroids_KD, again.centroids_KD)
    assert sub.objective == again.objective
    assert not np.array_equal(sub.centroids_KD, full.centroids_KD)  # really trained on other rows
    assert np.allclose(np.sort((sub.centroids_KD @ centers.T).max(0)), 1.0, atol=0.01)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)  # the objective covers all 8000 rows
    expected = float((1.0 - (xn @ sub.centroids_KD.T).max(1)).sum())
    assert sub.objective == pytest.approx(expected, rel=1e-3)


def _keyinit_setup():
    cfg = load_config(None, ["model.num_experts=3"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    g = torch.Generator().manual_seed(1)
    return model, [torch.randn(8, 1, 28, 28, generator=g) for _ in range(2)]


@torch.no_grad()
def _kmeans_keys(model, batches, layer):
    """What k-means makes of layer ``layer``'s embeddings in the model as it is now."""
    model.eval()
    emb_ND = torch.cat([model(x).routes[layer].embeddings_ND for x in batches])
    centroids_KD = kmeans(emb_ND.numpy(), 3, niter=10, seed=0 + layer).centroids_KD
    return torch.nn.functional.normalize(torch.from_numpy(centroids_KD), dim=-1)


def test_init_keys_layer_by_layer_is_deterministic():
    def run():
        model, batches = _keyinit_setup()
        return model, init_keys(model, batches, max_samples=500, niter=10, seed=0)

    m1, rec = run()
    m2, _ = run()
    assert [r["layer"] for r in rec] == [0, 1]
    assert rec[0]["samples"] == 2 * 8 * 4 and rec[1]["samples"] == 2 * 8 * 16
    for r1, r2 in zip(m1.routers(), m2.routers()):
        assert torch.equal(r1.keys, r2.keys)
        assert torch.allclose(r1.keys.norm(dim=1), torch.ones(3), atol=1e-5)
    assert m1.training  # mode restored

    # the reference, layer by layer: layer 1's embeddings come from the net with layer 0's new keys
    ref, batches = _keyinit_setup()
    untouched_keys_1 = _kmeans_keys(ref, batches, 1)  # what initialising every layer at once would give
    for layer, router in enumerate(ref.routers()):
        router.set_keys(_kmeans_keys(ref, batches, layer))
    for layer, (got, want) in enumerate(zip(m1.routers(), ref.routers())):
        torch.testing.assert_close(got.keys, want.keys, rtol=0, atol=1e-6, msg=f"layer {layer}")
    assert not torch.allclose(m1.routers()[1].keys, untouched_keys_1, atol=1e-3)  # the order matters here
