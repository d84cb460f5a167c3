"""AlignedGen (arXiv 2509.17088): the output against a float64 reference with ShiftPE's positions,
AdaIN and the reference keys' scale written out by hand; the shifted positions; switch-off and
identities; bad input."""

from __future__ import annotations

import math

import pytest
import torch

ad = pytest.importorskip("attnkit.diffusion")
from diffusers import FluxTransformer2DModel, UNet2DConditionModel  # noqa: E402
from diffusers.models.embeddings import apply_rotary_emb  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

H_GRID = W_GRID = 4


def flux(dtype=torch.float64):
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  axes_dims_rope=[4, 4, 8]).to(dtype).eval()


def flux_inputs(batch=3, text=5, dtype=torch.float64, same=False):
    g = torch.Generator().manual_seed(1)
    n = 1 if same else batch
    ids = torch.zeros(H_GRID, W_GRID, 3, dtype=dtype)
    ids[..., 1] = torch.arange(H_GRID, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(W_GRID, dtype=dtype)[None, :]
    return dict(hidden_states=torch.randn(n, H_GRID * W_GRID, 4, generator=g, dtype=dtype).expand(batch, -1, -1),
                encoder_hidden_states=torch.randn(n, text, 32, generator=g, dtype=dtype).expand(batch, -1, -1),
                pooled_projections=torch.randn(n, 32, generator=g, dtype=dtype).expand(batch, -1),
                timestep=torch.full((batch,), 0.5, dtype=dtype), img_ids=ids.reshape(-1, 3),
                txt_ids=torch.zeros(text, 3, dtype=dtype), return_dict=False)


def _written(model, inputs, *, reference=0, shift=(0, W_GRID), lam=1.1, adain=True, modules=("single",)):
    """The model's output with AlignedGen written out in float64: q / k / v from each module's own
    layers; for a target row, AdaIN (unbiased variance, eps in the root) of its image q / k before
    RoPE to the reference row's statistics, RoPE at the image ids; the reference's image keys
    rotated at ids + (0, dy, dx) spelled out here, times lam; a materialised softmax."""
    txt_ids, img_ids = inputs["txt_ids"], inputs["img_ids"]
    L = txt_ids.shape[0]
    shifted = img_ids.clone()
    if shift is not None:
        shifted[:, 1] += shift[0]
        shifted[:, 2] += shift[1]
    rope_all = model.pos_embed(torch.cat([txt_ids, img_ids]))
    rope_img, rope_ref = model.pos_embed(img_ids), model.pos_embed(shifted)

    def norm(x, ref):  # [H, N, D]: per head and channel over the tokens
        sx, sr = (x.var(1, keepdim=True) + 1e-5).sqrt(), (ref.var(1, keepdim=True) + 1e-5).sqrt()
        return (x - x.mean(1, keepdim=True)) / sx * sr + ref.mean(1, keepdim=True)

    class Written:
        def __init__(self, joint, active):
            self.joint, self.active = joint, active

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
            def heads(t):
                return t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # [B, H, S, D]

            q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
            q, k = attn.norm_q(q.transpose(1, 2)).transpose(1, 2), attn.norm_k(k.transpose(1, 2)).transpose(1, 2)
            if self.joint:
                eq, ek, ev = (heads(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
                eq = attn.norm_added_q(eq.transpose(1, 2)).transpose(1, 2)
                ek = attn.norm_added_k(ek.transpose(1, 2)).transpose(1, 2)
                q, k, v = torch.cat([eq, q], 2), torch.cat([ek, k], 2), torch.cat([ev, v], 2)
            qr, kr = apply_rotary_emb(q, rope_all), apply_rotary_emb(k, rope_all)  # [B, H, S, D]
            out = torch.empty_like(q)
            for b in range(q.shape[0]):
                if not self.active or b == reference:
                    keys, values, qb = kr[b], v[b], qr[b]
                else:
                    qb, kb = qr[b], kr[b]
                    if adain:
                        qi = norm(q[b][:, L:], q[reference][:, L:])
                        ki = norm(k[b][:, L:], k[reference][:, L:])
                        qb = torch.cat([qr[b][:, :L], apply_rotary_emb(qi[None], rope_img)[0]], 1)
                        kb = torch.cat([kr[b][:, :L], apply_rotary_emb(ki[None], rope_img)[0]], 1)
                    k_ref = apply_rotary_emb(k[reference][None, :, L:], rope_ref)[0]
                    keys = torch.cat([kb, lam * k_ref], 1)
                    values = torch.cat([v[b], v[reference][:, L:]], 1)
                logits = qb @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])
                out[b] = torch.softmax(logits, -1) @ values
            hidden = out.transpose(1, 2).flatten(2, 3)
            if self.joint:
                return attn.to_out[1](attn.to_out[0](hidden[:, L:])), attn.to_add_out(hidden[:, :L])
            return hidden

    originals = []
    for name, module in ad.attention_modules(model):
        joint = module.added_kv_proj_dim is not None
        originals.append((module, module.processor))
        module.set_processor(Written(joint, ("joint" if joint else "single") in modules))
    try:
        return model(**inputs)[0]
    finally:
        for module, proc in originals:
            module.set_processor(proc)


@pytest.mark.parametrize("options, written", [
    (dict(), dict()),                                                         # the paper's defaults
    (dict(blocks=None), dict(modules=("joint", "single"))),
    (dict(reference=2, shift=(5, 0)), dict(reference=2, shift=(5, 0))),
    (dict(shift=False), dict(shift=(0, 0))),                                  # ShiftPE off: the same ids
    (dict(adain=False, style_lambda=2.0), dict(adain=False, lam=2.0)),
    (dict(style_lambda="decrease", blocks=None), dict(lam=0.5 ** 2, modules=("joint", "single"))),
])
def test_alignedgen_equals_the_written_out_reference(options, written):
    model, inputs = flux(), flux_inputs()
    with torch.no_grad():
        expected = _written(model, inputs, **written)
        with ad.apply(model, "alignedgen", **options) as handle:
            got = model(**inputs)[0]
        plain = model(**inputs)[0]
    assert handle.calls == (2 if options.get("blocks", "x") is None else 1)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    r = written.get("reference", 0)
    torch.testing.assert_close(got[r], plain[r], rtol=1e-10, atol=1e-10)  # the reference generates as if alone
    assert (got - plain).abs().max() > 1e-3


def test_shiftpe_positions_do_not_overlap_and_change_the_targets():
    ids = flux_inputs()["img_ids"]
    targets = {tuple(map(int, row)) for row in ids}
    for shift, moved in ((True, (0, 4)), ((0, -4), (0, -4)), ((4, 0), (4, 0)), ((-5, 7), (-5, 7))):
        ref = ad.AlignedGen(shift=shift).reference_ids(ids)
        assert ref.shape == ids.shape
        assert not targets & {tuple(map(int, row)) for row in ref}  # no position of the reference is a target's
        assert torch.equal(ref[:, 1:] - ids[:, 1:], torch.tensor(moved, dtype=ids.dtype).expand(len(ids), 2))
        assert torch.equal(ref[:, 0], ids[:, 0])
    assert torch.equal(ad.AlignedGen(shift=False).reference_ids(ids), ids)
    model, inputs = flux(), flux_inputs()
    with torch.no_grad():
        with ad.apply(model, "alignedgen"):
            shifted = model(**inputs)[0]
        with ad.apply(model, "alignedgen", shift=False):
            naive = model(**inputs)[0]
    assert (shifted[1:] - naive[1:]).abs().max() > 1e-4  # ShiftPE moves what the targets see
    torch.testing.assert_close(shifted[0], naive[0], rtol=0, atol=0)


def test_switched_off_is_bit_exact_and_a_lone_reference_is_stock():
    model, inputs = flux(torch.float32), flux_inputs(dtype=torch.float32)
    with torch.no_grad():
        stock = model(**inputs)[0]
        with ad.apply(model, "alignedgen", steps=()) as handle:
            assert torch.equal(model(**inputs)[0], stock)
        assert handle.calls == 0
        with ad.apply(model, "alignedgen", steps=(1, 3)) as handle:  # the first call (step 0) is not in the steps
            assert torch.equal(model(**inputs)[0], stock)
            assert not torch.equal(model(**inputs)[0], stock)
        one = {k: (v[:1] if torch.is_tensor(v) and v.dim() and v.shape[0] == 3 else v) for k, v in inputs.items()}
        alone = model(**one)[0]
        with ad.apply(model, "alignedgen", blocks=None) as handle:
            assert torch.equal(model(**one)[0], alone)  # a batch of the reference alone: the stock call
        assert handle.calls == 2


def test_a_repeated_image_without_text_is_unchanged():
    # a UNet's self-attention has no text: AdaIN of a row to itself and every key shared once leave it as it is
    torch.manual_seed(0)
    model = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                 attention_head_dim=4, norm_num_groups=4).double().eval()
    g = torch.Generator().manual_seed(2)
    inputs = dict(sample=torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64).expand(3, -1, -1, -1),
                  timestep=torch.tensor(500), encoder_hidden_states=torch.randn(1, 6, 16, generator=g,
                                                                                dtype=torch.float64).expand(3, -1, -1),
                  return_dict=False)
    with torch.no_grad():
        plain = model(**inputs)[0]
        with ad.apply(model, "alignedgen", shift=False, style_lambda=1.0, blocks=None) as handle:
            same = model(**inputs)[0]
            assert handle.calls == 4
        with ad.apply(model, "alignedgen", shift=False, blocks=None):
            scaled = model(**inputs)[0]
    torch.testing.assert_close(same, plain, rtol=1e-10, atol=1e-10)
    assert (scaled[1:] - plain[1:]).abs().max() > 1e-6  # lambda != 1 reweights the shared copy


def test_bad_input_is_refused_clearly():
    model, inputs = flux(), flux_inputs()
    for bad, match in ((dict(reference=-1), "reference must be a row index >= 0"),
                       (dict(style_lambda=0), r"style_lambda must be a number > 0 or 'decrease'"),
                       (dict(style_lambda="increase"), r"style_lambda must be a number > 0 or 'decrease'"),
                       (dict(shift=1.5), r"shift must be True .*, got 1.5"),
                       (dict(shift=(1, 2, 3)), r"shift must be True"),
                       (dict(chunks=0), "chunks must be an integer >= 1"),
                       (dict(blocks=[]), "blocks is empty")):
        with pytest.raises(ValueError, match=match):
            ad.AlignedGen(**bad)
    with pytest.raises(ValueError, match=r"shift=\(0, 2\) puts the reference's positions on the targets' .*4 x 4.*"
                                         r"accepted: \|dy\| >= 4 or \|dx\| >= 4"):
        ad.AlignedGen(shift=2).reference_ids(inputs["img_ids"])
    with torch.no_grad(), ad.apply(model, "alignedgen", shift=(1, -3)):
        with pytest.raises(ValueError, match="puts the reference's positions on the targets'"):
            model(**inputs)
    with torch.no_grad(), ad.apply(model, "alignedgen", reference=3):
        with pytest.raises(ValueError, match=r"reference=3 is outside the batch's groups of 3 rows"):
            model(**inputs)
    with pytest.raises(ValueError, match=r"blocks names 'single_transformer_blocks.5', which matches none"):
        ad.apply(model, "alignedgen", blocks=["single_transformer_blocks.5"])
    with pytest.raises(ValueError, match=r"does not take option\(s\) \['lambda'\]"):
        ad.apply(model, "alignedgen", **{"lambda": 1.0})
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=4).eval()
    with torch.no_grad(), ad.apply(unet, "alignedgen", blocks=None):
        with pytest.raises(ValueError, match=r"ShiftPE \(shift=True\) moves rotary positions.*pass shift=False"):
            unet(torch.randn(2, 4, 8, 8), torch.tensor(500), torch.randn(2, 6, 16))
