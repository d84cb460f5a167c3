"""The crashes of the default ``attnkit bench --device cuda`` (H200, torch 2.11), one test each
at the shape that failed. Their causes also have CPU-side tests: RCMHA's row chunks
(tests/layers/test_rcmha.py), the group layer's backend (tests/layers/test_group.py)."""

import pytest
import torch

import attnkit

pytestmark = pytest.mark.cuda


def test_rcmha_at_the_illegal_memory_access_shape():
    """B=4, H=16, T=8192: one relative bias of 4.3e9 elements read past FlexAttention's 32-bit
    indices ("an illegal memory access", which poisons the CUDA context)."""
    torch.manual_seed(0)
    layer = attnkit.build("rcmha", dim=2048, num_heads=16).cuda().bfloat16()
    x = torch.randn(4, 8192, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
        # the last rows of the first sequence against the same rows computed alone (one small chunk)
        q_rows = layer(x[:1, :1024])
    torch.cuda.synchronize()
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[:1, :1024].float(), q_rows.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("name", ["chronos2-group", "chronos2"])
def test_chronos2_at_the_invalid_argument_shape(name):
    """Group attention at T=4096, B=8, H=16: FlexAttention's launch failed ("CUDA driver error:
    invalid argument") once time steps x heads reached 65536."""
    torch.manual_seed(0)
    layer = attnkit.build(name, dim=2048, num_heads=16).cuda().bfloat16()
    x = torch.randn(8, 4096, 2048, device="cuda", dtype=torch.bfloat16)
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3], device="cuda")
    with torch.no_grad():
        y = layer(x, group_ids=groups)
        alone = layer(x[:2, :64], group_ids=groups[:2])
    torch.cuda.synchronize()
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[:2, :64].float(), alone.float(), atol=3e-2, rtol=3e-2)
