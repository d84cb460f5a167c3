"""IR-Diffusion (isolation and reposition attention) against a float64 reference written out by
hand: explicit isolation masks, the reference subject resampled cell by cell onto the target's
subject and rotated there with the model's RoPE, a materialised softmax."""

from __future__ import annotations

import math

import pytest
import torch

ad = pytest.importorskip("attnkit.diffusion")
from test_sharing import flux, flux_inputs, unet, unet_inputs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

H = W = 4  # the tiny FLUX inputs' grid of image tokens
TEXT = 5


def box(y0, x0, y1, x1):
    m = torch.zeros(H, W, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


L_SHAPE = box(1, 1, 4, 3) & ~box(1, 2, 2, 3)  # a 3 x 2 box missing its top-right cell


def _written(model, inputs, core):
    """The model's output with every attention module's core replaced by ``core(q, k_plain, k, v, rope_at)``
    over [B, H, S, D] tensors computed here from the module's own layers (float64)."""
    from diffusers.models.embeddings import apply_rotary_emb

    rope = model.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"]]))

    def rope_at(vec, y, x):  # vec [H, D] rotated at image position (0, y, x)
        cs = model.pos_embed(torch.tensor([[0.0, float(y), float(x)]], dtype=vec.dtype))
        return apply_rotary_emb(vec[None, None], cs, sequence_dim=1)[0, 0]

    class Written:
        def __init__(self, joint):
            self.joint = joint

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
            out = core(*(t.transpose(1, 2) for t in (q, kp, k, v)), rope_at)
            hidden = out.transpose(1, 2).flatten(2, 3)
            if self.joint:
                return attn.to_out[1](attn.to_out[0](hidden[:, TEXT:])), attn.to_add_out(hidden[:, :TEXT])
            return hidden

    originals = []
    for _, module in ad.attention_modules(model):
        originals.append((module, module.processor))
        module.set_processor(Written(joint=module.added_kv_proj_dim is not None))
    try:
        return model(**inputs)[0]
    finally:
        for module, proc in originals:
            module.set_processor(proc)


def _softmax_attention(q, keys, values, allowed):
    """q [H, T, D], keys / values [H, S', D], allowed [T, S'] bool: a materialised masked softmax."""
    logits = q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, -1) @ values


def _corners(m):
    """The bounding box of a mask: (top, left), (bottom + 1, right + 1)."""
    at = torch.nonzero(m)
    return at.min(0).values.tolist(), (at.max(0).values + 1).tolist()


def _ir_core(refs, target, ref_masks, tgt_masks, isolate=True, reposition=True):
    def tok(y, x):
        return TEXT + y * W + x

    def cells(m):
        return [(int(y), int(x)) for y, x in torch.nonzero(m)]

    def core(q, kp, k, v, rope_at):
        out = torch.empty_like(q)
        for b in range(q.shape[0]):
            if b != target:
                out[b] = _softmax_attention(q[b], k[b], v[b], torch.ones(q.shape[2], k.shape[2], dtype=torch.bool))
        S = q.shape[2]
        own = torch.ones(S, S, dtype=torch.bool)
        if isolate:
            for i, ti in enumerate(tgt_masks):
                for j, tj in enumerate(tgt_masks):
                    if i != j:
                        for a in cells(ti):
                            for c in cells(tj):
                                own[tok(*a), tok(*c)] = False
        keys, values, cols = [k[target]], [v[target]], [own]
        for r, rm, tm in zip(refs, ref_masks, tgt_masks):
            ks, vs = [], []
            if reposition:
                (ty0, tx0), (ty1, tx1) = _corners(tm)
                (ry0, rx0), (ry1, rx1) = _corners(rm)
                for y in range(ty0, ty1):
                    for x in range(tx0, tx1):
                        sy = ry0 + (y - ty0) * (ry1 - ry0) // (ty1 - ty0)
                        sx = rx0 + (x - tx0) * (rx1 - rx0) // (tx1 - tx0)
                        if rm[sy, sx]:
                            ks.append(rope_at(kp[r][:, tok(sy, sx)], y, x))
                            vs.append(v[r][:, tok(sy, sx)])
            else:
                for y, x in cells(rm):
                    ks.append(k[r][:, tok(y, x)])
                    vs.append(v[r][:, tok(y, x)])
            col = torch.zeros(S, len(ks), dtype=torch.bool)
            for a in cells(tm):
                col[tok(*a)] = True
            keys.append(torch.stack(ks, 1)), values.append(torch.stack(vs, 1)), cols.append(col)
        out[target] = _softmax_attention(q[target], torch.cat(keys, 1), torch.cat(values, 1), torch.cat(cols, 1))
        return out

    return core


CASES = {
    "two subjects, resampled": dict(references=(0, 1), target_row=2, reference_masks=(box(0, 0, 2, 2), L_SHAPE),
                                    target_masks=(box(0, 0, 2, 4), box(2, 1, 4, 3))),
    "boxes, reference rows swapped": dict(references=(2, 0), target_row=1, reference_masks=((2, 2, 4, 4), (0, 0, 3, 1)),
                                          target_masks=((0, 0, 1, 1), (1, 1, 4, 4))),
    "no reposition": dict(references=(0, 1), target_row=2, reference_masks=(box(0, 0, 2, 2), L_SHAPE),
                          target_masks=(box(0, 0, 2, 4), box(2, 1, 4, 3)), reposition=False),
    "no isolation": dict(references=(0, 1), target_row=2, reference_masks=(box(0, 0, 2, 2), L_SHAPE),
                         target_masks=(box(0, 0, 2, 4), box(2, 1, 4, 3)), isolate=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ir_diffusion_equals_the_written_out_reference(case):
    options = CASES[case]
    model, inputs = flux(), flux_inputs()
    as_masks = [m if isinstance(m, torch.Tensor) else box(*m) for m in options["reference_masks"]]
    as_targets = [m if isinstance(m, torch.Tensor) else box(*m) for m in options["target_masks"]]
    with torch.no_grad():
        expected = _written(model, inputs, _ir_core(options["references"], options["target_row"], as_masks, as_targets,
                                                    options.get("isolate", True), options.get("reposition", True)))
        with ad.apply(model, "ir-diffusion", **options) as handle:
            got = model(**inputs)[0]
        plain = model(**inputs)[0]
    assert handle.calls == 2
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    t = options["target_row"]
    assert (got[t] - plain[t]).abs().max() > 1e-3  # the target did change
    for r in range(3):
        if r != t:
            torch.testing.assert_close(got[r], plain[r], rtol=1e-10, atol=1e-10)  # the references attend as usual


def test_masks_cover_what_they_claim():
    T0, T1 = box(0, 0, 2, 4), box(2, 1, 4, 3)
    method = ad.IRDiffusion((0, 1), 2, reference_masks=(box(0, 0, 2, 2), L_SHAPE), target_masks=(T0, T1))
    plan = method.plan((H, W), TEXT)
    S = TEXT + H * W
    # subject 0: a full 2 x 2 box resampled onto 2 x 4 cells: 8 keys; subject 1: the L shape (5 of 6 cells)
    # resampled onto a 2 x 2 box: the top-right target cell falls on the missing cell, so 3 keys
    assert [s.numel() for s in plan.src] == [8, 3] and plan.mask.shape == (S, S + 11)
    tok = torch.arange(H * W).view(H, W) + TEXT
    for m, other, extra in ((T0, T1, slice(S, S + 8)), (T1, T0, slice(S + 8, S + 11))):
        rows = plan.mask[tok[m]]
        assert int(rows[:, :S].sum()) == int(m.sum()) * (S - int(other.sum()))  # every own key but the other subject
        assert not rows[:, tok[other]].any()
        assert int(rows[:, extra].sum()) == int(m.sum()) * (extra.stop - extra.start)  # its own reference only
        assert int(rows[:, S:].sum()) == int(rows[:, extra].sum())
    background = torch.cat([torch.arange(TEXT), tok[~(T0 | T1)]])
    assert int(plan.mask[background, :S].sum()) == background.numel() * S and not plan.mask[background, S:].any()
    assert int(plan.mask.sum()) == S * S - 2 * int(T0.sum()) * int(T1.sum()) + 8 * 8 + 4 * 3
    # the moved cells: target cell (2, 1) takes reference cell (1, 1); (2, 2) would take (1, 2), which is missing
    assert plan.dst[1].tolist() == [2 * W + 1, 3 * W + 1, 3 * W + 2]
    assert plan.src[1].tolist() == [1 * W + 1, 2 * W + 1, 2 * W + 2]


def test_switched_off_is_bit_exact():
    model, inputs = flux(torch.float32), flux_inputs(dtype=torch.float32)
    options = CASES["two subjects, resampled"]
    with torch.no_grad():
        plain = model(**inputs)[0]
        for schedule in (dict(steps=[3]), dict(steps=(4, 9))):
            with ad.apply(model, "ir-diffusion", **options, **schedule) as handle:
                assert torch.equal(model(**inputs)[0], plain)
            assert handle.calls == 0
        with ad.apply(model, "ir-diffusion", **options, blocks="single_transformer_blocks") as handle:
            assert not torch.equal(model(**inputs)[0], plain)
        assert handle.calls == 1


def test_one_subject_over_the_whole_image_is_shared_attention():
    # the target's image queries then see its own keys and every reference image key, as in shared-kv;
    # only its text queries differ (they see no reference), and the last single block's text is dropped
    whole = dict(references=(1,), target_row=2, reference_masks=((0, 0, H, W),), target_masks=((0, 0, H, W),))
    model, inputs = flux(), flux_inputs()
    with torch.no_grad():
        with ad.apply(model, "ir-diffusion", **whole, blocks="single_transformer_blocks"):
            got = model(**inputs)[0]
        with ad.apply(model, "shared-kv", reference=1, blocks="single_transformer_blocks"):
            shared = model(**inputs)[0]
    torch.testing.assert_close(got[1:], shared[1:], rtol=1e-10, atol=1e-10)  # row 0 is shared-kv's target only
    # a UNet's self-attention has no text: there it is shared attention everywhere; its grids differ by
    # block (8 x 8 in the down and up blocks, 4 x 4 in the mid block), and regions hold for one grid
    model, inputs = unet(), unet_inputs()
    outer = ["down_blocks", "up_blocks"]
    with torch.no_grad():
        with ad.apply(model, "ir-diffusion", references=(0,), target_row=1, reference_masks=((0, 0, 8, 8),),
                      target_masks=((0, 0, 8, 8),), blocks=outer) as handle:
            got = model(**inputs)[0]
        with ad.apply(model, "shared-kv", reference=0, blocks=outer):
            shared = model(**inputs)[0]
        with ad.apply(model, "ir-diffusion", references=(0,), target_row=1, reference_masks=((0, 0, 8, 8),),
                      target_masks=((0, 0, 8, 8),)):
            with pytest.raises(ValueError, match=r"box .* lies outside the image grid \(h, w\) = \(4, 4\)"):
                model(**inputs)
    assert handle.calls == 3
    torch.testing.assert_close(got[:2], shared[:2], rtol=1e-10, atol=1e-10)  # row 2 is shared-kv's target only


def test_classifier_free_guidance_halves_each_have_their_references_and_target():
    options = CASES["two subjects, resampled"]
    model, inputs = flux(), flux_inputs(batch=6)
    halves = [{**inputs, **{k: inputs[k][i:i + 3] for k in ("hidden_states", "encoder_hidden_states",
                                                             "pooled_projections", "timestep")}} for i in (0, 3)]
    with torch.no_grad():
        with ad.apply(model, "ir-diffusion", **options, chunks=2):
            both = model(**inputs)[0]
        with ad.apply(model, "ir-diffusion", **options):
            each = torch.cat([model(**half)[0] for half in halves])
    torch.testing.assert_close(both, each, rtol=1e-10, atol=1e-10)


def test_bad_input_is_refused_clearly():
    model, inputs = flux(), flux_inputs()
    good = dict(references=(0, 1), target_row=2, reference_masks=((0, 0, 2, 2), (2, 2, 4, 4)),
                target_masks=((0, 0, 2, 2), (2, 2, 4, 4)))
    at_call = (
        (dict(good, reference_masks=(torch.ones(3, 3, dtype=torch.bool), (2, 2, 4, 4))),
         r"reference_masks\[0\] is a mask of the wrong size \(3, 3\).*\(h, w\) = \(4, 4\)"),
        (dict(good, references=(0, 5)), r"references index 5 is outside the batch's groups of 3 rows"),
        (dict(good, target_row=7), r"target_row index 7 is outside the batch's groups of 3 rows"),
        (dict(good, target_masks=((0, 0, 3, 3), (2, 2, 4, 4))),
         r"target_masks\[0\] and target_masks\[1\] overlap in 1"),
        (dict(good, target_masks=((0, 0, 2, 2), (2, 2, 5, 4))),
         r"target_masks\[1\] box .* lies outside the image grid"),
    )
    for options, match in at_call:
        with torch.no_grad(), ad.apply(model, "ir-diffusion", **options):
            with pytest.raises(ValueError, match=match):
                model(**inputs)
    at_construction = (
        (dict(good, target_masks=((0, 0, 2, 2),)),
         r"2 subject\(s\) .* need 2 reference_masks and 2 target_masks, got 2 and 1"),
        (dict(good, target_row=1), r"target_row=1 is also a reference row"),
        (dict(good, references=()), "references must be row indices"),
        (dict(good, reference_masks=(torch.zeros(4, 4, dtype=torch.bool), (2, 2, 4, 4))), "empty mask"),
        (dict(good, reference_masks=(torch.ones(4, 4), (2, 2, 4, 4))), r"boolean mask \[h, w\] or a box"),
        (dict(good, target_masks=((0, 0, 0, 2), (2, 2, 4, 4))), r"needs 0 <= y0 < y1"),
        (dict(good, chunks=0), "chunks must be an integer >= 1"),
    )
    for options, match in at_construction:
        with pytest.raises(ValueError, match=match):
            ad.IRDiffusion(**options)
