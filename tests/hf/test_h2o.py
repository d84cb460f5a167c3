"""H2O, SinkLoRA's sink variant and SinkLoRA's SF-Attn (issue 23, item 5).

H2O decodes step by step equal to a float64 reference that keeps every token in the model's own
cache, accumulates the attention scores itself over the full history, chooses the kept set with
plain loops and attends under that set as a materialised mask; the head-wise cache holds exactly
the budget per head; SF-Attn's mask equals its definition built from explicit segments, and a
training step under it matches a float64 reference, gradients included."""

import pytest
import torch
from attnkit import patterns
from hf_models import VOCAB, greedy_decode, padded_inputs, llama, tiny  # noqa: F401  (llama: a fixture)

hf = pytest.importorskip("attnkit.hf")

from attnkit.hf.h2o import H2O, HeavyHitters, SFAttn, SinkLoRA, SinkShiftedGroups  # noqa: E402
from transformers import AttentionInterface, DynamicCache  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


class H2OReference:
    """A float64 attention function for transformers: every token stays in the model's cache; per
    layer it keeps its own scores and kept sets (per row and KV head) over every position."""

    NAME = "attnkit-test-h2o-reference"

    def __init__(self, start, budget, recent, sink):
        self.start, self.budget, self.recent, self.sink = start, budget, recent, sink
        self.kept, self.score = {}, {}
        AttentionInterface.register(self.NAME, self)
        AttentionMaskInterface.register(self.NAME, sdpa_mask)

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        layer = module.layer_idx
        B, Hq, T, D = query.shape
        Hkv, S = key.shape[1], key.shape[2]
        g = Hq // Hkv
        q_pos = torch.arange(S - T, S)
        mask = (torch.arange(S)[None, :] <= q_pos[:, None]).expand(B, 1, T, S) if attention_mask is None \
            else attention_mask
        cand = torch.ones(B, Hkv, S, dtype=torch.bool)
        score = torch.zeros(B, Hkv, S, dtype=torch.float64)
        if layer in self.kept:
            old = self.kept[layer].shape[2]
            cand[:, :, :old], score[:, :, :old] = self.kept[layer], self.score[layer]
        allowed = (mask & cand[:, :, None, :]).repeat_interleave(g, dim=1)
        logits = (query @ key.repeat_interleave(g, dim=1).transpose(-1, -2)) * scaling
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
        out = probs @ value.repeat_interleave(g, dim=1)
        for b in range(B):
            for qh in range(Hq):
                for t in range(T):
                    if q_pos[t] >= self.start[b]:  # a padding query scores nothing
                        score[b, qh // g] += probs[b, qh, t]
        keep = torch.zeros(B, Hkv, S, dtype=torch.bool)
        last = S - 1
        for b in range(B):
            start = int(self.start[b])
            for h in range(Hkv):
                real = [j for j in range(start, S) if cand[b, h, j]]
                fixed = [j for j in real if j - start < self.sink or j > last - self.recent]
                others = sorted((j for j in real if j not in fixed), key=lambda j: (-float(score[b, h, j]), j))
                for j in fixed + others[: max(0, self.budget - len(fixed))]:
                    keep[b, h, j] = True
        self.kept[layer], self.score[layer] = keep, score
        return out.transpose(1, 2).contiguous(), None


def _peaky(model, factor=3.0):
    """Sharper attention (q and k scaled): on a random model the heavy hitters are then scattered
    tokens, not only the first ones, so which tokens a head keeps depends on the scores' details."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(factor)
    return model


def _inputs(B=2, T=14, pads=(0, 5), seed=0):
    return padded_inputs(B, T, pads, seed)


_decode = greedy_decode


def _reference(model, ids, mask, steps, budget, recent, sink):
    ref = H2OReference((mask == 0).sum(1), budget, recent, sink)
    saved = model.config._attn_implementation
    model.set_attn_implementation(H2OReference.NAME)
    try:
        return _decode(model, ids, mask, DynamicCache(), steps), ref
    finally:
        model.set_attn_implementation(saved)


CASES = [("h2o", dict(budget=6, recent=2), 0), ("h2o", dict(budget=5, recent=0), 0),
         ("sinklora", dict(budget=6, recent=2, sink=2), 2)]


@pytest.mark.parametrize("method, options, sink", CASES, ids=["h2o", "h2o-no-recent", "sinklora"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_h2o_decode_equals_float64_reference(arch, method, options, sink):
    """Batch of 2 with left padding (5), GQA (4 query heads on 2 KV heads), 10 decode steps."""
    model = _peaky(tiny(arch, dtype=torch.float64))
    ids, mask = _inputs()
    with hf.apply(model, method, **options) as handle:
        cache = handle.cache()
        got = _decode(model, ids, mask, cache, steps=10)
    ref, reference = _reference(model, ids, mask, 10, options["budget"], options["recent"], sink)
    valid = mask.bool()
    torch.testing.assert_close(got[0][valid], ref[0][valid], atol=1e-10, rtol=0)
    for a, b in zip(got[1:], ref[1:]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    # the cache holds exactly the reference's kept sets, head by head
    for layer in cache.layers:
        (k, v, pos), = layer.stores()
        kept = reference.kept[layer.layer_idx]
        for b in range(2):
            for h in range(2):
                assert pos[b, h].tolist() == kept[b, h].nonzero().flatten().tolist()
    # heavy hitters are not just the oldest tokens: some head kept an older token and dropped a newer one
    later = [bool((kept[b, h, :-options["recent"] or None].int().diff() > 0).any())
             for kept in reference.kept.values() for b in range(2) for h in range(2)]
    assert any(later)
    # and H2O changes the model's outputs (else the comparison proves little)
    with hf.apply(model, "full"):
        full = _decode(model, ids, mask, DynamicCache(), steps=10)
    assert not torch.allclose(got[-1], full[-1])


def test_keep_by_hand():
    """HeavyHitters.keep on hand-made scores: the sinks and the recent tokens stay whatever their
    scores, the heavy hitters are the highest scores among the others (ties: the earlier one),
    padding and empty slots never stay."""
    from attnkit.hf.policies import GroupCall

    rule = HeavyHitters(budget=5, recent=1, sink=1)
    pos = torch.tensor([[[-1, 2, 3, 4, 5, 6, 7, 8, 9]]]).expand(2, 2, 9)  # [B, n, S'], -1: an empty slot
    scores = torch.tensor([[[9., 0.1, 5., 1., 7., 1., 1., 4., 0.],    # row 0, head 0
                            [9., 0.1, 1., 1., 1., 1., 1., 1., 0.]],   # head 1: ties among 3..8
                           [[9., 0.1, 5., 1., 7., 1., 1., 4., 0.],    # row 1: padding up to position 3
                            [0., 0.0, 0., 0., 0., 0., 0., 0., 0.]]])
    start = torch.tensor([2, 4])
    call = GroupCall(rule, 0, (0, 1), 2, torch.arange(9, 10), pos, start, None, 1.0, None, 10, scores, {}, "reference")
    keep = rule.keep(pos, scores, call)
    kept = [[pos[b, h][keep[b, h]].tolist() for h in range(2)] for b in range(2)]
    # row 0: sink 2, recent 9, heavy: 5 (7.), 3 (5.), 8 (4.)
    assert kept[0][0] == [2, 3, 5, 8, 9]
    assert kept[0][1] == [2, 3, 4, 5, 9]  # ties: the earliest
    # row 1 starts at 4: sink 4, recent 9, heavy 6, 8, then 5 (1.0 before 7's equal 1.0)
    assert kept[1][0] == [4, 5, 6, 8, 9]
    assert kept[1][1] == [4, 5, 6, 7, 9]


def test_cache_keeps_exactly_the_budget_per_head(llama):
    """After the prefill and after every decode step, every KV head of every layer holds exactly
    ``budget`` tokens, and the bytes held are those tokens' keys and values (nothing larger behind)."""
    ids, mask = _inputs(T=20, pads=(0, 3))
    budget, counts = 7, []
    with hf.apply(llama, "h2o", budget=budget, recent=3) as handle:
        cache = handle.cache()

        def check():
            total = 0
            for layer in cache.layers:
                (k, v, pos), = layer.stores()
                assert k.shape == (2, 2, budget, 16) and pos.shape == (2, 2, budget)
                assert bool((pos >= 0).all())
                assert layer.scores()[0].shape == (2, 2, budget)
                for t in (k, v):
                    assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
                total += 2 * 2 * budget * 2 * 16 * 4  # rows x KV heads x tokens x (key + value) x D x fp32
            counts.append(total)
            assert cache.nbytes() == total
            # the bookkeeping: an int64 position and a float32 score per slot and head
            assert cache.nbytes(metadata=True) == total + 2 * 2 * 2 * budget * (8 + 4)

        _decode(llama, ids, mask, cache, steps=5, after_each=check)
    assert len(counts) == 6
    # against the model's own cache at the end: 25 tokens per head
    assert counts[-1] / (2 * 2 * 25 * 2 * 2 * 16 * 4) == pytest.approx(7 / 25)


def test_short_prompt_keeps_everything_until_the_budget(llama):
    with torch.no_grad(), hf.apply(llama, "h2o", budget=32, recent=8) as handle:
        cache = handle.cache()
        llama(torch.randint(1, VOCAB, (1, 10)), past_key_values=cache)
        assert cache.layers[0].stores()[0][0].shape[2] == 10
        llama(torch.randint(1, VOCAB, (1, 30)), past_key_values=cache)
        assert cache.layers[0].stores()[0][0].shape[2] == 32


def test_budget_as_a_fraction_of_each_rows_prompt(llama):
    """budget=0.5: each row keeps half of its own real prompt (left padding not counted)."""
    ids, mask = _inputs(T=20, pads=(0, 6))
    with hf.apply(llama, "h2o", budget=0.5, recent=0.5) as handle:
        cache = handle.cache()
        _decode(llama, ids, mask, cache, steps=3)
    (k, v, pos), = cache.layers[1].stores()
    kept = (pos >= 0).sum(-1)  # [B, H]
    assert kept[0].tolist() == [10, 10] and kept[1].tolist() == [7, 7]
    assert k.shape[2] == 10


def test_padded_row_decodes_as_the_sequence_alone():
    model = tiny("llama", dtype=torch.float64)
    ids, mask = _inputs(pads=(0, 5))
    with hf.apply(model, "sinklora", budget=6, recent=2, sink=2) as handle:
        batch = _decode(model, ids, mask, handle.cache(), steps=8)
        alone = _decode(model, ids[1:, 5:], mask[1:, 5:], handle.cache(), steps=8)
    torch.testing.assert_close(batch[0][1, 5:], alone[0][0], atol=1e-10, rtol=0)
    for a, b in zip(batch[1:], alone[1:]):
        torch.testing.assert_close(a[1], b[0], atol=1e-10, rtol=0)


def test_names_defaults_and_the_models_own_cache(llama):
    assert hf.policies.METHODS["h2o"] is H2O and hf.policies.METHODS["sinklora"] is SinkLoRA
    assert SinkLoRA().sink == 4 and H2O().sink == 0
    with hf.apply(llama, "hf-sinklora", budget=16) as handle:
        assert handle.policy == SinkLoRA(budget=16, recent=0.5, sink=4)
        assert handle.plan(0, 2)[0].rule == HeavyHitters(16, 0.5, 4)
        # the scores live in the head-wise cache: the model's own cache cannot serve H2O
        with torch.no_grad(), pytest.raises(ValueError, match="handle.cache()"):
            llama(torch.randint(1, VOCAB, (1, 8)))
    names = {c.name for c in hf.CARDS}
    assert {"hf-h2o", "hf-sinklora", "hf-sf-attn"} <= names


BAD = [
    (dict(budget=0), "budget must be a positive integer"),
    (dict(budget=-3), "budget must be a positive integer"),
    (dict(budget=True), "budget must be a positive integer"),
    (dict(budget=1.5), "budget must be a positive integer"),
    (dict(budget=0.0), "budget must be a positive integer"),
    (dict(budget="64"), "budget must be a positive integer"),
    (dict(budget=8, recent=9), "recent=9 is larger than budget=8"),
    (dict(budget=8, recent=-1), "recent must be a non-negative integer"),
    (dict(budget=8, recent=1.5), "recent must be a non-negative integer"),
    (dict(budget=8, recent=6, sink=4), "sink \\+ recent = 4 \\+ 6 exceeds budget=8"),
    (dict(budget=8, recent=0.75, sink=4), "sink \\+ recent = 4 \\+ 6 exceeds budget=8"),
    (dict(budget=8, sink=-1), "sink must be a non-negative integer"),
]


@pytest.mark.parametrize("options, match", BAD)
def test_bad_options_raise_value_error(llama, options, match):
    with pytest.raises(ValueError, match=match):
        H2O(**options)
    with pytest.raises(ValueError, match=match):
        hf.apply(llama, "h2o", **options)
    assert hf.Handle.of(llama) is None  # nothing half-applied


def test_unknown_option_is_named(llama):
    with pytest.raises(ValueError, match="accepted: budget, recent, sink"):
        hf.apply(llama, "h2o", window=4)


# -- SF-Attn ----------------------------------------------------------------------------
def _sf_definition(T, G, heads, sink):
    """SF-Attn's mask from explicit segments: unshifted heads on [0, G), [G, 2G), ...; the shifted
    half on [0, G/2), [G/2, G/2 + G), ..., the last segment ending at T (no wrap-around); causal
    within a segment; the first ``sink`` tokens visible to every later query."""
    mask = torch.zeros(heads, T, T, dtype=torch.bool)
    for h in range(heads):
        first = G // 2 if h >= heads - heads // 2 else G
        bounds = [0] + list(range(first, T, G)) + [T]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            for i in range(lo, hi):
                mask[h, i, lo: i + 1] = True
        for i in range(T):
            mask[h, i, : min(sink, i + 1)] = True
    return mask


@pytest.mark.parametrize("T, G, heads, sink", [(16, 4, 4, 2), (24, 6, 3, 0), (13, 4, 2, 4), (8, 8, 4, 1)])
def test_sf_attn_mask_equals_its_definition(T, G, heads, sink):
    pattern = SinkShiftedGroups(G, heads, sink)
    got = pattern.dense(T, T, heads=heads)[0]
    assert torch.equal(got, _sf_definition(T, G, heads, sink))
    # and it differs from LongLoRA's cyclic S2-Attn exactly where the shift wraps around: the last
    # queries of a shifted head never see the first half group (beyond the sinks)
    assert not got[-1, -1, sink: G // 2].any()


def test_sf_attn_trains_like_a_float64_reference_with_gradients():
    """Training mode, no cache: logits and the gradients of a trainable subset (q_proj and v_proj,
    the usual LoRA targets; peft is not installed here, so plain requires_grad stands in for LoRA
    adapters) equal a float64 reference attention under the definition's mask."""
    T, G, sink = 16, 4, 2
    model = tiny("llama", dtype=torch.float64).train()
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("q_proj.weight", "v_proj.weight")))
    ids = torch.randint(1, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))

    def loss_and_grads():
        model.zero_grad()
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        loss.backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    with hf.apply(model, "sf-attn", group_size=G, sink=sink):
        logits, grads = loss_and_grads()

    mask = _sf_definition(T, G, 4, sink)

    def reference(module, query, key, value, attention_mask, scaling=None, **kwargs):
        k = key.repeat_interleave(2, dim=1)
        v = value.repeat_interleave(2, dim=1)
        probs = ((query @ k.transpose(-1, -2)) * scaling).masked_fill(~mask, float("-inf")).softmax(-1)
        return (probs @ v).transpose(1, 2).contiguous(), None

    AttentionInterface.register("attnkit-test-sf-reference", reference)
    AttentionMaskInterface.register("attnkit-test-sf-reference", sdpa_mask)
    saved = model.config._attn_implementation
    model.set_attn_implementation("attnkit-test-sf-reference")
    try:
        ref_logits, ref_grads = loss_and_grads()
    finally:
        model.set_attn_implementation(saved)
    torch.testing.assert_close(logits, ref_logits, atol=1e-10, rtol=0)
    assert set(grads) == set(ref_grads) and len(grads) == 4  # 2 layers x (q_proj, v_proj)
    for name in grads:
        assert grads[name].abs().sum() > 0
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-10, rtol=0)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    # the pattern matters: full causal attention gives other logits
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, logits)


def test_sf_attn_refuses_decoding_and_bad_options(llama):
    with hf.apply(llama, "sf-attn", group_size=4) as handle, torch.no_grad():
        cache = handle.cache()
        llama(torch.randint(1, VOCAB, (1, 8)), past_key_values=cache)  # a whole-sequence forward
        with pytest.raises(ValueError, match="training-time pattern"):
            llama(torch.randint(1, VOCAB, (1, 1)), past_key_values=cache)
    for options, match in [(dict(group_size=1), "group_size must be an integer >= 2"),
                           (dict(group_size=4.0), "group_size must be an integer >= 2"),
                           (dict(group_ratio=0), "group_ratio must be a number in"),
                           (dict(group_ratio=1.5), "group_ratio must be a number in"),
                           (dict(sink=-2), "sink must be a non-negative integer")]:
        with pytest.raises(ValueError, match=match):
            SFAttn(**options)
    with pytest.raises(ValueError, match="group_size must be an integer >= 2"):
        SinkShiftedGroups(1, 4)
    with pytest.raises(ValueError, match="num_heads must be a positive integer"):
        SinkShiftedGroups(4, 0)
    with pytest.raises(ValueError, match="built for num_heads=4"):
        patterns.resolve(SinkShiftedGroups(4, 4)).validate(1, 2, 8)


def test_h2o_beside_other_rules_in_one_layer(llama):
    """KV head 0 on H2O, KV head 1 on sink + window in layer 0, full heads in layer 1: each group
    keeps its own budget (per-head positions beside shared ones) and batched decoding runs."""

    class Mixed(hf.Policy):
        name = "mixed"

        def rule(self, layer_idx, kv_head):
            if layer_idx == 1:
                return None
            return HeavyHitters(budget=5, recent=2) if kv_head == 0 else hf.SinkWindow(sink=1, window=3)

    ids, mask = _inputs(T=12, pads=(0, 2))
    with hf.apply(llama, Mixed()) as handle:
        cache = handle.cache()
        _decode(llama, ids, mask, cache, steps=3)
    groups = cache.layers[0].groups
    assert [type(g.rule).__name__ for g in groups] == ["SinkWindow", "HeavyHitters"]  # by budget: 4, then 5
    (k1, _, p1), (k0, _, p0) = cache.layers[0].stores()
    assert k1.shape[1:3] == (1, 4) and p1.shape == (2, 4)
    assert k0.shape[1:3] == (1, 5) and p0.shape == (2, 5)  # a group of one KV head: [B, K]
    assert p1[0].tolist() == [0, 12, 13, 14] and p1[1].tolist() == [2, 12, 13, 14]
    assert p0[:, -2:].tolist() == [[13, 14], [13, 14]]
    assert cache.layers[1].stores()[0][0].shape[2] == 15
