"""Target attention: one candidate item's query over a user's behaviour history.

The attention of CTR models (DIN's target attention in its dot-product form, DARE, TIN): the
candidate (target) is the only query, the behaviours are the keys and values. With H heads of
width D on the query/key side and Dv on the value side::

    w_i = softmax_i(<q, k_i> / sqrt(D))      (invalid behaviours masked)
    out = sum_i w_i v_i

Keys and values may come from different embeddings (DARE) and have different widths. A row
with no valid behaviour gives 0 (no history, no interest). Shapes: ``query [B, H*D]``,
``keys [B, T, H*D]``, ``values [B, T, H*Dv]``, ``valid [B, T]`` bool -> ``[B, H*Dv]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["target_attention", "target_attention_reference", "target_attention_weights", "check_target_inputs"]


def check_target_inputs(query: Tensor, keys: Tensor, values: Tensor, valid: Tensor, num_heads: int) -> None:
    if query.dim() != 2 or keys.dim() != 3 or values.dim() != 3:
        raise ValueError(f"query must be [B, D], keys and values [B, T, D]; got {tuple(query.shape)}, "
                         f"{tuple(keys.shape)} and {tuple(values.shape)}")
    if not query.dtype == keys.dtype == values.dtype:
        raise ValueError(f"query, keys and values must share one dtype, got {query.dtype}, {keys.dtype} and "
                         f"{values.dtype}")
    B, T = keys.shape[:2]
    if query.shape != (B, keys.shape[2]) or values.shape[:2] != (B, T):
        raise ValueError(f"query [B, D] must match keys [B, T, D] and values [B, T, Dv] in B, T and D; got "
                         f"{tuple(query.shape)}, {tuple(keys.shape)} and {tuple(values.shape)}")
    if valid.shape != (B, T) or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor [B, T] = {(B, T)}, got {valid.dtype} {tuple(valid.shape)}")
    if (isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1
            or keys.shape[2] % num_heads or values.shape[2] % num_heads):
        raise ValueError(f"num_heads must be a positive integer dividing the key width {keys.shape[2]} and the value "
                         f"width {values.shape[2]}, got {num_heads!r}")


def target_attention_weights(query: Tensor, keys: Tensor, valid: Tensor, num_heads: int = 1) -> Tensor:
    """The attention weights ``[B, H, T]`` (0 on invalid behaviours and on rows with none valid)."""
    B, T, C = keys.shape
    D = C // num_heads
    q = query.view(B, num_heads, 1, D)
    k = keys.view(B, T, num_heads, D).transpose(1, 2)  # (B, H, T, D)
    scores = (q @ k.transpose(-1, -2))[:, :, 0] / math.sqrt(D)  # (B, H, T)
    scores = scores.masked_fill(~valid[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def target_attention_reference(query: Tensor, keys: Tensor, values: Tensor, valid: Tensor, num_heads: int = 1) -> Tensor:
    """The plain math, materialising the weights (use in float64 to check the fast path)."""
    check_target_inputs(query, keys, values, valid, num_heads)
    B, T, Cv = values.shape
    weights = target_attention_weights(query, keys, valid, num_heads)  # (B, H, T)
    v = values.view(B, T, num_heads, Cv // num_heads).transpose(1, 2)  # (B, H, T, Dv)
    return (weights[..., None] * v).sum(2).reshape(B, Cv)


def target_attention(query: Tensor, keys: Tensor, values: Tensor, valid: Tensor, num_heads: int = 1) -> Tensor:
    """:func:`target_attention_reference` through ``scaled_dot_product_attention`` (one query per
    row; the value width may differ from the key width)."""
    check_target_inputs(query, keys, values, valid, num_heads)
    B, T, C = keys.shape
    Cv = values.shape[2]
    q = query.view(B, num_heads, 1, C // num_heads)
    k = keys.view(B, T, num_heads, C // num_heads).transpose(1, 2)  # (B, H, T, D)
    v = values.view(B, T, num_heads, Cv // num_heads).transpose(1, 2)  # (B, H, T, Dv)
    any_valid = valid.any(1)  # (B,)
    mask = (valid | ~any_valid[:, None])[:, None, None, :]  # an empty row attends everywhere, then is zeroed
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, 1, Dv)
    return out.reshape(B, Cv) * any_valid[:, None]
