"""attnkit.diffusion's spine: processors on FLUX and UNet models, switch-off exactness, the shared
attention against a float64 reference written out, schedules, the bank, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

ad = pytest.importorskip("attnkit.diffusion")
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,  # noqa: E402
                       FluxTransformer2DModel, UNet2DConditionModel)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def flux(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  axes_dims_rope=[4, 4, 8]).to(dtype).eval()


def flux_inputs(batch=3, h=4, w=4, text=5, dtype=torch.float64, same=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = 1 if same else batch
    x = torch.randn(n, h * w, 4, generator=g, dtype=dtype).expand(batch, -1, -1)
    ehs = torch.randn(n, text, 32, generator=g, dtype=dtype).expand(batch, -1, -1)
    pooled = torch.randn(n, 32, generator=g, dtype=dtype).expand(batch, -1)
    ids = torch.zeros(h, w, 3, dtype=dtype)
    ids[..., 1] = torch.arange(h, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w, dtype=dtype)[None, :]
    return dict(hidden_states=x.contiguous(), encoder_hidden_states=ehs.contiguous(), pooled_projections=pooled.contiguous(),
                timestep=torch.full((batch,), 0.5, dtype=dtype), img_ids=ids.reshape(-1, 3),
                txt_ids=torch.zeros(text, 3, dtype=dtype), return_dict=False)


def unet(dtype=torch.float64):
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=4).to(dtype).eval()


def unet_inputs(batch=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(2)
    return dict(sample=torch.randn(batch, 4, 8, 8, generator=g, dtype=dtype), timestep=torch.tensor(500),
                encoder_hidden_states=torch.randn(batch, 6, 16, generator=g, dtype=dtype), return_dict=False)


class Off(ad.Sharing):
    """Active nowhere: every call runs the replaced processor."""

    def active(self, site):
        return False


class Stock(ad.Sharing):
    """Active everywhere, attending with the call's own q / k / v (the stock path through attnkit)."""


def test_switched_off_and_stock_paths_are_bit_exact_and_remove_restores():
    model = flux(torch.float32)
    inputs = flux_inputs(dtype=torch.float32)
    before = [type(m.processor) for _, m in ad.attention_modules(model)]
    with torch.no_grad():
        ref = model(**inputs)[0]
        for method in (Off(), Stock()):
            with ad.apply(model, method) as handle:
                assert torch.equal(model(**inputs)[0], ref)
            assert handle.calls == (0 if isinstance(method, Off) else 2)  # 1 joint + 1 single block
        assert [type(m.processor) for _, m in ad.attention_modules(model)] == before
        assert torch.equal(model(**inputs)[0], ref)
        assert not model._forward_pre_hooks


def test_switched_off_pipeline_latents_are_bit_exact():
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=flux(torch.float32))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    kw = dict(prompt_embeds=torch.randn(3, 8, 32, generator=g), pooled_prompt_embeds=torch.randn(3, 32, generator=g),
              num_inference_steps=3, height=32, width=32, output_type="latent")
    stock = pipe(**kw, generator=torch.Generator().manual_seed(1)).images
    with ad.apply(pipe, Off()) as handle:
        off = pipe(**kw, generator=torch.Generator().manual_seed(1)).images
        assert handle.step == 2  # three denoiser calls, counted from 0
    with ad.apply(pipe, "shared-kv", reference=0, steps=(0, 2)) as handle:
        shared = pipe(**kw, generator=torch.Generator().manual_seed(1)).images
        assert handle.calls == 2 * 2  # two blocks in the first two steps
    assert torch.equal(off, stock)
    assert torch.equal(shared[0], stock[0])  # the reference row attends as usual
    assert not torch.allclose(shared[1:], stock[1:])


def _reference_shared(model, inputs, reference, adain=False, reference_scale=1.0):
    """The model's output with shared attention written out in float64: per attention module, q / k / v
    from the module's own layers, the targets' keys extended by the reference's image keys, a
    materialised softmax."""
    from diffusers.models.embeddings import apply_rotary_emb

    rope = model.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"]]))
    text = inputs["encoder_hidden_states"].shape[1]

    class Written:
        def __init__(self, joint):
            self.joint = joint

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            def heads(t):
                return t.unflatten(-1, (attn.heads, -1))  # [B, S, H, D]

            q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
            q, k = attn.norm_q(q), attn.norm_k(k)
            if self.joint:
                eq, ek, ev = (heads(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
                q, k, v = torch.cat([attn.norm_added_q(eq), q], 1), torch.cat([attn.norm_added_k(ek), k], 1), torch.cat([ev, v], 1)
            q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
            out = torch.empty_like(q)
            for b in range(q.shape[0]):
                qb, kb, vb = q[b], k[b], v[b]
                if b != reference:
                    if adain:
                        def norm(x, r):
                            xi, ri = x[:, text:], r[:, text:]
                            y = (xi - xi.mean(1, keepdim=True)) / (xi.std(1, keepdim=True, unbiased=False) + 1e-5)
                            return torch.cat([x[:, :text], y * ri.std(1, keepdim=True, unbiased=False)
                                              + ri.mean(1, keepdim=True)], 1)
                        qb, kb = norm(qb, q[reference]), norm(kb, k[reference])
                    kb = torch.cat([kb, k[reference][:, text:]], 1)
                    vb = torch.cat([vb, v[reference][:, text:]], 1)
                logits = qb @ kb.transpose(-1, -2) / math.sqrt(q.shape[-1])
                if b != reference:
                    logits[:, :, k.shape[2]:] += math.log(reference_scale)
                out[b] = torch.softmax(logits, -1) @ vb
            hidden = out.transpose(1, 2).flatten(2, 3)
            if self.joint:
                e_out, hidden = hidden[:, :text], hidden[:, text:]
                return attn.to_out[1](attn.to_out[0](hidden)), attn.to_add_out(e_out)
            return hidden

    originals = []
    for name, module in ad.attention_modules(model):
        originals.append((module, module.processor))
        module.set_processor(Written(joint=module.added_kv_proj_dim is not None))
    try:
        return model(**inputs)[0]
    finally:
        for module, proc in originals:
            module.set_processor(proc)


@pytest.mark.parametrize("options", [dict(reference=0), dict(reference=2), dict(reference=1, adain=True),
                                     dict(reference=0, reference_scale=2.5)])
def test_shared_attention_equals_the_written_out_reference(options):
    model, inputs = flux(), flux_inputs()
    with torch.no_grad():
        expected = _reference_shared(model, inputs, **options)
        with ad.apply(model, "shared-kv", **options):
            got = model(**inputs)[0]
        plain = model(**inputs)[0]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    r = options["reference"]
    torch.testing.assert_close(got[r], plain[r], rtol=1e-10, atol=1e-10)
    assert (got - plain).abs().max() > 1e-3  # the targets did change


def test_a_batch_of_one_image_repeated_is_unchanged_when_every_key_is_shared():
    # every key repeated once does not move a softmax-weighted mean: reference == target is the stock output;
    # sharing the image keys only reweights image against text, so there it is not the identity
    model, inputs = flux(), flux_inputs(same=True)
    with torch.no_grad():
        plain = model(**inputs)[0]
        with ad.apply(model, "shared-kv", reference=1, share_text=True):
            got = model(**inputs)[0]
        with ad.apply(model, "shared-kv", reference=1):
            image_only = model(**inputs)[0]
    torch.testing.assert_close(got, plain, rtol=1e-10, atol=1e-10)
    assert (image_only[0] - plain[0]).abs().max() > 1e-4


def test_unet_self_attention_sharing_and_switch_off():
    model, inputs = unet(), unet_inputs()
    with torch.no_grad():
        plain = model(**inputs)[0]
        with ad.apply(model, Off()):
            assert torch.equal(model(**inputs)[0], plain)
        with ad.apply(model, Stock()) as handle:
            torch.testing.assert_close(model(**inputs)[0], plain, rtol=1e-12, atol=1e-12)
            kinds = {handle._modules[i][1].processor.kind for i in range(len(handle.names))}
            assert kinds == {"self", "cross"}
        with ad.apply(model, "shared-kv", reference=0) as handle:
            shared = model(**inputs)[0]
            selfs = [n for n, m in handle._modules if m.processor.kind == "self"]
            assert handle.calls == len(selfs) == 4 and all(n.endswith("attn1") for n in selfs)  # cross stays stock
    torch.testing.assert_close(shared[0], plain[0], rtol=1e-10, atol=1e-10)
    assert (shared[1:] - plain[1:]).abs().max() > 1e-6


def test_classifier_free_guidance_halves_share_within_each_half():
    model, inputs = unet(), unet_inputs(batch=4)
    seen = []

    class Spy(ad.SharedAttention):
        def attend(self, call):
            seen.append([g[self.reference] for g in ad.rows(call.batch, self.chunks)])
            return super().attend(call)

    with torch.no_grad(), ad.apply(model, Spy(reference=1, chunks=2)):
        out = model(**inputs)[0]
    assert seen[0] == [1, 3]
    # the same as each half alone with its own reference (row 1 of the half)
    with torch.no_grad(), ad.apply(model, "shared-kv", reference=1):
        halves = [model(**{**inputs, "sample": inputs["sample"][i:i + 2],
                           "encoder_hidden_states": inputs["encoder_hidden_states"][i:i + 2]})[0] for i in (0, 2)]
    torch.testing.assert_close(out, torch.cat(halves), rtol=1e-10, atol=1e-10)


def test_blocks_and_steps_choose_where_it_acts():
    model, inputs = flux(), flux_inputs()
    sites = []

    class Log(ad.Sharing):
        def attend(self, call):
            sites.append((call.site.name, call.site.kind, call.site.step, call.text_len, call.grid))
            return call.attend()

    with torch.no_grad(), ad.apply(model, Log(blocks="single_transformer_blocks", steps=[1])) as handle:
        for _ in range(3):
            model(**inputs)
        assert handle.step == 2
    assert sites == [("single_transformer_blocks.0.attn", "single", 1, 5, (4, 4))]
    sites.clear()
    with torch.no_grad(), ad.apply(model, Log(blocks=[0])):
        model(**inputs)
    assert sites == [("transformer_blocks.0.attn", "joint", 0, 5, (4, 4))]


def test_rotate_reproduces_the_models_rope_and_moves_positions():
    model, inputs = flux(), flux_inputs()
    got = {}

    class Grab(ad.Sharing):
        def attend(self, call):
            ids = torch.cat([torch.zeros(call.text_len, 3, dtype=call.q.dtype), call.image_ids])
            got["same"] = (call.rotate(call.k_plain, ids), call.k)
            shifted = ids.clone()
            shifted[call.text_len:, 2] += 100
            got["moved"] = call.rotate(call.k_plain, shifted)
            return call.attend()

    with torch.no_grad(), ad.apply(model, Grab(blocks=[0])):
        model(**inputs)
    torch.testing.assert_close(*got["same"], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got["moved"], got["same"][1])


def test_kv_bank_keeps_and_refuses():
    bank = ad.KVBank(device="cpu")
    k, v = torch.randn(2, 3), torch.randn(2, 3)
    bank.put("blocks.0", 3, k, v)
    assert ("blocks.0", 3) in bank and len(bank) == 1 and bank.nbytes == 2 * 6 * 4
    assert all(torch.equal(a, b) for a, b in zip(bank.get("blocks.0", 3), (k, v)))
    with pytest.raises(ValueError, match=r"holds nothing for module 'blocks.0' at step 4 .* holds steps \[3\]"):
        bank.get("blocks.0", 4)
    bank.clear()
    assert len(bank) == 0


def test_bad_input_is_refused_clearly():
    model, inputs = flux(), flux_inputs()
    with pytest.raises(ValueError, match=r"blocks names 'down_blocks'.*accepted: a module name or prefix such as "
                                         r"single_transformer_blocks.0, transformer_blocks.0"):
        ad.apply(model, "shared-kv", blocks="down_blocks")
    assert all(type(m.processor).__name__ == "FluxAttnProcessor" for _, m in ad.attention_modules(model))
    assert not model._forward_pre_hooks  # a refused apply leaves nothing behind
    with pytest.raises(ValueError, match="block index 7 is outside the model's 2 attention modules"):
        ad.apply(model, "shared-kv", blocks=[7])
    with pytest.raises(ValueError, match=r"unknown attnkit.diffusion method 'nope'; accepted: .*plain, .*shared-kv"):
        ad.apply(model, "nope")
    with pytest.raises(ValueError, match=r"does not take option\(s\) \['refrence'\]"):
        ad.apply(model, "shared-kv", refrence=1)
    for bad, match in ((dict(reference=-1), "reference must be a row index >= 0"),
                       (dict(reference_scale=0), "reference_scale must be a number > 0"),
                       (dict(chunks=0), "chunks must be an integer >= 1"),
                       (dict(steps=(3, 1)), r"steps=\(start, stop\) needs 0 <= start < stop"),
                       (dict(steps="x"), "steps must be >= 0|steps must be None"),
                       (dict(blocks=[]), "blocks is empty")):
        with pytest.raises(ValueError, match=match):
            ad.SharedAttention(**bad)
    with torch.no_grad(), ad.apply(model, "shared-kv", reference=5):
        with pytest.raises(ValueError, match=r"reference=5 is outside the batch's groups of 3 rows"):
            model(**inputs)
    with torch.no_grad(), ad.apply(model, "shared-kv", chunks=2):
        with pytest.raises(ValueError, match="chunks=2 does not divide the batch of 3 rows"):
            model(**inputs)
    with pytest.raises(ValueError, match="has no diffusers attention modules"):
        ad.apply(torch.nn.Linear(2, 2), "plain")
    with pytest.raises(ValueError, match="apply takes a diffusers pipeline"):
        ad.apply(object(), "plain")

    class Wrong(ad.Sharing):
        def attend(self, call):
            return call.q[:, :, :1]

    with torch.no_grad(), ad.apply(model, Wrong()):
        with pytest.raises(ValueError, match=r"Wrong.attend returned \(3, 2, 1, 16\); it must return \[B, H, T, D\]"):
            model(**inputs)

    class BadMask(ad.Sharing):
        def attend(self, call):
            return call.attend(mask=torch.ones(1, 1, 3, 3, dtype=torch.bool))

    with torch.no_grad(), ad.apply(model, BadMask()):
        with pytest.raises(ValueError, match=r"mask must be a boolean tensor \[B\|1, H\|1, T, S\]"):
            model(**inputs)


def test_a_mask_over_image_tokens_is_what_attention_sees():
    model, inputs = flux(), flux_inputs()
    outs = {}

    class Masked(ad.Sharing):
        def attend(self, call):
            S = call.k.shape[2]
            mask = torch.ones(1, 1, S, S, dtype=torch.bool)
            mask[..., call.text_len:call.text_len + 4] = False  # the first image row of tokens is hidden
            out = call.attend(mask=mask)
            keep = torch.ones(S, dtype=torch.bool)
            keep[call.text_len:call.text_len + 4] = False
            outs[call.site.name] = (out, call.attend(call.q, call.k[:, :, keep], call.v[:, :, keep]))
            return out

    with torch.no_grad(), ad.apply(model, Masked()):
        model(**inputs)
    for out, expected in outs.values():
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_every_card_is_a_registered_method_and_builds_from_its_defaults():
    assert {c.name for c in ad.CARDS} == set(ad.METHODS)
    for card in ad.CARDS:
        assert card.kind == "diffusion" and ad.METHODS[card.name] is card.layer
        assert isinstance(ad.build(card.name, **card.defaults), ad.Sharing)
        flops = card.flops(2, 256, card.config(64, 4)).attention_fwd
        assert flops >= 4.0 * 2 * 256 * 256 * 64  # at least the plain attention of the layer


def _cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                        time_embed_dim=2, text_embed_dim=8, num_layers=2, sample_width=8,
                                        sample_height=8, sample_frames=8, patch_size=2, temporal_compression_ratio=4,
                                        max_text_seq_length=8, use_rotary_positional_embeddings=True).double().eval()
    g = torch.Generator().manual_seed(3)
    inputs = dict(hidden_states=torch.randn(2, 2, 4, 8, 8, generator=g, dtype=torch.float64),
                  encoder_hidden_states=torch.randn(2, 8, 8, generator=g, dtype=torch.float64),
                  timestep=torch.tensor([500, 500]), return_dict=False)
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    cos, sin = get_3d_rotary_pos_embed(16, ((0, 0), (4, 4)), (4, 4), 2)  # head dim 16, a 4 x 4 grid of 2 frames
    inputs["image_rotary_emb"] = (cos.double(), sin.double())
    return model, inputs


def test_cogvideox_joint_attention_is_routed_exactly_and_switches_off():
    # the video MM-DiT (DiTCtrl's family): text first, RoPE on the video tokens only
    model, inputs = _cogvideox()
    with torch.no_grad():
        plain = model(**inputs)[0]
        with ad.apply(model, Off()):
            assert torch.equal(model(**inputs)[0], plain)
        with ad.apply(model, Stock()) as handle:
            torch.testing.assert_close(model(**inputs)[0], plain, rtol=1e-12, atol=1e-12)
            assert handle.calls == 2 and {m.processor.kind for _, m in handle._modules} == {"joint"}
        with ad.apply(model, "shared-kv", reference=0, share_text=True):
            shared = model(**inputs)[0]
    torch.testing.assert_close(shared[0], plain[0], rtol=1e-10, atol=1e-10)
    assert (shared[1] - plain[1]).abs().max() > 1e-6
