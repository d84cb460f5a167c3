"""Lightning layer: == the formula written out (SiLU, decay, SRMSNorm, low-rank gate; forward
and every gradient), decode == full forward in any chunking with a constant-size state,
the per-layer decay schedule, bad inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from attnkit.layers import LightningAttention
from attnkit.layers.lightning import lightning_slopes
from attnkit.models import DecoderLM

from layer_checks import assert_forward_and_grads_match, decode_in_chunks


def build(**kwargs):
    torch.manual_seed(0)
    return LightningAttention(32, 4, **kwargs).double()


def formula(layer, x):
    B, T, C = x.shape
    H, D = layer.num_heads, layer.head_dim
    q, k, v = layer.qkv_proj(x).view(B, T, 3, H, D).unbind(2)  # (B, T, H, D)
    q, k = F.silu(q), F.silu(k)
    v = F.silu(v) if layer.activate_values else v
    o = torch.zeros(B, T, H, D, dtype=x.dtype)
    for h in range(H):
        lam = math.exp(-float(layer.slopes[h]))
        for i in range(T):
            o[:, i, h] = sum(lam ** (i - j) * (q[:, i, h] * k[:, j, h]).sum(-1, keepdim=True) * v[:, j, h]
                             for j in range(i + 1))
    o = o.reshape(B, T, H * D)
    o = o / torch.sqrt(o.square().mean(-1, keepdim=True) + layer.norm_eps)
    return layer.o_proj(o * layer.gate(x))


@pytest.mark.parametrize("options", [{}, {"gate_rank": None, "activate_values": False}, {"chunk_size": 3},
                                     {"backend": "recurrent"}, {"backend": "reference"}])
def test_matches_formula(options):
    layer = build(**options)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    assert_forward_and_grads_match(layer, lambda x: formula(layer, x), x)


@pytest.mark.parametrize("chunks", [[1] * 12, [5, 7], [2, 1, 9]])
def test_decode_equals_full_forward_with_a_fixed_size_state(chunks):
    layer = build(chunk_size=4)
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    torch.testing.assert_close(decode_in_chunks(layer, x, chunks), layer(x))
    state = layer.init_state(2)
    before = state.nbytes()
    layer(x, state)
    assert state.nbytes() == before == 2 * 4 * 8 * 8 * 8  # B * H * D * D float64, whatever T


def test_decay_schedule():
    assert torch.allclose(lightning_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    first, last = lightning_slopes(8, 0, 4), lightning_slopes(8, 3, 4)
    assert torch.allclose(first, lightning_slopes(8) * (1 + 1e-5))
    assert torch.allclose(last, lightning_slopes(8) * 1e-5)
    model = DecoderLM(vocab_size=32, dim=32, num_layers=3, num_heads=4, attention="lightning")
    factors = [float(b.attn.slopes[0] / lightning_slopes(4)[0]) for b in model.layers]
    assert factors == pytest.approx([1 + 1e-5, 0.5 + 1e-5, 1e-5])


def test_explicit_slopes():
    layer = LightningAttention(32, 4, slopes=[0.0, 0.1, 0.2, 0.3])
    assert layer.slopes.tolist() == pytest.approx([0.0, 0.1, 0.2, 0.3])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(slopes=[0.1, -0.2, 0.0, 0.0]), "slopes must be 4 non-negative"),
        (dict(slopes=[0.1]), "slopes must be 4"),
        (dict(layer_idx=3, num_layers=3), "layer_idx"),
        (dict(backend="sdpa"), "backend must be one of"),
        (dict(gate_rank=0), "gate_rank"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LightningAttention(32, 4, **kwargs)


def test_document_ids_rejected():
    layer = LightningAttention(32, 4)
    with pytest.raises(ValueError, match="document_ids"):
        layer(torch.randn(1, 4, 32), document_ids=torch.zeros(1, 4, dtype=torch.long))
