"""kth_largest_of_prefixes against a brute-force top-k, on both walks (Triton under the interpreter on CPU)."""

import pytest
import torch

from attnkit.ops.select import prefix_quantile as pq


def _brute(values, k, seen):
    out = torch.full((values.shape[0], seen.numel()), float("-inf"), dtype=values.dtype)
    for i, n in enumerate(seen.tolist()):
        if n > k:
            out[:, i] = values[:, :n].topk(k, dim=-1).values[:, -1]
    return out


BACKENDS = ["torch"] + (["triton"] if pq.triton is not None else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel needs CUDA tensors unless interpreted


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("R,S,k", [(3, 1, 1), (2, 2, 1), (4, 17, 5), (2, 64, 64), (3, 300, 7), (2, 257, 256)])
def test_matches_brute_force_with_ties(backend, R, S, k):
    g = torch.Generator().manual_seed(S * 10 + k)
    values = torch.randint(0, max(2, S // 4), (R, S), generator=g).float()  # many ties
    seen = torch.randint(1, S + 1, (min(S, 50),), generator=g)
    seen[0] = S
    out = pq.kth_largest_of_prefixes(values.to(DEVICE), k, seen.to(DEVICE), backend=backend)
    torch.testing.assert_close(out.cpu(), _brute(values, k, seen))


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_prefix_of_distinct_values(backend):
    g = torch.Generator().manual_seed(0)
    values = torch.randn(5, 130, generator=g, dtype=torch.float64)
    seen = torch.arange(1, 131)
    out = pq.kth_largest_of_prefixes(values.to(DEVICE), 9, seen.to(DEVICE), backend=backend)
    torch.testing.assert_close(out.cpu(), _brute(values, 9, seen))


def test_bad_inputs():
    with pytest.raises(ValueError, match="k must be >= 1"):
        pq.kth_largest_of_prefixes(torch.zeros(2, 5), 0, torch.arange(1, 3))
    with pytest.raises(ValueError, match=r"values must be \[R, S\]"):
        pq.kth_largest_of_prefixes(torch.zeros(5), 1, torch.arange(1, 3))
    with pytest.raises(ValueError, match="backend must be"):
        pq.kth_largest_of_prefixes(torch.zeros(2, 5), 1, torch.arange(1, 3), backend="cuda")
