"""Lightning attention op: chunked == recurrent == the materialised reference (forward, every
gradient, final state, initial state), the decay schedule, bad inputs."""

import math

import pytest
import torch
from conftest import rel_rms

from attnkit.ops.linear.lightning import (
    alibi_slopes,
    lightning_attend,
    lightning_attend_chunked,
    lightning_attend_recurrent,
    lightning_attend_reference,
)


def inputs(B=2, H=3, T=23, D=8, E=8, dtype=torch.float64, seed=0, state=True):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, D, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, H, T, E, generator=g, dtype=dtype)
    slopes = torch.tensor([0.5, 0.05, 0.0][:H], dtype=dtype)
    s0 = torch.randn(B, H, D, E, generator=g, dtype=dtype) if state else None
    return q, k, v, slopes, s0


def loop_formula(q, k, v, slopes, s0):
    """o_i = sum_{j<=i} lambda^(i-j) (q_i . k_j) v_j + lambda^(i+1) q_i S0, written as loops."""
    B, H, T, _ = q.shape
    out = torch.zeros(B, H, T, v.shape[-1], dtype=q.dtype)
    for h in range(H):
        lam = math.exp(-float(slopes[h]))
        for i in range(T):
            acc = sum(lam ** (i - j) * (q[:, h, i] * k[:, h, j]).sum(-1, keepdim=True) * v[:, h, j] for j in range(i + 1))
            if s0 is not None:
                acc = acc + lam ** (i + 1) * (q[:, h, i, None] @ s0[:, h])[:, 0]
            out[:, h, i] = acc
    return out


NAMES = ("o", "state", "dq", "dk", "dv", "dstate0")


def against_reference(outputs, q, k, v, slopes, s0, leaves):
    """``(o, final state, *gradients of leaves)`` of a path's ``outputs`` and of the float64
    reference on the same inputs, the gradients of one random loss ``sum(o * go) + sum(state * gs)``
    (the reference's state taken in the path's state dtype)."""
    o, state = outputs
    go, gs = torch.randn_like(o), torch.randn_like(state)
    both = []
    for o, state in (outputs, lightning_attend_reference(q, k, v, slopes, initial_state=s0)):
        loss = (o * go).sum() + (state.to(gs.dtype) * gs).sum()
        both.append((o, state, *torch.autograd.grad(loss, leaves)))
    return both


def test_reference_is_the_formula():
    q, k, v, slopes, s0 = inputs(T=9)
    o, _ = lightning_attend_reference(q, k, v, slopes, initial_state=s0)
    torch.testing.assert_close(o, loop_formula(q, k, v, slopes, s0))


@pytest.mark.parametrize("path", ["chunked-5", "chunked-64", "chunked-1", "recurrent"])
@pytest.mark.parametrize("with_state", [False, True])
def test_paths_match_reference_forward_grads_and_state(path, with_state):
    q, k, v, slopes, s0 = inputs(state=with_state, E=6)
    leaves = [t.requires_grad_() for t in (q, k, v) + ((s0,) if with_state else ())]
    if path == "recurrent":
        fn = lightning_attend_recurrent
    else:
        size = int(path.split("-")[1])
        fn = lambda *a, **kw: lightning_attend_chunked(*a, chunk_size=size, **kw)  # noqa: E731
    got, want = against_reference(fn(q, k, v, slopes, initial_state=s0), q, k, v, slopes, s0, leaves)
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")


def test_state_carries_a_split_sequence():
    """Two calls through the returned state == one call (what decoding relies on)."""
    q, k, v, slopes, _ = inputs(T=30, state=False)
    full, _ = lightning_attend_chunked(q, k, v, slopes, chunk_size=8)
    a, s = lightning_attend_chunked(q[:, :, :13], k[:, :, :13], v[:, :, :13], slopes, chunk_size=8)
    b, _ = lightning_attend_recurrent(q[:, :, 13:], k[:, :, 13:], v[:, :, 13:], slopes, initial_state=s)
    torch.testing.assert_close(torch.cat([a, b], dim=2), full)


def test_float32_chunked_close_to_float64_reference():
    q, k, v, slopes, s0 = inputs(T=200, D=16, E=16, state=False)
    o_ref, _ = lightning_attend_reference(q, k, v, slopes)
    o, _ = lightning_attend_chunked(q.float(), k.float(), v.float(), slopes.float())
    assert o.dtype == torch.float32
    assert ((o.double() - o_ref).norm() / o_ref.norm()) < 1e-5


def test_long_sequence_has_no_overflow():
    """Decays are exp(-s * distance) with distance >= 0: nothing blows up at 4k tokens."""
    q, k, v, slopes, _ = inputs(B=1, H=3, T=4096, D=4, E=4, dtype=torch.float32, state=False)
    o, state = lightning_attend_chunked(q, k, v, slopes * 4)
    assert torch.isfinite(o).all() and torch.isfinite(state).all()


def test_alibi_slopes():
    assert alibi_slopes(8) == [2 ** -(i + 1) for i in range(8)]
    assert alibi_slopes(4) == [2 ** -(2 * (i + 1)) for i in range(4)]
    six = alibi_slopes(6)  # 4 of the power of two below, then every other of 8's
    assert six == alibi_slopes(4) + alibi_slopes(8)[0::2][:2]


def test_auto_dispatch_on_cpu_equals_chunked():
    q, k, v, slopes, _ = inputs(dtype=torch.float32, state=False)
    torch.testing.assert_close(lightning_attend(q, k, v, slopes)[0], lightning_attend_chunked(q, k, v, slopes)[0])


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(slopes=torch.tensor([0.1, -0.1, 0.0])), "slopes must be >= 0"),
        (dict(slopes=torch.tensor([0.1, 0.2])), r"slopes must be a tensor \[H\]"),
        (dict(k=torch.randn(2, 3, 22, 8)), "same shape"),
        (dict(v=torch.randn(2, 3, 22, 8)), "v must be"),
        (dict(initial_state=torch.zeros(2, 3, 8, 7)), "initial_state must be"),
        (dict(q=torch.randn(3, 23, 8)), "4-d tensor"),
    ],
)
def test_bad_inputs(change, match):
    q, k, v, slopes, _ = inputs(dtype=torch.float32, state=False)
    args = dict(q=q, k=k, v=v, slopes=slopes, initial_state=None) | change
    with pytest.raises(ValueError, match=match):
        lightning_attend(args["q"], args["k"], args["v"], args["slopes"], initial_state=args["initial_state"])


def test_bad_backend_and_chunk():
    q, k, v, slopes, _ = inputs(dtype=torch.float32, state=False)
    with pytest.raises(ValueError, match="backend must be one of"):
        lightning_attend(q, k, v, slopes, backend="sdpa")
    with pytest.raises(ValueError, match="chunk_size"):
        lightning_attend_chunked(q, k, v, slopes, chunk_size=0)
    with pytest.raises(ValueError, match="triton"):
        lightning_attend(q, k, v, slopes, backend="triton")  # CPU tensors


@pytest.mark.parametrize("B, H, T, D, E, segment", [(1, 2, 100, 16, 16, None), (2, 1, 64, 32, 16, None),
                                                    (1, 2, 130, 16, 32, None), (1, 2, 300, 16, 16, 2),
                                                    (2, 1, 256, 16, 16, 1), (1, 1, 200, 16, 16, 3)])
def test_triton_kernels_match_reference(B, H, T, D, E, segment):
    """Forward, final state and every gradient (q, k, v, initial state) of the Triton kernels;
    on CPU through triton's interpreter. Lengths that are and are not multiples of the chunk;
    the state walk in one segment and in several (``segment`` chunks each: 300 tokens in
    segments of 2, 2 and a partial 1 chunk; 256 in four of 1; 200 in 3 + a partial 1)."""
    pytest.importorskip("triton")
    from attnkit.ops.linear.lightning_triton import lightning_attention_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(B, H, T, D, generator=g).to(device) for _ in range(2))
    v = torch.randn(B, H, T, E, generator=g).to(device)
    s0 = torch.randn(B, H, D, E, generator=g).to(device)
    slopes = torch.tensor([0.3, 0.01][:H], device=device)
    leaves = [t.requires_grad_() for t in (q, k, v, s0)]
    outputs = lightning_attention_triton(q, k, v, slopes, initial_state=s0, segment_chunks=segment)
    got, want = against_reference(outputs, q, k, v, slopes, s0, leaves)
    tol = 1e-5 if device == "cpu" else 5e-3  # tf32 tensor cores on CUDA
    for name, a, b in zip(NAMES, got, want):
        assert rel_rms(b, a) < tol, name


@pytest.mark.parametrize("segment", [0, -1, 1.5, True, "2"])
def test_triton_bad_segment_chunks(segment):
    pytest.importorskip("triton")
    from attnkit.ops.linear.lightning_triton import lightning_attention_triton

    q = torch.randn(1, 1, 64, 16)
    with pytest.raises(ValueError, match="segment_chunks must be a positive integer"):
        lightning_attention_triton(q, q, q, torch.tensor([0.1]), segment_chunks=segment)


@pytest.mark.cuda
def test_triton_segments_on_cuda_equal_one_walk():
    """B = 1 at 16k: the default splits the walk into segments (about 4 walks per SM); the
    result matches one walk over all 256 chunks, forward and gradients."""
    from attnkit.ops.linear.lightning_triton import _segments, lightning_attention_triton

    T = 16384
    seg, G = _segments(T // 64, 16 * 4, torch.device("cuda"), None)
    assert G > 1
    g = torch.Generator().manual_seed(3)
    q, k, v = ((torch.randn(1, 16, T, 128, generator=g) * 0.1).cuda().bfloat16().requires_grad_() for _ in range(3))
    slopes = torch.tensor(alibi_slopes(16)).cuda()
    outs = []
    for segment in (None, T // 64):
        o, state = lightning_attention_triton(q, k, v, slopes, segment_chunks=segment)
        outs.append((o, state, *torch.autograd.grad(o.float().square().sum() + state.sum(), (q, k, v))))
    for name, a, b in zip(["o", "state", "dq", "dk", "dv"], *outs):
        assert rel_rms(b.float(), a.float()) < 1e-2, name


@pytest.mark.cuda
@pytest.mark.parametrize("T", [64, 1000, 4096])
def test_triton_bf16_on_cuda(T):
    q, k, v, slopes, _ = inputs(B=2, H=4, T=T, D=128, E=128, dtype=torch.float32, state=False)
    slopes = torch.tensor(alibi_slopes(4))
    q, k, v = (t.cuda().bfloat16().requires_grad_() for t in (q * 0.1, k * 0.1, v))
    o, _ = lightning_attend(q, k, v, slopes.cuda(), backend="triton")
    o_ref, _ = lightning_attend_reference(q, k, v, slopes.cuda())
    assert rel_rms(o_ref, o) < 5e-3
    g = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), g)
    ref_grads = torch.autograd.grad(o_ref.to(o.dtype), (q, k, v), g)
    for a, b in zip(grads, ref_grads):
        assert rel_rms(b, a) < 1e-2


@pytest.mark.parametrize("n", [1, 64, 65, 1000, 5000])
def test_prefix_sum_equals_cumsum(n):
    from attnkit.ops.linear.prefix_sum import prefix_sum

    x = torch.randn(2, 3, n, 4, dtype=torch.float64)
    torch.testing.assert_close(prefix_sum(x), x.cumsum(2))
    torch.testing.assert_close(prefix_sum(x.transpose(2, 3), dim=3), x.transpose(2, 3).cumsum(3))
