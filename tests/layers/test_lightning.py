"""Lightning layer: == the formula written out (SiLU, decay, norm, output gate; forward and
every gradient), each named design == its official module written plainly in float64,
decode == full forward in any chunking with a constant-size state, the per-layer decay
schedule, bad inputs."""

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
    if layer.norm_type == "srms":
        o = o / torch.sqrt(o.square().mean(-1, keepdim=True) + layer.norm_eps)
    else:
        mean, var = o.mean(-1, keepdim=True), o.var(-1, unbiased=False, keepdim=True)
        o = (o - mean) / torch.sqrt(var + layer.norm_eps) * layer.norm.weight + layer.norm.bias
    gate = layer.gate(x)
    gate = torch.sigmoid(gate) if layer.gate_activation == "sigmoid" else gate
    return layer.o_proj(o * gate)


@pytest.mark.parametrize("options", [{}, {"gate_rank": None, "activate_values": False}, {"chunk_size": 3},
                                     {"backend": "recurrent"}, {"backend": "reference"}, {"design": "tnl"},
                                     {"design": "mixed"}, {"design": "tnl", "bias": True, "norm": "srms"}])
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


def decayed_linear_attention(q, k, v, slopes):
    """``o_i = sum_{j <= i} exp(-s_h (i - j)) (q_i . k_j) v_j`` with a materialised decay mask."""
    T = q.shape[2]
    i = torch.arange(T, dtype=torch.float64)
    dist = i[:, None] - i[None, :]
    mask = torch.where(dist >= 0, torch.exp(-slopes.double()[:, None, None] * dist.clamp(min=0)), 0.0)
    return ((q @ k.transpose(-1, -2)) * mask) @ v


def official_transnormerllm(layer, x):
    """TransNormerLLM-7B's ``NormLinearAttention`` (training path), float64: one projection to
    q, k, v, u; SiLU on q and k only; SRMSNorm(eps 1e-6, no gain) of the heads' outputs; times u
    (no activation); output projection."""
    B, T, _ = x.shape
    H, D = layer.num_heads, layer.head_dim
    w_q, w_k, w_v = layer.qkv_proj.weight.view(3, H * D, -1)
    w_u = layer.gate.weight
    heads = lambda t: t.view(B, T, H, D).transpose(1, 2)  # noqa: E731
    q, k, v = F.silu(heads(x @ w_q.T)), F.silu(heads(x @ w_k.T)), heads(x @ w_v.T)
    o = decayed_linear_attention(q, k, v, layer.slopes).transpose(1, 2).reshape(B, T, H * D)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6)
    return (o * (x @ w_u.T)) @ layer.o_proj.weight.T


def official_tnl(layer, x):
    """lightning-attention's ``TnlAttention``, float64: SiLU on q, k and v; LayerNorm over the
    H*D channels (gain, bias, eps 1e-5); a sigmoid of a rank-``head_dim`` gate ``C -> D -> C``
    (biases on both factors when ``bias``); output projection."""
    B, T, _ = x.shape
    H, D = layer.num_heads, layer.head_dim
    w = layer.qkv_proj.weight.view(3, H * D, -1)
    b = layer.qkv_proj.bias.view(3, H * D)
    heads = lambda t: t.view(B, T, H, D).transpose(1, 2)  # noqa: E731
    q, k, v = (F.silu(heads(x @ w[i].T + b[i])) for i in range(3))
    o = decayed_linear_attention(q, k, v, layer.slopes).transpose(1, 2).reshape(B, T, H * D)
    o = F.layer_norm(o, (H * D,), layer.norm.weight, layer.norm.bias, eps=1e-5)
    down, up = layer.gate
    gate = torch.sigmoid((x @ down.weight.T + down.bias) @ up.weight.T + up.bias)
    return (o * gate) @ layer.o_proj.weight.T + layer.o_proj.bias


@pytest.mark.parametrize("design, official, bias", [("transnormerllm", official_transnormerllm, False),
                                                    ("tnl", official_tnl, True)])
def test_named_designs_match_the_official_modules(design, official, bias):
    torch.manual_seed(0)
    layer = LightningAttention(32, 4, design=design, bias=bias).double()
    with torch.no_grad():  # non-trivial norm parameters, so that a missing gain or bias shows
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x), official(layer, x))
    if design == "tnl":
        assert layer.gate[0].out_features == layer.head_dim


def test_card_builds_transnormerllm():
    import attnkit

    layer = attnkit.build("lightning", dim=32, num_heads=4)
    assert (layer.design, layer.norm_type, layer.gate_activation, layer.activate_values) == (
        "transnormerllm", "srms", None, False)
    assert isinstance(layer.gate, torch.nn.Linear) and layer.norm_eps == 1e-6
    assert LightningAttention(32, 4, design="tnl").norm_eps == 1e-5


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
        (dict(design="transnormer"), "design must be one of"),
        (dict(norm="rms"), "norm must be one of"),
        (dict(gate_activation="silu"), "gate_activation"),
        (dict(activate_values=1), "activate_values"),
        (dict(norm_eps=0.0), "norm_eps"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LightningAttention(32, 4, **kwargs)


def test_document_ids_rejected():
    layer = LightningAttention(32, 4)
    with pytest.raises(ValueError, match="document_ids"):
        layer(torch.randn(1, 4, 32), document_ids=torch.zeros(1, 4, dtype=torch.long))
