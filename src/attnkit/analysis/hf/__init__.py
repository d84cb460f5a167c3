"""``attnkit analyze``: attention as evidence on transformers models (needs the hf extra).

capture (the shared core: attention weights and per-head outputs, layer by layer, outputs
unchanged), sinks_hf (first-token sinks and massive activations), waad (WAAD / FAI, local and
global heads, preplan / anchor tokens, RL credit weights), patching (head patching, circuit
overlap, attention repair)."""

try:
    import transformers as _transformers  # noqa: F401
except ImportError as _err:  # pragma: no cover - exercised by a subprocess test
    raise ImportError('attnkit analyze needs transformers, which is not installed: pip install "attnkit[hf]"') from _err

from .capture import LayerCall, attention_weights, capture

__all__ = ["LayerCall", "attention_weights", "capture"]
