"""The ``flex`` backend of :func:`attnkit.attend`: FlexAttention, compiled on CUDA, with the
pattern's block mask built once per (pattern, shape) and cached, the kernel options of each call
(the pattern's, :data:`FLEX_KERNEL_OPTIONS`, the tiles small blocks need), ``ROWS_GUARANTEED_SAFE``
granted only where it is verified, opt-in small backward tiles, and head dims under 16 padded."""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import patterns as _patterns
from .reference import _modified_scores

__all__ = ["block_mask_for", "clear_block_mask_cache", "flex_kernel_options", "FLEX_KERNEL_OPTIONS",
           "enable_small_flex_backward_tiles", "small_flex_backward_tiles"]


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


_PROBED_SCORE_MODS: set = set()


def _probe_score_mod(score_mod, q: Tensor) -> None:
    """Run ``score_mod`` once on one scalar score, as FlexAttention will, so that a bad return
    (a Python number) raises a clear ValueError here rather than a compiler error inside
    FlexAttention. Once per function body (its code object), so calls in a loop pay nothing."""
    key = getattr(score_mod, "__code__", None) or type(score_mod)
    if key in _PROBED_SCORE_MODS or torch.compiler.is_compiling():
        return
    index = [torch.zeros((), dtype=torch.int32, device=q.device) for _ in range(4)]
    score = torch.zeros((), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32, device=q.device)
    _modified_scores(score_mod, score, *index)
    _PROBED_SCORE_MODS.add(key)


_BLOCK_MASK_CACHE: "OrderedDict[tuple, object]" = OrderedDict()
_BLOCK_MASK_CACHE_SIZE = 64
_COMPILED_FLEX = None


def clear_block_mask_cache() -> None:
    _BLOCK_MASK_CACHE.clear()


_SMALL_TILES_ENABLED = False
_ORIGINAL_BWD_CONFIGS = None
#: FlexAttention backward tiles (block_m1, block_n1, block_m2, block_n2, stages, warps) offered to
#: Inductor beside its own, for key blocks under 128 tokens (see :func:`enable_small_flex_backward_tiles`).
SMALL_BWD_TILES: tuple[tuple[int, ...], ...] = ((64, 64, 64, 64, 3, 4),)


def enable_small_flex_backward_tiles(enabled: bool = True) -> bool:
    """Opt in to (or out of) training patterns on their own sub-128-token blocks; returns whether on.

    On sm90 Inductor offers the FlexAttention backward exactly one tile shape (64 x 128 / 128 x 64)
    unless max-autotune is on, and a 64-token key block is not divisible by it: torch 2.11 then has
    no kernel at all (NoValidChoicesError). So by default a training step runs a pattern with
    64-token blocks (S2's, a window's) on 128-token blocks (exact: the mask is applied inside each
    partial block; only fewer blocks are skipped). Opting in appends the 64 x 64 tile that the sm8x
    / small-head heuristics use to Inductor's candidates (it drops those that do not divide the
    blocks and times the rest), which is a process-wide change to Inductor's choices: it applies to
    every FlexAttention backward compiled while it is on, attnkit's or not, hence opt-in. Kernels
    compiled before a change keep their tiles. ``False`` if this torch release has no such hook.

    Also usable as ``with small_flex_backward_tiles(): ...``.
    """
    global _SMALL_TILES_ENABLED, _ORIGINAL_BWD_CONFIGS
    try:
        from torch._inductor.choices import InductorChoices
        from torch._inductor.template_heuristics.triton import FlexBwDConfig
    except ImportError:
        return False
    if not enabled:
        if _ORIGINAL_BWD_CONFIGS is not None:
            InductorChoices.get_flex_attention_bwd_configs = _ORIGINAL_BWD_CONFIGS
            _ORIGINAL_BWD_CONFIGS = None
        _SMALL_TILES_ENABLED = False
        return False
    if _SMALL_TILES_ENABLED:
        return True
    original = getattr(InductorChoices, "get_flex_attention_bwd_configs", None)
    if original is None:
        return False
    try:
        extras = [FlexBwDConfig(*tile) for tile in SMALL_BWD_TILES]
    except TypeError:  # another torch release: keep 128-token blocks
        return False

    def get_flex_attention_bwd_configs(self, head_dim, dtype, device_type="cuda"):
        configs = list(original(self, head_dim, dtype, device_type))
        if device_type == "cuda" and head_dim <= 128:
            configs += [extra for extra in extras if extra not in configs]
        return configs

    _ORIGINAL_BWD_CONFIGS = original
    InductorChoices.get_flex_attention_bwd_configs = get_flex_attention_bwd_configs
    _SMALL_TILES_ENABLED = True
    return True


class small_flex_backward_tiles:
    """Context manager form of :func:`enable_small_flex_backward_tiles` (restores the previous setting)."""

    def __enter__(self):
        self._before = _SMALL_TILES_ENABLED
        return enable_small_flex_backward_tiles(True)

    def __exit__(self, *exc):
        enable_small_flex_backward_tiles(self._before)


def flex_small_blocks(device: torch.device, training: bool) -> bool:
    """Whether FlexAttention runs a pattern's own ``flex_block_size`` (blocks under 128 tokens):
    on CUDA, always for inference, in training only after :func:`enable_small_flex_backward_tiles`."""
    return device.type == "cuda" and (not training or _SMALL_TILES_ENABLED)


#: dynamo's recompile limit while attnkit's compiled FlexAttention runs: every (shape, mask_mod,
#: score_mod) is its own kernel, and past dynamo's default of 8 it would fall back to the slow
#: unfused path. Raised only inside attnkit's calls (``torch._dynamo.config.patch``), not for the process.
FLEX_RECOMPILE_LIMIT = 256


def _flex_impl(device: torch.device):
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda" or torch.compiler.is_compiling():
        return flex_attention
    if _COMPILED_FLEX is None:
        # every (shape, mask_mod, score_mod) is its own compiled kernel: allow more than dynamo's
        # default of 8 before it falls back to the slow unfused path
        from torch import _dynamo

        compiled = torch.compile(flex_attention, dynamic=False)

        def run(*args, **kwargs):
            limit = max(_dynamo.config.recompile_limit, FLEX_RECOMPILE_LIMIT)
            with _dynamo.config.patch(recompile_limit=limit):
                return compiled(*args, **kwargs)

        _COMPILED_FLEX = run
    return _COMPILED_FLEX


def block_mask_for(pattern, batch: int, heads: int, q_len: int, kv_len: int, q_offset: int, device, *,
                   small_blocks: bool = True):
    """The FlexAttention BlockMask of a pattern at a shape; ``None`` for plain full attention.

    Built compiled on CUDA (never materialising a dense ``S x S`` mask) and cached per
    (pattern, shape, offset, device) unless the pattern holds tensors. ``small_blocks=False``
    ignores the pattern's ``flex_block_size`` (FlexAttention's 128-token blocks).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    pattern = _patterns.resolve(pattern)
    if pattern.kind == "full":
        return None
    device = torch.device(device)
    pattern = pattern.to(device)
    B, H, block, key = _mask_key(pattern, batch, heads, q_len, kv_len, q_offset, device, small_blocks)
    compiling = torch.compiler.is_compiling()
    if not compiling and key in _BLOCK_MASK_CACHE:
        _BLOCK_MASK_CACHE.move_to_end(key)
        return _BLOCK_MASK_CACHE[key]
    block_mask = pattern.flex_block_mask(B, H, q_len, kv_len, q_offset, device, block)  # closed form, if any
    if block_mask is None:
        args = (pattern.mask_mod(q_offset), B, H, q_len, kv_len)
        block_size = {"BLOCK_SIZE": block} if block else {}  # int or (q, kv)
        if compiling:  # traced into the caller's graph: no nested compile, no warnings filter
            block_mask = create_block_mask(*args, device=device, **block_size)
        else:
            with warnings.catch_warnings():
                # torch 2.11 deprecates _compile=True, but it still builds the mask without an S x S tensor
                warnings.simplefilter("ignore", DeprecationWarning)
                block_mask = create_block_mask(*args, device=device, _compile=device.type == "cuda", **block_size)
    if not compiling:
        _cache_put(key, block_mask)
    return block_mask


def _mask_key(pattern, batch, heads, q_len, kv_len, q_offset, device, small_blocks):
    """(B, H, block size, cache key) of a pattern's block mask at a shape; the key is ``None``
    when the pattern holds tensors (no caching)."""
    B = batch if pattern.depends_on_batch else None
    H = heads if pattern.depends_on_head else None
    block = pattern.flex_block_size if small_blocks else None
    key = None if pattern.cache_key is None else (pattern.cache_key, B, H, q_len, kv_len, q_offset, str(device), block)
    return B, H, block, key


def _cache_put(key, value) -> None:
    if key is not None:
        _BLOCK_MASK_CACHE[key] = value
        if len(_BLOCK_MASK_CACHE) > _BLOCK_MASK_CACHE_SIZE:
            _BLOCK_MASK_CACHE.popitem(last=False)


#: Extra FlexAttention ``kernel_options`` for every ``attend(backend="flex")`` call on CUDA
#: (e.g. ``{"USE_TMA": True}``): they win over a pattern's own ``flex_kernel_options``; the
#: tiles that small blocks need win over both. ``ROWS_GUARANTEED_SAFE`` is granted only where
#: attnkit verified it for the shape (:func:`first_tiles_cover_rows`, after :func:`diagonal_first`):
#: set blindly it turned 45% of S2's rows to NaN (``benchmarks/flex_rows_safe.py``).
FLEX_KERNEL_OPTIONS: dict = {}


def flex_tiles(block_size, head_dim: int | None = None) -> dict:
    """FlexAttention forward tiles for a block mask of ``block_size`` (int, or (q_block, kv_block)):
    each tile must divide the mask's blocks (torch 2.11 fails to lower otherwise). With a head
    dimension above 64, a key tile of 128 is halved to 64 (still dividing the block): 128 x 128
    tiles of a 128-dim head need 233,472 bytes of shared memory, over the H200's 232,448 (measured:
    ProxyAttn's 128-token block selection failed to compile there)."""
    q_block, kv_block = _patterns.block_shape(block_size)
    if head_dim is not None and head_dim > 64 and kv_block > 64 and kv_block % 64 == 0:
        kv_block = 64
    return dict(BLOCK_M=q_block, BLOCK_N=kv_block)


def flex_kernel_options(pattern, device: torch.device, q_len: int, training: bool, small_blocks: bool,
                        head_dim: int | None = None) -> dict:
    """The FlexAttention ``kernel_options`` of one call: none on CPU; on CUDA the pattern's own,
    then :data:`FLEX_KERNEL_OPTIONS`, then what the call needs to lower at all (``head_dim``: the
    tiles' shared memory, see :func:`flex_tiles`)."""
    if device.type != "cuda":
        return {}
    options = {**pattern.flex_kernel_options, **FLEX_KERNEL_OPTIONS}
    if q_len < 128 and training:
        # short queries take FlexAttention's decoding kernel, which has no backward: training
        # on them needs the main kernel (torch 2.11 otherwise fails to lower)
        options["FORCE_USE_FLEX_ATTENTION"] = True
    if small_blocks and pattern.flex_block_size:
        options.update(flex_tiles(pattern.flex_block_size, head_dim))
    return options


def _first_visited(block_mask) -> Tensor:
    """Per (batch, head, query block): the key block FlexAttention's forward visits first (its
    partial blocks come before its full ones), or -1 where the query block has none."""
    first = torch.full_like(block_mask.kv_num_blocks, -1)
    if block_mask.full_kv_num_blocks is not None:
        first = torch.where(block_mask.full_kv_num_blocks > 0, block_mask.full_kv_indices[..., 0], first)
    return torch.where(block_mask.kv_num_blocks > 0, block_mask.kv_indices[..., 0], first)


def first_tiles_cover_rows(block_mask, pattern, q_len: int, kv_len: int, q_offset: int, block_n: int) -> bool:
    """Whether every query row has an allowed key among the first ``block_n`` keys that
    FlexAttention's forward visits for the row's query block.

    That is what FlexAttention's ``ROWS_GUARANTEED_SAFE`` assumes: with it the kernel drops its
    guard for a row whose running maximum is still ``-inf``, and such a row's first tile gives
    ``exp2(-inf - -inf) = NaN``, which no later tile removes. Checked by evaluating the pattern
    on each query block's first tile only (``T x block_n`` pairs per head); a query block whose
    first visited block is a full block holds by construction.
    """
    pattern = _patterns.resolve(pattern)
    q_block, kv_block = block_mask.BLOCK_SIZE
    first = _first_visited(block_mask)
    partial_first = block_mask.kv_num_blocks > 0
    device = first.device
    nb, nh, nq = first.shape
    tiles_per_chunk = max(1, (1 << 22) // (q_block * block_n))
    rows = torch.arange(q_block, device=device)
    cols = torch.arange(block_n, device=device)
    for b in range(nb):
        for h in range(nh):
            b_t = torch.full((1, 1, 1), b, device=device)
            h_t = torch.full((1, 1, 1), h, device=device)
            for start in range(0, nq, tiles_per_chunk):
                tiles = torch.arange(start, min(nq, start + tiles_per_chunk), device=device)
                tiles = tiles[partial_first[b, h, tiles]]
                if tiles.numel() == 0:
                    continue
                q_pos = (tiles[:, None] * q_block + rows[None, :])[:, :, None]  # (n, q_block, 1)
                k_pos = (first[b, h, tiles][:, None] * kv_block + cols[None, :])[:, None, :]  # (n, 1, block_n)
                allowed = pattern.allowed(b_t, h_t, q_pos + q_offset, k_pos) & (k_pos < kv_len)
                if not bool((allowed.any(-1) | (q_pos[..., 0] >= q_len)).all()):
                    return False
    return True


def diagonal_first(block_mask, q_offset: int):
    """``block_mask`` with, in each query block, the partial key block that holds the key at the
    block's first query position (``q_offset + i * q_block``) moved to the front of the visiting
    order. For causal local patterns every row of the query block sees that key (a window of at
    least one query block, S2 with two or more local blocks), while FlexAttention's own ascending
    order starts at the far edge of the local band, which the block's later rows do not see."""
    from torch.nn.attention.flex_attention import BlockMask

    q_block, kv_block = block_mask.BLOCK_SIZE
    idx, num = block_mask.kv_indices, block_mask.kv_num_blocks
    nq = num.shape[-1]
    target = ((q_offset + torch.arange(nq, device=idx.device) * q_block) // kv_block).to(idx.dtype)
    slot = torch.arange(idx.shape[-1], device=idx.device)
    hit = (idx == target[:, None]) & (slot < num[..., None])
    found = hit.any(-1)
    pos = hit.to(torch.int8).argmax(-1)
    swapped = idx.scatter(-1, pos[..., None], idx[..., :1])  # the old first block takes the target's slot
    swapped[..., 0] = target.expand_as(pos)
    new_idx = torch.where(found[..., None], swapped, idx)
    return BlockMask.from_kv_blocks(num, new_idx, block_mask.full_kv_num_blocks, block_mask.full_kv_indices,
                                    BLOCK_SIZE=block_mask.BLOCK_SIZE, mask_mod=block_mask.mask_mod,
                                    seq_lengths=block_mask.seq_lengths)


def _rows_safe_mask(block_mask, pattern, batch, heads, q_len, kv_len, q_offset, device, block_n, small_blocks):
    """(block mask, granted): the mask reordered by :func:`diagonal_first` and whether
    ``ROWS_GUARANTEED_SAFE`` holds for it (:func:`first_tiles_cover_rows`); cached with the mask."""
    pattern = _patterns.resolve(pattern)
    key = _mask_key(pattern, batch, heads, q_len, kv_len, q_offset, device, small_blocks)[-1]
    key = None if key is None else ("rows_safe", block_n, *key)
    if key in _BLOCK_MASK_CACHE:
        _BLOCK_MASK_CACHE.move_to_end(key)
        return _BLOCK_MASK_CACHE[key]
    reordered = diagonal_first(block_mask, q_offset)
    result = (reordered, first_tiles_cover_rows(reordered, pattern.to(device), q_len, kv_len, q_offset, block_n))
    _cache_put(key, result)
    return result


def _grant_rows_safe(kernel_options: dict, block_mask, pattern, score_mod, B, Hq, T, S, q_offset, device,
                     small_blocks):
    """Keep a requested ``ROWS_GUARANTEED_SAFE`` only where attnkit verified it (see
    :func:`first_tiles_cover_rows`), returning the block mask to run with. Refused with a
    ``score_mod`` (it may mask too), under compilation (no data-dependent check), for the short
    query decoding kernel (it splits the keys its own way) and where the key tile is Inductor's choice."""
    if not kernel_options.get("ROWS_GUARANTEED_SAFE"):
        return block_mask
    kernel_options["ROWS_GUARANTEED_SAFE"] = False
    if block_mask is None:  # full attention: every row sees every key
        kernel_options["ROWS_GUARANTEED_SAFE"] = S > 0
        return block_mask
    decoding = T < 128 and not kernel_options.get("FORCE_USE_FLEX_ATTENTION")
    if score_mod is not None or torch.compiler.is_compiling() or decoding or "BLOCK_N" not in kernel_options:
        return block_mask
    block_mask, granted = _rows_safe_mask(block_mask, pattern, B, Hq, T, S, q_offset, device,
                                          int(kernel_options["BLOCK_N"]), small_blocks)
    kernel_options["ROWS_GUARANTEED_SAFE"] = granted
    return block_mask


#: FlexAttention's CUDA kernels take head dims of at least 16 (Inductor: "NYI: embedding dimension of
#: the query, key, and value must be at least 16"); smaller ones are zero-padded up to it.
FLEX_MIN_HEAD_DIM = 16


def _flex_pads_head_dims(q: Tensor, v: Tensor) -> bool:
    return q.device.type == "cuda" and min(q.shape[-1], v.shape[-1]) < FLEX_MIN_HEAD_DIM


def _attend_flex(q, k, v, pattern, score_mod, scale, return_lse, q_offset):
    if _flex_pads_head_dims(q, v):
        # exact: zero columns of q and k leave every q . k as it is (the scale stays the unpadded
        # D's), zero columns of v give zero output columns, which are cut off; gradients follow
        D, Dv = q.shape[-1], v.shape[-1]
        scale = D**-0.5 if scale is None else scale
        pad, pad_v = max(0, FLEX_MIN_HEAD_DIM - D), max(0, FLEX_MIN_HEAD_DIM - Dv)
        q, k, v = F.pad(q, (0, pad)), F.pad(k, (0, pad)), F.pad(v, (0, pad_v))
        result = _flex_call(q, k, v, pattern, score_mod, scale, return_lse, q_offset)
        if not return_lse:
            return result[..., :Dv]
        return result[0][..., :Dv], result[1]
    return _flex_call(q, k, v, pattern, score_mod, scale, return_lse, q_offset)


def _flex_call(q, k, v, pattern, score_mod, scale, return_lse, q_offset):
    B, Hq, T, _ = q.shape
    S = k.shape[2]
    small_blocks = flex_small_blocks(q.device, _needs_grad(q, k, v))
    block_mask = block_mask_for(pattern, B, Hq, T, S, q_offset, q.device, small_blocks=small_blocks)
    flex_score_mod = None
    if score_mod is not None:
        _probe_score_mod(score_mod, q)

        def flex_score_mod(score, b, h, q_idx, kv_idx):
            return score_mod(score, b, h, q_idx + q_offset, kv_idx)

    lse_request = {}
    if return_lse:
        try:  # torch >= 2.9 asks for the lse through AuxRequest; older releases take return_lse
            from torch.nn.attention.flex_attention import AuxRequest

            lse_request = {"return_aux": AuxRequest(lse=True)}
        except ImportError:
            lse_request = {"return_lse": True}
    kernel_options = flex_kernel_options(pattern, q.device, T, _needs_grad(q, k, v), small_blocks,
                                         max(q.shape[-1], v.shape[-1]))
    block_mask = _grant_rows_safe(kernel_options, block_mask, pattern, score_mod, B, Hq, T, S, q_offset, q.device,
                                  small_blocks)
    result = _flex_impl(q.device)(
        q,
        k,
        v,
        score_mod=flex_score_mod,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
        kernel_options=kernel_options or None,
        **lse_request,
    )
    if not return_lse:
        return result
    out, aux = result
    return out, getattr(aux, "lse", aux)
