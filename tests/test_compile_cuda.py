"""Layers and DecoderLM under torch.compile(fullgraph=True) on CUDA: no graph breaks, same outputs."""

import pytest
import torch

from attnkit import patterns as P
from attnkit.layers import MultiHeadAttention
from attnkit.models import DecoderLM

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("pattern", ["causal", P.sliding_window(64), P.sink_window(4, 64)])
def test_layer_compiles_without_graph_breaks(pattern):
    torch.manual_seed(0)
    layer = MultiHeadAttention(256, 4, num_kv_heads=2, pattern=pattern).cuda().bfloat16()
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x)
    y.float().square().mean().backward()
    torch.testing.assert_close(y, layer(x), atol=2e-2, rtol=2e-2)


def test_decoder_lm_compiles_without_graph_breaks():
    torch.manual_seed(0)
    model = DecoderLM(vocab_size=512, dim=256, num_layers=2, num_heads=4, attention=["mha", "gqa"]).cuda()
    tokens = torch.randint(0, 512, (2, 256), device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    logits = compiled(tokens)
    torch.testing.assert_close(logits, model(tokens), atol=2e-3, rtol=2e-3)
