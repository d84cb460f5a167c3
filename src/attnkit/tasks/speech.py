"""Synthetic single-channel speech enhancement: speech-like clean signals, noise of several kinds at
chosen SNRs, STFT / iSTFT helpers and SI-SDR.

No speech corpus can be downloaded here, so the clean signals are made: each clip is a sequence of
syllables (120-300 ms, raised-cosine envelopes, short pauses). A voiced syllable is a harmonic series
on a time-varying pitch (90-240 Hz, vibrato and glide) shaped by three moving formant resonances
(vowel targets interpolated across the clip, Lorentzian bandwidths) and a spectral tilt; an unvoiced
one is high-passed noise (a fricative). The clean target is known exactly, so SI-SDR improvement is
measured without a listening test.

Noise kinds (:data:`NOISES`), each a function of a seeded generator:

- ``white``, ``pink`` (1/f power), ``brown`` (1/f^2 power): stationary coloured noise;
- ``hum``: mains/engine hum, a 50 or 60 Hz harmonic series to ~1 kHz plus a little white noise;
- ``babble``: the sum of 4-6 other speech-like signals (the hardest: the noise looks like the target);
- ``bursts``: impulsive band-limited noise bursts with sharp onsets (doors, keyboards).

The experiment trains on ``white, pink, hum`` (:data:`TRAIN_NOISES`) and tests on them and on the
unseen ``babble`` and ``bursts`` and on lower SNRs: the out-of-domain generalisation the MambAttention
paper is about (arXiv 2507.00966, trained on VB-DemandEx, tested on DNS 2020 and EARS-WHAM_v2).

    >>> task = SpeechTask(sample_rate=8000, seconds=0.5)
    >>> data = task.mixtures(8, seed=0)
    >>> data["noisy"].shape, data["clean"].shape       # (8, 4000) each; noisy = clean + noise
    >>> mag, phase = stft(data["noisy"], n_fft=128, hop=64)   # (8, 65, 63), compressed magnitude
    >>> si_sdr(data["noisy"], data["clean"]).shape              # (8,) in dB
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["NOISES", "TRAIN_NOISES", "SpeechTask", "speech_like", "make_noise", "mix_at_snr", "stft", "istft",
           "si_sdr"]

NOISES = ("white", "pink", "brown", "hum", "babble", "bursts")
#: the in-domain noise kinds of the experiment; the others are out of domain
TRAIN_NOISES = ("white", "pink", "hum")

# vowel formant targets (F1, F2, F3) in Hz, roughly the cardinal vowels of adult speech
_VOWELS = torch.tensor([[730, 1090, 2440], [270, 2290, 3010], [300, 870, 2240], [530, 1840, 2480],
                        [570, 840, 2410], [660, 1720, 2410], [440, 1020, 2240], [390, 1990, 2550]], dtype=torch.float64)


def _uniform(low: float, high: float, generator: torch.Generator, size=()) -> Tensor:
    return low + (high - low) * torch.rand(size, generator=generator, dtype=torch.float64)


def _speech_clip(length: int, sample_rate: int, generator: torch.Generator) -> Tensor:
    """One speech-like clip ``[length]`` (float64, unit RMS over the clip)."""
    t = torch.arange(length, dtype=torch.float64) / sample_rate
    duration = length / sample_rate
    # pitch: a speaker's base, vibrato and a glide over the clip
    base = _uniform(90.0, 240.0, generator)
    rate, depth = _uniform(0.5, 3.0, generator), _uniform(0.03, 0.15, generator)
    phase0 = _uniform(0, 2 * math.pi, generator)
    glide = _uniform(-0.3, 0.3, generator)
    f0 = base * (1 + depth * torch.sin(2 * math.pi * rate * t + phase0)) * (1 + glide * t / duration)  # (L,)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / sample_rate
    # formants: vowel targets at random times, linearly interpolated, jittered per speaker
    knots = max(2, int(duration * 6) + 2)
    vowels = _VOWELS[torch.randint(len(_VOWELS), (knots,), generator=generator)]  # (knots, 3)
    vowels = vowels * _uniform(0.9, 1.15, generator)
    position = t / duration * (knots - 1)
    left = position.floor().long().clamp(max=knots - 2)
    frac = (position - left)[:, None]
    formants = vowels[left] * (1 - frac) + vowels[left + 1] * frac  # (L, 3)
    bandwidths = torch.tensor([90.0, 120.0, 160.0], dtype=torch.float64)
    gains = torch.tensor([1.0, 0.6, 0.3], dtype=torch.float64)
    harmonics = torch.arange(1, int(0.95 * sample_rate / 2 / 90.0) + 1, dtype=torch.float64)  # (K,)
    # the harmonic amplitudes change slowly: compute them every 5 ms and interpolate
    coarse = torch.linspace(0, length - 1, length * 200 // sample_rate + 2).round().long()
    freqs = f0[coarse, None] * harmonics[None]  # (frames, K)
    resonance = gains / (1 + ((freqs[:, :, None] - formants[coarse, None, :]) / bandwidths) ** 2)  # (frames, K, 3)
    amplitude = resonance.sum(-1) / harmonics.sqrt() * (freqs < 0.95 * sample_rate / 2)  # tilt, no aliasing
    amplitude = torch.nn.functional.interpolate(amplitude.T[None], size=length, mode="linear",
                                                align_corners=True)[0].T  # (L, K)
    voiced = (amplitude * torch.sin(phase[:, None] * harmonics[None])).sum(-1)  # (L,)
    fricative = torch.randn(length, generator=generator, dtype=torch.float64)
    fricative = torch.cat((fricative[:1], fricative[1:] - 0.95 * fricative[:-1]))  # high-passed
    fricative = fricative * voiced.std() / fricative.std() * 0.5
    # syllables: envelopes over voiced or unvoiced stretches, separated by short pauses
    signal = torch.zeros(length, dtype=torch.float64)
    start = int(_uniform(0.0, 0.08, generator) * sample_rate)
    while start < length:
        size = int(_uniform(0.12, 0.3, generator) * sample_rate)
        stop = min(length, start + size)
        window = torch.hann_window(size, periodic=False, dtype=torch.float64)[: stop - start]
        source = voiced if float(torch.rand((), generator=generator)) < 0.8 else fricative
        signal[start:stop] += window * source[start:stop] * _uniform(0.5, 1.0, generator)
        start = stop + int(_uniform(0.02, 0.1, generator) * sample_rate)
    return signal / signal.pow(2).mean().sqrt().clamp_min(1e-12)


def speech_like(count: int, length: int, sample_rate: int, generator: torch.Generator) -> Tensor:
    """``count`` speech-like clips ``[count, length]`` (float64, unit RMS each)."""
    return torch.stack([_speech_clip(length, sample_rate, generator) for _ in range(count)])


def _coloured(length: int, exponent: float, generator: torch.Generator) -> Tensor:
    """Gaussian noise whose power falls as 1/f^exponent (shaped in the Fourier domain)."""
    spectrum = torch.fft.rfft(torch.randn(length, generator=generator, dtype=torch.float64))
    freqs = torch.arange(spectrum.shape[0], dtype=torch.float64).clamp_min(1.0)
    return torch.fft.irfft(spectrum / freqs ** (exponent / 2), n=length)


def make_noise(kind: str, length: int, sample_rate: int, generator: torch.Generator) -> Tensor:
    """One noise clip ``[length]`` (float64, unit RMS) of ``kind`` (one of :data:`NOISES`)."""
    t = torch.arange(length, dtype=torch.float64) / sample_rate
    if kind == "white":
        noise = torch.randn(length, generator=generator, dtype=torch.float64)
    elif kind == "pink":
        noise = _coloured(length, 1.0, generator)
    elif kind == "brown":
        noise = _coloured(length, 2.0, generator)
    elif kind == "hum":
        mains = 50.0 if float(torch.rand((), generator=generator)) < 0.5 else 60.0
        mains = mains * _uniform(0.97, 1.03, generator)  # engines and fans drift off the mains frequency
        orders = torch.arange(1, int(1000 / mains) + 1, dtype=torch.float64)
        amplitude = _uniform(0.2, 1.0, generator, (len(orders),)) / orders.sqrt()
        phases = _uniform(0.0, 2 * math.pi, generator, (len(orders),))
        noise = (amplitude * torch.sin(2 * math.pi * mains * orders * t[:, None] + phases)).sum(-1)
        noise = noise / noise.std() + 0.1 * torch.randn(length, generator=generator, dtype=torch.float64)
    elif kind == "babble":
        talkers = int(torch.randint(4, 7, (), generator=generator))
        noise = speech_like(talkers, length, sample_rate, generator).sum(0)
    elif kind == "bursts":
        noise = torch.zeros(length, dtype=torch.float64)
        for _ in range(int(torch.randint(3, 8, (), generator=generator))):
            size = int(_uniform(0.01, 0.08, generator) * sample_rate)
            start = int(torch.randint(0, max(1, length - size), (), generator=generator))
            burst = torch.randn(size, generator=generator, dtype=torch.float64)
            centre = _uniform(300.0, 0.8 * sample_rate / 2, generator)  # a band around a random centre
            burst = torch.fft.rfft(burst)
            freqs = torch.fft.rfftfreq(size, 1 / sample_rate, dtype=torch.float64)
            burst = torch.fft.irfft(burst * torch.exp(-(((freqs - centre) / (0.3 * centre)) ** 2)), n=size)
            decay = torch.exp(-torch.arange(size, dtype=torch.float64) / (0.3 * size))  # sharp onset
            noise[start:start + size] += burst * decay * _uniform(0.5, 2.0, generator)
        noise = noise + 0.02 * torch.randn(length, generator=generator, dtype=torch.float64)
    else:
        raise ValueError(f"noise kind must be one of {', '.join(NOISES)}, got {kind!r}")
    return noise / noise.pow(2).mean().sqrt().clamp_min(1e-12)


def mix_at_snr(clean: Tensor, noise: Tensor, snr_db: Tensor) -> Tensor:
    """``clean + g * noise`` with ``g`` per row so that ``10 log10(|clean|^2 / |g noise|^2) = snr_db``
    (``clean``, ``noise`` ``[B, L]``, ``snr_db`` ``[B]``)."""
    power_clean = clean.pow(2).mean(-1)
    power_noise = noise.pow(2).mean(-1).clamp_min(1e-20)
    gain = (power_clean / (power_noise * 10 ** (snr_db / 10))).sqrt()
    return clean + gain[:, None] * noise


@dataclass(frozen=True)
class SpeechTask:
    """Noisy / clean pairs of speech-like clips.

    Args:
        sample_rate: Hz (8000 by default: telephone band, small spectrograms).
        seconds: clip length.
        noises: the noise kinds mixed in by default (the in-domain set, :data:`TRAIN_NOISES`).
        snr_range: SNR in dB, drawn uniformly per clip by default.
    """

    sample_rate: int = 8000
    seconds: float = 0.5
    noises: tuple[str, ...] = TRAIN_NOISES
    snr_range: tuple[float, float] = (-5.0, 10.0)

    def __post_init__(self):
        if isinstance(self.sample_rate, bool) or not isinstance(self.sample_rate, int) or self.sample_rate < 1000:
            raise ValueError(f"sample_rate must be an integer >= 1000 Hz, got {self.sample_rate!r}")
        if not (isinstance(self.seconds, (int, float)) and 0.05 <= self.seconds <= 60):
            raise ValueError(f"seconds must be a number in [0.05, 60], got {self.seconds!r}")
        self._check_options(self.noises, self.snr_range)

    @staticmethod
    def _check_options(noises, snr_range) -> None:
        if not noises or any(kind not in NOISES for kind in noises):
            raise ValueError(f"noises must be a non-empty tuple of {', '.join(NOISES)}, got {noises!r}")
        if len(snr_range) != 2 or not snr_range[0] <= snr_range[1]:
            raise ValueError(f"snr_range must be (low, high) in dB with low <= high, got {snr_range!r}")

    @property
    def length(self) -> int:
        return int(round(self.seconds * self.sample_rate))

    def mixtures(self, count: int, *, seed: int, noises: tuple[str, ...] | None = None,
                 snr_range: tuple[float, float] | None = None) -> dict:
        """``count`` mixtures, deterministic given ``seed``: ``clean``, ``noisy``, ``noise`` ``[count, L]``
        (float32; the mixture scaled to unit RMS and the clean target by the same factor), ``snr`` ``[count]``
        (dB), ``kind`` (a list of noise kind names)."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be a positive integer, got {count!r}")
        noises = self.noises if noises is None else tuple(noises)
        snr_range = self.snr_range if snr_range is None else tuple(snr_range)
        self._check_options(noises, snr_range)
        generator = torch.Generator().manual_seed(seed)
        clean = speech_like(count, self.length, self.sample_rate, generator)
        kinds = [noises[int(i)] for i in torch.randint(len(noises), (count,), generator=generator)]
        noise = torch.stack([make_noise(kind, self.length, self.sample_rate, generator) for kind in kinds])
        snr = _uniform(snr_range[0], snr_range[1], generator, (count,))
        noisy = mix_at_snr(clean, noise, snr)
        scale = noisy.pow(2).mean(-1, keepdim=True).sqrt().reciprocal()
        clean, noisy = clean * scale, noisy * scale
        return {"clean": clean.float(), "noisy": noisy.float(), "noise": (noisy - clean).float(), "snr": snr.float(),
                "kind": kinds}


def stft(wave: Tensor, *, n_fft: int, hop: int, compress: float = 0.3) -> tuple[Tensor, Tensor]:
    """``wave [B, L]`` -> (compressed magnitude ``|X|^compress``, phase), each ``[B, F, T]`` with
    F = n_fft // 2 + 1 (Hann window of n_fft, centred frames, reflect padding: the official code's
    ``mag_phase_stft`` with ``compress_factor`` 0.3)."""
    if wave.dim() != 2:
        raise ValueError(f"wave must be [B, L], got shape {tuple(wave.shape)}")
    if not 0 < hop <= n_fft:
        raise ValueError(f"need 0 < hop <= n_fft, got hop={hop}, n_fft={n_fft}")
    window = torch.hann_window(n_fft, device=wave.device, dtype=wave.dtype)
    spec = torch.stft(wave, n_fft, hop_length=hop, window=window, center=True, pad_mode="reflect", return_complex=True)
    return spec.abs().clamp_min(1e-10).pow(compress), spec.angle()


def istft(magnitude: Tensor, phase: Tensor, *, n_fft: int, hop: int, length: int, compress: float = 0.3) -> Tensor:
    """The inverse of :func:`stft`: ``[B, F, T]`` magnitude (compressed) and phase -> ``wave [B, length]``."""
    magnitude = magnitude.clamp_min(0).pow(1.0 / compress)
    spec = torch.polar(magnitude, phase)
    window = torch.hann_window(n_fft, device=magnitude.device, dtype=magnitude.dtype)
    return torch.istft(spec, n_fft, hop_length=hop, window=window, center=True, length=length)


def si_sdr(estimate: Tensor, target: Tensor, *, eps: float = 1e-8) -> Tensor:
    """Scale-invariant signal-to-distortion ratio in dB, per row of ``[B, L]`` (Le Roux et al., "SDR -
    half-baked or well done?", arXiv 1811.02508): with zero-mean signals, ``s = (<e, t> / |t|^2) t``,
    ``SI-SDR = 10 log10(|s|^2 / |e - s|^2)``."""
    if estimate.shape != target.shape or estimate.dim() != 2:
        raise ValueError(f"estimate and target must both be [B, L] of one shape, got {tuple(estimate.shape)} "
                         f"and {tuple(target.shape)}")
    estimate = estimate - estimate.mean(-1, keepdim=True)
    target = target - target.mean(-1, keepdim=True)
    alpha = (estimate * target).sum(-1, keepdim=True) / (target.pow(2).sum(-1, keepdim=True) + eps)
    projection = alpha * target
    residual = estimate - projection
    return 10 * torch.log10((projection.pow(2).sum(-1) + eps) / (residual.pow(2).sum(-1) + eps))
