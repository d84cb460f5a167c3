"""EchoAtt: a follower reuses its leader's attention probabilities (== the formula with P
written out, forward and every gradient), the fused path equals the materialised one,
decoding through DecoderLM equals its full forward, roles, parameter savings, bad inputs."""

import pytest
import torch

from attnkit.layers import EchoAttention, MultiHeadAttention
from attnkit.models import DecoderLM

from layer_checks import assert_forward_and_grads_match


def pair(backend="auto", num_kv_heads=None):
    torch.manual_seed(0)
    kw = dict(num_layers=2, block_size=2, backend=backend, num_kv_heads=num_kv_heads)
    return EchoAttention(32, 4, layer_idx=0, **kw).double(), EchoAttention(32, 4, layer_idx=1, **kw).double()


def formula(leader, follower, xa, xb):
    """P = causal softmax(rope(q) rope(k)^T / sqrt(D)) from the leader's input; both layers apply P to their own v."""
    B, T, _ = xa.shape
    H, Hkv, D = leader.num_heads, leader.num_kv_heads, leader.head_dim
    q, k = leader.qk_proj(xa).split((H * D, Hkv * D), dim=-1)
    q, k = leader.rope(q.view(B, T, H, D).transpose(1, 2), k.view(B, T, Hkv, D).transpose(1, 2))
    k = k.repeat_interleave(H // Hkv, dim=1)
    scores = q @ k.transpose(-1, -2) / D**0.5
    P = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)

    def apply(layer, x):
        v = layer.v_proj(x).view(B, T, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
        return layer.o_proj((P @ v).transpose(1, 2).reshape(B, T, H * D))

    return torch.cat([apply(leader, xa), apply(follower, xb)], dim=1)


@pytest.mark.parametrize("backend, kv", [("auto", None), ("reference", None), ("auto", 2)])
def test_follower_reuses_the_leaders_probabilities(backend, kv):
    leader, follower = pair(backend, kv)
    xa, xb = torch.randn(2, 9, 32, dtype=torch.float64), torch.randn(2, 9, 32, dtype=torch.float64)
    params = torch.nn.ModuleList([leader, follower])

    def run(x):
        context = {}
        return torch.cat([leader(x[:, :9], context=context), follower(x[:, 9:], context=context)], dim=1)

    assert_forward_and_grads_match(run, lambda x: formula(leader, follower, x[:, :9], x[:, 9:]),
                                   torch.cat([xa, xb], dim=1), params_of=params)


def test_fused_path_equals_materialised_path_in_a_model():
    torch.manual_seed(0)
    fast = DecoderLM(vocab_size=64, dim=32, num_layers=4, num_heads=4, attention="echo").double()
    ref = DecoderLM(vocab_size=64, dim=32, num_layers=4, num_heads=4, attention="echo",
                    attention_options={"backend": "reference"}).double()
    ref.load_state_dict(fast.state_dict())
    tokens = torch.randint(0, 64, (2, 15))
    torch.testing.assert_close(fast(tokens), ref(tokens))
    fast(tokens).square().mean().backward()
    ref(tokens).square().mean().backward()
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_decode_equals_full_forward(backend):
    torch.manual_seed(0)
    model = DecoderLM(vocab_size=64, dim=32, num_layers=3, num_heads=4, attention="echo",
                      attention_options={"backend": backend}).double()
    tokens = torch.randint(0, 64, (2, 11))
    state = model.init_state(2)
    out = torch.cat([model(tokens[:, :4], state)] + [model(tokens[:, t : t + 1], state) for t in range(4, 11)], 1)
    torch.testing.assert_close(out, model(tokens))
    assert state[1].keys.shape[-1] == 1  # the follower caches values only


def test_roles_and_parameters():
    model = DecoderLM(vocab_size=64, dim=32, num_layers=6, num_heads=4, attention="echo",
                      attention_options={"block_size": 3, "first_layer": 1, "last_layer": 4})
    assert [b.attn.role for b in model.layers] == ["plain", "leader", "follower", "follower", "leader", "plain"]
    follower, mha = model.layers[2].attn, MultiHeadAttention(32, 4)
    assert sum(p.numel() for p in follower.parameters()) == sum(p.numel() for p in mha.parameters()) - 2 * 32 * 32
    assert EchoAttention(32, 4).role == "leader"  # standalone: plain attention


def test_bad_inputs():
    follower = EchoAttention(32, 4, layer_idx=1, num_layers=2)
    with pytest.raises(ValueError, match="follower of layer 0"):
        follower(torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match="first_layer"):
        EchoAttention(32, 4, num_layers=4, first_layer=3, last_layer=1)
    with pytest.raises(ValueError, match="layer_idx"):
        EchoAttention(32, 4, layer_idx=4, num_layers=4)
    with pytest.raises(ValueError, match="block_size"):
        EchoAttention(32, 4, block_size=0)
    leader = EchoAttention(32, 4)
    with pytest.raises(ValueError, match=r"document_ids must have shape \[B, T\] = \[1, 3\]"):
        leader(torch.randn(1, 3, 32), document_ids=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="cannot be combined with a decode state"):
        leader(torch.randn(1, 3, 32), leader.init_state(1), document_ids=torch.zeros(1, 3, dtype=torch.long))
