"""The head-wise KV cache (issue 22, items 3, 4 and 10): each KV-head group keeps what its rule
says, the memory of dropped tokens is released, and decoding through it equals a float64
reference of the same policy (the rule as a materialised mask over a cache that keeps everything)."""

import pytest
import torch
from attnkit import patterns
from hf_models import VOCAB, greedy_decode, padded_inputs, llama, tiny  # noqa: F401  (llama: a fixture)

hf = pytest.importorskip("attnkit.hf")

from transformers import DynamicCache  # noqa: E402

# transformers 5.25 renames past_key_values to cache; 5.17 knows only past_key_values
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

SINK, WINDOW = 2, 4


def _inputs(B=2, T=13, pads=(0, 5), seed=0):
    return padded_inputs(B, T, pads, seed)


_decode = greedy_decode


def _policy():
    # layer 0: KV head 0 full, KV head 1 streaming; layer 1: both streaming
    return hf.Headwise(full_heads=[[True, False], [False, False]], sink=SINK, window=WINDOW)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3"])
def test_headwise_decode_equals_float64_reference(arch):
    model = tiny(arch, dtype=torch.float64)
    ids, mask = _inputs()
    with hf.apply(model, _policy()) as handle:
        got = _decode(model, ids, mask, handle.cache(), steps=10)
        with pytest.warns(UserWarning, match="no memory is saved"):
            ref = _decode(model, ids, mask, DynamicCache(), steps=10)  # full layers only: never evicts
    valid = mask.bool()
    torch.testing.assert_close(got[0][valid], ref[0][valid], atol=1e-10, rtol=0)
    for a, b in zip(got[1:], ref[1:]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    # the model's own cache (sliding layers for Gemma 3) cannot serve the policy: a clear error
    if arch in ("mistral", "gemma3"):
        with hf.apply(model, _policy()), pytest.raises(ValueError, match="needs the head-wise cache"):
            _decode(model, ids, mask, DynamicCache(config=model.config), steps=1)
    # and the policy really changes the model (else the comparison proves little)
    with torch.no_grad():
        plain = model(ids[:1]).logits
    with hf.apply(model, _policy()):
        with torch.no_grad():
            assert not torch.allclose(model(ids[:1]).logits, plain)


def test_headwise_generate_equals_reference_generate(llama):
    model = llama.double()
    ids, mask = _inputs(seed=3)
    with torch.no_grad(), hf.apply(model, _policy()) as handle:
        got = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                             past_key_values=handle.cache())
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, ref)


def test_padded_row_equals_the_sequence_alone():
    """Sinks are a row's first real tokens: a left-padded row decodes as the sequence alone."""
    model = tiny("llama", dtype=torch.float64)
    ids, mask = _inputs(pads=(0, 5))
    with hf.apply(model, "streaming", sink=SINK, window=WINDOW) as handle:
        batch = _decode(model, ids, mask, handle.cache(), steps=8)
        alone = _decode(model, ids[1:, 5:], mask[1:, 5:], handle.cache(), steps=8)
    torch.testing.assert_close(batch[0][1, 5:], alone[0][0], atol=1e-10, rtol=0)
    for a, b in zip(batch[1:], alone[1:]):
        torch.testing.assert_close(a[1], b[0], atol=1e-10, rtol=0)


def test_memory_equals_what_the_policy_keeps(llama):
    ids, mask = _inputs(T=13, pads=(0, 5))
    steps = 6
    with hf.apply(llama, _policy()) as handle:
        cache = handle.cache()
        _decode(llama, ids, mask, cache, steps=steps)
    B, S, D, elt = 2, 13 + steps, 16, 4
    per_token_head = 2 * D * elt  # a key and a value
    expected = 0
    for layer, plan in zip(cache.layers, [[1, 1], [0, 2]]):
        n_full, n_stream = plan
        stores = layer.stores()
        kept = [s[0].shape[2] for s in stores]
        if n_full:
            assert kept[0] == S
            assert stores[0][2] is None
        assert kept[-1] == SINK + WINDOW  # even the padded row has sink + window real tokens by now
        pos = stores[-1][2]
        # row 0 keeps positions 0, 1 and the last WINDOW; row 1 (5 pads) its first two real tokens 5, 6
        assert pos[0].tolist() == [0, 1] + list(range(S - WINDOW, S))
        assert pos[1].tolist() == [5, 6] + list(range(S - WINDOW, S))
        expected += B * per_token_head * (n_full * S + n_stream * (SINK + WINDOW))
        # the storage behind each tensor is only what it shows: dropped tokens are not held in a larger buffer
        for k, v, _ in stores:
            for t in (k, v):
                assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    assert cache.nbytes() == expected
    full_bytes = B * per_token_head * 2 * 2 * S
    assert cache.nbytes() < full_bytes / 2


def test_sink_window_rule_matches_the_pattern():
    """The policy rule at start 0 is attnkit.patterns.sink_window; a row starting at p is it shifted by p."""
    rule = hf.SinkWindow(sink=3, window=5)
    q = torch.arange(20)[:, None]
    k = torch.arange(20)[None, :]
    ref = patterns.sink_window(3, 5).dense(20, 20)[0, 0]
    assert torch.equal(rule.allowed(q, k, torch.tensor(0)), ref)
    shifted = rule.allowed(q + 4, k + 4, torch.tensor(4))
    assert torch.equal(shifted, ref)


def test_headwise_prefill_longer_than_budget_and_short_prompt(llama):
    """A prompt shorter than sink + window keeps everything; a long one trims to the budget."""
    with hf.apply(llama, "streaming", sink=4, window=64) as handle:
        cache = handle.cache()
        with torch.no_grad():
            llama(torch.randint(1, VOCAB, (1, 10)), past_key_values=cache)
        assert cache.layers[0].stores()[0][0].shape[2] == 10
        cache = handle.cache()
        with torch.no_grad():
            llama(torch.randint(1, VOCAB, (1, 100)), past_key_values=cache)
        assert cache.layers[0].stores()[0][0].shape[2] == 68


def test_base_model_called_alone_reads_its_own_padding(llama):
    """The padding a call was made with is recorded per call, also when the inner model is called alone."""
    model = llama.double()
    ids, mask = _inputs(pads=(0, 5))
    with hf.apply(model, "streaming", sink=SINK, window=WINDOW) as handle:
        with torch.no_grad():
            model(ids, attention_mask=mask)  # a padded call first: nothing of it may leak into the next
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            inner = model.model(ids, attention_mask=mask, position_ids=pos, past_key_values=handle.cache())
            alone = model.model(ids[1:, 5:], past_key_values=handle.cache())
        assert handle._forward_start is None  # forgotten after the call
    torch.testing.assert_close(inner.last_hidden_state[1, 5:], alone.last_hidden_state[0], atol=1e-10, rtol=0)


def test_unpadded_prefill_takes_the_pattern_path(llama, monkeypatch):
    """Without padding, a first prefill hands the rule to attend as patterns.sink_window (no dense
    mask); its outputs equal the dense-mask path's (the same prompt with an all-ones padding mask
    row beside a padded one goes through the dense path)."""
    from attnkit.hf import attention as A

    seen = []
    run = A._run
    monkeypatch.setattr(A, "_run", lambda h, q, k, v, allowed, *a: seen.append(type(allowed).__name__) or
                        run(h, q, k, v, allowed, *a))
    model = llama.double()
    ids, mask = _inputs(pads=(0, 3))
    with torch.no_grad(), hf.apply(model, "streaming", sink=SINK, window=WINDOW) as handle:
        alone = model(ids[:1], past_key_values=handle.cache()).logits
        assert "SinkWindow" in seen and "Tensor" not in seen
        seen.clear()
        given = model(ids[:1]).logits  # no cache: the model's keys as they are, same shortcut
        assert "SinkWindow" in seen
        seen.clear()
        batch = model(ids, attention_mask=mask, past_key_values=handle.cache()).logits
        assert "Tensor" in seen
    torch.testing.assert_close(alone[0], batch[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(given, alone, atol=1e-10, rtol=0)


@pytest.mark.parametrize("prompt", [3, 6, 13])  # shorter than, equal to and longer than sink + window
@pytest.mark.parametrize("with_mask", [False, True])
def test_unpadded_decode_fast_path_equals_float64_reference(prompt, with_mask):
    """Without padding a sink + window group keeps contiguous slices and decodes without a mask or
    a host sync (HeadwiseLayer.plain): every step equals the policy as a mask over a full cache,
    across the step where the group first fills up, with and without a 2D attention mask."""
    model = tiny("llama", dtype=torch.float64)
    ids = torch.randint(1, VOCAB, (2, prompt), generator=torch.Generator().manual_seed(prompt))
    steps = 9

    def run(cache):
        out, mask = [], torch.ones_like(ids)
        with torch.no_grad():
            r = model(ids, attention_mask=mask if with_mask else None, past_key_values=cache, use_cache=True)
            out.append(r.logits)
            for _ in range(steps):
                nxt = r.logits[:, -1:].argmax(-1)
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
                r = model(nxt, attention_mask=mask if with_mask else None, past_key_values=cache, use_cache=True)
                out.append(r.logits)
        return out

    with hf.apply(model, _policy()) as handle:
        cache = handle.cache()
        got = run(cache)
        assert all(layer.plain for layer in cache.layers)  # the fast path ran
        with pytest.warns(UserWarning, match="no memory is saved"):
            ref = run(DynamicCache())
        # the streaming group holds sink + window tokens, no more
        assert cache.layers[1].stores()[0][0].shape[2] == min(prompt + steps, SINK + WINDOW)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
