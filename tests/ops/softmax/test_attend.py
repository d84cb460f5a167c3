"""attend: every backend against the float64 reference, forward and gradients."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnkit import patterns as P
from attnkit.ops import attend, attend_reference, block_mask_for

PATTERNS = {
    "full": lambda B, H, S: P.full(),
    "causal": lambda B, H, S: P.causal(),
    "window": lambda B, H, S: P.sliding_window(7),
    "sink_window": lambda B, H, S: P.sink_window(3, 6),
    "per_head": lambda B, H, S: P.per_head([P.causal() if h % 2 else P.sink_window(2, 5) for h in range(H)]),
    "documents": lambda B, H, S: P.documents(torch.randint(0, 3, (B, S), generator=torch.Generator().manual_seed(S)).sort(-1).values)
    & P.causal(),
    "window_or_sink": lambda B, H, S: P.sliding_window(4) | P.sink_window(2, 1),
}


def make_qkv(B, Hq, Hkv, T, S, D, dtype=torch.float64, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def naive_loop(q, k, v, pattern, scale=None, q_offset=None):
    """An independent second reference: a Python loop over rows (no shared code with attend_reference)."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    q_offset = S - T if q_offset is None else q_offset
    scale = D**-0.5 if scale is None else scale
    out = torch.zeros(B, Hq, T, v.shape[-1], dtype=q.dtype)
    mask = pattern.dense(T, S, q_offset=q_offset, batch=B, heads=Hq).expand(B, Hq, T, S)
    for b in range(B):
        for h in range(Hq):
            g = h // (Hq // Hkv)
            for i in range(T):
                keep = mask[b, h, i].nonzero().flatten()
                if keep.numel() == 0:
                    continue
                s = (k[b, g, keep] @ q[b, h, i]) * scale
                w = torch.exp(s - s.max())
                out[b, h, i] = (w / w.sum()) @ v[b, g, keep]
    return out


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (4, 1)])
def test_reference_matches_row_loop(name, Hq, Hkv):
    B, T, S, D = 2, 9, 13, 8
    q, k, v = make_qkv(B, Hq, Hkv, T, S, D, requires_grad=False)
    pattern = PATTERNS[name](B, Hq, S)
    torch.testing.assert_close(attend_reference(q, k, v, pattern=pattern), naive_loop(q, k, v, pattern))


def _check_backend(backend, name, B, Hq, Hkv, T, S, D, grads=True):
    pattern = PATTERNS[name](B, Hq, S)
    q, k, v = make_qkv(B, Hq, Hkv, T, S, D)
    ref = attend(q, k, v, pattern=pattern, backend="reference")
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    q32, k32, v32 = [t.detach().float().requires_grad_(grads) for t in (q, k, v)]
    out = attend(q32, k32, v32, pattern=pattern, backend=backend)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    if grads:
        fast_grads = torch.autograd.grad(out, (q32, k32, v32), g.float())
        for name_, a, b in zip("qkv", fast_grads, ref_grads):
            torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name_}: {m}")


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("T,S", [(37, 37), (1, 37), (5, 37)])
def test_sdpa_matches_reference(name, Hq, Hkv, T, S):
    _check_backend("sdpa", name, 2, Hq, Hkv, T, S, 16)


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 1)])
@pytest.mark.parametrize("T,S", [(37, 37), (1, 37), (5, 37)])
def test_flex_forward_matches_reference(name, Hq, Hkv, T, S):
    # FlexAttention has no backward on CPU: forward only here; gradients are checked on CUDA.
    _check_backend("flex", name, 2, Hq, Hkv, T, S, 16, grads=False)


@pytest.mark.parametrize("name", ["causal", "window", "documents"])
def test_auto_matches_reference_with_grads(name):
    _check_backend("auto", name, 2, 4, 2, 37, 37, 16)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 3),
    Hkv=st.sampled_from([1, 2, 3]),
    group=st.sampled_from([1, 2, 4]),
    T=st.integers(1, 70),
    extra=st.integers(0, 40),
    D=st.sampled_from([8, 16, 24]),
    name=st.sampled_from(list(PATTERNS)),
    backend=st.sampled_from(["sdpa", "auto"]),
)
def test_fuzz_shapes(B, Hkv, group, T, extra, D, name, backend):
    _check_backend(backend, name, B, Hkv * group, Hkv, T, T + extra, D)


def test_lse_matches_reference_and_logsumexp():
    q, k, v = make_qkv(2, 4, 2, 11, 19, 8, requires_grad=False)
    pattern = P.sliding_window(5)
    out, lse = attend(q, k, v, pattern=pattern, backend="reference", return_lse=True)
    scores = torch.einsum("bhtd,bhsd->bhts", q, k.repeat_interleave(2, 1)) * 8**-0.5
    mask = pattern.dense(11, 19)
    torch.testing.assert_close(lse, torch.logsumexp(scores.masked_fill(~mask, float("-inf")), -1))
    out_f, lse_f = attend(q.float(), k.float(), v.float(), pattern=pattern, backend="flex", return_lse=True)
    torch.testing.assert_close(lse_f.double(), lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_f.double(), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "flex"])
def test_fully_masked_rows_are_zero(backend):
    # queries placed before every key (q_offset < 0) see nothing under a causal pattern
    q, k, v = make_qkv(1, 2, 2, 6, 10, 8, dtype=torch.float32, requires_grad=backend != "flex")
    out = attend(q, k, v, pattern="causal", q_offset=-3, backend=backend)
    assert torch.isfinite(out).all()
    assert out[:, :, :3].abs().max() == 0
    assert out[:, :, 3:].abs().min() > 0
    if backend != "flex":
        out.sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def _kill_row_two(score, b, h, q_pos, k_pos):
    return torch.where(q_pos == 2, float("-inf"), score)


@pytest.mark.parametrize("backend", ["reference", "auto", "flex"])
def test_score_mod_that_masks_a_whole_row_gives_zeros(backend):
    """score_mod -inf on every key of a row: zeros and lse -inf (as for a row the pattern
    empties), zero gradients; the reference and auto gave NaN."""
    q, k, v = make_qkv(1, 2, 2, 6, 6, 8, dtype=torch.float32, requires_grad=backend != "flex")
    out, lse = attend(q, k, v, pattern="causal", score_mod=_kill_row_two, return_lse=True, backend=backend)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert (lse[:, :, 2] == float("-inf")).all() and torch.isfinite(lse[:, :, [0, 1, 3, 4, 5]]).all()
    ref = attend(q.detach().double(), k.detach().double(), v.detach().double(), pattern="causal", backend="reference")
    keep = [0, 1, 3, 4, 5]
    torch.testing.assert_close(out[:, :, keep].double(), ref[:, :, keep], atol=1e-5, rtol=1e-5)
    if backend != "flex":
        (out.sum() + lse[:, :, keep].sum()).backward()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
        assert torch.equal(q.grad[:, :, 2], torch.zeros_like(q.grad[:, :, 2]))


@pytest.mark.parametrize("backend", ["sdpa", "auto", "flex"])
@pytest.mark.parametrize("pattern, q_offset", [("causal", 0), (P.sliding_window(3), None), ("causal", 4)])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_key_outside_a_row_pattern_leaves_the_row_alone(backend, pattern, q_offset, bad):
    """An inf/NaN in a key: rows whose pattern excludes that key match the reference on every
    backend (SDPA's boolean mask adds -inf to q.k, and inf + -inf is NaN)."""
    q, k, v = make_qkv(1, 2, 2, 6, 10 if q_offset == 4 else 6, 8, dtype=torch.float32, requires_grad=False)
    k[:, :, -1, 0] = bad  # the newest key: outside every row's pattern but the last one's
    ref = attend(q.double(), k.double(), v.double(), pattern=pattern, q_offset=q_offset, backend="reference")
    out = attend(q, k, v, pattern=pattern, q_offset=q_offset, backend=backend)
    assert torch.isfinite(ref[:, :, :-1]).all()
    # the last row sees the key: a NaN score there has no one answer (kernels' running maxima
    # may skip it), an infinite one does (a NaN row for +inf, no weight for -inf)
    rows = slice(None, -1) if bad != bad else slice(None)
    torch.testing.assert_close(out.double()[:, :, rows], ref[:, :, rows], atol=1e-5, rtol=1e-5, equal_nan=True)


def test_score_mod_matches_reference():
    q, k, v = make_qkv(2, 4, 2, 9, 9, 8, requires_grad=False)

    def alibi(score, b, h, q_pos, k_pos):
        return score - (h + 1) * 0.1 * (q_pos - k_pos)

    ref = attend(q, k, v, pattern="causal", score_mod=alibi, backend="reference")
    manual = attend(q, k, v, pattern="causal", backend="reference")
    assert not torch.allclose(ref, manual)
    flex = attend(q.float(), k.float(), v.float(), pattern="causal", score_mod=alibi, backend="flex")
    torch.testing.assert_close(flex.double(), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="score_mod"):
        attend(q, k, v, score_mod=alibi, backend="sdpa")


def test_decode_offsets_see_the_right_keys():
    # one query at the end of 20 keys under a window of 4 must equal attention over the last 4 keys
    q, k, v = make_qkv(1, 2, 2, 1, 20, 8, requires_grad=False)
    out = attend(q, k, v, pattern=P.sliding_window(4), backend="sdpa")
    manual = attend(q, k[:, :, -4:], v[:, :, -4:], pattern="full", backend="reference")
    torch.testing.assert_close(out, manual)


def test_block_mask_cache_reuses_masks():
    a = block_mask_for(P.sliding_window(8), 1, 2, 64, 64, 0, "cpu")
    b = block_mask_for(P.sliding_window(8), 1, 2, 64, 64, 0, "cpu")
    c = block_mask_for(P.sliding_window(9), 1, 2, 64, 64, 0, "cpu")
    assert a is b and a is not c
    assert block_mask_for(P.full(), 1, 2, 64, 64, 0, "cpu") is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(q=torch.randn(1, 3, 4, 8), k=torch.randn(1, 2, 4, 8), v=torch.randn(1, 2, 4, 8)), "multiple of"),
        (dict(q=torch.randn(1, 2, 4, 8), k=torch.randn(1, 2, 4, 16), v=torch.randn(1, 2, 4, 16)), "head dims"),
        (dict(q=torch.randn(1, 2, 4, 8), k=torch.randn(1, 2, 4, 8).double(), v=torch.randn(1, 2, 4, 8)), "dtype"),
        (dict(q=torch.randn(2, 4, 8), k=torch.randn(1, 2, 4, 8), v=torch.randn(1, 2, 4, 8)), "rank 4"),
        (dict(q=torch.randn(2, 2, 4, 8), k=torch.randn(1, 2, 4, 8), v=torch.randn(1, 2, 4, 8)), "batch"),
        (dict(q=torch.randn(1, 2, 4, 8), k=torch.randn(1, 2, 4, 8), v=torch.randn(1, 2, 5, 8)), "agree"),
        (dict(q=torch.randn(1, 2, 4, 8), k=torch.randn(1, 2, 4, 8), v=torch.randn(1, 2, 4, 8), backend="triton"), "unknown backend"),
        (dict(q=torch.randn(1, 2, 4, 8), k=torch.randn(1, 2, 4, 8), v=torch.randn(1, 2, 4, 8), pattern="diagonal"), "unknown pattern"),
        (dict(q=torch.randn(1, 2, 4, 8), k=torch.randn(1, 2, 4, 8), v=torch.randn(1, 2, 4, 8), pattern=P.per_head([P.causal()] * 3)), "3 entries"),
        (dict(q=torch.randn(1, 2, 4, 8), k=torch.randn(1, 2, 4, 8), v=torch.randn(1, 2, 4, 8), return_lse=True, backend="sdpa"), "log-sum-exp"),
        (dict(q=torch.randn(1, 2, 4, 0), k=torch.randn(1, 2, 4, 0), v=torch.randn(1, 2, 4, 8)), "head dims must be >= 1"),
        (dict(q=torch.randn(0, 2, 4, 8), k=torch.randn(0, 2, 4, 8), v=torch.randn(0, 2, 4, 8)), "B=0"),
        *[(dict(q=torch.randn(1, 2, 4, 8), k=torch.randn(1, 2, 4, 8), v=torch.randn(1, 2, 4, 8), scale=bad), "scale must be")
          for bad in (float("nan"), float("inf"), "0.1", True, torch.tensor(0.1))],
        *[(dict(q=torch.randn(1, 2, 4, 8), k=torch.randn(1, 2, 4, 8), v=torch.randn(1, 2, 4, 8), score_mod=mod, backend=b),
           "score_mod must return") for b in ("reference", "flex")
          for mod in (lambda s, b, h, qp, kp: 0.0, lambda s, b, h, qp, kp: s.sum(-1, keepdim=True).expand(2, *s.shape)
                      if s.dim() else None)],
    ],
)
def test_bad_inputs_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        attend(**kwargs)


def test_flex_refuses_cpu_training_with_alternatives():
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="sdpa"):
        attend(q, k, v, pattern="causal", backend="flex")


@pytest.mark.parametrize("bad", [0, -3, 2.5, None])
def test_bad_windows(bad):
    with pytest.raises(ValueError, match="window"):
        P.sliding_window(bad)
    with pytest.raises(ValueError, match="window"):
        P.sink_window(4, bad)


def test_pattern_pairs_match_dense_counts():
    for pattern in [P.full(), P.causal(), P.sliding_window(5), P.sink_window(3, 5), P.sliding_window(4) | P.causal()]:
        for T, S in [(17, 17), (3, 40), (40, 40)]:
            assert pattern.pairs(T, S) == int(pattern.dense(T, S).sum())


# -- CUDA (run on the GPU machine) ------------------------------------------------------------
CUDA_CASES = [(name, "flex") for name in PATTERNS] + [
    (name, backend) for name in ("causal", "full", "window", "documents") for backend in ("sdpa", "auto")
]


@pytest.mark.cuda
@pytest.mark.parametrize("name,backend", CUDA_CASES)
@pytest.mark.parametrize("Hq,Hkv,T,S", [(8, 2, 300, 300), (8, 1, 77, 300)])
def test_cuda_bf16_matches_reference(name, backend, Hq, Hkv, T, S):
    from conftest import rel_rms

    B, D = 2, 64
    pattern = PATTERNS[name](B, Hq, S)
    q, k, v = make_qkv(B, Hq, Hkv, T, S, D)
    ref = attend(q, k, v, pattern=pattern, backend="reference")
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    fast_in = [t.detach().cuda().bfloat16().requires_grad_() for t in (q, k, v)]
    out = attend(*fast_in, pattern=pattern, backend=backend)
    assert rel_rms(ref, out.cpu()) < 5e-3
    grads = torch.autograd.grad(out, fast_in, g.cuda().bfloat16())
    for a, b in zip(grads, ref_grads):
        assert rel_rms(b, a.cpu()) < 5e-3


@pytest.mark.cuda
def test_cuda_lse_and_score_mod_match_reference():
    q, k, v = make_qkv(2, 8, 2, 200, 200, 64, requires_grad=False)

    def softcap(score, b, h, q_pos, k_pos):
        return 30 * torch.tanh(score / 30)

    ref, ref_lse = attend(q, k, v, pattern=P.sliding_window(50), score_mod=softcap, backend="reference", return_lse=True)
    out, lse = attend(*(t.cuda().float() for t in (q, k, v)), pattern=P.sliding_window(50), score_mod=softcap, return_lse=True)
    torch.testing.assert_close(out.cpu().double(), ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=2e-3, rtol=2e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "flex"])
def test_cuda_score_mod_emptied_rows_are_zero_with_zero_gradients(backend):
    """Compiled FlexAttention: a row score_mod empties gives zeros, lse -inf, and zero
    (not NaN) gradients, forward and backward."""
    q, k, v = (t.cuda().float().requires_grad_() for t in make_qkv(1, 2, 2, 130, 130, 64, requires_grad=False))
    out, lse = attend(q, k, v, pattern="causal", score_mod=_kill_row_two, return_lse=True, backend=backend)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2])) and (lse[:, :, 2] == float("-inf")).all()
    keep = torch.arange(130, device="cuda") != 2
    (out.sum() + lse[:, :, keep].sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.equal(q.grad[:, :, 2], torch.zeros_like(q.grad[:, :, 2]))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["sdpa", "auto", "flex"])
@pytest.mark.parametrize("pattern, T, S", [("causal", 64, 200), (P.sliding_window(16), 200, 200)])
def test_cuda_inf_key_outside_a_row_pattern_leaves_the_row_alone(backend, pattern, T, S):
    q, k, v = make_qkv(1, 4, 2, T, S, 64, requires_grad=False)
    k[:, :, -1, 0] = float("inf")
    ref = attend(q, k, v, pattern=pattern, backend="reference")
    out = attend(*(t.cuda().float() for t in (q, k, v)), pattern=pattern, backend=backend)
    torch.testing.assert_close(out.cpu().double()[:, :, :-1], ref[:, :, :-1], atol=1e-4, rtol=1e-4)


def test_flex_kernel_options_per_pattern_and_override(monkeypatch):
    """S2 asks FlexAttention for TMA loads on CUDA; FLEX_KERNEL_OPTIONS overrides a pattern's
    options; the tiles small blocks need and the short-query flag win over both; nothing on CPU."""
    from attnkit.ops.softmax import flex as flex_module
    from attnkit.ops.softmax.flex import flex_kernel_options

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    s2 = P.s2_strided(num_heads=4, block_size=64, local_blocks=2, vert_stride=4)
    assert flex_kernel_options(s2, cpu, 4096, True, True) == {}
    assert flex_kernel_options(s2, cuda, 4096, False, False) == {"USE_TMA": True}
    assert flex_kernel_options(s2, cuda, 4096, True, True) == {"USE_TMA": True, "BLOCK_M": 128, "BLOCK_N": 64}
    assert flex_kernel_options(P.causal(), cuda, 64, True, True) == {"FORCE_USE_FLEX_ATTENTION": True}
    monkeypatch.setattr(flex_module, "FLEX_KERNEL_OPTIONS", {"USE_TMA": False, "BLOCK_N": 128})
    assert flex_kernel_options(s2, cuda, 4096, True, True) == {"USE_TMA": False, "BLOCK_M": 128, "BLOCK_N": 64}
    with pytest.raises(TypeError):
        s2.flex_kernel_options["USE_TMA"] = False  # read-only: a pattern's options are not shared state


def test_flex_tiles_fit_shared_memory_for_wide_heads():
    """128 x 128 tiles of a 128-dim head overflow the H200's shared memory (ProxyAttn's 128-token
    blocks failed to compile there): the key tile halves to 64, still dividing the block."""
    from attnkit.ops.softmax.flex import flex_tiles

    assert flex_tiles(128) == {"BLOCK_M": 128, "BLOCK_N": 128}
    assert flex_tiles(128, head_dim=64) == {"BLOCK_M": 128, "BLOCK_N": 128}
    assert flex_tiles(128, head_dim=128) == {"BLOCK_M": 128, "BLOCK_N": 64}
    assert flex_tiles(256, head_dim=128) == {"BLOCK_M": 256, "BLOCK_N": 64}
    assert flex_tiles(64, head_dim=256) == {"BLOCK_M": 64, "BLOCK_N": 64}


# -- ROWS_GUARANTEED_SAFE: granted only where verified -------------------------------------------
def _simulate_flex_rows(block_mask, allowed, T, S, block_n, guard):
    """FlexAttention's forward loop as we read it (torch 2.11 ``forward_block_mn``), in float64 for
    one (batch, head): per query block, the partial key blocks in stored order with the mask
    applied, then the full ones without; ``guard=False`` is ``ROWS_GUARANTEED_SAFE``. Returns the
    rows whose normaliser became NaN."""
    q_block, kv_block = block_mask.BLOCK_SIZE
    scores = torch.randn(T, S, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    nan_rows = torch.zeros(T, dtype=torch.bool)
    for qb in range(block_mask.kv_num_blocks.shape[-1]):
        rows = torch.arange(qb * q_block, min(T, (qb + 1) * q_block))
        m = torch.full((len(rows),), float("-inf"), dtype=torch.float64)
        l = torch.zeros(len(rows), dtype=torch.float64)
        partial = block_mask.kv_indices[0, 0, qb, : block_mask.kv_num_blocks[0, 0, qb]].tolist()
        full = block_mask.full_kv_indices[0, 0, qb, : block_mask.full_kv_num_blocks[0, 0, qb]].tolist()
        for blk, masked in [(b, True) for b in partial] + [(b, False) for b in full]:
            for sub in range(0, kv_block, block_n):
                keys = torch.arange(blk * kv_block + sub, blk * kv_block + sub + block_n)
                keys = keys[keys < S]
                s = scores[rows][:, keys]
                if masked:
                    s = torch.where(allowed[rows][:, keys], s, float("-inf"))
                m_new = torch.maximum(m, s.max(-1).values)
                m_use = torch.where(m_new == float("-inf"), 0.0, m_new) if guard else m_new
                l = l * torch.exp(m - m_use) + torch.exp(s - m_use[:, None]).sum(-1)
                m = m_new
        nan_rows[rows] = l.isnan()
    return nan_rows


@pytest.mark.parametrize("pattern,T,S,block_n", [
    (P.s2_strided(num_heads=1, block_size=64, local_blocks=1, vert_stride=4), 512, 512, 64),
    (P.s2_strided(num_heads=1, block_size=64, local_blocks=2, vert_stride=4), 512, 512, 64),
    (P.s2_strided(num_heads=1, block_size=64, local_blocks=16, vert_stride=4), 512, 512, 64),
    (P.s2_strided(num_heads=1, block_size=64, local_blocks=5, vert_stride=4), 200, 512, 64),
    (P.sliding_window(200), 512, 512, 64),
    (P.sliding_window(100), 512, 512, 128),
    (P.sink_window(4, 200), 512, 512, 64),
])
def test_rows_safe_check_agrees_with_the_kernel_loop(pattern, T, S, block_n):
    """``first_tiles_cover_rows`` says yes exactly when the unguarded loop has no NaN row, on
    FlexAttention's own visiting order and on ``diagonal_first``'s; the guarded loop never NaNs;
    reordering keeps the mask."""
    from attnkit.ops.softmax.flex import diagonal_first, first_tiles_cover_rows

    allowed = pattern.dense(T, S)[0, 0]
    own = block_mask_for(pattern, 1, 1, T, S, S - T, "cpu")  # the pattern's flex_block_size
    ordered = diagonal_first(own, S - T)
    assert torch.equal(ordered.to_dense(), own.to_dense())
    for mask in (own, ordered):
        verified = first_tiles_cover_rows(mask, pattern, T, S, S - T, block_n)
        assert not _simulate_flex_rows(mask, allowed, T, S, block_n, guard=True).any()
        assert verified == (not _simulate_flex_rows(mask, allowed, T, S, block_n, guard=False).any())


def test_rows_safe_granted_only_where_verified():
    """S2 with one local block cannot be made safe; with 16 it can after reordering; never with a
    score_mod, for the short-query decoding kernel, or when the key tile is not pinned."""
    from attnkit.ops.softmax.flex import _grant_rows_safe

    cpu = torch.device("cpu")
    T = 2048  # past the 16 local blocks, where FlexAttention's own order starts at the band's far edge

    def grant(pattern, score_mod=None, T=T, options=None):
        opts = dict(options or {"ROWS_GUARANTEED_SAFE": True, "BLOCK_M": 128, "BLOCK_N": 64})
        bm = block_mask_for(pattern, 1, 4, T, T, 0, cpu)
        new = _grant_rows_safe(opts, bm, pattern, score_mod, 1, 4, T, T, 0, cpu, True)
        return opts["ROWS_GUARANTEED_SAFE"], new, bm

    s2 = dict(num_heads=4, block_size=64, vert_stride=16)
    assert grant(P.s2_strided(local_blocks=1, **s2))[0] is False
    granted, new, old = grant(P.s2_strided(local_blocks=16, **s2))
    assert granted is True and torch.equal(new.to_dense(), old.to_dense())
    assert not torch.equal(new.kv_indices, old.kv_indices)  # visiting order changed
    assert grant(P.s2_strided(local_blocks=16, **s2), score_mod=lambda s, b, h, q, k: s)[0] is False
    assert grant(P.s2_strided(local_blocks=16, **s2), T=64)[0] is False
    assert grant(P.s2_strided(local_blocks=16, **s2), options={"ROWS_GUARANTEED_SAFE": True})[0] is False
    assert grant(P.causal(), options={"ROWS_GUARANTEED_SAFE": False})[0] is False


@pytest.mark.cuda
def test_cuda_s2_rows_safe_matches_reference(monkeypatch):
    """S2 with 16 local 64-token blocks, asked for ROWS_GUARANTEED_SAFE, runs with it on the GPU
    (granted after reordering) and still matches the float64 reference, forward and gradients,
    with no NaN (on FlexAttention's own block order 45% of the rows were NaN: h200-rows-safe.json)."""
    from conftest import rel_rms

    from attnkit.ops.softmax import flex as flex_module
    from attnkit.ops.softmax.flex import _grant_rows_safe, flex_kernel_options

    monkeypatch.setattr(flex_module, "FLEX_KERNEL_OPTIONS", {"ROWS_GUARANTEED_SAFE": True})
    H, T, D = 4, 2048, 64
    pattern = P.s2_strided(num_heads=H, block_size=64, local_blocks=16, vert_stride=4)
    opts = flex_kernel_options(pattern, torch.device("cuda"), T, True, True)
    bm = block_mask_for(pattern, 1, H, T, T, 0, "cuda")
    _grant_rows_safe(opts, bm, pattern, None, 1, H, T, T, 0, torch.device("cuda"), True)
    assert opts["ROWS_GUARANTEED_SAFE"] is True
    q, k, v = make_qkv(1, H, H, T, T, D)
    ref = attend(q, k, v, pattern=pattern, backend="reference")
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    fast_in = [t.detach().cuda().bfloat16().requires_grad_() for t in (q, k, v)]
    out = attend(*fast_in, pattern=pattern, backend="flex")
    assert not out.isnan().any()
    assert rel_rms(ref, out.cpu()) < 5e-3
    for a, b in zip(torch.autograd.grad(out, fast_in, g.cuda().bfloat16()), ref_grads):
        assert rel_rms(b, a.cpu()) < 5e-3
