"""Sparse mixture-of-experts feed-forward layer with token routers, plain and graph-of-tokens.

Paper: *Improving Routing in Sparse Mixture of Experts with Graph of Tokens* (Tam Nguyen, Ngoc N. Tran,
Khai Nguyen, Richard G. Baraniuk; arXiv 2505.00792, ICML 2025).

Shapes: B batch, T tokens, C width, E experts, k experts per token, H heads of the preceding attention
layer, D its head dim, F expert hidden width.

The layer ``x [B, T, C] -> y [B, T, C]``::

    p_i   = route(x)_i                      routing distribution of token i over the E experts, [B, T, E]
    S_i   = TopK(p_i, k)                    the k experts token i is sent to
    w_ie  = p_ie (k = 1)  or  p_ie / sum_{e' in S_i} p_ie' (k > 1, ``normalize``)
    y_i   = sum_{e in S_i} w_ie f_e(x_i),   f_e(x) = W2_e gelu(W1_e x + b1_e) + b2_e

The routers differ only in ``p`` (the PGM reading of the paper: the expert choice ``z_i`` of token i):

- :class:`TopKRouter` (the SMoE baseline, Shazeer et al. 2017 / Switch / GShard): tokens choose
  independently, ``p_i = softmax(W_g x_i)``.
- :class:`SimilarityAwareRouter` (the paper's Similarity-Aware SMoE): token i first picks a token j
  with probability ``s_ij = softmax_j(sim(x_i, x_j) / tau)`` and then takes j's expert choice, so the
  marginal is a mixture over the graph of tokens::

      p_i = sum_j s_ij softmax(W_g x_j)         ( P_mixed = S softmax(X W_g^T), S row-stochastic [T, T] )

  ``sim(x_i, x_j) = x_i^T W_s x_j``. ``similarity="router"`` (default) takes ``W_s = W_g^T W_g``: tokens
  are similar when their router logits are (no parameters added); ``similarity="learned"`` learns a
  low-rank ``W_s = W_q^T W_k`` (rank ``similarity_dim``) with the usual ``1/sqrt(rank)`` scale.
- :class:`AttentionAwareRouter` (the paper's Attention-Aware SMoE, for an attention + SMoE block): the
  token graph is the attention matrix ``A`` of the preceding attention layer (mean over its H heads)::

      p_i = sum_j A_ij softmax(W_g x_j)         ( P_mixed = mean_h(A_h) softmax(X W_g^T) )

Fast path: ``S P`` (and ``A_h P``) *is* softmax attention with the routing distributions as values (a
[T, E] value matrix), so the mixing runs through attnkit's :func:`attnkit.ops.attend` (SDPA / FlexAttention)
and never materialises a T x T matrix; the attention-aware router takes the preceding layer's q and k
(:class:`AttentionInputs`, as :class:`attnkit.routing.RoutedBlock` captures them) and recomputes its
attention inside ``attend``; it also accepts the materialised probabilities ``[B, H, T, T]``. Expert
dispatch sorts the (token, slot) pairs by expert and runs each expert once on its tokens. Each router
has ``distribution_reference`` (materialised ``S`` / ``A``, float64-safe) and :meth:`SparseMoE.reference`
runs every expert on every token and combines them densely; the tests compare forward and gradients.

Load balance: :func:`balance_loss` is the Switch Transformer auxiliary loss
``E * sum_e f_e P_e`` (``f_e``: share of the N k routing slots sent to expert e; ``P_e``: mean routing
probability of e, over the distribution the router actually routes with, the mixed one for the graph
routers); it is 1 when routing is uniform. :attr:`SparseMoE.aux_loss` holds it after each forward; the
training loop weights it (0.01 in Switch).

Deviations and choices (the official code was not available to read; the math follows the paper's PGM):

- ``causal=True`` (default) restricts the token graph to ``j <= i`` so a language model does not see the
  future through its routing; ``causal=False`` mixes over the whole sequence (encoders, classifiers).
- The choice ``W_s = W_g^T W_g`` for the default similarity and the per-head mean of the attention
  matrices are this implementation's; the paper's ``W_s`` may be a separate matrix (``"learned"``).
- Dropless dispatch: no expert capacity and no token dropping (Switch drops tokens over capacity), and
  no router jitter noise.
- The experts are GELU MLPs with biases, stacked into ``[E, C, F]`` / ``[E, F, C]`` parameters.

Example::

    >>> import torch
    >>> from attnkit.routing import SparseMoE
    >>> moe = SparseMoE(64, num_experts=8, top_k=2, router="similarity")
    >>> y = moe(torch.randn(2, 16, 64))                 # [B, T, C]
    >>> y.shape, moe.aux_loss.shape, moe.last_routing.experts.shape
    (torch.Size([2, 16, 64]), torch.Size([]), torch.Size([2, 16, 2]))
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import patterns as _patterns
from .._checks import positive_int
from ..layers.base import check_input
from ..ops import attend

__all__ = ["AttentionInputs", "Routing", "TopKRouter", "SimilarityAwareRouter", "AttentionAwareRouter", "Experts",
           "SparseMoE", "ROUTERS", "balance_loss", "select_top_k", "build_router"]


class Routing(NamedTuple):
    """A router's decision for ``[B, T]`` tokens: ``probs [B, T, E]`` (the distribution routed with),
    ``experts [B, T, k]`` (chosen expert ids, best first) and ``weights [B, T, k]`` (their gates)."""

    probs: Tensor
    experts: Tensor
    weights: Tensor


class AttentionInputs(NamedTuple):
    """The queries and keys of an attention layer, after RoPE: ``q [B, H, T, D]``, ``k [B, Hkv, T, D]``
    (``H % Hkv == 0``), the ``pattern`` they attended with and the ``scale`` (default ``D ** -0.5``).
    Enough to recompute the layer's attention matrix ``softmax(q k^T scale + mask)`` head by head."""

    q: Tensor
    k: Tensor
    pattern: object = "causal"
    scale: float | None = None

    def probabilities(self) -> Tensor:
        """The attention matrix, materialised plainly: ``[B, H, T, T]`` (the references' input)."""
        q, k = self.q, self.k
        H, T, D = q.shape[1], q.shape[2], q.shape[3]
        k = k.repeat_interleave(H // k.shape[1], dim=1)  # (B, H, T, D)
        scale = D**-0.5 if self.scale is None else self.scale
        scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, T, T)
        mask = _patterns.resolve(self.pattern).dense(T, T, batch=q.shape[0], heads=H, device=q.device)
        return scores.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)


def select_top_k(probs: Tensor, top_k: int, normalize: bool = True) -> Routing:
    """Top-k experts of each token's distribution ``probs [..., E]``; gates renormalised over the k chosen
    when ``normalize`` and ``k > 1`` (with ``k = 1`` the gate is ``p``, as in Switch, so the router learns)."""
    values, experts = probs.topk(top_k, dim=-1)  # (..., k)
    weights = values / values.sum(-1, keepdim=True) if normalize and top_k > 1 else values
    return Routing(probs, experts, weights)


def balance_loss(routing: Routing, num_experts: int) -> Tensor:
    """Switch Transformer load-balancing loss ``E * sum_e f_e P_e`` over all tokens of the call: ``f_e`` the
    share of the ``N * k`` routing slots given to expert e (not differentiable), ``P_e`` the mean of
    ``probs[..., e]``. Equals 1 under uniform routing, E when every slot and all probability go to one expert."""
    probs = routing.probs.reshape(-1, num_experts)
    counts = torch.bincount(routing.experts.reshape(-1), minlength=num_experts).to(probs.dtype)
    share = counts / counts.sum()
    return num_experts * (share * probs.mean(0)).sum()


def _check_common(dim: int, num_experts: int, top_k: int) -> None:
    positive_int(dim, "dim")
    positive_int(num_experts, "num_experts")
    positive_int(top_k, "top_k")
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} exceeds num_experts={num_experts}; accepted: 1 <= top_k <= num_experts")


def _causal_or_full(causal: bool):
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be True or False, got {causal!r}")
    return "causal" if causal else "full"


def _plain_mix(scores: Tensor, probs: Tensor, pattern) -> Tensor:
    """``softmax(scores + mask) @ probs`` written out: scores ``[B, T, T]``, probs ``[B, T, E]``."""
    B, T, _ = scores.shape
    mask = _patterns.resolve(pattern).dense(T, T, batch=B, heads=1, device=scores.device)[:, 0]  # (B, T, T)
    graph = scores.masked_fill(~mask, float("-inf")).softmax(-1)  # (B, T, T), rows sum to 1
    return graph @ probs


class TopKRouter(nn.Module):
    """The SMoE baseline: each token routes on its own, ``p_i = softmax(W_g x_i)``, top-k of ``p_i``.

    Args:
        dim: C. num_experts: E. top_k: k (``1 <= k <= E``).
        normalize: renormalise the k gates to sum to 1 (k > 1 only).

    ``forward(x [B, T, C], attention=None) -> Routing``.

    Example::

        >>> import torch
        >>> from attnkit.routing import TopKRouter
        >>> TopKRouter(32, num_experts=4, top_k=2)(torch.randn(1, 5, 32)).experts.shape
        torch.Size([1, 5, 2])
    """

    #: whether ``forward`` needs the preceding attention layer's attention
    needs_attention = False

    def __init__(self, dim: int, num_experts: int, top_k: int = 2, *, normalize: bool = True) -> None:
        super().__init__()
        _check_common(dim, num_experts, top_k)
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize must be True or False, got {normalize!r}")
        self.dim, self.num_experts, self.top_k, self.normalize = dim, num_experts, top_k, normalize
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def own_distribution(self, x: Tensor) -> Tensor:
        """``softmax(W_g x_i)`` for every token: ``[B, T, E]``."""
        return self.gate(x).softmax(-1)

    def distribution(self, x: Tensor, attention=None) -> Tensor:
        """The routing distribution ``[B, T, E]`` (fast path)."""
        return self.own_distribution(x)

    def distribution_reference(self, x: Tensor, attention=None) -> Tensor:
        """The same distribution, written plainly (for the baseline it is the fast path)."""
        logits = x @ self.gate.weight.T  # (B, T, E)
        return torch.exp(logits - logits.logsumexp(-1, keepdim=True))

    def forward(self, x: Tensor, attention=None) -> Routing:
        return select_top_k(self.distribution(x, attention), self.top_k, self.normalize)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}, normalize={self.normalize}"


class SimilarityAwareRouter(TopKRouter):
    """Similarity-Aware SMoE routing: ``p_i = sum_j s_ij softmax(W_g x_j)``, ``s_ij = softmax_j(x_i^T W_s x_j / tau)``.

    Args:
        dim, num_experts, top_k, normalize: as :class:`TopKRouter`.
        temperature: tau > 0; small tau keeps each token close to its own distribution (``s_ii`` dominates
            when tokens are dissimilar), large tau averages over the sequence.
        similarity: ``"router"`` (``W_s = W_g^T W_g``, the dot product of router logits, no parameters) or
            ``"learned"`` (``W_s = W_q^T W_k`` of rank ``similarity_dim``, scores scaled by ``1/sqrt(rank)``).
        similarity_dim: rank of the learned similarity (default ``min(C, 64)``); ``"learned"`` only.
        causal: token i mixes only tokens ``j <= i`` (language models); False mixes the whole sequence.

    ``forward(x [B, T, C], attention=None) -> Routing`` (``attention`` is ignored).

    Example::

        >>> import torch
        >>> from attnkit.routing import SimilarityAwareRouter
        >>> r = SimilarityAwareRouter(32, num_experts=4, top_k=1, similarity="learned")
        >>> r(torch.randn(2, 7, 32)).probs.sum(-1).allclose(torch.ones(2, 7))
        True
    """

    SIMILARITIES = ("router", "learned")

    def __init__(self, dim: int, num_experts: int, top_k: int = 2, *, temperature: float = 1.0,
                 similarity: str = "router", similarity_dim: int | None = None, causal: bool = True,
                 normalize: bool = True) -> None:
        super().__init__(dim, num_experts, top_k, normalize=normalize)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 \
                or not math.isfinite(temperature):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        if similarity not in self.SIMILARITIES:
            raise ValueError(f"unknown similarity {similarity!r}; accepted: {', '.join(self.SIMILARITIES)}")
        if similarity_dim is not None and similarity != "learned":
            raise ValueError(f"similarity_dim={similarity_dim} applies to similarity='learned' only, "
                             f"got similarity={similarity!r}")
        self.temperature = float(temperature)
        self.similarity = similarity
        self.pattern = _causal_or_full(causal)
        self.causal = causal
        if similarity == "learned":
            self.similarity_dim = positive_int(min(dim, 64) if similarity_dim is None else similarity_dim,
                                               "similarity_dim")
            self.sim_q = nn.Linear(dim, self.similarity_dim, bias=False)
            self.sim_k = nn.Linear(dim, self.similarity_dim, bias=False)
        else:
            self.similarity_dim = num_experts

    def _queries_keys(self, x: Tensor) -> tuple[Tensor, Tensor, float]:
        """(q, k, scale) with ``q_i . k_j * scale = x_i^T W_s x_j / tau``: ``[B, T, r]`` each."""
        if self.similarity == "router":
            logits = self.gate(x)  # (B, T, E)
            return logits, logits, 1.0 / self.temperature
        return self.sim_q(x), self.sim_k(x), 1.0 / (self.temperature * math.sqrt(self.similarity_dim))

    def distribution(self, x: Tensor, attention=None) -> Tensor:
        own = self.own_distribution(x)  # (B, T, E)
        q, k, scale = self._queries_keys(x)
        # S @ P is softmax attention with P as the values: one head, value width E
        mixed = attend(q[:, None], k[:, None], own[:, None], pattern=self.pattern, scale=scale)  # (B, 1, T, E)
        return mixed[:, 0]

    def distribution_reference(self, x: Tensor, attention=None) -> Tensor:
        own = super().distribution_reference(x)  # (B, T, E)
        if self.similarity == "router":
            logits = x @ self.gate.weight.T
            scores = logits @ logits.transpose(-1, -2) / self.temperature  # (B, T, T) = X W_s X^T / tau
        else:
            w_s = self.sim_q.weight.T @ self.sim_k.weight  # (C, C), rank r
            scores = x @ w_s @ x.transpose(-1, -2) / (self.temperature * math.sqrt(self.similarity_dim))
        return _plain_mix(scores, own, self.pattern)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, temperature={self.temperature}, similarity={self.similarity!r}, "
                f"causal={self.causal}")


class AttentionAwareRouter(TopKRouter):
    """Attention-Aware SMoE routing: ``p_i = sum_j mean_h(A_h)_ij softmax(W_g x_j)``, with ``A`` the attention
    matrix of the attention layer before this SMoE layer (the block's own attention).

    ``forward(x [B, T, C], attention) -> Routing`` where ``attention`` is either
    :class:`AttentionInputs` (that layer's q ``[B, H, T, D]`` and k ``[B, Hkv, T, D]``, after RoPE, and its
    pattern: the attention is recomputed inside :func:`attnkit.ops.attend`, no T x T matrix) or the
    attention probabilities ``[B, H, T, T]`` / ``[B, T, T]`` (rows summing to 1), mixed densely.

    Args: dim, num_experts, top_k, normalize: as :class:`TopKRouter`.

    Example::

        >>> import torch
        >>> from attnkit.routing import AttentionAwareRouter, AttentionInputs
        >>> r = AttentionAwareRouter(32, num_experts=4, top_k=2)
        >>> q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
        >>> r(torch.randn(2, 6, 32), AttentionInputs(q, k, "causal")).weights.shape
        torch.Size([2, 6, 2])
    """

    needs_attention = True

    def _check_attention(self, x: Tensor, attention) -> None:
        B, T = x.shape[0], x.shape[1]
        if attention is None:
            raise ValueError("AttentionAwareRouter needs attention: the preceding attention layer's "
                             "AttentionInputs(q, k, pattern) or its probabilities [B, H, T, T]; "
                             "RoutedBlock passes them, or use router='topk' / 'similarity'")
        if isinstance(attention, AttentionInputs):
            q, k = attention.q, attention.k
            if q.dim() != 4 or k.dim() != 4 or q.shape[0] != B or q.shape[2] != T or k.shape[0] != B \
                    or k.shape[2] != T or q.shape[3] != k.shape[3] or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
                raise ValueError(f"attention q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, H, T, D] and "
                                 f"[B, Hkv, T, D] with B={B}, T={T} (as x) and H a multiple of Hkv")
        elif isinstance(attention, Tensor):
            if attention.dim() not in (3, 4) or attention.shape[0] != B or tuple(attention.shape[-2:]) != (T, T):
                raise ValueError(f"attention probabilities must be [B, H, T, T] or [B, T, T] with B={B}, T={T}, "
                                 f"got {tuple(attention.shape)}")
        else:
            raise ValueError(f"attention must be AttentionInputs or a tensor of probabilities, "
                             f"got {type(attention).__name__}")

    def distribution(self, x: Tensor, attention=None) -> Tensor:
        self._check_attention(x, attention)
        own = self.own_distribution(x)  # (B, T, E)
        if isinstance(attention, Tensor):
            graph = attention.mean(1) if attention.dim() == 4 else attention  # (B, T, T)
            return graph @ own
        q, k = attention.q, attention.k
        values = own[:, None].expand(-1, k.shape[1], -1, -1)  # (B, Hkv, T, E): each head mixes the same P
        mixed = attend(q, k, values, pattern=attention.pattern, scale=attention.scale)  # (B, H, T, E)
        return mixed.mean(1)

    def distribution_reference(self, x: Tensor, attention=None) -> Tensor:
        self._check_attention(x, attention)
        own = super().distribution_reference(x)
        probs = attention.probabilities() if isinstance(attention, AttentionInputs) else attention
        if probs.dim() == 3:
            probs = probs[:, None]
        H = probs.shape[1]
        mixed = torch.zeros_like(own)
        for h in range(H):  # sum_j A_h[i, j] p_j, head by head, then the mean
            mixed = mixed + probs[:, h] @ own / H
        return mixed


#: router names for :class:`SparseMoE`'s ``router`` argument
ROUTERS = {"topk": TopKRouter, "similarity": SimilarityAwareRouter, "attention": AttentionAwareRouter}


def build_router(router, dim: int, num_experts: int, top_k: int, **options) -> TopKRouter:
    if isinstance(router, TopKRouter):
        if options:
            raise ValueError(f"router options {sorted(options)} go with a router name, not a built router")
        if (router.dim, router.num_experts, router.top_k) != (dim, num_experts, top_k):
            raise ValueError(f"the router was built for dim={router.dim}, num_experts={router.num_experts}, "
                             f"top_k={router.top_k}; the layer has dim={dim}, num_experts={num_experts}, top_k={top_k}")
        return router
    if router not in ROUTERS:
        raise ValueError(f"unknown router {router!r}; accepted: {', '.join(ROUTERS)} or a TopKRouter instance")
    try:
        return ROUTERS[router](dim, num_experts, top_k, **options)
    except TypeError as err:
        raise ValueError(f"router {router!r}: {err}") from None


class Experts(nn.Module):
    """E GELU MLPs ``C -> F -> C`` with stacked weights ``w_in [E, C, F]``, ``w_out [E, F, C]``."""

    def __init__(self, num_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, hidden).uniform_(-dim**-0.5, dim**-0.5))
        self.b_in = nn.Parameter(torch.zeros(num_experts, hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, dim).uniform_(-hidden**-0.5, hidden**-0.5))
        self.b_out = nn.Parameter(torch.zeros(num_experts, dim))

    def one(self, expert: int, x: Tensor) -> Tensor:
        """Expert ``expert`` on tokens ``x [N, C]`` -> ``[N, C]``."""
        return F.gelu(x @ self.w_in[expert] + self.b_in[expert]) @ self.w_out[expert] + self.b_out[expert]

    def every(self, x: Tensor) -> Tensor:
        """Every expert on every token: ``x [N, C]`` -> ``[N, E, C]`` (the reference)."""
        h = F.gelu(torch.einsum("nc,ecf->nef", x, self.w_in) + self.b_in)  # (N, E, F)
        return torch.einsum("nef,efc->nec", h, self.w_out) + self.b_out

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}"


class SparseMoE(nn.Module):
    """A sparse mixture-of-experts feed-forward layer ``x [B, T, C] -> y [B, T, C]`` with a pluggable router.

    Args:
        dim: C.
        num_experts: E.
        top_k: k experts per token (``1 <= k <= E``).
        hidden: expert hidden width F (default ``2 * C``).
        router: ``"topk"`` (:class:`TopKRouter`), ``"similarity"`` (:class:`SimilarityAwareRouter`),
            ``"attention"`` (:class:`AttentionAwareRouter`: ``forward`` then needs ``attention``) or a built router.
        **router_options: keyword options of the named router (``temperature``, ``similarity``, ``causal``,
            ``normalize``, ...).

    ``forward(x, attention=None)`` returns ``y`` and leaves :attr:`aux_loss` (the Switch load-balancing loss of
    this call, differentiable) and :attr:`last_routing` (the :class:`Routing`, detached).

    Example::

        >>> import torch
        >>> from attnkit.routing import SparseMoE
        >>> SparseMoE(32, num_experts=4, top_k=1)(torch.randn(2, 5, 32)).shape
        torch.Size([2, 5, 32])
    """

    def __init__(self, dim: int, num_experts: int = 8, top_k: int = 2, *, hidden: int | None = None,
                 router="topk", **router_options) -> None:
        super().__init__()
        _check_common(dim, num_experts, top_k)
        hidden = positive_int(2 * dim if hidden is None else hidden, "hidden")
        self.dim, self.num_experts, self.top_k, self.hidden = dim, num_experts, top_k, hidden
        self.router = build_router(router, dim, num_experts, top_k, **router_options)
        self.experts = Experts(num_experts, dim, hidden)
        self.aux_loss: Tensor | None = None
        self.last_routing: Routing | None = None

    @property
    def needs_attention(self) -> bool:
        return self.router.needs_attention

    def dispatch(self, x: Tensor, routing: Routing) -> Tensor:
        """``sum_{e in S_i} w_ie f_e(x_i)``, each expert run once on the tokens routed to it."""
        B, T, C = x.shape
        tokens = x.reshape(B * T, C)
        experts = routing.experts.reshape(-1)  # (N k,)
        weights = routing.weights.reshape(-1)
        order = torch.argsort(experts, stable=True)
        token_of = order // self.top_k  # (N k,) the token of each sorted slot
        counts = torch.bincount(experts, minlength=self.num_experts).tolist()
        out = torch.zeros_like(tokens)
        start = 0
        for e, count in enumerate(counts):
            if count:
                slots = order[start:start + count]
                rows = token_of[start:start + count]
                out.index_add_(0, rows, self.experts.one(e, tokens[rows]) * weights[slots, None])
            start += count
        return out.reshape(B, T, C)

    def forward(self, x: Tensor, attention=None) -> Tensor:
        check_input(x, self.dim, self)
        routing = self.router(x, attention)
        self.aux_loss = balance_loss(routing, self.num_experts)
        self.last_routing = Routing(*(t.detach() for t in routing))
        return self.dispatch(x, routing)

    def reference(self, x: Tensor, attention=None) -> Tensor:
        """The layer written plainly: the router's materialised distribution, top-k, every expert on every
        token, and a dense ``[N, E]`` gate matrix with the k gates of each token (zeros elsewhere)."""
        check_input(x, self.dim)
        B, T, C = x.shape
        probs = self.router.distribution_reference(x, attention)
        routing = select_top_k(probs, self.top_k, self.router.normalize)
        gates = torch.zeros(B * T, self.num_experts, dtype=x.dtype, device=x.device)
        gates = gates.scatter(1, routing.experts.reshape(B * T, -1), routing.weights.reshape(B * T, -1))  # (N, E)
        every = self.experts.every(x.reshape(B * T, C))  # (N, E, C)
        return (gates[:, :, None] * every).sum(1).reshape(B, T, C)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}, hidden={self.hidden}"
