"""Causal attention of picked rows by the dyadic split (MoH's routed heads) against the float64 reference.

On CPU the split runs with the ``torch`` engine (the same pieces, buffers and index tables as
cuDNN's, each piece computed by plain tensor ops), and the Triton row kernels run under
TRITON_INTERPRET=1; on the GPU the ``cudnn`` engine runs.
"""

import pytest
import torch

from attnkit.ops import attend_reference
from attnkit.ops.softmax import cudnn_band
from attnkit.ops.softmax import picked_causal as pc
from attnkit.ops.softmax import row_merge_triton as rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(B, H, T, D, share, seed, dtype=torch.float64, layout="bhtd"):
    g = torch.Generator().manual_seed(seed)
    if layout == "bthd":  # a projection's [B, T, H, D] viewed as [B, H, T, D]
        q, k, v = (torch.randn(B, T, H, D, generator=g, dtype=dtype).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=dtype) for _ in range(3))
    picked = torch.rand(B, H, T, generator=g) < share
    return q, k, v, picked


def _reference(q, k, v, picked):
    return attend_reference(q, k, v, pattern="causal") * picked[..., None]


@pytest.mark.parametrize("B,H,T,D,leaf,share", [
    (2, 3, 77, 16, 4, 0.5),   # T not a multiple of the leaf: padded, 5 levels
    (1, 2, 64, 8, 8, 0.3),    # T a power of two times the leaf
    (1, 2, 13, 8, 16, 0.6),   # T within one leaf block: no levels, the causal leaf alone
    (1, 2, 40, 8, 4, 1.0),    # every row picked: plain causal attention
    (1, 2, 40, 8, 4, 0.0),    # no row picked: zeros, zero gradients
    (1, 1, 200, 8, 2, 0.05),  # few rows: many segments with no row at all
])
def test_torch_engine_matches_float64_reference(B, H, T, D, leaf, share):
    q, k, v, picked = _inputs(B, H, T, D, share, seed=T * 7 + leaf)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = pc.picked_causal_attention(q, k, v, picked, engine="torch", leaf=leaf)
    ref = _reference(q, k, v, picked)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    g = torch.randn_like(ref)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=name)
    if share == 0.0:
        assert out.abs().max() == 0


def test_a_plan_built_ahead_is_used_and_checked():
    q, k, v, picked = _inputs(1, 2, 40, 8, 0.5, seed=4)
    plan = pc.make_plan(q, picked, engine="torch", leaf=4)
    ahead = pc.picked_causal_attention(q, k, v, picked, engine="torch", leaf=4, plan=plan)
    torch.testing.assert_close(ahead, pc.picked_causal_attention(q, k, v, picked, engine="torch", leaf=4))
    with pytest.raises(ValueError, match="plan must come from make_plan"):
        pc.picked_causal_attention(q, k, v, picked, engine="torch", leaf=8, plan=plan)


def test_row_multiple_pads_rows_without_changing_the_result():
    q, k, v, picked = _inputs(1, 2, 90, 8, 0.5, seed=3)
    exact = pc.picked_causal_attention(q, k, v, picked, engine="torch", leaf=4)
    padded = pc.picked_causal_attention(q, k, v, picked, engine="torch", leaf=4, row_multiple=16)
    torch.testing.assert_close(padded, exact, atol=1e-12, rtol=1e-12)


def test_plan_covers_every_picked_row_and_key_once_per_level():
    """The index tables: each level's picked rows of the second halves, each first-half key, once."""
    T, leaf = 100, 4
    picked = torch.rand(3, T, generator=torch.Generator().manual_seed(0)) < 0.5
    plan = pc._plan(picked, T, leaf, 1, torch.float32, "torch")
    assert [lv.L for lv in plan.levels] == [8, 16, 32, 64, 128]
    pos = torch.arange(plan.T_pad).repeat(3)
    pick = torch.nn.functional.pad(picked, (0, plan.T_pad - T)).reshape(-1)
    for i, lv in enumerate(plan.levels):
        second = (pos % lv.L) >= lv.L // 2
        assert torch.equal(plan.row_slot[i] >= 0, pick & second)
        assert torch.equal(plan.key_slot[i] >= 0, ~second & (pos // lv.L < lv.segments))
        slots = plan.row_slot[i][plan.row_slot[i] >= 0].long()
        assert slots.unique().numel() == slots.numel()  # no two rows share a slot
        assert torch.equal(plan.slot_row[slots], torch.nonzero(plan.row_slot[i] >= 0).flatten().int())
        assert lv.rows == max(int(((pos // lv.L == s) & second & pick).reshape(3, -1).sum(-1).max())
                              for s in range(lv.segments))


@pytest.mark.skipif(not rows.available(), reason="needs triton")
@pytest.mark.parametrize("T,leaf,share", [(100, 4, 0.5), (64, 8, 0.9), (37, 2, 0.2), (9, 16, 0.5)])
def test_triton_plan_equals_the_torch_plan(T, leaf, share):
    picked = (torch.rand(3, T, generator=torch.Generator().manual_seed(T)) < share).to(DEVICE)
    ref = pc._plan(picked, T, leaf, 4, torch.float32, "torch")
    fast = pc._plan(picked, T, leaf, 4, torch.float32, "triton")
    assert fast.levels == ref.levels and (fast.n_qslots, fast.n_kslots) == (ref.n_qslots, ref.n_kslots)
    for name in ("row_slot", "key_slot", "slot_row", "weight"):
        assert torch.equal(getattr(fast, name), getattr(ref, name)), name


@pytest.mark.skipif(not rows.available(), reason="needs triton")
def test_row_kernels_match_their_torch_twins():
    g = torch.Generator().manual_seed(1)
    n, slots, D, levels = 70, 90, 24, 3  # D not a power of two: masked columns
    src = torch.randn(slots, D, generator=g).to(DEVICE)
    lse = torch.randn(slots, generator=g).to(DEVICE)
    idx = torch.randint(-1, slots, (levels, n), generator=g).int().to(DEVICE)
    base = torch.randn(n, D, generator=g).to(DEVICE)
    lse0 = torch.randn(n, generator=g).to(DEVICE)
    weight = (torch.rand(n, generator=g) < 0.7).float().to(DEVICE)
    torch.testing.assert_close(rows.gather_rows(src, idx[0]), rows.gather_rows_torch(src, idx[0]))
    torch.testing.assert_close(rows.sum_rows(base, src, idx), rows.sum_rows_torch(base, src, idx))
    out, merged = rows.merge_rows(base, lse0, src, lse, idx, weight)
    out_t, merged_t = rows.merge_rows_torch(base, lse0, src, lse, idx, weight)
    torch.testing.assert_close(out, out_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, merged_t, atol=1e-5, rtol=1e-5)
    assert (rows.gather_rows(src, idx[0])[idx[0] < 0] == 0).all()
    strided = torch.randn(9, 3, D, generator=g).to(DEVICE).transpose(0, 1)  # [heads 3, rows 9, D], rows strided
    flat_idx = torch.randint(-1, 27, (40,), generator=g).int().to(DEVICE)
    torch.testing.assert_close(rows.gather_rows(strided, flat_idx), rows.gather_rows_torch(strided, flat_idx))


@pytest.mark.skipif(not rows.available(), reason="needs triton")
@pytest.mark.parametrize("B,T,layout", [
    (1, 50, "bthd"),  # padded to the leaf: dense copies
    (1, 48, "bthd"),  # a projection's layout read in place (strided rows)
    (2, 48, "bhtd"),  # batch-major heads merge: read in place
    (2, 48, "bthd"),  # heads do not merge across the batch: dense copies
])
def test_split_with_triton_kernels_matches_reference(B, T, layout):
    """The whole split with the Triton plan and merges (interpreted on CPU), float32, forward and gradients."""
    q, k, v, picked = _inputs(B, 2, T, 24, 0.4, seed=5, dtype=torch.float32, layout=layout)
    q, k, v = (t.to(DEVICE).requires_grad_() for t in (q, k, v))
    picked = picked.to(DEVICE)
    plan = pc._plan(picked.reshape(B * 2, T), T, 8, 1, q.dtype, "triton")
    out = pc._PickedCausal.apply(q, k, v, 24 ** -0.5, "torch", "triton", plan)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _reference(q64, k64, v64, picked)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), g.float())
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), g)
    for name, a, b in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a.double(), b, atol=5e-5, rtol=5e-5, msg=name)


@pytest.mark.parametrize("args,kwargs,expect", [
    ((torch.zeros(1, 2, 8, 4), torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 8, 4), torch.zeros(1, 2, 8, dtype=torch.bool)),
     {}, "one key head per query head"),
    ((torch.zeros(1, 2, 8, 4),) * 3 + (torch.zeros(1, 2, 8),), {}, "picked must be a bool tensor"),
    ((torch.zeros(1, 2, 8, 4),) * 3 + (torch.zeros(1, 2, 7, dtype=torch.bool),), {}, "picked must be a bool tensor"),
    ((torch.zeros(1, 2, 8, 4),) * 3 + (torch.zeros(1, 2, 8, dtype=torch.bool),), {"engine": "flash"},
     "engine must be one of"),
    ((torch.zeros(1, 2, 8, 4),) * 3 + (torch.zeros(1, 2, 8, dtype=torch.bool),), {"leaf": 0}, "leaf must be"),
    ((torch.zeros(1, 2, 8, 4),) * 3 + (torch.zeros(1, 2, 8, dtype=torch.bool),), {"row_multiple": 0},
     "row_multiple must be"),
    ((torch.zeros(1, 2, 8, 4),) * 3 + (torch.zeros(1, 2, 8, dtype=torch.bool),), {"engine": "cudnn"}, "cudnn engine"),
])
def test_bad_inputs_raise_value_errors(args, kwargs, expect):
    if kwargs.get("engine") == "cudnn" and torch.cuda.is_available():
        args = tuple(a.cuda() for a in args)  # float32 on CUDA: refused for its dtype instead
    with pytest.raises(ValueError, match=expect):
        pc.picked_causal_attention(*args, **kwargs)


def test_auto_engine_is_torch_off_cuda():
    q, k, v, picked = _inputs(1, 2, 16, 8, 0.5, seed=0, dtype=torch.bfloat16)
    assert not pc.supports(q, k, v, picked)
    assert "CUDA only" in pc.why_unsupported(q, k, v, picked) or "triton" in pc.why_unsupported(q, k, v, picked)


def _require_frontend():
    if not cudnn_band.available():
        pytest.skip("the cuDNN frontend is not installed here (pip install nvidia-cudnn-frontend)")


@pytest.mark.cuda
@pytest.mark.parametrize("T,share,dtype,layout", [
    (1000, 0.5, torch.bfloat16, "bthd"),   # T not a multiple of the 128-token leaf
    (2048, 0.5, torch.float16, "bhtd"),
    (777, 1.0, torch.bfloat16, "bhtd"),    # every row: causal attention
    (3000, 0.1, torch.bfloat16, "bthd"),
    (100, 0.5, torch.bfloat16, "bhtd"),    # one leaf block, no levels
])
def test_cuda_cudnn_engine_matches_float64_reference(T, share, dtype, layout):
    from conftest import rel_rms

    _require_frontend()
    q, k, v, picked = _inputs(2, 3, T, 64, share, seed=T, layout=layout)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ref = _reference(q, k, v, picked)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    fast = [t.detach().to("cuda", dtype).requires_grad_() for t in (q, k, v)]
    assert pc.supports(*fast, picked.cuda())
    out = pc.picked_causal_attention(*fast, picked.cuda())
    assert rel_rms(ref, out.cpu()) < 1e-2
    assert (out[~picked.cuda()] == 0).all()
    grads = torch.autograd.grad(out, fast, g.to("cuda", dtype))
    for name, a, b in zip("qkv", grads, ref_grads):
        assert rel_rms(b, a.cpu()) < 1e-2, name


@pytest.mark.cuda
def test_cuda_moh_layer_takes_the_split_and_matches_its_dense_path():
    from conftest import rel_rms

    from attnkit.layers import MixtureOfHeadsAttention

    _require_frontend()
    torch.manual_seed(0)
    layer = MixtureOfHeadsAttention(512, 8, shared_heads=2).cuda().to(torch.bfloat16)
    x = torch.randn(2, 700, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    calls = []
    original = pc.picked_causal_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    pc.picked_causal_attention = spy
    try:
        fast = layer(x)
    finally:
        pc.picked_causal_attention = original
    assert calls, "the layer did not take the cuDNN split"
    from attnkit.layers import mixture_of_heads as moh

    moh.OVERLAP_SHARED_HEADS = False  # the shared heads on the main stream: the same kernels, the same numbers
    try:
        serial = layer(x)
    finally:
        moh.OVERLAP_SHARED_HEADS = True
    torch.testing.assert_close(serial, fast, atol=0, rtol=0)
    layer.sparse = False
    dense = layer(x)
    assert rel_rms(dense.float(), fast.float()) < 1e-2
    g = torch.randn_like(fast)
    (gf,) = torch.autograd.grad(fast, x, g)
    (gd,) = torch.autograd.grad(dense, x, g)
    assert rel_rms(gd.float(), gf.float()) < 2e-2
