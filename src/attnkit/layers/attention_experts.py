"""BAM-style mixture of attention experts, with upcycling from dense attention layers.

BAM! Just Like That: Simple and Efficient Parameter Upcycling for Mixture of Experts (Zhang
et al., arXiv 2408.08274). ``E`` attention experts, each a full multi-head attention of the
layer's width, mixed by a soft router (every expert is active)::

    r      = softmax(W_r x)                                          (B, T, E)
    y      = sum_e r_e * W_o,e MHA_e(x)                              each expert: H heads of dim C/H
    share_kv=True:  the experts share one K and V projection (BAM's key-value sharing variant):
                    only W_q,e and W_o,e are per expert, and the KV cache is that of one MHA

Upcycling (:func:`upcycle_attention`): ``E`` dense attention layers, e.g. the same layer of
``E`` separately trained models, become the experts (their q, k, v, o weights copied; with
shared K/V the shared projection starts as the experts' mean); the router starts at zero,
so the mixture starts as the experts' average. :func:`upcycle_models` does this for every
layer of ``E`` :class:`~attnkit.models.DecoderLM` and averages the other parameters
(embeddings, norms, MLPs), as Branch-Train-Mix does for what it does not turn into experts.

Implementation: the experts are laid out as ``E*H`` heads of one
:class:`~attnkit.layers.MultiHeadAttention` (query head ``j = h*E + e`` is expert ``e``'s
head ``h``; with shared K/V it reads key head ``h``, GQA-style), so there is one attention
call, one KV cache, and the router weight is applied to each head's output before the
shared output projection (``W_o = [W_o,1 ... W_o,E]``). The reference path is
:meth:`AttentionExperts.reference`, the experts one by one as written above.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .._checks import head_dim_of, positive_int
from ..cards import Capabilities, Card, FlopCount, dense_attention_flops
from .multi_head import MultiHeadAttention, head_shape

__all__ = ["AttentionExperts", "upcycle_attention", "upcycle_models"]


class AttentionExperts(MultiHeadAttention):
    """A soft-routed mixture of ``num_experts`` multi-head attention experts.

    Args:
        dim: width C. num_heads: H per expert (head dim C / H).
        num_experts: E (default 4).
        share_kv: experts share the key and value projections (default False).
        rope, qk_norm, bias, backend: as :class:`~attnkit.layers.MultiHeadAttention` (causal).

    Shapes: ``x [B, T, C] -> [B, T, C]``; ``layer.last_routing`` holds the router weights
    ``[B, T, E]`` of the last call.

    Example::

        >>> import torch
        >>> from attnkit.layers import AttentionExperts
        >>> layer = AttentionExperts(256, 8, num_experts=4, share_kv=True)
        >>> layer(torch.randn(2, 16, 256)).shape
        torch.Size([2, 16, 256])
    """

    def __init__(self, dim: int, num_heads: int, *, num_experts: int = 4, share_kv: bool = False,
                 head_dim: int | None = None, **options):
        positive_int(num_experts, "num_experts")
        positive_int(num_heads, "num_heads")
        if options.get("pattern", "causal") != "causal":
            raise ValueError("AttentionExperts is causal")
        if "num_kv_heads" in options:
            raise ValueError("AttentionExperts takes no num_kv_heads: each expert is a full multi-head attention "
                             "(share_kv=True shares one K/V among the experts)")
        head_dim = head_dim_of(dim, num_heads, head_dim)
        kv_heads = num_heads if share_kv else num_heads * num_experts
        super().__init__(dim, num_heads * num_experts, kv_heads, head_dim=head_dim, **options)
        self.num_experts, self.expert_heads, self.share_kv = num_experts, num_heads, share_kv
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.last_routing: Tensor | None = None
        self._weights: Tensor | None = None

    def routing(self, x: Tensor) -> Tensor:
        """Soft router weights ``[B, T, E]``."""
        return torch.softmax(self.router(x).to(torch.promote_types(x.dtype, torch.float32)), dim=-1).to(x.dtype)

    def adjust(self, x, q, k, v, positions, state):
        self._weights = self.routing(x)  # read by core(), within this forward
        self.last_routing = self._weights.detach()
        return q, k, v

    def core(self, q, k, v, pattern, q_offset):
        weights, self._weights = self._weights, None
        out = super().core(q, k, v, pattern, q_offset)  # (B, E*H, T, D), head j = h*E + e
        per_head = weights.repeat(1, 1, self.expert_heads)  # (B, T, H*E): head j gets weight of expert j % E
        return out * per_head.transpose(1, 2)[..., None]

    # -- the experts, one by one ---------------------------------------------------------
    def expert_weights(self, e: int) -> dict:
        """Expert ``e``'s own projections as dense MHA weights: q ``[H*D, C]``, k, v, o ``[C, H*D]``."""
        H, E, D, C = self.expert_heads, self.num_experts, self.head_dim, self.dim
        w = self.qkv_proj.weight
        q_all, k_all, v_all = w.split((H * E * D, self.num_kv_heads * D, self.num_kv_heads * D))
        q = q_all.view(H, E, D, C)[:, e].reshape(H * D, C)
        if self.share_kv:
            k, v = k_all, v_all
        else:
            k, v = k_all.view(H, E, D, C)[:, e].reshape(H * D, C), v_all.view(H, E, D, C)[:, e].reshape(H * D, C)
        o = self.o_proj.weight.view(C, H, E, D)[:, :, e].reshape(C, H * D)
        return {"q": q, "k": k, "v": v, "o": o}

    def reference(self, x: Tensor) -> Tensor:
        """``sum_e r_e W_o,e MHA_e(x)``: each expert as its own causal attention, float64."""
        B, T, _ = x.shape
        H, D = self.expert_heads, self.head_dim
        xd = x.double()
        r = torch.softmax(self.router(x).double(), -1)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        y = 0
        for e in range(self.num_experts):
            w = {n: t.double() for n, t in self.expert_weights(e).items()}
            q = (xd @ w["q"].T).view(B, T, H, D).transpose(1, 2)
            k = (xd @ w["k"].T).view(B, T, H, D).transpose(1, 2)
            v = (xd @ w["v"].T).view(B, T, H, D).transpose(1, 2)
            if self.rope is not None:
                q, k = self.rope(q, k)
            p = (q @ k.transpose(-1, -2) * D**-0.5).masked_fill(~mask, float("-inf")).softmax(-1)
            y = y + r[..., e : e + 1] * ((p @ v).transpose(1, 2).reshape(B, T, H * D) @ w["o"].T)
        return y.to(x.dtype)


@torch.no_grad()
def upcycle_attention(dense: list[MultiHeadAttention], *, share_kv: bool = False) -> AttentionExperts:
    """Build an :class:`AttentionExperts` whose experts are copies of ``dense`` (plain MHA
    layers of one width and head count, no biases, no qk-norm). Shared K/V start as the mean
    of the dense layers' K/V. The router starts at zero: an equal mix of the experts."""
    if not dense or not all(isinstance(d, MultiHeadAttention) and type(d) is MultiHeadAttention for d in dense):
        raise ValueError("upcycle_attention takes a non-empty list of plain MultiHeadAttention layers")
    first = dense[0]
    for d in dense:
        if (d.dim, d.num_heads, d.num_kv_heads, d.head_dim) != (first.dim, first.num_heads, first.num_heads, first.head_dim):
            raise ValueError("upcycle_attention needs layers of one shape with num_kv_heads == num_heads (MHA); got "
                             f"{[(x.dim, x.num_heads, x.num_kv_heads, x.head_dim) for x in dense]}")
        if d.qkv_proj.bias is not None or d.q_norm is not None:
            raise ValueError("upcycle_attention takes layers without projection biases or qk-norm")
    E, H, D, C = len(dense), first.num_heads, first.head_dim, first.dim
    layer = AttentionExperts(C, H, num_experts=E, share_kv=share_kv, head_dim=D, rope=first.rope is not None,
                             backend=first.backend).to(first.qkv_proj.weight)
    q, k, v = zip(*(d.qkv_proj.weight.split((H * D, H * D, H * D)) for d in dense))  # each (H*D, C)
    q_all = torch.stack([t.view(H, D, C) for t in q], dim=1)  # (H, E, D, C): head j = h*E + e
    if share_kv:
        k_all, v_all = torch.stack(k).mean(0), torch.stack(v).mean(0)
    else:
        k_all = torch.stack([t.view(H, D, C) for t in k], dim=1).reshape(-1, C)
        v_all = torch.stack([t.view(H, D, C) for t in v], dim=1).reshape(-1, C)
    layer.qkv_proj.weight.copy_(torch.cat([q_all.reshape(-1, C), k_all, v_all]))
    o = torch.stack([d.o_proj.weight.view(C, H, D) for d in dense], dim=2)  # (C, H, E, D)
    layer.o_proj.weight.copy_(o.reshape(C, -1))
    layer.router.weight.zero_()
    return layer


@torch.no_grad()
def upcycle_models(models: list, *, share_kv: bool = False):
    """``E`` :class:`~attnkit.models.DecoderLM` of one shape (MHA attention) -> one DecoderLM
    whose attention layers are :class:`AttentionExperts` upcycled from them; every other
    parameter is the models' average."""
    from ..models import DecoderLM

    if len(models) < 2 or not all(isinstance(m, DecoderLM) for m in models):
        raise ValueError("upcycle_models takes a list of at least two DecoderLM")
    cfg = models[0].config
    if any(m.config != cfg for m in models) or any(a != "mha" for a in cfg["attention"]):
        raise ValueError("upcycle_models needs DecoderLMs of one configuration with 'mha' attention in every layer")
    merged = copy.deepcopy(models[0])
    for name, param in merged.named_parameters():
        param.copy_(torch.stack([dict(m.named_parameters())[name] for m in models]).mean(0))
    for i, block in enumerate(merged.layers):
        block.attn = upcycle_attention([m.layers[i].attn for m in models], share_kv=share_kv)
    merged.config = {**cfg, "attention": ["bam"] * len(merged.layers),
                     "attention_options": [{"num_experts": len(models), "share_kv": share_kv}] * len(merged.layers)}
    return merged


def attention_experts_flops(batch: int, seq: int, config: dict) -> FlopCount:
    """E experts: E times the attention core; q and o per expert, k and v per expert or once."""
    dim, heads, _, head_dim = head_shape(config)
    E = config.get("num_experts", 4)
    inner = heads * head_dim
    kv = 1 if config.get("share_kv") else E
    core = E * dense_attention_flops(batch, seq, num_heads=heads, head_dim=head_dim, pattern="causal")
    projection = 2.0 * batch * seq * dim * inner * (2 * E + 2 * kv) + 2.0 * batch * seq * dim * E
    return FlopCount(attention_fwd=core, projection_fwd=projection)


CARDS = (
    Card(
        name="bam",
        title="BAM! Just Like That: Simple and Efficient Parameter Upcycling for Mixture of Experts",
        arxiv="2408.08274",
        family="sharing",
        layer=AttentionExperts,
        flops=attention_experts_flops,
        defaults={"num_experts": 4},
        capabilities=Capabilities(bidirectional=False),
        summary="soft-routed mixture of attention experts (optionally sharing K/V); upcycled from dense layers",
    ),
)
