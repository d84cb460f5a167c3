"""`full` through attnkit equals the model's own sdpa attention (issue 22, items 4 and 10)."""

import pytest
import torch

from hf_models import ARCHS, VOCAB, llama, tiny  # noqa: F401  (llama: a fixture)

hf = pytest.importorskip("attnkit.hf")

# transformers 5.25 renames past_key_values to cache; 5.17 knows only past_key_values
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


def _batch(seed=0, B=2, T=11, pad=(0, 4)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b, p in enumerate(pad):
        mask[b, :p] = 0  # left padding
        ids[b, :p] = 0
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
def test_full_logits_and_generation_equal_sdpa(arch):
    model = tiny(arch)
    assert model.config._attn_implementation == "sdpa"
    ids, mask = _batch()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        gen_ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        one_ref = model(ids[:1]).logits
        with hf.apply(model, "full"):
            assert model.config._attn_implementation == hf.IMPLEMENTATION
            out = model(ids, attention_mask=mask).logits
            gen = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
            one = model(ids[:1]).logits  # no padding: the mask is None, plain causal
    valid = mask.bool()  # padded positions' logits are not defined
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(one, one_ref, atol=1e-5, rtol=0)
    assert torch.equal(gen, gen_ref)
    assert model.config._attn_implementation == "sdpa"


def test_apply_remove_round_trip_is_bit_identical(llama):
    ids, mask = _batch(1)
    configs = [m.config for m in llama.modules() if hasattr(m, "config")]
    before = [c._attn_implementation_internal for c in configs]
    with torch.no_grad():
        ref = llama(ids, attention_mask=mask).logits
        handle = hf.apply(llama, "streaming", sink=2, window=3)
        streamed = llama(ids, attention_mask=mask).logits
        handle.remove()
        after = llama(ids, attention_mask=mask).logits
    assert not torch.equal(streamed, ref)  # the method did act
    assert torch.equal(after, ref)
    assert [c._attn_implementation_internal for c in configs] == before
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in llama.modules())  # the hooks are gone


def test_apply_twice_and_remove_twice_raise(llama):
    handle = hf.apply(llama, "full")
    with pytest.raises(RuntimeError, match="already has an attnkit.hf method applied"):
        hf.apply(llama, "streaming")
    handle.remove()
    with pytest.raises(RuntimeError, match="already removed"):
        handle.remove()
    hf.apply(llama, "streaming").remove()  # after remove, applying again is fine


def test_removed_model_refuses_the_stale_cache(llama):
    handle = hf.apply(llama, "streaming", sink=2, window=3)
    cache = handle.cache()
    handle.remove()
    with pytest.raises(RuntimeError, match="not applied any more"):
        llama(torch.randint(0, VOCAB, (1, 5)), past_key_values=cache)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_full_through_the_headwise_cache_and_backends(llama, backend):
    ids, mask = _batch(2)
    with torch.no_grad():
        ref = llama.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        ref_logits = llama(ids, attention_mask=mask).logits
        with hf.apply(llama, "full", backend=backend) as handle:
            cache = handle.cache()
            gen = llama.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, past_key_values=cache)
            logits = llama(ids, attention_mask=mask).logits
    assert torch.equal(gen, ref)
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], ref_logits[valid], atol=1e-5, rtol=0)
    # one full group per layer holding every token: the bytes of a plain KV cache
    B, S, Hkv, D = 2, ids.shape[1] + 7, 2, 16  # the last generated token is never fed back
    assert cache.nbytes() == 2 * B * Hkv * S * D * 4 * 2  # 2 layers, keys and values, fp32


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_full_and_headwise_on_device(arch, device):
    """fp32 on each device: full equals sdpa; the head-wise cache's decode equals the masked reference
    (the policy as a mask over a cache that keeps every token); Gemma 3's own cache (its sliding
    layers drop keys) cannot serve the policy: a clear error (this test once expected a warning there)."""
    from transformers import DynamicCache

    model = tiny(arch).to(device)
    ids, mask = _batch()
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        gen_ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        with hf.apply(model, "full"):
            out = model(ids, attention_mask=mask).logits
            gen = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        policy = hf.Headwise(full_heads=[[True, False], [False, False]], sink=2, window=4)
        with hf.apply(model, policy) as handle:
            got = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                 past_key_values=handle.cache(), output_scores=True, return_dict_in_generate=True)
            with pytest.warns(UserWarning, match="no memory is saved"):
                # DynamicCache() without a config: full layers that keep every token
                want = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                      past_key_values=DynamicCache(), output_scores=True,
                                      return_dict_in_generate=True)
            if arch == "gemma3":
                with pytest.raises(ValueError, match="needs the head-wise cache"):
                    model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-4, rtol=0)
    assert torch.equal(gen, gen_ref)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores), atol=1e-4, rtol=0)
