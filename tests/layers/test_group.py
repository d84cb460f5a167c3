"""Chronos-2 group attention: layer == loops over time steps and groups (forward, gradients),
decode == full forward, DecoderLM passes group_ids, bad inputs."""

import pytest
import torch

from attnkit.layers import Chronos2Attention, GroupAttention
from attnkit.models import DecoderLM

from layer_checks import assert_forward_and_grads_match, decode_in_chunks


def reference(layer, x, group_ids):
    """At each time t, series b attends to the series of its group with unscaled scores."""
    B, T, _ = x.shape
    H, D = layer.num_heads, layer.head_dim
    q, k, v = layer.qkv_proj(x).view(B, T, 3, H, D).unbind(2)  # (B, T, H, D) each
    out = torch.zeros(B, T, H, D, dtype=x.dtype)
    for t in range(T):
        for b in range(B):
            members = [c for c in range(B) if group_ids[c] == group_ids[b]]
            scores = torch.stack([(q[b, t] * k[c, t]).sum(-1) for c in members], dim=-1)  # (H, members)
            weights = (scores * (1.0 if layer.scale is None else layer.scale)).softmax(-1)
            out[b, t] = sum(weights[:, i, None] * v[c, t] for i, c in enumerate(members))
    return layer.o_proj(out.reshape(B, T, H * D))


@pytest.mark.parametrize("group_ids", [[0, 0, 1, 1, 1], [3, 1, 3, 2, 1], [0, 1, 2, 3, 4]])
def test_matches_reference(group_ids):
    torch.manual_seed(0)
    layer = GroupAttention(16, 2).double()
    ids = torch.tensor(group_ids)
    x = torch.randn(5, 4, 16, dtype=torch.float64)
    assert_forward_and_grads_match(lambda x: layer(x, group_ids=ids), lambda x: reference(layer, x, ids), x,
                                   params_of=layer)


def test_singleton_groups_do_not_mix_series():
    torch.manual_seed(0)
    layer = GroupAttention(16, 2).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(layer(x), alone)


@pytest.mark.parametrize("chunks", [[1] * 9, [4, 5]])
def test_chronos2_pair_decode_equals_full_forward(chunks):
    torch.manual_seed(0)
    layer = Chronos2Attention(16, 2).double()
    ids = torch.tensor([0, 1, 0])
    x = torch.randn(3, 9, 16, dtype=torch.float64)
    torch.testing.assert_close(decode_in_chunks(layer, x, chunks, group_ids=ids), layer(x, group_ids=ids))


def test_decoder_passes_group_ids():
    torch.manual_seed(0)
    model = DecoderLM(vocab_size=32, dim=16, num_layers=2, num_heads=2, attention=["mha", "chronos2-group"]).double()
    tokens = torch.randint(0, 32, (4, 6))
    together = model(tokens, group_ids=torch.tensor([0, 0, 0, 0]))
    apart = model(tokens)
    assert not torch.allclose(together, apart)
    torch.testing.assert_close(model(tokens[:1]), apart[:1])


@pytest.mark.parametrize("ids, match", [(torch.tensor([0, 1]), r"group_ids must be an integer tensor \[B\]"),
                                         (torch.tensor([0.0, 1.0, 2.0]), "integer")])
def test_bad_group_ids(ids, match):
    with pytest.raises(ValueError, match=match):
        GroupAttention(16, 2)(torch.randn(3, 4, 16), group_ids=ids)


def test_bad_scale():
    with pytest.raises(ValueError, match="scale"):
        GroupAttention(16, 2, scale=-1.0)


def test_auto_runs_the_group_axis_through_sdpa(monkeypatch):
    """Under ``auto`` the short group axis runs through SDPA with a dense mask (FlexAttention's
    launch failed on the H200 at T x H = 65536); an explicit backend is honoured."""
    import attnkit.layers.group as group_module

    seen = []
    real = group_module.attend

    def spy(*args, **kwargs):
        seen.append(kwargs["backend"])
        return real(*args, **kwargs)

    monkeypatch.setattr(group_module, "attend", spy)
    x = torch.randn(3, 5, 32)
    GroupAttention(32, 4)(x)
    GroupAttention(32, 4, backend="reference")(x)
    assert seen == ["sdpa", "reference"]
