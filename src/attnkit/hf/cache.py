"""A head-wise KV cache for transformers models: each group of KV heads keeps only the tokens
its policy rule can still use, so the memory of dropped tokens is released.

Layout per model layer (:class:`HeadwiseLayer`), one entry per :class:`attnkit.hf.policies.Group`:

- a full group (rule ``None``, or a rule with ``evicts = False``): keys and values
  ``[B, n_full, S, D]``, every token seen (positions ``0 .. S-1``);
- an evicting group (e.g. sink + window): keys and values ``[B, n, K, D]`` with ``K`` at most
  the rule's budget, the original position of each slot ``[B, 1, K]`` (shared by the group's
  heads) or ``[B, n, K]`` (one set per head, e.g. H2O's heavy hitters; ``-1``: an empty slot of a
  row or head that has kept fewer tokens, e.g. a left-padded row early in the sequence), and for
  a ``scored`` rule each slot's score ``[B, n, K]``. Slots are trimmed after every call
  (``commit``), so the tensors of the evicted tokens are freed.

Cached keys carry RoPE from their original positions (the model rotated them before the
update), so attention over a kept subset needs only the positions, for the mask.

The cache works together with the attention function of :func:`attnkit.hf.apply`: ``update``
stages this call's candidates (the kept tokens plus the new ones) for the attention function,
which attends each group on them (the rule's ``attend``) and then calls
:meth:`HeadwiseLayer.commit` (the rule's ``keep``). Build one with ``handle.cache()`` and pass it
to the model as ``past_key_values``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from .policies import Group

__all__ = ["HeadwiseCache", "HeadwiseLayer"]


class HeadwiseLayer(CacheLayerMixin):
    """One layer's head-wise cache: one store per KV-head group (see the module docstring)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, groups: tuple[Group, ...], num_kv_heads: int, layer_idx: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.groups = groups
        self.layer_idx = layer_idx
        self.num_kv_heads = num_kv_heads
        self.seen = 0
        self.start: Tensor | None = None  # [B] first non-padding position per row; -1 while unknown
        # per group: (keys, values, positions [B, 1|n, K] or None, scores [B, n, K] or None)
        self._stores: list = [None] * len(groups)
        self.states: list = [{} for _ in groups]  # per group: the rule's own state (GroupCall.state)
        self.pending: list | None = None
        # what the first commit learns of ``start`` (one host sync per sequence, not one per call):
        # every row's start known (>= 0), and every row starting at 0 (no padding: the sink + window
        # groups then keep contiguous slices and decode without a mask, see _attend_headwise)
        self.start_final = False
        self.plain = False

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self._index = [torch.tensor(g.kv_heads, device=self.device) for g in self.groups]
        # per group: store everything (None, or a rule that does not evict) or evict after each call
        self._evicting = [g.rule is not None and g.rule.evicts for g in self.groups]
        self._scored = [g.rule is not None and g.rule.evicts and g.rule.scored for g in self.groups]
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Stage k ``[B, Hkv, T, D]``, v ``[B, Hkv, T, Dv]`` for this call's attention; returns them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending is not None:
            raise RuntimeError(
                "HeadwiseCache: the previous update was never attended; a head-wise cache works only on a "
                "model with attnkit.hf.apply(...) active (the handle that built it)"
            )
        if key_states.shape[1] != self.num_kv_heads:
            raise ValueError(f"HeadwiseCache layer built for {self.num_kv_heads} KV heads got keys "
                             f"{tuple(key_states.shape)}")
        if key_states.device.type == "meta":
            # what a head keeps depends on the positions' values (padding), which meta tensors lack
            raise ValueError("HeadwiseCache cannot run on the meta device (which tokens a head keeps depends on "
                             "values); run the model on the meta device without past_key_values=handle.cache()")
        B, _, T, _ = key_states.shape
        held = self._batch()
        if held and held != B:
            raise ValueError(f"HeadwiseCache holds a batch of {held} sequences but got keys of batch {B} "
                             f"{tuple(key_states.shape)}; use a fresh handle.cache() for a new batch")
        positions = None
        pending = []
        for i, (group, index, store) in enumerate(zip(self.groups, self._index, self._stores)):
            k = key_states.index_select(1, index) if len(group.kv_heads) < self.num_kv_heads else key_states
            v = value_states.index_select(1, index) if len(group.kv_heads) < self.num_kv_heads else value_states
            if store is not None:
                k, v = torch.cat([store[0], k], dim=2), torch.cat([store[1], v], dim=2)
            if not self._evicting[i]:
                pending.append([k, v, None, None])
                continue
            if positions is None:
                positions = torch.arange(self.seen, self.seen + T, device=key_states.device)
            pos = positions.expand(B, 1, T)
            scores = None
            if self._scored[i]:
                dtype = torch.promote_types(key_states.dtype, torch.float32)
                scores = torch.zeros(B, k.shape[1], T, dtype=dtype, device=key_states.device)
            if store is not None:
                old = store[2]
                pos = torch.cat([old, pos.expand(B, old.shape[1], T)], dim=2)
                if scores is not None:
                    scores = torch.cat([store[3], scores], dim=2)
            pending.append([k, v, pos, scores])
        self.pending = pending
        self.seen += T
        return key_states, value_states

    def commit(self, start: Tensor, calls: list | None = None) -> None:
        """Keep what the rules say later queries can use (``start`` ``[B]``: each row's first
        non-padding position; ``calls``: per group the :class:`attnkit.hf.policies.GroupCall` the
        attention function built, or None); the dropped tokens' tensors are released."""
        from .policies import GroupCall, SinkWindow

        self.start = start
        if not self.start_final:
            negative, padded = torch.stack([(start < 0).any(), (start != 0).any()]).tolist()
            self.start_final, self.plain = not negative, not negative and not padded
        stores = []
        for i, (group, (k, v, pos, scores)) in enumerate(zip(self.groups, self.pending)):
            if not self._evicting[i]:
                stores.append((k, v, None, None))
                continue
            rule = group.rule
            if self.plain and type(rule) is SinkWindow:
                # no padding: the slots are positions 0 .. sink-1 then one contiguous run up to the
                # last, so the keep below is the first `sink` and the last `window` slots (no sync)
                K = k.shape[2]
                if K > rule.sink + rule.window:
                    k, v, pos = (torch.cat([t[:, :, :rule.sink], t[:, :, K - rule.window:]], dim=2)
                                 for t in (k, v, pos))
                stores.append((k, v, pos, scores))
                continue
            call = calls[i] if calls is not None and calls[i] is not None else GroupCall(
                group.rule, None, group.kv_heads, None, None, pos, start.clamp(min=0), None, None, None, self.seen,
                scores, self.states[i], None)
            keep = group.rule.keep(pos, scores, call)
            if keep is None:
                stores.append((k, v, pos, scores))
                continue
            keep = keep & (pos >= 0)  # [B, 1|n, S']
            if keep.shape[1] != pos.shape[1]:
                pos = pos.expand(-1, keep.shape[1], -1)
            if bool(keep.all()):
                stores.append((k, v, pos, scores))
                continue
            # a row or head that keeps every slot still needs the others' dropped slots marked empty
            count = int(keep.sum(dim=2).max()) if keep.numel() else 0
            # kept slots first, in position order (a stable sort of "dropped"), then cut to the longest row / head
            order = torch.sort((~keep).to(torch.int8), dim=2, stable=True).indices[:, :, :count]  # [B, 1|n, K]
            slot_kept = keep.gather(2, order)
            new_pos = pos.gather(2, order).masked_fill(~slot_kept, -1)
            n = k.shape[1]
            idx = order[:, :, :, None]
            k = k.gather(2, idx.expand(-1, n, -1, k.shape[3])).contiguous()
            v = v.gather(2, idx.expand(-1, n, -1, v.shape[3])).contiguous()
            if scores is not None:
                scores = scores.gather(2, order.expand(-1, n, -1)).contiguous()
            stores.append((k, v, new_pos, scores))
        self._stores = stores
        self.pending = None

    # -- what transformers asks of a cache layer ---------------------------------------
    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        """The mask covers every original position (the attention function gathers the kept ones)."""
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # transformers 5.17 asks for it
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        # a streaming group has already dropped tokens: rolling back would need them (assisted decoding)
        raise ValueError(f"HeadwiseCache cannot be cropped (crop({tokens_to_remove}) was asked; e.g. by assisted "
                         "generation): its streaming heads have already evicted tokens; accepted: generation "
                         "without assistant_model / prompt lookup, or the model's own cache")

    def reset(self) -> None:
        self.seen, self.start, self.pending = 0, None, None
        self.start_final = self.plain = False
        self._stores = [None] * len(self.groups)
        self.states = [{} for _ in self.groups]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._stores = [None if s is None else tuple(None if t is None else t.index_select(0, beam_idx) for t in s)
                        for s in self._stores]
        if self.start is not None:
            self.start = self.start.index_select(0, beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.reorder_cache(torch.arange(self._batch(), device=self.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: Tensor) -> None:
        self.reorder_cache(torch.as_tensor(indices, device=self.device))

    def _batch(self) -> int:
        for s in self._stores:
            if s is not None:
                return s[0].shape[0]
        return 0

    def offload(self):  # the stores are not offloaded
        pass

    def prefetch(self):
        pass

    # -- inspection ---------------------------------------------------------------------
    def stores(self) -> list:
        """Per group: ``(keys [B, n, K, D], values [B, n, K, Dv], positions)``; positions are None for a
        group that keeps everything, ``[B, K]`` when shared by the group's heads, else ``[B, n, K]``."""
        return [None if s is None else (s[0], s[1], None if s[2] is None else
                                        (s[2][:, 0] if s[2].shape[1] == 1 else s[2])) for s in self._stores]

    def scores(self) -> list:
        """Per group: the kept slots' scores ``[B, n, K]`` (a ``scored`` rule), else None."""
        return [None if s is None else s[3] for s in self._stores]

    def nbytes(self, metadata: bool = False) -> int:
        """Bytes of the cached keys and values; with ``metadata``, also of the slots' positions and
        scores (an evicting group's bookkeeping: int64 per slot, per head when the heads differ,
        and a float32 score per slot and head for a scored rule)."""
        total = 0
        for s in self._stores:
            if s is None:
                continue
            parts = s if metadata else s[:2]
            total += sum(_held(t) for t in parts if t is not None)
        return total


def _held(t: Tensor) -> int:
    """Bytes a tensor holds: an expanded view (positions shared by rows or heads) holds its storage."""
    size = t.numel() * t.element_size()
    if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
        return min(size, t.untyped_storage().nbytes())
    return size


class HeadwiseCache(Cache):
    """A transformers ``Cache`` of :class:`HeadwiseLayer`, one per model layer, grouped by ``policy``.

    Built by ``handle.cache()``; pass it as ``past_key_values`` to ``model(...)`` or
    ``model.generate(...)``. ``nbytes()`` is the memory its keys and values hold."""

    def __init__(self, policy, num_layers: int, num_kv_heads: int):
        layers = [HeadwiseLayer(policy.plan(i, num_kv_heads), num_kv_heads, i) for i in range(num_layers)]
        super().__init__(layers=layers)
        self.policy = policy
        self._handle = None  # weakref to the attnkit.hf Handle that built it (set by Handle.cache)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        """transformers' cache hook: stage layer ``layer_idx``'s new k ``[B, Hkv, T, D]`` and v
        ``[B, Hkv, T, Dv]`` for this call's attention (the policy trims the stores after it)."""
        handle = self._handle() if self._handle is not None else None
        if handle is None or not handle.active:
            raise RuntimeError("HeadwiseCache: the attnkit.hf handle that built this cache is not applied any more; "
                               "a head-wise cache needs its method applied (handle.cache() of an active handle)")
        if not handle._calls:
            # another model (or a plain call of this layer) would attend only the new keys, silently
            raise ValueError(f"HeadwiseCache: this cache was built by the handle on {type(handle.model).__name__} "
                             f"({handle.policy!r}) but is used by a model that handle does not route; build the "
                             "cache with handle.cache() of the handle applied to the model that runs it")
        out = self.layers[layer_idx].update(key_states, value_states)
        handle._staged[layer_idx] = self.layers[layer_idx]  # the attention function attends it next
        return out

    def nbytes(self, metadata: bool = False) -> int:
        """Bytes of every layer's cached keys and values: what the policy keeps, as stored (with
        ``metadata``: plus the evicting groups' positions and scores)."""
        return sum(layer.nbytes(metadata) for layer in self.layers)
