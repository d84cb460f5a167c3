"""Probes over frozen patch features: linear probing, the standard attentive probe, and efficient probing.

Efficient probing is from "Attention, Please! Revisiting Attentive Probing Through the Lens of
Efficiency" (Psomas et al., arXiv 2506.10178; official code github.com/billpsomas/efficient-probing,
``poolings/ep.py``, read for this module and re-written here). Every probe maps frozen features
``x`` (B, N, C) to logits (B, K) and ends with a non-affine BatchNorm and a linear classifier, as the
official heads do.

- :class:`LinearProbe`: mean over the N tokens, BatchNorm, linear. ``C K`` parameters.
- :class:`AttentiveProbe` (the standard one): one learned query (or ``num_queries``) cross-attends to
  the tokens through a full multi-head attention, ``q = W_q query``, ``k = W_k x``, ``v = W_v x``,
  ``W_o`` on the concatenated heads, queries averaged: ``4 C^2`` projection parameters.
- :class:`EfficientProbe` (EP): M learned queries ``Q`` (M, C) attend to the features themselves,
  with no query, key or output projection, and one value projection that also shrinks the width::

      A     = softmax_N(Q x^T / sqrt(C))                     (B, M, N), one head
      V     = W_v x,  W_v: C -> C' = C / d_out               (B, N, C'), split into M groups of C'/M
      out_m = A_m V[:, :, m-th group]                        (B, C'/M) per query
      z     = concat_m out_m                                 (B, C')  -> BatchNorm -> linear (C' -> K)

  The reductions: W_q is redundant when the query is a parameter, W_o when a linear classifier
  follows, W_k is dropped (keys are the frozen features), and W_v is ``C x C/d_out`` with each query
  reading its own ``C'/M`` channels, so the M queries cost no more than one: ``M C + C C'`` parameters
  plus the classifier's ``C' K``.

Parameter and FLOP counts: :func:`probe_parameters` (trainable, including the classifier) and
:func:`probe_flops` (forward, per call).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import positive_int
from ..cards import FlopCount
from .vit import check_backend, check_tokens, merge_heads, softmax_attention, split_heads

__all__ = ["LinearProbe", "AttentiveProbe", "EfficientProbe", "efficient_probe_reference",
           "attentive_probe_reference", "probe_parameters", "probe_flops"]


def _classifier(width: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm1d(width, affine=False, eps=1e-6), nn.Linear(width, num_classes))


class LinearProbe(nn.Module):
    """Mean-pooled features -> BatchNorm -> linear. ``num_heads`` is accepted (the card's common
    signature) and unused."""

    def __init__(self, dim: int, num_heads: int = 1, num_classes: int = 10):
        super().__init__()
        self.dim = positive_int(dim, "dim")
        positive_int(num_heads, "num_heads")
        self.num_classes = positive_int(num_classes, "num_classes")
        self.classifier = _classifier(dim, num_classes)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        check_tokens(x, self.dim)
        return x.mean(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(x))


class AttentiveProbe(nn.Module):
    """The standard attentive probe: learned queries -> multi-head cross-attention (W_q, W_k, W_v,
    W_o) over the tokens -> mean over queries -> BatchNorm -> linear."""

    def __init__(self, dim: int, num_heads: int = 4, num_classes: int = 10, num_queries: int = 1,
                 backend: str = "sdpa"):
        super().__init__()
        self.dim, self.num_heads = positive_int(dim, "dim"), positive_int(num_heads, "num_heads")
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_classes = positive_int(num_classes, "num_classes")
        self.num_queries = positive_int(num_queries, "num_queries")
        self.backend = check_backend(backend)
        self.query = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.classifier = _classifier(dim, num_classes)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        check_tokens(x, self.dim)
        H = self.num_heads
        q = split_heads(self.q(self.query).expand(x.shape[0], -1, -1), H)  # (B, H, M, D)
        k, v = split_heads(self.k(x), H), split_heads(self.v(x), H)  # (B, H, N, D)
        return self.o(merge_heads(softmax_attention(q, k, v, self.backend))).mean(1)  # (B, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(x))


class EfficientProbe(nn.Module):
    """Efficient probing (EP): ``num_queries`` learned queries, keys = the features, one value
    projection to ``dim // d_out`` channels split among the queries. ``num_heads`` is accepted (the
    card's common signature) and must be 1, as in the official EP heads."""

    def __init__(self, dim: int, num_heads: int = 1, num_classes: int = 10, num_queries: int = 8, d_out: int = 1):
        super().__init__()
        self.dim = positive_int(dim, "dim")
        if num_heads != 1:
            raise ValueError(f"EfficientProbe attends with one head (keys are the raw features), got num_heads={num_heads!r}")
        self.num_heads = 1
        self.num_classes = positive_int(num_classes, "num_classes")
        self.num_queries = positive_int(num_queries, "num_queries")
        self.d_out = positive_int(d_out, "d_out")
        if dim % d_out or (dim // d_out) % num_queries:
            raise ValueError(f"dim // d_out must be a whole multiple of num_queries (each query reads its own "
                             f"channels): dim={dim}, d_out={d_out}, num_queries={num_queries}")
        self.width = dim // d_out
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.v = nn.Linear(dim, self.width, bias=False)
        self.classifier = _classifier(self.width, num_classes)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The queries' attention over the tokens (B, M, N): the probe's maps."""
        check_tokens(x, self.dim)
        return (torch.einsum("mc,bnc->bmn", self.queries, x) * self.dim ** -0.5).softmax(-1)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        attn = self.attention(x)  # (B, M, N)
        v = self.v(x).view(B, N, self.num_queries, self.width // self.num_queries)  # (B, N, M, C'/M)
        return torch.einsum("bmn,bnmd->bmd", attn, v).reshape(B, self.width)  # (B, C')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(x))


def efficient_probe_reference(x, queries, w_v, num_queries: int):
    """EP's pooled features (B, C'), written per query with an explicit softmax (use float64)."""
    B, N, C = x.shape
    width = w_v.shape[0]
    group = width // num_queries
    out = []
    for m in range(num_queries):
        scores = x @ queries[m] / math.sqrt(C)  # (B, N)
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))
        weights = weights / weights.sum(-1, keepdim=True)
        values = x @ w_v[m * group:(m + 1) * group].T  # (B, N, C'/M): query m's channels only
        out.append(torch.einsum("bn,bnd->bd", weights, values))
    return torch.cat(out, dim=1)


def attentive_probe_reference(x, query, w: dict, num_heads: int):
    """The standard attentive probe's pooled features (B, C), per head and query (use float64); ``w``
    holds ``q, k, v, o`` weights (C, C) and ``bq, bk, bv, bo`` biases; ``query`` (M, C)."""
    B, N, C = x.shape
    D = C // num_heads
    q_all = query @ w["q"].T + w["bq"]  # (M, C)
    k_all, v_all = x @ w["k"].T + w["bk"], x @ w["v"].T + w["bv"]
    heads = []
    for h in range(num_heads):
        cols = slice(h * D, (h + 1) * D)
        scores = torch.einsum("md,bnd->bmn", q_all[:, cols], k_all[..., cols]) / math.sqrt(D)
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))
        weights = weights / weights.sum(-1, keepdim=True)
        heads.append(torch.einsum("bmn,bnd->bmd", weights, v_all[..., cols]))
    return (torch.cat(heads, dim=-1) @ w["o"].T + w["bo"]).mean(1)


def probe_parameters(probe: nn.Module) -> int:
    """Trainable parameters of a probe, classifier included."""
    return sum(p.numel() for p in probe.parameters() if p.requires_grad)


def probe_flops(batch: int, seq: int, config: dict) -> FlopCount:
    """Forward FLOPs of a probe over ``seq`` tokens of width ``config["dim"]``; ``config["probe"]`` is
    ``linear``, ``attentive`` or ``efficient`` (the classifier's matmul is in ``projection``)."""
    C, K, kind = config["dim"], config.get("num_classes", 10), config.get("probe", "efficient")
    M = config.get("num_queries", 1 if kind == "attentive" else 8)
    if kind == "linear":
        return FlopCount(attention_fwd=0.0, projection_fwd=batch * seq * C + 2.0 * batch * C * K)
    if kind == "attentive":  # k, v over the tokens; q of the queries (batch-independent, counted once); o
        projection = 2.0 * batch * seq * C * 2 * C + 2.0 * M * C * C + 2.0 * batch * M * C * C + 2.0 * batch * C * K
        return FlopCount(attention_fwd=4.0 * batch * M * seq * C, projection_fwd=projection)
    width = C // config.get("d_out", 1)
    # scores: M x N dot products of width C; each query's weighted sum reads only its C'/M channels
    attention = 2.0 * batch * M * seq * C + 2.0 * batch * seq * width
    return FlopCount(attention_fwd=attention, projection_fwd=2.0 * batch * seq * C * width + 2.0 * batch * width * K)
