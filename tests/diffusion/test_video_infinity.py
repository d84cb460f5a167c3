"""Video-Infinity: clip parallelism over gloo ranks equals the single-process run (clips as batch
rows), both equal a float64 reference of dual-scope attention written out (a materialised softmax
over each query's own-clip, neighbour and global keys), switched off it is the clips run on their
own, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

ad = pytest.importorskip("attnkit.diffusion")
from diffusers import UNet2DConditionModel, UNet3DConditionModel  # noqa: E402

from attnkit.diffusion.sharing import Sharing  # noqa: E402
from attnkit.diffusion.video_infinity import (VideoInfinity, denoise, gather_frames, merge_clips,  # noqa: E402
                                              shard_frames, split_clips)
from attnkit.distributed import spawn  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

TIMESTEP = 500


def unet3d():
    torch.manual_seed(0)
    model = UNet3DConditionModel(sample_size=4, in_channels=4, out_channels=4, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                 up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=16,
                                 attention_head_dim=4, norm_num_groups=4).to(torch.float64).eval()
    with torch.no_grad():  # the temporal convolutions' last layers start at zero (identity): give them weights
        for name, p in model.named_parameters():
            if "conv4" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model


def video(frames, chunks=2):
    """Latents of the whole video ``[chunks, 4, frames, 4, 4]`` and text ``[chunks, 5, 16]``."""
    g = torch.Generator().manual_seed(3)
    return (torch.randn(chunks, 4, frames, 4, 4, generator=g, dtype=torch.float64),
            torch.randn(chunks, 5, 16, generator=g, dtype=torch.float64))


class DualScopeReference(Sharing):
    """Dual-scope attention written out, float64, one process with every clip in the batch: for
    each query frame t of clip c, the list of key frames (video indices, with repeats), then a
    materialised softmax."""

    def __init__(self, frames, clips, local, window, global_stride, bias, chunks):
        super().__init__()
        self.frames, self.clips, self.local, self.window = frames, clips, local, window
        self.stride, self.bias, self.chunks = global_stride, bias, chunks

    def bind(self, handle):
        self._indices = {i for i, n in enumerate(handle.names)
                         if any(part in ("temp_attentions", "transformer_in", "motion_modules") for part in n.split("."))}

    def keys_of(self, t):
        F, p, c = self.frames // self.clips, self.local, t // (self.frames // self.clips)
        local = [u for u in range(c * F - p, c * F + F + p) if 0 <= u < self.frames
                 and (self.window is None or abs(u - t) <= self.window)]
        glob = [] if self.stride is None else list(range(0, self.frames, self.stride))
        return local, glob

    def attend(self, call):
        q, k, v = (x.to(torch.float64) for x in (call.q, call.k, call.v))
        F = q.shape[2]
        R = call.batch // (self.chunks * self.clips)
        # rows [chunk][clip][pixel] -> the whole video per (chunk, pixel): [C, R, H, T, D]
        whole = [x.reshape(self.chunks, self.clips, R, x.shape[1], F, x.shape[3]).permute(0, 2, 3, 1, 4, 5)
                 .flatten(3, 4) for x in (q, k, v)]
        qw, kw, vw = whole
        out = torch.empty_like(qw)
        for t in range(self.frames):
            local, glob = self.keys_of(t)
            idx = torch.tensor(local + glob)
            logits = torch.einsum("crhd,crhsd->crhs", qw[..., t, :], kw[..., idx, :]) * call.scale
            if self.bias is not None and glob:
                sign = 1.0 if TIMESTEP >= self.bias[0] else -1.0
                logits[..., len(local):] += sign * self.bias[1]
            weights = torch.softmax(logits, dim=-1)
            out[..., t, :] = torch.einsum("crhs,crhsd->crhd", weights, vw[..., idx, :])
        out = out.unflatten(3, (self.clips, F)).permute(0, 3, 1, 2, 4, 5)  # [C, clips, R, H, F, D]
        return out.reshape(call.batch, q.shape[1], F, q.shape[3]).to(call.q.dtype)


# each: frames per rank's share = 4 * world; (clips per video, local, window, global_stride, bias)
CONFIGS = [
    dict(clips_per_rank=1, local=1, window=None, global_stride=3, bias=None, conv_context=2),
    dict(clips_per_rank=1, local=2, window=2, global_stride=5, bias=(400.0, 3.0), conv_context=0),
    dict(clips_per_rank=1, local=3, window=1, global_stride=None, bias=None, conv_context=0),
    dict(clips_per_rank=2, local=1, window=None, global_stride=3, bias=(600.0, 2.0), conv_context=1),
    dict(clips_per_rank=1, local=0, window=None, global_stride=None, bias=None, conv_context=0),  # switched off
]


def build(world, cfg, group=None):
    frames = 4 * world
    return VideoInfinity(frames, cfg["clips_per_rank"] * world, local=cfg["local"], window=cfg["window"],
                         global_stride=cfg["global_stride"], bias=cfg["bias"], conv_context=cfg["conv_context"],
                         chunks=2, group=group)


def _worker(rank, world, configs):
    """On each gloo rank: this rank's clips of the video through the denoiser with clip
    parallelism, the outputs gathered into the whole video."""
    model = unet3d()
    outs = []
    for cfg in configs:
        method = build(world, cfg, group="world")
        x, text = video(method.frames)
        with torch.no_grad():
            mine = denoise(model, shard_frames(x, method), torch.tensor(TIMESTEP), text, method)
        outs.append(gather_frames(mine, method))
    return outs


def single(model, method):
    x, text = video(method.frames)
    with torch.no_grad():
        return denoise(model, x, torch.tensor(TIMESTEP), text, method)


def conv_reference(module, clips, c):
    """``TemporalConvLayer.forward`` written out with ``c`` frames of context: the whole video
    zero-padded by c frames at its ends, each clip's frames and c on each side convolved, cropped."""

    def forward(hidden_states, num_frames=1):
        F = num_frames
        BF, Ch, h, w = hidden_states.shape
        x = hidden_states.reshape(BF // F, F, Ch, h, w).permute(0, 2, 1, 3, 4)
        whole = torch.nn.functional.pad(merge_clips(x, clips), (0, 0, 0, 0, c, c))  # [chunks, Ch, c + T + c, h, w]
        convs = [module.conv4(module.conv3(module.conv2(module.conv1(whole[:, :, k * F:k * F + F + 2 * c]))))
                 [:, :, c:c + F] for k in range(clips)]
        out = x + split_clips(torch.cat(convs, dim=2), clips)
        return out.permute(0, 2, 1, 3, 4).reshape(BF, Ch, h, w)

    return forward


def reference(model, method):
    x, text = video(method.frames)
    ref = DualScopeReference(method.frames, method.clips, method.local, method.window, method.global_stride,
                             method.bias, method.chunks)
    convs = [m for m in model.modules() if type(m).__name__ == "TemporalConvLayer"] if method.conv_context else []
    for m in convs:
        m.forward = conv_reference(m, method.clips, method.conv_context)
    try:
        with torch.no_grad(), ad.apply(model, ref):
            out = model(split_clips(x, method.clips), torch.tensor(TIMESTEP),
                        text.repeat_interleave(method.clips, dim=0), return_dict=False)[0]
    finally:
        for m in convs:
            del m.forward
    return merge_clips(out, method.clips)


def independent(model, frames, clips):
    """The stock denoiser on each clip alone."""
    x, text = video(frames)
    F = frames // clips
    with torch.no_grad():
        return torch.cat([model(x[:, :, c * F:(c + 1) * F], torch.tensor(TIMESTEP), text, return_dict=False)[0]
                          for c in range(clips)], dim=2)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_equal_single_process_and_the_float64_reference(world):
    configs = CONFIGS if world == 2 else CONFIGS[:1]  # 3 ranks: one configuration (the processes cost most)
    ranks = spawn(world, _worker, configs)
    model = unet3d()
    for i, cfg in enumerate(configs):
        method = build(world, cfg)
        one = single(model, method)
        for r in range(world):  # every rank holds the same whole video after the gather
            assert torch.allclose(ranks[r][i], one, atol=1e-10, rtol=0), (cfg, r, (ranks[r][i] - one).abs().max())
        ref = reference(model, method)
        assert torch.allclose(one, ref, atol=1e-10, rtol=0), (cfg, (one - ref).abs().max())
        if cfg["local"] == 0 and cfg["global_stride"] is None and not cfg["conv_context"]:
            alone = independent(model, method.frames, method.clips)
            assert torch.allclose(one, alone, atol=1e-10, rtol=0)
        else:  # the context changes the output: the clips do not run on their own
            assert (one - independent(model, method.frames, method.clips)).abs().max() > 1e-4


def test_switched_off_is_the_stock_model_bit_for_bit_and_remove_restores():
    model = unet3d()
    method = VideoInfinity(8, 2, local=0, chunks=2)
    x, text = video(8)
    clips, texts = split_clips(x, 2), text.repeat_interleave(2, dim=0)
    with torch.no_grad():
        stock = model(clips, torch.tensor(TIMESTEP), texts, return_dict=False)[0]
        with ad.apply(model, method) as handle:
            off = model(clips, torch.tensor(TIMESTEP), texts, return_dict=False)[0]
        assert handle.calls == 10  # attn1 and attn2 of the 5 temporal transformers (transformer_in and 4 temp_attentions)
        assert torch.equal(off, stock)
        on = denoise(model, x, torch.tensor(TIMESTEP), text,
                     VideoInfinity(8, 2, local=1, global_stride=2, conv_context=2, chunks=2))
        after = model(clips, torch.tensor(TIMESTEP), texts, return_dict=False)[0]
    assert torch.equal(after, stock)  # the processors, the batch hook and the convolutions' wrappers are gone
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not model._forward_pre_hooks
    assert not torch.allclose(merge_clips(stock, 2), on)


def test_blocks_default_to_the_temporal_modules_and_a_block_subset_acts_only_there():
    model = unet3d()
    method = VideoInfinity(8, 2, local=1, global_stride=3, chunks=2, blocks="mid_block.temp_attentions")
    with ad.apply(model, method) as handle:
        assert sorted(handle.names[i] for i in method._indices) == [
            "mid_block.temp_attentions.0.transformer_blocks.0.attn1",
            "mid_block.temp_attentions.0.transformer_blocks.0.attn2"]
        x, text = video(8)
        with torch.no_grad():
            model(split_clips(x, 2), torch.tensor(TIMESTEP), text.repeat_interleave(2, dim=0), return_dict=False)
        assert handle.calls == 2


def test_key_mask_and_global_frames():
    m = VideoInfinity(12, 3, local=2, window=1, global_stride=5)
    assert m.global_frames() == [0, 5, 10]
    mask = m.key_mask()  # [3 clips, 4 frames, 2 + 4 + 2 + 3]
    assert mask.shape == (3, 4, 11)
    # clip 0 has no previous clip; its frame 0 sees itself and frame 1 (window 1) and the 3 global
    assert mask[0, 0].tolist() == [False, False, True, True, False, False, False, False, True, True, True]
    # clip 1's frame 0 (video frame 4) sees frame 3 (the previous clip's last), 4 and 5
    assert mask[1, 0].tolist() == [False, True, True, True, False, False, False, False, True, True, True]
    # the last clip's last frame has no next clip
    assert mask[2, 3, :8].tolist() == [False, False, False, False, True, True, False, False]


def test_split_and_merge_clips_are_inverse():
    x = torch.arange(2 * 3 * 6 * 2 * 2, dtype=torch.float64).reshape(2, 3, 6, 2, 2)
    clips = split_clips(x, 3)
    assert clips.shape == (6, 3, 2, 2, 2)
    assert torch.equal(clips[1 * 3 + 2], x[1, :, 4:6])  # row b * clips + c: clip c of row b
    assert torch.equal(merge_clips(clips, 3), x)


def _raises(match, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


def test_bad_input():
    _raises(r"frames=10 does not split into clips=3.*accepted: clips in \[1, 2, 5, 10\]", VideoInfinity, 10, 3)
    _raises(r"global_stride=9 is larger than the video of frames=8.*1 \.\. 8", VideoInfinity, 8, 2, global_stride=9)
    _raises(r"global_stride must be an integer >= 1", VideoInfinity, 8, 2, global_stride=0)
    _raises(r"local must be an integer >= 0, got -1.*accepted: 0 \.\. 4", VideoInfinity, 8, 2, local=-1)
    _raises(r"local=5 is more than a clip's 4 frames.*accepted: 0 \.\. 4", VideoInfinity, 8, 2, local=5)
    _raises(r"window must be an integer >= 0, got -2", VideoInfinity, 8, 2, window=-2)
    _raises(r"conv_context=5 is more than a clip's 4 frames.*accepted: 0 \.\. 4", VideoInfinity, 8, 2, conv_context=5)
    _raises(r"conv_context must be an integer >= 0, got -1", VideoInfinity, 8, 2, conv_context=-1)
    _raises(r"frames must be an integer >= 1, got 0", VideoInfinity, 0, 1)
    _raises(r"clips must be an integer >= 1", VideoInfinity, 8, 2.0)
    _raises(r"chunks must be an integer >= 1", VideoInfinity, 8, 2, chunks=0)
    _raises(r"bias must be None or \(switch_timestep, logit_bias\)", VideoInfinity, 8, 2, bias=(850,))
    _raises(r"group must be None, 'world' or a torch.distributed ProcessGroup", VideoInfinity, 8, 2, group="all")
    _raises(r"group was given but torch.distributed is not initialised",
            VideoInfinity(8, 2, group="world")._ranks)
    model = unet3d()
    _raises(r"blocks names 'down_blocks.7'.*accepted", ad.apply, model, VideoInfinity(8, 2, blocks="down_blocks.7"))
    _raises(r"not temporal attention; accepted: temporal modules such as",
            ad.apply, model, VideoInfinity(8, 2, blocks="down_blocks.0.attentions"))
    unet2d = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                  block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                  attention_head_dim=4, norm_num_groups=4)
    _raises(r"has no temporal attention modules.*UNet3DConditionModel", ad.apply, unet2d, VideoInfinity(8, 2))
    x, text = video(8)
    with torch.no_grad():
        # the model run on clips of 3 frames while the method expects 4
        with ad.apply(model, VideoInfinity(8, 2, chunks=2, global_stride=2)):
            _raises(r"built for clips of 4 frames.*has 3 frames", model, x[:, :, :3], torch.tensor(1), text)
        # 2 rows where chunks x clips = 4 are expected
        with ad.apply(model, VideoInfinity(8, 2, chunks=2, global_stride=2)):
            _raises(r"batch has 2 rows .*not chunks=2 x 2 clips.*accepted: a denoiser batch of 4 rows",
                    model, x[:, :, :4], torch.tensor(1), text)
        _raises(r"sample has 2 rows but the method was built with chunks=1", denoise, model, x, torch.tensor(1), text,
                VideoInfinity(8, 2))
        _raises(r"sample must be this rank's frames .* \[B, C, 8, h, w\]", denoise, model, x[:, :, :6],
                torch.tensor(1), text, VideoInfinity(8, 2, chunks=2))
    _raises(r"the video's 8 frames do not split into clips=3; accepted: clips in \[1, 2, 4, 8\]", split_clips, x, 3)
    _raises(r"video must be a tensor \[B, C, T, h, w\]", split_clips, x[0], 2)
    _raises(r"video must be \[B, C, T, h, w\] with T = frames = 12", shard_frames, x, VideoInfinity(12, 2))


def test_registered_by_name_with_a_card():
    method = ad.build("video-infinity", frames=8, clips=2, local=1, global_stride=4)
    assert isinstance(method, VideoInfinity) and method.clip_frames == 4
    card = {c.name: c for c in ad.CARDS}["video-infinity"]
    assert card.layer is VideoInfinity and card.arxiv == "2406.16260"
    assert math.isfinite(card.flops(1, 16, {"dim": 64}).attention_fwd)
