"""Concept-Centric Transformers: Enhancing Model Interpretability through Object-Centric Concept Learning
within a Shared Global Workspace (Hong, Park, Pavlic; arXiv 2305.15775). Official code:
github.com/jyhong0304/concept_centric_transformers (``ctc/ctc.py``'s ``ConceptCentricTransformer``, spatial
stream, and ``ctc/model_utils.py``'s ``ConceptSlotAttention`` and ``CrossAttention``; read for this
module, re-written here).

A classification head over input tokens ``x`` (B, N, C), with S concept slots as the shared global
workspace::

    slots   s0 = mu + o_s (+ sigma * noise while training);   x' = LN(x)
            A_slot = softmax_S((W_q LN(s)) (W_k x')^T / sqrt(C))^T   (B, N, S): slots compete per token
            U = (A_slot / sum_N A_slot)^T (W_v x')                    weighted mean over the tokens
            s = GRU(U, s)   (``slot_iterations`` times);  concepts = s + P   (P: learned slot order)
    read    A = softmax_S((W_q' x)(W_k' concepts)^T / sqrt(D))       (B, H, N, S): tokens -> workspace
            logits = mean_N W_out concat_h(A_h V_h(concepts))         W_out: C -> K, straight to classes

Explanations (:meth:`ConceptCentricTransformer.explain`): the concept attention ``A`` averaged over
heads (B, N, S) says which concepts each token read; each concept's exact contribution to a class
logit is linear in ``A`` (``mean_N sum_h A_h[n, s] W_out^h V_h[s]``), so the concepts a prediction
used are ranked exactly, and the slot attention of the top concept (its ``A_slot`` column, normalised
over tokens) is where in the image that concept was gathered from.

What differs from the official code: each slot starts at ``mu`` plus a learned offset ``o_s``, without
noise in eval mode (the official slots share ``mu`` and draw noise at every forward; noise is kept for
training), so explanations are deterministic; the concept-supervision losses (the paper's explanation loss with annotated concepts)
are left out, the task here has no concept annotations. ``ConceptCentricTransformer`` also takes
the entropy regulariser of the official code as :func:`concept_entropy`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import positive_int
from ..cards import FlopCount
from .vit import check_backend, check_heads, check_tokens, merge_heads, softmax_attention, split_heads

__all__ = ["ConceptSlotAttention", "ConceptCentricTransformer", "concept_read_reference", "slot_attention_reference",
           "concept_entropy", "cct_flops"]


class ConceptSlotAttention(nn.Module):
    """Slot attention of ``num_slots`` slots over tokens (B, N, C) -> (slots (B, S, C), A_slot (B, N, S))."""

    def __init__(self, dim: int, num_slots: int, iterations: int = 1, epsilon: float = 1e-8):
        super().__init__()
        self.dim, self.num_slots = positive_int(dim, "dim"), positive_int(num_slots, "num_slots")
        self.iterations = positive_int(iterations, "slot_iterations")
        self.epsilon = epsilon
        self.mu = nn.Parameter(torch.randn(1, 1, dim) * dim ** -0.5)
        self.log_sigma = nn.Parameter(torch.full((1, 1, dim), -1.0))
        # distinct starting points so the slots can break symmetry without noise in eval mode
        self.offsets = nn.Parameter(torch.randn(1, num_slots, dim) * dim ** -0.5)
        self.norm_inputs, self.norm_slots = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.gru = nn.GRUCell(dim, dim)

    def initial_slots(self, batch: int, dtype, device) -> torch.Tensor:
        slots = (self.mu + self.offsets).expand(batch, -1, -1)
        if self.training:
            noise = torch.randn(batch, self.num_slots, self.dim, dtype=dtype, device=device)
            slots = slots + self.log_sigma.exp() * noise
        return slots

    def forward(self, x: torch.Tensor, slots: torch.Tensor | None = None):
        check_tokens(x, self.dim)
        B = x.shape[0]
        slots = self.initial_slots(B, x.dtype, x.device) if slots is None else slots
        x = self.norm_inputs(x)
        k, v = self.k(x) * self.dim ** -0.5, self.v(x)  # (B, N, C)
        for _ in range(self.iterations):
            q = self.q(self.norm_slots(slots))  # (B, S, C)
            attn = (k @ q.transpose(1, 2)).softmax(-1)  # (B, N, S): softmax over slots, the competition
            weights = attn + self.epsilon
            weights = weights / weights.sum(1, keepdim=True)  # weighted mean over tokens
            updates = weights.transpose(1, 2) @ v  # (B, S, C)
            slots = self.gru(updates.reshape(-1, self.dim), slots.reshape(-1, self.dim)).view(B, self.num_slots, self.dim)
        return slots, attn


class ConceptCentricTransformer(nn.Module):
    """The CCT head: tokens (B, N, C) -> logits (B, K). ``forward`` returns logits; :meth:`explain`
    returns the attentions. ``backend`` runs the token -> concept read through SDPA or the reference."""

    def __init__(self, dim: int, num_heads: int = 4, num_concepts: int = 8, num_classes: int = 10,
                 slot_iterations: int = 1, backend: str = "sdpa"):
        super().__init__()
        self.head_dim = check_heads(dim, num_heads)
        self.dim, self.num_heads = dim, num_heads
        self.num_concepts = positive_int(num_concepts, "num_concepts")
        self.num_classes = positive_int(num_classes, "num_classes")
        self.backend = check_backend(backend)
        self.slots = ConceptSlotAttention(dim, num_concepts, slot_iterations)
        self.slot_order = nn.Parameter(torch.zeros(1, num_concepts, dim))
        self.q, self.kv = nn.Linear(dim, dim, bias=False), nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, num_classes)

    def concepts(self, x: torch.Tensor):
        slots, slot_attn = self.slots(x)
        return slots + self.slot_order, slot_attn

    def _read(self, x, concepts):
        H = self.num_heads
        q = split_heads(self.q(x), H)  # (B, H, N, D)
        k, v = (split_heads(t, H) for t in self.kv(concepts).chunk(2, dim=-1))  # (B, H, S, D)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tokens(x, self.dim)
        concepts, _ = self.concepts(x)
        q, k, v = self._read(x, concepts)
        return self.out(merge_heads(softmax_attention(q, k, v, self.backend))).mean(1)  # (B, K)

    @torch.no_grad()
    def explain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``logits`` (B, K); ``concept_attn`` (B, N, S): token -> concept attention averaged over heads;
        ``contribution`` (B, S, K): each concept's exact share of each class logit (they sum, with the
        bias, to the logits); ``slot_attn`` (B, N, S): slot attention normalised over the tokens;
        ``top_concept`` (B,): the concept contributing most to the predicted class; ``where`` (B, N):
        the top concept's slot attention over the tokens (sums to 1: where it was gathered from);
        ``read`` (B, N): the tokens' attention to the top concept, normalised over the tokens (who read
        it); ``token_contribution`` (B, N): each token's exact share of the predicted logit (their mean
        plus the bias is the logit)."""
        check_tokens(x, self.dim)
        concepts, slot_attn = self.concepts(x)
        q, k, v = self._read(x, concepts)
        attn = ((q @ k.transpose(-1, -2)) * self.head_dim ** -0.5).softmax(-1)  # (B, H, N, S)
        B, H, N, S = attn.shape
        w_out = self.out.weight.view(self.num_classes, H, self.head_dim)  # (K, H, D)
        per_concept = torch.einsum("bhsd,khd->bhsk", v, w_out)  # (B, H, S, K): what reading a concept adds
        contribution = torch.einsum("bhns,bhsk->bsk", attn, per_concept) / N  # (B, S, K)
        logits = contribution.sum(1) + self.out.bias
        predicted = logits.argmax(-1)
        top = contribution[torch.arange(B), :, predicted].argmax(-1)  # (B,)
        where = slot_attn / slot_attn.sum(1, keepdim=True)
        rows = torch.arange(B)
        read = attn.mean(1)[rows, :, top]  # (B, N): which tokens read the top concept
        # each token's exact share of the predicted logit (the logit is their mean plus the bias)
        per_token = torch.einsum("bhns,bhsk->bnk", attn, per_concept)[rows, :, predicted]  # (B, N)
        return {"logits": logits, "concept_attn": attn.mean(1), "contribution": contribution, "slot_attn": where,
                "top_concept": top, "where": where[rows, :, top], "read": read / read.sum(1, keepdim=True),
                "token_contribution": per_token}


def concept_entropy(concept_attn: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the concept attention rows (the official code's sparsity regulariser)."""
    return -(concept_attn * torch.log(concept_attn + 1e-8)).sum(-1).mean()


def slot_attention_reference(x, slots, w: dict, iterations: int, epsilon: float = 1e-8):
    """Slot attention written plainly (use float64): ``x`` (B, N, C) already LayerNormed, ``slots``
    (B, S, C); ``w``: ``q, k, v`` (C, C), ``norm_slots`` a callable, ``gru`` a callable (input, hidden).
    Returns the slots and the last attention (B, N, S)."""
    B, N, C = x.shape
    k, v = x @ w["k"].T / math.sqrt(C), x @ w["v"].T
    for _ in range(iterations):
        q = w["norm_slots"](slots) @ w["q"].T
        logits = torch.einsum("bnc,bsc->bns", k, q)
        attn = torch.exp(logits - logits.amax(-1, keepdim=True))
        attn = attn / attn.sum(-1, keepdim=True)
        weights = (attn + epsilon) / (attn + epsilon).sum(1, keepdim=True)
        updates = torch.einsum("bns,bnc->bsc", weights, v)
        slots = w["gru"](updates.reshape(-1, C), slots.reshape(-1, C)).view(B, -1, C)
    return slots, attn


def concept_read_reference(x, concepts, w: dict, num_heads: int):
    """The token -> concept cross-attention and the class read-out, per head (use float64): ``w`` holds
    ``q`` (C, C), ``k``, ``v`` (C, C), ``out`` (K, C) and ``bout`` (K,). Returns logits (B, K)."""
    B, N, C = x.shape
    D = C // num_heads
    heads = []
    for h in range(num_heads):
        cols = slice(h * D, (h + 1) * D)
        q, k, v = x @ w["q"][cols].T, concepts @ w["k"][cols].T, concepts @ w["v"][cols].T
        scores = torch.einsum("bnd,bsd->bns", q, k) / math.sqrt(D)
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))
        heads.append(torch.einsum("bns,bsd->bnd", weights / weights.sum(-1, keepdim=True), v))
    return (torch.cat(heads, -1) @ w["out"].T + w["bout"]).mean(1)


def cct_flops(batch: int, seq: int, config: dict) -> FlopCount:
    """Forward FLOPs of the CCT head over ``seq`` tokens (norms, GRU gates' elementwise ops not counted)."""
    C, S, K = config["dim"], config.get("num_concepts", 8), config.get("num_classes", 10)
    iters = config.get("slot_iterations", 1)
    projection = 2.0 * batch * seq * C * 2 * C  # slot k, v
    projection += iters * (2.0 * batch * S * C * C + 2.0 * batch * S * C * 6 * C)  # slot q, GRU (6 C^2 per slot)
    projection += 2.0 * batch * seq * C * C + 2.0 * batch * S * C * 2 * C + 2.0 * batch * seq * C * K  # read q, kv, out
    attention = iters * 4.0 * batch * seq * S * C + 4.0 * batch * seq * S * C
    return FlopCount(attention_fwd=attention, projection_fwd=projection)
