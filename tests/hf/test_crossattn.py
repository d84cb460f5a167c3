"""Cross-attention vs saliency (issue 25, item 4): frame pooling and Pearson's r by hand, the maps of
tiny random Whisper / BART / T5 models against direct computations, the model without
cross-attention, bad inputs, the CLI."""

import argparse
import json
import math

import pytest
import torch
from hf_models import tiny

pytest.importorskip("transformers")

from attnkit.analysis.hf.crossattn import (  # noqa: E402
    TINY_MODELS,
    CrossAttentionSaliency,
    add_parser,
    check_cross_attention,
    cross_attention_saliency,
    greedy_decoder_ids,
    pool_frames,
    tiny_encoder_decoder,
)


def test_pool_frames_by_hand():
    torch.testing.assert_close(pool_frames(torch.tensor([1.0, 2, 3, 4, 5, 6]), 3), torch.tensor([3.0, 7, 11]))
    torch.testing.assert_close(pool_frames(torch.tensor([[1.0, 2], [3, 4]]), 2), torch.tensor([[1.0, 2], [3, 4]]))
    # 3 positions into 2 frames: areas [1, 1.5] / [1.5, ...] averaged, times 3/2 keeps the total
    pooled = pool_frames(torch.tensor([2.0, 2.0, 2.0]), 2)
    assert float(pooled.sum()) == pytest.approx(6.0)


def test_correlations_and_explained_by_hand():
    # one layer, two heads, one step, three frames; saliency [1, 2, 3]
    ca = torch.tensor([[[[0.1, 0.3, 0.6]], [[0.6, 0.3, 0.1]]]], dtype=torch.float64)  # (1, 2, 1, 3)
    sal = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    result = CrossAttentionSaliency(ca, sal, sal * 2, [5])
    corr = result.correlations()
    # r = sum(xc yc) / (|xc| |yc|) with the saliency centred to [-1, 0, 1]; head 1 is head 0 reversed: -r
    x = torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)
    xc, yc = x - x.mean(), torch.tensor([-1.0, 0, 1], dtype=torch.float64)
    r0 = float((xc * yc).sum() / (xc.norm() * yc.norm()))
    assert float(corr["input"]["heads"][0, 0, 0]) == pytest.approx(r0)
    assert float(corr["input"]["heads"][0, 1, 0]) == pytest.approx(-r0)
    # the head mean [.35, .3, .35] is symmetric about the middle frame: r = 0 against a straight line
    assert float(corr["input"]["layers"][0, 0]) == pytest.approx(0, abs=1e-12)
    assert float(corr["encoder"]["aggregate"][0]) == pytest.approx(0, abs=1e-12)
    explained = result.explained()
    assert explained["heads"][0][0]["input"] == {"r": pytest.approx(r0), "r2": pytest.approx(r0**2)}
    # a uniform cross-attention row: no correlation defined, left out of the means
    flat = CrossAttentionSaliency(torch.full((1, 1, 1, 3), 1 / 3, dtype=torch.float64), sal, sal, [5])
    assert math.isnan(float(flat.correlations()["input"]["aggregate"][0]))
    assert flat.explained()["aggregate"]["input"] == {"r": None, "r2": None}


@pytest.mark.parametrize("kind", TINY_MODELS)
def test_maps_of_tiny_encoder_decoders_match_direct_computations(kind):
    model, inputs = tiny_encoder_decoder(kind)
    decoder_ids = greedy_decoder_ids(model, inputs, 3)
    assert decoder_ids.shape == (1, 3)
    result = cross_attention_saliency(model, inputs, decoder_ids)
    with torch.no_grad():
        out = model(**inputs, decoder_input_ids=decoder_ids, output_attentions=True)
    L, H = len(out.cross_attentions), out.cross_attentions[0].shape[1]
    S = out.encoder_last_hidden_state.shape[1]
    assert result.cross_attention.shape == (L, H, 3, S) and result.input_saliency.shape == (3, S)
    torch.testing.assert_close(result.cross_attention, torch.stack([a[0] for a in out.cross_attentions]).double())
    # the greedy tokens: the explained token of each step is the argmax there
    assert result.tokens == out.logits[0].argmax(-1).tolist()
    assert decoder_ids[0, 1:].tolist() == result.tokens[:-1]
    # saliency of step 1 by a direct backward through the whole model
    name = next(iter(inputs))
    if name == "input_ids":
        x = model.get_encoder().get_input_embeddings()(inputs[name]).detach().requires_grad_(True)
        logits = model(inputs_embeds=x, decoder_input_ids=decoder_ids).logits
    else:
        x = inputs[name].clone().requires_grad_(True)
        logits = model(input_features=x, decoder_input_ids=decoder_ids).logits
    torch.testing.assert_close(logits.detach(), out.logits)  # the embedding path is the model's own
    logits[0, 1].log_softmax(-1)[result.tokens[1]].backward()
    per_position = x.grad[0].double().norm(dim=0 if name == "input_features" else -1)
    torch.testing.assert_close(result.input_saliency[1], pool_frames(per_position, S))
    assert (result.encoder_saliency > 0).all()
    explained = result.explained()
    assert len(explained["layers"]) == L and len(explained["heads"][0]) == H
    r = explained["aggregate"]["input"]["r"]
    assert r is not None and -1 <= r <= 1


def test_whisper_input_saliency_pools_two_input_frames_per_encoder_frame():
    model, inputs = tiny_encoder_decoder("tiny-whisper")
    result = cross_attention_saliency(model, inputs, torch.tensor([[1]]), targets=[7])
    assert inputs["input_features"].shape[-1] == 2 * result.input_saliency.shape[-1] == 64
    assert result.tokens == [7]


def test_a_model_without_cross_attention_is_refused_naming_its_class():
    model = tiny("llama")
    with pytest.raises(ValueError, match="LlamaForCausalLM has no cross-attention"):
        cross_attention_saliency(model, {"input_ids": torch.tensor([[1, 2, 3]])}, torch.tensor([[1]]))
    with pytest.raises(ValueError, match="LlamaForCausalLM has no cross-attention"):
        check_cross_attention(model)
    with pytest.raises(ValueError, match="LlamaForCausalLM has no cross-attention"):
        greedy_decoder_ids(model, {"input_ids": torch.tensor([[1, 2]])}, 2)


def test_bad_input():
    model, inputs = tiny_encoder_decoder("tiny-bart")
    cases = [
        (lambda: cross_attention_saliency(model, inputs, torch.zeros(1, 0, dtype=torch.long)), ["decoder_input_ids", "(1, 0)"]),
        (lambda: cross_attention_saliency(model, {"input_features": torch.zeros(1, 2)}, torch.tensor([[2]])),
         ["'input_ids'", "BartForConditionalGeneration", "input_features"]),
        (lambda: cross_attention_saliency(model, {"input_ids": torch.ones(2, 4, dtype=torch.long)}, torch.tensor([[2]])),
         ["batch size 1", "(2, 4)"]),
        (lambda: cross_attention_saliency(model, inputs, torch.tensor([[2, 5]]), targets=[1]), ["targets", "(2)", "1"]),
        (lambda: cross_attention_saliency(model, inputs, torch.tensor([[2]]), targets=[128]), ["targets", "[0, 127]", "128"]),
        (lambda: greedy_decoder_ids(model, inputs, 0), ["steps", "0"]),
        (lambda: tiny_encoder_decoder("tiny-gpt"), ["kind", "tiny-whisper", "'tiny-gpt'"]),
    ]
    for call, words in cases:
        with pytest.raises(ValueError) as err:
            call()
        for word in words:
            assert word in str(err.value), (word, str(err.value))
    sdpa, _ = tiny_encoder_decoder("tiny-bart")
    sdpa.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="BartForConditionalGeneration returned no cross-attention weights.*eager"):
        cross_attention_saliency(sdpa, inputs, torch.tensor([[2]]))


def test_cli_writes_table_json_and_png(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["crossattn", "--model", "tiny-whisper", "--examples", "2", "--steps", "2",
                              "--out", str(tmp_path / "c.json")])
    assert args.func(args) == 0
    assert "all layers and heads" in capsys.readouterr().out
    result = json.loads((tmp_path / "c.json").read_text())
    assert (tmp_path / "c.png").stat().st_size > 10_000
    assert result["model_class"] == "WhisperForConditionalGeneration"
    assert result["summary"]["input"]["aggregate"]["n"] == 4  # 2 inputs x 2 steps
    assert len(result["summary"]["encoder"]["heads"]) == 2 and len(result["summary"]["encoder"]["heads"][0]) == 4
    # a causal LM folder: refused naming its class
    tiny("llama").save_pretrained(tmp_path / "llama")
    bad = parser.parse_args(["crossattn", "--model", str(tmp_path / "llama")])
    with pytest.raises(ValueError, match="LlamaForCausalLM has no cross-attention"):
        bad.func(bad)
    bad = parser.parse_args(["crossattn", "--model", "whisper-large"])
    with pytest.raises(ValueError, match="neither one of tiny-whisper"):
        bad.func(bad)
    bad = parser.parse_args(["crossattn", "--steps", "0"])
    with pytest.raises(ValueError, match="--steps must be an integer >= 1, got 0"):
        bad.func(bad)
