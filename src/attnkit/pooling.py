"""Trainable pooling of a frozen LM's hidden states into one embedding per sequence.

Paper: "Pooling And Attention: What Are Effective Designs For LLM-Based Embedding Models?"
(Tang and Yang, arXiv 2409.02727). Official code: github.com/yixuantt/PoolingAndAttn
(``pooling_layers/MultiLayersTrainablePooling.py``, ``LastLayersTrainablePooling.py``).

Legend: B batch, L layers, T tokens, C model width, N latents, H heads, D head dim.

**Multi-layer trainable pooling** (the paper's proposal). Each layer ``l = 1..L`` of the frozen LM
is first summarised by the mean of its token states over the real (unpadded) tokens, a learned
layer embedding ``E_l`` is added, and ``N`` trainable latents attend over those ``L`` summaries::

    s_l   = mean_t h_l[t] + E_l                                   # (B, L, C)
    z     = Z + W_o · softmax((LN_q(Z) W_q)(LN_k(s) W_k)^T / sqrt(D)) (LN_k(s) W_v)   # (B, N, C)
    z     = z + FF(LN_f(z))                                       # GEGLU feed-forward
    e     = normalize(mean_n z_n)                                 # (B, C)

**Last-layer trainable pooling** (the paper's other variant): the same latent cross-attention, over
the ``T`` token states of the last layer (no layer embedding); padded tokens are masked out here
(the official code passes no mask, its batches being unpadded at evaluation).

**Baselines**: last-token pooling (the state of the last real token, the usual choice for a
causal LM) and mean pooling (the mean of the last layer's real tokens), each followed by a
trainable linear map, so every method trains a head of its own on the same contrastive loss.

What differs from plain multi-head attention: the queries are parameters (latents), not tokens;
the keys are one summary per *layer*, so the attention weights say which depths the embedding
reads. The attention core is :func:`latent_attention` (SDPA) with a float64
:func:`latent_attention_reference` beside it.

    >>> pool = TrainablePooling(256, num_layers=12)               # source="all-layers"
    >>> hidden = torch.randn(2, 12, 40, 256)                      # (B, L, T, C), e.g. from hidden_states()
    >>> pool(hidden, torch.ones(2, 40, dtype=torch.bool)).shape   # (B, C), unit norm
    torch.Size([2, 256])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cards import Capabilities, Card, FlopCount

__all__ = ["TrainablePooling", "LastTokenPooling", "MeanPooling", "latent_attention", "latent_attention_reference",
           "layer_means", "hidden_states", "decoder_hidden_states", "contrastive_loss", "recall_at", "CARDS"]

SOURCES = ("all-layers", "last-layer")
BACKENDS = ("sdpa", "reference")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_hidden(hidden: Tensor, mask: Tensor | None, dim: int, num_layers: int | None) -> None:
    if not isinstance(hidden, Tensor) or hidden.dim() != 4:
        shape = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
        raise ValueError(f"hidden must be a tensor (B, L, T, C) of per-layer token states, got {shape}")
    if hidden.shape[-1] != dim:
        raise ValueError(f"hidden's width {hidden.shape[-1]} differs from the pooling's dim {dim}")
    if num_layers is not None and hidden.shape[1] != num_layers:
        raise ValueError(f"hidden has {hidden.shape[1]} layers, the pooling was built for num_layers={num_layers} "
                         "(pass the L layer outputs, not the embedding output)")
    if mask is not None:
        if mask.dtype != torch.bool or tuple(mask.shape) != (hidden.shape[0], hidden.shape[2]):
            raise ValueError(f"mask must be a bool tensor (B, T) = {(hidden.shape[0], hidden.shape[2])} (True = real "
                             f"token), got {mask.dtype} {tuple(mask.shape)}")
        if not bool(mask.any(dim=1).all()):
            raise ValueError("mask: every sequence needs at least one real token (a row of mask is all False)")


def layer_means(hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over real tokens of each layer: (B, L, T, C), mask (B, T) -> (B, L, C)."""
    if mask is None:
        return hidden.mean(dim=2)
    weights = mask.to(hidden.dtype)[:, None, :, None]  # (B, 1, T, 1)
    return (hidden * weights).sum(dim=2) / weights.sum(dim=2)


def latent_attention_reference(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """Softmax attention written out, computed in float64: q (B, H, N, D), k and v (B, H, S, D),
    key_mask (B, S) bool (True = attend) -> (B, H, N, D) in q's dtype."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    scores = torch.einsum("bhnd,bhsd->bhns", q64, k64) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return torch.einsum("bhns,bhsd->bhnd", weights, v64).to(q.dtype)


def latent_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """The fast path of :func:`latent_attention_reference`: SDPA with a boolean key mask."""
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class _GEGLU(nn.Module):
    """The official pooling's feed-forward: Linear to 2·m·C, x · gelu(gate), Linear back to C."""

    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.up = nn.Linear(dim, 2 * mult * dim)
        self.down = nn.Linear(mult * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.up(x).chunk(2, dim=-1)
        return self.down(x * F.gelu(gate))


class TrainablePooling(nn.Module):
    """Latent cross-attention pooling of a frozen LM's hidden states (B, L, T, C) -> (B, C).

    ``source="all-layers"``: the paper's multi-layer trainable pooling (latents attend over the L
    per-layer token means plus a layer embedding); ``"last-layer"``: over the last layer's T tokens.
    ``num_latents`` latents of width ``dim``, ``num_heads`` heads of ``head_dim`` (default
    ``dim // num_heads``), GEGLU feed-forward of ``ff_mult`` x width, mean over latents, unit norm
    when ``normalize``. ``backend="reference"`` runs the attention core in float64 written out.
    """

    def __init__(self, dim: int, num_layers: int, *, num_heads: int = 4, num_latents: int = 8,
                 head_dim: int | None = None, ff_mult: int = 2, source: str = "all-layers",
                 normalize: bool = True, backend: str = "sdpa"):
        super().__init__()
        self.dim = _positive_int("dim", dim)
        self.num_layers = _positive_int("num_layers", num_layers)
        self.num_heads = _positive_int("num_heads", num_heads)
        self.num_latents = _positive_int("num_latents", num_latents)
        _positive_int("ff_mult", ff_mult)
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}), or pass head_dim")
            head_dim = dim // num_heads
        self.head_dim = _positive_int("head_dim", head_dim)
        if source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.source, self.backend, self.normalize = source, backend, bool(normalize)
        inner = self.num_heads * self.head_dim
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        # a layer embedding only where the keys are layers: token keys carry the LM's own positions
        self.layer_embedding = nn.Embedding(num_layers, dim) if source == "all-layers" else None
        self.norm_latents = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = _GEGLU(dim, ff_mult)
        self.last_weights: Tensor | None = None  # (B, H, N, S) of the latest call, for reading which layers

    def context(self, hidden: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The keys' source: (B, L, C) layer summaries and no mask, or (B, T, C) last-layer tokens and mask."""
        if self.source == "all-layers":
            positions = torch.arange(hidden.shape[1], device=hidden.device)
            return layer_means(hidden, mask) + self.layer_embedding(positions), None
        return hidden[:, -1], mask

    def forward(self, hidden: Tensor, mask: Tensor | None = None) -> Tensor:
        """hidden (B, L, T, C) per-layer token states (layers 1..L, not the embedding output), mask
        (B, T) bool (True = real token) or None -> (B, C)."""
        _check_hidden(hidden, mask, self.dim, self.num_layers if self.source == "all-layers" else None)
        context, key_mask = self.context(hidden, mask)
        batch = hidden.shape[0]
        latents = self.latents.to(hidden.dtype).expand(batch, -1, -1)  # (B, N, C)
        q = self.to_q(self.norm_latents(latents))
        k, v = self.to_kv(self.norm_context(context)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for t in (q, k, v))  # (B, H, *, D)
        if self.backend == "reference":
            out = latent_attention_reference(q, k, v, key_mask)
        else:
            out = latent_attention(q, k, v, key_mask)
        with torch.no_grad():  # the weights for inspection only (which layers the latents read)
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
            if key_mask is not None:
                scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
            self.last_weights = scores.softmax(-1)
        z = latents + self.to_out(out.transpose(1, 2).flatten(2))  # (B, N, C)
        z = z + self.ff(self.norm_ff(z))
        pooled = z.mean(dim=1)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled


class LastTokenPooling(nn.Module):
    """Baseline: the last layer's state at the last real token, through a trainable linear map."""

    def __init__(self, dim: int, num_layers: int | None = None, *, num_heads: int | None = None, normalize: bool = True):
        # num_layers and num_heads are unused: the card's common signature (dim, num_heads, num_layers)
        super().__init__()
        self.dim, self.normalize = _positive_int("dim", dim), bool(normalize)
        self.proj = nn.Linear(dim, dim)

    def forward(self, hidden: Tensor, mask: Tensor | None = None) -> Tensor:
        _check_hidden(hidden, mask, self.dim, None)
        last = hidden[:, -1]  # (B, T, C)
        if mask is None:
            state = last[:, -1]
        else:  # right padding: the last True of each row
            index = mask.shape[1] - 1 - mask.flip(1).to(torch.int8).argmax(dim=1)
            state = last[torch.arange(last.shape[0], device=last.device), index]
        out = self.proj(state)
        return F.normalize(out, dim=-1) if self.normalize else out


class MeanPooling(nn.Module):
    """Baseline: the mean of the last layer's real tokens, through a trainable linear map."""

    def __init__(self, dim: int, num_layers: int | None = None, *, num_heads: int | None = None, normalize: bool = True):
        # num_layers and num_heads are unused: the card's common signature (dim, num_heads, num_layers)
        super().__init__()
        self.dim, self.normalize = _positive_int("dim", dim), bool(normalize)
        self.proj = nn.Linear(dim, dim)

    def forward(self, hidden: Tensor, mask: Tensor | None = None) -> Tensor:
        _check_hidden(hidden, mask, self.dim, None)
        out = self.proj(layer_means(hidden[:, -1:], mask)[:, 0])
        return F.normalize(out, dim=-1) if self.normalize else out


# -- the frozen LM's hidden states -----------------------------------------------------------


@torch.no_grad()
def hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Every layer's output of a transformers causal LM (frozen, no grad): (B, T) ids -> (B, L, T, C),
    layers 1..L (the embedding output, HF's ``hidden_states[0]``, is left out as in the paper).
    HF's last entry has the final norm applied; the others are raw residual streams."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    return torch.stack(out.hidden_states[1:], dim=1)


@torch.no_grad()
def decoder_hidden_states(model: nn.Module, tokens: Tensor) -> Tensor:
    """The same for an attnkit :class:`~attnkit.models.DecoderLM` (run block by block, no cache):
    (B, T) -> (B, L, T, C); the last entry has the final norm applied, as ``model.hidden`` returns."""
    x = model.embed(tokens)
    states = []
    for block in model.layers:
        x = block(x)
        states.append(x)
    states[-1] = model.norm(states[-1])
    return torch.stack(states, dim=1)


# -- training and evaluation ------------------------------------------------------------------


def contrastive_loss(a: Tensor, b: Tensor, temperature: float = 0.05) -> Tensor:
    """Symmetric InfoNCE with in-batch negatives: a, b (B, C) unit embeddings of paired texts."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"a and b must be (B, C) of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    logits = a @ b.T / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def recall_at(queries: Tensor, keys: Tensor, ks=(1, 10)) -> dict[int, float]:
    """Recall@k of retrieving ``keys[i]`` for ``queries[i]`` among all keys by cosine similarity."""
    sims = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T
    rank = (sims > sims.diagonal()[:, None]).sum(dim=1)  # how many keys beat the true one
    return {k: float((rank < k).float().mean()) for k in ks}


# -- cards ------------------------------------------------------------------------------------


def pooling_flops(batch: int, seq: int, config: dict) -> FlopCount:
    """FLOPs of one pooling call over (B, L, T, C) states: ``seq`` tokens, ``num_layers`` layers."""
    dim, heads = config["dim"], config.get("num_heads", 4)
    head_dim = config.get("head_dim") or dim // heads
    latents, layers = config.get("num_latents", 8), config["num_layers"]
    keys = layers if config.get("source", "all-layers") == "all-layers" else seq
    inner = heads * head_dim
    attention = 4.0 * batch * heads * latents * keys * head_dim
    ff = config.get("ff_mult", 2)
    projection = 2.0 * batch * (latents * dim * inner + keys * dim * 2 * inner + latents * inner * dim
                                + latents * 3 * ff * dim * dim)
    summary = batch * layers * seq * dim if keys == layers else 0.0  # the per-layer token means
    return FlopCount(attention_fwd=attention, projection_fwd=projection + summary)


def _linear_head_flops(batch: int, seq: int, config: dict) -> FlopCount:
    return FlopCount(attention_fwd=0.0, projection_fwd=2.0 * batch * config["dim"] ** 2)


_TITLE = "Pooling And Attention: What Are Effective Designs For LLM-Based Embedding Models?"
_KIND = "pooling"
_CAPS = Capabilities(causal=False, bidirectional=True, decode=False, varlen=True, backends=("reference", "sdpa"))

#: pooling heads over a frozen LM's hidden states (B, L, T, C) -> (B, C); kind "pooling", not in
#: the layer registry (they are not x (B, T, C) -> (B, T, C) layers)
CARDS = (
    Card(name="multi-layer-pooling", title=_TITLE, arxiv="2409.02727", family="pooling", layer=TrainablePooling,
         flops=pooling_flops, defaults={"num_layers": 12, "source": "all-layers"}, capabilities=_CAPS, kind=_KIND,
         summary="trainable latents cross-attend over the per-layer token means of every layer (+ layer embedding)"),
    Card(name="last-layer-pooling", title=_TITLE, arxiv="2409.02727", family="pooling", layer=TrainablePooling,
         flops=pooling_flops, defaults={"num_layers": 12, "source": "last-layer"}, capabilities=_CAPS, kind=_KIND,
         summary="trainable latents cross-attend over the last layer's tokens"),
    Card(name="last-token-pooling", title="last-token pooling (baseline)", arxiv=None, family="pooling",
         layer=LastTokenPooling, flops=_linear_head_flops, capabilities=_CAPS, kind=_KIND,
         summary="the last real token's last-layer state, linear head"),
    Card(name="mean-pooling", title="mean pooling (baseline)", arxiv=None, family="pooling", layer=MeanPooling,
         flops=_linear_head_flops, capabilities=_CAPS, kind=_KIND,
         summary="the mean of the last layer's real tokens, linear head"),
)
