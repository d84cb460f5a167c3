"""Capture attention weights and per-head outputs from a transformers model, layer by layer,
without changing what the model computes.

How: :class:`capture` switches the model to an attention implementation of its own name
(``attnkit_capture_sdpa`` or ``attnkit_capture_eager``) that calls the implementation the model
had (``sdpa`` or the model file's ``eager_attention_forward``) with the very arguments it gets,
and builds its masks with that implementation's own mask function. The model's outputs are
therefore bit-identical; after the base call, the hook sees one :class:`LayerCall` per layer:

- ``call.query [B, Hq, T, D]``, ``call.key`` / ``call.value [B, Hkv, S, D]`` (RoPE applied, cache
  updated: exactly what the attention function got);
- ``call.output [B, T, Hq, Dv]``: the per-head attention outputs before ``o_proj``;
- ``call.weights(heads)``: the post-softmax probabilities ``[B, h, T, S]`` in float32,
  ``softmax(q k^T * scaling (+ softcap) + mask)`` with the model's own mask (causal, sliding
  window, padding), computed when asked, one head at a time, and not kept;
- ``call.attend(weights)``: ``weights @ v`` as head outputs, for interventions.

The hook may return a replacement for ``call.output`` (activation patching, attention edits);
``None`` keeps the model's. Memory: nothing is kept between layers unless the hook keeps it,
so a hook that reduces each layer's ``[B, H, T, S]`` to a few numbers streams (4k tokens on
the subject: ``peak_rss_mib`` in ``benchmarks/results/cpu/analyze-sinks-4k.json``).

Example::

    from attnkit.analysis.hf import capture
    shares = {}
    with capture(model, lambda call: shares.__setitem__(call.layer, call.weights()[..., 0].mean())):
        logits = model(ids).logits          # the same logits as without the capture
"""

from __future__ import annotations

import sys
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

__all__ = ["LayerCall", "capture", "model_shape", "check_layer", "check_heads", "attention_weights"]

_PREFIX = "attnkit_capture_"
_BASES = ("sdpa", "eager")
# attention module -> the active capture session (weak: a dropped model leaves nothing behind)
_SESSIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_shape(model) -> tuple[int, int, int]:
    """``(num_layers, num_query_heads, num_kv_heads)`` of a transformers causal LM."""
    config = _text_config(model)
    heads = int(config.num_attention_heads)
    return int(config.num_hidden_layers), heads, int(getattr(config, "num_key_value_heads", None) or heads)


def check_layer(layer, num_layers: int, name: str = "layer") -> int:
    """``layer`` as an int in ``[0, num_layers)`` (negative counts from the end), else ValueError."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not -num_layers <= layer < num_layers:
        raise ValueError(f"{name} must be an integer in [0, {num_layers}) (or [-{num_layers}, 0) from the end), "
                         f"got {layer!r}")
    return layer % num_layers


def check_heads(heads, num_heads: int, name: str = "heads") -> list[int]:
    """``heads`` (None: all, an int, or a non-empty sequence of ints in ``[0, num_heads)``) as a list."""
    if heads is None:
        return list(range(num_heads))
    items = [heads] if isinstance(heads, int) and not isinstance(heads, bool) else heads
    try:
        items = list(items)
    except TypeError:
        raise ValueError(f"{name} must be None, an integer or a sequence of integers in [0, {num_heads}), "
                         f"got {heads!r}") from None
    if not items:
        raise ValueError(f"{name} must not be empty; accepted: None (all {num_heads} heads) or integers in "
                         f"[0, {num_heads})")
    for h in items:
        if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < num_heads:
            raise ValueError(f"{name} must hold integers in [0, {num_heads}) (query heads), got {h!r} in {heads!r}")
    return items


@dataclass
class LayerCall:
    """One attention call of one layer, as the model made it (see the module docstring)."""

    layer: int
    module: object
    query: Tensor  # (B, Hq, T, D)
    key: Tensor  # (B, Hkv, S, D)
    value: Tensor  # (B, Hkv, S, Dv)
    attention_mask: object  # what the implementation got: None, bool [B, 1, T, S] (True = attend) or additive float
    scaling: float
    output: Tensor  # (B, T, Hq, Dv): the model's per-head outputs, before o_proj
    softcap: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_heads(self) -> int:
        return self.query.shape[1]

    @property
    def group(self) -> int:
        """Query heads per KV head (GQA): query head ``h`` reads KV head ``h // group``."""
        return self.query.shape[1] // self.key.shape[1]

    def allowed(self) -> Tensor:
        """Which keys each query may attend: bool ``[B, 1, T, S]`` (the model's mask; plain causal
        over the last ``T`` of ``S`` positions where the implementation got no mask)."""
        B, _, T, _ = self.query.shape
        S = self.key.shape[2]
        mask = self.attention_mask
        if mask is None:
            q_pos = torch.arange(S - T, S, device=self.query.device)
            return (torch.arange(S, device=self.query.device) <= q_pos[:, None]).expand(B, 1, T, S)
        if mask.dtype == torch.bool:
            return mask
        return mask > torch.finfo(mask.dtype).min / 2

    def scores(self, head: int) -> Tensor:
        """Pre-softmax scores of one query head ``[B, T, S]`` in float32, masked keys at -inf."""
        check_heads([head], self.num_heads, "head")
        q = self.query[:, head].float()  # (B, T, D)
        k = self.key[:, head // self.group].float()  # (B, S, D)
        s = (q @ k.transpose(-1, -2)) * self.scaling
        if self.softcap is not None:
            s = self.softcap * torch.tanh(s / self.softcap)
        mask = self.attention_mask
        if mask is None or mask.dtype == torch.bool:
            s = s.masked_fill(~self.allowed()[:, 0], float("-inf"))
        else:
            s = s + mask[:, 0].float()
        return s

    def weights(self, heads=None) -> Tensor:
        """Post-softmax attention ``[B, h, T, S]`` (float32) of ``heads`` (None: all query heads).
        Rows with no allowed key (padding queries) are 0."""
        heads = check_heads(heads, self.num_heads)
        B, _, T, _ = self.query.shape
        out = torch.empty(B, len(heads), T, self.key.shape[2], dtype=torch.float32, device=self.query.device)
        for i, h in enumerate(heads):  # one head at a time: the temporaries stay [B, T, S]
            torch.softmax(self.scores(h), dim=-1, out=out[:, i])
        return out.nan_to_num_(0.0)

    def attend(self, weights: Tensor, heads=None) -> Tensor:
        """Head outputs ``[B, T, Hq, Dv]`` with ``heads``' attention replaced by ``weights [B, h, T, S]``
        (the other heads keep the model's outputs)."""
        heads = check_heads(heads, self.num_heads)
        B, _, T, _ = self.query.shape
        if tuple(weights.shape) != (B, len(heads), T, self.key.shape[2]):
            raise ValueError(f"weights must be [B, h, T, S] = {[B, len(heads), T, self.key.shape[2]]}, "
                             f"got {list(weights.shape)}")
        out = self.output.clone()
        kv = torch.tensor([h // self.group for h in heads], device=self.value.device)
        v = self.value[:, kv].float()  # (B, h, S, Dv)
        out[:, :, heads] = (weights.float() @ v).transpose(1, 2).to(out.dtype)
        return out


def _base_function(base: str, module) -> Callable:
    if base == "sdpa":
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    # eager lives in each model's own file (its own repeat_kv, dtype handling)
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as eager
    return eager


def _make_forward(base: str) -> Callable:
    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        out, weights = _base_function(base, module)(module, query, key, value, attention_mask, scaling=scaling,
                                                    dropout=dropout, **kwargs)
        session = _SESSIONS.get(module)
        if session is None or (session.layers is not None and module.layer_idx not in session.layers):
            return out, weights
        call = LayerCall(module.layer_idx, module, query, key, value, attention_mask,
                         float(scaling if scaling is not None else module.scaling), out, kwargs.get("softcap"),
                         {"sliding_window": kwargs.get("sliding_window")})
        replaced = session.hook(call)
        if replaced is not None:
            if not isinstance(replaced, Tensor) or replaced.shape != out.shape:
                got = tuple(replaced.shape) if isinstance(replaced, Tensor) else type(replaced).__name__
                raise ValueError(f"a capture hook must return None or head outputs {tuple(out.shape)} "
                                 f"[B, T, Hq, Dv], got {got}")
            out = replaced.to(out.dtype)
        return out, weights

    forward.__name__ = f"{_PREFIX}{base}_forward"
    return forward


def _register(base: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    name = _PREFIX + base
    AttentionInterface.register(name, _make_forward(base))
    # the mask builder of the base implementation: the attention function gets exactly its masks
    AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping[base])
    return name


def _attention_modules(model) -> list:
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "is_causal")
            and isinstance(getattr(m, "layer_idx"), int)]


class capture:
    """Context manager: while active, every attention call of ``model``'s decoder goes to
    ``hook(call: LayerCall) -> None | Tensor`` after the model's own attention ran.

    Args:
        model: a transformers ``PreTrainedModel`` whose attention runs through ``AttentionInterface``
            with ``attn_implementation`` ``"sdpa"`` or ``"eager"``.
        hook: called once per layer and forward; return ``None`` or replacement head outputs
            ``[B, T, Hq, Dv]``.
        layers: the layers to hook (None: all); other layers run untouched.
    """

    def __init__(self, model, hook: Callable, *, layers=None):
        try:
            from transformers import PreTrainedModel
        except ImportError as err:  # pragma: no cover - the package import already checked
            raise ImportError('attnkit analyze needs transformers: pip install "attnkit[hf]"') from err
        if not isinstance(model, PreTrainedModel):
            raise ValueError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
        if not callable(hook):
            raise ValueError(f"hook must be callable (LayerCall -> None | Tensor), got {type(hook).__name__}")
        num_layers = model_shape(model)[0]
        self.layers = None if layers is None else {check_layer(x, num_layers, "layers") for x in
                                                   ([layers] if isinstance(layers, int) else layers)}
        if self.layers is not None and not self.layers:
            raise ValueError(f"layers must not be empty; accepted: None (all {num_layers}) or layer indices")
        self.model, self.hook = model, hook
        self._saved: list = []
        self._modules: list = []

    def __enter__(self):
        model = self.model
        with _LOCK:
            if any(m in _SESSIONS for m in _attention_modules(model)):
                raise RuntimeError(f"{type(model).__name__} is already being captured; nest hooks in one capture")
        base = _text_config(model)._attn_implementation
        if base not in _BASES:
            raise ValueError(f"capture runs on top of attn_implementation 'sdpa' or 'eager'; {type(model).__name__} "
                             f"runs {base!r} (an attnkit.hf method applied? remove its handle first; else "
                             "model.set_attn_implementation('sdpa'))")
        modules = _attention_modules(model)
        if not modules:
            raise ValueError(f"{type(model).__name__} has no attention modules with layer_idx (capture serves decoder "
                             "self-attention routed through AttentionInterface)")
        with _LOCK:
            if any(m in _SESSIONS for m in modules):
                raise RuntimeError(f"{type(model).__name__} is already being captured; nest hooks in one capture")
            name = _register(base)
            seen: set = set()
            for m in model.modules():
                c = getattr(m, "config", None)
                if c is not None and id(c) not in seen and hasattr(c, "_attn_implementation_internal"):
                    seen.add(id(c))
                    self._saved.append((c, c._attn_implementation_internal))
            model.set_attn_implementation(name)
            for m in modules:
                _SESSIONS[m] = self
            self._modules = modules
        return self

    def __exit__(self, *exc):
        with _LOCK:
            for m in self._modules:
                _SESSIONS.pop(m, None)
            for config, value in self._saved:
                config._attn_implementation_internal = value
            self._modules, self._saved = [], []
        return False


@torch.no_grad()
def attention_weights(model, input_ids: Tensor, *, layers=None, heads=None, **forward_kwargs) -> dict[int, Tensor]:
    """Every asked layer's attention ``{layer: [B, h, T, T]}`` (float32) on ``input_ids [B, T]``.
    Keeps every layer's matrix: for long inputs, reduce in a :class:`capture` hook instead."""
    kept: dict[int, Tensor] = {}
    num_heads = model_shape(model)[1]
    heads = check_heads(heads, num_heads)
    with capture(model, lambda call: kept.__setitem__(call.layer, call.weights(heads)), layers=layers):
        model(input_ids, **forward_kwargs)
    return kept
