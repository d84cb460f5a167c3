"""ProxyAttn (arXiv 2509.24745): the block selection against a float64 reference written with
loops (proxy heads, sampled queries, the dynamic budget, the top blocks per head); the model's
output against masked float64 attention over the reference's selection (prefill, then decode at
full attention); every block kept is full attention; the FlexAttention block mask equals the
dense mask; bad options raise ValueError."""

import math

import pytest
import torch
from hf_models import VOCAB, padded_inputs, llama, tiny  # noqa: F401  (llama: a fixture)

hf = pytest.importorskip("attnkit.hf")

import attnkit  # noqa: E402
from attnkit.hf.proxyattn import BlockSelection, ProxyAttn, ProxyAttnRule, density, estimate  # noqa: E402
from transformers import AttentionInterface, DynamicCache  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


def reference_blocks(q, k, start, block_size, gamma=0.95, budget=None, proxy_heads=None, query_stride=16, scale=None):
    """The selection, plainly: per row, proxy and query block, in Python loops (float64)."""
    q, k = q.double(), k.double()
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    g, bs = Hq // Hkv, block_size
    P = Hkv if proxy_heads is None else proxy_heads
    per = Hq // P
    scale = D**-0.5 if scale is None else scale
    nK = -(-S // bs)
    if budget is None and gamma >= 1:
        budget = 1.0
    blocks = torch.zeros(B, Hq, nK, nK, dtype=torch.bool)
    for b in range(B):
        s = int(start[b])
        qp = [q[b, p * per:(p + 1) * per].mean(0) for p in range(P)]  # [T, D]
        kp = [torch.stack([k[b, h // g] for h in range(p * per, (p + 1) * per)]).mean(0) for p in range(P)]
        importance = torch.zeros(P, nK, nK, dtype=torch.float64)
        count = [0] * nK
        sampled = []
        for t in range(T):
            i = S - T + t
            block = i // bs
            if (min(block * bs + bs - 1, S - 1) - i) % query_stride:
                continue
            sampled.append((t, i))
            count[block] += 1
            for p in range(P):
                probs = torch.softmax((kp[p][s:i + 1] @ qp[p][t]) * scale, 0) if i >= s else torch.zeros(0)
                for j, prob in zip(range(s, i + 1), probs):
                    importance[p, block, j // bs] += prob
        for block in range(nK):
            importance[:, block] /= max(1, count[block])
        last = (S - 1) // bs

        def visible(block):
            return list(range(s // bs, block + 1))

        def by_importance(p, block):
            return sorted(visible(block), key=lambda J: -float(importance[p, block, J]))  # stable: ties by index

        needed = {}
        if budget is None:
            for h in range(Hq):
                mass = torch.zeros(nK, dtype=torch.float64)
                rows = [(t, i) for t, i in sampled if i // bs == last]
                for t, i in rows:
                    probs = torch.softmax((k[b, h // g, s:i + 1] @ q[b, h, t]) * scale, 0)
                    for j, prob in zip(range(s, i + 1), probs):
                        mass[j // bs] += prob / len(rows)
                held, n = 0.0, 0
                total = float(mass.sum())
                for J in by_importance(h // per, last):
                    held += float(mass[J])
                    n += 1
                    if held >= gamma * total:
                        break
                needed[h] = n
        for block in range((S - T) // bs, nK):
            m = len(visible(block))
            if m == 0:
                continue
            for h in range(Hq):
                if budget is not None:
                    keep = math.ceil(budget * m - 1e-9)
                else:
                    keep = -(-needed[h] * m // len(visible(last)))
                chosen = set(by_importance(h // per, block)[:max(1, keep)]) | {block, s // bs}
                for J in chosen:
                    blocks[b, h, block, J] = True
    return blocks


def masked_attention(q, k, v, blocks, start, block_size, scale):
    """Float64 softmax attention under the materialised mask of a selection."""
    B, Hq, T, D = q.shape
    S = k.shape[2]
    g = Hq // k.shape[1]
    i = torch.arange(S - T, S)[:, None]
    j = torch.arange(S)[None, :]
    out = torch.zeros(B, Hq, T, v.shape[3], dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            allowed = (j <= i) & (j >= start[b]) & blocks[b, h][i // block_size, j // block_size]
            logits = (q[b, h].double() @ k[b, h // g].double().T * scale).masked_fill(~allowed, float("-inf"))
            out[b, h] = torch.softmax(logits, -1).nan_to_num(0.0) @ v[b, h // g].double()
    return out


CASES = [dict(gamma=0.6, query_stride=3), dict(gamma=0.9, proxy_heads=4), dict(budget=0.4, proxy_heads=1),
         dict(gamma=1.0), dict(gamma=0.3, query_stride=8)]


@pytest.mark.parametrize("options", CASES, ids=[str(sorted(c.items())) for c in CASES])
def test_block_selection_equals_float64_reference(options):
    torch.manual_seed(0)
    B, Hq, Hkv, S, T, D, bs = 2, 8, 2, 75, 61, 16, 8  # the call starts mid-block; a partial last block
    q = torch.randn(B, Hq, T, D, dtype=torch.float64) * 2
    k = torch.randn(B, Hkv, S, D, dtype=torch.float64) * 2
    start = torch.tensor([0, 11])
    got = estimate(q, k, start=start, block_size=bs, **options)
    ref = reference_blocks(q, k, start, bs, **options)
    assert torch.equal(got, ref)
    if options.get("gamma") == 1.0:
        assert density(got, start, bs, first_query_block=(S - T) // bs) == 1.0
    else:
        assert density(got, start, bs, first_query_block=(S - T) // bs) < 1.0  # the selection bites


class Reference:
    """A float64 attention function for transformers: the reference selection and masked softmax
    at prefill (calls of at least ``block_size`` queries), full causal attention when decoding."""

    NAME = "attnkit-test-proxyattn-reference"

    def __init__(self, start, options):
        self.start, self.options = start, options
        AttentionInterface.register(self.NAME, self)
        AttentionMaskInterface.register(self.NAME, sdpa_mask)

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        T, S = query.shape[2], key.shape[2]
        bs = self.options["block_size"]
        if T >= bs:
            blocks = reference_blocks(query, key, self.start, scale=scaling, **self.options)
        else:
            blocks = torch.ones(query.shape[0], query.shape[1], -(-S // bs), -(-S // bs), dtype=torch.bool)
        out = masked_attention(query, key, value, blocks, self.start, bs, scaling)
        return out.transpose(1, 2).contiguous(), None


def _inputs(B=2, T=70, pads=(0, 5), seed=0):
    return padded_inputs(B, T, pads, seed)


def _run(model, ids, mask, cache, steps):
    out = []
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        r = model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        out.append(r.logits)
        for _ in range(steps):
            nxt = r.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            pos = mask.sum(-1, keepdim=True) - 1
            r = model(nxt, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
            out.append(r.logits)
    return out


def _assert_same(got, ref, mask, atol=1e-10):
    valid = mask.bool()
    torch.testing.assert_close(got[0][valid], ref[0][valid], atol=atol, rtol=0)
    for a, b in zip(got[1:], ref[1:]):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize("options", [dict(block_size=8, gamma=0.5, query_stride=2),
                                     dict(block_size=16, budget=0.35, proxy_heads=1)], ids=["dynamic", "fixed"])
def test_model_output_equals_masked_float64_reference(options):
    model = tiny("llama", dtype=torch.float64)
    ids, mask = _inputs()
    with hf.apply(model, "proxyattn", **options) as handle:
        got = _run(model, ids, mask, handle.cache(), steps=4)
    Reference((mask == 0).sum(1), options)  # registers itself with transformers
    saved = model.config._attn_implementation
    model.set_attn_implementation(Reference.NAME)
    try:
        expected = _run(model, ids, mask, DynamicCache(), steps=4)
    finally:
        model.set_attn_implementation(saved)
    _assert_same(got, expected, mask)
    full = _run(model, ids, mask, DynamicCache(), steps=0)
    assert not torch.allclose(got[0][mask.bool()], full[0][mask.bool()])  # the selection bites


@pytest.mark.parametrize("options", [dict(gamma=1.0), dict(budget=1.0)], ids=["gamma=1", "budget=1"])
def test_every_block_is_full_attention(options):
    model = tiny("llama", dtype=torch.float64)
    ids, mask = _inputs()
    with hf.apply(model, "proxyattn", block_size=8, **options) as handle:
        got = _run(model, ids, mask, handle.cache(), steps=3)
    full = _run(model, ids, mask, DynamicCache(), steps=3)
    _assert_same(got, full, mask, atol=1e-12)


def test_flex_block_mask_equals_the_dense_mask():
    """The block mask built straight from the grid (full blocks below the diagonal, partial ones
    on it and at the start) gives FlexAttention the selection's exact output (CPU, float32)."""
    torch.manual_seed(1)
    B, Hq, Hkv, S, D, bs = 2, 4, 2, 96, 16, 16
    q, k, v = torch.randn(B, Hq, S, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    start = torch.tensor([0, 21])
    blocks = estimate(q, k, start=start, block_size=bs, budget=0.5, query_stride=4)
    pattern = BlockSelection(blocks, start, bs)
    block_mask = pattern.flex_block_mask(B, Hq, S, S, 0, "cpu", bs)
    assert block_mask is not None

    def grid(num, indices):  # a BlockMask's rows back to a boolean [B, H, nQ, nK] grid
        out = torch.zeros(*indices.shape, dtype=torch.bool)
        take = torch.arange(indices.shape[-1]) < num[..., None]
        return out.scatter(-1, indices.long(), take)

    partial = grid(block_mask.kv_num_blocks, block_mask.kv_indices)
    full = grid(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    allowed = pattern.dense(S, S, batch=B, heads=Hq).view(B, Hq, S // bs, bs, S // bs, bs)
    assert not bool((partial & full).any())
    assert torch.equal(partial | full, allowed.any(5).any(3))  # every block with a pair, and only those
    assert bool(allowed.all(5).all(3)[full].all())  # a full block skips the mask: all of it must be allowed
    assert bool(full.any()) and bool(partial.any())
    dense = masked_attention(q, k, v, blocks, start, bs, D**-0.5).float()
    got = attnkit.attend(q, k, v, pattern=pattern, backend="flex")
    real = (torch.arange(S)[None, :] >= start[:, None])[:, None, :, None]  # padding queries: no keys
    torch.testing.assert_close(got * real, dense * real, atol=2e-5, rtol=0)
    torch.testing.assert_close(attnkit.attend(q, k, v, pattern=pattern, backend="sdpa") * real, dense * real,
                               atol=2e-5, rtol=0)


def test_apply_by_name_and_card(llama):
    from attnkit.hf.cards import CARDS

    assert hf.METHODS["proxyattn"] is ProxyAttn
    card = next(c for c in CARDS if c.name == "hf-proxyattn")
    assert card.arxiv == "2509.24745" and card.layer is ProxyAttn
    assert isinstance(card.layer(**card.defaults), hf.Policy)
    sparse = card.flops(1, 8192, card.config(256, 4, budget=0.1)).attention_fwd
    dense = CARDS[0].flops(1, 8192, CARDS[0].config(256, 4)).attention_fwd
    assert 0 < sparse < 0.3 * dense
    with hf.apply(llama, "hf-proxyattn", block_size=4) as handle, torch.no_grad():
        assert handle.policy == ProxyAttn(block_size=4)
        llama(torch.randint(1, VOCAB, (1, 20)), past_key_values=handle.cache())


def test_a_batch_decodes_as_its_rows_do_alone(llama):
    # the decode step attends under a mask of batch 1 (every row alike); it was refused for a batch of B > 1
    # ("mask (1, 1, 1, S) does not fit B=4"), which stopped `attnkit eval` at its first batched cell
    torch.manual_seed(0)
    ids = torch.randint(1, VOCAB, (3, 24))
    nxt = torch.randint(1, VOCAB, (3, 1))
    with hf.apply(llama, ProxyAttn(block_size=4, budget=0.5)) as handle, torch.no_grad():
        cache = handle.cache()
        llama(ids, past_key_values=cache)
        batched = llama(nxt, past_key_values=cache).logits
        for row in range(3):
            alone = handle.cache()
            llama(ids[row:row + 1], past_key_values=alone)
            torch.testing.assert_close(llama(nxt[row:row + 1], past_key_values=alone).logits, batched[row:row + 1],
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options, match", [
    (dict(block_size=0), "block_size must be a positive integer, got 0"),
    (dict(block_size=8.0), "block_size must be a positive integer, got 8.0"),
    (dict(gamma=0), r"gamma must be a number in \(0, 1\]"),
    (dict(gamma=1.5), r"gamma must be a number in \(0, 1\].*got 1.5"),
    (dict(gamma=True), r"gamma must be a number in \(0, 1\].*got True"),
    (dict(budget=0.0), "budget must be None .* got 0.0"),
    (dict(budget=2), "budget must be None .* got 2"),
    (dict(proxy_heads=0), "proxy_heads must be a positive integer, got 0"),
    (dict(query_stride=-1), "query_stride must be a positive integer, got -1"),
])
def test_bad_options_raise_value_error(options, match):
    with pytest.raises(ValueError, match=match):
        ProxyAttn(**options)
    with pytest.raises(ValueError, match=match):
        ProxyAttnRule(**options)


def test_proxy_heads_that_do_not_divide_the_heads_raise_value_error(llama):
    with hf.apply(llama, "proxyattn", block_size=4, proxy_heads=3) as handle, torch.no_grad():
        with pytest.raises(ValueError, match="proxy_heads=3 must divide the 4 query heads"):
            llama(torch.randint(1, VOCAB, (1, 12)), past_key_values=handle.cache())


def test_speed_benchmark_dry_run_on_cpu(tmp_path):
    """benchmarks/proxyattn_speed.py --device cpu runs at tiny sizes and writes its JSON."""
    import json

    from conftest import load_script

    module = load_script("proxyattn_speed")
    out = tmp_path / "speed.json"
    module.main(["--device", "cpu", "--seq", "128", "--budget", "0.5", "--repeat", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["seq"] == 128 and rows[0]["rel_rms_error_last_block"] < 1e-5
    assert {"dense_ms", "sparse_ms", "speedup", "attention_speedup", "density"} <= set(rows[0])
    with pytest.raises(ValueError, match="multiple of --block-size"):
        module.main(["--device", "cpu", "--seq", "100"])


@pytest.mark.parametrize("arch, expected", [("llama", True), ("mistral", False)])
def test_the_block_mask_path_is_taken_only_where_the_models_mask_is_causal_from_the_start(arch, expected,
                                                                                         monkeypatch):
    """On CUDA the prefill runs FlexAttention over BlockSelection (causal, keys from the row's
    first real token) only where the model's mask says exactly that: left padding yes (Llama),
    a sliding window no (Mistral's window of 6: the dense mask keeps it)."""
    from attnkit.hf import proxyattn

    seen, check = [], proxyattn._causal_from_start

    def recording(call, T, S):
        seen.append(check(call, T, S))
        return seen[-1]

    monkeypatch.setattr(proxyattn, "_causal_from_start", recording)
    model = tiny(arch, dtype=torch.float64)
    ids, mask = _inputs(T=40)
    with hf.apply(model, "proxyattn", block_size=8, budget=0.5) as handle:
        _run(model, ids, mask, handle.cache(), steps=0)
    assert seen and all(x is expected for x in seen)
