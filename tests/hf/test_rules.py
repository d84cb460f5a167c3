"""The rule protocol of attnkit.hf.policies (issue 23, part 1): scored eviction, a static
selection at prefill and a rule's own attention over the full cache, each decoded step by step
through the head-wise cache and compared with a float64 reference that keeps every token in the
model's own cache and materialises the mask of what the rule keeps (the reference computes the
kept sets and the scores itself, over the full history)."""

from dataclasses import dataclass

import pytest
import torch
from hf_models import VOCAB, greedy_decode, padded_inputs, llama, tiny  # noqa: F401  (llama: a fixture)

hf = pytest.importorskip("attnkit.hf")

from attnkit.hf.policies import GroupCall, Rule  # noqa: E402
from transformers import AttentionInterface, DynamicCache  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


# -- three rules of the protocol, written as a method file would write them ---------------------
@dataclass(frozen=True)
class TopMass(Rule):
    """(a) scored eviction: each KV head keeps the ``budget`` candidates that received the most
    attention so far (summed over queries and over the KV head's query heads)."""

    budget: int
    scored = True

    def attend(self, q, k, v, call):
        out, received = call.attend_probs(q, k, v)
        B, S = received.shape[0], received.shape[2]
        return out, received.view(B, len(call.kv_heads), call.group_size, S).sum(2)

    def keep(self, pos, scores, call):
        real = pos >= call.start[:, None, None]  # [B, 1|n, S']
        ranked = scores.masked_fill(~real, float("-inf"))
        top = ranked.topk(min(self.budget, ranked.shape[2]), dim=2).indices
        return torch.zeros_like(ranked, dtype=torch.bool).scatter(2, top, True) & real


def _picked(pos, start, kv_head):
    """The prompt tokens TopPick keeps on ``kv_head``: every third real token, offset by the head."""
    return (pos >= start) & ((pos - start + kv_head) % 3 == 0)


@dataclass(frozen=True)
class Pick(Rule):
    """(b) a static selection at prefill, per head (the prompt's tokens ``_picked``), then the last
    ``window`` tokens during decode. Stateful: it remembers where the prompt ended."""

    window: int
    stateful = True

    def keep(self, pos, scores, call):
        if call.prefill:
            call.state["prompt_last"] = call.last
        heads = torch.tensor(call.kv_heads, device=pos.device)[None, :, None]
        start = call.start[:, None, None]
        prompt = (pos <= call.state["prompt_last"]) & _picked(pos, start, heads)
        return prompt | ((pos > call.last - self.window) & (pos >= start))


@dataclass(frozen=True)
class EvenKeys(Rule):
    """(c) a rule's own attention over the full cache: a query sees the keys at an even distance
    from its row's start, and itself (written out here, not through call.attend)."""

    evicts = False

    def attend(self, q, k, v, call):
        g = call.group_size
        even = (call.k_pos[:, :, None, :] - call.start[:, None, None, None]) % 2 == 0
        allowed = call.base() & (even | (call.k_pos[:, :, None, :] == call.q_pos[None, None, :, None]))
        kk, vv = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        logits = (q @ kk.transpose(-1, -2)) * call.scale
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
        return probs @ vv


class OneRule(hf.Policy):
    """Every KV head of layer 0 follows ``rule``; layer 1 too, except its KV head 0 (full)."""

    name = "one-rule"

    def __init__(self, rule):
        self._rule = rule

    def rule(self, layer_idx, kv_head):
        return None if (layer_idx, kv_head) == (1, 0) else self._rule


# -- the float64 reference: every token in the model's cache, the kept set as a mask ------------
class Reference:
    """An attention function for transformers that keeps, per layer, the set of kept positions
    per (row, KV head) as a boolean over every position, and scores of its own."""

    NAME = "attnkit-test-rules-reference"

    def __init__(self, kind, start, **options):
        self.kind, self.start, self.options = kind, start, options
        self.kept, self.score, self.prompt_last = {}, {}, {}
        AttentionInterface.register(self.NAME, self)
        AttentionMaskInterface.register(self.NAME, sdpa_mask)

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        layer = module.layer_idx
        B, Hq, T, D = query.shape
        Hkv, S = key.shape[1], key.shape[2]
        g = Hq // Hkv
        q_pos = torch.arange(S - T, S)
        k_pos = torch.arange(S)
        start = self.start[:, None, None]  # [B, 1, 1]
        mask = (k_pos[None, :] <= q_pos[:, None]).expand(B, 1, T, S) if attention_mask is None else attention_mask
        ruled = torch.ones(Hkv, dtype=torch.bool)
        if layer == 1:
            ruled[0] = False  # OneRule: layer 1's KV head 0 is full
        cand = torch.ones(B, Hkv, S, dtype=torch.bool)
        if layer in self.kept:
            prev = self.kept[layer]
            cand[:, :, : prev.shape[2]] = prev
        cand[:, ~ruled] = True
        allowed = mask & cand[:, :, None, :]  # [B, Hkv, T, S]
        if self.kind == "even":
            even = ((k_pos[None, None, :] - start) % 2 == 0)[:, :, None, :] | (k_pos[None, None, None, :] ==
                                                                               q_pos[None, None, :, None])
            allowed = allowed & (even | ~ruled[None, :, None, None])
        allowed = allowed.repeat_interleave(g, dim=1)
        k = key.repeat_interleave(g, dim=1)
        v = value.repeat_interleave(g, dim=1)
        probs = ((query @ k.transpose(-1, -2)) * scaling).masked_fill(~allowed, float("-inf"))
        probs = probs.softmax(-1).nan_to_num(0.0)  # [B, Hq, T, S]
        out = probs @ v
        real_q = (q_pos[None, :] >= self.start[:, None]).to(probs.dtype)  # padding queries do not score
        received = (probs * real_q[:, None, :, None]).sum(2).view(B, Hkv, g, S).sum(2)  # [B, Hkv, S]
        real_k = k_pos[None, None, :] >= start
        if self.kind == "top":
            score = torch.zeros(B, Hkv, S, dtype=torch.float64)
            if layer in self.score:
                score[:, :, : self.score[layer].shape[2]] = self.score[layer]
            score = (score + received) * cand
            self.score[layer] = score
            budget = self.options["budget"]
            keep = torch.zeros(B, Hkv, S, dtype=torch.bool)
            for b in range(B):
                for h in range(Hkv):
                    ok = (cand[b, h] & real_k[b, 0]).nonzero().flatten()
                    best = ok[score[b, h, ok].argsort(descending=True)[:budget]]
                    keep[b, h, best] = True
        elif self.kind == "pick":
            if layer not in self.prompt_last:
                self.prompt_last[layer] = S - 1
            heads = torch.arange(Hkv)[None, :, None]
            prompt = (k_pos <= self.prompt_last[layer]) & _picked(k_pos[None, None, :], start, heads)
            keep = cand & (prompt | ((k_pos > S - 1 - self.options["window"]) & real_k))
        else:
            keep = torch.ones(B, Hkv, S, dtype=torch.bool)
        keep[:, ~ruled] = True
        self.kept[layer] = keep
        return out.transpose(1, 2).contiguous(), None


def _inputs(B=2, T=14, pads=(0, 5), seed=0):
    return padded_inputs(B, T, pads, seed)


_decode = greedy_decode


def _reference(model, ids, mask, steps, kind, **options):
    start = (mask == 0).sum(1)  # left padding: the first real position
    ref = Reference(kind, start, **options)
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


CASES = [("top", TopMass(budget=5), {"budget": 5}), ("pick", Pick(window=3), {"window": 3}),
         ("even", EvenKeys(), {})]


@pytest.mark.parametrize("kind, rule, options", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_rule_decode_equals_float64_reference(arch, kind, rule, options):
    model = tiny(arch, dtype=torch.float64)
    ids, mask = _inputs()
    with hf.apply(model, OneRule(rule)) as handle:
        got = _decode(model, ids, mask, handle.cache(), steps=9)
    ref, _ = _reference(model, ids, mask, 9, kind, **options)
    _assert_same(got, ref, mask)
    # the rule changes the model (else the comparison proves little)
    full, _ = _reference(model, ids, mask, 9, "full")
    assert not torch.allclose(got[-1], full[-1])


def test_scored_cache_keeps_the_budget_per_head_with_positions_per_head():
    model = tiny("llama", dtype=torch.float64)
    ids, mask = _inputs()
    steps, budget = 6, 5
    with hf.apply(model, OneRule(TopMass(budget=budget))) as handle:
        cache = handle.cache()
        _decode(model, ids, mask, cache, steps=steps)
    _, ref = _reference(model, ids, mask, steps, "top", budget=budget)
    S = ids.shape[1] + steps
    elt, D = 8, 16
    expected = 0
    for layer in cache.layers:
        for group, (k, v, pos), scores in zip(layer.groups, layer.stores(), layer.scores()):
            n = len(group.kv_heads)
            if pos is not None and pos.dim() == 2:  # a group of one KV head: [B, K]
                pos = pos[:, None]
            if group.rule is None:
                assert pos is None and k.shape[2] == S
                expected += 2 * 2 * n * S * D * elt
                continue
            assert k.shape == (2, n, budget, D) and pos.shape == (2, n, budget) and scores.shape == (2, n, budget)
            assert bool((pos >= 0).all())  # every row has more than budget real tokens by now
            # the kept positions are the reference's kept sets, head by head
            kept = ref.kept[layer.layer_idx]
            for b in range(2):
                for j, h in enumerate(group.kv_heads):
                    assert pos[b, j].tolist() == kept[b, h].nonzero().flatten().tolist()
            # the storage behind each kept tensor is only what it shows
            for t in (k, v):
                assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
            expected += 2 * 2 * n * budget * D * elt
    assert cache.nbytes() == expected


def test_pick_keeps_its_prefill_selection_per_head():
    model = tiny("llama", dtype=torch.float64)
    ids, mask = _inputs()
    with hf.apply(model, OneRule(Pick(window=3))) as handle:
        cache = handle.cache()
        _decode(model, ids, mask, cache, steps=4)
    k, v, pos = cache.layers[0].stores()[0]
    S, start = ids.shape[1] + 4, (mask == 0).sum(1)
    for b in range(2):
        for h in range(2):
            p = torch.arange(ids.shape[1])
            picked = p[_picked(p, start[b], h)].tolist()
            assert [x for x in pos[b, h].tolist() if x >= 0] == picked + list(range(S - 3, S))


def test_a_stateless_rule_runs_on_the_models_own_cache_and_a_stateful_one_refuses(llama):
    model = llama.double()
    ids, mask = _inputs()
    with hf.apply(model, OneRule(EvenKeys())) as handle:
        got = _decode(model, ids, mask, handle.cache(), steps=3)
        given = _decode(model, ids, mask, DynamicCache(), steps=3)
    _assert_same(got, given, mask)
    for rule in (TopMass(budget=4), Pick(window=2)):
        with hf.apply(model, OneRule(rule)), pytest.raises(ValueError, match="handle.cache()"):
            _decode(model, ids, mask, DynamicCache(), steps=1)


def test_group_call_attend_probs_equals_written_out_softmax():
    """call.attend and call.attend_probs against float64 softmax with the mask materialised, GQA,
    left padding (padding queries do not count in what a key received)."""
    torch.manual_seed(0)
    B, n, g, T, S, D = 2, 2, 3, 5, 9, 8
    q = torch.randn(B, n * g, T, D, dtype=torch.float64)
    k, v = torch.randn(B, n, S, D, dtype=torch.float64), torch.randn(B, n, S, D, dtype=torch.float64)
    k_pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8], [-1, 2, 3, 4, 5, 6, 7, 8, 8]])[:, None].expand(B, n, S).clone()
    k_pos[1, 1, -1] = -1  # an empty slot of one head
    q_pos = torch.arange(4, 9)
    start = torch.tensor([0, 5])
    call = GroupCall(TopMass(budget=3), 0, (0, 1), g, q_pos, k_pos, start, None, 0.3, None, 9, None, {}, "reference")
    allowed = (k_pos[:, :, None, :] <= q_pos[None, None, :, None]) & (k_pos >= 0)[:, :, None, :]
    assert torch.equal(call.base(), allowed)
    big = allowed.repeat_interleave(g, dim=1)
    logits = (q @ k.repeat_interleave(g, dim=1).transpose(-1, -2)) * 0.3
    probs = logits.masked_fill(~big, float("-inf")).softmax(-1)
    ref = probs @ v.repeat_interleave(g, dim=1)
    real = (q_pos[None, :] >= start[:, None]).double()
    received = (probs * real[:, None, :, None]).sum(2)
    out, got = call.attend_probs(q, k, v, chunk_elements=B * n * g * S * 2)  # several chunks of queries
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(got, received, atol=1e-12, rtol=0)
    torch.testing.assert_close(call.attend(q, k, v), ref, atol=1e-12, rtol=0)
    # an observation window (SnapKV-like): only the last 2 queries count
    window = torch.zeros(B, T, dtype=torch.bool)
    window[:, -2:] = True
    _, got = call.attend_probs(q, k, v, queries=window)
    torch.testing.assert_close(got, (probs * (real * window)[:, None, :, None]).sum(2), atol=1e-12, rtol=0)


def test_bad_rules_raise_value_error(llama):
    class NotARule(hf.Policy):
        def rule(self, layer_idx, kv_head):
            return "window"

    class Unhashable(Rule):
        __hash__ = None

    class Returns(hf.Policy):
        def __init__(self, rule):
            self._rule = rule

        def rule(self, layer_idx, kv_head):
            return self._rule

    with pytest.raises(ValueError, match="accepted: None"):
        hf.apply(llama, NotARule())
    with pytest.raises(ValueError, match="unhashable"):
        hf.apply(llama, Returns(Unhashable()))

    @dataclass(frozen=True)
    class ScoredNoTuple(Rule):
        scored = True

    @dataclass(frozen=True)
    class TupleNotScored(Rule):
        def attend(self, q, k, v, call):
            return call.attend(q, k, v), None

    ids = torch.randint(1, VOCAB, (1, 6))
    for rule, match in ((ScoredNoTuple(), "must return"), (TupleNotScored(), "not scored")):
        with hf.apply(llama, Returns(rule)) as handle, torch.no_grad(), pytest.raises(ValueError, match=match):
            llama(ids, past_key_values=handle.cache())


def test_a_rule_sees_the_calls_token_ids(llama):
    """call.input_ids: the ids of the call's queries, at attend and at keep (prefill and decode)."""
    seen = []

    @dataclass(frozen=True)
    class Spy(Rule):
        def attend(self, q, k, v, call):
            seen.append(("attend", call.input_ids))
            return call.attend(q, k, v)

        def keep(self, pos, scores, call):
            seen.append(("keep", call.input_ids))
            return None

    ids, mask = _inputs()
    with hf.apply(llama, OneRule(Spy())) as handle:
        cache = handle.cache()
        _decode(llama, ids, mask, cache, steps=2)
    assert [s[0] for s in seen[:4]] == ["attend", "keep"] * 2  # layer 0, then layer 1's ruled group
    assert torch.equal(seen[0][1], ids) and torch.equal(seen[1][1], ids)
    assert seen[-1][1].shape == (2, 1)
    with torch.no_grad(), hf.apply(llama, OneRule(Spy())) as handle:
        seen.clear()
        llama(inputs_embeds=llama.model.embed_tokens(ids[:, :4]), past_key_values=handle.cache())
    assert seen and all(s[1] is None for s in seen)
