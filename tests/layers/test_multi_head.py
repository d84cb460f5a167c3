"""MultiHeadAttention (MHA/GQA/MQA): reference equality, decode == full, packed == separate, bad inputs."""

import pytest
import torch

import attnkit
from attnkit import patterns as P
from attnkit.layers import MultiHeadAttention


def layer_pair(backend, dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    fast = MultiHeadAttention(64, 8, backend=backend, **kwargs).to(dtype)
    ref = MultiHeadAttention(64, 8, backend="reference", **kwargs).to(dtype)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.mark.parametrize("num_kv_heads", [8, 2, 1])
@pytest.mark.parametrize("pattern", ["causal", "full", P.sliding_window(5), P.sink_window(2, 4)])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_layer_matches_reference_forward_and_grads(num_kv_heads, pattern, qk_norm):
    fast, ref = layer_pair("auto", dtype=torch.float32, num_kv_heads=num_kv_heads, pattern=pattern, qk_norm=qk_norm, bias=True)
    x = torch.randn(2, 29, 64)
    y_fast, y_ref = fast(x), ref(x)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y_ref)
    y_fast.backward(g)
    y_ref.backward(g)
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("num_kv_heads", [8, 2, 1])
@pytest.mark.parametrize("pattern", ["causal", P.sliding_window(4), P.sink_window(2, 3)])
@pytest.mark.parametrize("chunks", [[1] * 13, [5, 1, 7], [13]])
def test_decode_equals_full_forward(num_kv_heads, pattern, chunks):
    layer, _ = layer_pair("auto", num_kv_heads=num_kv_heads, pattern=pattern)
    x = torch.randn(2, 13, 64, dtype=torch.float64)
    full = layer(x)
    state = layer.init_state(2)
    outs, start = [], 0
    for n in chunks:
        outs.append(layer(x[:, start : start + n], state))
        start += n
    assert state.offset == 13
    torch.testing.assert_close(torch.cat(outs, dim=1), full)


def test_packed_documents_equal_separate_sequences():
    layer, _ = layer_pair("auto", num_kv_heads=2)
    lengths = [5, 9, 3]
    seqs = [torch.randn(1, n, 64, dtype=torch.float64) for n in lengths]
    packed = torch.cat(seqs, dim=1)
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    out = layer(packed, document_ids=ids)
    separate = torch.cat([layer(s) for s in seqs], dim=1)
    torch.testing.assert_close(out, separate)


def test_kv_cache_memory_scales_with_kv_heads():
    sizes = {}
    for kv in (8, 2, 1):
        layer = MultiHeadAttention(64, 8, num_kv_heads=kv)
        state = layer.init_state(1)
        layer(torch.randn(1, 10, 64), state)
        sizes[kv] = state.nbytes()
    assert sizes[8] == 10 * 2 * 8 * 8 * 4  # tokens * (k+v) * heads * head_dim * fp32 bytes
    assert sizes[8] == 4 * sizes[2] == 8 * sizes[1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dim=64, num_heads=8, num_kv_heads=3), "multiple of num_kv_heads"),
        (dict(dim=65, num_heads=8), "not divisible"),
        (dict(dim=64, num_heads=0), "num_heads"),
        (dict(dim=64, num_heads=8, backend="cuda"), "unknown backend"),
        (dict(dim=64, num_heads=8, pattern="strided"), "unknown pattern"),
        (dict(dim=64, num_heads=8, dropout=1.5), "dropout"),
        (dict(dim=48, num_heads=16), "even head_dim"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiHeadAttention(**kwargs)


def test_bad_call_inputs():
    layer = MultiHeadAttention(64, 8)
    with pytest.raises(ValueError, match=r"\[B, T, C\]"):
        layer(torch.randn(4, 64))
    with pytest.raises(ValueError, match="width"):
        layer(torch.randn(1, 4, 32))
    with pytest.raises(ValueError, match="decoding needs a causal"):
        MultiHeadAttention(64, 8, pattern="full").init_state(1)


def test_registry_builds_baselines_and_rejects_unknowns():
    names = [c.name for c in attnkit.mechanisms()]
    assert {"mha", "gqa", "mqa"} <= set(names)
    assert attnkit.build("gqa", dim=64, num_heads=8).num_kv_heads == 2
    assert attnkit.build("mqa", dim=64, num_heads=8).num_kv_heads == 1
    assert attnkit.build("gqa", dim=96, num_heads=6).num_kv_heads == 1  # largest divisor of 6 not above 6/4
    with pytest.raises(ValueError, match="unknown mechanism 'nope'; registered: mha"):
        attnkit.build("nope", dim=64, num_heads=8)
    with pytest.raises(ValueError, match="does not take option"):
        attnkit.build("mha", dim=64, num_heads=8, windw=3)


def test_flop_model_hand_computed():
    card = attnkit.get("gqa")
    B, T, C, H = 2, 16, 64, 8
    f = card.flop_count(B, T, C, H)  # D=8, Hkv=2, causal
    assert f.projection_fwd == 2 * B * T * C * (8 + 4) * 8 + 2 * B * T * 64 * C
    assert f.attention_fwd == 4 * B * H * (T * (T + 1) // 2) * 8
    full = card.flop_count(B, T, C, H, pattern="full")
    assert full.attention_fwd == 4 * B * H * T * T * 8
    assert f.total("fwdbwd") == f.fwd + 2.5 * f.attention_fwd + 2 * f.projection_fwd


def test_no_mixing_is_identity_attention():
    """The control equals softmax attention whose pattern allows only the diagonal."""
    from attnkit.layers import NoMixing
    from attnkit.ops import attend_reference

    class Diagonal(P.Pattern):
        def allowed(self, b, h, q_pos, k_pos):
            return q_pos == k_pos

    torch.manual_seed(0)
    layer = NoMixing(64, 8).double()
    x = torch.randn(2, 9, 64, dtype=torch.float64, requires_grad=True)
    v = layer.v_proj(x).view(2, 9, 8, 8).transpose(1, 2)
    ref = attend_reference(v, v, v, pattern=Diagonal()).transpose(1, 2).reshape(2, 9, 64)
    torch.testing.assert_close(layer(x), layer.o_proj(ref))
    state = layer.init_state(2)
    steps = torch.cat([layer(x[:, i : i + 1], state) for i in range(9)], dim=1)
    torch.testing.assert_close(steps, layer(x))
    assert state.offset == 9 and state.nbytes() == 0
    with pytest.raises(ValueError, match="width"):
        layer(torch.randn(1, 3, 32))
