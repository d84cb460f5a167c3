"""MASA: every layer's q/k/v/o weights are its coefficients times the shared atoms (checked
against the formula, forward and every gradient, atoms included), one dictionary per model
counted and saved once, parameter counts, decode == full forward, bad inputs."""

import pytest
import torch
import torch.nn.functional as F

from attnkit.layers import MatrixAtomAttention, MultiHeadAttention
from attnkit.models import DecoderLM

from layer_checks import assert_forward_and_grads_match, decode_in_chunks


def formula(layer, x):
    """Weights written as sums over atoms, then plain causal attention with RoPE."""
    atoms = layer.qkv_proj._atoms
    cq, ck, cv = layer.qkv_proj.coefficients
    (co,) = layer.o_proj.coefficients
    combine = lambda c, d: sum(c[s] * d[s] for s in range(d.shape[0]))  # noqa: E731
    Wq, Wk, Wv, Wo = combine(cq, atoms.q), combine(ck, atoms.k), combine(cv, atoms.v), combine(co, atoms.o)
    B, T, _ = x.shape
    H, Hkv, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = (x @ Wq.T).view(B, T, H, D).transpose(1, 2)
    k = (x @ Wk.T).view(B, T, Hkv, D).transpose(1, 2)
    v = (x @ Wv.T).view(B, T, Hkv, D).transpose(1, 2)
    q, k = layer.rope(q, k)
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1), is_causal=True)
    return out.transpose(1, 2).reshape(B, T, H * D) @ Wo.T


@pytest.mark.parametrize("kv", [None, 2])
def test_layer_matches_formula(kv):
    torch.manual_seed(0)
    layer = MatrixAtomAttention(32, 4, kv, num_atoms=3).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    assert_forward_and_grads_match(layer, lambda x: formula(layer, x), x)


def test_one_dictionary_per_model():
    model = DecoderLM(vocab_size=64, dim=32, num_layers=6, num_heads=4, attention="masa")
    layers = [b.attn for b in model.layers]
    assert [layer.owns_atoms for layer in layers] == [True] + [False] * 5
    assert all(layer.qkv_proj._atoms is layers[0].atoms for layer in layers)
    assert layers[0].atoms.q.shape == (2, 32, 32)  # S = L / 3 atoms
    # attention parameters: 4 S C^2 atoms + 4 S coefficients per layer, against 4 L C^2
    attn = sum(p.numel() for b in model.layers for p in b.attn.parameters())
    assert attn == 4 * 2 * 32 * 32 + 6 * 4 * 2
    mha = DecoderLM(vocab_size=64, dim=32, num_layers=6, num_heads=4)
    assert model.num_parameters() == mha.num_parameters() - 4 * 6 * 32 * 32 + attn
    # a gradient step moves the shared atoms through every layer
    model(torch.randint(0, 64, (2, 8))).square().mean().backward()
    assert all(layer.qkv_proj.coefficients.grad is not None for layer in layers)
    assert layers[0].atoms.q.grad.abs().sum() > 0


def test_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = DecoderLM(vocab_size=64, dim=32, num_layers=3, num_heads=4, attention="masa")
    tokens = torch.randint(0, 64, (2, 7))
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(DecoderLM.from_pretrained(tmp_path)(tokens), model(tokens))


@pytest.mark.parametrize("chunks", [[1] * 9, [4, 5]])
def test_decode_equals_full_forward(chunks):
    torch.manual_seed(0)
    layer = MatrixAtomAttention(32, 4, num_atoms=2).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    torch.testing.assert_close(decode_in_chunks(layer, x, chunks), layer(x))


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_atoms"):
        MatrixAtomAttention(32, 4, num_atoms=0)
    with pytest.raises(ValueError, match="bias"):
        MatrixAtomAttention(32, 4, bias=True)
    assert isinstance(MatrixAtomAttention(32, 4), MultiHeadAttention)
