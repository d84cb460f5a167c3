"""The speech models' cards (``kind="speech"``, family ``speech``), listed explicitly. In a FLOP model
``batch`` is the number of clips and ``seq`` the number of STFT frames T; the config's ``freq_bins``
is F = n_fft // 2 + 1 (default 65: n_fft 128)."""

from __future__ import annotations

from ..cards import Capabilities, Card
from .mambattention import MambAttention, mambattention_flops

__all__ = ["CARDS"]

_CAPS = Capabilities(causal=False, bidirectional=True, decode=False, varlen=False, backends=("reference", "sdpa"))
_TITLE = "MambAttention: Mamba with Multi-Head Attention for Generalizable Single-Channel Speech Enhancement"

CARDS = (
    Card("mambattention", _TITLE, "2507.00966", "speech", MambAttention, mambattention_flops,
         defaults={"attention": "shared"}, kind="speech", capabilities=_CAPS,
         summary="STFT-domain blocks: time MHA then bidirectional time Mamba, frequency MHA then frequency "
                 "Mamba, the time and frequency MHA sharing one set of weights; magnitude mask + phase decoders"),
    Card("mambattention-separate", _TITLE + " (ablation: separate time / frequency attention weights)",
         "2507.00966", "speech", MambAttention, mambattention_flops, defaults={"attention": "separate"},
         kind="speech", capabilities=_CAPS,
         summary="MambAttention with its own MHA weights per axis: the paper's no-sharing ablation"),
    Card("semamba", "An Investigation of Incorporating Mamba for Speech Enhancement", "2405.06573", "speech",
         MambAttention, mambattention_flops, defaults={"attention": "none"}, kind="speech", capabilities=_CAPS,
         summary="the same model without attention: bidirectional Mamba along time and frequency only "
                 "(SEMamba's time-frequency Mamba blocks; MambAttention's Mamba-only baseline)"),
)
