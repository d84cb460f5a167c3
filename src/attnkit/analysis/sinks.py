"""Attention sinks: how much attention goes to the first token.

When Attention Sink Emerges in Language Models (Gu et al., arXiv 2410.10781) measures, per
head, the mean attention score that queries put on the first token, and calls a head a sink
when it exceeds a threshold (epsilon = 0.3). This module reports, per layer:

- ``first_token_share``: mean over heads and queries (i >= 1) of ``w_i0 / sum_j w_ij``, the
  fraction of a row's weight on token 0 (for softmax attention the weight itself);
- ``first_token_weight``: the mean raw weight ``w_i0`` (differs from the share for sigmoid
  attention, whose rows do not sum to 1);
- ``sink_heads``: the fraction of heads whose mean raw first-token weight exceeds epsilon
  (the paper's Sink metric).

Layers expose their weights through ``attention_weights(x)`` (multi-head attention and its
variants, sigmoid attention); other layers are reported as unsupported.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["first_token_attention", "first_token_metrics", "sink_report"]


@torch.no_grad()
def first_token_attention(model, tokens: Tensor, *, epsilon: float = 0.3) -> list[dict]:
    """Per layer of a :class:`~attnkit.models.DecoderLM`, the sink metrics above on ``tokens [B, T]``."""
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [B, T] with T >= 2, got {tuple(tokens.shape)}")
    inputs: dict[int, Tensor] = {}
    hooks = [
        block.attn.register_forward_pre_hook(lambda module, args, i=i: inputs.__setitem__(i, args[0]))
        for i, block in enumerate(model.layers)
    ]
    try:
        model(tokens)
    finally:
        for h in hooks:
            h.remove()
    report = []
    for i, block in enumerate(model.layers):
        layer = block.attn
        if not hasattr(layer, "attention_weights"):
            report.append({"layer": i, "mechanism": type(layer).__name__, "supported": False})
            continue
        metrics = first_token_metrics(layer.attention_weights(inputs[i]), epsilon=epsilon)
        report.append({
            "layer": i,
            "mechanism": type(layer).__name__,
            "supported": True,
            "first_token_share": float(metrics["share"].mean()),
            "first_token_weight": float(metrics["weight"].mean()),
            "sink_heads": float(metrics["sink"].double().mean()),
        })
    return report


def first_token_metrics(weights: Tensor, *, epsilon: float = 0.3) -> dict:
    """Per head, the metrics above from attention weights ``[B, H, T, S]`` (queries ``i >= 1``):
    ``share [H]`` (mean ``w_i0 / sum_j w_ij``), ``weight [H]`` (mean ``w_i0``) and ``sink [H]``
    (``weight > epsilon``), float64. Shared by ``attnkit sinks`` and ``attnkit analyze sinks``."""
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
    if weights.dim() != 4 or weights.shape[2] < 2:
        raise ValueError(f"weights must be [B, H, T, S] with T >= 2, got {tuple(weights.shape)}")
    rows = weights[:, :, 1:]  # (B, H, T-1, S): rows i >= 1, not copied (long inputs stream through here)
    first = rows[..., 0].double()
    share = first / rows.sum(-1, dtype=torch.float64).clamp_min(1e-30)
    per_head = first.mean(dim=(0, 2))  # (H,)
    return {"share": share.mean(dim=(0, 2)), "weight": per_head, "sink": per_head > epsilon}


def sink_report(model, tokens: Tensor, *, epsilon: float = 0.3) -> dict:
    """Layer rows plus the model-wide means of the supported layers."""
    layers = first_token_attention(model, tokens, epsilon=epsilon)
    ok = [r for r in layers if r["supported"]]
    mean = (lambda key: sum(r[key] for r in ok) / len(ok)) if ok else (lambda key: None)
    return {"layers": layers, "first_token_share": mean("first_token_share"),
            "first_token_weight": mean("first_token_weight"), "sink_heads": mean("sink_heads"), "epsilon": epsilon}
