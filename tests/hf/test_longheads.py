"""LongHeads (arXiv 2402.10685) on tiny random models: prefill (whole and in pieces) and decode
against a float64 reference that recomputes everything from the pre-RoPE queries and keys (the
chunk keys, each query's chunks in a Python loop, the remapped positions rotated by the model's
own rotary embedding); the remapped distances stay in the window; a k that covers the whole
sequence is full attention; bad options raise ValueError."""

import pytest
import torch
from hf_models import VOCAB, padded_inputs, llama, tiny  # noqa: F401  (llama: a fixture)

hf = pytest.importorskip("attnkit.hf")

from attnkit.hf import longheads  # noqa: E402
from attnkit.hf.longheads import (LongHeads, LongHeadsRule, remap_positions, rope_frequencies,  # noqa: E402
                                  select_chunks)
from transformers import AttentionInterface, DynamicCache  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Reference:
    """A float64 attention function for transformers doing LongHeads the plain way: forward hooks
    on q_proj / k_proj give the pre-RoPE queries and keys; per call it recomputes every complete
    chunk's key (once), and per (row, KV head, query) picks the chunks and rotates the chosen keys and
    the query at their remapped positions with the model's rotary embedding."""

    NAME = "attnkit-test-longheads-reference"

    def __init__(self, model, start, chunk_size, chunks):
        self.model, self.start, self.w, self.k = model, start, chunk_size, chunks
        self.q_pre, self.k_pre, self.captured, self.chunk_keys = {}, {}, {}, {}
        self.hooks = []
        for layer in model.model.layers:
            attn = layer.self_attn
            for name in ("q_proj", "k_proj"):
                self.hooks.append(getattr(attn, name).register_forward_hook(self._capture(attn.layer_idx, name)))
        AttentionInterface.register(self.NAME, self)
        AttentionMaskInterface.register(self.NAME, sdpa_mask)

    def _capture(self, layer, name):
        def hook(module, args, out):
            self.captured[(layer, name)] = out

        return hook

    def rope(self, x, positions):
        """x [..., D] at integer positions (a list), by the model's own rotary embedding."""
        if not hasattr(self, "cos"):  # the model's own tables, positions 0 .. 255
            self.cos, self.sin = (t[0] for t in self.model.model.rotary_emb(x, torch.arange(256)[None]))
        return x * self.cos[positions] + _rotate_half(x) * self.sin[positions]

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        layer = module.layer_idx
        B, Hq, T, D = query.shape
        n, S = key.shape[1], key.shape[2]
        g, w, K = Hq // n, self.w, self.k
        new_q = self.captured[(layer, "q_proj")].view(B, T, Hq, D).transpose(1, 2)
        new_k = self.captured[(layer, "k_proj")].view(B, T, n, D).transpose(1, 2)
        self.q_pre[layer] = torch.cat([self.q_pre[layer], new_q], 2) if layer in self.q_pre else new_q
        self.k_pre[layer] = torch.cat([self.k_pre[layer], new_k], 2) if layer in self.k_pre else new_k
        q_pre, k_pre = self.q_pre[layer], self.k_pre[layer]  # [B, Hq | n, S, D]
        out = torch.zeros(B, Hq, T, D, dtype=query.dtype)
        for b in range(B):
            s = int(self.start[b])
            local = list(range(w))
            chunk_keys = self.chunk_keys.setdefault((layer, b), {})  # (c, h) -> [D], once per chunk
            for c in range(len(chunk_keys) // Hq, (S - s) // w):
                span = slice(s + c * w, s + (c + 1) * w)
                for h in range(Hq):
                    qc = self.rope(q_pre[b, h, span], local)
                    kc = self.rope(k_pre[b, h // g, span], local)
                    u = (torch.softmax(qc @ kc.T * scaling, -1) @ value[b, h // g, span]).mean(0)
                    chunk_keys[(c, h)] = torch.softmax(u @ kc.T * scaling, -1) @ kc
            for t in range(T):
                i = S - T + t
                r = i - s
                if r < 0:
                    continue  # a padding query (not compared)
                cq = r // w
                for j in range(n):
                    if cq < K:
                        keys = list(range(s, i + 1))
                        new_pos, q_new = [p - s for p in keys], r
                    else:
                        scores = {c: sum(float(q_pre[b, h, i] @ chunk_keys[(c, h)]) for h in range(j * g, j * g + g))
                                  for c in range(1, cq - 1)}
                        top = sorted(scores, key=scores.get, reverse=True)[: K - 3]
                        chosen = sorted({0, cq - 1, cq, *top})
                        assert len(chosen) == K
                        keys, new_pos = [], []
                        for slot, c in enumerate(chosen):
                            for o in range(w):
                                if s + c * w + o <= i:
                                    keys.append(s + c * w + o)
                                    new_pos.append(slot * w + o)
                        q_new = (K - 1) * w + r % w
                    kr = self.rope(k_pre[b, j, keys], new_pos)
                    for h in range(j * g, j * g + g):
                        qr = self.rope(q_pre[b, h, i][None], [q_new])[0]
                        out[b, h, t] = torch.softmax(kr @ qr * scaling, -1) @ value[b, j, keys]
        return out.transpose(1, 2).contiguous(), None

    def remove(self):
        for hook in self.hooks:
            hook.remove()


def _inputs(B=2, T=30, pads=(0, 5), seed=0):
    return padded_inputs(B, T, pads, seed)


def _run(model, ids, mask, cache, steps, split=None):
    """Prefill (in two calls at ``split`` if given), then ``steps`` greedy tokens; the logits of
    the prompt [B, T, V] and of each decoded step."""
    out = []
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cuts = [0, split, ids.shape[1]] if split else [0, ids.shape[1]]
        parts = []
        for a, z in zip(cuts, cuts[1:]):
            r = model(ids[:, a:z], attention_mask=mask[:, :z], position_ids=pos[:, a:z], past_key_values=cache,
                      use_cache=True)
            parts.append(r.logits)
        out.append(torch.cat(parts, dim=1))
        for _ in range(steps):
            nxt = r.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            pos = mask.sum(-1, keepdim=True) - 1
            r = model(nxt, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
            out.append(r.logits)
    return out


def _reference(model, ids, mask, steps, chunk_size, chunks, split=None):
    ref = Reference(model, (mask == 0).sum(1), chunk_size, chunks)
    saved = model.config._attn_implementation
    model.set_attn_implementation(Reference.NAME)
    try:
        return _run(model, ids, mask, DynamicCache(), steps, split)
    finally:
        model.set_attn_implementation(saved)
        ref.remove()


def _assert_same(got, ref, mask, atol=1e-10):
    valid = mask.bool()
    torch.testing.assert_close(got[0][valid], ref[0][valid], atol=atol, rtol=0)
    for a, b in zip(got[1:], ref[1:]):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize("arch, chunks, split", [("llama", 4, None), ("llama", 5, 17), ("qwen2", 4, 9)],
                         ids=["llama-k4", "llama-k5-split-prefill", "qwen2-k4-split-prefill"])
def test_prefill_and_decode_equal_float64_reference(arch, chunks, split):
    model = tiny(arch, dtype=torch.float64)
    ids, mask = _inputs()
    options = dict(chunk_size=4, chunks=chunks, window=4 * chunks)
    with hf.apply(model, "longheads", **options) as handle:
        got = _run(model, ids, mask, handle.cache(), steps=10, split=split)
    ref = _reference(model, ids, mask, 10, 4, chunks, split)
    _assert_same(got, ref, mask)
    full = _run(model, ids, mask, DynamicCache(), steps=10)
    assert not torch.allclose(got[-1], full[-1])  # the selection bites at these lengths


def test_one_forward_without_a_cache_equals_the_reference(llama):
    """A single forward (no cache, e.g. perplexity) needs no state from earlier calls."""
    model = llama.double()
    ids, mask = _inputs(T=37)
    with hf.apply(model, "longheads", chunk_size=4, chunks=3, window=12), torch.no_grad():
        got = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    ref = _reference(model, ids, mask, 0, 4, 3)
    torch.testing.assert_close(got[mask.bool()], ref[0][mask.bool()], atol=1e-10, rtol=0)


def test_k_covering_the_sequence_equals_full_attention():
    model = tiny("llama", dtype=torch.float64)
    ids, mask = _inputs()
    steps = 6
    total = ids.shape[1] + steps  # 36 tokens: 9 chunks of 4 cover them
    with hf.apply(model, "longheads", chunk_size=4, chunks=9, window=total) as handle:
        got = _run(model, ids, mask, handle.cache(), steps=steps, split=11)
    full = _run(model, ids, mask, DynamicCache(), steps=steps)
    _assert_same(got, full, mask, atol=1e-12)


def test_remapped_distances_stay_within_the_window(llama, monkeypatch):
    """Every (query, key) pair a head attends to, recorded inside the model during a prefill and a
    decode 5x longer than the window: the remapped distance is in [0, window); a query whose
    chunks all fit keeps its true distances; a selecting query sees exactly k chunks, among them
    the first and its own two."""
    w, k, window = 4, 4, 16
    seen = []

    def recording(selected, relative, chunk_size, chunks):
        result = remap_positions(selected, relative, chunk_size, chunks)
        seen.append((selected, relative) + result)
        return result

    monkeypatch.setattr(longheads, "remap_positions", recording)
    ids, mask = _inputs(T=70)
    with hf.apply(llama, "longheads", chunk_size=w, chunks=k, window=window) as handle:
        _run(llama, ids, mask, handle.cache(), steps=12)
    selecting_pairs = 0
    for selected, relative, key_rel, key_new, query_new, valid in seen:
        distance = query_new[:, None, :, None, None] - key_new
        assert bool((distance[valid] >= 0).all()) and bool((distance[valid] < window).all())
        assert int(distance[valid].max()) <= k * w - 1
        fits = (relative >= 0) & (relative < k * w)  # [B, T]
        true_distance = relative[:, None, :, None, None] - key_rel
        keep = valid & fits[:, None, :, None, None]
        assert torch.equal(distance[keep], true_distance[keep])
        selecting = relative >= k * w
        cq = relative // w
        for b, t in selecting.nonzero().tolist():
            chosen = selected[b, :, t]  # [n, k]
            own = torch.stack([cq[b, t] - 1, cq[b, t]])
            assert bool((chosen[:, 0] == 0).all()) and bool((chosen[:, -2:] == own).all())
            assert all(len(set(row.tolist())) == k for row in chosen)
            selecting_pairs += int(valid[b, :, t].sum())
    assert selecting_pairs > 0
    assert max(int(r.max()) for _, r, *_ in seen) >= 5 * window


def test_select_chunks_keeps_first_local_and_best():
    scores = torch.tensor([[[[0.0, 5.0, 1.0, 9.0, 2.0, 7.0, 0.0, 0.0]]]])  # [1, 1, 1, C]
    got = select_chunks(scores, torch.tensor([[7]]), chunks=5)  # chunk 7: candidates 1..5, two of them
    assert got.tolist() == [[[[0, 3, 5, 6, 7]]]]
    fits = select_chunks(None, torch.tensor([[2, -1]]), chunks=4)  # chunk 2 fits; a padding query sees nothing
    assert fits.tolist() == [[[[0, 1, 2, -1], [-1, -1, -1, -1]]]]


@pytest.mark.parametrize("rope", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                  {"rope_type": "linear", "factor": 2.0}], ids=["default", "llama3", "linear"])
def test_rope_frequencies_are_the_models(rope):
    overrides = {}
    if rope is not None:
        overrides["rope_parameters"] = {"rope_theta": 10000.0, **rope}
    model = tiny("llama", **overrides)
    assert torch.equal(rope_frequencies(model.config), model.model.rotary_emb.inv_freq)


def test_partial_rotary_matches_the_reference():
    """Phi-3 style partial RoPE (half the head dim rotated): LongHeads re-rotates only those dims."""
    model = tiny("llama", dtype=torch.float64)
    model.config.rope_parameters["partial_rotary_factor"] = 0.5
    freqs = rope_frequencies(model.config)
    assert freqs.shape[0] == 4  # head dim 16 -> 8 rotated dims
    rotary = longheads._Rotary(freqs, torch.float64, "cpu")
    x = torch.randn(3, 16, dtype=torch.float64)
    pos = torch.tensor([0, 7, 40])
    y = rotary.rotate(x, pos, 1)
    assert torch.equal(y[:, 8:], x[:, 8:])
    torch.testing.assert_close(rotary.rotate(y, pos, -1), x, atol=1e-14, rtol=0)


def test_apply_by_name_and_card(llama):
    from attnkit.hf.cards import CARDS

    assert hf.METHODS["longheads"] is LongHeads
    card = next(c for c in CARDS if c.name == "hf-longheads")
    assert card.arxiv == "2402.10685" and card.layer is LongHeads
    # at most chunks * chunk_size keys per query: 4 chunks of 64 at 1024 tokens is a quarter-ish of causal
    sparse = card.flops(1, 1024, card.config(64, 4, chunk_size=64, chunks=4)).attention_fwd
    dense = hf.CARDS[0].flops(1, 1024, hf.CARDS[0].config(64, 4)).attention_fwd
    assert 0 < sparse < 0.5 * dense
    ids = torch.randint(1, VOCAB, (1, 20))
    with hf.apply(llama, "hf-longheads", chunk_size=4) as handle, torch.no_grad():  # window: max_position_embeddings
        assert handle.policy == LongHeads(chunk_size=4)
        llama(ids, past_key_values=handle.cache())


@pytest.mark.parametrize("options, match", [
    (dict(chunk_size=0), "chunk_size must be a positive integer, got 0"),
    (dict(chunk_size=2.5), "chunk_size must be a positive integer, got 2.5"),
    (dict(chunk_size=True), "chunk_size must be a positive integer, got True"),
    (dict(chunks=2), "chunks must be an integer >= 3 or None, got 2"),
    (dict(chunks="8"), "chunks must be an integer >= 3 or None, got '8'"),
    (dict(window=0), "window must be an integer >= 1 or None, got 0"),
    (dict(chunk_size=256, chunks=16, window=2048), "exceeds window=2048"),
    (dict(chunk_size=256, window=512), "holds 2 chunk"),
])
def test_bad_options_raise_value_error(options, match):
    with pytest.raises(ValueError, match=match):
        LongHeads(**options)
    with pytest.raises(ValueError, match=match):
        LongHeadsRule(**options)


def test_bad_models_and_caches_raise_value_error(llama):
    ids = torch.randint(1, VOCAB, (1, 12))
    with pytest.raises(ValueError, match="does not take option"):
        hf.apply(llama, "longheads", budget=3)
    # the window from the model's config: max_position_embeddings 256 < 100 chunks of 4
    with hf.apply(llama, "longheads", chunk_size=4, chunks=100) as handle, torch.no_grad():
        with pytest.raises(ValueError, match="exceeds window=256"):
            llama(ids, past_key_values=handle.cache())
    dynamic = tiny("llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with hf.apply(dynamic, "longheads", chunk_size=4, window=12) as handle, torch.no_grad():
        with pytest.raises(ValueError, match="rope_type='dynamic' is not supported"):
            dynamic(ids, past_key_values=handle.cache())
    # decoding on the model's own cache: the chunk keys of earlier calls are not there
    with hf.apply(llama, "longheads", chunk_size=4, window=12), torch.no_grad():
        cache = DynamicCache()
        llama(ids, past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="handle.cache()"):
            llama(ids[:, :1], past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3", "phi3"])
def test_rope_frequencies_match_every_architectures_rotary_embedding(arch):
    """Per layer (Gemma 3: local and global layers have their own RoPE)."""
    model = tiny(arch)
    rotary = model.model.rotary_emb
    for layer in range(model.config.num_hidden_layers):
        kind = getattr(model.config, "layer_types", [None] * 2)[layer]
        expected = getattr(rotary, f"{kind}_inv_freq", None) if hasattr(rotary, f"{kind}_inv_freq") else rotary.inv_freq
        assert torch.equal(rope_frequencies(model.config, layer), expected)
