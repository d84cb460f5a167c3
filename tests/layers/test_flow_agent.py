"""Flow and Agent layers: fast path == reference (forward and every gradient), decode ==
full forward with a constant-size state, the agent formulas written out, bad inputs."""

import pytest
import torch

from attnkit.layers import AgentAttention, CausalAgentAttention, FlowAttention

from layer_checks import assert_forward_and_grads_match, decode_in_chunks


def on_reference(layer):
    """``layer``'s own parameters through its reference path (so gradients are comparable)."""
    def run(x):
        fast_backend, layer.backend = layer.backend, "reference"
        try:
            return layer(x)
        finally:
            layer.backend = fast_backend
    return run


def twin(cls, **kwargs):
    torch.manual_seed(0)
    fast = cls(32, 4, **kwargs).double()
    ref = cls(32, 4, **{**kwargs, "backend": "reference"}).double()
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # zero-initialised biases would hide a bug
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.mark.parametrize("causal", [True, False])
def test_flow_layer_matches_reference(causal):
    fast, ref = twin(FlowAttention, causal=causal)
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    assert_forward_and_grads_match(fast, on_reference(fast), x)


@pytest.mark.parametrize("chunks", [[1] * 9, [4, 5], [2, 1, 6]])
def test_flow_decode_equals_full_forward(chunks):
    fast, _ = twin(FlowAttention)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    torch.testing.assert_close(decode_in_chunks(fast, x, chunks), fast(x))
    state = fast.init_state(2)
    size = state.nbytes()
    fast(x, state)
    assert state.nbytes() == size  # constant in the context length


def test_flow_bidirectional_does_not_decode():
    with pytest.raises(ValueError, match="does not decode"):
        FlowAttention(32, 4, causal=False).init_state(1)
    with pytest.raises(ValueError, match="eps and clamp"):
        FlowAttention(32, 4, clamp=0)


def agent_loops(layer, x):
    """Agent attention written per agent and per token: pooled agents, two softmax stages
    with their biases, plus the 3x3 depthwise conv of V on the grid."""
    q, k, v, agents, b1, b2, local = layer.parts(x)
    scale = layer.head_dim ** -0.5
    B, H, N, D = q.shape
    out = torch.zeros(B, H, N, D, dtype=x.dtype)
    for h in range(H):
        agent_v = torch.stack([torch.einsum("bj,bjd->bd", torch.softmax(torch.einsum("bjd,bd->bj", k[:, h], agents[:, h, a]) * scale + b1[h, a], -1), v[:, h])
                               for a in range(layer.agent_num)], 1)  # (B, n, D)
        for i in range(N):
            w = torch.softmax((agents[:, h] @ q[:, h, i, :, None])[..., 0] * scale + b2[h, i], -1)  # (B, n)
            out[:, h, i] = (w[..., None] * agent_v).sum(1)
    return layer.o_proj(out.transpose(1, 2).reshape(B, N, H * D) + local)


def test_agent_pooling_is_the_grid_average():
    layer = AgentAttention(32, 4, agent_num=4, grid_size=(4, 6)).double()
    x = torch.randn(1, 24, 32, dtype=torch.float64)
    q, *_ , agents, _b1, _b2, _local = layer.parts(x)
    q_grid = q[0, 0].reshape(4, 6, -1)  # head 0
    torch.testing.assert_close(agents[0, 0, 0], q_grid[:2, :3].mean((0, 1)))  # top-left 2x3 cell
    torch.testing.assert_close(agents[0, 0, 3], q_grid[2:, 3:].mean((0, 1)))


@pytest.mark.parametrize("grid, agents", [((4, 5), 4), (None, 3)])
def test_agent_matches_loops_and_reference(grid, agents):
    fast, ref = twin(AgentAttention, agent_num=agents, grid_size=grid)
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    assert_forward_and_grads_match(fast, lambda x: agent_loops(fast, x), x)
    assert_forward_and_grads_match(fast, on_reference(fast), x)


def test_agent_bad_inputs():
    with pytest.raises(ValueError, match="square number"):
        AgentAttention(32, 4, agent_num=5, grid_size=(4, 4))
    with pytest.raises(ValueError, match="grid_size"):
        AgentAttention(32, 4, agent_num=4, grid_size=(4, 0))
    layer = AgentAttention(32, 4, agent_num=4, grid_size=(4, 4))
    with pytest.raises(ValueError, match="holds 16"):
        layer(torch.randn(1, 15, 32))


def causal_agent_loops(layer, x):
    """o_t = sum_a softmax_a(s q_t.a_a + b2) * [prefix softmax_j<=t (s a_a.k_j) v_j] + conv."""
    B, T, _ = x.shape
    H, D = layer.num_heads, layer.head_dim
    q, k, v = layer.qkv_proj(x).view(B, T, 3, H, D).unbind(2)
    s = D ** -0.5
    out = torch.zeros(B, T, H, D, dtype=x.dtype)
    for h in range(H):
        A = layer.agents[h]
        for t in range(T):
            p = torch.softmax(q[:, t, h] @ A.T * s + layer.agent_query_bias[h], -1)  # (B, n)
            raw = (k[:, : t + 1, h] @ A.T) * s
            w = torch.softmax(layer.score_cap * torch.tanh(raw / layer.score_cap), dim=1)  # (B, t+1, n)
            agent_v = torch.einsum("bjn,bjd->bnd", w, v[:, : t + 1, h])
            out[:, t, h] = torch.einsum("bn,bnd->bd", p, agent_v)
    vf = v.reshape(B, T, H * D)
    K = layer.conv_size
    wconv = layer.dwc.weight[:, 0]  # (HD, K)
    local = torch.stack([sum(wconv[:, K - 1 - r] * vf[:, t - r] for r in range(K) if t - r >= 0) + layer.dwc.bias
                         for t in range(T)], 1)
    return layer.o_proj(out.reshape(B, T, H * D) + local)


@pytest.mark.parametrize("backend", ["auto", "reference", "recurrent"])
def test_causal_agent_matches_loops(backend):
    fast, _ = twin(CausalAgentAttention, agent_num=5, backend=backend)
    x = torch.randn(2, 10, 32, dtype=torch.float64) * 2
    assert_forward_and_grads_match(fast, lambda x: causal_agent_loops(fast, x), x)


def test_causal_agent_survives_huge_scores():
    """Scores far apart (a late key 1000x larger) must not underflow the early prefixes."""
    fast, _ = twin(CausalAgentAttention, agent_num=5)
    x = torch.randn(1, 12, 32)
    x[:, -1] *= 1000
    layer = fast.float()
    assert torch.isfinite(layer(x)).all()
    x.requires_grad_()
    layer(x).square().sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("chunks", [[1] * 10, [3, 7], [2, 1, 7]])
def test_causal_agent_decode_equals_full_forward(chunks):
    fast, _ = twin(CausalAgentAttention, agent_num=5)
    x = torch.randn(2, 10, 32, dtype=torch.float64) * 3  # spread scores: the stabiliser must move
    torch.testing.assert_close(decode_in_chunks(fast, x, chunks), fast(x))


@pytest.mark.parametrize("size", [1, 5, 7, 13, 300])
def test_interpolation_matrix_is_linear_resizing(size):
    import torch.nn.functional as F

    from attnkit.layers.agent import interpolation_matrix

    base = torch.randn(3, 4, 7, dtype=torch.float64)
    expected = F.interpolate(base, size=size, mode="linear", align_corners=False)
    torch.testing.assert_close(base @ interpolation_matrix(size, 7, base).T, expected)
    grid = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    rows, cols = interpolation_matrix(size, 7, grid), interpolation_matrix(6, 7, grid)
    torch.testing.assert_close(rows @ grid @ cols.T, F.interpolate(grid, size=(size, 6), mode="bilinear", align_corners=False))
