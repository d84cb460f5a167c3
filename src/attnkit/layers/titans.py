"""Titans: a neural long-term memory learned at test time, and three ways to put it beside attention.

Titans: Learning to Memorize at Test Time (Behrouz, Zhong, Mirrokni, arXiv 2501.00663). No
official code was published with the paper; this file follows the paper's equations.

The memory (per head) is an MLP ``M_W`` (``memory_depth`` linear maps, SiLU between them) whose
weights ``W`` are the state. Each token writes itself by one step of gradient descent on the
associative loss, with momentum (the "surprise") and forgetting (weight decay)::

    q_t, k_t = l2norm(SiLU(x_t W_Q)), l2norm(SiLU(x_t W_K));  v_t = SiLU(x_t W_V)     per head, (D,)
    alpha_t, eta_t = sigmoid(x_t w_alpha), sigmoid(x_t w_eta);  theta_t = max_lr * sigmoid(x_t w_theta)
    u_t = grad_W || M_{W'}(k_t) - v_t ||^2          W' = the weights at the start of t's chunk
    S_t = eta_t S_{t-1} - theta_t u_t               momentum: past surprise plus momentary surprise
    W_t = (1 - alpha_t) W_{t-1} + S_t               forgetting gate alpha
    y_t = M_{W_t}(q_t)                              retrieval, W_t includes token t's own write

``M_W`` ends in an RMS norm with a learned per-head gain, ``M_W(x) = g * z / rms(z)`` for the
last linear map's output ``z`` (``output_norm=True``, the default). The paper's memory has no
such norm; without it the memory is unstable at the paper's own settings: every gradient of a
chunk is taken at the chunk's first weights ``W'`` while the momentum keeps adding them up, so
one chunk moves ``W`` by about ``theta / (1 - eta)`` times the chunk's summed curvature
(``2 |a|^2`` per token and layer, ``a`` the layer's input), which passes the stable limit of 2
at ``max_lr=0.1``, momentum 0.88 and 16-64 tokens; the weights then grow by a factor per chunk
until they overflow (``titans-mal``, whose memory output enters the residual stream unnormed,
diverged in training; MAG and MAC hid it behind their own norms). With the norm the loss is
invariant to the scale of the last map, so its gradient shrinks as the weights grow and the
memory stays finite at every gate value (``tests/layers/test_titans.py``). The norm follows
TTT (Sun et al., arXiv 2407.04620), whose inner model ends in a layer norm, as does the
widely used reimplementation lucidrains/titans-pytorch. ``output_norm=False`` is the paper's
plain memory.

Taking every gradient in a chunk of ``chunk_size`` tokens at the chunk's first weights ``W'``
is the paper's mini-batch formulation (section 3.2): within a chunk the updates are then
linear in the per-token gradients, ``W_t = A_t W_0 + d_t S_0 - sum_{i<=t} C_ti u_i`` with
``A, d, C`` cumulative products of the gates, and each ``u_i`` of a linear map is the outer
product ``delta_i a_i^T`` of the backpropagated error and the input. So ``M_{W_t}(q_t)``
for all t of a chunk costs a few ``[chunk, chunk]`` matrix products per layer (the "dual
form"), and the chunks run one after another. :func:`titans_memory_reference` is the same
computation token by token, with the gradient taken by autograd.

The three architectures (section 4), each one :class:`AttentionLayer` ``x [B, T, C] -> [B, T, C]``:

- :class:`TitansMAC`, memory as context: the sequence is cut into segments of ``chunk_size``;
  for segment ``i`` the memory as of the segment's start is read, ``h_t = M_{W_i}(q_t)``;
  attention runs over ``[persistent tokens, h, segment]`` (causal inside the segment); its
  output ``y`` is written into the memory token by token, and ``o_t = y_t (x) M_{W_t}(y_t)``.
- :class:`TitansMAG`, memory as gate: sliding-window attention (with persistent tokens) and
  the memory branch both read ``x``; ``o = W_o(norm(attn) * sigmoid(norm(memory)))``.
- :class:`TitansMAL`, memory as a layer: the memory sub-layer, then sliding-window attention,
  each with its residual: ``h = x + M(x)``, the layer returns ``M(x) + SWA(h)`` (``= out - x``).

Persistent memory: ``num_persistent`` learned key/value pairs per head that every query
sees (merged with the attention by log-sum-exp). What this implementation leaves out of the
paper's full design: the depthwise convolutions after the q/k/v projections, the
persistent tokens passing through the memory (they reach the attention only), and
per-chunk gates as a speed option (the gates here are per token). What differs from
multi-head attention: a memory of fixed size (``sum_l out_l * in_l`` numbers per head,
plus momentum) carries the context beyond the attention window or segment.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import head_dim_of, positive_int
from ..cards import Capabilities, Card, FlopCount, dense_attention_flops
from ..ops import attend
from ..patterns import sliding_window
from ..rope import RotaryEmbedding
from ..state import SinkWindowCache, State
from .base import AttentionLayer, check_input
from .multi_head import head_shape, rotate_and_cache

__all__ = ["NeuralMemory", "TitansMAC", "TitansMAG", "TitansMAL", "titans_memory_reference", "TITANS_BACKENDS"]

TITANS_BACKENDS = ("chunked", "reference")


def _silu_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


_NORM_EPS = 1e-6


def _out_norm(z: Tensor, gain: Tensor | None) -> Tensor:
    """The memory's output norm ``gain * z / rms(z)`` over the last dim (identity for ``gain=None``)."""
    if gain is None:
        return z
    return z * torch.rsqrt(z.square().mean(-1, keepdim=True) + _NORM_EPS) * gain


def _mlp(weights: list[Tensor], x: Tensor, gain: Tensor | None = None) -> Tensor:
    """``M_W(x)``: weights ``[B, H, out, in]`` each, x ``[B, H, N, in]`` -> ``[B, H, N, out]``;
    ``gain [H, 1, out]``: the output norm (``None``: none)."""
    for layer, w in enumerate(weights):
        x = x @ w.transpose(-1, -2)
        if layer < len(weights) - 1:
            x = F.silu(x)
    return _out_norm(x, gain)


def _chunk_gates(log_keep: Tensor, log_eta: Tensor, theta: Tensor) -> tuple[Tensor, ...]:
    """The gate products of pieces of ``n`` tokens, ``[..., n]`` each (any leading dims, so all
    whole chunks of a call at once): ``coeff [..., n, n]`` (C), ``scale_start`` (A), ``scale_momentum``
    (d), ``last`` (C's last row), ``eta_last`` and ``eta_total [...]`` (the momentum's carry)."""
    n = log_keep.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=log_keep.device).tril()
    # keep[t, j] = prod_{j < s <= t}(1 - alpha_s), carry[j, i] = prod_{i < s <= j} eta_s
    cum_keep, cum_eta = log_keep.cumsum(-1), log_eta.cumsum(-1)
    keep = (cum_keep[..., :, None] - cum_keep[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    carry = (cum_eta[..., :, None] - cum_eta[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    coeff = (keep @ carry) * theta[..., None, :]  # C[t, i]
    scale_start = cum_keep.exp()  # A_t
    scale_momentum = (keep @ cum_eta.exp()[..., None]).squeeze(-1)  # d_t
    eta_last = (cum_eta[..., -1:] - cum_eta).exp() * theta
    return coeff, scale_start, scale_momentum, coeff[..., -1, :], eta_last, cum_eta[..., -1].exp()


def _memory_chunk(q, k, v, gates, grad_base, start, momentum, gain=None, qk=None):
    """One chunk (or a piece of one) of the memory in the dual form.

    q, k, v ``[B, H, n, D]``; gates: :func:`_chunk_gates` of the piece's log(1 - alpha), log(eta)
    and theta; grad_base, start, momentum: per-layer weights ``[B, H, out, in]`` (the chunk's
    first weights W', the weights and the momentum before this piece); gain: the output norm's
    ``[H, 1, D]`` or ``None``; qk: ``q @ k^T [B, H, n, n]`` if already computed. Returns
    ``(y [B, H, n, D], weights after the piece, momentum after the piece)``.
    """
    coeff, scale_start, scale_momentum, last, eta_last, eta_total = gates
    # the error of every token at W', backpropagated through the MLP: u_i = delta_i a_i^T per layer
    inputs, pre = [k], []
    x = k
    for layer, w in enumerate(grad_base):
        z = x @ w.transpose(-1, -2)  # (B, H, n, out)
        pre.append(z)
        x = F.silu(z) if layer < len(grad_base) - 1 else z
        inputs.append(x)
    deltas = [None] * len(grad_base)
    if gain is None:
        delta = 2 * (x - v)
    else:  # back through gain * x / rms(x): (g - n mean(g n)) / rms(x), n = x / rms(x)
        inv_rms = torch.rsqrt(x.square().mean(-1, keepdim=True) + _NORM_EPS)
        normed = x * inv_rms
        g = 2 * (normed * gain - v) * gain
        delta = (g - normed * (g * normed).mean(-1, keepdim=True)) * inv_rms
    for layer in reversed(range(len(grad_base))):
        deltas[layer] = delta
        if layer:
            delta = (delta @ grad_base[layer]) * _silu_grad(pre[layer - 1])
    # retrieval with each token's own weights W_t
    r = q
    for layer in range(len(start)):
        scores = qk if layer == 0 and qk is not None else r @ inputs[layer].transpose(-1, -2)
        z = (scale_start[..., None] * (r @ start[layer].transpose(-1, -2))
             + scale_momentum[..., None] * (r @ momentum[layer].transpose(-1, -2))
             - (coeff * scores) @ deltas[layer])
        r = F.silu(z) if layer < len(start) - 1 else _out_norm(z, gain)
    new_weights, new_momentum = [], []
    for layer in range(len(start)):
        grads = lambda c: (deltas[layer] * c[..., None]).transpose(-1, -2) @ inputs[layer]  # noqa: E731
        new_weights.append(scale_start[..., -1, None, None] * start[layer]
                           + scale_momentum[..., -1, None, None] * momentum[layer] - grads(last))
        new_momentum.append(eta_total[..., None, None] * momentum[layer] - grads(eta_last))
    return r, new_weights, new_momentum


def titans_memory_reference(q, k, v, log_keep, log_eta, theta, weights, momentum, grad_base, offset: int,
                            chunk_size: int, gain: Tensor | None = None):
    """The memory token by token, each gradient by autograd (float64 for tests).

    Same arguments as the chunked path over a whole call: ``offset`` is the absolute position
    of the first token (chunks start at multiples of ``chunk_size``); ``gain [H, 1, D]``: the
    output norm (``None``: none). Returns ``(y [B, H, T, D],
    weights, momentum, grad_base)`` after the last token.
    """
    outputs = []
    with torch.enable_grad():
        for t in range(q.shape[2]):
            if (offset + t) % chunk_size == 0:
                grad_base = list(weights)
            base = [w if w.requires_grad else w.detach().requires_grad_() for w in grad_base]
            loss = (_mlp(base, k[:, :, t, None], gain) - v[:, :, t, None]).square().sum()
            grads = torch.autograd.grad(loss, base, create_graph=True)
            a, e, th = (g[:, :, t, None, None] for g in (log_keep.exp(), log_eta.exp(), theta))
            momentum = [e * s - th * g for s, g in zip(momentum, grads)]
            weights = [a * w + s for w, s in zip(weights, momentum)]
            outputs.append(_mlp(weights, q[:, :, t, None], gain))
    return torch.cat(outputs, dim=2), weights, momentum, grad_base


class NeuralMemory(nn.Module):
    """The long-term memory alone: ``x [B, T, C] -> [B, T, C]`` (module docstring).

    Args:
        dim: width C. num_heads: H. head_dim: D (default C // H).
        memory_depth: linear maps in the memory MLP (1: a linear memory ``D x D``).
        memory_expansion: hidden width of the MLP in multiples of D.
        chunk_size: tokens whose gradients share the chunk's first weights.
        max_lr: the largest test-time learning rate ``theta``. Measured on small models
            (docs/mechanisms/memory.md): at the default 0.1 the memory's updates made a 2-layer,
            C = 64 ``titans-mag`` learn MQAR far worse than its own attention alone (0.045 against
            0.241 at ``max_lr=0.001``, window over the whole sequence); try smaller values first.
        output_norm: end the memory in an RMS norm with a learned per-head gain (module
            docstring: without it the memory's weights overflow at long inputs).
        backend: ``"chunked"`` (dual form, chunk by chunk) or ``"reference"`` (token by token).

    The memory's state is a dict of per-layer tensors ``[B, H, out, in]``: ``w`` (weights
    minus the learned initial weights), ``s`` (momentum), ``g`` (the chunk's first weights
    minus the initial weights); zeros at the start of a sequence.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, *, memory_depth: int = 2, memory_expansion: int = 2,
                 chunk_size: int = 64, max_lr: float = 0.1, output_norm: bool = True,
                 backend: str = "chunked") -> None:
        super().__init__()
        positive_int(memory_depth, "memory_depth")
        positive_int(memory_expansion, "memory_expansion")
        positive_int(chunk_size, "chunk_size")
        if isinstance(max_lr, bool) or not isinstance(max_lr, (int, float)) or not max_lr > 0:
            raise ValueError(f"max_lr must be a positive number (the largest test-time learning rate), got {max_lr!r}")
        if backend not in TITANS_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(TITANS_BACKENDS)}, got {backend!r}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.chunk_size, self.max_lr, self.backend = chunk_size, float(max_lr), backend
        inner = num_heads * head_dim
        self.qkv_proj = nn.Linear(dim, 3 * inner, bias=False)
        self.gate_proj = nn.Linear(dim, 3 * num_heads)  # alpha, eta, theta per head
        with torch.no_grad():  # start remembering: little forgetting, strong momentum, a moderate rate
            self.gate_proj.bias.copy_(torch.tensor([-4.0, 2.0, 0.0]).repeat_interleave(num_heads))
        widths = [head_dim] + [memory_expansion * head_dim] * (memory_depth - 1) + [head_dim]
        self.initial = nn.ParameterList(
            nn.Parameter(torch.randn(num_heads, fan_out, fan_in) / fan_in**0.5)
            for fan_in, fan_out in zip(widths[:-1], widths[1:]))
        self.o_proj = nn.Linear(inner, dim, bias=False)
        if not isinstance(output_norm, bool):
            raise ValueError(f"output_norm must be True or False (an RMS norm on the memory's output), got {output_norm!r}")
        self.output_norm = nn.Parameter(torch.ones(num_heads, 1, head_dim)) if output_norm else None

    def _gain(self, dtype) -> Tensor | None:
        return None if self.output_norm is None else self.output_norm.to(dtype)

    def empty_state(self, batch_size: int, device=None, dtype=None) -> dict[str, Tensor]:
        dtype = dtype or (torch.float64 if self.o_proj.weight.dtype == torch.float64 else torch.float32)
        device = device if device is not None else self.o_proj.weight.device
        return {f"{name}{layer}": torch.zeros(batch_size, *w.shape, device=device, dtype=dtype)
                for name in ("w", "s", "g") for layer, w in enumerate(self.initial)}

    def project(self, x: Tensor):
        """``x [B, T, C]`` -> q, k, v ``[B, H, T, D]`` and log(1 - alpha), log(eta), theta ``[B, H, T]``."""
        B, T, _ = x.shape
        q, k, v = F.silu(self.qkv_proj(x)).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        a, e, th = self.gate_proj(x).view(B, T, 3, self.num_heads).permute(2, 0, 3, 1)
        return q, k, v, F.logsigmoid(-a), F.logsigmoid(e), self.max_lr * torch.sigmoid(th)

    def read(self, q: Tensor, memory: dict[str, Tensor] | None, at_chunk_start: bool = True) -> Tensor:
        """``M(q)`` without writing: ``q [B, H, n, D]`` through the chunk's first weights (or the
        current ones with ``at_chunk_start=False``)."""
        initial = [w.to(q.dtype) for w in self.initial]
        if memory is not None:
            name = "g" if at_chunk_start else "w"
            initial = [w + memory[f"{name}{layer}"].to(q.dtype) for layer, w in enumerate(initial)]
        return _mlp([w.expand(q.shape[0], *w.shape[-3:]) for w in initial], q, self._gain(q.dtype))

    def scan(self, q, k, v, log_keep, log_eta, theta, memory: dict[str, Tensor] | None, offset: int):
        """Write and read ``q, k, v [B, H, T, D]`` from ``memory`` (``None``: a fresh one) at
        absolute position ``offset``: ``(y [B, H, T, D], memory after)``."""
        B = q.shape[0]
        initial = [w.to(q.dtype).expand(B, *w.shape) for w in self.initial]
        if memory is None:
            weights, momentum, base = list(initial), [torch.zeros_like(w) for w in initial], list(initial)
        else:
            weights = [w + memory[f"w{i}"].to(q.dtype) for i, w in enumerate(initial)]
            momentum = [memory[f"s{i}"].to(q.dtype) for i in range(len(initial))]
            base = [w + memory[f"g{i}"].to(q.dtype) for i, w in enumerate(initial)]
        if self.backend == "reference":
            y, weights, momentum, base = titans_memory_reference(q, k, v, log_keep, log_eta, theta, weights, momentum,
                                                                 base, offset, self.chunk_size, self._gain(q.dtype))
        else:
            y, weights, momentum, base = self._chunked(q, k, v, log_keep, log_eta, theta, weights, momentum, base,
                                                       offset)
        after = {}
        for name, tensors in (("w", weights), ("s", momentum), ("g", base)):
            for i, value in enumerate(tensors):
                after[f"{name}{i}"] = value - initial[i] if name != "s" else value
        return y, after

    def _chunked(self, q, k, v, log_keep, log_eta, theta, weights, momentum, base, offset: int):
        """The dual form piece by piece: a partial first chunk (a call starting inside one), the
        whole chunks, a partial last chunk. What does not depend on the weights (the gate
        products, the first layer's ``q k^T``) is computed for all whole chunks at once."""
        T, c, gain = q.shape[2], self.chunk_size, self._gain(q.dtype)
        head = min((-offset) % c, T)  # tokens until the next chunk boundary
        whole = (T - head) // c
        spans = [(0, head)] if head else []
        spans += [(head + i * c, head + (i + 1) * c) for i in range(whole)]
        if head + whole * c < T:
            spans.append((head + whole * c, T))
        batched = None
        if whole > 1:  # [B, H, whole, c, ...] views of the whole chunks
            part = slice(head, head + whole * c)

            def split(t: Tensor) -> Tensor:
                return t[:, :, part].unflatten(2, (whole, c))

            batched = (_chunk_gates(split(log_keep), split(log_eta), split(theta)),
                       split(q) @ split(k).transpose(-1, -2))
        pieces = []
        for lo, hi in spans:
            if (offset + lo) % c == 0:
                base = weights
            part = slice(lo, hi)
            if batched is not None and hi - lo == c and lo >= head:
                i = (lo - head) // c
                gates, qk = tuple(g[:, :, i] for g in batched[0]), batched[1][:, :, i]
            else:
                gates, qk = _chunk_gates(log_keep[..., part], log_eta[..., part], theta[..., part]), None
            y, weights, momentum = _memory_chunk(q[:, :, part], k[:, :, part], v[:, :, part], gates, base, weights,
                                                 momentum, gain, qk)
            pieces.append(y)
        return torch.cat(pieces, dim=2), weights, momentum, base

    def forward(self, x: Tensor, memory: dict[str, Tensor] | None = None, offset: int = 0):
        """``x [B, T, C]`` -> ``(y [B, T, C], memory after)``."""
        B, T, _ = x.shape
        y, after = self.scan(*self.project(x), memory, offset)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), after


def _merge(parts: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Softmax attention over the union of key sets from each set's ``(out, lse)``."""
    lse = torch.logsumexp(torch.stack([p[1] for p in parts]), dim=0)
    total = 0
    for out, part_lse in parts:
        total = total + out * (part_lse - lse).exp().nan_to_num(0.0)[..., None].to(out.dtype)
    return total


def _check_options(window, num_persistent, head_dim, rope):
    positive_int(window, "window")
    if isinstance(num_persistent, bool) or not isinstance(num_persistent, int) or num_persistent < 0:
        raise ValueError(f"num_persistent must be an integer >= 0 (learned key/value pairs per head), "
                         f"got {num_persistent!r}")
    if rope and head_dim % 2:
        raise ValueError(f"rope=True needs an even head_dim, got {head_dim}")


class _Titans(AttentionLayer):
    """What the three architectures share: the memory, the attention projections, persistent tokens."""

    def __init__(self, dim: int, num_heads: int, *, head_dim: int | None, window: int, chunk_size: int,
                 memory_depth: int, memory_expansion: int, max_lr: float, num_persistent: int, rope: bool,
                 backend: str, output_norm: bool = True) -> None:
        super().__init__()
        positive_int(dim, "dim")
        positive_int(num_heads, "num_heads")
        head_dim = head_dim_of(dim, num_heads, head_dim)
        _check_options(window, num_persistent, head_dim, rope)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.window, self.chunk_size, self.num_persistent, self.backend = window, chunk_size, num_persistent, backend
        self.memory = NeuralMemory(dim, num_heads, head_dim, memory_depth=memory_depth,
                                   memory_expansion=memory_expansion, chunk_size=chunk_size, max_lr=max_lr,
                                   output_norm=output_norm, backend=backend)
        inner = num_heads * head_dim
        self.qkv_proj = nn.Linear(dim, 3 * inner, bias=False)
        self.o_proj = nn.Linear(inner, dim, bias=False)
        self.persistent_keys = nn.Parameter(torch.randn(num_heads, num_persistent, head_dim) / head_dim**0.5)
        self.persistent_values = nn.Parameter(torch.randn(num_heads, num_persistent, head_dim) / head_dim**0.5)
        self.rope = RotaryEmbedding(head_dim) if rope else None

    def _attend(self, q, k, v, pattern, q_offset=None) -> tuple[Tensor, Tensor]:
        backend = "reference" if self.backend == "reference" else "auto"
        return attend(q, k, v, pattern=pattern, q_offset=q_offset, return_lse=True, backend=backend)

    def _persistent(self, q: Tensor) -> list[tuple[Tensor, Tensor]]:
        if not self.num_persistent:
            return []
        B = q.shape[0]
        k = self.persistent_keys.to(q.dtype).expand(B, -1, -1, -1)
        v = self.persistent_values.to(q.dtype).expand(B, -1, -1, -1)
        return [self._attend(q, k, v, None)]

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v  # (B, H, T, D) each

    def _out(self, o: Tensor) -> Tensor:
        B, _, T, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))

    def forward(self, x: Tensor, state=None, *, document_ids: Tensor | None = None) -> Tensor:
        check_input(x, self.dim, self, state)
        if document_ids is not None:
            raise ValueError(f"{type(self).__name__} does not take document_ids (its memory would carry across "
                             "documents); run each document as its own sequence")
        return self._forward(x, state)


class TitansWindowState(SinkWindowCache):
    """Decode state of MAG and MAL: the attention's window cache plus the memory (``memory``:
    per-layer weights, momentum and chunk-start weights, see :class:`NeuralMemory`)."""

    def __init__(self, batch_size: int, num_heads: int, head_dim: int, *, window: int, memory: dict[str, Tensor],
                 device=None, dtype=torch.float32) -> None:
        super().__init__(batch_size, num_heads, head_dim, sink_tokens=0, window=window, device=device, dtype=dtype)
        self.memory = memory

    def nbytes(self) -> int:
        return super().nbytes() + sum(t.numel() * t.element_size() for t in self.memory.values())


class _WindowTitans(_Titans):
    def __init__(self, dim: int, num_heads: int, *, head_dim: int | None = None, window: int = 1024,
                 chunk_size: int = 64, memory_depth: int = 2, memory_expansion: int = 2, max_lr: float = 0.1,
                 num_persistent: int = 4, rope: bool = True, output_norm: bool = True, backend: str = "chunked") -> None:
        super().__init__(dim, num_heads, head_dim=head_dim, window=window, chunk_size=chunk_size,
                         memory_depth=memory_depth, memory_expansion=memory_expansion, max_lr=max_lr,
                         num_persistent=num_persistent, rope=rope, backend=backend, output_norm=output_norm)
        self.pattern = sliding_window(window)

    def init_state(self, batch_size: int, *, max_len=None, device=None, dtype=None) -> TitansWindowState:
        param = self.o_proj.weight
        device, dtype = device if device is not None else param.device, dtype or param.dtype
        return TitansWindowState(batch_size, self.num_heads, self.head_dim, window=self.window,
                                 memory=self.memory.empty_state(batch_size, device), device=device, dtype=dtype)

    def _window_attention(self, x: Tensor, state, offset: int) -> Tensor:
        """Sliding-window attention (with the persistent tokens) of ``x [B, T, C]`` -> ``[B, T, C]``."""
        q, k, v = self._heads(x)
        q, k, v, pattern, q_offset = rotate_and_cache(self.rope, q, k, v, self.pattern, state, offset)
        return self._out(_merge([self._attend(q, k, v, pattern, q_offset), *self._persistent(q)]))

    def _memory(self, x: Tensor, state, offset: int) -> Tensor:
        y, after = self.memory(x, None if state is None else state.memory, offset)
        if state is not None:
            state.memory = {name: value.to(state.memory[name].dtype) for name, value in after.items()}
        return y


class TitansMAG(_WindowTitans):
    """Titans, memory as gate: ``o = W_g(norm(SWA(x)) * sigmoid(norm(M(x))))``.

    Args:
        dim: width C. num_heads: H. head_dim: D (default C // H).
        window: keys of the sliding-window attention, the query included.
        chunk_size: tokens per memory chunk (gradients at the chunk's first weights).
        memory_depth, memory_expansion, max_lr, output_norm: the memory MLP (:class:`NeuralMemory`).
        num_persistent: learned key/value pairs per head every query sees.
        rope: RoPE on the attention's q and k.
        backend: ``"chunked"`` or ``"reference"`` (token-by-token memory, materialised attention).

    Shapes: ``x [B, T, C] -> [B, T, C]``; decode state: a window cache of ``window`` tokens and
    the memory (fixed size).

    Example::

        >>> import torch
        >>> from attnkit.layers import TitansMAG
        >>> layer = TitansMAG(64, 4, window=16, chunk_size=8)
        >>> x = torch.randn(2, 40, 64)
        >>> state = layer.init_state(2)
        >>> y = torch.cat([layer(x[:, :27], state), layer(x[:, 27:], state)], dim=1)  # == layer(x)
    """

    def __init__(self, dim: int, num_heads: int, **options) -> None:
        super().__init__(dim, num_heads, **options)
        self.norm_attention, self.norm_memory = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.gate_proj = nn.Linear(dim, dim, bias=False)

    def _forward(self, x: Tensor, state) -> Tensor:
        offset = 0 if state is None else state.offset
        memory = self._memory(x, state, offset)
        attention = self._window_attention(x, state, offset)
        return self.gate_proj(self.norm_attention(attention) * torch.sigmoid(self.norm_memory(memory)))


class TitansMAL(_WindowTitans):
    """Titans, memory as a layer: ``h = x + M(x)``; returns ``M(x) + SWA(h)``, the change a
    memory sub-layer then an attention sub-layer (each with its residual) make to ``x``.

    Args: as :class:`TitansMAG`. Shapes: ``x [B, T, C] -> [B, T, C]``.
    """

    def _forward(self, x: Tensor, state) -> Tensor:
        offset = 0 if state is None else state.offset
        memory = self._memory(x, state, offset)
        return memory + self._window_attention(x + memory, state, offset)


class TitansMACState(State):
    """Decode state of MAC: the memory (:class:`NeuralMemory`) and the current segment's keys and
    values (of its tokens and of the memory tokens read for them), ``[B, H, chunk_size, D]``."""

    _storage = ("keys", "values", "memory_keys", "memory_values")  # read only up to offset % chunk_size

    def __init__(self, batch_size: int, num_heads: int, head_dim: int, *, chunk_size: int,
                 memory: dict[str, Tensor], device=None, dtype=torch.float32) -> None:
        super().__init__()
        self.batch_size, self.num_heads, self.head_dim, self.chunk_size = batch_size, num_heads, head_dim, chunk_size
        self.memory = memory
        shape = (batch_size, num_heads, chunk_size, head_dim)
        for name in self._storage:
            setattr(self, name, torch.zeros(shape, device=device, dtype=dtype))

    def nbytes(self) -> int:
        held = min(self.offset % self.chunk_size, self.chunk_size)
        per_token = 4 * self.batch_size * self.num_heads * self.head_dim * self.keys.element_size()
        return held * per_token + sum(t.numel() * t.element_size() for t in self.memory.values())


class TitansMAC(_Titans):
    """Titans, memory as context: per segment, attention over ``[persistent, M_{W_i}(q), segment]``,
    then its output ``y`` written into the memory and ``o_t = W_g(norm(y_t) * sigmoid(norm(M_{W_t}(y_t))))``.

    Args:
        dim: width C. num_heads: H. head_dim: D (default C // H).
        chunk_size: segment length: the attention's span and the memory's chunk.
        memory_depth, memory_expansion, max_lr, output_norm, num_persistent, rope, backend: as
            :class:`TitansMAG`.

    The memory tokens ``h_t`` of a segment are read at the segment's first weights from the
    token's own query, and a query sees those of its segment up to itself only (``h_j`` for a
    later ``j`` would carry the future). Shapes: ``x [B, T, C] -> [B, T, C]``; decode state
    :class:`TitansMACState` (fixed size).
    """

    def __init__(self, dim: int, num_heads: int, *, head_dim: int | None = None, chunk_size: int = 64,
                 memory_depth: int = 2, memory_expansion: int = 2, max_lr: float = 0.1, num_persistent: int = 4,
                 rope: bool = True, output_norm: bool = True, backend: str = "chunked") -> None:
        positive_int(chunk_size, "chunk_size")
        super().__init__(dim, num_heads, head_dim=head_dim, window=chunk_size, chunk_size=chunk_size,
                         memory_depth=memory_depth, memory_expansion=memory_expansion, max_lr=max_lr,
                         num_persistent=num_persistent, rope=rope, backend=backend, output_norm=output_norm)
        inner = num_heads * head_dim_of(dim, num_heads, head_dim)
        self.read_proj = nn.Linear(dim, inner, bias=False)  # the query that reads h_t from the memory
        self.context_proj = nn.Linear(inner, dim, bias=False)  # h_t as a token of width C
        self.norm_attention, self.norm_memory = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.gate_proj = nn.Linear(dim, dim, bias=False)

    def init_state(self, batch_size: int, *, max_len=None, device=None, dtype=None) -> TitansMACState:
        param = self.o_proj.weight
        device, dtype = device if device is not None else param.device, dtype or param.dtype
        return TitansMACState(batch_size, self.num_heads, self.head_dim, chunk_size=self.chunk_size,
                              memory=self.memory.empty_state(batch_size, device), device=device, dtype=dtype)

    def _segment(self, q, k, v, read, offset: int, memory, cache: list[Tensor] | None):
        """The tokens at ``offset`` inside one segment: their rotated ``q, k, v`` and memory queries
        ``read`` ``[B, H, n, D]``; ``cache`` holds the segment's earlier keys/values (rotated)
        ``[B, H, offset % chunk_size, D]`` x 4. Returns ``(y [B, n, C], the memory's read of y
        [B, H, n, D], memory, cache)``."""
        B, _, n, _ = q.shape
        # a segment's first token reads the weights as they are (its segment's W_i); later ones W_i, kept as "g"
        retrieved = self.memory.read(read, memory, at_chunk_start=offset % self.chunk_size != 0)
        context = self.context_proj(retrieved.transpose(1, 2).reshape(B, n, -1))  # h (B, n, C)
        _, kh, vh = self._heads(context)
        if self.rope is not None:
            _, kh = self.rope(q, kh, offset=offset)
        if cache is not None:
            k, v, kh, vh = (torch.cat([old, new], dim=2) for old, new in zip(cache, (k, v, kh, vh)))
        q_offset = offset % self.chunk_size
        parts = [self._attend(q, k, v, "causal", q_offset), self._attend(q, kh, vh, "causal", q_offset)]
        y = self._out(_merge(parts + self._persistent(q)))  # (B, n, C)
        written, memory = self.memory.scan(*self.memory.project(y), memory, offset)
        return y, written, memory, [k, v, kh, vh]

    def _forward(self, x: Tensor, state) -> Tensor:
        B, T, _ = x.shape
        offset = 0 if state is None else state.offset
        memory = None if state is None else state.memory
        cache = None
        if state is not None and offset % self.chunk_size:
            held = offset % self.chunk_size
            cache = [getattr(state, name)[:, :, :held].to(x.dtype) for name in TitansMACState._storage]
        # what does not depend on the memory, for the whole call at once
        read = self.read_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        read = F.normalize(F.silu(read), dim=-1)
        q, k, v = self._heads(x)
        if self.rope is not None:
            q, k = self.rope(q, k, offset=offset)
        ys, reads, t = [], [], 0
        while t < T:
            position = offset + t
            n = min(self.chunk_size - position % self.chunk_size, T - t)
            if position % self.chunk_size == 0:
                cache = None
            part = slice(t, t + n)
            y, written, memory, cache = self._segment(q[:, :, part], k[:, :, part], v[:, :, part], read[:, :, part],
                                                      position, memory, cache)
            ys.append(y)
            reads.append(written)
            t += n
        y = torch.cat(ys, dim=1)
        written = self.memory.o_proj(torch.cat(reads, dim=2).transpose(1, 2).reshape(B, T, -1))
        out = self.gate_proj(self.norm_attention(y) * torch.sigmoid(self.norm_memory(written)))
        if state is not None:
            held = (offset + T) % self.chunk_size
            for name, value in zip(TitansMACState._storage, cache):
                if held:
                    getattr(state, name)[:, :, :held] = value[:, :, -held:].detach()
            state.memory = {name: value.to(state.memory[name].dtype) for name, value in memory.items()}
            state.offset = offset + T
        return out


def titans_flops(batch: int, seq: int, config: dict) -> FlopCount:
    """Core: attention over the window (MAG, MAL) or the segment twice over (MAC, its tokens
    and their memory tokens), plus the memory: per token and layer of the MLP ``(in x out)``,
    the gradient (3 products), the chunk's dual-form retrieval and write (about ``4 c`` per
    weight row, ``c`` the chunk) ~ ``2 * in * out * 5 + 4 * c * (in + out)``, and the
    ``c x c`` gate products (``2 c^2``). Projections: attention q/k/v/o, memory q/k/v/o and gates."""
    dim, heads, _, head_dim = head_shape(config)
    chunk = config.get("chunk_size", 64)
    depth, expansion = config.get("memory_depth", 2), config.get("memory_expansion", 2)
    widths = [head_dim] + [expansion * head_dim] * (depth - 1) + [head_dim]
    per_token = sum(10.0 * a * b + 4.0 * chunk * (a + b) for a, b in zip(widths[:-1], widths[1:])) + 2.0 * chunk**2
    memory = batch * heads * seq * per_token
    if "window" in config:
        attention = dense_attention_flops(batch, seq, num_heads=heads, head_dim=head_dim,
                                          pattern=sliding_window(config.get("window", 1024)))
    else:  # MAC: causal within each segment, over the tokens and the memory tokens
        attention = 2 * 4.0 * batch * heads * seq * (chunk + 1) / 2 * head_dim
    attention += 4.0 * batch * heads * seq * config.get("num_persistent", 4) * head_dim
    inner = heads * head_dim
    projection = batch * seq * (2.0 * dim * 4 * inner + 2.0 * dim * 3 * inner + 2.0 * dim * 3 * heads
                                + 2.0 * inner * dim + 2.0 * dim * dim)
    return FlopCount(attention_fwd=attention + memory, projection_fwd=projection)


_TITLE = "Titans: Learning to Memorize at Test Time"
CARDS = (
    Card(
        name="titans-mac",
        title=_TITLE,
        arxiv="2501.00663",
        family="memory",
        layer=TitansMAC,
        flops=titans_flops,
        defaults={"chunk_size": 64},
        capabilities=Capabilities(bidirectional=False, varlen=False, backends=("reference", "chunked")),
        summary="memory as context: segment attention over persistent + retrieved memory tokens; a test-time-trained "
                "MLP memory (surprise with momentum and forgetting); fixed-size decode state",
    ),
    Card(
        name="titans-mag",
        title=_TITLE,
        arxiv="2501.00663",
        family="memory",
        layer=TitansMAG,
        flops=titans_flops,
        defaults={"window": 1024, "chunk_size": 64},
        capabilities=Capabilities(bidirectional=False, varlen=False, backends=("reference", "chunked")),
        summary="memory as gate: sliding-window attention gated by the test-time-trained MLP memory",
    ),
    Card(
        name="titans-mal",
        title=_TITLE,
        arxiv="2501.00663",
        family="memory",
        layer=TitansMAL,
        flops=titans_flops,
        defaults={"window": 1024, "chunk_size": 64},
        capabilities=Capabilities(bidirectional=False, varlen=False, backends=("reference", "chunked")),
        summary="memory as a layer: the test-time-trained MLP memory, then sliding-window attention",
    ),
)
