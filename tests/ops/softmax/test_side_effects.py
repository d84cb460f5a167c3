"""Using attnkit changes nothing process-wide: Inductor's FlexAttention backward tiles are extended
only on request, and dynamo's recompile limit is raised only inside attnkit's own compiled calls."""

import torch
from torch import _dynamo

import attnkit
from attnkit import patterns
from attnkit.ops.softmax import flex as flex_module
from attnkit.ops.softmax import sdpa as sdpa_module


def _bwd_configs_hook():
    from torch._inductor.choices import InductorChoices

    return InductorChoices.get_flex_attention_bwd_configs


def test_attend_leaves_dynamo_and_inductor_alone():
    limit, hook = _dynamo.config.recompile_limit, _bwd_configs_hook()
    q = torch.randn(1, 2, 40, 16, requires_grad=True)
    for backend in ("reference", "sdpa", "auto"):
        attnkit.attend(q, q, q, pattern=patterns.sliding_window(8), backend=backend).sum().backward()
    layer = attnkit.build("s2", dim=32, num_heads=2, block_size=4, local_blocks=2, vert_stride=2)
    layer(torch.randn(1, 40, 32)).sum().backward()
    assert _dynamo.config.recompile_limit == limit
    assert _bwd_configs_hook() is hook


def test_small_backward_tiles_are_opt_in_and_reversible():
    hook = _bwd_configs_hook()
    cuda = torch.device("cuda")
    assert not flex_module.flex_small_blocks(cuda, training=True)  # default: 128-token blocks in training
    assert flex_module.flex_small_blocks(cuda, training=False)  # inference needs no new tile
    assert not flex_module.flex_small_blocks(torch.device("cpu"), training=False)
    try:
        assert flex_module.enable_small_flex_backward_tiles() is True
        assert _bwd_configs_hook() is not hook
        assert flex_module.flex_small_blocks(cuda, training=True)
        if torch.cuda.is_available():  # Inductor's own heuristics read the device
            from torch._inductor.choices import InductorChoices

            configs = _bwd_configs_hook()(InductorChoices(), 64, torch.bfloat16, "cuda")
            assert any((c.block_m1, c.block_n1) == (64, 64) for c in configs)
    finally:
        flex_module.enable_small_flex_backward_tiles(False)
    assert _bwd_configs_hook() is hook
    assert not flex_module.flex_small_blocks(cuda, training=True)
    with flex_module.small_flex_backward_tiles():
        assert flex_module.flex_small_blocks(cuda, training=True)
    assert _bwd_configs_hook() is hook and not flex_module.flex_small_blocks(cuda, training=True)


def test_flex_pads_head_dims_below_16_exactly(monkeypatch):
    """FlexAttention's CUDA kernels refuse head dims under 16 (Inductor's NYI error inside
    torch.compile on the H200): attend zero-pads them. The padded path, forced here on CPU, equals the
    reference: output and lse, with a score_mod and GQA, for D = 8 and Dv = 4."""
    real = flex_module._flex_pads_head_dims
    assert not real(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8))  # CPU's flex takes any head dim
    monkeypatch.setattr(flex_module, "_flex_pads_head_dims", lambda q, v: True)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 20, 8), torch.randn(2, 2, 20, 8), torch.randn(2, 2, 20, 4)

    def bias(score, b, h, q_pos, k_pos):
        return score + 0.1 * (q_pos - k_pos)

    for scale in (None, 0.3):
        out, lse = attnkit.attend(q, k, v, pattern="causal", score_mod=bias, scale=scale, return_lse=True,
                                  backend="flex")
        ref, ref_lse = attnkit.attend(q, k, v, pattern="causal", score_mod=bias, scale=scale, return_lse=True,
                                      backend="reference")
        assert out.shape == (2, 4, 20, 4)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def _sdp_state():
    C = torch._C
    flags = tuple(getattr(C, f"_get_{f}_sdp_enabled")() for f in ("cudnn", "flash", "mem_efficient", "math"))
    return flags, C._get_sdp_priority_order()


def test_sdpa_backend_choice_matches_sdpa_kernel_and_restores():
    """attend's per-call SDPA backend choice (cheaper than sdpa_kernel's context manager) sets the
    same switches as ``sdpa_kernel(order, set_priority=True)`` during the call, and restores them
    after it, also when the call raises."""
    from torch.nn.attention import sdpa_kernel

    before = _sdp_state()
    for order in [("cudnn", "flash", "efficient", "math"), ("flash", "efficient", "math"), ("math",)]:
        choice = sdpa_module._sdpa_choice(order)
        with sdpa_kernel(choice.backends, set_priority=True):
            expected = _sdp_state()
        seen = []
        real = torch.nn.functional.scaled_dot_product_attention

        def spy(*args, **kwargs):
            seen.append(_sdp_state())
            return real(*args, **kwargs)

        q = torch.randn(1, 2, 5, 8)
        try:
            torch.nn.functional.scaled_dot_product_attention = spy
            out = choice(q, q, q, True, None, False)
        finally:
            torch.nn.functional.scaled_dot_product_attention = real
        assert seen == [expected]
        torch.testing.assert_close(out, real(q, q, q, is_causal=True))
        assert _sdp_state() == before
        try:
            choice(q, q, torch.randn(1, 2, 6, 8), True, None, False)  # mismatched v: SDPA raises
        except RuntimeError:
            pass
        assert _sdp_state() == before


def test_a_nan_score_gives_nan_not_zeros():
    """A NaN key inside a row's pattern makes that row NaN on the reference, as on SDPA and flex (a
    diverging model must not be hidden behind zeros); a row that only sees finite keys is unharmed."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    k[:, :, 2] = float("nan")
    for backend in ("reference", "auto", "flex"):
        out, lse = attnkit.attend(q, k, v, pattern="causal", return_lse=True, backend=backend)
        assert torch.isfinite(out[:, :, :2]).all() and torch.isfinite(lse[:, :, :2]).all(), backend
        assert torch.isnan(out[:, :, 2:]).all() and torch.isnan(lse[:, :, 2:]).all(), backend
    out = attnkit.ops.sigmoid_attend(q, k, v, pattern="causal", normalize=True, backend="reference")
    assert torch.isfinite(out[:, :, :2]).all() and torch.isnan(out[:, :, 2:]).all()
