"""Realistic usages found wrong or obscure by probing attnkit.hf (issue 22): each was a deep crash,
a misleading error or a refused valid input before its fix."""

import copy

import numpy as np
import pytest
import torch

from hf_models import VOCAB, llama, tiny  # noqa: F401  (llama: a fixture)

hf = pytest.importorskip("attnkit.hf")

from transformers import DynamicCache  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


def _ids(B=2, T=10, seed=0):
    return torch.randint(1, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _greedy(model, ids, cache, steps):
    """Prefill then ``steps`` greedy tokens through ``cache``; the logits of every call."""
    out = []
    with torch.no_grad():
        r = model(ids, past_key_values=cache, use_cache=True)
        out.append(r.logits)
        for _ in range(steps):
            r = model(r.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
            out.append(r.logits)
    return out


def test_sink_zero_is_the_models_own_sliding_window():
    """Streaming(sink=0, window=W) is a plain sliding window: on a Mistral whose own window is
    switched off it equals the same model decoding with its own window W (transformers' mask)."""
    model = tiny("mistral", dtype=torch.float64)  # sliding_window=6
    ids = _ids(T=9)
    ref = _greedy(model, ids, DynamicCache(config=model.config), steps=6)
    model.config.sliding_window = None  # the model's own attention is now plain causal
    with hf.apply(model, "streaming", sink=0, window=6) as handle:
        cache = handle.cache()
        got = _greedy(model, ids, cache, steps=6)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    assert cache.layers[0].stores()[0][0].shape[2] == 6  # only the window is kept
    assert hf.Headwise(full_heads=[[True]], sink=0, window=2).sink == 0


@pytest.mark.parametrize("table", [
    np.array([[True, False], [False, False]]),
    [[np.True_, np.False_], [False, False]],
    [torch.tensor([True, False]), torch.tensor([False, False])],
])
def test_headwise_tables_from_numpy_and_tensor_rows(table):
    want = hf.Headwise(full_heads=[[True, False], [False, False]], sink=1, window=2)
    got = hf.Headwise(full_heads=table, sink=1, window=2)
    assert [got.plan(i, 2) for i in range(2)] == [want.plan(i, 2) for i in range(2)]


def test_headwise_table_without_values_is_refused():
    with pytest.raises(ValueError, match="meta device, which holds no values"):
        hf.Headwise(full_heads=torch.ones(2, 2, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="numpy array of dtype int64"):
        hf.Headwise(full_heads=np.ones((2, 2), dtype=np.int64))


def test_a_cache_used_by_another_model_or_batch_is_refused(llama):
    other = tiny("llama", seed=1)
    ids = _ids()
    with torch.no_grad(), hf.apply(llama, "streaming", sink=1, window=3) as handle:
        cache = handle.cache()
        # before: the plain model attended only the new keys of each call, silently, then a misleading error
        with pytest.raises(ValueError, match="built by the handle on LlamaForCausalLM .* used by a model that handle "
                                             "does not route"):
            other(ids, past_key_values=cache)
        cache = handle.cache()
        llama(ids[:1], past_key_values=cache)
        with pytest.raises(ValueError, match="holds a batch of 1 sequences but got keys of batch 2"):
            llama(ids[:, :1], past_key_values=cache)
        assert handle._calls == 0  # the raising call is over: the cache refuses other models again
        with pytest.raises(ValueError, match="used by a model that handle does not route"):
            other(ids, past_key_values=handle.cache())
        with pytest.raises(ValueError, match=r"HeadwiseCache cannot be cropped \(crop\(-2\) was asked"):
            cache.crop(-2)  # assisted generation crops; before: AttributeError deep in transformers
        # the interrupted call left nothing behind: a fresh cache works
        torch.testing.assert_close(llama(ids, past_key_values=handle.cache()).logits, llama(ids).logits)


def test_meta_model_gives_shapes():
    with torch.device("meta"):
        model = tiny("llama")
    ids = _ids().to("meta")
    for method, options in (("full", {}), ("streaming", {"sink": 1, "window": 3})):
        with hf.apply(model, method, **options) as handle:
            assert model(ids).logits.shape == (2, 10, VOCAB)
            with pytest.raises(ValueError, match="HeadwiseCache cannot run on the meta device"):
                model(ids, past_key_values=handle.cache())


def test_deepcopy_of_an_applied_model_runs_the_same_policy(llama):
    ids = _ids()
    with torch.no_grad():
        plain = llama(ids).logits
        handle = hf.apply(llama, "streaming", sink=1, window=3)
        streamed = llama(ids).logits
        twin = copy.deepcopy(llama)
        torch.testing.assert_close(twin(ids).logits, streamed, atol=0, rtol=0)
        handle.remove()
        torch.testing.assert_close(llama(ids).logits, plain, atol=0, rtol=0)
        torch.testing.assert_close(twin(ids).logits, streamed, atol=0, rtol=0)  # the copy keeps its own handle
        twin_handle = hf.Handle.of(twin)
        assert twin_handle is not handle and twin_handle.model is twin and hf.Handle.of(llama) is None
        _greedy(twin, ids, twin_handle.cache(), steps=2)  # its head-wise cache works too
        twin_handle.remove()
        torch.testing.assert_close(twin(ids).logits, plain, atol=0, rtol=0)
        assert twin.config._attn_implementation == "sdpa"


def test_pickled_applied_model_runs_the_same_policy(llama):
    import io

    ids = _ids()
    with torch.no_grad(), hf.apply(llama, "streaming", sink=1, window=3):
        streamed = llama(ids).logits
        buffer = io.BytesIO()
        torch.save(llama, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        torch.testing.assert_close(loaded(ids).logits, streamed, atol=0, rtol=0)
    hf.Handle.of(loaded).remove()
    assert loaded.config._attn_implementation == "sdpa"


def test_alibi_model_is_refused_when_applied():
    from transformers import FalconConfig, FalconForCausalLM

    model = FalconForCausalLM(FalconConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           vocab_size=VOCAB, alibi=True))
    with pytest.raises(ValueError, match=r"ALiBi position biases .*config.alibi=True"):
        hf.apply(model, "full")
    assert model.config._attn_implementation != hf.IMPLEMENTATION


def test_a_vision_tower_keeps_its_own_attention():
    """Gemma 3 with its SigLIP vision tower: only the causal decoder is routed; before, the
    vision config was switched too and the image encoder raised 'no handle routes it'."""
    import transformers as tf

    text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=300, head_dim=16, sliding_window=6,
                layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299,
                             boi_token_index=297, eoi_token_index=298)
    torch.manual_seed(0)
    model = tf.Gemma3ForConditionalGeneration(config).eval()
    ids = torch.randint(1, 290, (1, 12), generator=torch.Generator().manual_seed(0))
    ids[0, 2:6] = 299  # the image's 4 soft tokens
    inputs = dict(input_ids=ids, pixel_values=torch.randn(1, 3, 28, 28), token_type_ids=(ids == 299).long())
    with torch.no_grad():
        ref = model(**inputs).logits
        with hf.apply(model, "full"):
            assert model.config.vision_config._attn_implementation == "sdpa"
            assert model.config.text_config._attn_implementation == hf.IMPLEMENTATION
            out = model(**inputs).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_a_cache_reused_by_a_second_generate(llama):
    """Continuing through the same head-wise cache equals one generate over the whole sequence; a
    new, shorter prompt on a used cache names the problem (before: a reshape error in the model)."""
    model = llama.double()
    ids = _ids(T=9)
    with torch.no_grad(), hf.apply(model, "streaming", sink=1, window=3) as handle:
        cache = handle.cache()
        first = model.generate(ids, max_new_tokens=4, do_sample=False, past_key_values=cache)
        more = torch.cat([first, _ids(T=2, seed=1)], dim=1)  # 15 tokens; the cache then holds 15 + 3
        got = model.generate(more, max_new_tokens=4, do_sample=False, past_key_values=cache)
        want = model.generate(more, max_new_tokens=4, do_sample=False, past_key_values=handle.cache())
        assert torch.equal(got, want)
        with pytest.raises(ValueError, match="already holds 18 tokens and this call brings no new ones"):
            model.generate(ids[:, :5], max_new_tokens=2, do_sample=False, past_key_values=cache)


class _Checkerboard(hf.Policy):
    """A user's own policy: KV head h of layer l streams where l + h is even."""

    def rule(self, layer_idx, kv_head):
        return None if (layer_idx + kv_head) % 2 else hf.SinkWindow(1, 2)


class _BadRule(hf.Policy):
    def rule(self, layer_idx, kv_head):
        return (1, 2)  # a (sink, window) tuple instead of a SinkWindow


def test_a_users_own_policy_and_a_bad_rule(llama):
    model = llama.double()
    ids = _ids()
    with torch.no_grad(), hf.apply(model, _Checkerboard()) as handle:
        got = model.generate(ids, max_new_tokens=4, do_sample=False, past_key_values=handle.cache())
        with pytest.warns(UserWarning, match="no memory is saved"):
            want = model.generate(ids, max_new_tokens=4, do_sample=False)  # the rule as a mask
    assert torch.equal(got, want)
    # before: AttributeError ('tuple' object has no attribute 'budget') in the first forward
    with pytest.raises(ValueError, match=r"_BadRule.rule\(0, 0\) returned \(1, 2\); accepted: None"):
        hf.apply(model, _BadRule())
    assert model.config._attn_implementation == "sdpa"


def test_save_pretrained_while_applied_saves_a_plain_model(llama, tmp_path):
    """The saved config never names 'attnkit' (a fresh process could not load it): reloading gives
    the model's own attention and its own logits."""
    from transformers import AutoModelForCausalLM

    ids = _ids()
    with torch.no_grad():
        plain = llama(ids).logits
        with hf.apply(llama, "streaming", sink=1, window=3):
            llama.save_pretrained(tmp_path)
    assert "attnkit" not in (tmp_path / "config.json").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, plain, atol=0, rtol=0)


def test_headwise_policies_compare_by_their_table():
    tables = [np.array([[True, False]]), torch.tensor([[True, False]]), [[True, False]]]
    policies = [hf.Headwise(full_heads=t, sink=1, window=2) for t in tables]
    assert policies[0] == policies[1] == policies[2]  # before: ValueError / RuntimeError (ambiguous truth value)
    assert len({hash(p) for p in policies}) == 1  # before: TypeError for the numpy table
    assert policies[0] != hf.Headwise(full_heads=[[False, False]], sink=1, window=2)
    assert policies[0] != hf.Headwise(full_heads=[[True, False]], sink=1, window=3)
