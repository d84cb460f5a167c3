"""RCMHA: Relative Convolutional Multi-Head Attention.

RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling (Sugiarto,
Suhartono, Gunawan; arXiv 2308.03429).

Two changes to multi-head attention: a depthwise convolution over time on the query, key
and value projections (as in Primer's multi-dconv-head attention), and Transformer-XL's
relative-position scores in place of absolute positions::

    q, k, v = DWConv_causal(x W_q), DWConv_causal(x W_k), DWConv_causal(x W_v)     (kernel K per channel)
    score_ij = [ (q_i + u_h) . k_j  +  (q_i + w_h) . r_{i-j} ] / sqrt(D)
    r_m      = W_r sinusoid(m)                          (m = i - j >= 0: a causal layer)
    o_i      = sum_j softmax_j(score_ij) v_j

The content term is plain attention with queries ``q + u``; the position term is an
additive score bias ``(q_i + w_h) . r_{i-j}`` computed for all (i, distance) pairs with one
matmul and gathered per key, passed to ``attnkit.attend`` as a ``score_mod``. The
convolutions are causal (left padding), so decoding keeps the last ``K - 1`` projected
tokens beside the KV cache. No RoPE.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._checks import positive_int
from ..cards import Capabilities, Card, FlopCount
from ..ops import attend
from ..state import KVCache
from .multi_head import MultiHeadAttention, head_shape, multi_head_flops

__all__ = ["RelativeConvAttention", "sinusoid"]


def sinusoid(distances: Tensor, dim: int) -> Tensor:
    """Transformer-XL's sinusoidal embedding of distances ``[M]`` -> ``[M, dim]``."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64, device=distances.device) / dim))
    angles = distances.to(torch.float64)[:, None] * inv_freq[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class _ConvKVCache(KVCache):
    """KV cache plus the last ``K - 1`` pre-convolution q, k, v projections."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tail: Tensor | None = None  # (B, K-1, channels)

    def nbytes(self) -> int:
        tail = 0 if self.tail is None else self.tail.numel() * self.tail.element_size()
        return super().nbytes() + tail


class RelativeConvAttention(MultiHeadAttention):
    """Multi-head attention with depthwise-convolved q/k/v and Transformer-XL relative scores.

    Args:
        dim, num_heads, num_kv_heads, head_dim, qk_norm, bias, dropout, backend: as
            :class:`~attnkit.layers.MultiHeadAttention` (``rope`` is off: positions are relative).
        kernel_size: depthwise convolution width over time (default 3).

    Shapes: ``x [B, T, C] -> [B, T, C]``.

    Example::

        >>> import torch
        >>> from attnkit.layers import RelativeConvAttention
        >>> layer = RelativeConvAttention(256, 8)
        >>> layer(torch.randn(2, 10, 256)).shape
        torch.Size([2, 10, 256])
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, *, kernel_size: int = 3, **options):
        if options.pop("rope", False):
            raise ValueError("RelativeConvAttention uses relative position scores; rope=True is not accepted")
        if "pattern" in options and options["pattern"] != "causal":
            raise ValueError("RelativeConvAttention is causal (its relative distances are i - j >= 0)")
        super().__init__(dim, num_heads, num_kv_heads, rope=False, **options)
        self.kernel_size = positive_int(kernel_size, "kernel_size")
        channels = (num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False)
        with torch.no_grad():  # start as the identity: the newest tap 1, the others 0
            self.conv.weight.zero_()
            self.conv.weight[:, 0, -1] = 1.0
        self.pos_proj = nn.Linear(dim, num_heads * self.head_dim, bias=False)  # W_r
        self.content_bias = nn.Parameter(torch.zeros(num_heads, self.head_dim))  # u
        self.position_bias = nn.Parameter(torch.zeros(num_heads, self.head_dim))  # w

    def init_state(self, batch_size: int, *, max_len=None, device=None, dtype=None) -> _ConvKVCache:
        param = self.qkv_proj.weight
        return _ConvKVCache(batch_size, self.num_kv_heads, self.head_dim, max_len=max_len,
                            device=device or param.device, dtype=dtype or param.dtype)

    def project(self, x: Tensor, state=None):
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)  # (B, T, channels)
        past = None if state is None else state.tail
        if past is None:
            past = qkv.new_zeros(B, self.kernel_size - 1, qkv.shape[-1])
        padded = torch.cat([past, qkv], dim=1)  # (B, K-1+T, channels)
        if state is not None:
            state.tail = padded[:, padded.shape[1] - (self.kernel_size - 1) :].detach()
        qkv = self.conv(padded.transpose(1, 2)).transpose(1, 2)  # (B, T, channels), causal
        q, k, v = qkv.split((H * D, Hkv * D, Hkv * D), dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)
        k = k.view(B, T, Hkv, D).transpose(1, 2)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, x: Tensor, state=None, *, document_ids: Tensor | None = None) -> Tensor:
        if document_ids is not None:
            raise ValueError("RelativeConvAttention does not take document_ids (its convolution would cross documents)")
        return super().forward(x, state)

    def relative_bias(self, q: Tensor, q_offset: int, kv_len: int) -> Tensor:
        """``(q_i + w) . r_{i-j} / sqrt(D)`` for every query row and key: ``[B, H, T, S]`` (0 where j > i)."""
        B, H, T, D = q.shape
        distances = torch.arange(q_offset + T, device=q.device)  # every distance a row can need
        r = self.pos_proj(sinusoid(distances, self.dim).to(q.dtype)).view(-1, H, D)  # (M, H, D)
        by_distance = torch.einsum("bhtd,mhd->bhtm", q + self.position_bias[None, :, None], r)  # (B, H, T, M)
        rows = torch.arange(T, device=q.device)[:, None] + q_offset
        dist = (rows - torch.arange(kv_len, device=q.device)[None]).clamp(min=0)  # (T, S)
        return by_distance.gather(-1, dist.expand(B, H, T, kv_len)) / math.sqrt(D)

    def core(self, q, k, v, pattern, q_offset):
        T, S = q.shape[2], k.shape[2]
        q_offset = S - T if q_offset is None else q_offset
        q_content = q + self.content_bias[None, :, None].to(q.dtype)
        outs = []
        for start, stop in bias_row_chunks(q.shape[0] * q.shape[1], T, q_offset, S):
            # causal: rows start..stop-1 see keys 0 .. q_offset+stop-1 only
            keys = min(S, q_offset + stop)
            row_offset = q_offset + start
            bias = self.relative_bias(q[:, :, start:stop], row_offset, keys)

            def add_position(score, b, h, q_pos, k_pos, bias=bias, row_offset=row_offset):
                return score + bias[b, h, q_pos - row_offset, k_pos]

            outs.append(attend(q_content[:, :, start:stop], k[:, :, :keys], v[:, :, :keys], pattern=pattern,
                               score_mod=add_position, backend=self.backend, q_offset=row_offset))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


#: Elements of one relative-bias tensor ``[B, H, rows, keys]``. FlexAttention indexes a captured
#: tensor with 32-bit arithmetic: a bias of 2**31 elements or more (B=4, H=16 at 8k) read out of
#: bounds on the H200 ("an illegal memory access"). Rows are processed in chunks below this size,
#: which also bounds the memory the bias takes.
MAX_BIAS_ELEMENTS = 2**30


def bias_row_chunks(batch_heads: int, q_len: int, q_offset: int, kv_len: int,
                    max_elements: int | None = None) -> list[tuple[int, int]]:
    """Query-row ranges ``[start, stop)`` covering ``0 .. q_len-1`` such that each chunk's causal
    bias ``[B*H, stop-start, min(kv_len, q_offset+stop)]`` holds at most ``max_elements``
    (default :data:`MAX_BIAS_ELEMENTS`; at least one row per chunk)."""
    limit = MAX_BIAS_ELEMENTS if max_elements is None else max_elements

    def size(start: int, stop: int) -> int:
        return batch_heads * (stop - start) * min(kv_len, q_offset + stop)

    chunks, start = [], 0
    while start < q_len:
        low, high = start + 1, q_len  # the largest stop whose chunk fits (at least one row)
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if size(start, mid) <= limit else (low, mid - 1)
        chunks.append((start, low))
        start = low
    return chunks


def rcmha_flops(batch, seq, config) -> FlopCount:
    base = multi_head_flops(batch, seq, config)
    dim, heads, kv, head_dim = head_shape(config)
    conv = 2.0 * batch * seq * (heads + 2 * kv) * head_dim * config.get("kernel_size", 3)
    position = 2.0 * batch * heads * seq * seq * head_dim + 2.0 * seq * dim * heads * head_dim
    return FlopCount(attention_fwd=base.attention_fwd + position, projection_fwd=base.projection_fwd + conv)


CARDS = (
    Card(
        name="rcmha",
        title="RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling",
        arxiv="2308.03429",
        family="score",
        layer=RelativeConvAttention,
        flops=rcmha_flops,
        capabilities=Capabilities(bidirectional=False, varlen=False, backends=("reference", "flex")),
        summary="depthwise causal conv on q/k/v + Transformer-XL relative position scores (no RoPE)",
    ),
)
