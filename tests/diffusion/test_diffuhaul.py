"""DiffUHaul (object dragging: a recorded source pass, localised attention, dragged source keys and
values, early-step anchoring) against a float64 reference written out by hand: the source pass's
keys and values recorded by a written processor, the object moved cell by cell and rotated at its
new positions with the model's RoPE, explicit masks, a materialised softmax."""

from __future__ import annotations

import math

import pytest
import torch

ad = pytest.importorskip("attnkit.diffusion")
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline  # noqa: E402
from test_sharing import flux, flux_inputs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

H = W = 4
TEXT = 5


def box(y0, x0, y1, x1):
    m = torch.zeros(H, W, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def tok(y, x):
    return TEXT + y * W + x


def _written(model, inputs, core):
    """The model's output with every attention module's core replaced by
    ``core(name, q, k_plain, k, v, rope_at)`` over [B, H, S, D] tensors from the module's own layers."""
    from diffusers.models.embeddings import apply_rotary_emb

    rope = model.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"]]))

    def rope_at(vec, y, x):  # vec [..., H, D] rotated at image position (0, y, x)
        cs = model.pos_embed(torch.tensor([[0.0, float(y), float(x)]], dtype=vec.dtype))
        return apply_rotary_emb(vec.reshape(-1, 1, *vec.shape[-2:]), cs, sequence_dim=1).reshape(vec.shape)

    class Written:
        def __init__(self, name, joint):
            self.name, self.joint = name, joint

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            def heads(t):
                return t.unflatten(-1, (attn.heads, -1))

            q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
            q, k = attn.norm_q(q), attn.norm_k(k)
            if self.joint:
                eq, ek, ev = (heads(f(encoder_hidden_states))
                              for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
                q, k, v = (torch.cat([attn.norm_added_q(eq), q], 1), torch.cat([attn.norm_added_k(ek), k], 1),
                           torch.cat([ev, v], 1))
            kp = k
            q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
            out = core(self.name, *(t.transpose(1, 2) for t in (q, kp, k, v)), rope_at)
            hidden = out.transpose(1, 2).flatten(2, 3)
            if self.joint:
                return attn.to_out[1](attn.to_out[0](hidden[:, TEXT:])), attn.to_add_out(hidden[:, :TEXT])
            return hidden

    originals = []
    for name, module in ad.attention_modules(model):
        originals.append((module, module.processor))
        module.set_processor(Written(name, joint=module.added_kv_proj_dim is not None))
    try:
        return model(**inputs)[0]
    finally:
        for module, proc in originals:
            module.set_processor(proc)


def _softmax_attention(q, keys, values, allowed):
    logits = q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1) @ values


def _plain(name, q, kp, k, v, rope_at):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v


def _record(model, inputs):
    """The source pass written out: every module's image keys (before RoPE) and values."""
    seen = {}

    def core(name, q, kp, k, v, rope_at):
        seen[name] = (kp[:, :, TEXT:], v[:, :, TEXT:])
        return _plain(name, q, kp, k, v, rope_at)

    _written(model, inputs, core)
    return seen


def _drag_core(recorded, source_mask, target_box, localise, weight):
    """The target pass written out: row b reads source row b (or 0), the object's cells of
    ``source_mask`` resampled onto ``target_box``."""
    at = torch.nonzero(source_mask)
    (sy0, sx0), (sy1, sx1) = at.min(0).values.tolist(), (at.max(0).values + 1).tolist()
    ty0, tx0, ty1, tx1 = target_box
    pairs = []  # (source cell, target cell) of the dragged object
    for y in range(ty0, ty1):
        for x in range(tx0, tx1):
            sy, sx = sy0 + (y - ty0) * (sy1 - sy0) // (ty1 - ty0), sx0 + (x - tx0) * (sx1 - sx0) // (tx1 - tx0)
            if source_mask[sy, sx]:
                pairs.append(((sy, sx), (y, x)))
    moved = {t for _, t in pairs}
    background = [(y, x) for y in range(H) for x in range(W) if not source_mask[y, x]]

    def core(name, q, kp, k, v, rope_at):
        ks_all, vs_all = recorded[name]
        out = torch.empty_like(q)
        S = q.shape[2]
        for b in range(q.shape[0]):
            ks, vs = ks_all[min(b, ks_all.shape[0] - 1)], vs_all[min(b, vs_all.shape[0] - 1)]
            k_obj = [rope_at(ks[:, s[0] * W + s[1]], *t) for s, t in pairs]
            v_obj = [vs[:, s[0] * W + s[1]] for s, _ in pairs]
            k_bg = [rope_at(ks[:, c[0] * W + c[1]], *c) for c in background]
            v_bg = [vs[:, c[0] * W + c[1]] for c in background]
            kb, vb = k[b].clone(), v[b].clone()
            if weight > 0:
                for (s, t), ko, vo in zip(pairs, k_obj, v_obj):
                    kb[:, tok(*t)] = (1 - weight) * k[b][:, tok(*t)] + weight * ko
                    vb[:, tok(*t)] = (1 - weight) * v[b][:, tok(*t)] + weight * vo
            keys = torch.cat([kb, torch.stack(k_obj, 1), torch.stack(k_bg, 1)], 1)
            values = torch.cat([vb, torch.stack(v_obj, 1), torch.stack(v_bg, 1)], 1)
            allowed = torch.ones(S, keys.shape[1], dtype=torch.bool)
            if localise:
                for y in range(H):
                    for x in range(W):
                        in_obj = (y, x) in moved
                        for yy in range(H):
                            for xx in range(W):
                                allowed[tok(y, x), tok(yy, xx)] = ((yy, xx) in moved) == in_obj
                        allowed[tok(y, x), S:S + len(pairs)] = in_obj
                        allowed[tok(y, x), S + len(pairs):] = not in_obj
            out[b] = _softmax_attention(q[b], keys, values, allowed)
        return out

    return core


def _step_inputs(seed, t, batch=2):
    return {**flux_inputs(batch=batch, seed=seed), "timestep": torch.full((batch,), t, dtype=torch.float64)}


L_SHAPE = box(0, 0, 3, 2) & ~box(0, 1, 1, 2)

CASES = {
    "translation, localised, anchored": dict(
        options=dict(source_mask=L_SHAPE, translation=(1, 2), anchor_steps=2, anchor=0.8),
        target_box=(1, 2, 4, 4), localise=True, weights=(0.8, 0.4), source_batch=2),
    "target box resampled, shared only, one source row": dict(
        options=dict(source_mask=(0, 0, 2, 2), target_box=(1, 0, 4, 3), localise=False),
        target_box=(1, 0, 4, 3), localise=False, weights=(0.0, 0.0), source_batch=1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_diffuhaul_equals_the_written_out_reference(case):
    spec = CASES[case]
    model = flux()
    sources = [_step_inputs(1, 0.9, spec["source_batch"]), _step_inputs(2, 0.6, spec["source_batch"])]
    targets = [_step_inputs(3, 0.9), _step_inputs(4, 0.6)]
    mask = spec["options"]["source_mask"]
    mask = mask if isinstance(mask, torch.Tensor) else box(*mask)
    with torch.no_grad():
        expected = [_written(model, tgt, _drag_core(_record(model, src), mask, spec["target_box"], spec["localise"], a))
                    for src, tgt, a in zip(sources, targets, spec["weights"])]
        method = ad.DiffUHaul(**spec["options"])
        with ad.apply(model, method) as handle:
            handle.phase = "source"
            for src in sources:
                model(**src)
            assert len(method.bank) == 2 * 2  # two modules, two steps
            handle.reset()
            handle.phase = "target"
            got = [model(**tgt)[0] for tgt in targets]
        plain = [model(**tgt)[0] for tgt in targets]
    assert [method.weight(s) for s in (0, 1, 2)] == [*spec["weights"], 0.0]
    for g, e, p in zip(got, expected, plain):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
        assert (g - p).abs().max() > 1e-3


def test_masks_cover_what_they_claim():
    method = ad.DiffUHaul(L_SHAPE, translation=(1, 2))
    drag = method.drag((H, W), TEXT)
    S, N = TEXT + H * W, H * W
    moved = torch.zeros(H, W, dtype=torch.bool)
    moved[1:4, 2:4] = L_SHAPE[0:3, 0:2]  # the L shape moved by (1, 2)
    assert torch.equal(drag.target, moved) and torch.equal(drag.source, L_SHAPE)
    n_obj, n_bg = int(moved.sum()), N - int(L_SHAPE.sum())
    assert drag.src.numel() == n_obj == 5 and drag.background.numel() == n_bg == 11
    assert drag.mask.shape == (S, S + n_obj + n_bg)
    tok_of = torch.arange(N).view(H, W) + TEXT
    obj, bg = drag.mask[tok_of[moved]], drag.mask[tok_of[~moved]]
    assert int(obj[:, :S].sum()) == n_obj * (TEXT + n_obj) and bool(obj[:, S:S + n_obj].all())
    assert not obj[:, S + n_obj:].any()
    assert int(bg[:, :S].sum()) == (N - n_obj) * (TEXT + N - n_obj) and bool(bg[:, S + n_obj:].all())
    assert not bg[:, S:S + n_obj].any()
    assert bool(drag.mask[:TEXT].all())  # text queries see every key
    assert bool(ad.DiffUHaul(L_SHAPE, translation=(1, 2), localise=False).drag((H, W), TEXT).mask.all())
    # the dragged cells: target (1, 2) takes source (0, 0); (1, 3) would take (0, 1), outside the L
    assert drag.dst.tolist() == [1 * W + 2, 2 * W + 2, 2 * W + 3, 3 * W + 2, 3 * W + 3]
    assert drag.src.tolist() == [0, 1 * W + 0, 1 * W + 1, 2 * W + 0, 2 * W + 1]


def test_switched_off_is_bit_exact():
    model, inputs = flux(torch.float32), flux_inputs(dtype=torch.float32)
    with torch.no_grad():
        plain = model(**inputs)[0]
        for schedule in (dict(steps=[5]), dict(blocks=[0], steps=(3, 4))):
            with ad.apply(model, "diffuhaul", source_mask=(0, 0, 2, 2), translation=(1, 1), **schedule) as handle:
                handle.phase = "target"  # never read: the method acts nowhere
                assert torch.equal(model(**inputs)[0], plain)
            assert handle.calls == 0
        with ad.apply(model, "diffuhaul", source_mask=(0, 0, 2, 2), translation=(1, 1)) as handle:
            handle.phase = "source"  # recording leaves the source pass as it is
            assert torch.equal(model(**inputs)[0], plain)


def test_no_drag_of_an_image_onto_itself_is_shared_attention_with_itself():
    # zero translation, the target pass on the source image, no masking: the target attends to its own keys
    # and every source image key (object and background, the object at its own place), shared-kv with a
    # copy of itself. Anchoring mixes the target's keys with the source's: equal in the first block (the
    # identity there), no longer after it, where the target's own keys have moved
    model = flux()
    one, two = flux_inputs(batch=1, same=True), flux_inputs(batch=2, same=True)
    for options in (dict(), dict(anchor_steps=3, anchor=0.7, blocks=[0])):
        with torch.no_grad():
            with ad.apply(model, "diffuhaul", source_mask=L_SHAPE, translation=(0, 0), localise=False,
                          **options) as handle:
                handle.phase = "source"
                model(**one)
                handle.reset()
                handle.phase = "target"
                got = model(**one)[0]
            with ad.apply(model, "shared-kv", reference=0, blocks=options.get("blocks")):
                shared = model(**two)[0]
        torch.testing.assert_close(got[0], shared[1], rtol=1e-10, atol=1e-10)
        assert (shared[1] - shared[0]).abs().max() > 1e-4  # sharing did act


def test_two_passes_through_a_pipeline():
    # the workflow on a FLUX pipeline: the source run fills the bank step by step, the target run after
    # reset() reads the same steps; the drag changes the target, a source rerun is unchanged
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=flux(torch.float32))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    kw = dict(prompt_embeds=torch.randn(1, 8, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 32, generator=g),
              num_inference_steps=3, height=32, width=32, output_type="latent")  # a 4 x 4 grid of image tokens

    def run(seed):
        return pipe(**kw, generator=torch.Generator().manual_seed(seed)).images

    stock_target = run(2)
    method = ad.DiffUHaul(source_mask=(0, 0, 2, 2), translation=(2, 1), anchor_steps=2)
    with ad.apply(pipe, method) as handle:
        handle.phase = "source"
        source = run(1)
        names = [n for n, _ in ad.attention_modules(pipe.transformer)]
        assert len(method.bank) == 2 * 3 and all((n, s, "diffuhaul") in method.bank for n in names for s in range(3))
        handle.reset()
        handle.phase = "target"
        dragged = run(2)
        assert handle.step == 2 and handle.calls == 2 * 3
    assert torch.equal(source, run(1))  # recording did not touch the source run
    assert (dragged - stock_target).abs().max() > 1e-4


def test_bad_input_is_refused_clearly():
    model, inputs = flux(), flux_inputs(batch=2)

    def run(match, options, phase="target", record=True, source_inputs=inputs):
        with torch.no_grad(), ad.apply(model, "diffuhaul", **options) as handle:
            if record:
                handle.phase = "source"
                model(**source_inputs)
                handle.reset()
            handle.phase = phase
            with pytest.raises(ValueError, match=match):
                model(**inputs)

    good = dict(source_mask=(0, 0, 2, 2), translation=(1, 1))
    run(r"translation=\(3, 0\) moves the object's box \(0, 0, 2, 2\) to \(3, 0, 5, 2\), outside the image grid",
        dict(good, translation=(3, 0)), record=False)
    run(r"target_box box .* = \(2, 2, 4, 5\) lies outside the image grid", dict(good, translation=None,
                                                                           target_box=(2, 2, 4, 5)), record=False)
    run(r"source_mask is a mask of the wrong size \(8, 8\)", dict(good, source_mask=torch.ones(8, 8, dtype=torch.bool)),
        record=False)
    run(r"needs handle.phase = 'source' .* or 'target' \(drag\), got None", good, phase=None, record=False)
    run(r"KVBank holds nothing for module 'transformer_blocks.0.attn' at step 0", good, record=False)
    run(r"the source pass recorded \[B, H, N\] = \[3, 2, 16\].*this target call has batch 2", good,
        source_inputs=flux_inputs(batch=3))
    for options, match in (
            (dict(source_mask=(0, 0, 2, 2)), "give exactly one of translation"),
            (dict(good, target_box=(0, 0, 1, 1)), "give exactly one of translation"),
            (dict(good, translation=(1.5, 0)), r"translation must be \(dy, dx\), two ints"),
            (dict(good, anchor=1.5), r"anchor must be a number in \[0, 1\]"),
            (dict(good, anchor_steps=-1), "anchor_steps must be an integer >= 0"),
            (dict(good, bank={}), "bank must be an attnkit.diffusion.KVBank"),
            (dict(good, source_mask=torch.zeros(4, 4, dtype=torch.bool)), "source_mask is an empty mask"),
            (dict(good, source_mask=(2, 2, 1, 3)), r"needs 0 <= y0 < y1"),
            (dict(source_mask=(0, 0, 2, 2), target_box=torch.ones(4, 4, dtype=torch.bool)),
             "target_box must be a box")):
        with pytest.raises(ValueError, match=match):
            ad.DiffUHaul(**options)
