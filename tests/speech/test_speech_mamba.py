"""Mamba's selective scan: the chunked path against the float64 sequential reference (forward, final
state and every gradient), the Mamba / bidirectional Mamba blocks against their float64 references,
causality, and the errors."""

import pytest
import torch

from attnkit.speech.mamba import (BiMamba, MambaBlock, bimamba_reference, mamba_block_reference, selective_scan,
                                  selective_scan_reference)


def rel_rms(ref, out):
    ref, out = ref.double(), out.double()
    return float((ref - out).norm() / ref.norm().clamp_min(1e-30))


def _scan_inputs(batch=2, channels=3, length=37, state=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return {"u": r(batch, channels, length), "delta": r(batch, channels, length),
            "A": -torch.rand(channels, state, generator=g, dtype=torch.float64) * 4,
            "B": r(batch, state, length), "C": r(batch, state, length), "D": r(channels),
            "z": r(batch, channels, length), "delta_bias": r(channels)}


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 37, 64])
@pytest.mark.parametrize("optional", [True, False])
def test_chunked_scan_matches_reference_forward_state_and_grads(chunk_size, optional):
    inputs = _scan_inputs()
    if not optional:
        inputs.update(D=None, z=None, delta_bias=None)
    leaves = {k: v.requires_grad_() for k, v in inputs.items() if v is not None}
    ref, ref_state = selective_scan_reference(**inputs, delta_softplus=True, return_last_state=True)
    out, state = selective_scan(**inputs, delta_softplus=True, return_last_state=True, chunk_size=chunk_size)
    assert out.shape == (2, 3, 37) and state.shape == (2, 3, 4)
    assert rel_rms(ref, out) < 1e-12 and rel_rms(ref_state, state) < 1e-12
    cot = torch.randn_like(ref)
    grads_ref = torch.autograd.grad((ref * cot).sum() + ref_state.sum(), list(leaves.values()))
    grads = torch.autograd.grad((out * cot).sum() + state.sum(), list(leaves.values()))
    for name, a, b in zip(leaves, grads_ref, grads):
        assert rel_rms(a, b) < 1e-11, name


def test_scan_float32_close_to_float64_reference_and_no_overflow_with_large_decays():
    inputs = _scan_inputs(length=200)
    inputs["A"] = inputs["A"] * 50  # decays down to exp(-200 * dt): a cumulative-exp trick would overflow
    ref = selective_scan_reference(**inputs, delta_softplus=True)
    out = selective_scan(**{k: v.float() for k, v in inputs.items()}, delta_softplus=True, chunk_size=16)
    assert torch.isfinite(out).all() and rel_rms(ref, out) < 1e-5


def test_mamba_block_and_bimamba_match_references():
    torch.manual_seed(0)
    block = MambaBlock(8, d_state=4, expand=2, chunk_size=4).double()
    x = torch.randn(3, 11, 8, dtype=torch.float64, requires_grad=True)
    out, ref = block(x), mamba_block_reference(x, block)
    assert rel_rms(ref, out) < 1e-12
    params = [x, *block.parameters()]
    cot = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ref, params, cot), torch.autograd.grad(out, params, cot)):
        assert rel_rms(a, b) < 1e-11
    bi = BiMamba(8, d_state=4, chunk_size=4).double()
    out, ref = bi(x), bimamba_reference(x, bi)
    assert rel_rms(ref, out) < 1e-12
    params = [x, *bi.parameters()]
    for a, b in zip(torch.autograd.grad(ref, params, cot), torch.autograd.grad(out, params, cot)):
        assert rel_rms(a, b) < 1e-11
    # the block's own reference scan is the same math
    block.scan = "reference"
    assert rel_rms(ref, bi(x)) < 1e-12 and rel_rms(mamba_block_reference(x, block), block(x)) < 1e-12


def test_mamba_block_is_causal_and_bimamba_is_not():
    torch.manual_seed(0)
    x = torch.randn(1, 12, 8, requires_grad=True)
    (grad,) = torch.autograd.grad(MambaBlock(8, d_state=4)(x)[0, 5].sum(), x)
    assert grad[0, 6:].abs().max() == 0 and grad[0, :6].abs().max() > 0
    (grad,) = torch.autograd.grad(BiMamba(8, d_state=4)(x)[0, 5].sum(), x)
    assert grad[0, 6:].abs().max() > 0


def test_mamba_initialisation_follows_the_paper():
    block = MambaBlock(32, d_state=6, expand=2, dt_min=1e-3, dt_max=0.1)
    assert block.A_log.shape == (64, 6) and torch.allclose(block.A_log[0].exp(), torch.arange(1.0, 7.0))
    assert block.dt_rank == 2 and torch.equal(block.D, torch.ones(64))
    dt = torch.nn.functional.softplus(block.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001


def test_scan_and_block_errors():
    inputs = _scan_inputs()
    with pytest.raises(ValueError, match=r"A must be \[E, N\] with E = 3"):
        selective_scan(**{**inputs, "A": inputs["A"][:2]})
    with pytest.raises(ValueError, match=r"B must have shape \[2, 4, 37\]"):
        selective_scan(**{**inputs, "B": inputs["B"][:, :, :5]})
    with pytest.raises(ValueError, match=r"u must be \[B, E, L\]"):
        selective_scan_reference(**{**inputs, "u": inputs["u"][0]})
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        selective_scan(**inputs, chunk_size=0)
    with pytest.raises(ValueError, match="scan must be one of chunked, reference, got 'cuda'"):
        MambaBlock(8, scan="cuda")
    with pytest.raises(ValueError, match="need 0 < dt_min <= dt_max"):
        MambaBlock(8, dt_min=0.5, dt_max=0.1)
    with pytest.raises(ValueError, match=r"x must be \[B, L, C\] with C = 8, got shape \(2, 5, 7\)"):
        MambaBlock(8)(torch.randn(2, 5, 7))
