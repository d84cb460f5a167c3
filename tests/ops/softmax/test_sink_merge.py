"""The sink merge (sinks outside a band, added by log-sum-exp) against the float64 reference.

On CPU the Triton kernels run under TRITON_INTERPRET=1; the band part is the reference's
sliding window, and its backward is the ring-attention identity written out below, so the
test checks both the kernels and the identity the cuDNN path relies on.
"""

import pytest
import torch

from attnkit import patterns as P
from attnkit.ops import attend_reference
from attnkit.ops.softmax import sink_merge_triton as sm

pytestmark = pytest.mark.skipif(not sm.available(), reason="needs triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels need CUDA tensors unless interpreted


def _band_backward_given_merged(q, k, v, out, grad_out, lse, window, scale):
    """The band keys' gradients computed with the *merged* output and lse (what cuDNN's backward is handed)."""
    T, S = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    i, j = torch.arange(T, device=q.device)[:, None], torch.arange(S, device=q.device)[None, :]
    band = (j <= i) & (i - j < window)
    p = torch.where(band, torch.exp(scale * q @ kk.transpose(-1, -2) - lse), 0.0)
    dp = grad_out @ vv.transpose(-1, -2)
    ds = p * (dp - (grad_out * out).sum(-1, keepdim=True))
    dq = scale * ds @ kk
    dk = (scale * ds.transpose(-1, -2) @ q).unflatten(1, (k.shape[1], group)).sum(2)
    dv = (p.transpose(-1, -2) @ grad_out).unflatten(1, (k.shape[1], group)).sum(2)
    return dq, dk, dv


@pytest.mark.parametrize("n_sink,window,Hq,Hkv,T,D", [
    (4, 16, 4, 2, 100, 32),
    (1, 1, 2, 2, 70, 16),
    (3, 200, 2, 1, 90, 16),   # window longer than the sequence: every sink already inside the band
    (20, 8, 2, 2, 64, 16),    # more sinks than 16: the sink tile pads to 32 columns
])
def test_merge_forward_and_backward_match_reference(n_sink, window, Hq, Hkv, T, D):
    g = torch.Generator().manual_seed(n_sink * 100 + window)
    B, scale = 2, D ** -0.5
    q = torch.randn(B, T, Hq, D, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_()  # strided
    k = torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64).requires_grad_()
    v = torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64).requires_grad_()
    ref, ref_lse = attend_reference(q, k, v, pattern=P.sink_window(n_sink, window), return_lse=True)
    grad_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)

    q32, k32, v32 = (t.detach().float().to(DEVICE) for t in (q, k, v))
    o_band, lse_band = attend_reference(q32, k32, v32, pattern=P.sliding_window(window), return_lse=True)
    out, lse = sm.sink_merge_forward(q32, k32[:, :, :n_sink], v32[:, :, :n_sink], o_band, lse_band.unsqueeze(-1),
                                     window, scale)
    torch.testing.assert_close(out.double().cpu(), ref.detach(), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.squeeze(-1).double().cpu(), ref_lse.detach(), atol=2e-5, rtol=2e-5)

    go = grad_out.float().to(DEVICE)
    dq, dk, dv = _band_backward_given_merged(q32, k32, v32, out, go, lse, window, scale)
    dk_sink, dv_sink = sm.sink_merge_backward(q32, k32[:, :, :n_sink], v32[:, :, :n_sink], out, go, lse, dq, window,
                                              scale)
    dk[:, :, :n_sink] += dk_sink
    dv[:, :, :n_sink] += dv_sink
    for name, a, b in zip("qkv", (dq, dk, dv), ref_grads):
        torch.testing.assert_close(a.double().cpu(), b, atol=5e-5, rtol=5e-5, msg=name)


def test_merge_refuses_too_many_sinks():
    q = torch.zeros(1, 2, 8, 16, device=DEVICE)
    k = torch.zeros(1, 2, sm.MAX_SINKS + 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="sink_tokens must be between 1 and"):
        sm.sink_merge_forward(q, k, k, q, torch.zeros(1, 2, 8, 1, device=DEVICE), 4, 0.25)
