"""FreeCus (arXiv 2507.15249): pivotal attention sharing against a float64 reference written out
by hand, the two-pass form (KVBank) against the one-pass form, the dynamic shifting of the
reference's noise against diffusers' scheduler, the reference row fed per step in a pipeline,
switch-off and identities, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

ad = pytest.importorskip("attnkit.diffusion")
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,  # noqa: E402
                       FluxTransformer2DModel, UNet2DConditionModel)
from diffusers.models.embeddings import apply_rotary_emb  # noqa: E402

from attnkit.diffusion.freecus import (flux_mu, reference_callback, reference_latents,  # noqa: E402
                                       reference_sigmas)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

BOTH = ["transformer_blocks.0", "single_transformer_blocks.0"]  # the tiny model's two attention modules
SUBJECT = torch.zeros(4, 4, dtype=torch.bool)
SUBJECT[1:3, 1:4] = True  # a 2 x 3 subject on the 4 x 4 grid


def flux(dtype=torch.float64):
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  axes_dims_rope=[4, 4, 8]).to(dtype).eval()


def flux_inputs(batch=3, text=5, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(4, 4, 3, dtype=dtype)
    ids[..., 1] = torch.arange(4, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(4, dtype=dtype)[None, :]
    return dict(hidden_states=torch.randn(batch, 16, 4, generator=g, dtype=dtype),
                encoder_hidden_states=torch.randn(batch, text, 32, generator=g, dtype=dtype),
                pooled_projections=torch.randn(batch, 32, generator=g, dtype=dtype),
                timestep=torch.full((batch,), 0.5, dtype=dtype), img_ids=ids.reshape(-1, 3),
                txt_ids=torch.zeros(text, 3, dtype=dtype), return_dict=False)


def rows_of(inputs, index):
    return {k: (v[index] if torch.is_tensor(v) and v.dim() and k not in ("img_ids", "txt_ids") else v)
            for k, v in inputs.items()}


def unet(dtype=torch.float64):
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=4).to(dtype).eval()


def _written(model, inputs, *, reference=0, mask=None, scale=1.1, scale_text=True, modules=("joint", "single")):
    """FreeCus written out in float64: per module, q / k / v and RoPE from the module's own layers;
    a target row's keys are [scale * the reference row's subject image keys, scale * its own text
    keys (scale_text), its own image keys], its values [the reference's subject values, its own];
    a materialised softmax."""
    L = inputs["txt_ids"].shape[0]
    rope = model.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"]]))
    subject = torch.arange(16) if mask is None else mask.reshape(-1).nonzero().squeeze(1)

    class Written:
        def __init__(self, joint, active):
            self.joint, self.active = joint, active

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
            def heads(t):
                return t.unflatten(-1, (attn.heads, -1))  # [B, S, H, D]

            q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
            q, k = attn.norm_q(q), attn.norm_k(k)
            if self.joint:
                eq, ek, ev = (heads(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
                q, k, v = (torch.cat([attn.norm_added_q(eq), q], 1), torch.cat([attn.norm_added_k(ek), k], 1),
                           torch.cat([ev, v], 1))
            q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
            out = torch.empty_like(q)
            for b in range(q.shape[0]):
                keys, values = k[b], v[b]
                if self.active and b != reference:
                    text = keys[:, :L] * (scale if scale_text else 1.0)
                    k_ref, v_ref = k[reference][:, L:][:, subject], v[reference][:, L:][:, subject]
                    keys = torch.cat([scale * k_ref, text, keys[:, L:]], 1)
                    values = torch.cat([v_ref, values], 1)
                out[b] = torch.softmax(q[b] @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ values
            hidden = out.transpose(1, 2).flatten(2, 3)
            if self.joint:
                return attn.to_out[1](attn.to_out[0](hidden[:, L:])), attn.to_add_out(hidden[:, :L])
            return hidden

    originals = []
    for _, module in ad.attention_modules(model):
        joint = module.added_kv_proj_dim is not None
        originals.append((module, module.processor))
        module.set_processor(Written(joint, ("joint" if joint else "single") in modules))
    try:
        return model(**inputs)[0]
    finally:
        for module, proc in originals:
            module.set_processor(proc)


@pytest.mark.parametrize("options, written", [
    (dict(reference=0, mask=SUBJECT, blocks=BOTH), dict(mask=SUBJECT)),
    (dict(reference=0, blocks=BOTH, scale=2.0, scale_text=False), dict(scale=2.0, scale_text=False)),
    (dict(reference=2, mask=SUBJECT.reshape(-1), blocks="single_transformer_blocks"),
     dict(reference=2, mask=SUBJECT, modules=("single",))),
])
def test_freecus_equals_the_written_out_reference(options, written):
    model, inputs = flux(), flux_inputs()
    with torch.no_grad():
        expected = _written(model, inputs, **written)
        with ad.apply(model, "freecus", **options):
            got = model(**inputs)[0]
        plain = model(**inputs)[0]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    r = written.get("reference", 0)
    torch.testing.assert_close(got[r], plain[r], rtol=1e-10, atol=1e-10)  # the reference runs as usual
    assert (got - plain).abs().max() > 1e-3


def test_two_passes_through_a_bank_equal_the_reference_row_in_the_batch():
    # the official form: a reference pass records, the target pass reads, step by step
    model = flux()
    steps = [flux_inputs(seed=s) for s in (1, 2)]  # the reference's (row 0) latents differ per step
    bank = ad.KVBank()
    with torch.no_grad():
        with ad.apply(model, "freecus", reference=0, mask=SUBJECT, blocks=BOTH):
            one_pass = [model(**inputs)[0] for inputs in steps]
        with ad.apply(model, "freecus", bank=bank, mask=SUBJECT, blocks=BOTH) as handle:
            handle.phase = "reference"
            for inputs in steps:
                model(**rows_of(inputs, slice(0, 1)))
            assert len(bank) == 2 * 2 and bank.get("transformer_blocks.0.attn", 1)[0].shape == (1, 2, 6, 16)
            handle.reset()
            handle.phase = "sample"
            two_pass = [model(**rows_of(inputs, slice(1, 3)))[0] for inputs in steps]
            with pytest.raises(ValueError, match=r"KVBank holds nothing for module 'transformer_blocks.0.attn' at "
                                                 r"step 2 .* holds steps \[0, 1\]"):
                model(**rows_of(steps[0], slice(1, 3)))
    for a, b in zip(one_pass, two_pass):
        torch.testing.assert_close(b, a[1:], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(two_pass[0], two_pass[1])


def test_dynamic_shifting_matches_the_scheduler_with_mu_negated():
    n, seq = 6, 1024
    mu = flux_mu(seq)
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    assert mu == pytest.approx(calculate_shift(seq, 256, 4096, 0.5, 1.15), rel=1e-12)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=-mu)
    got = reference_sigmas(n, mu)
    torch.testing.assert_close(got, scheduler.sigmas[:-1].double(), rtol=1e-6, atol=1e-6)  # the scheduler: float32
    base = torch.linspace(1.0, 1 / n, n, dtype=torch.float64)
    torch.testing.assert_close(got, math.exp(-mu) / (math.exp(-mu) + 1 / base - 1), rtol=1e-14, atol=0)
    assert bool((got[1:] < base[1:]).all()) and got[0] == 1.0  # less noise than the target at every step after the first
    torch.testing.assert_close(reference_sigmas(n, mu, mu_scale=0.0), base, rtol=1e-14, atol=0)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 16, 4, generator=g), torch.randn(1, 16, 4, generator=g)
    zs = reference_latents(x0, noise, got)
    assert zs.shape == (n, 1, 16, 4)
    for i, t in enumerate(scheduler.timesteps):
        torch.testing.assert_close(zs[i], scheduler.scale_noise(x0, t[None], noise), rtol=1e-5, atol=1e-5)


def _pipeline():
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=flux(torch.float32))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_reference_row_gets_its_latents_every_step_and_both_forms_agree_in_a_pipeline():
    pipe, n = _pipeline(), 3
    g = torch.Generator().manual_seed(0)
    embeds, pooled = torch.randn(2, 8, 32, generator=g), torch.randn(2, 32, generator=g)
    noise = torch.randn(2, 16, 4, generator=g)
    zs = reference_latents(torch.randn(1, 16, 4, generator=g), noise[:1], reference_sigmas(n, flux_mu(16)).float())
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["hidden_states"].clone()),
                                                      with_kwargs=True)
    kw = dict(num_inference_steps=n, height=8, width=8, output_type="latent", guidance_scale=1.0)
    with ad.apply(pipe, "freecus", reference=0, mask=SUBJECT, blocks=BOTH):
        one_pass = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, latents=torch.cat([zs[0], noise[1:]]),
                        callback_on_step_end=reference_callback(zs), **kw).images
    assert len(seen) == n and all(torch.equal(seen[i][0], zs[i][0]) for i in range(n))  # z_i in row 0 at step i
    hook.remove()
    bank = ad.KVBank()
    with ad.apply(pipe, "freecus", bank=bank, mask=SUBJECT, blocks=BOTH) as handle:
        handle.phase = "reference"
        pipe(prompt_embeds=embeds[:1], pooled_prompt_embeds=pooled[:1], latents=zs[0],
             callback_on_step_end=reference_callback(zs), **kw)
        handle.reset()
        handle.phase = "sample"
        two_pass = pipe(prompt_embeds=embeds[1:], pooled_prompt_embeds=pooled[1:], latents=noise[1:], **kw).images
    torch.testing.assert_close(two_pass, one_pass[1:], rtol=1e-5, atol=1e-5)
    plain = pipe(prompt_embeds=embeds[1:], pooled_prompt_embeds=pooled[1:], latents=noise[1:], **kw).images
    assert (two_pass - plain).abs().max() > 1e-4


def test_switched_off_is_bit_exact_and_a_repeated_image_without_text_is_unchanged():
    model, inputs = flux(torch.float32), flux_inputs(dtype=torch.float32)
    with torch.no_grad():
        stock = model(**inputs)[0]
        with ad.apply(model, "freecus", reference=0, blocks=BOTH, steps=()) as handle:
            assert torch.equal(model(**inputs)[0], stock)
        assert handle.calls == 0
        model = unet()
        g = torch.Generator().manual_seed(2)
        same = dict(sample=torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64).expand(3, -1, -1, -1),
                    timestep=torch.tensor(500),
                    encoder_hidden_states=torch.randn(1, 6, 16, generator=g, dtype=torch.float64).expand(3, -1, -1),
                    return_dict=False)
        plain = model(**same)[0]
        with ad.apply(model, "freecus", reference=0, scale=1.0, blocks=None) as handle:
            shared = model(**same)[0]
        assert handle.calls == 4
    # every key of the reference (= the row itself) shared once, unscaled: the softmax-weighted mean stays
    torch.testing.assert_close(shared, plain, rtol=1e-10, atol=1e-10)


def test_bad_input_is_refused_clearly():
    model, inputs = flux(), flux_inputs()
    for bad, match in ((dict(), r"either reference=<row> .* or bank=KVBank\(\)"),
                       (dict(reference=0, bank=ad.KVBank()), "either reference=<row>"),
                       (dict(reference=-1), "reference must be a row index >= 0 or None"),
                       (dict(bank={}), "bank must be an attnkit.diffusion.KVBank, got dict"),
                       (dict(reference=0, scale=0), "scale must be a number > 0"),
                       (dict(reference=0, chunks=0), "chunks must be an integer >= 1"),
                       (dict(reference=0, mask=torch.ones(16)), "mask must be a boolean tensor .* got torch.float32"),
                       (dict(reference=0, mask=torch.zeros(16, dtype=torch.bool)), "mask selects no token")):
        with pytest.raises(ValueError, match=match):
            ad.FreeCus(**bad)
    with pytest.raises(ValueError, match=r"blocks names 'transformer_blocks.1', which matches none"):
        ad.apply(model, "freecus", reference=0)  # FLUX.1's pivotal modules: the tiny model has one of each kind
    with torch.no_grad():
        with ad.apply(model, "freecus", reference=0, blocks=BOTH, mask=torch.ones(9, dtype=torch.bool)):
            with pytest.raises(ValueError, match=r"mask has 9 entries but transformer_blocks.0.attn has 16 image "
                                                 r"tokens \(grid 4 x 4\)"):
                model(**inputs)
        with ad.apply(model, "freecus", reference=4, blocks=BOTH):
            with pytest.raises(ValueError, match=r"reference=4 is outside the batch's groups of 3 rows"):
                model(**inputs)
        bank = ad.KVBank()
        bank.put("transformer_blocks.0.attn", 0, torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 3, 16))
        with ad.apply(model, "freecus", bank=bank, blocks=BOTH):
            with pytest.raises(ValueError, match=r"the bank's reference keys .* are \(2, 2, 3, 16\); this call needs "
                                                 r"\[1 or chunks=1, 2, n, 16\]"):
                model(**inputs)
    for call, match in ((lambda: reference_sigmas(0, 1.0), "num_steps must be an integer >= 1"),
                        (lambda: reference_sigmas(3, float("nan")), "mu must be a finite number"),
                        (lambda: flux_mu(0), "image_seq_len must be an integer >= 1"),
                        (lambda: reference_latents(torch.zeros(2, 3), torch.zeros(3, 2), torch.ones(2)),
                         r"x0 and noise must be tensors of one shape, got \(2, 3\) and \(3, 2\)"),
                        (lambda: reference_latents(torch.zeros(2), torch.zeros(2), torch.tensor([1.5])),
                         r"sigmas must be a 1-D tensor of noise levels in \[0, 1\]"),
                        (lambda: reference_callback(torch.zeros(3)), r"latents must be the reference's latents"),
                        (lambda: reference_callback(torch.zeros(3, 4, 4), row=-1), "row must be a row index >= 0")):
        with pytest.raises(ValueError, match=match):
            call()
