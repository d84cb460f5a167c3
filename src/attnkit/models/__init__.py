"""Models that take any registered attention mechanism by name."""

from .decoder import DecoderLM, SwiGLU

__all__ = ["DecoderLM", "SwiGLU"]
