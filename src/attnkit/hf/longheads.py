"""LongHeads: a model reads far beyond its trained context, each head attending to the chunks it picks.

Lu et al., "LongHeads: Multi-Head Attention is Secretly a Long Context Processor", arXiv 2402.10685
(official code: github.com/LuLuLuyi/LongHeads). Training-free; the full KV cache is kept.

Legend: w ``chunk_size``, k ``chunks`` (chunks per query), L ``window`` (the trained context),
s a row's first real position, a query at position i has relative position ``r = i - s`` and
lies in chunk ``c_q = r // w`` at offset ``r % w``. Per KV head (GQA: its query heads together):

1. The context is cut into chunks of w tokens from each row's start. A complete chunk c gets a
   key by attention pooling: ``u`` = the mean over the chunk's tokens of their attention outputs
   within the chunk (non-causal, per query head), then ``K_c = softmax(u · k_loc / sqrt) k_loc``
   where ``k_loc`` are the chunk's keys rotated at their offsets ``0 .. w-1`` (the paper's
   "chunk representation"; computed once, when the chunk completes).
2. A query with ``c_q < k`` (everything so far fits in k chunks) attends to every earlier token
   at its own positions: plain causal attention.
3. Else it attends to k chunks: the first (attention sinks), its own and the one before
   (local context), and the ``k - 3`` chunks among ``1 .. c_q - 2`` with the highest score
   ``sum_h q_h · K_c^h`` (``q_h`` the query of head h before RoPE, summed over the KV head's
   query heads).
4. Positions are remapped: the chosen chunks, in order, take slots ``0 .. k-1``; a key at offset
   o of slot t sits at ``t·w + o``, the query at ``(k-1)·w + r % w``. Every distance a head sees
   is below ``k·w <= L``. Cached keys carry RoPE at their original positions; RoPE is a rotation,
   so a key is moved by undoing its rotation (the model's own float32 angle table) and rotating
   it to its new position (and the query likewise).

What differs from the paper's code: the query's own key is included (the official loop stops
one short), the first/local chunks are counted within k in prefill and decode alike, and a KV
head (not each query head) chooses, so GQA models gather each chunk once per KV head.

Supported RoPE (``config.rope_parameters["rope_type"]``): ``default``, ``linear``, ``llama3`` and
``yarn`` (fixed frequencies; YaRN's attention factor scales queries and keys alike and is kept),
in transformers' rotate-half layout, whole or partial (``partial_rotary_factor``). Other types
(``dynamic``, ``longrope``: frequencies that change with the length) and models without RoPE
raise ``ValueError``. Positions are taken as ``index - s`` (the left-padding convention of
``generate()``).

Runs on the head-wise cache (``handle.cache()``) and on any single forward; decoding on the
model's own cache raises (the chunk keys need the queries of earlier calls, which the rule keeps
in its per-group state).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import positive_int
from .policies import Policy, Rule

__all__ = ["LongHeads", "LongHeadsRule", "rope_frequencies", "select_chunks", "remap_positions"]

#: RoPE types whose rotation at a position is fixed (re-rotating a cached key is exact)
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# elements of the gathered keys of one block of queries (bounds the memory of a call)
_BLOCK_ELEMENTS = 1 << 25


def _optional_int(value, name: str, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} or None, got {value!r}")
    return value


def _check_sizes(chunk_size: int, chunks: int | None, window: int | None, owner: str) -> None:
    positive_int(chunk_size, f"{owner}: chunk_size")
    _optional_int(chunks, f"{owner}: chunks", 3)
    _optional_int(window, f"{owner}: window", 1)
    if window is not None and chunks is not None and chunks * chunk_size > window:
        raise ValueError(f"{owner}: chunks * chunk_size = {chunks} * {chunk_size} = {chunks * chunk_size} exceeds "
                         f"window={window}; accepted: chunks * chunk_size <= window (distances stay in the window)")
    if window is not None and chunks is None and window // chunk_size < 3:
        raise ValueError(f"{owner}: window={window} holds {window // chunk_size} chunk(s) of chunk_size={chunk_size}; "
                         "accepted: at least 3 (the first, a chosen one and the local ones)")


def _resolve(rule: "LongHeadsRule", config) -> tuple[int, int]:
    """(chunk_size, chunks) for a model: ``window`` defaults to ``config.max_position_embeddings``."""
    window = rule.window
    if window is None:
        window = getattr(config, "max_position_embeddings", None)
        if not isinstance(window, int) or window <= 0:
            raise ValueError("LongHeads: window=None needs config.max_position_embeddings (the trained context), "
                             f"got {window!r}; pass window= explicitly")
        _check_sizes(rule.chunk_size, rule.chunks, window, "LongHeads (window from max_position_embeddings)")
    chunks = rule.chunks if rule.chunks is not None else window // rule.chunk_size
    return rule.chunk_size, chunks


def rope_frequencies(config, layer_idx: int | None = None) -> Tensor:
    """The inverse frequencies ``[rot/2]`` (float32) of the model's RoPE, computed from ``config``
    as transformers computes its ``rotary_emb.inv_freq``; ``rot`` (twice their count) leading
    dimensions of a head are rotated.

    Raises ``ValueError`` for a config without RoPE or with a RoPE type outside :data:`ROPE_TYPES`."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or not params:
        raise ValueError(f"LongHeads re-rotates RoPE keys, but {type(config).__name__} has no rope_parameters "
                         f"(a model without RoPE); accepted RoPE types: {', '.join(ROPE_TYPES)}")
    layer_type = None
    if "rope_type" not in params and "rope_theta" not in params:  # per layer type (Gemma 3: local / global)
        types = getattr(config, "layer_types", None)
        if layer_idx is None or not types:
            raise ValueError(f"LongHeads: rope_parameters per layer type {sorted(params)} need config.layer_types")
        layer_type = types[layer_idx]
        params = params[layer_type]
    rope_type = params.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"LongHeads: rope_type={rope_type!r} is not supported (its frequencies change with the "
                         f"sequence length, so a cached key cannot be moved by a fixed rotation); accepted: "
                         f"{', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        base = params["rope_theta"]
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
        # exactly transformers' default (float32 arithmetic): the angles must match the model's to undo them
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kwargs = {"layer_type": layer_type} if layer_type is not None else {}
    inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, None, **kwargs)
    return inv_freq.float()


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Rotary:
    """cos / sin tables over positions ``0 .. size-1`` (float32 angles as transformers computes them,
    no attention factor), grown on demand; ``rotate(x, pos, sign)`` applies R(pos) (sign +1) or its
    inverse (sign -1) to the leading ``rot`` dims of x ``[..., D]``; pos broadcasts over x[..., 0]."""

    def __init__(self, inv_freq: Tensor, dtype, device):
        self.inv_freq, self.dtype, self.device = inv_freq.to(device), dtype, device
        self.rot = 2 * inv_freq.shape[0]
        self.cos = self.sin = self.norm = torch.empty(0, self.rot, dtype=dtype, device=device)

    def _grow(self, size: int) -> None:
        size = max(size, 2 * self.cos.shape[0], 64)
        freqs = torch.arange(size, device=self.device).float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        # float32 cos / sin are not exactly on the unit circle: the exact inverse divides by cos^2 + sin^2
        self.norm = self.cos.square() + self.sin.square()

    def rotate(self, x: Tensor, pos: Tensor, sign: int) -> Tensor:
        top = int(pos.max()) + 1 if pos.numel() else 0
        if top > self.cos.shape[0]:
            self._grow(top)
        if self.rot > x.shape[-1]:
            raise ValueError(f"LongHeads: the RoPE rotates {self.rot} dims but the heads have {x.shape[-1]}")
        cos, sin = self.cos[pos], self.sin[pos]  # [..., rot]
        part = x[..., : self.rot]
        if sign > 0:
            out = part * cos + _rotate_half(part) * sin
        else:
            out = (part * cos - _rotate_half(part) * sin) / self.norm[pos]
        return out if self.rot == x.shape[-1] else torch.cat((out, x[..., self.rot:]), dim=-1)


def select_chunks(scores: Tensor | None, chunk_of_query: Tensor, chunks: int) -> Tensor:
    """The chunks each query attends to: long ``[B, n, T, k]`` in increasing order (``-1``: none).

    scores ``[B, n, T, C]`` (chunk keys' scores; C >= the chunks a selecting query may pick, may be
    None when no query selects), chunk_of_query ``[B, T]`` (negative for padding queries). A query
    in chunk ``c < k`` gets every chunk ``0 .. c`` in slots ``0 .. c`` (its positions unchanged); a
    later one gets chunk 0, the ``k - 3`` best-scoring chunks among ``1 .. c - 2`` and chunks
    ``c - 1``, ``c``."""
    B, T = chunk_of_query.shape
    n = 1 if scores is None else scores.shape[1]
    cq = chunk_of_query[:, None, :, None]  # [B, 1, T, 1]
    slots = torch.arange(chunks, device=chunk_of_query.device)
    fits = torch.where(slots <= cq, slots, -1).expand(B, n, T, chunks)  # every chunk so far, in place
    selecting = chunk_of_query >= chunks
    if not bool(selecting.any()):
        return fits
    C = scores.shape[3]
    c = torch.arange(C, device=scores.device)
    candidate = (c >= 1) & (c <= cq - 2)  # [B, 1, T, C]
    ranked = scores.masked_fill(~candidate, float("-inf"))
    parts = [torch.zeros_like(cq).expand(B, n, T, 1)]
    if chunks > 3:
        parts.append(ranked.topk(chunks - 3, dim=3).indices)
    parts += [(cq - 1).expand(B, n, T, 1), cq.expand(B, n, T, 1)]
    chosen = torch.cat(parts, dim=3).sort(dim=3).values
    return torch.where(selecting[:, None, :, None], chosen, fits)


def remap_positions(selected: Tensor, relative: Tensor, chunk_size: int, chunks: int):
    """Original and remapped positions of the keys a query attends to.

    selected ``[B, n, T, k]`` (:func:`select_chunks`), relative ``[B, T]`` (the queries' positions
    from their row's start). Returns ``(key_rel [B, n, T, k, w], key_new [B, n, T, k, w],
    query_new [B, T], valid [B, n, T, k, w])``: the keys' original relative positions, their new
    positions, the query's new position, and which keys count (a chosen chunk, causal)."""
    w = chunk_size
    offset = torch.arange(w, device=selected.device)
    key_rel = selected[..., None] * w + offset  # [B, n, T, k, w]
    slots = torch.arange(chunks, device=selected.device)
    key_new = (slots[:, None] * w + offset).expand_as(key_rel)
    selecting = relative >= chunks * w  # else every chunk so far sits in place: positions unchanged
    query_new = torch.where(selecting, (chunks - 1) * w + relative.remainder(w), relative)  # [B, T]
    valid = (selected >= 0)[..., None] & (key_rel <= relative[:, None, :, None, None])
    return key_rel, key_new, query_new, valid


@dataclass(frozen=True)
class LongHeadsRule(Rule):
    """LongHeads' attention for a group of KV heads over the full cache (see the module docstring).

    ``chunks`` None: ``window // chunk_size``; ``window`` None: the model's
    ``config.max_position_embeddings``."""

    chunk_size: int = 256
    chunks: int | None = None
    window: int | None = None
    evicts = False  # the full cache stays; only the attention is sparse

    def __post_init__(self):
        _check_sizes(self.chunk_size, self.chunks, self.window, "LongHeadsRule")

    def attend(self, q: Tensor, k: Tensor, v: Tensor, call) -> Tensor:
        """q ``[B, n*g, T, D]``, k / v ``[B, n, S, D]`` (every position) -> ``[B, n*g, T, Dv]``."""
        B, Hq, T, D = q.shape
        n, S = k.shape[1], k.shape[2]
        g = Hq // n
        config = getattr(call.module, "config", None)
        if config is None:
            raise ValueError("LongHeads needs the attention module's config (its RoPE settings); none was given")
        if not call.every_position:
            raise ValueError("LongHeads attends over the full cache; its group got a subset of the positions")
        if v.shape[3] != D:
            raise ValueError(f"LongHeads pools chunk keys with attention outputs, which needs the value head dim "
                             f"({v.shape[3]}) to equal the key head dim ({D})")
        w, K = _resolve(self, config)
        state = call.state
        if "rotary" not in state:
            if not call.prefill:
                raise ValueError("LongHeads keeps the chunk keys of earlier calls in the head-wise cache; decoding on "
                                 "the model's own cache cannot serve it: pass past_key_values=handle.cache() (cache=, "
                                 "its newer name) to the model or to generate()")
            state["rotary"] = _Rotary(rope_frequencies(config, call.layer_idx), torch.promote_types(
                q.dtype, torch.float32), q.device)
        rotary = state["rotary"]
        dtype = rotary.dtype
        start = call.start
        _summarise(q, k, v, call, w, rotary)
        relative = call.q_pos[None, :] - start[:, None]  # [B, T]
        chunk_of_query = torch.div(relative, w, rounding_mode="floor")
        keys = state["chunk_keys"]  # [B, n, g, C, D]
        out = q.new_empty(B, Hq, T, v.shape[3])
        budget = _BLOCK_ELEMENTS * (4 if q.device.type == "cuda" else 1)
        step = max(1, budget // max(1, B * n * K * w * max(D, g)))
        # undo the keys' RoPE once for the whole cache when the gathered copies outnumber it (a
        # prefill), else on the gathered copies (a decode step): the same operations either way
        source = k
        if T * K * w > S:
            rel_keys = (torch.arange(S, device=q.device) - start[:, None]).clamp(min=0)  # [B, S]
            source = rotary.rotate(k.to(dtype), rel_keys[:, None], -1)
        slot_positions = torch.arange(K * w, device=q.device)  # slot t, offset o: t * w + o
        for lo in range(0, T, step):
            hi = min(T, lo + step)
            rel, cq = relative[:, lo:hi], chunk_of_query[:, lo:hi]
            t = hi - lo
            qb = q[:, :, lo:hi].to(dtype)
            q_pre = rotary.rotate(qb, rel.clamp(min=0)[:, None], -1)  # [B, Hq, t, D] before RoPE
            scores = None
            if bool((cq >= K).any()):
                scores = torch.einsum("bngtd,bngcd->bntc", q_pre.view(B, n, g, t, D), keys)
            selected = select_chunks(scores, cq, K)  # [B, n|1, t, K]
            selected = selected.expand(B, n, t, K)
            key_rel, key_new, query_new, valid = remap_positions(selected, rel, w, K)
            index = (key_rel + start[:, None, None, None, None]).clamp(0, S - 1).reshape(B, n, t * K * w)
            if call.mask is not None:  # the model's own mask (padding, a sliding window) still applies
                m = call.mask[:, :, lo:hi].expand(B, n, t, call.mask.shape[3])
                valid = valid & m.gather(3, index.view(B, n, t, K * w)).view_as(valid)
            gathered = index[..., None].expand(B, n, t * K * w, D)
            kg = source.gather(2, gathered).to(dtype).view(B, n, t, K * w, D)
            vg = v.gather(2, gathered).view(B, n, t, K * w, D)
            if source is k:
                kg = rotary.rotate(kg, key_rel.clamp(min=0).view(B, n, t, K * w), -1)  # undo RoPE
            kg = rotary.rotate(kg, slot_positions, 1)  # the keys at their new positions (= key_new)
            q_new = rotary.rotate(q_pre, query_new[:, None], 1).view(B, n, g, t, D)
            logits = torch.einsum("bngtd,bntsd->bngts", q_new, kg) * call.scale
            if call.score_mod is not None:
                logits = call.score_mod(logits, None, None, None, None)
            logits = logits.masked_fill(~valid.view(B, n, 1, t, K * w), float("-inf"))
            probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a padding query sees nothing: zeros
            o = torch.einsum("bngts,bntsd->bngtd", probs, vg.to(dtype))
            out[:, :, lo:hi] = o.reshape(B, Hq, t, -1).to(out.dtype)
        return out


def _summarise(q: Tensor, k: Tensor, v: Tensor, call, w: int, rotary: _Rotary) -> None:
    """Add the keys of the chunks completed by this call to ``call.state["chunk_keys"]``
    ``[B, n, g, C, D]`` (per row ``state["done"]`` of them); ``state["queries"]`` keeps the
    queries of the last ``w`` positions, which a chunk completed by a later call needs."""
    state = call.state
    B, Hq, T, D = q.shape
    n, S = k.shape[1], k.shape[2]
    g = Hq // n
    dtype = rotary.dtype
    start = call.start
    if "chunk_keys" not in state:
        state["chunk_keys"] = torch.zeros(B, n, g, 0, D, dtype=dtype, device=q.device)
        state["done"] = torch.zeros(B, dtype=torch.long, device=q.device)
        state["queries"] = q[:, :, :0]
    buffer = torch.cat([state["queries"], q], dim=2)  # positions S - len(buffer) .. S - 1
    first = S - buffer.shape[2]
    done = state["done"]
    now = torch.div(S - start, w, rounding_mode="floor").clamp(min=0)  # complete chunks per row
    todo = int((now - done).max()) if B else 0
    if todo > 0:
        new_keys = torch.zeros(B, n, g, todo, D, dtype=dtype, device=q.device)
        per_block = max(1, _BLOCK_ELEMENTS // max(1, B * Hq * w * w))
        offset = torch.arange(w, device=q.device)
        for lo in range(0, todo, per_block):
            hi = min(todo, lo + per_block)
            c = done[:, None] + torch.arange(lo, hi, device=q.device)  # [B, m]
            m = hi - lo
            rel = c[..., None] * w + offset  # [B, m, w] from the row's start
            pos = rel + start[:, None, None]
            qi = (pos - first).clamp(0, buffer.shape[2] - 1).view(B, 1, m * w, 1).expand(B, Hq, m * w, D)
            ki = pos.clamp(0, S - 1).view(B, 1, m * w, 1).expand(B, n, m * w, D)
            qc = buffer.gather(2, qi).to(dtype).view(B, n, g, m, w, D)
            kc = k.gather(2, ki).to(dtype).view(B, n, 1, m, w, D)
            vc = v.gather(2, ki).to(dtype).view(B, n, 1, m, w, D)
            # the chunk's own attention (non-causal): relative distances inside a chunk are the
            # same at the original positions and at offsets 0 .. w-1, so the cached RoPE serves
            inner = torch.softmax(qc @ kc.transpose(-1, -2) * call.scale, dim=-1)
            pooled = (inner @ vc).mean(dim=4)  # [B, n, g, m, D]
            local = rotary.rotate(rotary.rotate(kc, rel.clamp(min=0)[:, None, None], -1),
                                  offset.expand(B, 1, 1, m, w), 1)  # keys at offsets 0 .. w-1
            weights = torch.softmax((pooled[..., None, :] @ local.transpose(-1, -2)) * call.scale, dim=-1)
            new_keys[:, :, :, lo:hi] = (weights @ local).squeeze(-2)
        keys = state["chunk_keys"]
        total = int(now.max())
        if keys.shape[3] < total:
            keys = torch.cat([keys, keys.new_zeros(B, n, g, total - keys.shape[3], D)], dim=3)
        for b, (a, z) in enumerate(zip(done.tolist(), now.tolist())):
            if z > a:
                keys[b, :, :, a:z] = new_keys[b, :, :, : z - a]
        state["chunk_keys"], state["done"] = keys, torch.maximum(done, now)
    state["queries"] = buffer[:, :, -w:].clone()


@dataclass(frozen=True)
class LongHeads(Policy):
    """LongHeads (Lu et al., arXiv 2402.10685) on every KV head of every layer.

    Args:
        chunk_size: tokens per chunk (w; the paper uses 256).
        chunks: chunks a query attends to (k >= 3: the first, the local two and ``k - 3`` chosen
            ones); None: ``window // chunk_size``.
        window: the trained context L; every distance a head sees stays below ``chunks *
            chunk_size <= window``. None: the model's ``config.max_position_embeddings``.
    """

    name = "longheads"
    chunk_size: int = 256
    chunks: int | None = None
    window: int | None = None

    def __post_init__(self):
        _check_sizes(self.chunk_size, self.chunks, self.window, "LongHeads")

    def rule(self, layer_idx, kv_head):
        return LongHeadsRule(self.chunk_size, self.chunks, self.window)
