"""MODA: modular duplex attention over the tokens of two modalities in one sequence.

Paper: "MODA: MOdular Duplex Attention for Multimodal Perception, Cognition, and Emotion
Understanding" (Zhang et al., ICML 2025, arXiv 2507.04635). Official code: github.com/KwaiVGI/MODA
(``moda/model/language_model/modeling_llama_local_moda.py``, the attention's forward).

Legend: B batch, T tokens (both modalities, in any order), C width, H heads, D head dim; ``modality``
(B, T) holds 0 or 1 per token.

**Duplex alignment** (correct-after-align, first the align). Per head, each modality ``m`` gives a
D x D map from its keys and values, its "basis": ``G_m = rownorm(K̂_m^T V_m)`` with ``K̂`` the keys
normalised to unit length (after adding 1e-6, as the official code does) and the sum over modality
``m``'s tokens only. A key of modality ``a`` is mapped into the other modality ``b``'s space and
fused with itself::

    k_i  <-  P_a (k_i + r_a ⊙ (k̂_i G_b))            r_a (D,) zero at init, P_a (D x D) identity at init

``duplex=True`` aligns both ways (modality 0 into 1's space and 1 into 0's); ``duplex=False`` only
modality 0 into modality 1's space, which is what the released code runs (its text-side line is
commented out; there modality 0 = visual, 1 = text).

**Modular masked attention** (then the correction). Softmax attention over all tokens with an
additive (H, 2, 2) bias per (query modality, key modality) block, learnt and zero at init (the
adaptive mask), and a fixed boolean 2 x 2 pattern of which blocks may attend at all: ``"full"``
(joint), ``"self"`` (within a modality only), ``"cross"`` (across only) or any 2 x 2 nested
bools. The released code has neither (it runs the plain causal mask); both are written from the
paper's description, and ``mask="full", adaptive=False`` switches them off.

What differs from plain multi-head attention over the concatenated modalities: only the keys
(aligned into the other modality's space) and the block bias / pattern; queries, values, softmax
and output projection are the usual ones. With ``align=False, adaptive=False, mask="full"`` the
layer is plain bidirectional MHA (tested).

    >>> layer = ModularDuplexAttention(64, 4)
    >>> x, modality = torch.randn(2, 10, 64), torch.tensor([[0] * 6 + [1] * 4] * 2)
    >>> layer(x, modality).shape
    torch.Size([2, 10, 64])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cards import Capabilities, Card, FlopCount, dense_attention_flops

__all__ = ["ModularDuplexAttention", "duplex_align", "moda_reference", "MASKS", "CARDS"]

MASKS = {
    "full": ((True, True), (True, True)),
    "self": ((True, False), (False, True)),
    "cross": ((False, True), (True, False)),
}
BACKENDS = ("sdpa", "reference")
_EPS = 1e-6  # added to the keys before their normalisation, as in the official code


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _blocks(mask) -> Tensor:
    if isinstance(mask, str):
        if mask not in MASKS:
            raise ValueError(f"mask must be one of {', '.join(MASKS)} or a 2 x 2 nested bools, got {mask!r}")
        mask = MASKS[mask]
    try:
        blocks = torch.tensor(mask)
    except (TypeError, ValueError, RuntimeError):
        blocks = None
    if blocks is None or blocks.dtype != torch.bool or tuple(blocks.shape) != (2, 2):
        raise ValueError(f"mask must be one of {', '.join(MASKS)} or a 2 x 2 nested bools "
                         f"(query modality, key modality), got {mask!r}")
    if not bool(blocks.any(dim=1).all()):
        raise ValueError(f"mask {mask!r} leaves a modality's queries with no key to attend to")
    return blocks


def duplex_align(k: Tensor, v: Tensor, modality: Tensor, ratio: Tensor, fuser: Tensor, *, duplex: bool = True) -> Tensor:
    """The aligned, fused keys. k, v (B, H, T, D); modality (B, T) in {0, 1}; ratio (2, D) and fuser
    (2, D, D) per source modality (the fuser applied as ``x @ fuser.T``, an ``nn.Linear`` weight).
    Batched: each Gram sums over one modality's tokens through a 0/1 weight (B, 1, T, 1)."""
    unit = F.normalize(k + _EPS, dim=-1)  # (B, H, T, D)
    out = k
    for source in ((0, 1) if duplex else (0,)):
        target = 1 - source
        weight = (modality == target).to(k.dtype)[:, None, :, None]  # (B, 1, T, 1)
        gram = torch.einsum("bhtd,bhte->bhde", unit * weight, v)  # (B, H, D, D)
        # a row of zeros (no token of the target modality) stays zero rather than 0 / 0
        gram = gram / gram.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        fused = (k + ratio[source] * (unit @ gram)) @ fuser[source].T  # (B, H, T, D)
        out = torch.where((modality == source)[:, None, :, None], fused, out)
    return out


class ModularDuplexAttention(nn.Module):
    """MODA attention: x (B, T, C), modality (B, T) in {0, 1} -> (B, T, C). Bidirectional.

    ``align``: duplex alignment of the keys on (``duplex`` both ways or modality 0 only);
    ``mask``: the 2 x 2 block pattern (``"full"``, ``"self"``, ``"cross"`` or nested bools);
    ``adaptive``: a learnt (H, 2, 2) logit bias per block; ``backend="reference"`` runs
    :func:`moda_reference` (float64, written out per sample and token).
    """

    def __init__(self, dim: int, num_heads: int, *, head_dim: int | None = None, align: bool = True,
                 duplex: bool = True, mask="full", adaptive: bool = True, backend: str = "sdpa"):
        super().__init__()
        self.dim, self.num_heads = _positive_int("dim", dim), _positive_int("num_heads", num_heads)
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}), or pass head_dim")
            head_dim = dim // num_heads
        self.head_dim = _positive_int("head_dim", head_dim)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        for name, value in (("align", align), ("duplex", duplex), ("adaptive", adaptive)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        self.align, self.duplex, self.adaptive, self.backend = align, duplex, adaptive, backend
        self.register_buffer("blocks", _blocks(mask), persistent=False)
        inner = num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.out = nn.Linear(inner, dim, bias=False)
        if align:
            # zero ratio and identity fuser: at initialisation the layer is plain attention
            self.ratio = nn.Parameter(torch.zeros(2, self.head_dim))
            self.fuser = nn.Parameter(torch.eye(self.head_dim).repeat(2, 1, 1))
        if adaptive:
            self.block_bias = nn.Parameter(torch.zeros(num_heads, 2, 2))

    def _check(self, x: Tensor, modality: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be (B, T, C) with C = dim = {self.dim}, got {shape}")
        if not isinstance(modality, Tensor) or tuple(modality.shape) != tuple(x.shape[:2]):
            shape = tuple(modality.shape) if isinstance(modality, Tensor) else type(modality).__name__
            raise ValueError(f"modality must be a tensor (B, T) = {tuple(x.shape[:2])} of 0/1 per token, got {shape}")
        if modality.is_floating_point() or modality.is_complex() or not bool(((modality == 0) | (modality == 1)).all()):
            raise ValueError("modality must hold integers (or bools) 0 and 1 only, got "
                             f"{modality.dtype} with values {sorted(set(modality.flatten().tolist()))[:6]}")
        # a query whose allowed blocks hold no token of this sample would attend to nothing
        present = torch.stack([(modality == m).any(dim=1) for m in (0, 1)], dim=1)  # (B, 2)
        reachable = (self.blocks[modality.long()] & present[:, None, :]).any(-1)  # (B, T)
        if not bool(reachable.all()):
            b = int((~reachable).any(dim=1).nonzero()[0])
            raise ValueError(f"mask {self.blocks.tolist()} leaves queries of sample {b} with no key: it has tokens "
                             f"of modality {sorted(set(modality[b].tolist()))} only")

    def attention_bias(self, modality: Tensor, dtype) -> Tensor | None:
        """The additive (B, H, T, T) mask: block bias, -inf where the pattern forbids; None when
        neither applies (plain joint attention, SDPA's unmasked path)."""
        full = bool(self.blocks.all())
        if full and not self.adaptive:
            return None
        onehot = F.one_hot(modality.long(), 2).to(dtype)  # (B, T, 2)
        # per-block values spread to token pairs by two one-hot products: a matmul, faster than a gather
        if self.adaptive:
            bias = torch.einsum("bta,hac,bsc->bhts", onehot, self.block_bias.to(dtype), onehot)  # (B, H, T, T)
        else:
            bias = torch.zeros(1, 1, 1, 1, dtype=dtype, device=modality.device)
        if full:
            return bias
        allowed = torch.einsum("bta,ac,bsc->bts", onehot, self.blocks.to(dtype), onehot)[:, None] > 0.5  # (B, 1, T, T)
        return bias.masked_fill(~allowed, float("-inf"))

    def forward(self, x: Tensor, modality: Tensor) -> Tensor:
        self._check(x, modality)
        if self.backend == "reference":
            return moda_reference(self, x, modality)
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)  # (B, H, T, D)
        if self.align:
            k = duplex_align(k, v, modality, self.ratio, self.fuser, duplex=self.duplex)
        mask = self.attention_bias(modality, q.dtype)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(o.transpose(1, 2).flatten(2))


def moda_reference(layer: ModularDuplexAttention, x: Tensor, modality: Tensor) -> Tensor:
    """The layer's math written out in float64, one sample, head and token at a time (boolean
    indexing per modality, as the official code selects its visual and text keys); returns x's dtype."""
    H, D = layer.num_heads, layer.head_dim
    w_qkv, w_out = layer.qkv.weight.double(), layer.out.weight.double()
    outputs = []
    for b in range(x.shape[0]):
        xb, mb = x[b].double(), modality[b].long()
        q, k, v = (xb @ w_qkv.T).view(-1, 3, H, D).unbind(1)  # each (T, H, D)
        heads = []
        for h in range(H):
            qh, kh, vh = q[:, h], k[:, h].clone(), v[:, h]
            if layer.align:
                keys = kh.clone()
                for source in ((0, 1) if layer.duplex else (0,)):
                    src, tgt = mb == source, mb == 1 - source
                    unit_t = (kh[tgt] + _EPS) / (kh[tgt] + _EPS).norm(dim=-1, keepdim=True)
                    gram = unit_t.T @ vh[tgt]  # (D, D)
                    norms = gram.norm(dim=-1, keepdim=True)
                    gram = torch.where(norms > 0, gram / norms.clamp_min(1e-300), gram)
                    unit_s = (kh[src] + _EPS) / (kh[src] + _EPS).norm(dim=-1, keepdim=True)
                    fused = kh[src] + layer.ratio[source].double() * (unit_s @ gram)
                    keys[src] = fused @ layer.fuser[source].double().T
                kh = keys
            rows = []
            for i in range(xb.shape[0]):
                scores = []
                for j in range(xb.shape[0]):
                    a, c = int(mb[i]), int(mb[j])
                    if not bool(layer.blocks[a, c]):
                        scores.append(torch.tensor(float("-inf"), dtype=torch.float64, device=x.device))
                        continue
                    s = qh[i] @ kh[j] / math.sqrt(D)
                    scores.append(s + layer.block_bias[h, a, c].double() if layer.adaptive else s)
                weights = torch.softmax(torch.stack(scores), dim=0)
                rows.append(weights @ vh)
            heads.append(torch.stack(rows))  # (T, D)
        outputs.append(torch.cat(heads, dim=-1) @ w_out.T)  # (T, C)
    return torch.stack(outputs).to(x.dtype)


def moda_flops(batch: int, seq: int, config: dict) -> FlopCount:
    """Dense bidirectional attention plus the alignment: per head and direction a D x D Gram over
    the tokens and one (T, D) x (D, D) map and fuser."""
    dim, heads = config["dim"], config["num_heads"]
    head_dim = config.get("head_dim") or dim // heads
    attention = dense_attention_flops(batch, seq, num_heads=heads, head_dim=head_dim, pattern="full")
    if config.get("align", True):
        directions = 2 if config.get("duplex", True) else 1
        attention += directions * batch * heads * 3 * 2.0 * seq * head_dim * head_dim
    projection = 2.0 * batch * seq * dim * 4 * heads * head_dim
    return FlopCount(attention_fwd=attention, projection_fwd=projection)


_CAPS = Capabilities(causal=False, bidirectional=True, decode=False, varlen=False, backends=("reference", "sdpa"))

#: fusion blocks over tokens of two modalities, called (x, modality); kind "multimodal", not in the
#: layer registry (the layer needs per-token modality ids)
CARDS = (
    Card(name="moda", title="MODA: MOdular Duplex Attention for Multimodal Perception, Cognition, and Emotion "
         "Understanding", arxiv="2507.04635", family="multimodal", layer=ModularDuplexAttention, flops=moda_flops,
         defaults={"align": True, "duplex": True, "mask": "full", "adaptive": True}, capabilities=_CAPS,
         kind="multimodal", summary="keys aligned into the other modality's space by its key-value Gram (duplex), "
         "adaptive per-block mask"),
    Card(name="joint-attention", title="joint attention over concatenated modalities (baseline)", arxiv=None,
         family="multimodal", layer=ModularDuplexAttention, flops=moda_flops,
         defaults={"align": False, "mask": "full", "adaptive": False}, capabilities=_CAPS, kind="multimodal",
         summary="plain bidirectional MHA over both modalities' tokens"),
)
