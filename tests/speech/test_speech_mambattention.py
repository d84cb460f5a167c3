"""MambAttention: the block against its float64 reference (forward and every gradient, for shared,
separate and no attention), the shared time/frequency attention against a plain float64 attention,
the model's shapes and errors, the cards, and a training smoke test."""

import pytest
import torch

from attnkit.speech import CARDS, MambAttention, MambAttentionBlock, enhancement_loss
from attnkit.speech.mambattention import block_reference, tf_attention_reference
from attnkit.tasks.speech import SpeechTask, stft


def rel_rms(ref, out):
    ref, out = ref.double(), out.double()
    return float((ref - out).norm() / ref.norm().clamp_min(1e-30))


@pytest.mark.parametrize("attention", ["shared", "separate", "none"])
def test_block_matches_reference_forward_and_grads(attention):
    torch.manual_seed(0)
    block = MambAttentionBlock(8, 2, attention=attention, d_state=3, expand=1, chunk_size=4).double()
    x = torch.randn(2, 8, 6, 5, dtype=torch.float64, requires_grad=True)
    out, ref = block(x), block_reference(block, x)
    assert out.shape == x.shape and rel_rms(ref, out) < 1e-12
    params = [x, *block.parameters()]
    cot = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ref, params, cot), torch.autograd.grad(out, params, cot)):
        assert rel_rms(a, b) < 1e-11


def test_shared_attention_is_one_module_and_matches_plain_attention_on_both_axes():
    torch.manual_seed(0)
    block = MambAttentionBlock(8, 2, attention="shared", d_state=3).double()
    assert block.time_attention is block.freq_attention
    separate = MambAttentionBlock(8, 2, attention="separate", d_state=3)
    none = MambAttentionBlock(8, 2, attention="none", d_state=3)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    attention_params = count(block.time_attention)
    assert count(separate) - count(block) == attention_params and count(block) - count(none) == attention_params
    x = torch.randn(2, 8, 7, 5, dtype=torch.float64, requires_grad=True)
    B, C, T, Fq = x.shape
    along_time = block.time_attention(x.permute(0, 3, 2, 1).reshape(B * Fq, T, C))  # the block's reshapes
    along_time = along_time.view(B, Fq, T, C).permute(0, 3, 2, 1)
    along_freq = block.freq_attention(x.permute(0, 2, 3, 1).reshape(B * T, Fq, C)).view(B, T, Fq, C).permute(0, 3, 1, 2)
    ref_time, ref_freq = tf_attention_reference(block, x)
    assert rel_rms(ref_time, along_time) < 1e-12 and rel_rms(ref_freq, along_freq) < 1e-12
    assert rel_rms(ref_time, ref_freq) > 0.1  # the same weights, different axes: different outputs
    params = [x, *block.parameters()]
    cot_t, cot_f = torch.randn_like(ref_time), torch.randn_like(ref_freq)
    ref_loss = (ref_time * cot_t).sum() + (ref_freq * cot_f).sum()
    loss = (along_time * cot_t).sum() + (along_freq * cot_f).sum()
    ref_grads = torch.autograd.grad(ref_loss, params, allow_unused=True)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    checked = 0
    for a, b in zip(ref_grads, grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel_rms(a, b) < 1e-11
            checked += 1
    assert checked == 1 + len(list(block.time_attention.parameters()))


def test_model_shapes_and_enhance():
    torch.manual_seed(0)
    model = MambAttention(dim=8, num_heads=2, freq_bins=33, num_blocks=1, dense_depth=1, d_state=3, expand=1)
    mag, phase = torch.rand(2, 33, 10), torch.rand(2, 33, 10) * 6 - 3
    out_mag, out_phase, out_complex = model(mag, phase)
    assert out_mag.shape == (2, 33, 10) and out_phase.shape == (2, 33, 10) and out_complex.shape == (2, 33, 10, 2)
    assert (out_mag >= 0).all() and (out_mag <= 2.0 * mag + 1e-6).all()  # a mask in [0, beta]
    assert out_phase.abs().max() <= torch.pi + 1e-6
    wave = torch.randn(2, 600)
    assert model.enhance(wave, n_fft=64, hop=32).shape == (2, 600)


def test_model_and_block_errors():
    with pytest.raises(ValueError, match="attention must be one of shared, separate, none, got 'cross'"):
        MambAttentionBlock(8, 2, attention="cross")
    with pytest.raises(ValueError, match="dim=8 must be divisible by num_heads=3"):
        MambAttentionBlock(8, 3)
    MambAttentionBlock(8, 3, attention="none")  # no attention: any head count
    with pytest.raises(ValueError, match=r"x must be \[B, C, T, F\] with C = 8, got shape \(2, 4, 5, 6\)"):
        MambAttentionBlock(8, 2)(torch.randn(2, 4, 5, 6))
    with pytest.raises(ValueError, match="freq_bins must be odd and >= 3"):
        MambAttention(8, 2, freq_bins=64)
    model = MambAttention(8, 2, freq_bins=33, num_blocks=1, dense_depth=1)
    with pytest.raises(ValueError, match=r"magnitude must be \[B, F, T\] with F = 33, got shape \(2, 65, 4\)"):
        model(torch.rand(2, 65, 4), torch.rand(2, 65, 4))
    with pytest.raises(ValueError, match=r"phase must have magnitude's shape \(2, 33, 4\)"):
        model(torch.rand(2, 33, 4), torch.rand(2, 33, 5))
    with pytest.raises(ValueError, match="n_fft=128 gives 65 bins; this model takes freq_bins=33"):
        model.enhance(torch.randn(1, 800), n_fft=128, hop=64)
    with pytest.raises(ValueError, match="attention='none'"):
        tf_attention_reference(MambAttentionBlock(8, 2, attention="none"), torch.randn(1, 8, 3, 3))
    with pytest.raises(ValueError, match="num_blocks must be a positive integer, got 0"):
        MambAttention(8, 2, num_blocks=0)


def test_cards_build_and_flop_models():
    cards = {c.name: c for c in CARDS}
    assert set(cards) == {"mambattention", "mambattention-separate", "semamba"}
    assert all(c.kind == "speech" and c.family == "speech" for c in CARDS)
    models = {name: c.build(16, 4, freq_bins=65, num_blocks=1) for name, c in cards.items()}
    assert models["mambattention"].blocks[0].attention == "shared"
    assert models["semamba"].blocks[0].time_attention is None
    flops = {name: c.flop_count(2, 50, 16, 4, freq_bins=65) for name, c in cards.items()}
    assert flops["semamba"].attention_fwd == 0 and flops["mambattention"].attention_fwd > 0
    assert flops["mambattention"].fwd == flops["mambattention-separate"].fwd > flops["semamba"].fwd
    # the attention core is quadratic in T: doubling the frames more than doubles it
    longer = cards["mambattention"].flop_count(2, 100, 16, 4, freq_bins=65)
    assert longer.attention_fwd > 2 * flops["mambattention"].attention_fwd
    with pytest.raises(ValueError, match="does not take option"):
        cards["mambattention"].build(16, 4, window=3)


@pytest.fixture
def one_thread():
    """Small ops: one thread is faster than two contending ones on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_training_smoke_loss_decreases(one_thread):
    torch.manual_seed(0)
    task = SpeechTask(sample_rate=8000, seconds=0.25)
    data = task.mixtures(4, seed=0)
    model = MambAttention(dim=8, num_heads=2, freq_bins=33, num_blocks=1, dense_depth=1, d_state=3, expand=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    mag, phase = stft(data["noisy"], n_fft=64, hop=32)
    for _ in range(15):
        loss, terms = enhancement_loss(model(mag, phase), data["clean"], n_fft=64, hop=32)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert set(terms) == {"magnitude", "phase", "complex", "time", "consistency"}
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3
