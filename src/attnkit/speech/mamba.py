"""Mamba's selective scan (S6) in plain PyTorch, and the Mamba block built on it.

Paper: Mamba: Linear-Time Sequence Modeling with Selective State Spaces (Gu and Dao, arXiv 2312.00752).
Used by MambAttention (arXiv 2507.00966) and SEMamba (arXiv 2405.06573) as a *bidirectional* block
(:class:`BiMamba`) along the time axis and along the frequency axis of a spectrogram.

The scan, per channel e (E = expand * C channels) and state n (N states), over positions t::

    dt_t   = softplus(delta_t + delta_bias)                 (when delta_softplus)
    h_t    = exp(dt_t * A[e, n]) * h_{t-1} + dt_t * B_t[n] * u_t      (zero-order hold on A, Euler on B)
    y_t    = sum_n C_t[n] * h_t[n] + D[e] * u_t
    y_t   *= silu(z_t)                                       (when z is given)

Shapes (mamba_ssm's layout): u, delta, z ``[B, E, L]``; A ``[E, N]``; B, C ``[B, N, L]``; D, delta_bias ``[E]``.

Two implementations, tested against each other (forward and every gradient, float64):

- :func:`selective_scan_reference`: the recurrence above, one position at a time, in float64.
- :func:`selective_scan`: chunked, with chunk log decays. The sequence is cut into chunks of Q =
  ``chunk_size`` positions, laid out ``[Q, B, E, L/Q, N]`` so each position of every chunk is one
  contiguous slice. (1) Inside every chunk at once, the recurrence from a zero state (a loop of Q
  steps over ``[B, E, L/Q, N]``), keeping only each chunk's last state. (2) The state entering each
  chunk: the pairs (chunk log decay ``sum_t dt_t A``, last state) compose associatively,
  ``(a1, b1) o (a2, b2) = (a1 + a2, exp(a2) b1 + b2)``, scanned by a Hillis-Steele parallel prefix over
  the L/Q chunks (log2(L/Q) steps). (3) The Q steps again from the entering states, reading out
  ``y_t = C_t . h_t`` on the way. Python runs 2Q + log2(L/Q) steps instead of L, the work stays O(L)
  and no ``[B, E, L, N]`` state tensor is kept beyond the decays and inputs (a full parallel prefix is
  O(L log L) and a cumulative-decay correction needs two more such tensors: both measured slower on
  one CPU thread, where the scan is memory-bound). Only exponentials of non-positive numbers appear
  when A < 0 (Mamba's ``A = -exp(A_log)``), so nothing overflows, unlike the ``exp(-cumsum)``
  rescaling trick.

The CUDA package: ``mamba-ssm`` (2.3.2.post1, PyPI) ships only as a source distribution whose build
needs ``nvcc``; on this CPU-only machine ``pip download mamba-ssm`` fails at metadata generation
("nvcc was not found"), and the copy the official MambAttention code vendors (``mamba_ssm`` 1.2.2)
imports the compiled ``selective_scan_cuda`` at module level, so it cannot run on CPU. A pure-PyTorch package exists on
PyPI (``mambapy`` 1.2.0, last released 2024-07); it was neither installed nor used. This module is
therefore the path used here; it is not a drop-in for the fused CUDA kernel's speed (on one CPU
thread the scan is memory-bound: roughly 70 ns per element of ``[B, E, L, N]`` forward + backward,
measured on a shared 2-core machine).

Example::

    >>> import torch
    >>> from attnkit.speech.mamba import MambaBlock, selective_scan, selective_scan_reference
    >>> u, delta = torch.randn(2, 8, 50), torch.randn(2, 8, 50)
    >>> A, B, C = -torch.rand(8, 4), torch.randn(2, 4, 50), torch.randn(2, 4, 50)
    >>> fast = selective_scan(u, delta, A, B, C, delta_softplus=True, chunk_size=16)
    >>> ref = selective_scan_reference(u, delta, A, B, C, delta_softplus=True)
    >>> bool(torch.allclose(fast.double(), ref, atol=1e-5))
    True
    >>> MambaBlock(16)(torch.randn(2, 50, 16)).shape
    torch.Size([2, 50, 16])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import positive_int

__all__ = ["selective_scan", "selective_scan_reference", "MambaBlock", "BiMamba", "SCANS", "mamba_flops",
           "mamba_block_reference", "bimamba_reference"]

#: the scan implementations a :class:`MambaBlock` can use
SCANS = ("chunked", "reference")


def _check_scan_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D, z, delta_bias) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must be [B, E, L], got shape {tuple(u.shape)}")
    batch, channels, length = u.shape
    if A.dim() != 2 or A.shape[0] != channels:
        raise ValueError(f"A must be [E, N] with E = {channels} (u's channels), got shape {tuple(A.shape)}")
    state = A.shape[1]
    expected = {"delta": (delta, (batch, channels, length)), "B": (B, (batch, state, length)),
                "C": (C, (batch, state, length))}
    if z is not None:
        expected["z"] = (z, (batch, channels, length))
    if D is not None:
        expected["D"] = (D, (channels,))
    if delta_bias is not None:
        expected["delta_bias"] = (delta_bias, (channels,))
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)} (u [B, E, L] = {list(u.shape)}, A [E, N] = "
                             f"{list(A.shape)}), got {list(tensor.shape)}")


def selective_scan_reference(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                             z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                             return_last_state: bool = False):
    """The S6 recurrence, one position at a time, in float64 (see the module docstring).

    Returns ``y [B, E, L]`` (float64) or ``(y, last_state [B, E, N])``."""
    _check_scan_shapes(u, delta, A, B, C, D, z, delta_bias)
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, channels, length = u.shape
    h = u.new_zeros(batch, channels, A.shape[1])  # (B, E, N)
    ys = []
    for t in range(length):
        decay = torch.exp(delta[:, :, t, None] * A)  # (B, E, N)
        h = decay * h + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))  # (B, E)
    y = torch.stack(ys, dim=-1)  # (B, E, L)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        y = y * F.silu(z.double())
    return (y, h) if return_last_state else y


def _prefix_scan(log_decay: Tensor, value: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Hillis-Steele inclusive scan of ``(a, b) o (a', b') = (a + a', exp(a') b + b')`` along ``dim``.

    Returns the cumulative log decay and the state from a zero start at every position."""
    length = log_decay.shape[dim]
    step = 1
    while step < length:
        head_a, tail_a = log_decay.split((step, length - step), dim)
        head_b, tail_b = value.split((step, length - step), dim)
        prev_a = log_decay.narrow(dim, 0, length - step)
        prev_b = value.narrow(dim, 0, length - step)
        value = torch.cat((head_b, tail_b + torch.exp(tail_a) * prev_b), dim)
        log_decay = torch.cat((head_a, tail_a + prev_a), dim)
        step *= 2
    return log_decay, value


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, chunk_size: int = 8):
    """The S6 scan, chunked: a short loop inside all chunks at once, a parallel prefix across chunk ends.

    Same arguments and result as :func:`selective_scan_reference`, in the inputs' dtype; ``chunk_size``
    Q is the number of positions per chunk (any positive int; Q >= L is the plain loop run twice,
    Q = 1 a full parallel prefix)."""
    _check_scan_shapes(u, delta, A, B, C, D, z, delta_bias)
    positive_int(chunk_size, "chunk_size")
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, channels, length = u.shape
    state = A.shape[1]
    chunk = min(chunk_size, length)
    chunks = -(-length // chunk)
    pad = chunks * chunk - length  # padded positions sit at the end: decay 1, input 0, the state unchanged

    def by_position(t: Tensor) -> Tensor:  # [B, X, L] -> [Q, B, X, chunks]: a contiguous slice per position
        return F.pad(t, (0, pad)).view(t.shape[0], t.shape[1], chunks, chunk).permute(3, 0, 1, 2)

    dt = by_position(delta)  # (Q, B, E, chunks)
    decays = torch.exp(dt.unsqueeze(-1) * A[None, None, :, None, :]).unbind(0)  # Q x (B, E, chunks, N)
    inputs = (dt * by_position(u)).unsqueeze(-1) * by_position(B).transpose(2, 3).unsqueeze(2)  # (Q,B,E,chunks,N)
    readout = by_position(C).transpose(2, 3).unsqueeze(2)  # (Q, B, 1, chunks, N)
    steps = inputs.unbind(0)
    # (1) each chunk from a zero state, all chunks at once: only its last state is kept
    h = steps[0]
    for q in range(1, chunk):
        h = decays[q] * h + steps[q]  # (B, E, chunks, N)
    # (2) the state entering each chunk: a parallel prefix over the chunks' (total log decay, last state)
    chunk_log_decay = dt.sum(0).unsqueeze(-1) * A[None, :, None, :]  # (B, E, chunks, N)
    _, leaving = _prefix_scan(chunk_log_decay, h, dim=2)
    h = torch.cat((leaving.new_zeros(batch, channels, 1, state), leaving[:, :, :-1]), dim=2)
    # (3) the chunks again, from their entering states, reading out y at every position
    ys = []
    for q in range(chunk):
        h = decays[q] * h + steps[q]
        ys.append((h * readout[q]).sum(-1))  # (B, E, chunks)
    y = torch.stack(ys, dim=-1).reshape(batch, channels, chunks * chunk)[:, :, :length]  # (B, E, L)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return (y, h[:, :, -1]) if return_last_state else y  # padding keeps the state: decay 1, input 0


class MambaBlock(nn.Module):
    """The Mamba mixer (Gu and Dao, arXiv 2312.00752): ``x [B, L, C] -> [B, L, C]``, causal.

    ``in_proj`` C -> 2E (x and gate z); depthwise causal conv (kernel ``d_conv``) and SiLU on x;
    ``x_proj`` E -> (R + 2N) gives the input-dependent dt (rank R, then ``dt_proj`` R -> E), B and C;
    the selective scan with ``A = -exp(A_log)`` and skip ``D``; gate ``silu(z)``; ``out_proj`` E -> C.
    E = ``expand`` * C, R = ceil(C / 16) by default. Initialisation follows the paper's code: A_log =
    log(1..N) per channel, D = 1, dt's bias the inverse softplus of a log-uniform dt in
    [``dt_min``, ``dt_max``].

    Args:
        dim: C. d_state: N (16 in the paper; MambAttention uses 16). d_conv: conv kernel (4).
        expand: E / C (MambAttention's config: 4; the Mamba default: 2). dt_rank: R or ``"auto"``.
        scan: ``"chunked"`` (:func:`selective_scan`) or ``"reference"`` (the float64 loop, for tests).
        chunk_size: Q of the chunked scan.

    Example::

        >>> import torch
        >>> MambaBlock(16, d_state=8)(torch.randn(2, 30, 16)).shape
        torch.Size([2, 30, 16])
    """

    def __init__(self, dim: int, *, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank="auto",
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4, scan: str = "chunked",
                 chunk_size: int = 8) -> None:
        super().__init__()
        positive_int(dim, "dim")
        positive_int(d_state, "d_state")
        positive_int(d_conv, "d_conv")
        positive_int(expand, "expand")
        positive_int(chunk_size, "chunk_size")
        if dt_rank == "auto":
            dt_rank = math.ceil(dim / 16)
        positive_int(dt_rank, "dt_rank")
        if scan not in SCANS:
            raise ValueError(f"scan must be one of {', '.join(SCANS)}, got {scan!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        inner = expand * dim
        self.dim, self.d_state, self.d_conv, self.expand, self.dt_rank = dim, d_state, d_conv, expand, dt_rank
        self.inner, self.scan, self.chunk_size = inner, scan, chunk_size
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv = nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, inner, bias=True)
        self.out_proj = nn.Linear(inner, dim, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(inner, 1))
        self.D = nn.Parameter(torch.ones(inner))
        with torch.no_grad():
            bound = dt_rank**-0.5
            self.dt_proj.weight.uniform_(-bound, bound)
            dt = torch.exp(torch.rand(inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, L, C] with C = {self.dim}, got shape {tuple(x.shape)}")
        length = x.shape[1]
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (B, L, E) each
        xs = F.silu(self.conv(xs.transpose(1, 2))[..., :length])  # (B, E, L), causal
        dt, B, C = self.x_proj(xs.transpose(1, 2)).split((self.dt_rank, self.d_state, self.d_state), dim=-1)
        delta = (dt @ self.dt_proj.weight.T).transpose(1, 2)  # (B, E, L); the bias goes in the scan
        args = (xs, delta, -torch.exp(self.A_log), B.transpose(1, 2), C.transpose(1, 2), self.D)
        kwargs = dict(z=z.transpose(1, 2), delta_bias=self.dt_proj.bias, delta_softplus=True)
        if self.scan == "chunked":
            y = selective_scan(*args, **kwargs, chunk_size=self.chunk_size)
        else:
            y = selective_scan_reference(*args, **kwargs).to(x.dtype)
        return self.out_proj(y.transpose(1, 2))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, d_state={self.d_state}, d_conv={self.d_conv}, expand={self.expand}, scan={self.scan!r}"


class BiMamba(nn.Module):
    """Bidirectional Mamba as in SEMamba / MambAttention: ``x [B, L, C] -> [B, L, C]``.

    Two independent pre-norm residual Mamba layers, one over the sequence and one over its reverse::

        fwd = x + Mamba_f(RMSNorm_f(x))
        bwd = flip(flip(x) + Mamba_b(RMSNorm_b(flip(x))))
        y   = Linear_{2C -> C}([fwd, bwd])

    The official code's ``mamba_ssm`` ``Block`` (RMSNorm, then the mixer, residual kept) per direction
    and its 1x1 ``ConvTranspose1d`` 2C -> C; the caller adds the outer residual. The official code's
    RMSNorm is a fused Triton kernel; here ``nn.RMSNorm`` (eps 1e-5), the same math.
    """

    def __init__(self, dim: int, **mamba_options) -> None:
        super().__init__()
        self.norm_forward = nn.RMSNorm(dim, eps=1e-5)
        self.norm_backward = nn.RMSNorm(dim, eps=1e-5)
        self.forward_mamba = MambaBlock(dim, **mamba_options)
        self.backward_mamba = MambaBlock(dim, **mamba_options)
        self.merge = nn.Linear(2 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        forward = x + self.forward_mamba(self.norm_forward(x))
        reverse = x.flip(1)
        backward = (reverse + self.backward_mamba(self.norm_backward(reverse))).flip(1)
        return self.merge(torch.cat((forward, backward), dim=-1))


def mamba_block_reference(x: Tensor, mamba: MambaBlock) -> Tensor:
    """:class:`MambaBlock` ``x [N, L, C] -> [N, L, C]`` from its parameters, in float64: the conv as an
    explicit sum over taps, the scan by :func:`selective_scan_reference`."""
    p = {name: t.double() for name, t in mamba.named_parameters()}
    x = x.double()
    length = x.shape[1]
    xs, z = (x @ p["in_proj.weight"].T).chunk(2, dim=-1)  # (N, L, E)
    kernel = p["conv.weight"][:, 0]  # (E, K): tap j multiplies the input j - (K - 1) positions back
    taps = kernel.shape[1]
    padded = F.pad(xs, (0, 0, taps - 1, 0))
    conv = sum(padded[:, j:j + length] * kernel[:, j] for j in range(taps)) + p["conv.bias"]
    xs = F.silu(conv)
    dt, B, C = (xs @ p["x_proj.weight"].T).split((mamba.dt_rank, mamba.d_state, mamba.d_state), dim=-1)
    delta = dt @ p["dt_proj.weight"].T
    y = selective_scan_reference(xs.transpose(1, 2), delta.transpose(1, 2), -torch.exp(p["A_log"]),
                                 B.transpose(1, 2), C.transpose(1, 2), p["D"], z=z.transpose(1, 2),
                                 delta_bias=p["dt_proj.bias"], delta_softplus=True)
    return y.transpose(1, 2) @ p["out_proj.weight"].T


def _rms_norm_reference(x: Tensor, norm: nn.RMSNorm) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.double()


def bimamba_reference(x: Tensor, bi: BiMamba) -> Tensor:
    """:class:`BiMamba` in float64 from its parameters (RMSNorm written out, :func:`mamba_block_reference`)."""
    x = x.double()
    forward = x + mamba_block_reference(_rms_norm_reference(x, bi.norm_forward), bi.forward_mamba)
    reverse = x.flip(1)
    backward = reverse + mamba_block_reference(_rms_norm_reference(reverse, bi.norm_backward), bi.backward_mamba)
    return torch.cat((forward, backward.flip(1)), -1) @ bi.merge.weight.double().T + bi.merge.bias.double()


def mamba_flops(tokens: int, dim: int, *, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank="auto") -> float:
    """Forward FLOPs of one :class:`MambaBlock` over ``tokens`` positions (all sequences together):
    the projections ``2 * tokens * (C*2E + E*(R+2N) + R*E + E*C)``, the depthwise conv
    ``2 * tokens * E * d_conv`` and the scan ``~9 * tokens * E * N`` (decay, input, update, readout)."""
    rank = math.ceil(dim / 16) if dt_rank == "auto" else dt_rank
    inner = expand * dim
    projections = 2.0 * tokens * (dim * 2 * inner + inner * (rank + 2 * d_state) + rank * inner + inner * dim)
    return projections + 2.0 * tokens * inner * d_conv + 9.0 * tokens * inner * d_state
