"""Task-KV (attnkit.hf.taskkv, arXiv 2501.15113) against a float64 reference written out here:
every token in the model's own cache, the attention materialised, the paper's selection computed
in plain Python (semantic vectors from the observation window, distance to the layer's centre,
the farthest heads full, sinks + pooled middle activations + a recent window for the others),
and decoding under the materialised mask of the kept sets. Left-padded batches, Llama and
Mistral (its sliding window), GQA (2 query heads per KV head)."""

import math

import pytest
import torch
from hf_models import greedy_decode, padded_inputs, tiny

hf = pytest.importorskip("attnkit.hf")

from attnkit.hf.taskkv import TaskKV, TaskKVRule, full_counts, identify, kept_tokens  # noqa: E402
from transformers import AttentionInterface, DynamicCache  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

OPTIONS = dict(budget=10, sink=2, recent=3, window=4, pool=3, top=6)


class Reference:
    """A transformers attention function keeping, per layer, the kept positions per (row, KV head)
    as a boolean over every position; the first call of a layer (the prompt) chooses them."""

    NAME = "attnkit-test-taskkv-reference"

    def __init__(self, start, options, table=None, farthest=None, closest=False):
        self.start, self.o, self.table = start.tolist(), options, table
        self.farthest, self.closest = farthest, closest  # per layer: f(r); the supplement
        self.kept, self.chosen, self.full, self.prompt_last = {}, {}, {}, {}
        AttentionInterface.register(self.NAME, self)
        AttentionMaskInterface.register(self.NAME, sdpa_mask)

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        layer = module.layer_idx
        B, Hq, T, D = query.shape
        Hkv, S = key.shape[1], key.shape[2]
        g = Hq // Hkv
        k_pos = torch.arange(S)
        mask = (k_pos[None, :] <= torch.arange(S - T, S)[:, None]).expand(B, 1, T, S) \
            if attention_mask is None else attention_mask
        kept = torch.ones(B, Hkv, S, dtype=torch.bool)
        if layer in self.kept:  # this call's new tokens are candidates too
            kept[:, :, : self.kept[layer].shape[2]] = self.kept[layer]
        allowed = (mask & kept[:, :, None, :]).repeat_interleave(g, dim=1)  # [B, Hq, T, S]
        logits = (query @ key.repeat_interleave(g, dim=1).transpose(-1, -2)) * scaling
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
        out = probs @ value.repeat_interleave(g, dim=1)
        if layer not in self.prompt_last:
            self._choose(layer, probs, value, S, T)
        last, o = S - 1, self.o
        new = torch.zeros(B, Hkv, S, dtype=torch.bool)
        for b in range(B):
            for h in range(Hkv):
                for j in range(self.start[b], S):
                    new[b, h, j] = (self.full[layer][b][h] or j in self.chosen[layer][b][h]
                                    or j > last - o["recent"])
        self.kept[layer] = new
        return out.transpose(1, 2).contiguous(), None

    def _choose(self, layer, probs, value, S, T):
        """The paper's selection over the prompt, written out position by position."""
        B, Hq = probs.shape[:2]
        Hkv = value.shape[1]
        g, o = Hq // Hkv, self.o
        self.prompt_last[layer] = S - 1
        self.chosen[layer], self.full[layer] = [], []
        for b in range(B):
            start = self.start[b]
            window = [i for i in range(T - o["window"], T) if S - T + i >= start]  # real observation queries
            C = [[sum(float(probs[b, h * g + x, i, j]) for x in range(g) for i in window) / (g * len(window))
                  for j in range(S)] for h in range(Hkv)]
            if self.table is not None:
                full = [bool(self.table[layer][h]) for h in range(Hkv)]
            else:
                vectors = []
                for h in range(Hkv):
                    top = sorted(range(S), key=lambda j: -C[h][j])[: o["top"]]
                    vectors.append(sum(C[h][j] * value[b, h, j] for j in top))
                centre = sum(vectors) / Hkv
                distance = [float(((vec - centre) ** 2).sum().sqrt()) for vec in vectors]
                order = sorted(range(Hkv), key=lambda h: -distance[h])
                f = self.farthest[layer]
                picked = set(order[:f]) | ({order[-1]} if self.closest and 0 < f < Hkv else set())
                full = [h in picked for h in range(Hkv)]
            chosen = []
            r = o["pool"] // 2
            for h in range(Hkv):
                pooled = [sum(C[h][i] for i in range(j - r, j + r + 1) if 0 <= i < S) / o["pool"] for j in range(S)]
                middle = [j for j in range(start + o["sink"], S) if j <= S - 1 - o["recent"]]
                middle = sorted(middle, key=lambda j: (-pooled[j], j))[: o["budget"] - o["sink"] - o["recent"]]
                chosen.append(set(range(start, min(S, start + o["sink"]))) | set(middle))
            self.chosen[layer].append(chosen)
            self.full[layer].append(full)


def _inputs(B=2, T=24, pads=(0, 5), seed=0):
    return padded_inputs(B, T, pads, seed)


_decode = greedy_decode


def _reference(model, ids, mask, steps, options, **kw):
    ref = Reference((mask == 0).sum(1), options, **kw)
    saved = model.config._attn_implementation
    model.set_attn_implementation(Reference.NAME)
    try:
        return _decode(model, ids, mask, DynamicCache(), steps), ref
    finally:
        model.set_attn_implementation(saved)


def _assert_same(got, ref, mask):
    valid = mask.bool()
    torch.testing.assert_close(got[0][valid], ref[0][valid], atol=1e-10, rtol=0)
    for a, b in zip(got[1:], ref[1:]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def _kept_positions(cache, layer_idx, B, Hkv):
    """Per (row, KV head) the positions the head-wise cache holds (a full group: every position
    from the row's first real one, as the reference counts)."""
    layer = cache.layers[layer_idx]
    held = [[None] * Hkv for _ in range(B)]
    for group, (k, _, pos) in zip(layer.groups, layer.stores()):
        for j, h in enumerate(group.kv_heads):
            for b in range(B):
                if pos is None:
                    held[b][h] = set(range(int(layer.start[b]), k.shape[2]))
                else:
                    p = pos[b] if pos.dim() == 2 else pos[b, j]
                    held[b][h] = {int(x) for x in p if x >= 0}
    return held


def _reference_positions(ref, layer_idx, B, Hkv):
    kept = ref.kept[layer_idx]
    return [[set(kept[b, h].nonzero().flatten().tolist()) for h in range(Hkv)] for b in range(B)]


FOUR = dict(num_attention_heads=8, num_key_value_heads=4)  # GQA: 2 query heads per KV head
# (arch, model overrides, policy options, reference keywords)
CASES = {
    # 4 KV heads: with 2, both are always equally far from their mean (a tie rounding decides)
    "prompt-llama": ("llama", FOUR, dict(full_fraction=0.25, closest=False), dict(farthest=[1, 1])),
    "prompt-mistral": ("mistral", FOUR, dict(full_fraction=0.5, closest=False), dict(farthest=[2, 2])),
    # the closest head joins the farthest ones; f(r) from 2 heads down to 1
    "prompt-closest": ("llama", FOUR,
                       dict(full_fraction=0.5, full_last=1, closest=True), dict(farthest=[2, 1], closest=True)),
    "table-llama": ("llama", {}, dict(full_heads=[[True, False], [False, False]]),
                    dict(table=[[True, False], [False, False]])),
    "table-mistral": ("mistral", {}, dict(full_heads=[[False, True], [True, False]]),
                      dict(table=[[False, True], [True, False]])),
}


def _model(arch, overrides):
    return tiny(arch, dtype=torch.float64, **overrides)


@pytest.mark.parametrize("case", ["prompt-llama", "prompt-mistral", "prompt-closest"])
def test_prefill_selection_equals_float64_reference(case):
    arch, overrides, options, ref_kw = CASES[case]
    model = _model(arch, overrides)
    ids, mask = _inputs()
    policy = TaskKV(**OPTIONS, **options)
    with hf.apply(model, policy) as handle:
        cache = handle.cache()
        _decode(model, ids, mask, cache, steps=0)
    _, ref = _reference(model, ids, mask, 0, OPTIONS, **ref_kw)
    Hkv = model.config.num_key_value_heads
    middle_seen = False
    for layer in range(model.config.num_hidden_layers):
        state = cache.layers[layer].states[0]
        assert state["full"].tolist() == ref.full[layer]
        assert _kept_positions(cache, layer, 2, Hkv) == _reference_positions(ref, layer, 2, Hkv)
        for b in range(2):
            start = int((mask[b] == 0).sum())
            for h in range(Hkv):
                middle = ref.chosen[layer][b][h] - set(range(start, start + OPTIONS["sink"]))
                after_sinks = set(range(start + OPTIONS["sink"], start + OPTIONS["sink"] + len(middle)))
                middle_seen |= bool(middle) and middle != after_sinks  # a selection, not just the next tokens
    assert middle_seen
    # the reference selects the count the schedule asks for
    assert [sum(sum(r) for r in ref.full[layer]) for layer in range(2)] == [
        2 * policy.full_count(layer, Hkv) for layer in range(2)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_decode_equals_float64_reference(case):
    arch, overrides, options, ref_kw = CASES[case]
    model = _model(arch, overrides)
    ids, mask = _inputs()
    with hf.apply(model, "taskkv", **OPTIONS, **options) as handle:
        got = _decode(model, ids, mask, handle.cache(), steps=8)
    ref, _ = _reference(model, ids, mask, 8, OPTIONS, **ref_kw)
    _assert_same(got, ref, mask)
    # the budget heads change the model (else the comparison proves little)
    with torch.no_grad():
        full = _decode(model, ids, mask, DynamicCache(), steps=8)
    assert not torch.allclose(got[-1], full[-1])


def test_cache_keeps_exactly_the_budgets_per_head():
    """With a table the heads are grouped statically: the budget heads hold ``budget`` tokens, the
    full heads every position, and the bytes are those counts (storage included)."""
    model = _model("llama", {})
    ids, mask = _inputs()
    steps, table = 5, [[True, False], [False, False]]
    with hf.apply(model, "taskkv", **OPTIONS, full_heads=table) as handle:
        cache = handle.cache()
        _decode(model, ids, mask, cache, steps=steps)
    S, B, D, elt = ids.shape[1] + steps, 2, 16, 8
    counts = kept_tokens(cache)
    expected = 0
    for layer, row in enumerate(table):
        for h, full in enumerate(row):
            want = S if full else OPTIONS["budget"]
            assert counts[layer][:, h].tolist() == [want, want]
            expected += B * want * D * elt * 2
        for k, v, _ in cache.layers[layer].stores():
            for t in (k, v):
                assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    assert cache.nbytes() == expected == B * D * elt * 2 * (S + 3 * OPTIONS["budget"])  # full: 4 * S tokens


def test_heads_chosen_per_prompt_count_their_budget_but_share_a_block():
    """full_heads=None: each budget head holds exactly ``budget`` tokens (kept_tokens), the full
    heads every real token; the layer's heads are one block, so the bytes are the longest head's."""
    model = _model("llama", {})
    ids, mask = _inputs()
    steps = 4
    with hf.apply(model, "taskkv", **OPTIONS, full_fraction=0.5, closest=False) as handle:
        cache = handle.cache()
        _decode(model, ids, mask, cache, steps=steps)
    real = (mask.sum(1) + steps).tolist()
    for layer, counts in zip(cache.layers, kept_tokens(cache)):
        full = layer.states[0]["full"]
        assert full.sum(1).tolist() == [1, 1]  # f(r) = 2 * 0.5 per row
        for b in range(2):
            for h in range(2):
                assert int(counts[b, h]) == (real[b] if full[b, h] else OPTIONS["budget"])
    # the protocol's limit: one [B, n, K] block per group, K the longest head (row 0's full head)
    assert cache.nbytes() == 2 * 2 * (2 * 2 * max(real) * 16 * 8)


def test_identify_on_the_prompt_gives_the_per_prompt_outputs_with_the_memory_freed():
    model = _model("llama", FOUR)
    ids, mask = _inputs(B=1, pads=(0,))
    options = dict(full_fraction=0.5, full_last=1, closest=True)
    table = identify(model, ids, mask, window=OPTIONS["window"], top=OPTIONS["top"], **options)
    assert table.shape == (2, 4) and table.sum(1).tolist() == [3, 2]  # f(r) = 2, 1, plus the closest head
    with hf.apply(model, "taskkv", **OPTIONS, **options) as handle:
        dynamic = handle.cache()
        per_prompt = _decode(model, ids, mask, dynamic, steps=6)
    for layer in range(2):
        assert dynamic.layers[layer].states[0]["full"][0].tolist() == table[layer].tolist()
    with hf.apply(model, "taskkv", **OPTIONS, **options, full_heads=table) as handle:
        static = handle.cache()
        fixed = _decode(model, ids, mask, static, steps=6)
    for a, b in zip(per_prompt, fixed):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    assert static.nbytes() < dynamic.nbytes()
    # a batch: one table, from the distances averaged over its rows
    ids2, mask2 = _inputs(B=2, pads=(0, 5), seed=1)
    assert identify(model, ids2, mask2, window=4, top=6, **options).sum(1).tolist() == [3, 2]


def test_schedule_and_policy_through_methods_and_cards():
    assert full_counts(4, 8, 0.25, 1) == [2, 2, 1, 1]  # 2 - (2 - 1) * r / 3, rounded half up
    assert full_counts(3, 4, 0.5, None) == [2, 2, 2]
    assert full_counts(1, 4, 1.0, 0) == [4]
    assert hf.METHODS["taskkv"] is TaskKV
    card = next(c for c in hf.CARDS if c.name == "hf-taskkv")
    assert card.arxiv == "2501.15113" and isinstance(card.layer(**card.defaults), TaskKV)
    assert card.flop_count(1, 8192, 256, 4).attention_fwd < hf.CARDS[0].flop_count(1, 8192, 256, 4).attention_fwd
    model = _model("llama", {})
    with hf.apply(model, "hf-taskkv", budget=8, sink=1, recent=2, full_fraction=0.2) as handle:
        assert isinstance(handle.policy, TaskKV)
        # 2 KV heads, 0.4 of a head full (0 after rounding): every head a budget head
        groups = handle.plan(0, 2)
        assert len(groups) == 1 and groups[0].rule == TaskKVRule(1, 2, 32, 7, 256, 8, 0, False)
    with hf.apply(model, "taskkv", budget=8, sink=1, recent=2) as handle:
        # a quarter of 2 heads rounds up to 1, and the closest head joins it: every head full
        assert handle.plan(1, 2)[0].rule is None and not handle.evicts(1, 2)
    # a stateful rule on the model's own cache: refused with the remedy
    ids, mask = _inputs()
    with hf.apply(model, "taskkv", **OPTIONS, full_fraction=0.0), pytest.raises(ValueError, match="handle.cache()"):
        _decode(model, ids, mask, DynamicCache(), steps=1)


BAD = [
    (dict(budget=0), "budget"),
    (dict(budget=-4), "budget"),
    (dict(budget=2.5), "budget"),
    (dict(budget=8, sink=4, recent=5), "sink \\+ recent"),
    (dict(sink=-1), "sink"),
    (dict(recent=0), "recent"),
    (dict(full_fraction=1.5), "full_fraction"),
    (dict(full_fraction=-0.1), "full_fraction"),
    (dict(full_fraction=math.nan), "full_fraction"),
    (dict(full_fraction=True), "full_fraction"),
    (dict(full_last=-1), "full_last"),
    (dict(closest=1), "closest"),
    (dict(window=0), "window"),
    (dict(pool=4), "odd"),
    (dict(top=0), "top"),
    (dict(full_heads=[[1, 0]]), "full_heads"),
    (dict(full_heads=[[True], [True, False]]), "full_heads"),
    (dict(full_heads=torch.ones(2, 2)), "full_heads"),
]


@pytest.mark.parametrize("options, match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_options_raise_value_error(options, match):
    with pytest.raises(ValueError, match=match):
        TaskKV(**options)


def test_bad_options_for_the_model_raise_value_error():
    model = _model("llama", {})
    with pytest.raises(ValueError, match=r"full_heads has shape \[1, 2\].*\[2, 2\]"):
        hf.apply(model, "taskkv", full_heads=[[True, False]])
    with pytest.raises(ValueError, match="full_last=3 exceeds the model's 2 KV heads"):
        hf.apply(model, "taskkv", full_last=3)
    with pytest.raises(ValueError, match="does not take option"):
        hf.apply(model, "taskkv", separators=["\n"])
    with pytest.raises(ValueError, match="input_ids"):
        identify(model, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="plan"):
        TaskKV().rule(0, 0)
