"""Flow-Attention (Flowformer: Linearizing Transformers with Conservation Flows; Wu et al.,
arXiv 2202.06258; official code thuml/Flowformer, ``Flow_Attention.py``).

Attention as a flow network: keys are sources, queries are sinks, ``phi = sigmoid`` makes
every score a non-negative capacity ``phi(q_i) . phi(k_j)``. With ``eps`` added to every
entry of the vectors in the dot products below, as the official code does:

    incoming  I_i = 1 / (q_i . sum_j k_j)              outgoing  O_j = 1 / (k_j . sum_i q_i)
    conserved sink   cI_i = q_i . sum_j k_j O_j         conserved source  cO_j = clamp(k_j . sum_i q_i I_i)
    allocation  a_i = sigmoid(cI_i * T/S)               competition  c_j = softmax_j(cO_j) * S
    o_i = a_i * (q_i I_i) . sum_j k_j (c_j v_j)^T

Causal version (official ``Flow_Attention_Causal``): every sum becomes a prefix sum up to
the current position ``i`` and the flows are normalised by the count ``n_i = i + 1``::

    I_i = n_i / (q_i . K_i)          K_i = sum_{j<=i} k_j          (likewise O_i with Q_i)
    cI_i = q_i . sum_{j<=i} k_j O_j / n_i        cO_i = clamp(k_i . sum_{j<=i} q_j I_j / n_i)
    a_i = sigmoid(cI_i)                          c_i = exp(cO_i) / sum_{j<=i} exp(cO_j) * n_i
    o_i = a_i * (q_i I_i / n_i) . sum_{j<=i} k_j (c_j v_j)^T

(The official file, its RL variant and its GPT module all divide the output's flow per
position, ``sink_incoming[..., None] / normal[..., None]``, and the NLP variant keeps the
incoming flow from before its scaling by ``n_i``, the same value; that is what is written
above and implemented here. One commit of ``Flow_Attention.py`` (5414858, 2022-06-18) divided by the
``[1, 1, T]`` ``normal`` itself, which broadcasts to a ``T x T`` tensor; the next commit,
e22b781 under a minute later, made it per position. The two commits before left the
division out.)

Every prefix quantity is a running sum, so the causal version decodes with a fixed-size
state: the sums of k, q, k O, q I, exp(cO), the count, and the ``[D, E]`` matrix
``sum k (c v)^T``. The last prefix product is causal linear attention without decay, so it
runs on :func:`attnkit.ops.linear.lightning.lightning_attend` with zero slopes (chunked in
PyTorch, Triton on CUDA). ``flow_attend_reference`` materialises the ``T x T`` masks.

Layout: q, k ``[B, H, T, D]`` (already through ``phi``), v ``[B, H, T, E]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .lightning import lightning_attend
from .prefix_sum import prefix_sum

__all__ = ["flow_attend", "flow_attend_reference", "FlowState", "FLOW_BACKENDS"]

FLOW_BACKENDS = ("auto", "reference", "chunked", "recurrent", "triton")


class FlowState(dict):
    """Running sums of causal Flow-Attention (plain tensors in a dict; see the module doc)."""

    @classmethod
    def zeros(cls, B: int, H: int, D: int, E: int, *, device=None, dtype=torch.float32) -> "FlowState":
        z = lambda *shape: torch.zeros(*shape, device=device, dtype=dtype)  # noqa: E731
        return cls(count=0, k_sum=z(B, H, D), q_sum=z(B, H, D), ko_sum=z(B, H, D), qi_sum=z(B, H, D),
                   exp_sum=z(B, H), kv=z(B, H, D, E))


def _check(q, k, v, eps, clamp):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-d tensor [B, H, T, D], got {got}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1] or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"q [B, H, T, D], k [B, H, S, D], v [B, H, S, E] do not agree: "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if not clamp > 0:
        raise ValueError(f"clamp must be > 0, got {clamp}")


def _dot(a: Tensor, b: Tensor, eps: float) -> Tensor:
    """``(a + eps) . (b + eps)`` over the last dim."""
    return ((a + eps) * (b + eps)).sum(-1)


def flow_attend_reference(q, k, v, *, causal: bool = True, eps: float = 1e-6, clamp: float = 1.0) -> Tensor:
    """Flow-Attention written with explicit sums (causal: lower-triangular ``T x T``
    matrices for every prefix sum), in float64. Returns ``[B, H, T, E]`` in q's dtype."""
    _check(q, k, v, eps, clamp)
    dtype = q.dtype
    q, k, v = q.double(), k.double(), v.double()
    T, S = q.shape[2], k.shape[2]
    if not causal:
        incoming = 1 / _dot(q, k.sum(2, keepdim=True), eps)  # (B, H, T)
        outgoing = 1 / _dot(k, q.sum(2, keepdim=True), eps)  # (B, H, S)
        conserved_sink = _dot(q, (k * outgoing[..., None]).sum(2, keepdim=True), eps)
        conserved_source = _dot(k, (q * incoming[..., None]).sum(2, keepdim=True), eps).clamp(-clamp, clamp)
        allocation = torch.sigmoid(conserved_sink * (T / S))
        competition = torch.softmax(conserved_source, dim=-1) * S
        weights = (q * incoming[..., None]) @ k.transpose(-1, -2)  # (B, H, T, S)
        return ((weights @ (v * competition[..., None])) * allocation[..., None]).to(dtype)
    if T != S:
        raise ValueError(f"causal Flow-Attention needs as many keys as queries, got T={T}, S={S}")
    tril = torch.ones(T, T, dtype=torch.float64, device=q.device).tril()  # prefix sums as matmuls
    n = torch.arange(1, T + 1, dtype=torch.float64, device=q.device)  # (T,)
    incoming = n / _dot(q, tril @ k, eps)
    outgoing = n / _dot(k, tril @ q, eps)
    conserved_sink = _dot(q, tril @ (k * outgoing[..., None]), eps) / n
    conserved_source = (_dot(k, tril @ (q * incoming[..., None]), eps) / n).clamp(-clamp, clamp)
    allocation = torch.sigmoid(conserved_sink)
    e = torch.exp(conserved_source)
    competition = e / (e @ tril.T) * n  # (B, H, T): exp(cO_i) / sum_{j<=i} exp(cO_j) * n_i
    weights = ((q * (incoming / n)[..., None]) @ k.transpose(-1, -2)) * tril  # (B, H, T, T)
    o = weights @ (v * competition[..., None])
    return (o * allocation[..., None]).to(dtype)


def flow_attend(q, k, v, *, causal: bool = True, eps: float = 1e-6, clamp: float = 1.0,
                state: FlowState | None = None, backend: str = "auto") -> Tensor:
    """Flow-Attention ``[B, H, T, E]``. Causal: prefix sums, continuing from ``state``
    (updated in place) when given; bidirectional: one pass over all keys.

    ``backend`` picks the path of the causal prefix product (``lightning_attend``'s:
    ``chunked``, ``recurrent``, ``triton``, ``auto``) or ``reference`` (materialised).
    """
    if backend not in FLOW_BACKENDS:
        raise ValueError(f"flow_attend backend must be one of {', '.join(FLOW_BACKENDS)}, got {backend!r}")
    _check(q, k, v, eps, clamp)
    if backend == "reference" and state is None:
        return flow_attend_reference(q, k, v, causal=causal, eps=eps, clamp=clamp)
    if not causal:
        if state is not None:
            raise ValueError("bidirectional Flow-Attention has no decode state (every query sees every key)")
        return _flow_bidirectional(q, k, v, eps, clamp)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"causal Flow-Attention needs as many keys as queries, got T={q.shape[2]}, S={k.shape[2]}")
    B, H, T, D = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    st = state if state is not None else FlowState.zeros(B, H, D, v.shape[-1], device=q.device, dtype=acc)
    qa, ka = q.to(acc), k.to(acc)
    n = st["count"] + torch.arange(1, T + 1, dtype=acc, device=q.device)  # (T,)
    k_prefix = st["k_sum"][:, :, None] + prefix_sum(ka)
    q_prefix = st["q_sum"][:, :, None] + prefix_sum(qa)
    incoming = n / _dot(qa, k_prefix, eps)  # (B, H, T)
    outgoing = n / _dot(ka, q_prefix, eps)
    ko, qi = ka * outgoing[..., None], qa * incoming[..., None]
    conserved_sink = _dot(qa, st["ko_sum"][:, :, None] + prefix_sum(ko), eps) / n
    conserved_source = (_dot(ka, st["qi_sum"][:, :, None] + prefix_sum(qi), eps) / n).clamp(-clamp, clamp)
    allocation = torch.sigmoid(conserved_sink)
    e = torch.exp(conserved_source)
    e_prefix = st["exp_sum"][:, :, None] + prefix_sum(e)
    competition = e / e_prefix * n
    slopes = torch.zeros(H, device=q.device, dtype=acc)
    lightning_backend = "chunked" if backend == "reference" else backend
    o, kv = lightning_attend((qa * (incoming / n)[..., None]).to(q.dtype), k, (v.to(acc) * competition[..., None]).to(q.dtype),
                             slopes, initial_state=st["kv"], backend=lightning_backend)
    if state is not None:
        state.update(count=state["count"] + T, k_sum=k_prefix[:, :, -1], q_sum=q_prefix[:, :, -1],
                     ko_sum=state["ko_sum"] + ko.sum(2), qi_sum=state["qi_sum"] + qi.sum(2),
                     exp_sum=e_prefix[:, :, -1], kv=kv)
    return (o.to(acc) * allocation[..., None]).to(q.dtype)


def _flow_bidirectional(q, k, v, eps, clamp):
    """The bidirectional form with ``[D, E]`` intermediates only (linear in T and S)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    T, S = q.shape[2], k.shape[2]
    incoming = 1 / _dot(qa, ka.sum(2, keepdim=True), eps)
    outgoing = 1 / _dot(ka, qa.sum(2, keepdim=True), eps)
    conserved_sink = _dot(qa, (ka * outgoing[..., None]).sum(2, keepdim=True), eps)
    conserved_source = _dot(ka, (qa * incoming[..., None]).sum(2, keepdim=True), eps).clamp(-clamp, clamp)
    allocation = torch.sigmoid(conserved_sink * (T / S))
    competition = torch.softmax(conserved_source, dim=-1) * S
    o = (qa * incoming[..., None]) @ (ka.transpose(-1, -2) @ (va * competition[..., None]))
    return (o * allocation[..., None]).to(q.dtype)
