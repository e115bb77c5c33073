import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pce_dist.model import ThresholdWeights, adaptive_threshold, ema_keys, route
from pce_dist.model.losses import balance_loss, collapse_count, confidence_loss, expert_usage


def test_threshold_formula_hand_computed():
    probs = torch.tensor([[0.6, 0.25, 0.1, 0.05]])
    wth = ThresholdWeights(max=0.3, entropy=0.2, gap=0.5)
    h = -(0.6 * math.log(0.6) + 0.25 * math.log(0.25) + 0.1 * math.log(0.1) + 0.05 * math.log(0.05))
    expected = 0.3 * (1 - 0.6) + 0.2 * h / math.log(4) + 0.5 * (0.6 - (0.25 + 0.1 + 0.05) / 3)
    assert adaptive_threshold(probs, wth).item() == pytest.approx(expected, rel=1e-6)


def test_threshold_components_separately():
    probs = torch.full((1, 4), 0.25)  # uniform: max_c = .75, norm entropy = 1, gap = 0
    assert adaptive_threshold(probs, ThresholdWeights(1, 0, 0)).item() == pytest.approx(0.75)
    assert adaptive_threshold(probs, ThresholdWeights(0, 1, 0)).item() == pytest.approx(1.0)
    assert adaptive_threshold(probs, ThresholdWeights(0, 0, 1)).item() == pytest.approx(0.0, abs=1e-7)


def test_gating_on_hand_written_logits():
    wth = ThresholdWeights(0.3, 0.2, 0.3)
    # keys = unit axes, embeddings chosen so cosines are known: softmax(cos / T)
    keys = torch.eye(3)
    emb = torch.tensor([[1.0, 0.0, 0.0],      # clearly expert 0
                        [1.0, 1.0, 0.0],      # tie between 0 and 1
                        [0.2, 0.1, 1.0]])
    T = 0.1
    r = route(emb, keys, temperature=T, wth=wth, mask_sharpness=50.0)
    cos = F.normalize(emb, dim=-1)
    probs = torch.softmax(cos / T, dim=-1)
    assert torch.allclose(r.probs_NE, probs, atol=1e-6)
    thr = adaptive_threshold(probs, wth)
    hard = (probs >= thr[:, None])
    hard[torch.arange(3), probs.argmax(1)] = True
    soft = torch.sigmoid(50.0 * (probs - thr[:, None]))
    expected = probs * soft * hard
    expected = expected / expected.sum(1, keepdim=True)
    assert torch.allclose(r.weights_NE, expected, atol=1e-6)
    assert r.selected_NE.tolist() == [[True, False, False], [True, True, False], [False, False, True]]
    assert r.weights_NE[1, 0].item() == pytest.approx(0.5, abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 20), e=st.integers(1, 12), d=st.integers(2, 16), t=st.floats(0.01, 2.0),
       seed=st.integers(0, 10_000))
def test_rows_sum_to_one_with_at_least_one_expert(n, e, d, t, seed):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, d, generator=g)
    keys = torch.randn(e, d, generator=g)
    r = route(emb, keys, temperature=t, wth=ThresholdWeights(), mask_sharpness=50.0)
    assert torch.allclose(r.weights_NE.sum(1), torch.ones(n), atol=1e-5)
    assert (r.selected_NE.sum(1) >= 1).all()
    assert (r.weights_NE >= 0).all()
    # the top-1 expert is always selected
    assert r.selected_NE[torch.arange(n), r.probs_NE.argmax(1)].all()


def test_ema_formula_hand_computed():
    keys = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    emb_unit = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    w = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])  # expert 2 gets nothing
    sum_w = w.sum(0)
    sum_wemb = w.t() @ emb_unit
    alpha = 0.9
    new = ema_keys(keys, sum_wemb, sum_w, alpha)
    mean0 = (1.0 * emb_unit[0] + 0.5 * emb_unit[1]) / 1.5
    exp0 = F.normalize(alpha * keys[0] + (1 - alpha) * mean0, dim=0)
    exp1 = F.normalize(alpha * keys[1] + (1 - alpha) * emb_unit[1], dim=0)
    assert torch.allclose(new[0], exp0, atol=1e-6)
    assert torch.allclose(new[1], exp1, atol=1e-6)
    assert torch.equal(new[2], keys[2])  # no mass: key unchanged
    assert torch.allclose(new.norm(dim=1), torch.ones(3), atol=1e-6)


def test_route_statistics_match_definition():
    g = torch.Generator().manual_seed(0)
    emb, keys = torch.randn(10, 6, generator=g), torch.randn(4, 6, generator=g)
    r = route(emb, keys, temperature=0.2, wth=ThresholdWeights(), mask_sharpness=50.0)
    assert torch.allclose(r.sum_w_E, r.weights_NE.sum(0))
    assert torch.allclose(r.sum_wemb_ED, r.weights_NE.t() @ F.normalize(emb, dim=-1), atol=1e-6)


def test_confidence_collapse_balance_values():
    from pce_dist.model.routing import RouteResult

    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    weights = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    r = RouteResult(probs_NE=probs, weights_NE=weights, embeddings_ND=torch.zeros(2, 1),
                    threshold_N=torch.zeros(2), sum_w_E=torch.zeros(4), sum_wemb_ED=torch.zeros(4, 1))
    # L_conf = -(1/BP) sum w log w = (log 2 + 0) / 2
    assert confidence_loss(r).item() == pytest.approx(math.log(2) / 2)
    assert expert_usage(r).tolist() == [1.0, 0.5, 0.0, 0.0]
    assert collapse_count(r, 0.01).item() == 2.0
    # E * sum f_e P_e: top-1 of both rows is expert 0 -> f = [1,0,0,0], P_0 = 0.75
    assert balance_loss(r).item() == pytest.approx(4 * 0.75)
