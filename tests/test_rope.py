"""RoPE: rotations preserve norms, scores depend only on relative position, packed positions restart."""

import pytest
import torch

from attnkit.rope import RotaryEmbedding, positions_from_documents


def test_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(16).double()
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def score(m, n):
        qq, _ = rope(q, q, offset=m)
        _, kk = rope(k, k, offset=n)
        return (qq * kk).sum()

    torch.testing.assert_close(score(7, 2), score(107, 102))
    torch.testing.assert_close(score(4, 4), (q * k).sum())
    assert not torch.allclose(score(7, 2), score(7, 3))


def test_rotation_preserves_norm_and_positions_restart():
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 3, 5, 8)
    y, _ = rope(x, x, offset=11)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    ids = torch.tensor([[0, 0, 0, 1, 1, 2]])
    assert positions_from_documents(ids).tolist() == [[0, 1, 2, 0, 1, 0]]


def test_bad_head_dim():
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7)
