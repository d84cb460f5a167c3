"""attnkit.hf: attention methods on pretrained Hugging Face transformers models.

    >>> import attnkit.hf
    >>> handle = attnkit.hf.apply(model, "streaming", sink=4, window=256)
    >>> out = model.generate(ids, past_key_values=handle.cache(), max_new_tokens=32)
    >>> handle.remove()                                                      # the model as it was

``model`` is a causal decoder whose attention goes through transformers' ``AttentionInterface``
(Llama, Qwen2, Mistral, Gemma 2/3, Phi-3 and most current models; encoders, ALiBi models and
models with their own attention code are refused with the reason). ``past_key_values=`` is
the cache's name that transformers 5.17 knows; 5.25 also calls it ``cache=``.

A method is a policy (:mod:`attnkit.hf.policies`) deciding per layer and per KV head which keys
a head keeps and how it attends; :func:`apply` routes the model's attention through transformers'
``AttentionInterface`` to ``attnkit.attend`` (no per-architecture code); :class:`HeadwiseCache`
stores each group of heads on its own, so evicted tokens free their memory. ``to_hf`` /
``from_hf`` convert between attnkit's ``DecoderLM`` and ``LlamaForCausalLM``. Steering methods
(change chosen query heads' logits, weights or outputs) build on :class:`Steer` and :class:`Modifier`
(:mod:`attnkit.hf.steer`).

Needs the ``hf`` extra: ``pip install "attnkit[hf]"`` (transformers >= 5.17, < 5.26).
"""

from __future__ import annotations

try:
    import transformers as _transformers  # noqa: F401
except ImportError as _err:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        'attnkit.hf needs transformers, which is not installed: pip install "attnkit[hf]" '
        "(transformers >= 5.17, < 5.26)"
    ) from _err

from .attention import IMPLEMENTATION, Handle, apply, attention_forward
from .cache import HeadwiseCache, HeadwiseLayer
from .cards import CARDS
from .convert import from_hf, to_hf
from .policies import METHODS, Full, Group, Headwise, Policy, SinkWindow, Streaming
from .steer import Modifier, Steer, top_heads

__all__ = [
    "apply",
    "Handle",
    "attention_forward",
    "IMPLEMENTATION",
    "HeadwiseCache",
    "HeadwiseLayer",
    "Policy",
    "Full",
    "Streaming",
    "Headwise",
    "SinkWindow",
    "Group",
    "METHODS",
    "CARDS",
    "Steer",
    "Modifier",
    "top_heads",
    "to_hf",
    "from_hf",
]
