"""VAR (attnkit.hf.var) on a span: sinks by massive dimensions against the model's own hidden states,
the redistribution against a float64 eager attention that applies it to the materialised matrix, the
invariants (no sink: bit-identical) on Llama / Qwen2 / Mistral and the subject, the mechanics on tiny
random LLaVA and Qwen2-VL, decode, bad input. Also the span helpers (attnkit.hf.span) and the spine's
batch-without-mask fix."""

import pytest
import torch

pytest.importorskip("transformers")

import attnkit.hf as hf  # noqa: E402
from attnkit.hf.span import Probe, check_span, span_from_ids, span_from_range  # noqa: E402
from attnkit.hf.steer import Steer  # noqa: E402
from attnkit.hf.var import VAR, VARModifier, find_sinks  # noqa: E402
from hf_models import greedy_decode, padded_inputs, tiny  # noqa: E402
from test_steer import _reference_forward  # noqa: E402

IMAGE = 120  # the tiny multimodal models' image token id


def tiny_llava(seed=0):
    """A tiny random LLaVA (CLIP tower 16x16 image, 4x4 patches: 16 image tokens; Llama text decoder)
    and its inputs: ids [1, 24] with the 16 image tokens at positions 3 .. 18, pixel_values."""
    import transformers as tf

    torch.manual_seed(seed)
    text = tf.LlamaConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=128, vocab_size=128, max_position_embeddings=256)
    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=16, patch_size=4, projection_dim=32)
    config = tf.LlavaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE, image_seq_length=16,
                            vision_feature_layer=-1)
    model = tf.LlavaForConditionalGeneration(config).eval()
    ids = torch.randint(1, 100, (1, 24))
    ids[0, 3:19] = IMAGE
    return model, ids, {"pixel_values": torch.randn(1, 3, 16, 16)}


def tiny_qwen2vl(seed=0):
    """A tiny random Qwen2-VL (vision patches 2x2, a 4x4 grid merged 2x2: 4 image tokens) and its
    processor-free inputs: ids [1, 12] (vision start, 4 image tokens, vision end), pixel_values
    [16, 3*2*2*2], image_grid_thw, mm_token_type_ids."""
    import transformers as tf

    torch.manual_seed(seed)
    text = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=128, max_position_embeddings=256,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=2, spatial_merge_size=2,
                  temporal_patch_size=2, in_chans=3, mlp_ratio=2)
    config = tf.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=121,
                              vision_start_token_id=122, vision_end_token_id=123, bos_token_id=None, eos_token_id=None)
    model = tf.Qwen2VLForConditionalGeneration(config).eval()
    ids = torch.randint(1, 100, (1, 12))
    ids[0, 2], ids[0, 3:7], ids[0, 7] = 122, IMAGE, 123
    extra = {"pixel_values": torch.randn(16, 24), "image_grid_thw": torch.tensor([[1, 4, 4]]),
             "mm_token_type_ids": (ids == IMAGE).int()}
    return model, ids, extra


def _span(B=2, T=14):
    return span_from_range(B, T, 6, 11)  # real tokens in both rows of padded_inputs (row 1 pads 0 .. 4)


def _ref_var(sinks, p, rho, summ, layers, outside=True):
    """The redistribution written plainly on one head's probabilities t [B, T, S] (float64)."""
    span = sinks.span

    def change(layer, head, stage, t, q_pos, k_pos, start):
        if stage != "weights" or layer not in layers:
            return t
        out = t.clone()
        end = [int(span[b].nonzero().max()) for b in range(t.shape[0])]
        for b in range(t.shape[0]):
            in_span = span[b].nonzero().flatten().tolist()
            s_sinks = [j for j in in_span if bool(sinks.sinks[layer][b, j])]
            moved = [j for j in range(span.shape[1]) if bool(sinks.sinks[layer][b, j])] if outside else s_sinks
            rest = [j for j in in_span if j not in s_sinks]
            if not s_sinks:
                continue
            for i, qp in enumerate(q_pos.tolist()):
                if qp <= end[b]:
                    continue
                row = t[b, i]
                on_span = float(row[in_span].sum())
                share = float(row[s_sinks].sum()) / (on_span + 1e-6 * len(in_span))
                on_rest = float(row[rest].sum())
                if share > rho or on_span < summ or on_rest <= 0:
                    continue
                budget = (1 - p) * float(row[moved].sum())
                new = row.clone()
                new[moved] = row[moved] * p
                new[rest] = row[rest] + budget * row[rest] / on_rest
                out[b, i] = new
        return out
    return change


def test_find_sinks_matches_hidden_states():
    model = tiny("llama", dtype=torch.float64, num_hidden_layers=4)
    ids, mask = padded_inputs()
    span = _span()
    sinks = find_sinks(model, span, ids, dims=(3, 17), tau=1.5, attention_mask=mask)
    with torch.no_grad():
        hidden = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states  # [i]: input of layer i
    for layer in range(4):
        if layer < 2:
            assert layer not in sinks.sinks and bool((sinks.phi[layer] == 0).all())
            continue
        h = hidden[layer]
        phi = (h / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()).abs()[..., [3, 17]].amax(-1)
        torch.testing.assert_close(sinks.phi[layer], phi, atol=1e-12, rtol=0)
        assert torch.equal(sinks.sinks[layer], phi > 1.5)
    # found dims: where the first real token stands out of its row's median token
    auto = find_sinks(model, span, ids, tau=1.5, attention_mask=mask)
    assert len(auto.dims) == 2 and all(0 <= d < 64 for d in auto.dims)


@pytest.mark.parametrize("opts", [dict(p=0.6, rho=1.0, summ=0.0), dict(p=0.3, rho=0.5, summ=0.1),
                                  dict(p=0.5, rho=1.0, summ=0.0, outside_sinks=False)])
def test_var_equals_float64_reference(opts):
    model = tiny("llama", dtype=torch.float64, num_hidden_layers=4)
    ids, mask = padded_inputs()
    sinks = find_sinks(model, _span(), ids, dims=(3, 17), tau=1.2, attention_mask=mask)
    assert all(bool(sinks.in_span(layer).any()) for layer in (2, 3))
    policy = VAR(sinks=sinks, **opts)
    layers = {2}  # the last layer (3) is skipped, as the official code does
    want = _reference_forward(model, ids, mask, _ref_var(sinks, opts["p"], opts["rho"], opts["summ"], layers,
                                                         opts.get("outside_sinks", True)))
    plain = _reference_forward(model, ids, mask, lambda *a: a[3])
    with torch.no_grad(), hf.apply(model, policy):
        got = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-10, rtol=0)
    assert (got[valid] - plain[valid]).abs().max() > 1e-4  # the change is real
    assert sum(policy.modifier.rows.values()) > 0 and set(policy.modifier.moved) == layers


def test_var_batch_without_padding_mask():
    """Two rows and no attention_mask: the spine's causal mask (batch 1) is expanded to the batch
    (before the fix SteerRule.attend raised "mask (1, 1, T, S) does not fit B=2")."""
    model = tiny("llama", dtype=torch.float64, num_hidden_layers=4)
    ids, _ = padded_inputs(pads=(0, 0))
    ones = torch.ones_like(ids)
    sinks = find_sinks(model, _span(), ids, dims=(3, 17), tau=1.2)
    want = _reference_forward(model, ids, ones, _ref_var(sinks, 0.6, 1.0, 0.0, {2}))
    with torch.no_grad(), hf.apply(model, VAR(sinks=sinks, rho=1.0, summ=0.0)):
        got = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_var_decode_equals_full_forward():
    model = tiny("llama", dtype=torch.float64, num_hidden_layers=4)
    ids, mask = padded_inputs()
    sinks = find_sinks(model, _span(), ids, dims=(3, 17), tau=1.2, attention_mask=mask)
    with hf.apply(model, VAR(sinks=sinks, rho=1.0, summ=0.0)) as handle:
        steps = greedy_decode(model, ids, mask, handle.cache(), steps=3)
        seq = torch.cat([ids] + [s[:, -1:].argmax(-1) for s in steps[:-1]], dim=1)
        full_mask = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], dim=1)
        with torch.no_grad():
            full = model(seq, attention_mask=full_mask, position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits
    for i, s in enumerate(steps[1:]):
        torch.testing.assert_close(s[:, -1], full[:, ids.shape[1] + i], atol=1e-10, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_no_sinks_or_p_one_is_bit_identical(arch):
    model = tiny(arch)
    ids, mask = padded_inputs()
    none = find_sinks(model, _span(), ids, tau=1e6, from_layer=0, attention_mask=mask)
    assert none.counts() == {0: 0, 1: 0}
    some = find_sinks(model, _span(), ids, tau=1e-3, from_layer=0, attention_mask=mask)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        for policy in (VAR(sinks=none), VAR(sinks=some, p=1.0), VAR()):
            with hf.apply(model, policy):
                assert torch.equal(model(ids, attention_mask=mask).logits, ref)


def test_subject_no_sinks_is_bit_identical_and_var_moves_mass_into_the_span():
    from transformers import AutoModelForCausalLM

    from attnkit.hf.subject import default_subject

    model = AutoModelForCausalLM.from_pretrained(default_subject(), dtype=torch.float32).eval()
    ids = torch.tensor([list(b"The quick brown fox jumps over the lazy dog. " * 4 + b"What did the fox do? It")])
    span = span_from_range(1, ids.shape[1], 0, 180)
    with torch.no_grad():
        ref = model(ids).logits
        with hf.apply(model, VAR.identify(model, span, ids, tau=1e6)):
            assert torch.equal(model(ids).logits, ref)
    sinks = find_sinks(model, span, ids, tau=9.0)
    assert sum(sinks.counts().values()) > 0
    probe = Probe({"span": span, "sinks": {layer: m & span for layer, m in sinks.sinks.items()}},
                  inner=VARModifier(sinks, rho=1.0, summ=0.0))
    with torch.no_grad(), hf.apply(model, Steer(probe)):
        model(ids)
    layers = [layer for layer, n in sinks.counts().items() if n and layer < 11]
    before, after = probe.before["sinks"][layers], probe.after["sinks"][layers]
    # the sinks keep p = 0.6 of their weight; the span's total only grows (outside sinks give to it)
    torch.testing.assert_close(after, 0.6 * before, rtol=1e-4, atol=1e-6)
    assert bool((probe.after["span"][layers] >= probe.before["span"][layers] - 1e-6).all())


@pytest.mark.parametrize("build", [tiny_llava, tiny_qwen2vl])
def test_multimodal_image_span_mechanics(build):
    model, ids, extra = build()
    span = span_from_ids(ids, IMAGE)
    sinks = find_sinks(model, span, ids, tau=1e-3, **extra)  # every image token a sink: nothing to give to
    assert all(bool(m[span].all()) for m in sinks.sinks.values())
    sinks = find_sinks(model, span, ids, tau=float(torch.quantile(find_sinks(model, span, ids, tau=1.0, **extra)
                                                                   .phi[2:, 0][:, span[0]].flatten(), 0.6)), **extra)
    assert 0 < sum(sinks.counts().values()) < 2 * int(span.sum())
    with torch.no_grad():
        ref = model(input_ids=ids, **extra).logits
        with hf.apply(model, VAR(sinks=find_sinks(model, span, ids, tau=1e6, **extra))):
            assert torch.equal(model(input_ids=ids, **extra).logits, ref)
        policy = VAR(sinks=sinks, rho=1.0, summ=0.0)
        with hf.apply(model, policy):
            got = model(input_ids=ids, **extra).logits
    end = int(span[0].nonzero().max())
    # queries up to the image's end are unchanged (routed heads: the same maths, materialised in float32)
    torch.testing.assert_close(got[:, : end + 1], ref[:, : end + 1], atol=1e-5, rtol=0)
    assert (got[:, end + 1 :] - ref[:, end + 1 :]).abs().max() > 1e-6
    assert sum(policy.modifier.rows.values()) > 0


def test_bad_input_raises_clear_errors():
    model = tiny("llama", num_hidden_layers=4)
    ids, mask = padded_inputs()
    with pytest.raises(ValueError, match=r"span must be a boolean tensor \[B, L\].*shape \(14,\)"):
        find_sinks(model, torch.ones(14, dtype=torch.bool), ids)
    with pytest.raises(ValueError, match="outside the sequence of 14 tokens"):
        find_sinks(model, torch.ones(2, 20, dtype=torch.bool), ids)
    with pytest.raises(ValueError, match=r"marks no position in row\(s\) \[1\]"):
        find_sinks(model, torch.tensor([[True] + [False] * 13, [False] * 14]), ids)
    with pytest.raises(ValueError, match="batch 1, the inputs have 2"):
        find_sinks(model, torch.ones(1, 14, dtype=torch.bool), ids)
    with pytest.raises(ValueError, match="must be boolean"):
        check_span(torch.full((2, 14), 0.5))
    with pytest.raises(ValueError, match="tau must be a positive number"):
        find_sinks(model, _span(), ids, tau=0)
    with pytest.raises(ValueError, match=r"dims must be hidden dimensions in 0 .. 63"):
        find_sinks(model, _span(), ids, dims=(64,))
    with pytest.raises(ValueError, match="from_layer must be an int in 0 .. 3"):
        find_sinks(model, _span(), ids, from_layer=4)
    sinks = find_sinks(model, _span(), ids, tau=1e-3)
    for bad, match in ((dict(p=1.5), "p must be a number in"), (dict(rho=-0.1), "rho must be"),
                       (dict(summ="x"), "summ must be"), (dict(queries="all"), "queries must be one of")):
        with pytest.raises(ValueError, match=match):
            VAR(sinks=sinks, **bad)
    with pytest.raises(ValueError, match="sinks must be the SpanSinks"):
        VAR(sinks={2: torch.ones(2, 14, dtype=torch.bool)})
    with pytest.raises(ValueError, match="more than 2 layers"):
        hf.apply(tiny("llama"), VAR(sinks=sinks, skip_last_layer=False))
    # a span shorter than the inputs' batch at forward time
    one_row = find_sinks(model, torch.ones(1, 14, dtype=torch.bool), ids[:1], tau=1e-3)
    with hf.apply(model, VAR(sinks=one_row, rho=1.0, summ=0.0)), pytest.raises(ValueError, match="batch 1"):
        model(ids)
    hf.apply(model, VAR()).remove()  # nothing was left applied
