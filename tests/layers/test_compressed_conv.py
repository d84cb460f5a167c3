"""CCA / CCGQA: the layer == the paper's steps written out with loops (convolutions, qk-mean,
value shift, L2 norm and key temperature; forward and every gradient), decode == full
forward (conv tail and value shift in the state), KV-cache size, bad inputs."""

import pytest
import torch

from attnkit.layers import CompressedConvAttention

from layer_checks import assert_forward_and_grads_match, decode_in_chunks


def build(**kwargs):
    torch.manual_seed(0)
    layer = CompressedConvAttention(32, 8, **{"compression": 2, **kwargs}).double()
    with torch.no_grad():
        layer.temp.uniform_(0.5, 2.0)
    return layer


def formula(layer, x):
    B, T, C = x.shape
    Hc, Hkv, D = layer.latent_heads, layer.num_kv_heads, layer.head_dim
    g = Hc // Hkv
    q, k = layer.q_proj(x), layer.k_proj(x)
    qk = torch.cat([q, k], -1)  # (B, T, ch)
    ch = qk.shape[-1]
    wd, bd = layer.conv_depthwise.weight[:, 0], layer.conv_depthwise.bias  # (ch, 2)
    prev = lambda t, s: qk[:, t - s] if t - s >= 0 else torch.zeros_like(qk[:, 0])  # noqa: E731
    depth = torch.stack([wd[:, 1] * qk[:, t] + wd[:, 0] * prev(t, 1) + bd for t in range(T)], 1)
    # the depthwise output at t = -1 is its bias alone (its input there is zero padding)
    depth_prev = lambda t: depth[:, t - 1] if t >= 1 else bd.expand(B, ch)  # noqa: E731
    wg, bg = layer.conv_grouped.weight, layer.conv_grouped.bias  # (ch, ch / groups, 2)
    per = ch // (Hc + Hkv)
    rows = []
    for t in range(T):
        cur, before = depth[:, t], depth_prev(t)
        out = torch.zeros(B, ch, dtype=x.dtype)
        for o in range(ch):
            grp = o // per
            sl = slice(grp * per, (grp + 1) * per)
            out[:, o] = (before[:, sl] * wg[o, :, 0]).sum(-1) + (cur[:, sl] * wg[o, :, 1]).sum(-1) + bg[o]
        rows.append(out)
    conv = torch.stack(rows, 1)
    qm = (q.view(B, T, Hkv, g, D) + k.view(B, T, Hkv, 1, D)) / 2
    qq = conv[..., : Hc * D].view(B, T, Hc, D) + qm.reshape(B, T, Hc, D)
    kk = conv[..., Hc * D :].view(B, T, Hkv, D) + qm.mean(3)
    v1 = layer.v_proj_current(x)
    shifted = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)
    v = torch.cat([v1, layer.v_proj_previous(shifted)], -1).view(B, T, Hkv, D)
    qq = qq / qq.norm(dim=-1, keepdim=True) * D**0.5
    kk = kk / kk.norm(dim=-1, keepdim=True) * D**0.5 * layer.temp[:, None]
    qq, kk = layer.rope(qq.transpose(1, 2), kk.transpose(1, 2))
    kk, vv = kk.repeat_interleave(g, 1), v.transpose(1, 2).repeat_interleave(g, 1)
    P = (qq @ kk.transpose(-1, -2) / D**0.5).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    return layer.o_proj((P @ vv).transpose(1, 2).reshape(B, T, Hc * D))


@pytest.mark.parametrize("kv", [None, 2, 1])
def test_matches_formula(kv):
    layer = build(num_kv_heads=kv)
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    assert_forward_and_grads_match(layer, lambda x: formula(layer, x), x)


@pytest.mark.parametrize("chunks", [[1] * 9, [4, 5], [2, 1, 6]])
def test_decode_equals_full_forward(chunks):
    layer = build(num_kv_heads=2)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    torch.testing.assert_close(decode_in_chunks(layer, x, chunks), layer(x))


def test_kv_cache_bytes_per_token():
    x = torch.randn(1, 10, 32)
    for kv, heads in ((None, 4), (1, 1)):
        layer = CompressedConvAttention(32, 8, compression=2, num_kv_heads=kv)
        state = layer.init_state(1)
        layer(x, state)
        conv_and_shift = (4 + heads) * 4 * 2 * 4 + heads * 4 // 2 * 4  # tail (ch x 2) + previous W_v2 row, fp32
        assert state.nbytes() == 10 * 2 * heads * 4 * 4 + conv_and_shift  # MHA would hold 10 * 2 * 8 * 4 * 4


@pytest.mark.parametrize("kwargs, match", [(dict(compression=3), "divide num_heads"), (dict(num_kv_heads=3), "divide"),
                                           (dict(backend="nope"), "backend")])
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompressedConvAttention(32, 8, **{"compression": 2, **kwargs})
