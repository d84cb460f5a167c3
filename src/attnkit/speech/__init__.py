"""Speech enhancement over STFT spectrograms (issue 28): MambAttention (arXiv 2507.00966), its
Mamba-only (SEMamba-style) and separate-attention baselines, and Mamba's selective scan in PyTorch.

Their cards (``kind="speech"``, family ``speech``) are :data:`CARDS`, a list of their own like
``attnkit.vision`` keeps: the models map a noisy spectrogram to an enhanced one, not a layer
``x [B, T, C] -> [B, T, C]``, so they stay out of the layer registry. The task (synthetic speech-like
signals, noises, SNRs, STFT helpers, SI-SDR) is :mod:`attnkit.tasks.speech`; the measured runs are
:mod:`attnkit.speech.experiments` (docs/speech.md).

    >>> from attnkit.speech import CARDS
    >>> model = next(c for c in CARDS if c.name == "mambattention").build(16, 4, freq_bins=65)
"""

from .cards import CARDS
from .mamba import BiMamba, MambaBlock, selective_scan, selective_scan_reference
from .mambattention import AxisAttention, MambAttention, MambAttentionBlock, enhancement_loss

__all__ = ["CARDS", "MambAttention", "MambAttentionBlock", "AxisAttention", "MambaBlock", "BiMamba",
           "selective_scan", "selective_scan_reference", "enhancement_loss"]
