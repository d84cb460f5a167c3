"""Attention patterns: which (query, key) pairs are computed.

A pattern is one object with three faces, so that every backend sees the same rule:

- ``allowed(b, h, q_pos, k_pos)``: the rule itself, written with element-wise tensor
  operations so that it works both on broadcast index grids (dense masks) and inside
  FlexAttention's ``mask_mod`` (scalar tensors under ``vmap``);
- ``mask_mod(q_offset)``: a FlexAttention ``mask_mod`` for a query block that starts at
  absolute position ``q_offset``;
- ``dense(T, S, q_offset=...)``: a boolean mask ``[B|1, H|1, T, S]`` for the reference
  and for SDPA.

``kind`` says when the pattern is exactly plain ``"full"`` or ``"causal"`` attention, so
that ``attend`` can hand it to SDPA's fused kernels.

Positions. Keys sit at positions ``0 .. S-1``; queries at ``q_offset .. q_offset+T-1``.
``attend`` uses ``q_offset = S - T`` unless told otherwise: the queries are the newest
tokens, which is what a decode step (T=1, S=context) needs.

Legend: B batch, H query heads, T query length, S key length.

Example::

    >>> from attnkit import patterns
    >>> p = patterns.sink_window(sink_tokens=4, window=1024) | patterns.causal()
    >>> p.dense(8, 8).shape
    torch.Size([1, 1, 8, 8])
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from .._checks import positive_int

__all__ = [
    "Pattern",
    "Full",
    "Causal",
    "SlidingWindow",
    "SinkWindow",
    "PerHead",
    "Documents",
    "KeyPadding",
    "DenseMask",
    "dense_mask",
    "S2Strided",
    "AtKeyPositions",
    "AtQueryPositions",
    "And",
    "Or",
    "full",
    "causal",
    "sliding_window",
    "sink_window",
    "per_head",
    "documents",
    "key_padding",
    "s2_strided",
    "resolve",
    "PATTERN_NAMES",
]

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


class Pattern:
    """Base class. Subclasses implement :meth:`allowed` and set the flags below."""

    #: ``"full"`` or ``"causal"`` when the pattern is exactly that; ``None`` otherwise.
    kind: str | None = None
    #: whether :meth:`allowed` reads the batch index (FlexAttention then needs ``B``).
    depends_on_batch: bool = False
    #: whether :meth:`allowed` reads the head index.
    depends_on_head: bool = False
    #: FlexAttention block size for this pattern: an int, ``(q_block, kv_block)``, or ``None``
    #: (FlexAttention's default, 128).
    flex_block_size: int | tuple[int, int] | None = None
    #: FlexAttention ``kernel_options`` this pattern runs with on CUDA (chosen by measurement;
    #: ``attnkit.ops.softmax.flex.FLEX_KERNEL_OPTIONS`` overrides them). ``ROWS_GUARANTEED_SAFE`` here is
    #: a request that ``attend`` grants only where it can verify it for the shape.
    flex_kernel_options: Mapping[str, object] = MappingProxyType({})

    def allowed(self, b: Tensor, h: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def cache_key(self):
        """A hashable description, or ``None`` when the pattern holds tensors (no caching)."""
        return None

    def validate(self, batch: int, heads: int, kv_len: int) -> None:
        """Raise ``ValueError`` if the pattern cannot serve this shape."""

    def to(self, device) -> "Pattern":
        """This pattern with any tensors it holds on ``device`` (a compiled mask_mod cannot move them)."""
        return self

    def flex_block_mask(self, batch: int | None, heads: int | None, q_len: int, kv_len: int, q_offset: int,
                        device, block_size: int | tuple[int, int] | None):
        """A FlexAttention ``BlockMask`` built in closed form, or ``None`` to let
        ``create_block_mask`` evaluate :meth:`mask_mod` over the whole grid (the default)."""
        return None

    def _row_counts(self, q_pos: Tensor, kv_len: int) -> Tensor | None:
        """Allowed keys per query position, in closed form; ``None`` when there is none."""
        return None

    def pairs(self, q_len: int, kv_len: int, *, q_offset: int | None = None, heads: int = 1, batch: int = 1) -> float:
        """Mean number of allowed (query, key) pairs per (batch item, head): the FLOP models' input."""
        if q_offset is None:
            q_offset = kv_len - q_len
        q_pos = torch.arange(q_len, dtype=torch.float64) + q_offset
        counts = self._row_counts(q_pos, kv_len)
        if counts is not None:
            return float(counts.sum())
        total = 0
        rows = max(1, (1 << 24) // max(kv_len, 1))
        for start in range(0, q_len, rows):
            stop = min(q_len, start + rows)
            mask = self.dense(stop - start, kv_len, q_offset=q_offset + start, batch=batch, heads=heads)
            total += int(mask.sum()) * (batch // mask.shape[0]) * (heads // mask.shape[1])
        return total / (batch * heads)

    # -- faces -------------------------------------------------------------------------
    def mask_mod(self, q_offset: int = 0) -> MaskMod:
        allowed = self.allowed

        def mask_mod(b, h, q_idx, kv_idx):
            return allowed(b, h, q_idx + q_offset, kv_idx)

        return mask_mod

    def dense(
        self,
        q_len: int,
        kv_len: int,
        *,
        q_offset: int | None = None,
        batch: int = 1,
        heads: int = 1,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Boolean mask ``[B|1, H|1, T, S]``; True where the query may attend the key."""
        if q_offset is None:
            q_offset = kv_len - q_len
        device = torch.device(device) if device is not None else torch.device("cpu")
        b = torch.arange(batch if self.depends_on_batch else 1, device=device)
        h = torch.arange(heads if self.depends_on_head else 1, device=device)
        q = torch.arange(q_len, device=device) + q_offset
        k = torch.arange(kv_len, device=device)
        mask = self.allowed(b[:, None, None, None], h[None, :, None, None], q[None, None, :, None], k[None, None, None, :])
        return mask.expand(b.numel(), h.numel(), q_len, kv_len)

    # -- composition -------------------------------------------------------------------
    def __and__(self, other: "Pattern") -> "Pattern":
        return And(self, _check_pattern(other, "other"))

    def __or__(self, other: "Pattern") -> "Pattern":
        return Or(self, _check_pattern(other, "other"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _check_pattern(p, name: str) -> Pattern:
    if not isinstance(p, Pattern):
        raise ValueError(f"{name} must be an attnkit Pattern, got {type(p).__name__}")
    return p


class Full(Pattern):
    """Every query sees every key (bidirectional / cross attention)."""

    kind = "full"

    def allowed(self, b, h, q_pos, k_pos):
        return torch.ones_like(q_pos + k_pos, dtype=torch.bool)

    def _row_counts(self, q_pos, kv_len):
        return torch.full_like(q_pos, float(kv_len))

    @property
    def cache_key(self):
        return ("full",)


class Causal(Pattern):
    """A query at position i sees keys at positions <= i."""

    kind = "causal"

    def allowed(self, b, h, q_pos, k_pos):
        return k_pos <= q_pos

    def _row_counts(self, q_pos, kv_len):
        return (q_pos + 1).clamp(0, kv_len)

    @property
    def cache_key(self):
        return ("causal",)




class SlidingWindow(Pattern):
    """Causal sliding window: a query at i sees keys ``i - window < j <= i`` (itself included)."""

    def __init__(self, window: int):
        self.window = positive_int(window, "window")

    def allowed(self, b, h, q_pos, k_pos):
        return (k_pos <= q_pos) & (q_pos - k_pos < self.window)

    def _row_counts(self, q_pos, kv_len):
        return _window_counts(q_pos, kv_len, self.window)

    @property
    def cache_key(self):
        return ("sliding_window", self.window)

    def __repr__(self):
        return f"SlidingWindow(window={self.window})"


def _window_counts(q_pos: Tensor, kv_len: int, window: int) -> Tensor:
    last = q_pos.clamp(max=kv_len - 1)
    first = (q_pos - window + 1).clamp(min=0)
    return (last - first + 1).clamp(min=0)


class SinkWindow(Pattern):
    """StreamingLLM's pattern: the first ``sink_tokens`` keys plus the last ``window`` keys, causal."""

    def __init__(self, sink_tokens: int, window: int):
        if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
            raise ValueError(f"sink_tokens must be a non-negative integer, got {sink_tokens!r}")
        self.sink_tokens = sink_tokens
        self.window = positive_int(window, "window")

    def allowed(self, b, h, q_pos, k_pos):
        causal = k_pos <= q_pos
        return causal & ((q_pos - k_pos < self.window) | (k_pos < self.sink_tokens))

    def _row_counts(self, q_pos, kv_len):
        window_start = (q_pos - self.window + 1).clamp(min=0)
        sinks = torch.minimum(window_start, torch.full_like(q_pos, float(min(self.sink_tokens, kv_len))))
        return _window_counts(q_pos, kv_len, self.window) + sinks.clamp(min=0)

    @property
    def cache_key(self):
        return ("sink_window", self.sink_tokens, self.window)

    def __repr__(self):
        return f"SinkWindow(sink_tokens={self.sink_tokens}, window={self.window})"


class PerHead(Pattern):
    """A different pattern per query head (DuoAttention's retrieval/streaming heads, S2-Attention).

    ``patterns[h]`` is the pattern of query head ``h``; the list length must equal the
    number of query heads of the attention it is used with.
    """

    depends_on_head = True

    def __init__(self, patterns: Sequence[Pattern]):
        patterns = list(patterns)
        if not patterns:
            raise ValueError("per_head needs at least one pattern, got an empty list")
        for i, p in enumerate(patterns):
            _check_pattern(p, f"patterns[{i}]")
        self.patterns = patterns
        # distinct patterns, and a table head -> index of its distinct pattern
        self._groups: list[Pattern] = []
        index: dict = {}
        table = []
        for p in patterns:
            key = p.cache_key if p.cache_key is not None else ("id", id(p))
            if key not in index:
                index[key] = len(self._groups)
                self._groups.append(p)
            table.append(index[key])
        self._table_cpu = torch.tensor(table, dtype=torch.long)
        self._tables: dict = {}
        self.depends_on_batch = any(p.depends_on_batch for p in self._groups)
        kinds = {p.kind for p in self._groups}
        self.kind = kinds.pop() if len(kinds) == 1 else None

    def to(self, device):
        moved = [p.to(device) for p in self.patterns]
        return self if all(a is b for a, b in zip(moved, self.patterns)) else PerHead(moved)

    def _table(self, device) -> Tensor:
        if device not in self._tables:
            self._tables[device] = self._table_cpu.to(device)
        return self._tables[device]

    def allowed(self, b, h, q_pos, k_pos):
        if len(self._groups) == 1:
            return self._groups[0].allowed(b, h, q_pos, k_pos)
        group = self._table(h.device)[h]
        out = None
        for g, p in enumerate(self._groups):
            term = (group == g) & p.allowed(b, h, q_pos, k_pos)
            out = term if out is None else out | term
        return out

    def pairs(self, q_len, kv_len, *, q_offset=None, heads=1, batch=1):
        per = [p.pairs(q_len, kv_len, q_offset=q_offset, heads=1, batch=batch) for p in self.patterns]
        return sum(per) / len(per)

    def validate(self, batch, heads, kv_len):
        if len(self.patterns) != heads:
            raise ValueError(
                f"per_head pattern has {len(self.patterns)} entries but the attention has {heads} query heads; "
                "give one pattern per query head"
            )
        for p in self._groups:
            p.validate(batch, heads, kv_len)

    @property
    def cache_key(self):
        keys = tuple(p.cache_key for p in self.patterns)
        return None if any(k is None for k in keys) else ("per_head", keys)

    def __repr__(self):
        return f"PerHead({self.patterns!r})"


class Documents(Pattern):
    """Packed sequences: a query sees only keys of its own document.

    ``document_ids`` is an integer tensor ``[B, S]`` (one id per key position). Combine
    with :func:`causal` for packed causal language modelling: ``documents(ids) & causal()``.
    """

    depends_on_batch = True

    def __init__(self, document_ids: Tensor):
        if not isinstance(document_ids, Tensor) or document_ids.dim() != 2:
            got = tuple(document_ids.shape) if isinstance(document_ids, Tensor) else type(document_ids).__name__
            raise ValueError(f"document_ids must be an integer tensor of shape [B, S], got {got}")
        if document_ids.is_floating_point() or document_ids.is_complex():
            raise ValueError(f"document_ids must hold integers, got dtype {document_ids.dtype}")
        self.document_ids = document_ids.long()

    def allowed(self, b, h, q_pos, k_pos):
        ids = self.document_ids
        if ids.device != q_pos.device:
            ids = ids.to(q_pos.device)
        return ids[b, q_pos] == ids[b, k_pos]

    def to(self, device):
        device = torch.device(device)
        return self if self.document_ids.device == device else Documents(self.document_ids.to(device))

    def validate(self, batch, heads, kv_len):
        if tuple(self.document_ids.shape) != (batch, kv_len):
            raise ValueError(
                f"document_ids has shape {tuple(self.document_ids.shape)} but the keys need [B, S] = [{batch}, {kv_len}]"
            )


class KeyPadding(Pattern):
    """Padded keys: query rows of batch item ``b`` see only the keys where ``valid[b, key]``.

    ``valid`` is a boolean tensor ``[B, S]`` (True: a real token; Hugging Face's
    ``attention_mask`` convention, so left and right padding both work). Combine with the
    sequence pattern: ``causal() & key_padding(valid)``; ``attend(..., key_mask=...)`` does this.
    A row whose keys are all padding returns zeros (``attend``'s rule for empty rows).
    """

    depends_on_batch = True

    def __init__(self, valid: Tensor):
        if not isinstance(valid, Tensor) or valid.dim() != 2 or valid.dtype != torch.bool:
            got = (f"{valid.dtype} {tuple(valid.shape)}" if isinstance(valid, Tensor) else type(valid).__name__)
            raise ValueError(f"valid must be a boolean tensor [B, S] (True = a real key), got {got}")
        self.valid = valid

    def allowed(self, b, h, q_pos, k_pos):
        valid = self.valid
        if valid.device != k_pos.device:
            valid = valid.to(k_pos.device)
        return valid[b, k_pos]

    def to(self, device):
        device = torch.device(device)
        return self if self.valid.device == device else KeyPadding(self.valid.to(device))

    def validate(self, batch, heads, kv_len):
        if tuple(self.valid.shape) != (batch, kv_len):
            raise ValueError(f"the key padding mask has shape {tuple(self.valid.shape)} but the keys need "
                             f"[B, S] = [{batch}, {kv_len}]")

    def __repr__(self):
        return f"KeyPadding(B={self.valid.shape[0]}, S={self.valid.shape[1]})"


class S2Strided(Pattern):
    """S2-Attention's per-head strided block pattern (arXiv 2407.17678), causal.

    Tokens fall into blocks of ``block_size``. Query block ``i`` of head ``h`` sees key
    block ``j`` iff ``j <= i`` and (``i - j < local_blocks`` or
    ``(j + g*step + offset) % vert_stride == 0``), where ``g = h // heads_per_group`` is the
    KV head of query head ``h`` (heads sharing a KV head share a pattern, so the kept keys of a
    KV head are one set). Within the kept blocks attention is causal token by token, so the
    diagonal block is always attended. Heads listed in ``dense_heads`` (query-head indices)
    see the whole causal context.

    ``head_step`` sets ``step``, how far the stripes of consecutive KV heads are shifted:

    - ``"query_heads"`` (default): ``step = max(1, vert_stride // num_heads)``, the official
      rule (dkernel's ``get_sparse_attn_mask``, ``head_sliding_step``), which divides by the
      number of *query* heads even under GQA. For MHA each head keeps a different
      ``1/vert_stride`` of the distant blocks and with ``num_heads >= vert_stride`` their
      union covers every block.
    - ``"kv_heads"``: ``step = max(1, vert_stride // num_kv_heads)``, an attnkit variant that
      spreads the KV heads' stripes evenly over the stride. Under GQA the official rule packs
      the ``num_kv_heads`` stripe sets next to each other (8 query / 2 KV heads, stride 16:
      offsets {0, 14}, so a distant key can be 14 blocks from the nearest stripe any head
      keeps); this one spaces them ``vert_stride // num_kv_heads`` apart ({0, 8}: at most 8).
      Both keep one block in ``vert_stride`` per head; with ``num_kv_heads * step >= vert_stride`` the
      union covers every block. It equals the official rule for MHA, one KV head, and
      whenever ``vert_stride < 2 * num_kv_heads``.
    - a non-negative int: that step (dkernel's ``head_sliding_step`` override; 0 gives every
      head the same stripes, dkernel's ``homo_head``).
    """

    depends_on_head = True

    def __init__(self, *, num_heads: int, block_size: int = 64, local_blocks: int = 1, vert_stride: int = 16,
                 num_kv_heads: int | None = None, offset: int = 0, dense_heads: Sequence[int] = (),
                 head_step: str | int = "query_heads"):
        self.num_heads = positive_int(num_heads, "num_heads")
        self.num_kv_heads = positive_int(num_heads if num_kv_heads is None else num_kv_heads, "num_kv_heads")
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        self.block_size = positive_int(block_size, "block_size")
        self.local_blocks = positive_int(local_blocks, "local_blocks")
        self.vert_stride = positive_int(vert_stride, "vert_stride")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative integer, got {offset!r}")
        self.offset = offset
        dense_heads = tuple(sorted(set(dense_heads)))
        bad = [h for h in dense_heads if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < num_heads]
        if bad:
            raise ValueError(f"dense_heads must be query-head indices in [0, {num_heads}), got {list(dense_heads)}")
        self.dense_heads = dense_heads
        if head_step == "query_heads":
            self.step = max(1, self.vert_stride // self.num_heads)
        elif head_step == "kv_heads":
            self.step = max(1, self.vert_stride // self.num_kv_heads)
        elif isinstance(head_step, int) and not isinstance(head_step, bool) and head_step >= 0:
            self.step = head_step
        else:
            raise ValueError(f"head_step must be 'query_heads', 'kv_heads' or a non-negative integer, got {head_step!r}")
        self.head_step = head_step
        # Hopper's TMA loads: S2's training step at 128k (vert_stride 16, 64-token blocks) took
        # 58.6 ms with them against 61.5 without on the H200 (benchmarks/flex_kernel_options.py);
        # Inductor drops the option where the GPU or the tensors cannot use TMA. (Not
        # ROWS_GUARANTEED_SAFE: granted where verified, it measured 57.86 ms against 57.87 without)
        self.flex_kernel_options = MappingProxyType({"USE_TMA": True})
        # FlexAttention skips whole blocks: match its key block to S2's so that a 64-token stripe
        # does not cost a 128-token block (query blocks stay 128, the fast forward tile)
        if self.block_size < 128 and self.block_size % 16 == 0:
            self.flex_block_size = (128, self.block_size)
        dense = torch.zeros(num_heads, dtype=torch.bool)
        dense[list(dense_heads)] = True
        self._dense_cpu = dense
        self._dense: dict = {}

    def to(self, device):
        if self.dense_heads:  # filled here: a mask_mod traced inside FlexAttention cannot add to the table
            self._dense_table(torch.device(device))
        return self

    def _dense_table(self, device) -> Tensor:
        if device not in self._dense:
            self._dense[device] = self._dense_cpu.to(device)
        return self._dense[device]

    def allowed(self, b, h, q_pos, k_pos):
        q_block = q_pos // self.block_size
        k_block = k_pos // self.block_size
        group = h // (self.num_heads // self.num_kv_heads)
        local = q_block - k_block < self.local_blocks
        stripe = (k_block + group * self.step + self.offset) % self.vert_stride == 0
        keep = (k_pos <= q_pos) & (local | stripe)
        if self.dense_heads:
            keep = keep | ((k_pos <= q_pos) & self._dense_table(h.device)[h])
        return keep

    def pairs(self, q_len, kv_len, *, q_offset=None, heads=1, batch=1):
        if q_offset not in (None, kv_len - q_len) or q_len != kv_len:
            return super().pairs(q_len, kv_len, q_offset=q_offset, heads=self.num_heads, batch=batch)
        # self-attention: count at block level (exact; no T x S mask even at 128k)
        bs = self.block_size
        num_blocks = -(-q_len // bs)
        i = torch.arange(num_blocks)[:, None]
        j = torch.arange(num_blocks)[None, :]
        queries = torch.clamp(q_len - i * bs, max=bs).double()  # (nb, 1) queries in block i
        diagonal = (queries * (queries + 1) / 2).sum()  # causal within the diagonal block
        total = 0.0
        for h in range(self.num_heads):
            if h in self.dense_heads:
                total += q_len * (q_len + 1) / 2
                continue
            group = h // (self.num_heads // self.num_kv_heads)
            kept = (j < i) & ((i - j < self.local_blocks) | ((j + group * self.step + self.offset) % self.vert_stride == 0))
            total += float((kept.double() * queries).sum()) * bs + float(diagonal)
        return total / self.num_heads

    def validate(self, batch, heads, kv_len):
        if heads != self.num_heads:
            raise ValueError(f"s2_strided pattern was built for num_heads={self.num_heads}, the attention has {heads}")

    @property
    def cache_key(self):
        return ("s2_strided", self.num_heads, self.num_kv_heads, self.block_size, self.local_blocks,
                self.vert_stride, self.offset, self.dense_heads, self.step)

    def __repr__(self):
        return (f"S2Strided(num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, block_size={self.block_size}, "
                f"local_blocks={self.local_blocks}, vert_stride={self.vert_stride}, offset={self.offset}, "
                f"dense_heads={list(self.dense_heads)}, head_step={self.head_step!r})")


class AtKeyPositions(Pattern):
    """``pattern`` applied to keys that sit at arbitrary absolute positions.

    A bounded KV cache (sink + window) or an evicting cache keeps keys whose positions are
    no longer ``0 .. S-1``; ``key_positions`` (an integer tensor ``[S]``) says where key ``j``
    came from, and the pair is allowed iff ``pattern`` allows ``(q_pos, key_positions[j])``.
    """

    def __init__(self, pattern: Pattern, key_positions: Tensor):
        self.pattern = _check_pattern(pattern, "pattern")
        if not isinstance(key_positions, Tensor) or key_positions.dim() != 1 or key_positions.is_floating_point():
            got = tuple(key_positions.shape) if isinstance(key_positions, Tensor) else type(key_positions).__name__
            raise ValueError(f"key_positions must be an integer tensor [S], got {got}")
        self.key_positions = key_positions.long()
        self.depends_on_batch = pattern.depends_on_batch
        self.depends_on_head = pattern.depends_on_head

    def allowed(self, b, h, q_pos, k_pos):
        positions = self.key_positions
        if positions.device != k_pos.device:
            positions = positions.to(k_pos.device)
        return self.pattern.allowed(b, h, q_pos, positions[k_pos])

    def to(self, device):
        device = torch.device(device)
        pattern = self.pattern.to(device)
        if self.key_positions.device == device and pattern is self.pattern:
            return self
        return AtKeyPositions(pattern, self.key_positions.to(device))

    def validate(self, batch, heads, kv_len):
        if self.key_positions.numel() != kv_len:
            raise ValueError(f"key_positions has {self.key_positions.numel()} entries but there are S={kv_len} keys")
        self.pattern.validate(batch, heads, kv_len)

    def __repr__(self):
        return f"AtKeyPositions({self.pattern!r}, S={self.key_positions.numel()})"


def block_shape(block_size) -> tuple[int, int]:
    """``(q_block, kv_block)`` of a FlexAttention block size (``None``: its default, 128)."""
    if block_size is None:
        return 128, 128
    return (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)


def block_mask_from_blocks(partial_blocks: Tensor, full_blocks: Tensor, q_len: int, kv_len: int,
                           block_size: tuple[int, int], mask_mod: MaskMod):
    """A FlexAttention ``BlockMask`` from boolean ``[B, H, q_blocks, kv_blocks]`` grids of the
    partial blocks (``mask_mod`` is applied there) and the full ones (disjoint from them), for
    the patterns whose blocks have a closed form. Both orientations are built directly
    (``BlockMask.from_kv_blocks`` transposes under vmap: ~2 ms per call on the GPU)."""
    from torch.nn.attention.flex_attention import BlockMask

    def ordered(blocks):  # per row: how many, then their column indices first, ascending
        # contiguous: FlexAttention's Triton kernels step through an index row assuming stride 1,
        # and argsort of the transposed grid keeps the transpose's strides, so the backward's
        # q-side indices were read across rows (wrong dk/dv on CUDA once blocks are skipped)
        return (blocks.sum(-1, dtype=torch.int32).contiguous(),
                torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32).contiguous())

    kv_num, kv_indices = ordered(partial_blocks)
    full_kv_num, full_kv_indices = ordered(full_blocks)
    q_num, q_indices = ordered(partial_blocks.transpose(-1, -2))
    full_q_num, full_q_indices = ordered(full_blocks.transpose(-1, -2))
    return BlockMask(
        seq_lengths=(q_len, kv_len), kv_num_blocks=kv_num, kv_indices=kv_indices, full_kv_num_blocks=full_kv_num,
        full_kv_indices=full_kv_indices, q_num_blocks=q_num, q_indices=q_indices, full_q_num_blocks=full_q_num,
        full_q_indices=full_q_indices, BLOCK_SIZE=tuple(block_size), mask_mod=mask_mod,
    )


class AtQueryPositions(Pattern):
    """``pattern`` applied to queries gathered from arbitrary positions, per batch item and head.

    Mixture-of-Head attention computes a routed head only for the tokens that chose it:
    row ``i`` of head ``h`` in batch item ``b`` is the token at ``query_positions[b, h, i]``
    (an integer tensor ``[B, H, M]``; ``-1`` marks a padding row, which sees no key).
    Queries are indexed ``0 .. M-1`` (call ``attend`` with ``q_offset=0``).
    """

    depends_on_batch = True
    depends_on_head = True

    def __init__(self, pattern: Pattern, query_positions: Tensor):
        self.pattern = _check_pattern(pattern, "pattern")
        if not isinstance(query_positions, Tensor) or query_positions.dim() != 3 or query_positions.is_floating_point():
            got = tuple(query_positions.shape) if isinstance(query_positions, Tensor) else type(query_positions).__name__
            raise ValueError(f"query_positions must be an integer tensor [B, H, M], got {got}")
        self.query_positions = query_positions.long()

    def allowed(self, b, h, q_pos, k_pos):
        positions = self.query_positions
        if positions.device != q_pos.device:
            positions = positions.to(q_pos.device)
        row = positions[b, h, q_pos]
        return (row >= 0) & self.pattern.allowed(b, h, row, k_pos)

    def to(self, device):
        device = torch.device(device)
        pattern = self.pattern.to(device)
        if self.query_positions.device == device and pattern is self.pattern:
            return self
        return AtQueryPositions(pattern, self.query_positions.to(device))

    def validate(self, batch, heads, kv_len):
        if tuple(self.query_positions.shape[:2]) != (batch, heads):
            raise ValueError(f"query_positions is [B, H, M] = {list(self.query_positions.shape)} but the call has "
                             f"B={batch}, H={heads}")
        self.pattern.validate(batch, heads, kv_len)

    def flex_block_mask(self, batch, heads, q_len, kv_len, q_offset, device, block_size):
        """Causal inner pattern: the block mask straight from the positions, O(blocks) work.

        A query block sees key block ``j`` partly when ``j * kb <= max(position)`` and fully when
        every row is a real one and ``(j + 1) * kb - 1 <= min(position)`` (and the key block is
        not cut by ``kv_len``). Exact for any order of the rows; tight when they are sorted, as
        Mixture-of-Head attention gathers them. Evaluating the mask over the full
        ``M x S`` grid instead (``create_block_mask``) costs milliseconds per forward at 32k.
        """
        if self.pattern.kind != "causal" or q_offset != 0 or q_len != self.query_positions.shape[-1]:
            return None
        qb, kb = block_shape(block_size)
        device = torch.device(device)
        positions = self.query_positions.to(device)
        B, H, M = positions.shape
        nq, nk = -(-q_len // qb), -(-kv_len // kb)
        rows = torch.nn.functional.pad(positions, (0, nq * qb - M), value=-1).view(B, H, nq, qb)
        real = rows >= 0
        highest = rows.amax(-1).clamp(max=kv_len - 1)  # -1: no real row in the block
        lowest = torch.where(real, rows, torch.full_like(rows, kv_len)).amin(-1)
        seen = torch.where(highest >= 0, highest // kb + 1, torch.zeros_like(highest))
        full = torch.where(real.all(-1), ((lowest + 1) // kb).clamp(max=kv_len // kb), torch.zeros_like(lowest))
        full = torch.minimum(full, seen)
        columns = torch.arange(nk, device=device)
        full_blocks = columns < full[..., None]  # (B, H, nq, nk)
        partial_blocks = (columns < seen[..., None]) & ~full_blocks
        return block_mask_from_blocks(partial_blocks, full_blocks, q_len, kv_len, (qb, kb), self.mask_mod(0))

    def __repr__(self):
        return f"AtQueryPositions({self.pattern!r}, M={self.query_positions.shape[-1]})"


class _Binary(Pattern):
    def __init__(self, left: Pattern, right: Pattern):
        self.left = _check_pattern(left, "left")
        self.right = _check_pattern(right, "right")
        self.depends_on_batch = left.depends_on_batch or right.depends_on_batch
        self.depends_on_head = left.depends_on_head or right.depends_on_head

    def validate(self, batch, heads, kv_len):
        self.left.validate(batch, heads, kv_len)
        self.right.validate(batch, heads, kv_len)

    def to(self, device):
        left, right = self.left.to(device), self.right.to(device)
        return self if (left is self.left and right is self.right) else type(self)(left, right)

    @property
    def cache_key(self):
        a, b = self.left.cache_key, self.right.cache_key
        return None if a is None or b is None else (type(self).__name__, a, b)

    def __repr__(self):
        op = "&" if isinstance(self, And) else "|"
        return f"({self.left!r} {op} {self.right!r})"


class And(_Binary):
    """Both patterns allow the pair."""

    @property
    def kind(self):
        a, b = self.left.kind, self.right.kind
        if a == "full":
            return b
        if b == "full":
            return a
        return "causal" if a == b == "causal" else None

    def allowed(self, b, h, q_pos, k_pos):
        return self.left.allowed(b, h, q_pos, k_pos) & self.right.allowed(b, h, q_pos, k_pos)


class Or(_Binary):
    """Either pattern allows the pair."""

    @property
    def kind(self):
        a, b = self.left.kind, self.right.kind
        if "full" in (a, b):
            return "full"
        return "causal" if a == b == "causal" else None

    def allowed(self, b, h, q_pos, k_pos):
        return self.left.allowed(b, h, q_pos, k_pos) | self.right.allowed(b, h, q_pos, k_pos)


class DenseMask(Pattern):
    """A materialised boolean mask ``[B|1, 1|H, T, S]`` as a pattern (True = the pair counts):
    query ``i`` of the call and key ``j`` index it directly, whatever the positions. A mask of
    batch 1 holds for every row (expanded, a view, when the pattern is validated). For masks no
    closed form gives: a method's region masks over image tokens, a cache's kept positions."""

    depends_on_batch = True

    def __init__(self, mask: Tensor):
        if not isinstance(mask, Tensor) or mask.dim() != 4 or mask.dtype != torch.bool:
            got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"DenseMask: mask must be a boolean tensor [B|1, 1|H, T, S], got {got}")
        self.mask = mask
        self.depends_on_head = mask.shape[1] > 1

    def dense(self, q_len, kv_len, *, q_offset=None, batch=1, heads=1, device=None):
        if tuple(self.mask.shape[2:]) != (q_len, kv_len):
            raise ValueError(f"mask covers [T, S] = {list(self.mask.shape[2:])}, asked for [{q_len}, {kv_len}]")
        return self.mask

    def allowed(self, b, h, q_pos, k_pos):  # FlexAttention's face (q_pos here relative to the block)
        return self.mask[b, h if self.depends_on_head else 0, q_pos, k_pos]

    def mask_mod(self, q_offset=0):
        mask, per_head = self.mask, self.depends_on_head

        def mask_mod(b, h, q_idx, kv_idx):
            return mask[b, h if per_head else 0, q_idx, kv_idx]

        return mask_mod

    def to(self, device) -> "DenseMask":
        return self if self.mask.device == torch.device(device) else DenseMask(self.mask.to(device))

    def validate(self, batch, heads, kv_len):
        if self.mask.shape[0] == 1 and batch > 1 and self.mask.shape[3] == kv_len:
            self.mask = self.mask.expand(batch, *self.mask.shape[1:])  # a view: every row the same
        if self.mask.shape[0] != batch or self.mask.shape[3] != kv_len:
            raise ValueError(f"mask {tuple(self.mask.shape)} does not fit B={batch}, S={kv_len}")
        if self.depends_on_head and self.mask.shape[1] != heads:
            raise ValueError(f"mask {tuple(self.mask.shape)} has {self.mask.shape[1]} heads; the call has {heads} "
                             "(accepted: 1, for every head, or one per query head)")


# -- factories ---------------------------------------------------------------------------
def dense_mask(mask: Tensor) -> Pattern:
    return DenseMask(mask)


def full() -> Pattern:
    return Full()


def causal() -> Pattern:
    return Causal()


def sliding_window(window: int) -> Pattern:
    return SlidingWindow(window)


def sink_window(sink_tokens: int, window: int) -> Pattern:
    return SinkWindow(sink_tokens, window)


def per_head(patterns: Sequence[Pattern]) -> Pattern:
    return PerHead(patterns)


def documents(document_ids: Tensor) -> Pattern:
    return Documents(document_ids)


def key_padding(valid: Tensor) -> Pattern:
    return KeyPadding(valid)


def s2_strided(**options) -> Pattern:
    return S2Strided(**options)


PATTERN_NAMES = ("full", "causal")


def resolve(pattern, name: str = "pattern") -> Pattern:
    """``None`` -> full; ``"full"`` / ``"causal"`` -> the pattern; a Pattern -> itself."""
    if pattern is None:
        return Full()
    if isinstance(pattern, Pattern):
        return pattern
    if isinstance(pattern, str):
        if pattern == "full":
            return Full()
        if pattern == "causal":
            return Causal()
        raise ValueError(
            f"unknown {name} {pattern!r}; accepted names: {', '.join(PATTERN_NAMES)}, or an attnkit.patterns.Pattern "
            "(sliding_window, sink_window, per_head, documents, and & / | compositions)"
        )
    raise ValueError(f"{name} must be None, a pattern name or an attnkit.patterns.Pattern, got {type(pattern).__name__}")
