"""The cuDNN band backend (sliding window): dispatch and refusals here, the math on the GPU."""

import pytest
import torch

from attnkit import patterns as P
from attnkit.ops import attend
from attnkit.ops.softmax import cudnn_band
from attnkit.ops.softmax.dispatch import choose_backend


def _qkv(B, Hq, Hkv, T, D, dtype=torch.float64, seed=0, layout="bhtd"):
    g = torch.Generator().manual_seed(seed)
    if layout == "bthd":  # a projection's [B, T, H, D] viewed as [B, H, T, D]: strided, head dim contiguous
        q = torch.randn(B, T, Hq, D, generator=g, dtype=dtype).transpose(1, 2)
        k, v = (torch.randn(B, T, Hkv, D, generator=g, dtype=dtype).transpose(1, 2) for _ in range(2))
    else:
        q = torch.randn(B, Hq, T, D, generator=g, dtype=dtype)
        k, v = (torch.randn(B, Hkv, T, D, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize(
    "pattern,kwargs,expect",
    [
        (P.causal(), {}, "sink_window patterns only"),
        (P.sliding_window(16) | P.sink_window(1, 2), {}, "sink_window patterns only"),
        (P.sink_window(65, 16), {}, "at most 64 sink tokens"),
        (P.sliding_window(16), {"score_mod": lambda s, b, h, i, j: s}, "no score_mod"),
        (P.sliding_window(16), {"return_lse": True}, "no score_mod"),
        (P.sliding_window(16), {}, "CUDA only"),
    ],
)
def test_refusals_name_the_reason(pattern, kwargs, expect):
    q, k, v = _qkv(1, 2, 2, 32, 16, dtype=torch.float32)
    reason = cudnn_band.why_unsupported(q, k, v, pattern, kwargs.get("score_mod"), kwargs.get("return_lse", False), 0)
    assert reason is not None and expect in reason
    with pytest.raises(ValueError, match="backend='cudnn' cannot serve these inputs") as err:
        attend(q, k, v, pattern=pattern, backend="cudnn", **kwargs)
    assert expect in str(err.value)


def test_layouts_cudnn_cannot_read_are_refused():
    q = torch.zeros(1, 2, 64, 16, dtype=torch.bfloat16)
    padded = torch.zeros(1, 2, 64, 20, dtype=torch.bfloat16)[..., 2:18]  # rows 40 bytes apart, offset 4 bytes
    assert "16-byte aligned" in cudnn_band.why_unsupported(q, padded, padded, P.sliding_window(8), None, False, 0)
    assert "stride 1" in cudnn_band.why_unsupported(q.transpose(2, 3), q, q, P.sliding_window(8), None, False, 0)


def test_band_attention_refuses_with_value_error_on_cpu():
    q, k, v = _qkv(1, 2, 2, 32, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="cuDNN band backend cannot serve"):
        cudnn_band.band_attention(q, k, v, window=8)
    with pytest.raises(ValueError, match="window"):
        cudnn_band.band_attention(q, k, v, window=0)


def test_auto_never_picks_cudnn_off_cuda():
    q, k, v = _qkv(1, 2, 2, 32, 16, dtype=torch.bfloat16)
    assert choose_backend(q, k, v, P.sliding_window(8), None, False, 0) != "cudnn"


def _require_frontend():
    if not cudnn_band.available():
        pytest.skip("the cuDNN frontend is not installed here (pip install nvidia-cudnn-frontend)")


@pytest.mark.cuda
def test_cuda_refusals_for_shapes_cudnn_does_not_take():
    _require_frontend()
    q, k, v = (t.cuda() for t in _qkv(1, 2, 2, 64, 16, dtype=torch.bfloat16))
    w = P.sliding_window(8)
    assert "float16 or bfloat16" in cudnn_band.why_unsupported(q.float(), k.float(), v.float(), w, None, False, 0)
    assert "T == S" in cudnn_band.why_unsupported(q[:, :, :10], k, v, w, None, False, 54)
    q2, k2, v2 = (t.cuda() for t in _qkv(1, 2, 2, 64, 256, dtype=torch.bfloat16))
    assert "at most 128" in cudnn_band.why_unsupported(q2, k2, v2, w, None, False, 0)
    assert choose_backend(q, k, v, w, None, False, 0) == "cudnn"
    assert choose_backend(q[:, :, -1:], k, v, w, None, False, 63) == "flex"  # a decode step: not a band of T == S


@pytest.mark.cuda
@pytest.mark.parametrize("sinks,window", [(0, 1), (0, 16), (0, 100), (0, 333), (0, 5000), (4, 1), (4, 100), (1, 16),
                                          (20, 64), (4, 5000)])
@pytest.mark.parametrize("Hq,Hkv,D,dtype,layout", [
    (8, 2, 64, torch.bfloat16, "bhtd"),
    (4, 4, 128, torch.float16, "bthd"),
    (8, 1, 64, torch.bfloat16, "bthd"),
])
def test_cuda_band_matches_float64_reference(sinks, window, Hq, Hkv, D, dtype, layout):
    """Forward and every gradient against the float64 reference, through ``attend(backend='auto')``."""
    from conftest import rel_rms

    _require_frontend()
    B, T = 2, 333
    q, k, v = (t.requires_grad_() for t in _qkv(B, Hq, Hkv, T, D, layout=layout))
    pattern = P.sink_window(sinks, window) if sinks else P.sliding_window(window)
    ref = attend(q, k, v, pattern=pattern, backend="reference")
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    fast_in = [t.detach().to("cuda", dtype).requires_grad_() for t in (q, k, v)]
    assert choose_backend(*fast_in, pattern, None, False, 0) == "cudnn"
    out = attend(*fast_in, pattern=pattern)
    assert out.stride() == fast_in[0].stride()  # the output keeps q's layout
    assert rel_rms(ref, out.cpu()) < 1e-2
    grads = torch.autograd.grad(out, fast_in, g.to("cuda", dtype).transpose(1, 2).contiguous().transpose(1, 2))
    for name, a, b in zip("qkv", grads, ref_grads):
        if name in "qk" and window == 1 and not sinks:  # one key per row: weight 1 whatever q and k are
            assert b.abs().max() < 1e-12 and a.abs().max() < 1e-4
        else:
            assert rel_rms(b, a.cpu()) < 1e-2, name


@pytest.mark.cuda
@pytest.mark.parametrize("sinks", [0, 4])
def test_cuda_band_compiles_and_matches_flex(sinks):
    """The custom ops under torch.compile, equal to FlexAttention on the same pattern."""
    _require_frontend()
    q, k, v = (t.cuda().requires_grad_() for t in _qkv(1, 4, 4, 1024, 64, dtype=torch.bfloat16, seed=1))
    pattern = P.sink_window(sinks, 200)

    @torch.compile(fullgraph=True)
    def band(q, k, v):
        return cudnn_band.band_attention(q, k, v, window=200, sink_tokens=sinks)

    out = band(q, k, v)
    ref = attend(q, k, v, pattern=pattern, backend="flex")
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    out.float().square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_unreadable_layouts_are_copied_inside_the_ops():
    """Under torch.compile the refusal cannot read storage offsets, so the ops copy such inputs."""
    padded = torch.zeros(1, 2, 64, 20)[..., 2:18]
    shifted = torch.arange(4 + 2 * 64 * 16, dtype=torch.float32)[4:].view(1, 2, 64, 16)  # contiguous, offset 4
    for t in (padded, shifted):
        assert not cudnn_band._is_readable(t)
        copy = cudnn_band._readable(t)
        assert cudnn_band._is_readable(copy) and torch.equal(copy, t)
    aligned = torch.zeros(1, 2, 64, 16)
    assert cudnn_band._readable(aligned) is aligned


def test_availability_is_a_constant_to_torch_compile(monkeypatch):
    """The first availability check may happen inside a graph compiled with fullgraph=True (a
    layer compiled in a fresh process picks its backend while traced); torch.backends.cudnn.version()
    there was a graph break that failed the CUDA suite's compile tests. Made to look like a CUDA
    machine on CPU: the check must trace as a constant."""
    monkeypatch.setattr(cudnn_band, "_cuda_available", lambda: True)
    monkeypatch.setattr(cudnn_band, "_frontend", lambda: object())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(cudnn_band, "_AVAILABLE", {})
    torch._dynamo.reset()

    def pick(x):
        return x + 1 if cudnn_band.available(torch.device("cuda", 0)) else x - 1

    expected = pick(torch.zeros(2))
    monkeypatch.setattr(cudnn_band, "_AVAILABLE", {})
    torch.testing.assert_close(torch.compile(pick, fullgraph=True)(torch.zeros(2)), expected)
