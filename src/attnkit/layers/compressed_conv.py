"""CCA / CCGQA: Compressed Convolutional Attention (attention inside a compressed latent).

Compressed Convolutional Attention: Efficient Attention in a Compressed Latent Space
(Figliolia et al., Zyphra; arXiv 2510.04476). Reference code: the ZAYA model
(``ZayaCCAProjection`` in transformers). Queries and keys live in a latent of
``H / compression`` heads (head dim ``D = C / H`` unchanged), keys and values in
``num_kv_heads`` heads (CCA: as many as the query heads; CCGQA: fewer)::

    q, k      = x W_q, x W_k                                     (B, T, Hc*D), (B, T, Hkv*D)
    q_mean    = (q + k_g) / 2 per query head (k_g: its key head);  k_mean = mean of q_mean over the group
    [q~, k~]  = GroupedConv_2( DepthwiseConv_2( [q, k] ) )       causal, over time; groups = Hc + Hkv heads
    q, k      = q~ + q_mean, k~ + k_mean
    v         = [ x_t W_v1 , x_{t-1} W_v2 ]                        value shift: half from the previous token
    q, k      = sqrt(D) q / |q|,  sqrt(D) k / |k| * temp_g         per-KV-head learned key temperature
    y         = W_o attention(RoPE(q), RoPE(k), v)                 GQA in the latent, causal

What differs from multi-head attention: everything before the attention core (the core is
:func:`attnkit.attend`, unchanged). The KV cache holds ``Hkv * D`` channels per token
(against ``H * D`` for MHA); the decode state also keeps the last two pre-convolution q/k
rows and the previous token's ``x W_v2``. ``temp`` starts at 1 (ZAYA's code initialises it to
0 because it is always loaded from a checkpoint; 0 would start every layer uniform).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import head_dim_of, positive_int
from ..cards import Capabilities, Card, FlopCount, dense_attention_flops
from ..ops import BACKENDS, attend
from ..rope import RotaryEmbedding
from ..state import KVCache
from .base import AttentionLayer, check_input
from .multi_head import rotate_and_cache

__all__ = ["CompressedConvAttention"]

KERNEL = 2  # both convolutions (the paper's and ZAYA's setting)


class _CCACache(KVCache):
    """KV cache plus the convolution tail (last ``2 * (KERNEL - 1)`` pre-conv q/k rows) and
    the previous token's ``x W_v2``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tail: Tensor | None = None  # (B, channels, 2)
        self.prev_v2: Tensor | None = None  # (B, Hkv*D/2)

    def nbytes(self) -> int:
        extra = sum(t.numel() * t.element_size() for t in (self.tail, self.prev_v2) if t is not None)
        return super().nbytes() + extra


class CompressedConvAttention(AttentionLayer):
    """CCA (``num_kv_heads`` = latent heads) or CCGQA (fewer KV heads).

    Args:
        dim: width C. num_heads: H, the head count the layer replaces (head dim ``C / H``).
        compression: query compression; the latent has ``H / compression`` query heads (default 4).
        num_kv_heads: KV heads in the latent (default ``H / compression``: CCA; fewer: CCGQA).
        rope, rope_base: rotary embeddings on the latent q, k.
        bias: biases in the projections. backend: :func:`attnkit.attend` backend, or ``reference``.

    Shapes: ``x [B, T, C] -> [B, T, C]``; KV cache bytes per token ``2 * Hkv * D * elem``.

    Example::

        >>> import torch
        >>> from attnkit.layers import CompressedConvAttention
        >>> layer = CompressedConvAttention(256, 8, compression=4)            # CCA: 2 latent heads
        >>> layer(torch.randn(2, 10, 256)).shape
        torch.Size([2, 10, 256])
    """

    def __init__(self, dim: int, num_heads: int, *, compression: int = 4, num_kv_heads: int | None = None,
                 head_dim: int | None = None, rope: bool = True, rope_base: float = 10000.0, bias: bool = False,
                 backend: str = "auto"):
        super().__init__()
        positive_int(dim, "dim")
        positive_int(num_heads, "num_heads")
        positive_int(compression, "compression")
        if num_heads % compression:
            raise ValueError(f"compression={compression} must divide num_heads={num_heads} (the latent has "
                             f"num_heads / compression query heads)")
        latent_heads = num_heads // compression
        kv_heads = latent_heads if num_kv_heads is None else positive_int(num_kv_heads, "num_kv_heads")
        if latent_heads % kv_heads:
            raise ValueError(f"num_kv_heads={kv_heads} must divide the latent query heads ({latent_heads})")
        D = head_dim_of(dim, num_heads, head_dim)
        if (kv_heads * D) % 2:
            raise ValueError("the value shift splits the KV channels in two halves: num_kv_heads * head_dim must be even")
        if rope and D % 2:
            raise ValueError(f"rope=True needs an even head_dim, got {D}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.dim, self.num_heads, self.compression = dim, num_heads, compression
        self.latent_heads, self.num_kv_heads, self.head_dim, self.backend = latent_heads, kv_heads, D, backend
        q_ch, kv_ch = latent_heads * D, kv_heads * D
        self.q_proj = nn.Linear(dim, q_ch, bias=bias)
        self.k_proj = nn.Linear(dim, kv_ch, bias=bias)
        self.v_proj_current = nn.Linear(dim, kv_ch // 2, bias=bias)
        self.v_proj_previous = nn.Linear(dim, kv_ch // 2, bias=bias)
        channels = q_ch + kv_ch
        self.conv_depthwise = nn.Conv1d(channels, channels, KERNEL, groups=channels)
        self.conv_grouped = nn.Conv1d(channels, channels, KERNEL, groups=latent_heads + kv_heads)
        self.temp = nn.Parameter(torch.ones(kv_heads))
        self.rope = RotaryEmbedding(D, rope_base) if rope else None
        self.o_proj = nn.Linear(q_ch, dim, bias=bias)

    def init_state(self, batch_size: int, *, max_len=None, device=None, dtype=None) -> _CCACache:
        param = self.o_proj.weight
        return _CCACache(batch_size, self.num_kv_heads, self.head_dim, max_len=max_len, device=device or param.device,
                         dtype=dtype or param.dtype)

    def latent_qkv(self, x: Tensor, state: _CCACache | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The latent q ``[B, Hc, T, D]``, k, v ``[B, Hkv, T, D]`` before RoPE."""
        B, T, _ = x.shape
        Hc, Hkv, D = self.latent_heads, self.num_kv_heads, self.head_dim
        group = Hc // Hkv
        q, k = self.q_proj(x), self.k_proj(x)
        # qk-mean residuals, from the pre-convolution projections
        q_mean = (q.view(B, T, Hkv, group, D) + k.view(B, T, Hkv, 1, D)) / 2  # (B, T, Hkv, group, D)
        k_mean = q_mean.mean(dim=3)  # (B, T, Hkv, D)
        qk = torch.cat([q, k], dim=-1).transpose(1, 2)  # (B, channels, T)
        pad = 2 * (KERNEL - 1)
        if state is None or state.tail is None:
            conv_in = F.pad(qk, (pad, 0))
        else:
            conv_in = torch.cat([state.tail.to(qk.dtype), qk], dim=-1)
        if state is not None:
            state.tail = conv_in[..., -pad:]
        conv = self.conv_grouped(self.conv_depthwise(conv_in)).transpose(1, 2)  # (B, T, channels)
        q = conv[..., : Hc * D].view(B, T, Hc, D) + q_mean.reshape(B, T, Hc, D)
        k = conv[..., Hc * D :].view(B, T, Hkv, D) + k_mean
        # value shift: half of the channels come from the previous token
        v_now, v_prev = self.v_proj_current(x), self.v_proj_previous(x)
        if state is not None and state.prev_v2 is not None:
            first = state.prev_v2.to(v_prev.dtype)[:, None]
        else:
            first = self.v_proj_previous(x.new_zeros(B, 1, self.dim))
        if state is not None:
            state.prev_v2 = v_prev[:, -1]
        v = torch.cat([v_now, torch.cat([first, v_prev[:, :-1]], dim=1)], dim=-1).view(B, T, Hkv, D)
        eps = torch.finfo(q.dtype).eps
        q = q * (D**0.5 / q.norm(dim=-1, keepdim=True).clamp_min(eps))
        k = k * (D**0.5 / k.norm(dim=-1, keepdim=True).clamp_min(eps)) * self.temp[:, None]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: Tensor, state: _CCACache | None = None, *, document_ids: Tensor | None = None) -> Tensor:
        check_input(x, self.dim, self, state)
        if document_ids is not None:
            raise ValueError("CompressedConvAttention does not take document_ids (its convolutions and value shift "
                             "would cross documents)")
        B, T, _ = x.shape
        q, k, v = self.latent_qkv(x, state)
        offset = 0 if state is None else state.offset
        q, k, v, pattern, q_offset = rotate_and_cache(self.rope, q, k, v, "causal", state, offset)
        out = attend(q, k, v, pattern=pattern, q_offset=q_offset, backend=self.backend)  # (B, Hc, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.latent_heads * self.head_dim))


def cca_flops(batch: int, seq: int, config: dict) -> FlopCount:
    """Core: softmax attention with ``H / compression`` heads; projections to and from the latent
    and the two convolutions (kernel 2)."""
    dim, heads = config["dim"], config["num_heads"]
    D = config.get("head_dim") or dim // heads
    c = config.get("compression", 4)
    Hc = heads // c
    Hkv = config.get("num_kv_heads") or Hc
    core = dense_attention_flops(batch, seq, num_heads=Hc, head_dim=D, pattern="causal")
    ch = (Hc + Hkv) * D
    projection = batch * seq * (2.0 * dim * (Hc * D + 2 * Hkv * D) + 2.0 * Hc * D * dim
                                + 2.0 * KERNEL * ch + 2.0 * KERNEL * ch * D)
    return FlopCount(attention_fwd=core, projection_fwd=projection)


CARDS = (
    Card(
        name="cca",
        title="Compressed Convolutional Attention: Efficient Attention in a Compressed Latent Space",
        arxiv="2510.04476",
        family="sharing",
        layer=CompressedConvAttention,
        flops=cca_flops,
        defaults={"compression": 4},
        capabilities=Capabilities(bidirectional=False, varlen=False),
        summary="attention in a compressed latent: causal convs on q/k, qk-mean, value shift, L2-normed q/k",
    ),
    Card(
        name="ccgqa",
        title="Compressed Convolutional Attention: Efficient Attention in a Compressed Latent Space",
        arxiv="2510.04476",
        family="sharing",
        layer=CompressedConvAttention,
        flops=cca_flops,
        defaults={"compression": 2, "num_kv_heads": lambda dim, heads: max(1, heads // 8)},
        capabilities=Capabilities(bidirectional=False, varlen=False),
        summary="CCA with grouped K/V in the latent (query compression 2, KV heads H/8)",
    ),
)
