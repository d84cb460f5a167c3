"""The closed-form FlexAttention block masks (``patterns.block_mask_from_blocks``, used by DMA's
kept keys and Mixture-of-Head's gathered rows) must lay out their index tensors as FlexAttention's
own constructor does: the Triton kernels walk an index row assuming stride 1, so a transposed
(strided) q-side index tensor made the CUDA backward read other rows' blocks and gave wrong dk/dv
(DMA at keep_keys=6 on the H200: relative error 0.33), while the forward and dq were right and
CPU FlexAttention (which ignores the sparsity) could not show it."""

import pytest
import torch

from attnkit import patterns as P

flex_attention = pytest.importorskip("torch.nn.attention.flex_attention")


def _rows(num, idx):  # each row's listed blocks, as sets
    return [[set(idx[b, h, r, : int(num[b, h, r])].tolist()) for r in range(num.shape[2])]
            for b in range(num.shape[0]) for h in range(num.shape[1])]


@pytest.mark.parametrize("seed", range(4))
def test_block_mask_from_blocks_matches_flex_layout(seed):
    g = torch.Generator().manual_seed(seed)
    B, H, nq, nk = 2, 3, 5, 7
    grid = torch.rand(B, H, nq, nk, generator=g)
    partial, full = grid < 0.3, (grid >= 0.3) & (grid < 0.45)  # sparse and disjoint: order matters
    bm = P.block_mask_from_blocks(partial, full, nq * 128, nk * 128, (128, 128), P.causal().mask_mod(0))
    ref = flex_attention.BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks,
                                                   bm.full_kv_indices, BLOCK_SIZE=(128, 128),
                                                   mask_mod=bm.mask_mod, seq_lengths=(nq * 128, nk * 128))
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        t = getattr(bm, name)
        assert t.is_contiguous(), f"{name} strides {t.stride()}"
        assert t.dtype == torch.int32 and t.shape == getattr(ref, name).shape, name
    assert _rows(bm.q_num_blocks, bm.q_indices) == _rows(ref.q_num_blocks, ref.q_indices)
    assert _rows(bm.full_q_num_blocks, bm.full_q_indices) == _rows(ref.full_q_num_blocks, ref.full_q_indices)
    grid_rows = [[set(torch.nonzero(partial[b, h, r]).flatten().tolist()) for r in range(nq)]
                 for b in range(B) for h in range(H)]
    assert _rows(bm.kv_num_blocks, bm.kv_indices) == grid_rows


def test_kept_keys_block_mask_is_contiguous():
    from attnkit.layers.dynamic_mask import _KeptKeys, kept_key_thresholds

    B, Hkv, S = 2, 2, 300
    bias = torch.randn(B, Hkv, S, generator=torch.Generator().manual_seed(0))
    pattern = _KeptKeys(P.causal(), bias, kept_key_thresholds(bias, P.causal(), 6, S, 0), 0, 2)
    bm = pattern.flex_block_mask(B, 4, S, S, 0, "cpu", None)
    for name in ("q_indices", "full_q_indices", "kv_indices", "full_kv_indices"):
        assert getattr(bm, name).stride()[-1] == 1, name
