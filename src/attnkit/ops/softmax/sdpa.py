"""The ``sdpa`` backend of :func:`attnkit.attend`: ``torch.nn.functional.scaled_dot_product_attention``,
fused kernels for plain full and causal attention (asked in :func:`set_sdpa_priority`'s order on
CUDA), a dense boolean mask for every other pattern."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import attend_reference

__all__ = ["set_sdpa_priority"]

# On CUDA, plain full/causal attention asks SDPA for cuDNN first: on Hopper it runs ~600
# TFLOP/s forward against ~345 for the FlashAttention-2 kernel that PyTorch picks by default.
# Backends that cannot serve a call (a dtype, GQA, head dim) are skipped in this order.
_SDPA_PRIORITY = ("cudnn", "flash", "efficient", "math")


def set_sdpa_priority(order=None) -> None:
    """Order in which ``attend`` asks SDPA for kernels on CUDA; ``None`` keeps PyTorch's default."""
    global _SDPA_PRIORITY
    accepted = ("cudnn", "flash", "efficient", "math")
    if order is not None:
        order = tuple(order)
        bad = [o for o in order if o not in accepted]
        if bad or not order:
            raise ValueError(f"SDPA priority entries must be among {', '.join(accepted)}, got {list(order)}")
    _SDPA_PRIORITY = order


_SDP_NAMES = {"cudnn": "cudnn", "flash": "flash", "efficient": "mem_efficient", "math": "math"}


class _SdpaChoice:
    """SDPA restricted to ``order``'s backends, in that priority, for one call: what
    ``torch.nn.attention.sdpa_kernel(..., set_priority=True)`` does, through the same torch._C
    switches, without its generic bookkeeping. That context manager cost 40-60 us per call on this
    CPU, as much as 5% of an 8k cuDNN forward on the H200 (attend measured 0.947 of cuDNN there);
    this one a few C calls. Falls back to sdpa_kernel where a switch is missing."""

    _FLAGS = ("cudnn", "flash", "mem_efficient", "math", "overrideable")

    def __init__(self, order: tuple[str, ...]):
        from torch.nn.attention import SDPBackend

        self.order = order
        wanted = {_SDP_NAMES[n] for n in order}
        self.enabled = tuple(flag in wanted for flag in self._FLAGS)
        members = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                   "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
        self.backends = [members[n] for n in order]
        self.priority = [int(b) for b in self.backends]
        C = torch._C
        try:
            self.getters = tuple(getattr(C, f"_get_{f}_sdp_enabled") for f in self._FLAGS)
            self.setters = tuple(getattr(C, f"_set_sdp_use_{f}") for f in self._FLAGS)
            self.get_priority, self.set_priority = C._get_sdp_priority_order, C._set_sdp_priority_order
        except AttributeError:
            self.getters = None

    def __call__(self, q, k, v, is_causal, scale, gqa):
        if self.getters is None:
            from torch.nn.attention import sdpa_kernel

            with sdpa_kernel(self.backends, set_priority=True):
                return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=gqa)
        before = [get() for get in self.getters]
        before_priority = self.get_priority()
        try:
            for set_flag, on in zip(self.setters, self.enabled):
                set_flag(on)
            self.set_priority(self.priority + [b for b in before_priority if b not in self.priority])
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=gqa)
        finally:
            for set_flag, on in zip(self.setters, before):
                set_flag(on)
            self.set_priority(before_priority)


_SDPA_CHOICES: dict[tuple[str, ...], _SdpaChoice] = {}


def _sdpa_choice(order: tuple[str, ...]) -> _SdpaChoice:
    choice = _SDPA_CHOICES.get(order)
    if choice is None:
        choice = _SDPA_CHOICES[order] = _SdpaChoice(order)
    return choice


def _sdpa_fused(q, k, v, is_causal, scale, gqa):
    if q.device.type == "cuda" and _SDPA_PRIORITY and not torch.compiler.is_compiling():
        order = _SDPA_PRIORITY
        if q.shape[2] != k.shape[2]:
            # cuDNN builds an execution plan per shape: worth it for prefill and training (T == S),
            # ~40 ms per call for decode steps whose S grows each token (measured on the H200,
            # also when PyTorch's own default picks it), so decode steps never ask for it
            order = tuple(n for n in order if n != "cudnn") or ("flash", "efficient", "math")
        return _sdpa_choice(order)(q, k, v, is_causal, scale, gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=gqa)


def _attend_sdpa(q, k, v, pattern, scale, q_offset):
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    kind = pattern.kind
    if kind == "full":
        return _sdpa_fused(q, k, v, False, scale, gqa)
    if kind == "causal" and q_offset == 0 and T == S:
        return _sdpa_fused(q, k, v, True, scale, gqa)
    if kind == "causal" and T == 1 and q_offset >= S - 1:
        # a decode step: the one query sees every cached key, so no mask is needed
        return _sdpa_fused(q, k, v, False, scale, gqa)
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(k).all() & torch.isfinite(q).all()):
        # SDPA turns a boolean mask into an additive one (0 / -inf: convert_boolean_attn_mask,
        # for the CPU flash and math kernels and CUDA's efficient one), so an inf or NaN score
        # of a pair outside the pattern gives inf + -inf = NaN and its whole row turns NaN; the
        # reference masks with where. Such inputs are rare: this O((T + S) D) check (one host
        # sync on CUDA, on this dense-mask path only) keeps SDPA for all others. A compiled
        # graph cannot branch on data: it keeps SDPA's behaviour.
        return attend_reference(q, k, v, pattern=pattern, scale=scale, q_offset=q_offset)
    mask = pattern.dense(T, S, q_offset=q_offset, batch=q.shape[0], heads=q.shape[1], device=q.device)
    # A row with no allowed key would come back NaN from SDPA: let it see key 0, then zero it.
    empty = ~mask.any(dim=-1, keepdim=True)  # (B|1, H|1, T, 1)
    first_key = torch.arange(S, device=q.device) == 0
    mask = mask | (empty & first_key)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.masked_fill(empty, 0.0)
