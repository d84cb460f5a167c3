"""attnkit.tasks.speech: determinism by seed, the SNRs the mixtures are made at, the noise kinds,
STFT / iSTFT, and SI-SDR (scale invariance and exact values on constructed cases)."""

import math

import pytest
import torch

from attnkit.tasks.speech import NOISES, SpeechTask, make_noise, si_sdr, speech_like, stft, istft


def test_mixtures_are_deterministic_by_seed_and_differ_across_seeds():
    task = SpeechTask(sample_rate=8000, seconds=0.25)
    a, b, c = task.mixtures(3, seed=5), task.mixtures(3, seed=5), task.mixtures(3, seed=6)
    assert torch.equal(a["noisy"], b["noisy"]) and torch.equal(a["clean"], b["clean"]) and a["kind"] == b["kind"]
    assert not torch.equal(a["clean"], c["clean"])
    assert a["noisy"].shape == (3, 2000) and a["noisy"].dtype == torch.float32


def test_mixtures_hit_the_requested_snr_and_unit_rms():
    task = SpeechTask(sample_rate=8000, seconds=0.25)
    data = task.mixtures(6, seed=0, noises=("pink", "babble"), snr_range=(-7.0, 3.0))
    measured = 10 * torch.log10(data["clean"].double().pow(2).sum(-1) / data["noise"].double().pow(2).sum(-1))
    assert torch.allclose(measured, data["snr"].double(), atol=1e-3)
    assert ((data["snr"] >= -7) & (data["snr"] <= 3)).all()
    assert set(data["kind"]) <= {"pink", "babble"}
    assert torch.allclose(data["noisy"].pow(2).mean(-1), torch.ones(6), atol=1e-4)
    # the noisy input's SI-SDR tracks the SNR (it equals it up to the noise's chance correlation)
    assert (si_sdr(data["noisy"], data["clean"]) - data["snr"]).abs().max() < 1.5


def test_every_noise_kind_is_unit_rms_and_distinct():
    g = torch.Generator().manual_seed(0)
    noises = {kind: make_noise(kind, 4000, 8000, g) for kind in NOISES}
    for kind, noise in noises.items():
        assert noise.shape == (4000,) and abs(float(noise.pow(2).mean()) - 1) < 1e-9, kind
    spectra = {k: torch.fft.rfft(n).abs() ** 2 for k, n in noises.items()}
    low = lambda s: float(s[:250].sum() / s.sum())  # noqa: E731 -- share of power below 500 Hz
    assert low(spectra["brown"]) > low(spectra["pink"]) > low(spectra["white"])
    assert low(spectra["hum"]) > 0.5
    clean = speech_like(2, 4000, 8000, g)
    assert clean.shape == (2, 4000) and torch.allclose(clean.pow(2).mean(-1), torch.ones(2, dtype=torch.float64))


def test_stft_istft_round_trip_and_shapes():
    wave = torch.randn(2, 4000)
    mag, phase = stft(wave, n_fft=128, hop=64)
    assert mag.shape == phase.shape == (2, 65, 63)
    assert torch.allclose(istft(mag, phase, n_fft=128, hop=64, length=4000), wave, atol=1e-4)
    plain, _ = stft(wave, n_fft=128, hop=64, compress=1.0)
    assert torch.allclose(plain.clamp_min(1e-10) ** 0.3, mag, atol=1e-5)


def test_si_sdr_known_values_and_scale_invariance():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(3, 1000, generator=g, dtype=torch.float64)
    target = target - target.mean(-1, keepdim=True)
    noise = torch.randn(3, 1000, generator=g, dtype=torch.float64)
    noise = noise - noise.mean(-1, keepdim=True)
    noise = noise - (noise * target).sum(-1, keepdim=True) / target.pow(2).sum(-1, keepdim=True) * target  # orthogonal
    for db in (-5.0, 0.0, 10.0, 20.0):
        ratio = target.pow(2).sum(-1, keepdim=True) / noise.pow(2).sum(-1, keepdim=True)
        scaled = noise * (ratio / 10 ** (db / 10)).sqrt()
        estimate = target + scaled
        assert torch.allclose(si_sdr(estimate, target), torch.full((3,), db, dtype=torch.float64), atol=1e-6)
        # scale invariance of estimate and target, and an offset is removed
        assert torch.allclose(si_sdr(3.7 * estimate + 0.5, target), si_sdr(estimate, target), atol=1e-6)
        assert torch.allclose(si_sdr(estimate, 0.2 * target), si_sdr(estimate, target), atol=1e-6)
    # a pure rescale of the target is perfect; a sign flip is too (alpha < 0 keeps the projection)
    assert (si_sdr(0.1 * target, target) > 60).all()
    assert torch.allclose(si_sdr(target + 0.1 * noise, target), si_sdr(-(target + 0.1 * noise), target))


def test_task_errors():
    with pytest.raises(ValueError, match="noise kind must be one of white, pink"):
        make_noise("rain", 100, 8000, torch.Generator())
    with pytest.raises(ValueError, match="noises must be a non-empty tuple of"):
        SpeechTask(noises=("white", "rain"))
    with pytest.raises(ValueError, match=r"snr_range must be \(low, high\)"):
        SpeechTask().mixtures(2, seed=0, snr_range=(5, -5))
    with pytest.raises(ValueError, match="sample_rate must be an integer >= 1000 Hz, got 8000.0"):
        SpeechTask(sample_rate=8000.0)
    with pytest.raises(ValueError, match="count must be a positive integer, got 0"):
        SpeechTask().mixtures(0, seed=0)
    with pytest.raises(ValueError, match=r"estimate and target must both be \[B, L\]"):
        si_sdr(torch.randn(2, 10), torch.randn(2, 11))
    with pytest.raises(ValueError, match="need 0 < hop <= n_fft"):
        stft(torch.randn(1, 100), n_fft=32, hop=64)
    assert math.isfinite(float(si_sdr(torch.zeros(1, 10), torch.ones(1, 10))))
