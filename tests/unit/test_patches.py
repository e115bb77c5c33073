import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pce_dist.model import PatchExtractor


def test_positional_channels_hand_computed():
    # 4x4 map, 2x2 patches -> 2x2 grid of patches; positions in [-1, 1].
    ext = PatchExtractor(2, 4)
    x = torch.zeros(1, 3, 4, 4)
    p = ext(x)
    assert p.shape == (1, 4, 3 + 4, 2, 2)
    absolute = p[0, :, 3:5, 0, 0]  # constant over the patch
    assert torch.equal(absolute, torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]]))
    assert torch.equal(p[0, :, 3:5], absolute[:, :, None, None].expand(4, 2, 2, 2))
    rel_row, rel_col = p[0, 0, 5], p[0, 0, 6]
    assert torch.equal(rel_row, torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
    assert torch.equal(rel_col, torch.tensor([[-1.0, 1.0], [-1.0, 1.0]]))
    assert torch.equal(p[0, 3, 5:], p[0, 0, 5:])  # relative channels are the same in every patch


def test_three_patch_grid_positions():
    ext = PatchExtractor(2, 6)
    absolute_row = ext(torch.zeros(1, 1, 6, 6))[0, :, 1, 0, 0].reshape(3, 3)
    assert torch.allclose(absolute_row[:, 0], torch.tensor([-1.0, 0.0, 1.0]))


def test_patch_content_is_row_major_grid():
    ext = PatchExtractor(2, 4)
    x = torch.arange(2 * 16, dtype=torch.float32).reshape(1, 2, 4, 4)
    p = ext(x)
    # patch p = gy * grid_w + gx holds x[:, :, 2gy:2gy+2, 2gx:2gx+2]
    assert torch.equal(p[0, 1, :2], x[0, :, 0:2, 2:4])
    assert torch.equal(p[0, 2, :2], x[0, :, 2:4, 0:2])


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), c=st.integers(1, 5), n=st.sampled_from([2, 3, 4]),
       gh=st.integers(1, 4), gw=st.integers(1, 4))
def test_reassemble_is_exact_inverse(b, c, n, gh, gw):
    ext = PatchExtractor(n, gh * n, gw * n)
    x = torch.randn(b, c, gh * n, gw * n)
    patches = ext(x)
    assert patches.shape == (b, gh * gw, c + 4, n, n)
    assert torch.equal(ext.reassemble(patches[:, :, :c]), x)
    pos = patches[:, :, c:]
    assert pos.min() >= -1 and pos.max() <= 1


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="does not divide"):
        PatchExtractor(3, 4)
    with pytest.raises(ValueError, match="4x4"):
        PatchExtractor(2, 4)(torch.zeros(1, 1, 6, 6))
