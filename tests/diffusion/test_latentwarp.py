"""LatentWarp: cross-frame attention against a float64 reference written out, switch-off, the
identities that hold (a clip of identical frames), latent alignment along a known flow with
occlusion, FLUX's packed latents, the pipeline callback, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

ad = pytest.importorskip("attnkit.diffusion")
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,  # noqa: E402
                       FluxTransformer2DModel, UNet2DConditionModel)

from attnkit.diffusion import flow as fl  # noqa: E402
from attnkit.diffusion.latentwarp import LatentWarp, cross_frame_references  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def flux(dtype=torch.float64):
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  axes_dims_rope=[4, 4, 8]).to(dtype).eval()


def flux_inputs(batch=4, h=4, w=4, text=5, same=False):
    g = torch.Generator().manual_seed(1)
    n = 1 if same else batch
    x = torch.randn(n, h * w, 4, generator=g, dtype=torch.float64).expand(batch, -1, -1)
    ehs = torch.randn(1, text, 32, generator=g, dtype=torch.float64).expand(batch, -1, -1)  # one prompt for the clip
    pooled = torch.randn(1, 32, generator=g, dtype=torch.float64).expand(batch, -1)
    ids = torch.zeros(h, w, 3, dtype=torch.float64)
    ids[..., 1] = torch.arange(h, dtype=torch.float64)[:, None]
    ids[..., 2] = torch.arange(w, dtype=torch.float64)[None, :]
    return dict(hidden_states=x.contiguous(), encoder_hidden_states=ehs.contiguous(), pooled_projections=pooled.contiguous(),
                timestep=torch.full((batch,), 0.5, dtype=torch.float64), img_ids=ids.reshape(-1, 3),
                txt_ids=torch.zeros(text, 3, dtype=torch.float64), return_dict=False)


def unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=4).to(torch.float64).eval()


def unet_inputs(frames=4, chunks=2, same=False):
    """A clip of ``frames`` latents, run as classifier-free guidance does: [uncond frames, cond frames]."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1 if same else frames, 4, 8, 8, generator=g, dtype=torch.float64).expand(frames, -1, -1, -1)
    text = torch.randn(chunks, 1, 6, 16, generator=g, dtype=torch.float64).expand(-1, frames, -1, -1)
    return dict(sample=x.repeat(chunks, 1, 1, 1), timestep=torch.tensor(500),
                encoder_hidden_states=text.reshape(chunks * frames, 6, 16).contiguous(), return_dict=False)


def paper_refs(i, anchor, previous):
    """The paper's reference frames of frame i, written plainly (no repetition for frame 0)."""
    return [anchor] if not previous or i == 0 else list(dict.fromkeys([anchor, i - 1]))


def _run_written(model, inputs, written_for):
    originals = []
    for name, module in ad.attention_modules(model):
        proc = written_for(module)
        if proc is not None:
            originals.append((module, module.processor))
            module.set_processor(proc)
    try:
        return model(**inputs)[0]
    finally:
        for module, proc in originals:
            module.set_processor(proc)


def _cross_frame(q, k, v, frames, anchor, previous, scale):
    """Materialised softmax; row b (chunk c, frame i) attends to the keys / values of its chunk's
    reference frames, concatenated along the sequence. q / k / v [B, H, S, D]."""
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        c, i = divmod(b, frames)
        refs = [c * frames + r for r in paper_refs(i, anchor, previous)]
        kb, vb = torch.cat([k[r] for r in refs], 1), torch.cat([v[r] for r in refs], 1)
        out[b] = torch.softmax(q[b] @ kb.transpose(-1, -2) * scale, -1) @ vb
    return out


def reference_unet(model, inputs, frames, anchor, previous):
    class Written:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
            B, S, _ = hidden_states.shape
            q, k, v = (f(hidden_states).view(B, S, attn.heads, -1).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
            out = _cross_frame(q, k, v, frames, anchor, previous, attn.scale)
            return attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(B, S, -1)))

    return _run_written(model, inputs, lambda m: None if m.is_cross_attention else Written())


def reference_flux(model, inputs, frames, anchor, previous):
    from diffusers.models.embeddings import apply_rotary_emb

    rope = model.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"]]))
    text = inputs["encoder_hidden_states"].shape[1]

    class Written:
        def __init__(self, joint):
            self.joint = joint

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
            def heads(t):
                return t.unflatten(-1, (attn.heads, -1))

            q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
            q, k = attn.norm_q(q), attn.norm_k(k)
            if self.joint:
                eq, ek, ev = (heads(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
                q, k, v = torch.cat([attn.norm_added_q(eq), q], 1), torch.cat([attn.norm_added_k(ek), k], 1), torch.cat([ev, v], 1)
            q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            hidden = _cross_frame(q, k, v, frames, anchor, previous, 1 / math.sqrt(q.shape[-1])).transpose(1, 2).flatten(2, 3)
            if self.joint:
                e_out, hidden = hidden[:, :text], hidden[:, text:]
                return attn.to_out[1](attn.to_out[0](hidden)), attn.to_add_out(e_out)
            return hidden

    return _run_written(model, inputs, lambda m: Written(joint=m.added_kv_proj_dim is not None))


def test_references_are_the_anchor_and_the_previous_frame():
    assert cross_frame_references(4) == [(0, 0), (0, 0), (0, 1), (0, 2)]
    assert cross_frame_references(3, anchor=2) == [(2, 2), (2, 0), (2, 1)]
    assert cross_frame_references(3, previous=False) == [(0,), (0,), (0,)]


@pytest.mark.parametrize("options", [dict(), dict(anchor=2), dict(anchor=1, previous=False)])
def test_unet_cross_frame_attention_equals_the_written_out_reference(options):
    model, inputs = unet(), unet_inputs()
    with torch.no_grad():
        expected = reference_unet(model, inputs, 4, options.get("anchor", 0), options.get("previous", True))
        with ad.apply(model, "latentwarp", frames=4, chunks=2, **options) as handle:
            got = model(**inputs)[0]
        plain = model(**inputs)[0]
    assert handle.calls == 4  # the four self-attentions; cross-attention stays stock
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert (got - plain).abs().max() > 1e-6


@pytest.mark.parametrize("options", [dict(), dict(anchor=3)])
def test_flux_cross_frame_attention_equals_the_written_out_reference(options):
    model, inputs = flux(), flux_inputs()
    with torch.no_grad():
        expected = reference_flux(model, inputs, 4, options.get("anchor", 0), True)
        with ad.apply(model, "latentwarp", frames=4, **options):
            got = model(**inputs)[0]
        plain = model(**inputs)[0]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert (got - plain).abs().max() > 1e-4
    if not options:  # frame 0 attends to itself only (its own keys, repeated whole)
        torch.testing.assert_close(got[0], plain[0], rtol=1e-10, atol=1e-10)


def test_switched_off_is_bit_exact():
    model, inputs = unet(), unet_inputs()
    with torch.no_grad():
        plain = model(**inputs)[0]
        with ad.apply(model, "latentwarp", frames=4, chunks=2, steps=()) as handle:
            off = model(**inputs)[0]
        assert handle.calls == 0
        with ad.apply(model, "latentwarp", frames=4, chunks=2, blocks="down_blocks.0", steps=[1]) as handle:
            assert torch.equal(model(**inputs)[0], plain) and handle.calls == 0  # step 0: outside the schedule
            assert not torch.equal(model(**inputs)[0], plain) and handle.calls == 1  # step 1, one block
    assert torch.equal(off, plain)
    lw = LatentWarp(3, flow=torch.randn(2, 2, 8, 8, dtype=torch.float64), warp_steps=(2, 4))
    z = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    assert lw.align(z, 1) is z and lw.align(z, 4) is z and not torch.equal(lw.align(z, 2), z)


@pytest.mark.parametrize("options", [dict(), dict(anchor=2), dict(previous=False)])
def test_identical_frames_give_the_plain_output(options):
    # every reference of every frame is a copy of the frame itself, and a key set repeated whole
    # does not move a softmax mean: plain attention, on a UNet and on FLUX (whole sequences lent)
    with torch.no_grad():
        model, inputs = unet(), unet_inputs(same=True)
        plain = model(**inputs)[0]
        with ad.apply(model, "latentwarp", frames=4, chunks=2, **options):
            torch.testing.assert_close(model(**inputs)[0], plain, rtol=1e-10, atol=1e-10)
        model, inputs = flux(), flux_inputs(same=True)
        plain = model(**inputs)[0]
        with ad.apply(model, "latentwarp", frames=4, **options):
            torch.testing.assert_close(model(**inputs)[0], plain, rtol=1e-10, atol=1e-10)
    # with zero flow, identical latents are already aligned
    lw = LatentWarp(4, flow=torch.zeros(3, 2, 16, 16, dtype=torch.float64))
    z = torch.randn(1, 4, 8, 8, dtype=torch.float64).expand(4, -1, -1, -1)
    torch.testing.assert_close(lw.align(z), z, rtol=0, atol=1e-12)


def test_align_warps_each_frame_from_the_aligned_previous_one_outside_occlusion():
    g = torch.Generator().manual_seed(3)
    F_, h, w = 3, 8, 10
    # a source clip moving right by 8 pixels (1 latent cell) per frame: frame i(p) = frame i-1(p - 8)
    flow = torch.zeros(F_ - 1, 2, 8 * h, 8 * w, dtype=torch.float64)
    flow[:, 0] = -8.0
    occluded = torch.zeros(F_ - 1, 1, 8 * h, 8 * w, dtype=torch.bool)
    occluded[:, :, :, :8] = True  # the left column enters the frame: not in the previous one
    occluded[1, :, :16, 40:48] = True  # and a patch of frame 2 was hidden in frame 1
    z = torch.randn(F_, 4, h, w, generator=g, dtype=torch.float64)
    lw = LatentWarp(F_, flow=flow, occluded=occluded)
    out = lw.align(z)
    torch.testing.assert_close(out[0], z[0], rtol=0, atol=0)
    # frame 1 = frame 0 moved one cell right, its first column its own
    torch.testing.assert_close(out[1, :, :, 1:], z[0, :, :, :-1], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[1, :, :, :1], z[1, :, :, :1], rtol=0, atol=0)
    # frame 2 from the aligned frame 1 (so frame 0 moved two cells where both were visible)
    expected = torch.cat([z[2, :, :, :1], out[1, :, :, :-1]], -1)
    expected[:, :2, 5:6] = z[2, :, :2, 5:6]  # the hidden patch keeps frame 2's own latent
    torch.testing.assert_close(out[2], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(out[2, :, 2:, 2:], z[0, :, 2:, :-2], rtol=0, atol=1e-12)
    assert fl.warping_error(out, flow, occluded) < 1e-20 < fl.warping_error(z, flow, occluded)
    # from_video: the flows and occlusion of a source clip, estimated
    y, x = torch.meshgrid(torch.arange(16.0, dtype=torch.float64), torch.arange(16.0, dtype=torch.float64), indexing="ij")
    video = torch.stack([torch.sin((x - 2 * t) / 2.5)[None] * torch.cos(y / 3) for t in range(3)])
    lw = LatentWarp.from_video(video, warp_steps=(0, 1), flow_options=dict(iters=20))
    assert lw.frames == 3 and lw.flow.shape == (2, 2, 16, 16) and lw.occluded.shape == (2, 1, 16, 16)
    assert lw.warp_steps == range(0, 1) and (lw.flow[:, 0, 4:-4, 4:-4] + 2).abs().mean() < 0.2


def test_packed_flux_latents_are_unpacked_warped_and_packed_again():
    g = torch.Generator().manual_seed(4)
    F_, c, h, w = 3, 2, 8, 12  # a VAE latent [F, c, h, w], packed as (h/2)(w/2) tokens of 4c channels
    flow = fl.resize_flow(torch.randn(F_ - 1, 2, h, w, generator=g, dtype=torch.float64), (4 * h, 4 * w))
    lw = LatentWarp(F_, flow=flow)
    z = torch.randn(F_, c, h, w, generator=g, dtype=torch.float64)
    packed = z.view(F_, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(F_, h * w // 4, 4 * c)
    assert torch.equal(lw._unpack(packed), z) and torch.equal(lw._pack(z, packed.shape), packed)
    torch.testing.assert_close(lw._unpack(lw.align(packed)), lw.align(z), rtol=0, atol=0)


def test_callback_aligns_a_pipelines_latents_by_step():
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=flux(torch.float32))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    F_ = 3
    kw = dict(prompt_embeds=torch.randn(1, 8, 32, generator=g).expand(F_, -1, -1),
              pooled_prompt_embeds=torch.randn(1, 32, generator=g).expand(F_, -1), num_inference_steps=3, height=32,
              width=32, output_type="latent")
    flow = torch.zeros(F_ - 1, 2, 32, 32)
    flow[:, 0] = -2.0  # 2 pixels of the 32-pixel video: one token column of the 16 x 16 grid
    lw = LatentWarp(F_, flow=flow, warp_steps=[1])
    seen = []

    def spy(pipe_, step, t, kwargs):
        seen.append((step, kwargs["latents"].clone()))
        out = lw.callback(pipe_, step, t, kwargs)
        seen[-1] += (out["latents"],)
        return out

    with ad.apply(pipe, lw):
        latents = pipe(**kw, generator=torch.Generator().manual_seed(1), callback_on_step_end=spy,
                       callback_on_step_end_tensor_inputs=["latents"]).images
    assert [s for s, *_ in seen] == [0, 1, 2]
    assert torch.equal(seen[1][1], seen[1][2]) and torch.equal(seen[2][1], seen[2][2])  # steps 2, 3: not aligned
    aligned = lw._unpack(seen[0][2])
    torch.testing.assert_close(aligned[1:, :, :, 2:], aligned[:-1, :, :, :-2], rtol=0, atol=1e-6)  # moved 2 latent px
    assert latents.shape == seen[0][1].shape


def test_bad_input_is_refused_clearly():
    model, inputs = unet(), unet_inputs()
    with torch.no_grad(), ad.apply(model, "latentwarp", frames=3, chunks=2):
        with pytest.raises(ValueError, match=r"built for a clip of frames=3 but the attention call has 8 rows with "
                                             r"chunks=2 \(4 frames per chunk\); accepted: a batch of frames \* chunks = 6"):
            model(**inputs)
    cases = [
        (dict(frames=0), "frames must be an integer >= 1"),
        (dict(frames=4, anchor=4), r"anchor=4 is outside the clip of 4 frames; accepted: 0 .. 3"),
        (dict(frames=4, anchor=-1), "anchor=-1 is outside the clip"),
        (dict(frames=4, chunks=0), "chunks must be an integer >= 1"),
        (dict(frames=4, flow=torch.zeros(4, 2, 8, 8)), r"flow must be a floating tensor \[F - 1, 2, H, W\] = \[3, 2, H, W\]"),
        (dict(frames=4, flow=torch.zeros(3, 1, 8, 8)), r"flow must be a floating tensor"),
        (dict(frames=4, flow=torch.zeros(3, 2, 8, 8), occluded=torch.zeros(3, 1, 4, 4, dtype=torch.bool)),
         r"occluded must be a boolean tensor \[F - 1, 1, H, W\] = \[3, 1, 8, 8\]"),
        (dict(frames=4, occluded=torch.zeros(3, 1, 8, 8, dtype=torch.bool)), "occluded was given without flow"),
        (dict(frames=4, warp_steps=(3, 1)), r"steps=\(start, stop\) needs"),
    ]
    for options, match in cases:
        with pytest.raises(ValueError, match=match):
            LatentWarp(**options)
    lw = LatentWarp(4, flow=torch.zeros(3, 2, 16, 16))
    with pytest.raises(ValueError, match=r"latents hold 3 frames but LatentWarp was built for frames=4"):
        lw.align(torch.zeros(3, 4, 8, 8))
    with pytest.raises(ValueError, match=r"latents must be \[F, C, h, w\] or packed \[F, N, C\]"):
        lw.align(torch.zeros(4, 8))
    with pytest.raises(ValueError, match="packed latents of 15 tokens do not form a grid"):
        lw.align(torch.zeros(4, 15, 4))
    with pytest.raises(ValueError, match="callback needs the latents"):
        lw.callback(None, 0, 0, {})
    with pytest.raises(ValueError, match=r"does not take option\(s\) \['frame'\]"):
        ad.build("latentwarp", frame=3)
