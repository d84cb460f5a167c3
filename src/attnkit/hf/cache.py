"""A head-wise KV cache for transformers models: each group of KV heads keeps only the tokens
its policy rule can still use, so the memory of dropped tokens is released.

Layout per model layer (:class:`HeadwiseLayer`), one entry per :class:`attnkit.hf.policies.Group`:

- a full group: keys and values ``[B, n_full, S, D]``, every token seen (positions ``0 .. S-1``);
- a sink + window group: keys and values ``[B, n_stream, K, D]`` with ``K <= sink + window``
  and the original position of each slot ``[B, K]`` (``-1``: an empty slot of a row that has
  kept fewer tokens, e.g. a left-padded row early in the sequence). Slots are trimmed after
  every call (``commit``), so the tensors of the evicted tokens are freed.

Cached keys carry RoPE from their original positions (the model rotated them before the
update), so attention over a kept subset needs only the positions, for the mask.

The cache works together with the attention function of :func:`attnkit.hf.apply`: ``update``
stages this call's candidates (the kept tokens plus the new ones) for the attention function,
which attends each group on them and then calls :meth:`HeadwiseLayer.commit`. Build one with
``handle.cache()`` and pass it to the model as ``past_key_values``.
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

    def __init__(self, groups: tuple[Group, ...], num_kv_heads: int, **kwargs):
        super().__init__(**kwargs)
        self.groups = groups
        self.num_kv_heads = num_kv_heads
        self.seen = 0
        self.start: Tensor | None = None  # [B] first non-padding position per row; -1 while unknown
        self._stores: list = [None] * len(groups)  # per group: (keys, values, positions [B, K] or None)
        self.pending: list | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self._index = [torch.tensor(g.kv_heads, device=self.device) for g in self.groups]
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
        positions = torch.arange(self.seen, self.seen + T, device=key_states.device)
        pending = []
        for group, index, store in zip(self.groups, self._index, self._stores):
            k = key_states.index_select(1, index) if len(group.kv_heads) < self.num_kv_heads else key_states
            v = value_states.index_select(1, index) if len(group.kv_heads) < self.num_kv_heads else value_states
            if group.rule is None:
                if store is not None:
                    k, v = torch.cat([store[0], k], dim=2), torch.cat([store[1], v], dim=2)
                pending.append((k, v, None))
            else:
                pos = positions.expand(B, T)
                if store is not None:
                    k, v = torch.cat([store[0], k], dim=2), torch.cat([store[1], v], dim=2)
                    pos = torch.cat([store[2], pos], dim=1)
                pending.append((k, v, pos))
        self.pending = pending
        self.seen += T
        return key_states, value_states

    def commit(self, start: Tensor) -> None:
        """Keep what later queries can use (``start`` ``[B]``: each row's first non-padding
        position); the dropped tokens' tensors are released."""
        self.start = start
        last = self.seen - 1
        stores = []
        for group, (k, v, pos) in zip(self.groups, self.pending):
            if group.rule is None:
                stores.append((k, v, None))
                continue
            keep = group.rule.keep(pos, start[:, None], last) & (pos >= 0)  # [B, S']
            count = int(keep.sum(dim=1).max()) if keep.numel() else 0
            if count == pos.shape[1]:
                stores.append((k, v, pos))
                continue
            # kept slots first, in position order (a stable sort of "dropped"), then cut to the longest row
            order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :count]  # [B, K]
            slot_kept = keep.gather(1, order)
            new_pos = pos.gather(1, order).masked_fill(~slot_kept, -1)
            idx = order[:, None, :, None]
            k = k.gather(2, idx.expand(-1, k.shape[1], -1, k.shape[3])).contiguous()
            v = v.gather(2, idx.expand(-1, v.shape[1], -1, v.shape[3])).contiguous()
            stores.append((k, v, new_pos))
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
        self._stores = [None] * len(self.groups)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._stores = [None if s is None else (s[0].index_select(0, beam_idx), s[1].index_select(0, beam_idx),
                                                None if s[2] is None else s[2].index_select(0, beam_idx))
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
        """Per group: ``(keys [B, n, K, D], values [B, n, K, Dv], positions [B, K] or None)``."""
        return list(self._stores)

    def nbytes(self) -> int:
        """Bytes of the cached keys and values (positions not counted)."""
        return sum(s[0].numel() * s[0].element_size() + s[1].numel() * s[1].element_size()
                   for s in self._stores if s is not None)


class HeadwiseCache(Cache):
    """A transformers ``Cache`` of :class:`HeadwiseLayer`, one per model layer, grouped by ``policy``.

    Built by ``handle.cache()``; pass it as ``past_key_values`` to ``model(...)`` or
    ``model.generate(...)``. ``nbytes()`` is the memory its keys and values hold."""

    def __init__(self, policy, num_layers: int, num_kv_heads: int):
        layers = [HeadwiseLayer(policy.plan(i, num_kv_heads), num_kv_heads) for i in range(num_layers)]
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

    def nbytes(self) -> int:
        """Bytes of every layer's cached keys and values: what the policy keeps, as stored."""
        return sum(layer.nbytes() for layer in self.layers)
