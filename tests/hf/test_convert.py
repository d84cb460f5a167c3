"""DecoderLM <-> LlamaForCausalLM (issue 22, item 5)."""

import pytest
import torch

hf = pytest.importorskip("attnkit.hf")

from attnkit.models import DecoderLM  # noqa: E402
from hf_models import tiny  # noqa: E402


@pytest.mark.parametrize("attention, options", [
    ("mha", {}),
    ("gqa", {"num_kv_heads": 2}),
    ("mqa", {"bias": True, "rope_base": 500.0}),
    ("gqa", {"num_kv_heads": 2, "head_dim": 8}),
])
def test_round_trip_logits_equal(attention, options):
    torch.manual_seed(0)
    model = DecoderLM(vocab_size=96, dim=64, num_layers=2, num_heads=4, attention=attention,
                      attention_options=options).eval()
    with torch.no_grad():  # non-zero norm weights and biases, so that every copied tensor matters
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    tokens = torch.randint(0, 96, (2, 12))
    llama = hf.to_hf(model)
    with torch.no_grad():
        ref = model(tokens)
        out = llama(tokens).logits
        back = hf.from_hf(llama)(tokens)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(back, ref, atol=1e-5, rtol=0)


def test_from_hf_then_to_hf_and_generate():
    llama = tiny("llama", tie_word_embeddings=True)
    llama.lm_head.weight = llama.model.embed_tokens.weight
    ids = torch.randint(1, 128, (1, 9))
    ours = hf.from_hf(llama)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), llama(ids).logits, atol=1e-5, rtol=0)
    assert torch.equal(ours.generate(ids, 6), llama.generate(ids, max_new_tokens=6, do_sample=False))


def test_bad_models_are_refused():
    with pytest.raises(ValueError, match=r"mechanism\(s\) \['lightning'\].*accepted: mha, gqa, mqa"):
        hf.to_hf(DecoderLM(vocab_size=32, dim=32, num_layers=2, num_heads=2, attention=["mha", "lightning"]))
    with pytest.raises(ValueError, match="qk_norm"):
        hf.to_hf(DecoderLM(vocab_size=32, dim=32, num_layers=1, num_heads=2, attention_options={"qk_norm": True}))
    with pytest.raises(ValueError, match="pattern"):
        hf.to_hf(DecoderLM(vocab_size=32, dim=32, num_layers=1, num_heads=2, attention_options={"pattern": "full"}))
    with pytest.raises(ValueError, match="to_hf takes an attnkit DecoderLM"):
        hf.to_hf(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        hf.from_hf(tiny("llama"))
    with pytest.raises(ValueError, match="from_hf takes a transformers LlamaForCausalLM"):
        hf.from_hf(tiny("qwen2"))
