"""The attention function attnkit registers in transformers' ``AttentionInterface``, and
``apply`` / :class:`Handle`, which route a model's attention through it.

transformers (5.17 .. 5.25) calls ``fn(module, query, key, value, attention_mask, scaling=...,
dropout=..., **kwargs)`` from every attention module whose config names the implementation;
query ``[B, Hq, T, D]``, key and value ``[B, Hkv, S, D]`` arrive with RoPE applied and the cache
updated; the function returns ``(out [B, T, Hq, Dv], None)``. The mask it gets is what the
``AttentionMaskInterface`` entry of the same name builds: attnkit registers transformers' own
``sdpa_mask``, so ``attention_mask`` is a boolean ``[B, 1, T, S]`` (True = attend; the model's
causal / sliding-window pattern and the padding of ``attention_mask``) or ``None`` where plain
causal attention over the given keys is exact (no padding; the window does not bite).
"""

from __future__ import annotations

import copy
import threading
import warnings
import weakref

import torch
from torch import Tensor

from .. import patterns as _patterns
from ..ops.softmax import attend
from .policies import GroupCall, Policy, SinkWindow, resolve

__all__ = ["IMPLEMENTATION", "apply", "Handle", "attention_forward"]

IMPLEMENTATION = "attnkit"
"""The name under which attnkit's attention function (and transformers' ``sdpa_mask`` for its
masks) is registered in transformers' ``AttentionInterface`` / ``AttentionMaskInterface``."""

# attention module -> the Handle that routes it (weak: a dropped model leaves nothing behind)
_ROUTED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


_DenseMask = _patterns.DenseMask  # a materialised mask as a pattern (moved to patterns: diffusion uses it too)


def _bool_mask(mask) -> Tensor | None:
    """transformers' 4D mask as booleans (True = attend); an additive float mask of 0 / very
    negative values is converted, any other bias refused (attnkit patterns are boolean)."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dim() != 4:
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"attnkit attention takes a 4D boolean attention_mask [B, 1, T, S] or None, got {got}")
    if mask.dtype == torch.bool:
        return mask
    allowed = mask == 0
    if not bool((allowed | (mask <= torch.finfo(mask.dtype).min / 2)).all()):
        raise ValueError("attnkit attention takes boolean masks (or additive 0 / -inf ones); this attention_mask "
                         "holds other biases, which no attnkit policy can represent")
    return allowed


def _first_real(handle, mask: Tensor | None, batch: int, device) -> Tensor:
    """Per row, the first non-padding position (``-1`` where none is known yet): from the 2D
    padding mask the model was called with, else the first key some query of this call may attend."""
    if handle._forward_start is not None and handle._forward_start.shape[0] == batch:
        return handle._forward_start.to(device)
    if mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    real = mask.any(dim=2)[:, 0]  # [B, S]
    has = real.any(dim=1)
    first = real.to(torch.int8).argmax(dim=1)
    return torch.where(has, first, torch.full_like(first, -1))


def _run(handle: "Handle", q: Tensor, k: Tensor, v: Tensor, allowed, scale, score_mod) -> Tensor:
    """attend with a dense mask ``allowed`` [B, 1, T, S], an attnkit pattern (keys at positions
    0 .. S-1, queries the last T), or plain causal when ``allowed`` is None."""
    if allowed is None or isinstance(allowed, _patterns.Pattern):
        pattern = "causal" if allowed is None else allowed
        return attend(q, k, v, pattern=pattern, scale=scale, score_mod=score_mod, backend=handle.backend)
    backend = handle.backend
    if backend == "auto":
        # a materialised mask is served best by SDPA; a score_mod only by the reference on a dense mask
        backend = "sdpa" if score_mod is None else "reference"
    return attend(q, k, v, pattern=_DenseMask(allowed), scale=scale, score_mod=score_mod, backend=backend)


def attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling=None,
                      dropout: float = 0.0, **kwargs):
    """transformers attention function: query ``[B, Hq, T, D]``, key/value ``[B, Hkv, S, D]``
    -> ``(out [B, T, Hq, Dv], None)``. Attends each KV-head group of the module's layer as the
    applied policy says (see :mod:`attnkit.hf.policies`)."""
    handle = _ROUTED.get(module)
    if handle is None:
        raise RuntimeError(
            f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) runs attn_implementation="
            f"{IMPLEMENTATION!r} but no attnkit.hf.apply(...) handle routes it (its config was set by hand, or "
            "copied from an applied model); apply a method to this model, or model.set_attn_implementation('sdpa')"
        )
    if dropout and module.training:
        raise ValueError(f"attnkit.hf attention has no dropout; got dropout={dropout} in training mode "
                         "(call model.eval(), or set the model's attention_dropout to 0)")
    if kwargs.get("s_aux") is not None:
        raise ValueError("attnkit.hf cannot serve learned attention sinks (s_aux, e.g. gpt-oss) yet")
    if kwargs.get("output_attentions"):
        raise ValueError("attnkit.hf attention does not return attention weights (output_attentions=True)")
    softcap = kwargs.get("softcap")
    score_mod = None
    if softcap is not None:
        def score_mod(score, b, h, q_pos, k_pos):  # Gemma 2's logit soft-capping
            return softcap * torch.tanh(score / softcap)

    mask = _bool_mask(attention_mask)
    layer_idx = module.layer_idx
    B, Hq, T, _ = query.shape
    Hkv = key.shape[1]
    cache_layer = handle._take_staged(layer_idx)
    if cache_layer is None:
        if handle.ruled(layer_idx, Hkv) and handle._sliding_cache_layer(layer_idx):
            # the model's own cache drops keys outside its window, so their positions (and a row's
            # sinks) are unknown here; the head-wise cache keeps what the policy needs
            raise ValueError(
                f"{handle.policy!r} on {type(module).__name__} layer {layer_idx} (a sliding-window layer) needs the "
                "head-wise cache: pass past_key_values=handle.cache() (cache=, its newer name) to the model or to "
                "generate()"
            )
        if not handle._warned and key.shape[2] != T and handle.evicts(layer_idx, Hkv):
            handle._warned = True
            warnings.warn(f"{handle.policy!r} runs on the model's own KV cache, which keeps every token: the outputs "
                          "are the policy's, but no memory is saved; pass past_key_values=handle.cache() (cache=, its "
                          "newer name)", stacklevel=2)
        out = _attend_given(handle, layer_idx, query, key, value, mask, scaling, score_mod, module)
    else:
        out = _attend_headwise(handle, cache_layer, query, mask, scaling, score_mod, Hkv, module)
    return out.transpose(1, 2).contiguous(), None


def _query_heads(kv_heads, group: int, device) -> Tensor:
    return (torch.tensor(kv_heads, device=device)[:, None] * group + torch.arange(group, device=device)).reshape(-1)


def _plain_rule(rule, mask, T: int, S: int, start: Tensor):
    """The rule as an attnkit pattern where no mask needs materialising: no padding or window mask
    (``mask`` None), every key from position 0 in the call (a prefill), every row starting at 0.
    Then the rule is ``patterns.sink_window`` (FlexAttention / the cuDNN band on CUDA). Else None."""
    if mask is not None or T != S:
        return None
    if start.device.type != "meta" and bool((start != 0).any()):  # meta tensors hold no values
        return None
    return _patterns.sink_window(rule.sink, rule.window)


def _attend_given(handle, layer_idx, query, key, value, mask, scaling, score_mod, module=None) -> Tensor:
    """Attention over the keys the model's own cache returned (a ``DynamicCache``, or none):
    every token from position 0 is there, so a policy's rule is a mask (no memory saved)."""
    B, Hq, T, _ = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    plan = handle.plan(layer_idx, Hkv)
    if len(plan) == 1 and plan[0].rule is None:
        return _run(handle, query, key, value, mask, scaling, score_mod)
    q_pos = torch.arange(S - T, S, device=query.device)
    k_pos = torch.arange(S, device=query.device)
    start = _first_real(handle, mask, B, query.device).clamp(min=0)
    base = mask  # None: plain causal
    out = query.new_empty(B, Hq, T, value.shape[3])
    g = Hq // Hkv
    for group in plan:
        qh = _query_heads(group.kv_heads, g, query.device)
        kh = torch.tensor(group.kv_heads, device=query.device)
        allowed = mask
        if group.rule is not None and type(group.rule) is not SinkWindow:
            rule = group.rule
            if rule.scored or rule.stateful:
                raise ValueError(
                    f"{handle.policy!r}: layer {layer_idx}'s rule {type(rule).__name__} decides what it keeps from "
                    "earlier calls, which the model's own cache cannot serve; pass past_key_values=handle.cache() "
                    "(cache=, its newer name) to the model or to generate()")
            call = GroupCall(rule, layer_idx, group.kv_heads, g, q_pos, k_pos.expand(1, 1, -1), start, mask, scaling,
                             score_mod, S, None, {}, handle.backend, module, every_position=True,
                             input_ids=handle._forward_ids)
            out[:, qh] = _rule_attend(rule, query[:, qh], key[:, kh], value[:, kh], call)
            continue
        if group.rule is not None:
            allowed = _plain_rule(group.rule, mask, T, S, start)
            if allowed is None:
                if base is None:
                    base = (k_pos <= q_pos[:, None]).expand(B, 1, T, S)
                allowed = base & group.rule.allowed(q_pos[None, None, :, None], k_pos[None, None, None, :],
                                                    start[:, None, None, None])
        out[:, qh] = _run(handle, query[:, qh], key[:, kh], value[:, kh], allowed, scaling, score_mod)
    return out


def _attend_headwise(handle, layer, query, mask, scaling, score_mod, Hkv, module=None) -> Tensor:
    """Attention over a :class:`HeadwiseLayer`'s staged groups; then the layer keeps what it must."""
    B, Hq, T, _ = query.shape
    S = layer.seen  # every original position, this call's included
    device = query.device
    start = layer.start
    if start is None or not layer.start_final:  # once every row's start is known it stays (no sync per call)
        found = _first_real(handle, mask, B, device)
        start = found if start is None else torch.where(start < 0, found, start)
    start_c = start.clamp(min=0)
    q_pos = torch.arange(S - T, S, device=device)
    g = Hq // Hkv
    single = len(layer.groups) == 1
    out = None if single else query.new_empty(B, Hq, T, layer.pending[0][1].shape[3])
    calls = None
    for i, (group, entry) in enumerate(zip(layer.groups, layer.pending)):
        k, v, pos, scores = entry
        rule = group.rule
        q = query if single else query[:, _query_heads(group.kv_heads, g, device)]
        if rule is None:  # a full group: positions 0 .. S-1, the model's mask as it is
            o = _run(handle, q, k, v, mask, scaling, score_mod)
        elif type(rule) is SinkWindow:  # the built-in path: a pattern where nothing needs materialising
            if T == 1 and mask is None and layer.plain:
                # a decode step without padding: the kept slots (see HeadwiseLayer.commit) plus the new
                # token are what the query sees, except the oldest window slot once the group is full
                # (index `sink`, one position too old for the new query); no mask, no host sync
                if k.shape[2] > rule.sink + rule.window:
                    k, v = (torch.cat([t[:, :, :rule.sink], t[:, :, rule.sink + 1:]], dim=2) for t in (k, v))
                allowed = None
            elif pos.shape[2] == S and (allowed := _plain_rule(rule, mask, T, S, start_c)) is not None:
                pass  # a first prefill without padding
            else:
                shared = pos[:, 0]  # [B, S'] (a sink + window group keeps one position set for its heads)
                valid = shared >= 0
                pc = shared.clamp(min=0)
                if mask is None:
                    base = pc[:, None, None, :] <= q_pos[None, None, :, None]
                else:
                    base = mask.gather(3, pc[:, None, None, :].expand(B, 1, T, pc.shape[1]))
                allowed = base & valid[:, None, None, :] & rule.allowed(
                    q_pos[None, None, :, None], pc[:, None, None, :], start_c[:, None, None, None])
            o = _run(handle, q, k, v, allowed, scaling, score_mod)
        else:  # a rule of the protocol: its own attend, then its keep at commit
            k_pos = pos if pos is not None else torch.arange(k.shape[2], device=device).expand(1, 1, -1)
            call = GroupCall(rule, layer.layer_idx, group.kv_heads, g, q_pos, k_pos, start_c, mask, scaling, score_mod,
                             S, scores, layer.states[i], handle.backend, module, every_position=pos is None,
                             input_ids=handle._forward_ids)
            o = _rule_attend(rule, q, k, v, call, entry)
            if calls is None:
                calls = [None] * len(layer.groups)
            calls[i] = call
        if single:
            out = o
        else:
            out[:, _query_heads(group.kv_heads, g, device)] = o
    layer.commit(start, calls)
    return out


def _rule_attend(rule, q, k, v, call, entry=None) -> Tensor:
    """``rule.attend``, checked; a ``scored`` rule's ``received`` is added to the candidates' scores
    (``entry``: the staged ``[k, v, pos, scores]`` of a head-wise cache group, updated in place)."""
    result = rule.attend(q, k, v, call)
    if not (rule.scored and call.scores is not None):
        if isinstance(result, tuple):
            why = ("its group keeps no scores (evicts = False)" if rule.scored
                   else "the rule is not scored (scored = False)")
            raise ValueError(f"{type(rule).__name__}.attend returned a tuple, but {why}: return the output "
                             "[B, n*g, T, Dv] alone")
        return result
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ValueError(f"{type(rule).__name__} is scored: its attend must return (out [B, n*g, T, Dv], "
                         f"received [B, n, S']), got {type(result).__name__}")
    out, received = result
    if received.shape != call.scores.shape:
        raise ValueError(f"{type(rule).__name__}.attend returned received {tuple(received.shape)}; expected "
                         f"[B, n, S'] = {list(call.scores.shape)}")
    call.scores = call.scores + received.to(call.scores.dtype)
    if entry is not None:
        entry[3] = call.scores
    return out


def _register() -> None:
    """Register attnkit's attention function and mask builder with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def _attention_modules(model) -> list:
    """The self-attention modules transformers routes through ``AttentionInterface``: they carry
    ``layer_idx`` and ``is_causal``."""
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "is_causal")
            and isinstance(getattr(m, "layer_idx"), int)]


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _all_configs(model) -> list:
    seen, configs = set(), []
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and id(c) not in seen and hasattr(c, "_attn_implementation_internal"):
            seen.add(id(c))
            configs.append(c)
    return configs


class Handle:
    """What :func:`apply` returns: the policy in force on one model.

    Use as a context manager (``with attnkit.hf.apply(model, "streaming"): ...``) or keep it and
    call :meth:`remove`, which restores the model's attention implementation (every config's
    ``_attn_implementation``, exactly as it was). ``cache()`` builds the head-wise KV cache the
    policy asks for (:class:`attnkit.hf.HeadwiseCache`); a cache serves only this handle's model
    and one batch. Only the causal decoder is routed (a vision tower keeps its attention).

    A ``copy.deepcopy`` (or ``torch.save`` / ``torch.load``) of an applied model runs the same
    policy through its own handle: ``Handle.of(copy)`` returns it, its ``remove()`` restores the copy."""

    def __init__(self, model, policy: Policy, backend: str):
        self.model = model
        self.policy = policy
        self.backend = backend
        config = _text_config(model)
        self.num_layers = int(config.num_hidden_layers)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        self._plans: dict = {}
        self._staged: dict = {}
        self._modules: list = []
        self._saved: list = []
        self._hooks: list = []
        self._forward_cache = None
        self._forward_start = None
        self._forward_ids = None
        self._warned = False
        self._calls = 0  # forwards of the routed model in progress (its head-wise caches may update)
        self.active = False

    def plan(self, layer_idx: int, num_kv_heads: int):
        """The policy's groups of KV heads for this layer (``Policy.plan``), computed once per layer."""
        key = (layer_idx, num_kv_heads)
        if key not in self._plans:
            self._plans[key] = self.policy.plan(layer_idx, num_kv_heads)
        return self._plans[key]

    def evicts(self, layer_idx: int, num_kv_heads: int) -> bool:
        """Whether some KV head of this layer keeps fewer than all tokens."""
        # the policy's own answer first: Full (the common case) needs no per-layer lookup per call
        return self.policy.evicts and any(g.rule is not None and g.rule.evicts
                                          for g in self.plan(layer_idx, num_kv_heads))

    def ruled(self, layer_idx: int, num_kv_heads: int) -> bool:
        """Whether some KV head of this layer has a rule (not plain full attention): its keys' positions matter."""
        return self.policy.evicts and any(g.rule is not None for g in self.plan(layer_idx, num_kv_heads))

    def cache(self):
        """A fresh :class:`HeadwiseCache` for this model and policy (``past_key_values=``)."""
        from .cache import HeadwiseCache

        if not self.active:
            raise RuntimeError("this attnkit.hf handle was removed; apply the method again to build a cache")
        cache = HeadwiseCache(self.policy, self.num_layers, self.num_kv_heads)
        cache._handle = weakref.ref(self)
        return cache

    def _see_cache(self, module, args, kwargs):
        """Forward pre-hook on the model: remember which cache this forward runs with."""
        from .cache import HeadwiseCache

        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        tokens = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
        if (isinstance(cache, HeadwiseCache) and isinstance(tokens, Tensor) and tokens.dim() >= 2
                and tokens.shape[1] == 0 and cache.get_seq_length() > 0):
            # generate() feeds only the tokens past the cached ones: a new prompt no longer than the
            # cache leaves none (transformers' own caches then fail deep in a reshape)
            raise ValueError(f"the HeadwiseCache already holds {cache.get_seq_length()} tokens and this call brings "
                             "no new ones (generate() passes only the prompt past the cached tokens); to continue, "
                             "pass the whole sequence so far; for a new prompt, a fresh handle.cache()")
        if self._calls == 0:
            self._staged.clear()  # what an interrupted call staged is not this call's
        self._calls += 1
        self._forward_cache = weakref.ref(cache) if cache is not None else None
        # each row's first non-padding position, from the 2D padding mask (the 4D mask cannot
        # say it once a window hides a row's first tokens from this call's queries)
        padding = kwargs.get("attention_mask")
        self._forward_start = None
        ids = kwargs.get("input_ids", args[0] if args else None)
        # the call's token ids [B, T] for rules that read them (Task-KV's separators); None for embeddings
        self._forward_ids = ids if isinstance(ids, Tensor) and ids.dim() == 2 and not ids.is_floating_point() else None
        if isinstance(padding, Tensor) and padding.dim() == 2:
            real = padding != 0
            first = real.to(torch.int8).argmax(dim=1)
            self._forward_start = torch.where(real.any(dim=1), first, torch.full_like(first, -1))

    def _forget_call(self, module, args, kwargs, output):
        """Forward hook (also when the forward raised): what ``_see_cache`` recorded belongs to that call only."""
        self._calls = max(0, self._calls - 1)
        self._forward_cache = self._forward_start = self._forward_ids = None

    def _sliding_cache_layer(self, layer_idx: int) -> bool:
        """Whether the model's own cache of this forward keeps only a window at this layer."""
        cache = self._forward_cache() if self._forward_cache is not None else None
        is_sliding = getattr(cache, "is_sliding", None)
        return bool(is_sliding) and layer_idx < len(is_sliding) and bool(is_sliding[layer_idx])

    def _take_staged(self, layer_idx: int):
        """The head-wise cache layer that staged keys for this layer's current call, if any."""
        return self._staged.pop(layer_idx, None)

    def remove(self) -> None:
        """Restore the model's own attention. Removing twice raises."""
        if not self.active:
            raise RuntimeError("attnkit.hf: this handle was already removed (nothing is applied)")
        with _LOCK:
            for m in self._modules:
                _ROUTED.pop(m, None)
            for config, value in self._saved:
                config._attn_implementation_internal = value
            for hook in self._hooks:
                hook.remove()
            self.active = False

    @staticmethod
    def of(model) -> "Handle | None":
        """The active handle routing ``model`` (e.g. the one a ``copy.deepcopy`` of an applied model
        got), or None."""
        with _LOCK:
            for m in _attention_modules(model):
                if m in _ROUTED:
                    return _ROUTED[m]
        return None

    def __deepcopy__(self, memo):
        # reached when an applied model is deep-copied (its forward hooks are bound to this handle):
        # the copy runs the same policy through its own handle, which Handle.of(copy) returns
        new = copy.copy(self)
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            if name not in ("_forward_cache", "_forward_start", "_forward_ids", "_staged", "_calls"):
                setattr(new, name, copy.deepcopy(value, memo))
        new._staged, new._forward_cache, new._forward_start, new._calls = {}, None, None, 0
        new._forward_ids = None
        new._route_copy()
        return new

    def __getstate__(self):
        # pickled with an applied model (torch.save(model)): what belongs to a call in progress stays
        state = dict(self.__dict__)
        state.update(_staged={}, _forward_cache=None, _forward_start=None, _forward_ids=None, _calls=0)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._route_copy()

    def _route_copy(self) -> None:
        """A copied or unpickled active handle routes the copied attention modules."""
        if self.active:
            with _LOCK:
                for m in self._modules:
                    _ROUTED[m] = self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.active:
            self.remove()
        return False

    def __repr__(self):
        state = "active" if self.active else "removed"
        return f"Handle({type(self.model).__name__}, {self.policy!r}, {state})"


def apply(model, method="full", *, backend: str = "auto", **options) -> Handle:
    """Route ``model``'s attention through attnkit under ``method``.

    Args:
        model: a transformers ``PreTrainedModel`` with causal self-attention routed through
            ``AttentionInterface`` (Llama, Qwen2, Mistral, Gemma, Phi-3, ...).
        method: a :class:`attnkit.hf.policies.Policy`, or a name (``"full"``, ``"streaming"``,
            ``"headwise"``; ``"hf-"`` prefixed card names too) with its ``options``
            (e.g. ``sink=4, window=256``).
        backend: ``attnkit.attend``'s backend (``"auto"``: SDPA where a mask is materialised).

    Returns:
        Handle: a context manager; ``remove()`` undoes it. Applying to a model that is already
        routed raises ``RuntimeError``.
    """
    from ..ops.softmax.dispatch import BACKENDS

    policy = resolve(method, options)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")
    try:
        from transformers import PreTrainedModel
    except ImportError as err:  # pragma: no cover - the package import already checked
        raise ImportError('attnkit.hf needs transformers: pip install "attnkit[hf]"') from err
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if not hasattr(model, "set_attn_implementation"):
        raise ValueError(f"{type(model).__name__} has no set_attn_implementation (transformers >= 5.17 needed)")
    if not type(model)._can_set_attn_implementation():
        raise ValueError(
            f"{type(model).__name__} does not route its attention through transformers' AttentionInterface "
            "(its modeling code calls its own attention), so attnkit cannot replace it"
        )
    config = _text_config(model)
    if getattr(config, "alibi", False) or getattr(config, "position_embedding_type", None) == "alibi":
        raise ValueError(f"{type(model).__name__} adds ALiBi position biases to its attention scores (config.alibi="
                         "True), which no attnkit.hf policy represents; accepted: models with boolean masks (RoPE or "
                         "learned positions)")
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention modules with layer_idx and is_causal "
                         "(attnkit.hf serves decoder self-attention routed through AttentionInterface)")
    not_causal = sorted({type(m).__name__ for m in modules if m.is_causal is not True})
    if not_causal:
        raise ValueError(f"{type(model).__name__}: attention modules {not_causal} are not causal (is_causal=False: "
                         "an encoder or bidirectional attention); attnkit.hf methods need causal decoder self-attention")
    with _LOCK:
        routed = [m for m in modules if m in _ROUTED]
        if routed:
            raise RuntimeError(f"{type(model).__name__} already has an attnkit.hf method applied "
                               f"({_ROUTED[routed[0]].policy!r}); remove() that handle first "
                               "(attnkit.hf.Handle.of(model) returns it)")
        handle = Handle(model, policy, backend)
        policy.bind(model)
        policy.check(handle.num_layers, handle.num_kv_heads)
        for layer_idx in range(handle.num_layers):  # a policy's bad rule fails here, not mid-forward
            handle.plan(layer_idx, handle.num_kv_heads)
        layer_ids = sorted({m.layer_idx for m in modules})
        if layer_ids[-1] >= handle.num_layers:
            raise ValueError(f"attention module layer_idx {layer_ids[-1]} >= num_hidden_layers {handle.num_layers}")
        _register()
        handle._saved = [(c, c._attn_implementation_internal) for c in _all_configs(model)]
        model.set_attn_implementation(IMPLEMENTATION)
        not_set = [c for c, _ in handle._saved if c._attn_implementation != IMPLEMENTATION
                   and any(getattr(m, "config", None) is c for m in modules)]
        if not_set:
            for config, value in handle._saved:
                config._attn_implementation_internal = value
            raise ValueError(f"{type(model).__name__}: set_attn_implementation({IMPLEMENTATION!r}) did not reach the "
                             "attention modules' config; this model cannot be routed through AttentionInterface")
        # set_attn_implementation reaches every sub-config: a vision tower's (bidirectional, not routed)
        # attention keeps its own; only the routed decoder and the models that contain it switch
        routed = set(modules)
        keep = {id(getattr(m, "config", None)) for m in modules}
        keep |= {id(sub.config) for sub in model.modules()
                 if getattr(sub, "config", None) is not None and any(x in routed for x in sub.modules())}
        for config, value in handle._saved:
            if id(config) not in keep:
                config._attn_implementation_internal = value
        for m in modules:
            _ROUTED[m] = handle
        handle._modules = modules
        # on the model and every transformers model inside it (the base model can be called alone)
        for sub in model.modules():
            if isinstance(sub, PreTrainedModel):
                handle._hooks.append(sub.register_forward_pre_hook(handle._see_cache, with_kwargs=True))
                handle._hooks.append(sub.register_forward_hook(handle._forget_call, with_kwargs=True,
                                                               always_call=True))
        handle.active = True
    return handle
