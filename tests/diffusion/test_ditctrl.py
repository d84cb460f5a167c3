"""DiTCtrl (arXiv 2412.18597) on a tiny random CogVideoX: mask-guided KV sharing against a float64
reference written out with a materialised softmax and the masks as explicit key sets, switch-off
bit for bit, the object masks, latent blending's weights and windows, the multi-prompt sampler
against a hand-written loop, bad input."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

ad = pytest.importorskip("attnkit.diffusion")
from diffusers import CogVideoXDDIMScheduler, CogVideoXTransformer3DModel  # noqa: E402
from diffusers.models.embeddings import apply_rotary_emb  # noqa: E402

from attnkit.diffusion import ditctrl as dc  # noqa: E402
from attnkit.diffusion.ditctrl import DiTCtrl  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

GRID = (2, 4, 4)  # (f, h, w) of the video tokens: 2 latent frames of 8 x 8, 2 x 2 patches
N, L = 32, 8


def cogvideox():
    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                       time_embed_dim=2, text_embed_dim=8, num_layers=2, sample_width=8,
                                       sample_height=8, sample_frames=8, patch_size=2, temporal_compression_ratio=4,
                                       max_text_seq_length=8, use_rotary_positional_embeddings=True).double().eval()


def inputs(model, batch=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    rope = tuple(r.double() for r in dc.rotary_embedding(model, 2, 8, 8))
    return dict(hidden_states=torch.randn(batch, 2, 4, 8, 8, generator=g, dtype=torch.float64),
                encoder_hidden_states=torch.randn(batch, L, 8, generator=g, dtype=torch.float64),
                timestep=torch.full((batch,), 500), image_rotary_emb=rope, return_dict=False)


def written_mask(avg, tokens, threshold):
    """The object's tokens written out: per frame, (a - min) / (max - min + 1e-6) >= threshold."""
    a = avg[:, list(tokens)].sum(-1).reshape(GRID[0], -1)
    out = torch.zeros_like(a, dtype=torch.bool)
    for f in range(GRID[0]):
        lo, hi = a[f].min(), a[f].max()
        out[f] = (a[f] - lo) / (hi - lo + 1e-6) >= threshold
    return out.reshape(-1)


def written(model, inp, *, chunks=1, share=(0, 1), tokens=None, masks=None, threshold=0.3):
    """DiTCtrl written out in float64 on the model's own layers: each block's full attention matrix
    materialised; the video-to-text maps of the last group's rows averaged over heads and over the
    blocks so far; a target row's query i attends to the source row's keys j in an explicit set
    (every key; or, mask-guided, the text keys and the video keys whose source-mask value equals the
    target-mask value at i, text queries every key)."""
    state = {"sum": None, "count": 0}

    class Written:
        def __init__(self, index):
            self.index = index

        def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
            x = torch.cat([encoder_hidden_states, hidden_states], 1)
            B = x.shape[0]
            q, k, v = (f(x).unflatten(-1, (attn.heads, -1)).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
            q, k = attn.norm_q(q), attn.norm_k(k)
            q = torch.cat([q[:, :, :L], apply_rotary_emb(q[:, :, L:], image_rotary_emb)], 2)
            k = torch.cat([k[:, :, :L], apply_rotary_emb(k[:, :, L:], image_rotary_emb)], 2)
            s = 1 / math.sqrt(q.shape[-1])
            probs = torch.softmax(q @ k.transpose(-1, -2) * s, -1)  # [B, H, S, S]
            n = B // chunks
            last = list(range(B - n, B))
            if tokens is not None:
                m = probs[last][:, :, L:, :L].mean(1)  # [n, N, L]
                state["sum"] = m if state["sum"] is None else state["sum"] + m
                state["count"] += 1
            out = probs @ v
            if self.index in share:
                for c in range(chunks):
                    for j in range(1, n):
                        b, r = c * n + j, c * n + j - 1
                        allowed = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool)
                        if tokens is not None or masks is not None:
                            if masks is not None:
                                ms, mt = masks
                            else:
                                avg = state["sum"] / state["count"]
                                ms, mt = written_mask(avg[j - 1], tokens[0], threshold), written_mask(avg[j], tokens[1],
                                                                                                     threshold)
                            for i in range(N):
                                allowed[L + i, L:] = ms == mt[i]
                        logits = (q[b] @ k[r].transpose(-1, -2) * s).masked_fill(~allowed, float("-inf"))
                        out[b] = torch.softmax(logits, -1) @ v[r]
            out = attn.to_out[0](out.transpose(1, 2).flatten(2))
            return out[:, L:], out[:, :L]

    originals = []
    for i, (_, module) in enumerate(ad.attention_modules(model)):
        originals.append((module, module.processor))
        module.set_processor(Written(i))
    try:
        return model(**inp)[0]
    finally:
        for module, proc in originals:
            module.set_processor(proc)


SOURCE = torch.zeros(GRID, dtype=torch.bool)
SOURCE[:, 1:3, 0:2] = True
TARGET = torch.zeros(GRID, dtype=torch.bool)
TARGET[:, 2:4, 1:4] = True


@pytest.mark.parametrize("options, expected", [
    (dict(), dict()),  # plain KV sharing
    (dict(source_tokens=[1], target_tokens=[2, 3]), dict(tokens=([1], [2, 3]))),
    (dict(source_tokens=0, target_tokens=0, threshold=0.6, blocks="transformer_blocks.1"),
     dict(tokens=([0], [0]), threshold=0.6, share=(1,))),
    (dict(source_mask=SOURCE, target_mask=TARGET.reshape(-1)), dict(masks=(SOURCE.reshape(-1), TARGET.reshape(-1)))),
])
def test_ditctrl_equals_the_written_out_reference(options, expected):
    model = cogvideox()
    inp = inputs(model)
    with torch.no_grad():
        want = written(model, inp, **expected)
        with ad.apply(model, DiTCtrl(**options)) as handle:
            got = model(**inp)[0]
        plain = model(**inp)[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[0], plain[0], rtol=1e-12, atol=1e-12)  # the source row attends as the stock model
    assert (got[1] - plain[1]).abs().max() > 1e-4 and handle.calls == 2


def test_ditctrl_with_guidance_halves_and_a_chain_equals_the_written_out_reference():
    # [uncond s, uncond t, cond s, cond t]: the conditional rows' maps make both halves' masks;
    # a group of three rows is a chain (row 2 the target of row 1)
    model = cogvideox()
    for batch, chunks in ((4, 2), (3, 1)):
        inp = inputs(model, batch=batch, seed=5)
        with torch.no_grad():
            want = written(model, inp, chunks=chunks, tokens=([1], [1]), threshold=0.5)
            with ad.apply(model, DiTCtrl(source_tokens=1, target_tokens=1, threshold=0.5, chunks=chunks)):
                got = model(**inp)[0]
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_ditctrl_switched_off_is_the_stock_model_bit_for_bit():
    model = cogvideox()
    inp = inputs(model)
    with torch.no_grad():
        plain = model(**inp)[0]
        for method in (DiTCtrl(steps=frozenset()), DiTCtrl(source_tokens=1, target_tokens=2, steps=(1, 5)),
                       DiTCtrl(calls_per_step=2, steps=(1, 3))):  # call 0 is sampling step 0: off
            with ad.apply(model, method) as handle:
                assert torch.equal(model(**inp)[0], plain)
            assert handle.calls == 0
        # sharing in block 1 only, maps in every block: block 0 runs the stock attention (close, the
        # same maths through attnkit's processor) and only the target row moves
        with ad.apply(model, DiTCtrl(source_tokens=1, target_tokens=2, blocks="transformer_blocks.1")) as handle:
            out = model(**inp)[0]
        assert handle.calls == 2 and (out[1] - plain[1]).abs().max() > 1e-4
        torch.testing.assert_close(out[0], plain[0], rtol=1e-12, atol=1e-12)
        with ad.apply(model, DiTCtrl(steps=(1, 5))):  # the handle counts steps: the second call shares
            assert torch.equal(model(**inp)[0], plain)
            assert not torch.equal(model(**inp)[0], plain)
    for _, module in ad.attention_modules(model):  # remove() restored the processors
        assert type(module.processor).__name__ == "CogVideoXAttnProcessor2_0"


def test_object_mask_covers_exactly_the_thresholded_normalised_map():
    g = torch.Generator().manual_seed(0)
    avg = torch.rand(N, L, generator=g, dtype=torch.float64)
    for tokens, threshold in (([1], 0.3), ([0, 4], 0.5), ([7], 0.0), ([2], 1.0)):
        mask = dc.object_mask(avg, tokens, GRID, threshold)
        assert mask.dtype == torch.bool and torch.equal(mask, written_mask(avg, tokens, threshold))
    # a planted object: the token's attention high on a 2 x 2 square in each frame, low elsewhere
    planted = torch.full((2, 4, 4), 0.01, dtype=torch.float64)
    planted[0, 0:2, 0:2] = planted[1, 2:4, 2:4] = 0.5
    avg = torch.zeros(N, L, dtype=torch.float64)
    avg[:, 3] = planted.reshape(-1)
    assert torch.equal(dc.object_mask(avg, [3], GRID, 0.3), planted.reshape(-1) > 0.1)
    assert int(dc.object_mask(avg, [3], GRID, 0.3).sum()) == 8  # 4 tokens a frame, nothing else
    # the map is the model's own softmax over every key: text and video columns sum to one
    q, k = torch.randn(2, 2, L + N, 16, generator=g, dtype=torch.float64), torch.randn(2, 2, L + N, 16, generator=g,
                                                                                        dtype=torch.float64)
    probs = torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1)
    torch.testing.assert_close(dc.cross_attention_map(q, k, L, 0.25), probs[:, :, L:, :L].mean(1), rtol=1e-12,
                               atol=1e-12)


def test_mask_guided_sharing_reads_only_the_keys_its_masks_claim():
    # with given masks, the target's foreground video queries read only the source's text and
    # foreground video keys, its background queries only the text and background ones: moving the
    # source's background keys and values moves the background queries (and the text queries, which
    # read every key) and leaves the foreground queries as they were; and the other way round
    model = cogvideox()
    calls = []

    class Capture(DiTCtrl):
        def attend(self, call):
            calls.append(call)
            return super().attend(call)

    method = Capture(source_mask=SOURCE, target_mask=TARGET, blocks=0)
    fg_q, bg_q = L + TARGET.reshape(-1).nonzero().squeeze(1), L + (~TARGET).reshape(-1).nonzero().squeeze(1)
    with torch.no_grad(), ad.apply(model, method):
        model(**inputs(model))
        call = calls[0]
        out = method.attend(call)
        for region, kept, moved in ((~SOURCE, fg_q, bg_q), (SOURCE, bg_q, fg_q)):
            keys = L + region.reshape(-1).nonzero().squeeze(1)
            k, v = call.k.clone(), call.v.clone()
            k[0, :, keys] += 1.0
            v[0, :, keys] -= 2.0
            changed = method.attend(dataclasses.replace(call, k=k, v=v))
            torch.testing.assert_close(changed[1][:, kept], out[1][:, kept], rtol=1e-13, atol=1e-13)
            assert (changed[1][:, moved] - out[1][:, moved]).abs().amin(-1).amin(0).min() > 1e-8  # every such query
            assert (changed[1][:, :L] - out[1][:, :L]).abs().max() > 1e-6


# -- latent blending -------------------------------------------------------------------------------------


def test_blend_weights_windows_and_reproduction_away_from_overlaps():
    w = dc.blend_weights(6)
    torch.testing.assert_close(w, torch.tensor([1, 3, 5, 5, 3, 1], dtype=torch.float64) / 6)
    assert torch.equal(w, w.flip(0))
    windows = dc.segment_windows(3, 6, 2)
    assert [list(r) for r in windows] == [list(range(0, 6)), list(range(4, 10)), list(range(8, 14))]
    assert dc.video_length(3, 6, 2) == 14 and dc.video_length(1, 13, 9) == 13 and dc.video_length(5, 13, 9) == 29
    # the normalised weights of every frame sum to one: blending ones gives ones
    ones = [torch.ones(6, 3, dtype=torch.float64) for _ in windows]
    torch.testing.assert_close(dc.blend(ones, windows, 14), torch.ones(14, 3, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    outs = [torch.randn(6, 3, generator=g, dtype=torch.float64) for _ in windows]
    blended = dc.blend(outs, windows, 14)
    only = {0: [0, 1, 2, 3], 1: [6, 7], 2: [10, 11, 12, 13]}  # frames covered by one window
    for k, frames in only.items():
        torch.testing.assert_close(blended[frames], outs[k][[f - windows[k].start for f in frames]], rtol=1e-14,
                                   atol=1e-14)
    # an overlap frame is the weighted mean of its two windows' outputs
    wk = dc.blend_weights(6)
    expected = (wk[4] * outs[0][4] + wk[0] * outs[1][0]) / (wk[4] + wk[0])
    torch.testing.assert_close(blended[4], expected, rtol=1e-14, atol=1e-14)
    # the sampler's pairwise form (as the official sampler): a middle window comes twice (target of
    # one pair, source of the next), frame dim 1; away from overlaps still each window's own output,
    # on an overlap the middle window counts twice
    pair_outs = [outs[0], outs[1], outs[1], outs[2]]
    pair_windows = [windows[0], windows[1], windows[1], windows[2]]
    paired = dc.blend([o[None] for o in pair_outs], pair_windows, 14, dim=1)[0]
    for k, frames in only.items():
        torch.testing.assert_close(paired[frames], blended[frames], rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(paired[4], (wk[4] * outs[0][4] + 2 * wk[0] * outs[1][0]) / (wk[4] + 2 * wk[0]),
                               rtol=1e-14, atol=1e-14)


def test_blending_outputs_before_the_step_equals_blending_the_stepped_windows():
    # the deviation the docs state: the official sampler blends each window's denoised estimate;
    # here the outputs are blended before one scheduler step on the shared long latent. CogVideoX's
    # DDIM step is affine in the output given the latent, and the weights sum to one: the same
    scheduler = CogVideoXDDIMScheduler()
    scheduler.set_timesteps(4)
    t = scheduler.timesteps[1]
    g = torch.Generator().manual_seed(2)
    windows = dc.segment_windows(3, 3, 1)
    x = torch.randn(1, 7, 2, 4, 4, generator=g, dtype=torch.float64)
    outs = [torch.randn(1, 3, 2, 4, 4, generator=g, dtype=torch.float64) for _ in windows]
    blended_then_stepped = scheduler.step(dc.blend(outs, windows, 7, dim=1), t, x, return_dict=False)[0]
    stepped = [scheduler.step(o, t, x[:, w], return_dict=False)[0] for o, w in zip(outs, windows)]
    torch.testing.assert_close(blended_then_stepped, dc.blend(stepped, windows, 7, dim=1), rtol=1e-12, atol=1e-12)


def test_segment_prompts_interpolate_between_prompts():
    a, b, c = (torch.full((2, 3), v, dtype=torch.float64) for v in (0.0, 3.0, 9.0))
    assert [float(e[0, 0]) for e in dc.segment_prompts([a, b])] == [0.0, 3.0]
    assert [float(e[0, 0]) for e in dc.segment_prompts([a, b, c], transitions=2)] == pytest.approx([0, 1, 2, 3, 5, 7, 9])
    assert [float(e[0, 0]) for e in dc.segment_prompts(torch.stack([a, b, c]), longer_mid=1)] == [0.0, 3.0, 3.0, 9.0]


def _hand_loop(model, scheduler, prompt, negative, latents, steps, guidance):
    """The stock CogVideoX sampling loop on one window (diffusers' pipeline loop, written out)."""
    scheduler.set_timesteps(steps)
    rope = tuple(r.double() for r in dc.rotary_embedding(model, latents.shape[1], 8, 8))
    x = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([x, x]), t)
        out = model(hidden_states=inp, encoder_hidden_states=torch.stack([negative, prompt]), timestep=t.expand(2),
                    image_rotary_emb=rope, return_dict=False)[0]
        u, c = out.chunk(2)
        x = scheduler.step(u + guidance * (c - u), t, x, return_dict=False)[0]
    return x


def test_sample_multi_prompt_one_prompt_is_the_stock_loop_and_blending_runs_pairs():
    model = cogvideox()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randn(L, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    negative = torch.zeros(L, 8, dtype=torch.float64)
    noise = torch.randn(1, 2, 4, 8, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        want = _hand_loop(model, CogVideoXDDIMScheduler(), prompts[0], negative, noise, 2, 6.0)
    got = dc.sample_multi_prompt(model, CogVideoXDDIMScheduler(), prompts[:1], noise, frames=2, overlap=1,
                                 num_inference_steps=2, negative_prompt_embeds=negative)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # three prompts on 4 frames (windows 0-1, 1-2, 2-3): sharing switched off is the stock run bit for
    # bit, and DiTCtrl moves only what follows the first window's stock frames
    noise = torch.randn(1, 4, 4, 8, 8, generator=g, dtype=torch.float64)
    run = dict(frames=2, overlap=1, num_inference_steps=2, negative_prompt_embeds=negative)
    stock = dc.sample_multi_prompt(model, CogVideoXDDIMScheduler(), prompts, noise, **run)
    off = dc.sample_multi_prompt(model, CogVideoXDDIMScheduler(), prompts, noise, **run,
                                 method=DiTCtrl(chunks=2, steps=frozenset()))
    assert torch.equal(off, stock)
    method = DiTCtrl(chunks=2, source_tokens=0, target_tokens=0)
    shared = dc.sample_multi_prompt(model, CogVideoXDDIMScheduler(), prompts, noise, **run, method=method)
    assert method.calls_per_step == 2 and (shared - stock).abs().max() > 1e-6
    for _, module in ad.attention_modules(model):
        assert type(module.processor).__name__ == "CogVideoXAttnProcessor2_0"


# -- registry and bad input --------------------------------------------------------------------------------


def test_registered_with_a_card():
    assert ad.METHODS["ditctrl"] is DiTCtrl and ad.DiTCtrl is DiTCtrl
    card = next(c for c in ad.CARDS if c.name == "ditctrl")
    assert card.arxiv == "2412.18597" and isinstance(ad.build("ditctrl", **card.defaults), DiTCtrl)


@pytest.mark.parametrize("options, words", [
    (dict(source_tokens=[1]), ["target_tokens", "target_mask"]),
    (dict(target_mask=TARGET), ["source_tokens", "source_mask"]),
    (dict(source_tokens=[1], source_mask=SOURCE, target_tokens=[1]), ["source_tokens", "source_mask"]),
    (dict(source_tokens=[], target_tokens=[1]), ["source_tokens", "[]"]),
    (dict(source_tokens=[-1], target_tokens=[1]), ["source_tokens", ">= 0"]),
    (dict(source_mask=SOURCE.float(), target_mask=TARGET), ["source_mask", "boolean", "[f, h, w]"]),
    (dict(threshold=1.5), ["threshold", "[0, 1]", "1.5"]),
    (dict(chunks=0), ["chunks", ">= 1"]),
    (dict(calls_per_step=True), ["calls_per_step", ">= 1"]),
    (dict(blocks=[]), ["blocks", "empty"]),
    (dict(map_blocks=[2.5]), ["map_blocks", "2.5"]),
])
def test_bad_options_raise_clear_errors(options, words):
    with pytest.raises(ValueError) as err:
        DiTCtrl(**options)
    for word in words:
        assert word in str(err.value)


def test_bad_input_at_the_model_raises_clear_errors():
    model = cogvideox()
    inp = inputs(model)
    cases = [
        (DiTCtrl(source_mask=torch.ones(7, dtype=torch.bool), target_mask=TARGET), ["source_mask", "(7,)", "[32]",
                                                                                    "[2, 4, 4]"]),
        (DiTCtrl(source_mask=SOURCE, target_mask=torch.ones(2, 2, 8, dtype=torch.bool)), ["target_mask", "(2, 2, 8)"]),
        (DiTCtrl(source_tokens=[8], target_tokens=[0]), ["source_tokens", "8 text tokens", "0 .. 7"]),
        (DiTCtrl(source_tokens=0, target_tokens=0, map_blocks=1, blocks=0), ["map_blocks=1", "no cross-attention map"]),
    ]
    for method, words in cases:
        with pytest.raises(ValueError) as err, torch.no_grad(), ad.apply(model, method):
            model(**inp)
        for word in words:
            assert word in str(err.value)
    for method, words in ((DiTCtrl(blocks="single_transformer_blocks"), ["blocks", "transformer_blocks.0"]),
                          (DiTCtrl(blocks=5), ["block index 5", "0 .. 1"]),
                          (DiTCtrl(source_tokens=0, target_tokens=0, map_blocks="down_blocks"), ["map_blocks",
                                                                                                  "down_blocks"])):
        with pytest.raises(ValueError) as err:
            ad.apply(model, method)
        for word in words:
            assert word in str(err.value)
    with pytest.raises(ValueError, match="does not take option.*colour.*accepted: .*source_tokens"):
        ad.build("ditctrl", colour=1)


def test_bad_input_to_the_blending_and_the_sampler_raises_clear_errors():
    for call, words in (
        (lambda: dc.segment_windows(3, 4, 4), ["overlap=4", "0 .. frames - 1 = 3"]),
        (lambda: dc.segment_windows(3, 4, -1), ["overlap=-1"]),
        (lambda: dc.segment_windows(0, 4, 1), ["segments", ">= 1"]),
        (lambda: dc.blend_weights(0), ["frames", ">= 1"]),
        (lambda: dc.blend([torch.ones(3, 2)], [range(0, 2)], 4), ["3 frames", "window 0..1"]),
        (lambda: dc.blend([torch.ones(2, 2)], [range(0, 2)], 4), ["frames [2, 3]", "no window"]),
        (lambda: dc.segment_prompts([torch.ones(2, 3), torch.ones(2, 4)]), ["prompt_embeds", "(2, 3)", "(2, 4)"]),
        (lambda: dc.segment_prompts([torch.ones(2, 3)], transitions=-1), ["transitions", ">= 0"]),
    ):
        with pytest.raises(ValueError) as err:
            call()
        for word in words:
            assert word in str(err.value)
    model = cogvideox()
    prompts = [torch.zeros(L, 8, dtype=torch.float64)] * 2
    for kwargs, words in (
        (dict(latents=torch.zeros(1, 4, 4, 8, 8, dtype=torch.float64)), ["latents", "T = 3", "(1, 4, 4, 8, 8)"]),
        (dict(latents=torch.zeros(1, 3, 4, 8, 8, dtype=torch.float64), method=DiTCtrl()), ["chunks=1", "chunks=2"]),
        (dict(latents=torch.zeros(1, 3, 4, 8, 8, dtype=torch.float64), overlap=2), ["overlap=2"]),
        (dict(latents=torch.zeros(1, 3, 4, 8, 8, dtype=torch.float64), method="ditctrl"), ["method", "str"]),
    ):
        kwargs = {"overlap": 1, **kwargs}
        with pytest.raises(ValueError) as err:
            dc.sample_multi_prompt(model, CogVideoXDDIMScheduler(), prompts, frames=2, num_inference_steps=1,
                                   negative_prompt_embeds=prompts[0], **kwargs)
        for word in words:
            assert word in str(err.value)
