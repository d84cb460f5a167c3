"""DuoAttention (Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and
Streaming Heads", arXiv 2410.10819): find which KV heads need the whole context (retrieval heads)
and which do with sink + recent tokens (streaming heads), then serve the model with a head-wise cache.

**Identification** (:func:`identify`). The model is frozen; the only parameters are gates
``alpha [L, Hkv]`` in ``[0, 1]``, one per KV head (its query heads share it, GQA). In the gated
forward every attention layer returns, per query head ``h`` of KV head ``g(h)``::

    out_h = alpha[l, g(h)] * full_h + (1 - alpha[l, g(h)]) * stream_h

``stream_h``: causal attention restricted to the first ``sink`` and the last ``window`` tokens;
``full_h``: full causal attention. As in the official code (mit-han-lab/duo-attention,
``llama_duo_attention_forward_two_way``), ``full_h`` is by default the *original* model's
attention output at that layer (a teacher pass, no gradient), while ``stream_h`` attends the gated
model's own queries, keys and values (``full_from="teacher"``); ``full_from="self"`` computes both
branches on the gated activations. The loss distils the original model's final hidden states
(after the final norm, the base model's ``last_hidden_state``) at the supervised positions, the
question and answer that end each synthetic prompt, plus an L1 penalty::

    loss = mean over supervised positions of mean_c (h - h_original)^2  +  reg_weight * mean(|alpha|)

Official settings, kept as defaults: gates start at 1, AdamW (lr 0.02, no weight decay), 2000
steps of batch 1, ``reg_weight`` 0.05, a learning rate that ramps up over the first fifth of the
steps and down over the last fifth (floor 0.1 x), gates clamped to ``[0, 1]`` after every step (the
forward clamps too). The official training script uses sink 128 / window 256 while training and
sink 64 / window 256 when deployed; attnkit trains with the deployment sizes (default 64 / 256).
Data: the official code inserts 10 passkeys of 32 words into book text at lengths 1k-32k and
asks for all of them; here the byte-level prompts of :mod:`attnkit.tasks.longcontext`, multi-key
retrieval (1 to ``max_pairs`` named 5-digit keys in training stdlib text, one asked), at ``num_lengths`` lengths from ``min_length`` to
``max_length``.

**Pattern** (:class:`DuoPattern`): the gates, the identity of the model they were found on and the
settings; saved as the official ``full_attention_heads.tsv`` (one row per layer, one tab-separated
column per KV head) with attnkit's metadata on ``#`` comment lines, which ``numpy.loadtxt``
skips, so either side reads the other's file.

**Deployment** (:class:`Duo`, ``attnkit.hf.apply(model, "duo", pattern=..., sparsity=0.5)``): the
``sparsity`` fraction of KV heads with the smallest gates streams (sink + window), the rest keep
every token; the head-wise cache (:class:`attnkit.hf.HeadwiseCache`) then stores a streaming
head's ``sink + window`` tokens only, in chunked prefill and decode.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .._checks import positive_int
from .._console import write_atomic
from .policies import Headwise, SinkWindow, _sink_count

__all__ = ["DuoPattern", "Duo", "GatedAttention", "identify", "duo_batch", "model_identity", "IMPLEMENTATION",
           "CPU_SETTINGS", "MIN_LENGTH", "add_identify_parser"]

IMPLEMENTATION = "attnkit_duo"
"""The name of the gated attention function (and of transformers' ``sdpa_mask`` for its masks) in
transformers' ``AttentionInterface`` / ``AttentionMaskInterface`` while :class:`GatedAttention` is active."""

FORMAT = "attnkit-duo-pattern"
PATTERN_FILE = "full_attention_heads.tsv"  # the official folder's file name

#: a reduced identification for a CPU (a first look at a model; ``--preset cpu``): about 25 s for the
#: 12-layer subject's shape on this project's 2-core CPU (0.36 s a step at 512 tokens, 0.8 s at 1024)
CPU_SETTINGS = dict(steps=40, batch_size=1, min_length=512, max_length=1024, num_lengths=2)

#: the shortest prompt :func:`duo_batch` builds (one named key, its question and answer, 16 bytes of haystack)
MIN_LENGTH = 120

# module -> its GatedAttention (weak: a dropped model leaves nothing behind)
_GATED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


# -- argument checks ----------------------------------------------------------------------------


def _fraction(value, name: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"duo: {name} must be a number in [0, 1] ({what}), got {value!r}")
    return float(value)


def _positive_number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"duo: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def _sink_window(sink, window) -> None:
    _sink_count(sink, "duo")
    positive_int(window, "duo: window")


# -- the model's identity -----------------------------------------------------------------------


def model_identity(model) -> dict:
    """What a pattern records about the model it was found on (from its text config):
    ``model_type``, ``num_layers``, ``num_query_heads``, ``num_kv_heads``, ``hidden_size``,
    ``head_dim``, ``vocab_size`` and ``name_or_path`` (informative only, never compared)."""
    config = model.config if hasattr(model, "config") else model
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    heads = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    return {
        "model_type": str(getattr(config, "model_type", "")),
        "num_layers": int(config.num_hidden_layers),
        "num_query_heads": heads,
        "num_kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "hidden_size": hidden,
        "head_dim": int(getattr(config, "head_dim", None) or hidden // heads),
        "vocab_size": int(getattr(config, "vocab_size", 0) or 0),
        "name_or_path": str(getattr(config, "_name_or_path", "") or ""),
    }


# identity fields a pattern for another model differs in (name_or_path is where it came from, not what)
_COMPARED = ("model_type", "num_layers", "num_query_heads", "num_kv_heads", "hidden_size", "head_dim", "vocab_size")


# -- the pattern --------------------------------------------------------------------------------


class DuoPattern:
    """DuoAttention's identified gates ``[num_layers, num_kv_heads]`` in ``[0, 1]`` (1: the head
    needs full attention), with the ``model`` identity (:func:`model_identity`; empty for an
    official file) and the identification ``settings`` and loss ``curve`` (rows ``[step, distill,
    reg, total]``).

        >>> pattern = DuoPattern([[0.9, 0.1], [0.2, 0.7]])
        >>> pattern.full_heads(sparsity=0.5).tolist()
        [[True, False], [False, True]]
        >>> policy = pattern.to_policy(sparsity=0.5, sink=64, window=256)   # an attnkit.hf.Headwise
    """

    def __init__(self, gates, model: dict | None = None, settings: dict | None = None, curve=None):
        try:
            table = torch.as_tensor(gates, dtype=torch.float64).detach().cpu().clone()
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"DuoPattern: gates must be numbers [num_layers, num_kv_heads], got {type(gates).__name__} "
                             f"({err})") from None
        if table.dim() != 2 or table.numel() == 0:
            raise ValueError(f"DuoPattern: gates must be a non-empty [num_layers, num_kv_heads] table, got shape "
                             f"{tuple(table.shape)}")
        if not bool(torch.isfinite(table).all()) or bool(((table < 0) | (table > 1)).any()):
            raise ValueError(f"DuoPattern: gates must be finite numbers in [0, 1], got min {table.min().item()}, "
                             f"max {table.max().item()}")
        self.gates = table
        self.model = dict(model or {})
        self.settings = dict(settings or {})
        self.curve = [list(map(float, row)) for row in (curve or [])]
        if self.model and (self.model.get("num_layers"), self.model.get("num_kv_heads")) != self.shape:
            raise ValueError(f"DuoPattern: gates have shape {list(self.shape)} but the model identity says "
                             f"[num_layers, num_kv_heads] = [{self.model.get('num_layers')}, {self.model.get('num_kv_heads')}]")

    @property
    def shape(self) -> tuple[int, int]:
        """``(num_layers, num_kv_heads)``."""
        return tuple(self.gates.shape)

    def __repr__(self):
        name = self.model.get("model_type") or "unknown model"
        return f"DuoPattern({name}, [num_layers, num_kv_heads] = {list(self.shape)})"

    def __eq__(self, other):
        if not isinstance(other, DuoPattern):
            return NotImplemented
        return (torch.equal(self.gates, other.gates) and self.model == other.model and self.settings == other.settings
                and self.curve == other.curve)

    __hash__ = None  # mutable contents

    # -- checks against a model ---------------------------------------------------------------
    def check(self, model) -> None:
        """``ValueError`` unless this pattern fits ``model`` (a transformers model or config): the
        same layer and KV-head counts and, where the pattern records them, the same model type and sizes."""
        have = model_identity(model)
        if (have["num_layers"], have["num_kv_heads"]) != self.shape:
            raise ValueError(f"duo: the pattern has [num_layers, num_kv_heads] = {list(self.shape)} but the model has "
                             f"[{have['num_layers']}, {have['num_kv_heads']}]: it was identified on another model "
                             f"({self._origin()}); identify one for this model (attnkit identify-duo --model PATH)")
        differ = [f"{k} {self.model[k]!r} vs {have[k]!r}" for k in _COMPARED if k in self.model and self.model[k] != have[k]]
        if differ:
            raise ValueError(f"duo: the pattern was identified on another model ({self._origin()}): {', '.join(differ)} "
                             "(pattern vs this model); identify one for this model (attnkit identify-duo --model PATH)")

    def _origin(self) -> str:
        return self.model.get("name_or_path") or self.model.get("model_type") or "no model identity recorded"

    # -- deployment -----------------------------------------------------------------------------
    def full_heads(self, sparsity: float | None = None, threshold: float | None = None) -> Tensor:
        """Boolean ``[num_layers, num_kv_heads]``, True for a retrieval (full) head.

        ``sparsity`` (default 0.5): the fraction of KV heads that stream: the
        ``floor(sparsity * N + 0.5)`` heads of smallest gate (of ``N``), ties broken by (layer,
        head) order, so the count is exact (the official code thresholds at the ``sparsity``
        quantile of the gates after adding noise below 1e-6 to break ties: the same count up to
        rounding, chosen at random among ties). ``threshold``: instead, full where ``gate >= threshold``.
        """
        if sparsity is not None and threshold is not None:
            raise ValueError(f"duo: give sparsity or threshold, not both (got sparsity={sparsity!r}, threshold={threshold!r})")
        flat = self.gates.reshape(-1)
        if threshold is not None:
            threshold = _fraction(threshold, "threshold", "full heads are those with gate >= threshold")
            return (self.gates >= threshold).clone()
        sparsity = _fraction(0.5 if sparsity is None else sparsity, "sparsity", "the fraction of KV heads that stream")
        n = flat.numel()
        streaming = min(n, int(math.floor(sparsity * n + 0.5)))
        order = torch.sort(flat, stable=True).indices  # ascending gate, ties in (layer, head) order
        full = torch.ones(n, dtype=torch.bool)
        full[order[:streaming]] = False
        return full.reshape(self.shape)

    def to_policy(self, sparsity: float | None = None, threshold: float | None = None, *, sink: int = 64,
                  window: int = 256) -> Headwise:
        """The :class:`attnkit.hf.Headwise` policy: :meth:`full_heads` keep every token, the other
        KV heads the first ``sink`` (>= 0) and the last ``window`` (>= 1) tokens."""
        _sink_window(sink, window)
        return Headwise(full_heads=self.full_heads(sparsity, threshold), sink=sink, window=window)

    # -- files ----------------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write the TSV (official layout: a row per layer, a tab-separated gate per KV head; the
        metadata as JSON on a ``#`` line). ``path`` may be a folder: then ``full_attention_heads.tsv``
        in it, as the official code names it. Returns the file written."""
        path = Path(path)
        if path.is_dir():
            path = path / PATTERN_FILE
        meta = {"format": FORMAT, "version": 1, "model": self.model, "settings": self.settings, "curve": self.curve}
        lines = ["# attnkit DuoAttention pattern (arXiv 2410.10819): one row per layer, one gate in [0, 1] per KV head "
                 "(1: full attention)", "# " + json.dumps(meta)]
        lines += ["\t".join(repr(float(g)) for g in row) for row in self.gates.tolist()]
        return write_atomic(path, "\n".join(lines) + "\n")

    @classmethod
    def load(cls, path) -> "DuoPattern":
        """Read a pattern written by :meth:`save`, an official ``full_attention_heads.tsv``, or an
        official pattern folder (the TSV and its ``config.json``, whose ``sink_size`` / ``recent_size``
        become the settings' ``sink`` / ``window``). Gates are clipped to ``[0, 1]`` as the official
        loader does. A missing or malformed file raises ``ValueError``."""
        if isinstance(path, DuoPattern):
            return path
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"duo: pattern must be a DuoPattern or the path of a pattern file or folder, got "
                             f"{type(path).__name__}")
        path = Path(path)
        folder_config = None
        if path.is_dir():
            if (path / "config.json").is_file():
                folder_config = path / "config.json"
            path = path / PATTERN_FILE
        if not path.is_file():
            raise ValueError(f"duo: pattern file {str(path)!r} does not exist; accepted: a file written by "
                             "attnkit identify-duo / DuoPattern.save, an official full_attention_heads.tsv, or its folder")
        meta, rows = {}, []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            text = line.strip()
            if not text:
                continue
            if text.startswith("#"):
                body = text[1:].strip()
                if body.startswith("{"):
                    try:
                        meta = json.loads(body)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"duo: {path}: line {number}: unreadable metadata ({err})") from None
                continue
            try:
                rows.append([float(x) for x in text.split()])
            except ValueError:
                raise ValueError(f"duo: {path}: line {number} is not tab-separated numbers: {text[:80]!r}") from None
        if not rows:
            raise ValueError(f"duo: {path} holds no gates (expected a row of numbers per layer)")
        if len({len(r) for r in rows}) > 1:
            raise ValueError(f"duo: {path}: rows have different numbers of KV heads: {[len(r) for r in rows]}")
        if meta and meta.get("format") not in (None, FORMAT):
            raise ValueError(f"duo: {path}: metadata of format {meta.get('format')!r}; accepted: {FORMAT!r}")
        gates = torch.tensor(rows, dtype=torch.float64)
        if not bool(torch.isfinite(gates).all()):
            raise ValueError(f"duo: {path} holds non-finite gates")
        settings = dict(meta.get("settings", {}))
        if folder_config is not None and not meta:
            official = json.loads(folder_config.read_text())
            settings = {"source": "official", "sink": official.get("sink_size"), "window": official.get("recent_size"),
                        **{k: official[k] for k in ("lr", "reg_weight", "num_steps", "initial_value") if k in official}}
        return cls(gates.clamp(0, 1), model=meta.get("model"), settings=settings, curve=meta.get("curve"))


# -- the deployment policy ----------------------------------------------------------------------


@dataclass(frozen=True)
class Duo(Headwise):
    """DuoAttention's deployment (arXiv 2410.10819): an identified :class:`DuoPattern` thresholded
    into retrieval heads (every token) and streaming heads (``sink`` + ``window``), served by the
    head-wise cache. ``attnkit.hf.apply(model, "duo", pattern="pattern.tsv", sparsity=0.5, sink=64, window=256)``.

    ``pattern``: a :class:`DuoPattern` or the path of its file (or of an official pattern folder);
    ``sparsity`` (default 0.5) or ``threshold``: see :meth:`DuoPattern.full_heads`. ``apply``
    refuses a pattern whose layer or KV-head count differs from the model's.
    """

    name = "duo"
    full_heads: object = field(default=None, init=False, compare=False, repr=False)
    sink: int = 64
    window: int = 256
    pattern: object = field(default=None, compare=False)
    sparsity: float | None = None
    threshold: float | None = None

    def __post_init__(self):
        _sink_window(self.sink, self.window)
        if self.pattern is None:
            raise ValueError("duo: pattern is required: a DuoPattern or the path of a pattern file "
                             "(attnkit identify-duo --model PATH --out pattern.tsv)")
        pattern = DuoPattern.load(self.pattern)
        object.__setattr__(self, "pattern", pattern)
        object.__setattr__(self, "full_heads", pattern.full_heads(self.sparsity, self.threshold))
        super().__post_init__()

    def check(self, num_layers, num_kv_heads):
        if self.shape != (num_layers, num_kv_heads):
            raise ValueError(f"duo: the pattern has [num_layers, num_kv_heads] = {list(self.shape)} but the model has "
                             f"[{num_layers}, {num_kv_heads}]: it was identified on another model "
                             f"({self.pattern._origin()}); identify one for this model (attnkit identify-duo --model PATH)")


# -- the gated forward --------------------------------------------------------------------------


def _first_real(mask: Tensor | None, batch: int, device) -> Tensor:
    """Each row's first key some query may attend (its first non-padding token) ``[B]``; 0 without
    a mask, on the CPU: checking it for zeros then costs no wait for the GPU."""
    if mask is None:
        return torch.zeros(batch, dtype=torch.long)
    real = mask.any(dim=2)[:, 0]  # [B, S]
    return real.to(torch.int8).argmax(dim=1)


def _needs_dense(q, k, v, pattern, score_mod, q_offset: int) -> bool:
    """Whether the rule should go to ``attend`` as a materialised mask rather than a pattern: where
    ``auto`` would pick FlexAttention (CUDA without cuDNN's band), which compiles a kernel per
    sequence length, while SDPA's masked kernel serves any length."""
    if q.device.type != "cuda":
        return False
    from ..ops.softmax.dispatch import choose_backend

    return choose_backend(q, k, v, pattern, score_mod, False, q_offset) == "flex"


def _streaming_allowed(rule: SinkWindow, mask: Tensor | None, q, k, v, start: Tensor, score_mod=None):
    """Where a streaming head may attend: the model's mask (causal, its own window, padding) and
    the rule; an attnkit pattern where nothing must be materialised, else a boolean ``[B, 1, T, S]``."""
    from .attention import _plain_rule

    B, _, T, _ = q.shape
    S = k.shape[2]
    plain = _plain_rule(rule, mask, T, S, start)
    if plain is not None and not _needs_dense(q, k, v, plain, score_mod, S - T):
        return plain
    start = start.to(q.device)
    q_pos = torch.arange(S - T, S, device=q.device)
    k_pos = torch.arange(S, device=q.device)
    base = mask if mask is not None else (k_pos <= q_pos[:, None]).expand(B, 1, T, S)
    return base & rule.allowed(q_pos[None, None, :, None], k_pos[None, None, None, :], start[:, None, None, None])


class GatedAttention:
    """DuoAttention's identification forward on a transformers model: while active (a context
    manager), every attention layer ``l`` returns ``alpha[l, g] * full + (1 - alpha[l, g]) *
    streaming`` per query head of KV head ``g`` (see the module docstring).

    ``gates``: a float tensor ``[num_layers, num_kv_heads]`` (a ``Parameter`` to train; clamped to
    ``[0, 1]`` in the forward). ``full_from``: ``"self"`` (both branches on the gated model's own
    activations) or ``"teacher"`` (the official code's choice: the full branch is the output the
    original model's attention gave at that layer in the last forward run under
    :meth:`teacher`). Whole sequences only (no KV cache: pass ``use_cache=False``).

    Routing: the function is registered in transformers' ``AttentionInterface`` as
    :data:`IMPLEMENTATION` and selected with ``set_attn_implementation``; leaving restores every
    config's attention implementation. A model with an ``attnkit.hf.apply`` handle is refused.
    """

    def __init__(self, model, gates: Tensor, *, sink: int = 64, window: int = 256, full_from: str = "self",
                 backend: str = "auto"):
        from ..ops.softmax.dispatch import BACKENDS
        from .attention import _attention_modules, _text_config

        _sink_window(sink, window)
        if full_from not in ("self", "teacher"):
            raise ValueError(f"duo: full_from must be 'self' or 'teacher', got {full_from!r}")
        if backend not in BACKENDS:
            raise ValueError(f"duo: unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")
        try:
            from transformers import PreTrainedModel
        except ImportError as err:  # pragma: no cover - the package import already checked
            raise ImportError('attnkit.hf needs transformers: pip install "attnkit[hf]"') from err
        if not isinstance(model, PreTrainedModel):
            raise ValueError(f"duo: model must be a transformers PreTrainedModel, got {type(model).__name__}")
        if not type(model)._can_set_attn_implementation():
            raise ValueError(f"duo: {type(model).__name__} does not route its attention through transformers' "
                             "AttentionInterface, so its attention cannot be gated")
        modules = _attention_modules(model)
        if not modules or any(m.is_causal is not True for m in modules):
            raise ValueError(f"duo: {type(model).__name__} has no causal self-attention modules routed through "
                             "AttentionInterface (layer_idx, is_causal=True); DuoAttention needs a causal decoder")
        config = _text_config(model)
        self.num_layers = int(config.num_hidden_layers)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        if not isinstance(gates, Tensor) or not gates.is_floating_point() or tuple(gates.shape) != (
                self.num_layers, self.num_kv_heads):
            got = f"{gates.dtype} {tuple(gates.shape)}" if isinstance(gates, Tensor) else type(gates).__name__
            raise ValueError(f"duo: gates must be a float tensor [num_layers, num_kv_heads] = "
                             f"[{self.num_layers}, {self.num_kv_heads}], got {got}")
        self.model, self.gates, self.modules = model, gates, modules
        self.rule = SinkWindow(sink, window)
        self.full_from, self.backend = full_from, backend
        self.recording = False  # under teacher(): full attention only, its outputs kept for full_from="teacher"
        self.recorded: dict = {}
        self._saved: list = []
        self.active = False

    def teacher(self):
        """A context in which the model runs its own full attention (the original model) and, for
        ``full_from="teacher"``, each layer's attention output is kept for the next gated forward."""
        outer = self

        class _Teacher:
            def __enter__(self):
                outer.recording = True
                outer.recorded = {}

            def __exit__(self, *exc):
                outer.recording = False
                return False

        return _Teacher()

    def __enter__(self):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        from .attention import Handle, _all_configs

        if Handle.of(self.model) is not None:
            raise ValueError(f"duo: {type(self.model).__name__} has an attnkit.hf method applied "
                             f"({Handle.of(self.model).policy!r}); remove() it before identifying")
        if any(m in _GATED for m in self.modules):
            raise RuntimeError("duo: this model's attention is already gated (a GatedAttention is active on it)")
        AttentionInterface.register(IMPLEMENTATION, _gated_attention_forward)
        AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
        self._saved = [(c, c._attn_implementation_internal) for c in _all_configs(self.model)]
        self.model.set_attn_implementation(IMPLEMENTATION)
        # as apply() does: a vision tower's (bidirectional, not gated) attention keeps its own
        routed = set(self.modules)
        keep = {id(getattr(m, "config", None)) for m in self.modules}
        keep |= {id(sub.config) for sub in self.model.modules()
                 if getattr(sub, "config", None) is not None and any(x in routed for x in sub.modules())}
        for config, value in self._saved:
            if id(config) not in keep:
                config._attn_implementation_internal = value
        for m in self.modules:
            _GATED[m] = self
        self.active = True
        return self

    def __exit__(self, *exc):
        for m in self.modules:
            _GATED.pop(m, None)
        for config, value in self._saved:
            config._attn_implementation_internal = value
        self.recorded = {}
        self.active = False
        return False


def _gated_attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling=None,
                             dropout: float = 0.0, **kwargs):
    """transformers attention function: query ``[B, Hq, T, D]``, key/value ``[B, Hkv, S, D]`` ->
    ``(out [B, T, Hq, Dv], None)``, gated as the module's :class:`GatedAttention` says."""
    from .attention import _bool_mask, _run

    gate = _GATED.get(module)
    if gate is None:
        raise RuntimeError(f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) runs "
                           f"attn_implementation={IMPLEMENTATION!r} outside a duo GatedAttention; "
                           "use model.set_attn_implementation('sdpa')")
    if dropout and module.training:
        raise ValueError(f"duo: the gated attention has no dropout; got dropout={dropout} in training mode (model.eval())")
    if kwargs.get("s_aux") is not None:
        raise ValueError("duo: learned attention sinks (s_aux, e.g. gpt-oss) cannot be gated")
    softcap = kwargs.get("softcap")
    score_mod = None
    if softcap is not None:
        def score_mod(score, b, h, q_pos, k_pos):  # Gemma 2's logit soft-capping
            return softcap * torch.tanh(score / softcap)

    mask = _bool_mask(attention_mask)
    B, Hq, T, _ = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    if T != S:
        raise ValueError(f"duo: the gated forward attends whole sequences (queries T={T} but keys S={S}: a KV cache is "
                         "in use); call the model with use_cache=False and no past_key_values")
    layer = module.layer_idx
    if gate.recording or gate.full_from == "self":
        full = _run(gate, query, key, value, mask, scaling, score_mod)
        if gate.recording:
            if gate.full_from == "teacher":
                gate.recorded[layer] = full.detach()
            return full.transpose(1, 2).contiguous(), None
    else:
        full = gate.recorded.get(layer)
        if full is None or full.shape[:3] != query.shape[:3]:
            raise RuntimeError(f"duo: full_from='teacher' but no teacher output of this shape was recorded for layer "
                               f"{layer}; run the same input under `with gated.teacher():` first")
    start = _first_real(mask, B, query.device)
    stream = _run(gate, query, key, value, _streaming_allowed(gate.rule, mask, query, key, value, start, score_mod), scaling, score_mod)
    alpha = gate.gates[layer].clamp(0, 1)  # [Hkv], clamped as the official forward does
    mix = torch.promote_types(query.dtype, torch.float32)
    a = alpha.to(mix).repeat_interleave(Hq // Hkv)[None, :, None, None]  # [1, Hq, 1, 1]: query heads share their KV head's gate
    out = stream.to(mix) + a * (full.to(mix) - stream.to(mix))
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


# -- data ---------------------------------------------------------------------------------------


def _encode(text: bytes, tokenizer) -> list[int]:
    if tokenizer is None:
        return list(text)
    return list(tokenizer(text.decode("utf-8", errors="replace"), add_special_tokens=False)["input_ids"])


def duo_batch(rng: random.Random, haystack: bytes, batch_size: int, length: int, *, max_pairs: int = 8,
              tokenizer=None) -> tuple[Tensor, Tensor]:
    """``batch_size`` retrieval prompts of ``length`` bytes, each followed by its answer: ``(ids
    [B, T], supervised [B, T] bool)``; supervised marks the question and the answer at the end.

    Each prompt is :func:`attnkit.tasks.longcontext.multikey_example` with 1 to ``max_pairs`` pairs
    (as many as fit; ``length`` >= 120). Ids are the bytes (``tokenizer=None``) or the tokenizer's ids of the text; rows
    of unequal token counts are cut at the front to the shortest (the end holds the question)."""
    from ..tasks.longcontext import DIGITS, NAMES, _multikey_needle, _multikey_question, multikey_example

    positive_int(batch_size, "duo: batch_size")
    positive_int(max_pairs, "duo: max_pairs")
    # the longest name bounds a needle and the question; multikey_example keeps >= 16 haystack bytes
    longest = max(NAMES, key=len)
    needle, question = len(_multikey_needle(longest, "0" * DIGITS)), len(_multikey_question(longest))
    prompt_length = length - DIGITS
    fit = (prompt_length - question - 16) // needle
    if fit < 1:
        raise ValueError(f"duo: length={length} is too short for a retrieval prompt; accepted: >= {MIN_LENGTH}")
    rows, tails = [], []
    for _ in range(batch_size):
        ex = multikey_example(rng, haystack, prompt_length, rng.randint(1, min(max_pairs, fit)))
        tail = len(_multikey_question(ex.info["name"]))
        context, asked = _encode(ex.prompt[:-tail], tokenizer), _encode(ex.prompt[-tail:] + ex.answer, tokenizer)
        rows.append(context + asked)
        tails.append(len(asked))
    T = min(len(r) for r in rows)
    ids = torch.tensor([r[len(r) - T:] for r in rows], dtype=torch.long)
    supervised = torch.zeros(batch_size, T, dtype=torch.bool)
    for b, tail in enumerate(tails):
        supervised[b, T - tail:] = True
    return ids, supervised


# -- identification -----------------------------------------------------------------------------


def _lr_factor(step: int, steps: int) -> float:
    """The official schedule: linear ramp over the first fifth, flat, linear decay over the last fifth; floor 0.1."""
    fifth = max(1, steps // 5)
    return min(1.0, max((step + 1) / fifth, 0.1), max((steps - step) / fifth, 0.1))


def identify(model, *, steps: int = 2000, lr: float = 0.02, reg_weight: float = 0.05, sink: int = 64,
             window: int = 256, batch_size: int = 1, min_length: int | None = None, max_length: int | None = None,
             num_lengths: int = 8, max_pairs: int = 8, init: float = 1.0, seed: int = 0, haystack: bytes | None = None,
             tokenizer=None, full_from: str = "teacher", backend: str = "auto", progress=None,
             log_every: int | None = None) -> DuoPattern:
    """Identify DuoAttention's retrieval and streaming heads of ``model`` (frozen; run where its
    parameters are). Returns the :class:`DuoPattern` (gates, identity, settings, loss curve).

    Args:
        steps, lr, reg_weight, init: optimisation (official: 2000, 0.02, 0.05, gates start at 1.0).
        sink, window: the streaming branch while identifying (deployment's 64 / 256 by default).
        batch_size: prompts per step, all of one length (official: 1).
        min_length, max_length, num_lengths: prompt lengths in tokens, ``num_lengths`` evenly spaced
            values (default: up to ``min(4096, max_position_embeddings)``, from a quarter of it, at least
            :data:`MIN_LENGTH`).
        max_pairs: most key-value pairs per prompt (official: 10 passkeys; the subject was trained on up to 8).
        haystack: text bytes the needles hide in (default: the training files of the standard
            library, :func:`attnkit.tasks.load_corpus`; the held-out files stay for evaluation).
        tokenizer: ``None``: token ids are bytes (the subject); else a transformers tokenizer.
        full_from: ``"teacher"`` (official) or ``"self"``, see :class:`GatedAttention`.
        progress: ``on_step(step, loss)`` every ``log_every`` steps (default ``steps // 100``).
    """
    from ..ops.softmax.dispatch import BACKENDS

    positive_int(steps, "duo: steps")
    lr = _positive_number(lr, "lr")
    if full_from not in ("self", "teacher"):
        raise ValueError(f"duo: full_from must be 'self' or 'teacher', got {full_from!r}")
    if backend not in BACKENDS:
        raise ValueError(f"duo: unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")
    if isinstance(reg_weight, bool) or not isinstance(reg_weight, (int, float)) or not (
            math.isfinite(reg_weight) and reg_weight >= 0):
        raise ValueError(f"duo: reg_weight must be a finite number >= 0, got {reg_weight!r}")
    init = _fraction(init, "init", "the gates' starting value; official 1.0")
    _sink_window(sink, window)
    positive_int(batch_size, "duo: batch_size")
    positive_int(num_lengths, "duo: num_lengths")
    positive_int(max_pairs, "duo: max_pairs")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"duo: seed must be an integer >= 0, got {seed!r}")
    identity = model_identity(model)
    if tokenizer is None and identity["vocab_size"] < 256:
        raise ValueError(f"duo: the model's vocabulary has {identity['vocab_size']} tokens, too few for byte ids; "
                         "pass its tokenizer (tokenizer=...)")
    limit = int(getattr(model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config,
                        "max_position_embeddings", 4096) or 4096)
    max_length = min(4096, limit) if max_length is None else max_length
    positive_int(max_length, "duo: max_length")
    min_length = min(max_length, max(MIN_LENGTH, max_length // 4)) if min_length is None else min_length
    positive_int(min_length, "duo: min_length")
    if min_length > max_length:
        raise ValueError(f"duo: min_length={min_length} is larger than max_length={max_length}")
    lengths = sorted({int(round(min_length + (max_length - min_length) * i / max(1, num_lengths - 1)))
                      for i in range(num_lengths)})
    if haystack is None:
        from ..tasks.text import load_corpus

        haystack = load_corpus()[0]
    duo_batch(random.Random(0), haystack, 1, lengths[0], max_pairs=max_pairs, tokenizer=tokenizer)  # too short: fails now
    log_every = max(1, steps // 100) if log_every is None else positive_int(log_every, "duo: log_every")

    device = next(model.parameters()).device
    gates = torch.nn.Parameter(torch.full((identity["num_layers"], identity["num_kv_heads"]), init,
                                          device=device, dtype=torch.float32))
    opt = torch.optim.AdamW([gates], lr=lr, weight_decay=0.0)
    base = model.base_model
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    curve, window_losses = [], []
    start = time.perf_counter()
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        model.eval()
        with GatedAttention(model, gates, sink=sink, window=window, full_from=full_from, backend=backend) as gated:
            for step in range(steps):
                rng = random.Random(f"identify-duo:{seed}:{step}")
                ids, supervised = duo_batch(rng, haystack, batch_size, rng.choice(lengths), max_pairs=max_pairs,
                                            tokenizer=tokenizer)
                ids, supervised = ids.to(device), supervised.to(device)
                with torch.no_grad(), gated.teacher():
                    target = base(input_ids=ids, use_cache=False).last_hidden_state.float()
                hidden = base(input_ids=ids, use_cache=False).last_hidden_state.float()
                gated.recorded = {}
                per_position = (hidden - target).pow(2).mean(dim=-1)  # [B, T]
                weight = supervised.to(per_position.dtype)
                distill = (per_position * weight).sum() / weight.sum()  # no host sync for the count
                reg = gates.abs().mean()
                loss = distill + reg_weight * reg
                for group in opt.param_groups:
                    group["lr"] = lr * _lr_factor(step, steps)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    gates.clamp_(0, 1)
                window_losses.append(torch.stack([distill.detach(), reg.detach(), loss.detach()]))
                if (step + 1) % log_every == 0 or step + 1 == steps:
                    d, r, total = torch.stack(window_losses).mean(0).tolist()
                    window_losses.clear()
                    if not math.isfinite(total):
                        raise FloatingPointError(f"duo: the identification loss became {total} at step {step + 1}")
                    curve.append([step + 1, d, r, total])
                    if progress:
                        progress(step + 1, total)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    wall = time.perf_counter() - start
    settings = {"steps": steps, "lr": lr, "reg_weight": reg_weight, "init": init, "sink": sink, "window": window,
                "batch_size": batch_size, "lengths": lengths, "max_pairs": max_pairs, "seed": seed,
                "full_from": full_from, "tokens": "bytes" if tokenizer is None else type(tokenizer).__name__,
                "device": str(device), "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                "wall_s": round(wall, 3),
                "data": "attnkit.tasks.longcontext multi-key retrieval, 1 to max_pairs pairs, one asked",
                "loss": "MSE of the final hidden states at the question + answer positions + reg_weight * mean|gate|"}
    return DuoPattern(gates.detach().cpu(), model=identity, settings=settings, curve=curve)


# -- the command --------------------------------------------------------------------------------


def _plot(pattern: DuoPattern, file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    curve = pattern.curve
    if curve:
        steps = [row[0] for row in curve]
        left.plot(steps, [row[1] for row in curve], label="distillation (hidden-state MSE)")
        left.plot(steps, [row[2] * pattern.settings.get("reg_weight", 1.0) for row in curve], label="reg_weight x mean gate")
        left.plot(steps, [row[3] for row in curve], label="total")
        left.set_xlabel("step")
        left.set_ylabel("loss")
        left.legend()
        left.grid(alpha=0.3)
    left.set_title("DuoAttention identification")
    image = right.imshow(pattern.gates.numpy(), cmap="coolwarm", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    layers, heads = pattern.shape
    right.set_xticks(range(heads))
    right.set_yticks(range(0, layers, max(1, layers // 12)))
    right.set_xlabel("KV head")
    right.set_ylabel("layer")
    right.set_title("gates (1: full attention)")
    fig.colorbar(image, ax=right)
    fig.tight_layout()
    fig.savefig(file, dpi=100)
    plt.close(fig)


def add_identify_parser(sub) -> None:
    """``attnkit identify-duo``: identify DuoAttention's retrieval heads of a local HF model."""
    p = sub.add_parser(
        "identify-duo",
        help="identify DuoAttention's retrieval and streaming heads of a Hugging Face model (a pattern file)",
        description="DuoAttention (arXiv 2410.10819): learn a gate per KV head mixing full and sink + window "
        "attention, the model frozen, distilling its final hidden states on synthetic multi-key retrieval with an L1 "
        "penalty on the gates; write the gates as a full_attention_heads.tsv-style pattern, for attnkit.hf.apply(model, "
        "'duo', pattern=FILE, sparsity=0.5). Defaults are the official settings (2000 steps, lr 0.02, reg 0.05); "
        "--preset cpu is a reduced run for a CPU.",
    )
    p.add_argument("--model", default=None, help="a local Hugging Face causal-LM folder (default: the shipped subject)")
    p.add_argument("--out", required=True, help="the pattern file to write (.tsv; a folder: full_attention_heads.tsv in it)")
    p.add_argument("--preset", default="default", choices=["default", "cpu"],
                   help="default: the official settings | cpu: " + ", ".join(f"{k} {v}" for k, v in CPU_SETTINGS.items())
                   + " (default: default)")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps (default: 2000, or the preset's)")
    p.add_argument("--lr", type=float, default=0.02, help="AdamW learning rate of the gates (default: 0.02)")
    p.add_argument("--reg", type=float, default=0.05, help="weight of the L1 penalty on the gates (default: 0.05)")
    p.add_argument("--sink", type=int, default=64, help="sink tokens of the streaming branch (default: 64)")
    p.add_argument("--window", type=int, default=256, help="recent tokens of the streaming branch (default: 256)")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per step (default: 1)")
    p.add_argument("--min-length", type=int, default=None, help="shortest prompt in tokens (default: max-length / 4)")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest prompt in tokens (default: min(4096, the model's max_position_embeddings))")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:<index> (default: cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="model weights' dtype (default auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data (default: 0)")
    p.add_argument("--corpus", default=None, help="a text file or folder for the haystack (default: the standard library)")
    p.add_argument("--sparsity", type=float, default=0.5, help="the summary's fraction of streaming heads (default: 0.5)")
    p.add_argument("--plot", default=None, help="PNG of the loss curve and the gates (default: next to --out; 'none': no plot)")
    p.set_defaults(func=cmd_identify_duo)


def cmd_identify_duo(args) -> int:
    from transformers import AutoModelForCausalLM

    from .._checks import parse_device
    from .._console import StepPrinter, check_writable, console, err_console, invoked_command, plot_path_for

    device = parse_device(args.device)
    _fraction(args.sparsity, "--sparsity", "the fraction of KV heads that stream")
    out = Path(args.out)
    if out.is_dir():
        out = out / PATTERN_FILE
    check_writable(out, "--out")
    plot = plot_path_for(out, args.plot)
    if args.model is None:
        from .subject import default_subject

        model_path = default_subject()
    else:
        model_path = Path(args.model)
        if not (model_path / "config.json").is_file():
            raise ValueError(f"--model {args.model!r} holds no config.json; accepted: a local Hugging Face model folder")
    options = dict(CPU_SETTINGS) if args.preset == "cpu" else {}
    for name, value in (("steps", args.steps), ("batch_size", args.batch_size), ("min_length", args.min_length),
                        ("max_length", args.max_length)):
        if value is not None:
            options[name] = value
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    tokenizer = None
    if model_identity(model)["vocab_size"] != 256:  # the subject's tokens are bytes; another model has a tokenizer
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
    haystack = None
    if args.corpus is not None:
        from ..tasks.text import load_corpus

        haystack = load_corpus(args.corpus)[0]
    steps = options.get("steps", 2000)
    positive_int(steps, "--steps")
    printer = StepPrinter("identify-duo", sys.stderr)
    printer.line(f"identifying {model_path} ({model_identity(model)['num_layers']} layers x "
                 f"{model_identity(model)['num_kv_heads']} KV heads), {steps} steps on {device}")
    bar = None
    if sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        bar = Progress(TextColumn("[bold]identify-duo"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn(),
                       console=err_console())
        task = bar.add_task("identify", total=steps, loss=float("nan"))
        bar.start()

        def on_step(step, loss):
            bar.update(task, completed=step, loss=loss)
    else:
        on_step = printer.start("identify", steps)
    try:
        pattern = identify(model, lr=args.lr, reg_weight=args.reg, sink=args.sink, window=args.window, seed=args.seed,
                           haystack=haystack, tokenizer=tokenizer, progress=on_step, **options)
    finally:
        if bar is not None:
            bar.stop()
    pattern.settings["command"] = invoked_command("identify-duo")
    written = [str(pattern.save(out))]
    if plot is not None:
        _plot(pattern, plot)
        written.append(str(plot))
    full = pattern.full_heads(sparsity=args.sparsity)
    shown = console()
    last = pattern.curve[-1]
    shown.print(f"wrote {', '.join(written)} in {pattern.settings['wall_s']:.1f} s; final distillation loss "
                f"{last[1]:.4g}, mean gate {last[2]:.3f}")
    for layer, (row, keep) in enumerate(zip(pattern.gates.tolist(), full.tolist())):
        shown.print(f"layer {layer:2d}: " + "  ".join(f"{g:.3f}{'*' if k else ' '}" for g, k in zip(row, keep)),
                    highlight=False)
    shown.print(f"* full attention at sparsity {args.sparsity} (attnkit.hf.apply(model, 'duo', pattern={str(out)!r}, "
                f"sparsity={args.sparsity}))", highlight=False)
    return 0
