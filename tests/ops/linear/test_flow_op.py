"""Flow-Attention op: the reference equals the official formulas written as per-position
loops; the fast path (prefix sums + linear attention) equals the reference on forward and
every gradient; a state carries a split sequence; bad inputs."""

import pytest
import torch

from attnkit.ops.linear.flow import FlowState, flow_attend, flow_attend_reference

EPS = 1e-6


def features(B=2, H=2, T=11, D=4, E=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.rand(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, torch.randn(B, H, T, E, generator=g, dtype=torch.float64)


def causal_loops(q, k, v, clamp):
    """Official Flow_Attention_Causal, position by position (n_i = i + 1)."""
    B, H, T, D = q.shape
    dot = lambda a, b: ((a + EPS) * (b + EPS)).sum(-1)  # noqa: E731
    I, O, cs, co = (torch.zeros(B, H, T, dtype=q.dtype) for _ in range(4))
    for i in range(T):
        n = i + 1
        I[..., i] = n / dot(q[:, :, i], k[:, :, : i + 1].sum(2))
        O[..., i] = n / dot(k[:, :, i], q[:, :, : i + 1].sum(2))
    for i in range(T):
        n = i + 1
        cs[..., i] = dot(q[:, :, i], (k[:, :, : i + 1] * O[..., : i + 1, None]).sum(2)) / n
        co[..., i] = (dot(k[:, :, i], (q[:, :, : i + 1] * I[..., : i + 1, None]).sum(2)) / n).clamp(-clamp, clamp)
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=q.dtype)
    for i in range(T):
        n = i + 1
        comp = torch.exp(co[..., : i + 1]) / torch.exp(co[..., : i + 1]).cumsum(-1) * torch.arange(1, i + 2)
        kv = torch.einsum("bhjd,bhje->bhde", k[:, :, : i + 1], v[:, :, : i + 1] * comp[..., None])
        o = torch.einsum("bhd,bhde->bhe", q[:, :, i] * (I[..., i] / n)[..., None], kv)
        out[:, :, i] = o * torch.sigmoid(cs[..., i])[..., None]
    return out


def bidirectional_loops(q, k, v, clamp):
    S, T = k.shape[2], q.shape[2]
    dot = lambda a, b: ((a + EPS) * (b + EPS)).sum(-1)  # noqa: E731
    I = torch.stack([1 / dot(q[:, :, i], k.sum(2)) for i in range(T)], -1)
    O = torch.stack([1 / dot(k[:, :, j], q.sum(2)) for j in range(S)], -1)
    cs = torch.stack([dot(q[:, :, i], (k * O[..., None]).sum(2)) for i in range(T)], -1)
    co = torch.stack([dot(k[:, :, j], (q * I[..., None]).sum(2)) for j in range(S)], -1).clamp(-clamp, clamp)
    comp = torch.softmax(co, -1) * S
    kv = torch.einsum("bhjd,bhje->bhde", k, v * comp[..., None])
    return torch.einsum("bhid,bhde->bhie", q * I[..., None], kv) * torch.sigmoid(cs * T / S)[..., None]


@pytest.mark.parametrize("clamp", [1.0, 10.0])
def test_reference_is_the_official_math(clamp):
    q, k, v = features()
    torch.testing.assert_close(flow_attend_reference(q, k, v, clamp=clamp), causal_loops(q, k, v, clamp))
    torch.testing.assert_close(flow_attend_reference(q, k, v, causal=False, clamp=clamp),
                               bidirectional_loops(q, k, v, clamp))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", ["chunked", "recurrent"])
def test_fast_path_matches_reference_forward_and_grads(causal, backend):
    q, k, v = (t.requires_grad_() for t in features(T=70))
    o = flow_attend(q, k, v, causal=causal, backend=backend)
    o_ref = flow_attend_reference(q, k, v, causal=causal)
    torch.testing.assert_close(o, o_ref)
    g = torch.randn_like(o)
    for name, a, b in zip("qkv", torch.autograd.grad(o, (q, k, v), g), torch.autograd.grad(o_ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, msg=lambda m: f"d{name}: {m}")


def test_state_carries_a_split_sequence():
    q, k, v = features(T=19)
    state = FlowState.zeros(2, 2, 4, 3, dtype=torch.float64)
    parts = [flow_attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], state=state) for a, b in [(0, 7), (7, 8), (8, 19)]]
    torch.testing.assert_close(torch.cat(parts, 2), flow_attend_reference(q, k, v))
    assert state["count"] == 19


def test_bad_inputs():
    q, k, v = features()
    with pytest.raises(ValueError, match="eps"):
        flow_attend(q, k, v, eps=0.0)
    with pytest.raises(ValueError, match="clamp"):
        flow_attend(q, k, v, clamp=-1.0)
    with pytest.raises(ValueError, match="do not agree"):
        flow_attend(q, k[..., :3], v)
    with pytest.raises(ValueError, match="as many keys"):
        flow_attend(q, k[:, :, :5], v[:, :, :5])
    with pytest.raises(ValueError, match="backend"):
        flow_attend(q, k, v, backend="sdpa")
    with pytest.raises(ValueError, match="no decode state"):
        flow_attend(q, k, v, causal=False, state=FlowState.zeros(2, 2, 4, 3))
