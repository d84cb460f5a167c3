"""S2-Attention under sequence parallelism: each rank sends only the key / value blocks that another
rank's queries can see.

S2-Attention (Lin et al., arXiv 2407.17678: "hardware-aware context sharding among attention heads";
:class:`attnkit.patterns.S2Strided`) lets query block ``i`` of a KV-head group ``g`` see key block
``j <= i`` only when ``i - j < local_blocks`` (the local window) or ``(j + g * step + offset) %
vert_stride == 0`` (the group's vertical stripes). A query on a later rank can therefore only see,
of this rank's shard (contiguous layout), the blocks on its group's stripes and the last
``local_blocks - 1`` blocks before the shard's end (the window of the next shard's first queries),
and for a group holding a dense head everything. :func:`s2_attend` sends just those: per KV head,
about ``1 / vert_stride`` of the shard plus the window's tail, instead of the whole shard that
:func:`ring_attend` passes around.

How: every rank gathers each KV head's needed tokens of its shard into a compact ``[B, Hkv, L, D]``
(``L`` the largest count over the ranks and heads, the rest padded; every rank computes every
rank's selection from the shapes alone, so no positions travel), one all-gather of the compact
keys and values (autograd's: the backward brings the gradients home), and one attention call of
this rank's queries over its own shard and the earlier ranks' compact blocks under the S2 mask at
global positions. An all-gather also hands each rank the later ranks' blocks, which the causal rule
does not use: the bytes per rank are ``(W - 1) x`` the compact shard (:func:`s2_bytes`), against
``(W - 1) x`` the whole shard for the ring.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import patterns as _patterns
from .ring import _SENT, _check_inputs, _group_info

__all__ = ["s2_attend", "s2_bytes"]


def _needed(pattern, start: int, length: int, total: int, heads_kv: int) -> Tensor:
    """``[Hkv, length]`` bool: which of the tokens at global positions ``start .. start + length - 1``
    a query after ``start + length`` can see, per KV head (nothing when the shard is the last)."""
    end = start + length
    if end >= total:
        return torch.zeros(heads_kv, length, dtype=torch.bool)
    blocks = torch.arange(start, end) // pattern.block_size
    g = torch.arange(heads_kv)[:, None]
    stripe = (blocks[None] + g * pattern.step + pattern.offset) % pattern.vert_stride == 0
    tail = blocks[None] > end // pattern.block_size - pattern.local_blocks  # the next queries' window
    group = pattern.num_heads // pattern.num_kv_heads
    dense = torch.zeros(heads_kv, 1, dtype=torch.bool)
    for h in pattern.dense_heads:
        dense[h // group] = True
    return stripe | tail | dense


def _compact_len(pattern, local: int, world: int) -> int:
    total = local * world
    return max(int(_needed(pattern, r * local, local, total, pattern.num_kv_heads).sum(1).max()) for r in range(world))


def _selection(pattern, rank: int, local: int, world: int, length: int) -> tuple[Tensor, Tensor]:
    """``(index [Hkv, L], positions [Hkv, L])`` of rank ``rank``'s compact blocks: local token
    indices (0 for padding) and global positions (-1 for padding)."""
    need = _needed(pattern, rank * local, local, local * world, pattern.num_kv_heads)
    index = torch.zeros(need.shape[0], length, dtype=torch.long)
    positions = torch.full((need.shape[0], length), -1, dtype=torch.long)
    for g in range(need.shape[0]):
        picked = need[g].nonzero().flatten()
        index[g, : picked.numel()] = picked
        positions[g, : picked.numel()] = picked + rank * local
    return index, positions


def _check_pattern(pattern, q: Tensor, k: Tensor) -> None:
    if not isinstance(pattern, _patterns.S2Strided):
        raise ValueError(f"s2_attend: pattern must be an attnkit.patterns.S2Strided (s2_strided(...)), got "
                         f"{type(pattern).__name__}; other patterns: ring_attend or ulysses_attend")
    if pattern.num_heads != q.shape[1] or pattern.num_kv_heads != k.shape[1]:
        raise ValueError(f"s2_attend: the pattern was built for {pattern.num_heads} query / {pattern.num_kv_heads} "
                         f"key-value heads, the tensors have {q.shape[1]} / {k.shape[1]}")


def s2_bytes(k: Tensor, v: Tensor, pattern, world: int) -> int:
    """Bytes one rank sends in :func:`s2_attend` (a ring all-gather: ``W - 1`` compact shards per
    rank), for this rank's key / value shards ``[B, Hkv, T, D]``."""
    length = _compact_len(pattern, k.shape[2], world)
    per_token = k.shape[0] * k.shape[1] * (k.shape[3] * k.element_size() + v.shape[3] * v.element_size())
    return (world - 1) * length * per_token


def s2_attend(q: Tensor, k: Tensor, v: Tensor, pattern, *, group=None, scale: float | None = None,
              backend: str = "auto") -> Tensor:
    """S2-Attention of a sequence split contiguously over the ranks of ``group``.

    Args:
        q: ``[B, Hq, T, D]``, k / v: ``[B, Hkv, T, D]`` / ``[B, Hkv, T, Dv]``: this rank's shard
            (:func:`shard`, contiguous).
        pattern: the :class:`~attnkit.patterns.S2Strided` of the whole sequence (``num_heads`` and
            ``num_kv_heads`` as the tensors').
        scale, backend: as :func:`attnkit.attend`.

    Returns:
        ``[B, Hq, T, Dv]``: this rank's share of ``attnkit.attend(q_all, k_all, v_all, pattern=pattern)``.
    """
    from torch.distributed.nn.functional import all_gather

    from ..ops.softmax import attend

    world, rank = _group_info(group)
    _check_inputs(q, k, v, group, "s2_attend")
    _check_pattern(pattern, q, k)
    B, Hkv, T, _ = k.shape
    length = _compact_len(pattern, T, world)
    index, _ = _selection(pattern, rank, T, world, length)
    index = index.to(k.device)[None, :, :, None]  # [1, Hkv, L, 1]
    compact_k = k.gather(2, index.expand(B, Hkv, length, k.shape[3]))
    compact_v = v.gather(2, index.expand(B, Hkv, length, v.shape[3]))
    gathered_k = all_gather(compact_k.contiguous(), group=group)
    gathered_v = all_gather(compact_v.contiguous(), group=group)
    _SENT[0] += (world - 1) * (compact_k.numel() * compact_k.element_size() + compact_v.numel() * compact_v.element_size())

    keys = [k] + [gathered_k[r] for r in range(rank)]
    values = [v] + [gathered_v[r] for r in range(rank)]
    own = torch.arange(rank * T, (rank + 1) * T).expand(Hkv, T)
    key_pos = torch.cat([own] + [_selection(pattern, r, T, world, length)[1] for r in range(rank)], dim=1)  # [Hkv, S]
    group_size = pattern.num_heads // pattern.num_kv_heads
    key_pos = key_pos.repeat_interleave(group_size, dim=0).to(q.device)[:, None, :]  # [Hq, 1, S]
    q_pos = torch.arange(rank * T, (rank + 1) * T, device=q.device)[None, :, None]  # [1, T, 1]
    heads = torch.arange(pattern.num_heads, device=q.device)[:, None, None]
    mask = pattern.allowed(0, heads, q_pos, key_pos) & (key_pos >= 0)  # [Hq, T, S]; padding never counts
    out = attend(q, torch.cat(keys, dim=2), torch.cat(values, dim=2), pattern=_patterns.DenseMask(mask[None]),
                 scale=scale, backend=backend)
    # every rank must reach the all-gathers' backward (a collective), also those that use none of the
    # gathered blocks (rank 0) or not all of them: a zero-weighted dependency on every gathered tensor
    anchor = sum(t.sum() for t in (*gathered_k, *gathered_v)) * 0.0
    return out + anchor.to(out.dtype)
