"""Bad input gets a clear error (issue 22, item 9)."""

import pytest
import torch

hf = pytest.importorskip("attnkit.hf")

from hf_models import llama  # noqa: E402, F401  (fixture)


pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


def test_encoder_only_model_is_refused():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                vocab_size=64))
    with pytest.raises(ValueError, match=r"not causal \(is_causal=False: an encoder"):
        hf.apply(bert, "full")
    assert bert.config._attn_implementation != hf.IMPLEMENTATION  # nothing was changed


def test_not_a_transformers_model_is_refused():
    with pytest.raises(ValueError, match="model must be a transformers PreTrainedModel, got Linear"):
        hf.apply(torch.nn.Linear(2, 2), "full")


def test_model_with_its_own_attention_code_is_refused(llama, monkeypatch):
    # a class whose modeling code does not call AttentionInterface (transformers' own check says so)
    monkeypatch.setattr(type(llama), "_can_set_attn_implementation", classmethod(lambda cls: False))
    with pytest.raises(ValueError, match="does not route its attention through transformers' AttentionInterface"):
        hf.apply(llama, "full")


@pytest.mark.parametrize("options, match", [
    ({"sink": -1}, "sink must be a non-negative integer \\(0: no sink tokens\\), got -1"),
    ({"window": -3}, "window must be a positive integer, got -3"),
    ({"window": 2.5}, "window must be a positive integer, got 2.5"),
    ({"sink": True}, "sink must be a non-negative integer \\(0: no sink tokens\\), got True"),
    ({"budget": 3}, r"method 'streaming' does not take option\(s\) \['budget'\]; accepted: sink, window"),
])
def test_streaming_options(llama, options, match):
    with pytest.raises(ValueError, match=match):
        hf.apply(llama, "streaming", **options)


def test_budgets_larger_than_the_context_are_fine(llama):
    ids = torch.randint(1, 128, (1, 6))
    with torch.no_grad():
        ref = llama(ids).logits
        with hf.apply(llama, "streaming", sink=100, window=1000) as handle:
            out = llama(ids, past_key_values=handle.cache()).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_headwise_shape_and_indices(llama):
    # the tiny Llama has 2 layers and 2 KV heads
    with pytest.raises(ValueError, match=r"full_heads has shape \[2, 4\] but the model has \[num_layers, "
                                         r"num_kv_heads\] = \[2, 2\]"):
        hf.apply(llama, hf.Headwise(full_heads=torch.zeros(2, 4, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"full_heads has shape \[3, 2\]"):
        hf.apply(llama, "headwise", full_heads=[[True, False]] * 3)
    with pytest.raises(ValueError, match="KV head index 2 \\(layer 0\\) out of range; accepted 0..1"):
        hf.Headwise.from_heads({0: [2]}, num_layers=2, num_kv_heads=2)
    with pytest.raises(ValueError, match="layer index 5 out of range; accepted 0..1"):
        hf.Headwise.from_heads({5: [0]}, num_layers=2, num_kv_heads=2)
    with pytest.raises(ValueError, match="must be a boolean tensor"):
        hf.Headwise(full_heads=torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"\[num_layers, num_kv_heads\] booleans, got \[\]; accepted"):
        hf.Headwise(full_heads=[])
    with pytest.raises(ValueError, match="must be non-empty"):
        hf.Headwise(full_heads=[[]])
    with pytest.raises(ValueError, match="must hold booleans"):
        hf.Headwise(full_heads=[[1, 0], [0, 1]])
    with pytest.raises(ValueError, match="one entry per KV head"):
        hf.Headwise(full_heads=[[True], [True, False]])
    policy = hf.Headwise.from_heads({0: [1]}, num_layers=2, num_kv_heads=2, sink=1, window=2)
    assert [g.kv_heads for g in policy.plan(0, 2)] == [(1,), (0,)]
    assert [g.rule for g in policy.plan(1, 2)] == [hf.SinkWindow(1, 2)]


def test_method_names(llama):
    with pytest.raises(ValueError, match="unknown method 'nonesuch'; accepted: full, streaming, headwise"):
        hf.apply(llama, "nonesuch")
    with pytest.raises(ValueError, match="options \\['window'\\] were given with a policy object"):
        hf.apply(llama, hf.Streaming(), window=3)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        hf.apply(llama, "full", backend="fast")
    with pytest.raises(ValueError, match=r"method 'full' does not take option\(s\) \['window'\]; accepted: none"):
        hf.apply(llama, "full", window=8)
    hf.apply(llama, "hf-streaming", window=8).remove()  # card names work too
    assert llama.config._attn_implementation == "sdpa"


def test_unapplied_routing_and_dropout(llama):
    from transformers import AttentionInterface

    handle = hf.apply(llama, "full")
    handle.remove()
    # a model whose config still names the implementation but has no handle (set by hand)
    llama.set_attn_implementation(hf.IMPLEMENTATION)
    assert AttentionInterface._global_mapping[hf.IMPLEMENTATION] is hf.attention_forward
    with pytest.raises(RuntimeError, match="no attnkit.hf.apply"):
        llama(torch.randint(1, 128, (1, 4)))
    llama.set_attn_implementation("sdpa")
    llama.config.attention_dropout = 0.1
    for m in llama.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.1
    with hf.apply(llama, "full"):
        llama.train()
        with pytest.raises(ValueError, match="no dropout"):
            llama(torch.randint(1, 128, (1, 4)))
