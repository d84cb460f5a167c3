"""attention_weights reproduces each layer's forward; sink metrics computed as defined."""

import pytest
import torch

from attnkit.analysis import first_token_attention, sink_report
from attnkit.layers import MultiHeadAttention, SelectiveAttention, SigmoidAttention
from attnkit.models import DecoderLM


def output_from_weights(layer, x):
    B, T, _ = x.shape
    q, k, v = layer.project(x)
    _, _, v = layer.adjust(x, q, k, v, torch.arange(T)[None], None)
    v = v.repeat_interleave(layer.num_heads // v.shape[1], dim=1)
    out = layer.attention_weights(x).to(v.dtype) @ v  # (B, H, T, D)
    return layer.o_proj(out.transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("make", [
    lambda: MultiHeadAttention(32, 4, num_kv_heads=2),
    lambda: SigmoidAttention(32, 4, train_length=16),
    lambda: SigmoidAttention(32, 4, score_bias=0.0, normalize=True),
    lambda: SelectiveAttention(32, 4),
])
def test_weights_reproduce_the_forward(make):
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(output_from_weights(layer, x), layer(x), atol=1e-5, rtol=1e-5)


def test_metrics_as_defined():
    torch.manual_seed(0)
    model = DecoderLM(vocab_size=64, dim=32, num_layers=3, num_heads=4,
                      attention=["mha", "sigmoid-nobias", "no-mixing"]).eval()
    tokens = torch.randint(0, 64, (3, 12))
    report = first_token_attention(model, tokens, epsilon=0.3)
    assert [r["supported"] for r in report] == [True, True, False]
    inputs = {}
    hook = model.layers[1].attn.register_forward_pre_hook(lambda m, a: inputs.setdefault("x", a[0]))
    model(tokens)
    hook.remove()
    w = model.layers[1].attn.attention_weights(inputs["x"]).double()[:, :, 1:]
    assert report[1]["first_token_weight"] == pytest.approx(float(w[..., 0].mean()))
    assert report[1]["first_token_share"] == pytest.approx(float((w[..., 0] / w.sum(-1)).mean()))
    assert report[1]["sink_heads"] == pytest.approx(float((w[..., 0].mean(dim=(0, 2)) > 0.3).double().mean()))
    assert report[0]["first_token_share"] == pytest.approx(report[0]["first_token_weight"])  # softmax rows sum to 1
    summary = sink_report(model, tokens)
    assert summary["first_token_share"] == pytest.approx((report[0]["first_token_share"] + report[1]["first_token_share"]) / 2)


def test_bad_inputs():
    model = DecoderLM(vocab_size=16, dim=16, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match="epsilon"):
        first_token_attention(model, torch.zeros(1, 4, dtype=torch.long), epsilon=2.0)
    with pytest.raises(ValueError, match="T >= 2"):
        first_token_attention(model, torch.zeros(1, 1, dtype=torch.long))


def test_sinks_command(tmp_path):
    import json

    from attnkit.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 400)
    for name in ("mha", "sigmoid-nobias"):
        DecoderLM(vocab_size=256, dim=32, num_layers=2, num_heads=4, attention=name).save_pretrained(tmp_path / name)
    out = tmp_path / "sinks.json"
    code = main(["sinks", str(tmp_path / "mha"), str(tmp_path / "sigmoid-nobias"), "--corpus", str(corpus),
                 "--seq-len", "32", "--windows", "4", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result["models"]) == {"mha", "sigmoid-nobias"}
    assert 0 <= result["models"]["mha"]["first_token_share"] <= 1
    assert {"git", "code_hash", "versions", "cpu"} <= set(result)  # provenance, as in compare's JSON


def test_sinks_refuses_a_model_too_small_for_byte_text(tmp_path, capsys):
    """An MQAR model (vocab 32) fed byte-level text ended in an IndexError inside F.embedding."""
    from attnkit.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 400)
    DecoderLM(vocab_size=32, dim=16, num_layers=1, num_heads=2).save_pretrained(tmp_path / "mqar-model")
    code = main(["sinks", str(tmp_path / "mqar-model"), "--corpus", str(corpus), "--seq-len", "32", "--windows", "2"])
    assert code == 2
    assert "vocab_size=32" in capsys.readouterr().err
