"""HCAM: the blocked op against the query-by-query float64 reference (forward, gradients, queries
at an offset), the layer against its reference path and its decode against its full forward,
what the hierarchy reduces to in limits, and bad inputs."""

import pytest
import torch

import attnkit
from attnkit.layers import HCAMAttention
from attnkit.layers.hcam import hcam_attend, hcam_attend_reference

from layer_checks import assert_forward_and_grads_match, decode_in_chunks


@pytest.mark.parametrize("chunk_size, top_k, T, query_block", [(4, 2, 23, None), (4, 2, 23, 3), (5, 1, 17, None),
                                                               (3, 6, 20, 4), (8, 2, 7, None), (1, 3, 9, 2)])
@pytest.mark.parametrize("dense", [False, True])
def test_op_matches_reference(chunk_size, top_k, T, query_block, dense):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, T, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    fast = hcam_attend(q, k, v, chunk_size=chunk_size, top_k=top_k, query_block=query_block, dense=dense)
    ref = hcam_attend_reference(q, k, v, chunk_size=chunk_size, top_k=top_k)
    torch.testing.assert_close(fast, ref)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(fast, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b)
    # the newest 5 queries alone (a decode step's layout) equal the last rows of the full call
    torch.testing.assert_close(hcam_attend(q[:, :, -5:], k, v, chunk_size=chunk_size, top_k=top_k, dense=dense),
                               ref[:, :, -5:])
    torch.testing.assert_close(hcam_attend(q[:, :, 3:7], k, v, chunk_size=chunk_size, top_k=top_k, q_offset=3,
                                           dense=dense), ref[:, :, 3:7])


def test_default_query_block_counts_batch_and_heads(monkeypatch):
    """The default block holds about _GATHER_BUDGET gathered numbers over all batch rows and heads
    (the old default counted one head's rows: 49 GiB at batch 16, 16 heads, 2048 tokens on the
    H200); the peak of the gathered keys follows the budget and the result does not change."""
    from attnkit.layers import hcam

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 8) for _ in range(3))
    expected = hcam_attend_reference(q.double(), k.double(), v.double(), chunk_size=4, top_k=2).float()
    seen = []
    real_select = torch.Tensor.index_select

    def record(self, dim, index):
        out = real_select(self, dim, index)
        seen.append(out.numel())
        return out

    per_query = 2 * 4 * (2 + 1) * 4 * (8 + 8)  # B * H * (top_k + 1) * chunk_size * (D + Dv)
    monkeypatch.setattr(torch.Tensor, "index_select", record)
    monkeypatch.setattr(hcam, "_GATHER_BUDGET", 10 * per_query)
    torch.testing.assert_close(hcam_attend(q, k, v, chunk_size=4, top_k=2, dense=False), expected, atol=1e-5, rtol=1e-5)
    assert max(seen) * 2 <= 10 * per_query and len(seen) == 2 * 7  # keys + values of 7 blocks of 10 queries


def test_one_chunk_is_causal_softmax_attention():
    """With the whole sequence in one chunk there is no memory: plain causal attention."""
    q, k, v = (torch.randn(2, 3, 10, 8, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(hcam_attend(q, k, v, chunk_size=16, top_k=2), attnkit.attend(q, k, v, pattern="causal"))


def test_the_query_reads_the_chunk_whose_summary_matches():
    """Chunk 1's keys all point along the query: HCAM with top_k=1 reads chunk 1's value."""
    D, L = 8, 4
    q = torch.zeros(1, 1, 1, D, dtype=torch.float64)
    q[..., 0] = 10.0
    k = torch.randn(1, 1, 3 * L + 1, D, dtype=torch.float64) * 0.1
    k[:, :, L : 2 * L, 0] = 3.0  # chunk 1
    v = torch.zeros(1, 1, 3 * L + 1, 2, dtype=torch.float64)
    v[:, :, L : 2 * L, 0] = 1.0
    out = hcam_attend(q, k, v, chunk_size=L, top_k=1)  # the query is token 12, in chunk 3
    assert out[0, 0, 0, 0] > 0.99


def _layer(**options):
    torch.manual_seed(0)
    return HCAMAttention(32, 4, **{"chunk_size": 4, "top_k": 2, **options}).double()


def _as_reference(layer):
    def run(x):
        layer.backend = "reference"
        try:
            return layer(x)
        finally:
            layer.backend = "blocked"

    return run


@pytest.mark.parametrize("top_k", [1, 2, 5])
def test_layer_matches_reference_forward_and_gradients(top_k):
    layer = _layer(top_k=top_k)
    assert_forward_and_grads_match(layer, _as_reference(layer), torch.randn(2, 19, 32, dtype=torch.float64))


@pytest.mark.parametrize("chunks", [[19], [6] + [1] * 13, [3, 9, 7], [4, 4, 11]])
def test_decode_in_pieces_equals_full_forward(chunks):
    layer = _layer()
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    torch.testing.assert_close(decode_in_chunks(layer, x, chunks), layer(x))


@pytest.mark.parametrize("options, message", [
    ({"chunk_size": 0}, "chunk_size must be a positive integer, got 0"),
    ({"top_k": 0}, "top_k must be a positive integer, got 0"),
    ({"top_k": 2.5}, "top_k must be a positive integer, got 2.5"),
    ({"top_k": 4, "chunk_size": 64, "max_seq_len": 200}, r"top_k=4 is more chunks than a sequence of max_seq_len=200"),
    ({"max_seq_len": 0}, "max_seq_len must be a positive integer, got 0"),
    ({"backend": "flex"}, "backend must be one of blocked, reference, got 'flex'"),
    ({"head_dim": -8}, "head_dim must be a positive integer, got -8"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        HCAMAttention(32, 4, **options)


def test_bad_op_inputs():
    q = k = v = torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match=r"q_offset must lie in 0..S-T = 0..0"):
        hcam_attend(q, k, v, chunk_size=2, top_k=1, q_offset=3)
    with pytest.raises(ValueError, match="must agree on B, H"):
        hcam_attend(q, torch.randn(1, 3, 6, 8), v, chunk_size=2, top_k=1)
    with pytest.raises(ValueError, match=r"k must be a tensor \[B, H, T\|S, D\]"):
        hcam_attend(q, k[0], v, chunk_size=2, top_k=1)
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        hcam_attend(q, k, v, chunk_size=2, top_k=0)
    with pytest.raises(ValueError, match="does not take document_ids"):
        HCAMAttention(16, 2)(torch.randn(1, 4, 16), document_ids=torch.zeros(1, 4, dtype=torch.long))
    assert HCAMAttention(32, 4, top_k=3, chunk_size=64, max_seq_len=256).top_k == 3  # (256 - 1) // 64 = 3 chunks


def test_a_sequence_of_whole_chunks():
    """T a multiple of chunk_size: the keys come from a permute and are not viewable as chunks
    (a .view there failed); the layer and the op still match the reference."""
    layer = _layer()
    assert_forward_and_grads_match(layer, _as_reference(layer), torch.randn(2, 16, 32, dtype=torch.float64))
    q, k, v = (torch.randn(1, 8, 2, 4, dtype=torch.float64).transpose(1, 2) for _ in range(3))  # [1, 2, 8, 4]
    assert not k.is_contiguous()
    torch.testing.assert_close(hcam_attend(q, k, v, chunk_size=4, top_k=1),
                               hcam_attend_reference(q, k, v, chunk_size=4, top_k=1))

