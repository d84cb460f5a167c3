"""DiTCtrl: multi-prompt longer videos from a video MM-DiT (CogVideoX), training-free, by
mask-guided key/value sharing between adjacent prompts' segments and latent blending.

Paper: "DiTCtrl: Exploring Attention Control in Multi-Modal Diffusion Transformer for Tuning-Free
Multi-Prompt Longer Video Generation", Cai et al., arXiv 2412.18597; official code
github.com/TencentARC/DiTCtrl (``sat/dit_video_concat.py``: ``KVSharingAdaLNMixin``,
``KVSharingMaskGuidedAdaLNMixin``, ``AttentionMapController``; ``sat/sample_video.py`` and
``VPSDEDPMPP2MSampler_MultiPrompt`` in ``sat/sgm/modules/diffusionmodules/sampling.py``: the
segments, their prompts and the blending). Legend as in :mod:`attnkit.diffusion.sharing`: B rows,
H heads, S = L + N tokens of the call (L text first, then N video tokens), D head dim; a video's
tokens form a grid (f, h, w).

**The video as segments.** A long latent video ``[1, T, C, H, W]`` is covered by K windows of
``frames`` latent frames, each ``overlap`` frames into the previous one
(:func:`segment_windows`; ``T = frames + (K - 1) (frames - overlap)``). Window k is denoised under
its own prompt embedding (:func:`segment_prompts`: each prompt's segments, and ``transitions``
segments between two prompts whose embeddings interpolate linearly from one to the next).

**KV sharing** (the attention calls). Adjacent windows run as a pair ``[source, target]`` in one
batch (window k under its prompt, window k + 1 under the next). In the chosen blocks and sampling
steps the target's queries attend to the **source's** keys and values instead of its own (its
whole sequence, text included: the official ``attn_batch(q_t, k_s, v_s)``), so the next prompt's
segment is drawn with the previous segment's content; the source attends as the stock model::

    out_t = softmax(q_t k_s^T * s) v_s

**Mask guidance** (``source_tokens`` / ``target_tokens``). Every attention call of the step adds
its video-to-text attention probabilities (the model's own softmax over all S keys, averaged over
heads) to a running mean over the blocks run so far in this denoiser call
(:func:`cross_attention_map`). The columns of the object's text tokens, summed, normalised to
[0, 1] per frame (min-max over h x w) and thresholded at ``threshold``, give the object's
foreground in the source (``M_s``, from the source's prompt tokens) and in the target (``M_t``)
(:func:`object_mask`). Then a target's video query attends either to the source's text keys and
its **foreground** video keys (where ``M_t``: the target's object looks at the source's object) or
to its text keys and its **background** video keys (elsewhere); text queries attend to all of the
source's keys::

    out_t[i] = softmax over {text} + {video j: M_s[j] == M_t[i]} of (q_t[i] k_s^T * s) v_s

``source_mask`` / ``target_mask`` give either mask directly (boolean over the N video tokens,
``[N]`` or ``[f, h, w]``) instead of token indices. With classifier-free guidance (``chunks=2``)
the batch is ``[uncond source, uncond target, cond source, cond target]`` and the conditional
rows' maps give the masks of both halves, as in the official code. A group of more than two rows
is a chain: row j is the target of row j - 1.

**Latent blending** (the latents, :func:`sample_multi_prompt`). Every sampling step runs each
adjacent pair of windows; each window's prediction is weighted by a triangle over its frames,
``w_j = min(x_j, 2 - x_j)``, ``x_j = 2 (j + 0.5) / frames`` (:func:`blend_weights`), the
contributions to each frame are summed and divided by their weights' sum (:func:`blend`), and one
scheduler step moves the whole long latent. Overlapping frames so pass smoothly from one
segment's prediction to the next's; a frame covered by one window keeps that window's prediction.

What differs from the official code (CogVideoX-2B in SwissArmyTransformer): the official sampler
blends the DPM++ denoised estimates ``x0``; here the model's outputs are blended before diffusers'
scheduler step, which is the same where that step is linear in the output given the (shared)
long latent (``x0 = a_t x_t - b_t v`` for CogVideoX's v-prediction with DDIM / DPM). The map is
the model's own attention probabilities (after RoPE on a RoPE model; CogVideoX-2B has none), its
softmax computed through attnkit's attention (log-sum-exp) instead of a materialised ``[S, S]``
matrix; the official code accumulates the map in every layer, here in ``map_blocks`` (default
every block) of the steps where sharing is on. The official schedule on CogVideoX-2B (30 blocks,
50 steps) is :data:`COGVIDEOX_2B`: blocks 25-29, steps 2-24; threshold 0.3; overlap 9 of 13
latent frames with 2 transition segments. Out of scope: the paper's attention re-weighting of one
token for video editing (``ReWeightAdaLNMixin``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.softmax import attend as _attend
from .sharing import AttnCall, Sharing, _in_steps, rows

__all__ = ["COGVIDEOX_2B", "DiTCtrl", "blend", "blend_weights", "cross_attention_map", "object_mask",
           "rotary_embedding", "sample_multi_prompt", "segment_prompts", "segment_windows", "video_length"]

#: The official schedule on CogVideoX-2B (30 blocks, 50 sampling steps; ``configs/inference.yaml``).
COGVIDEOX_2B = dict(blocks=tuple(f"transformer_blocks.{i}" for i in range(25, 30)), steps=(2, 25), threshold=0.3)


# -- masks from the cross-attention map ---------------------------------------------------------------


def cross_attention_map(q: Tensor, k: Tensor, text_len: int, scale: float) -> Tensor:
    """The video-to-text attention probabilities ``[B, N, L]`` of a call, averaged over heads: the
    softmax of ``q k^T * scale`` over **all** S keys (q / k ``[B, H, S, D]``, text first), its
    columns of the L text keys at the N video queries. Float32 at least (float64 stays)."""
    if not 0 < text_len < q.shape[2]:
        raise ValueError(f"cross_attention_map needs text tokens and video tokens; got text_len={text_len} of "
                         f"{q.shape[2]} tokens")
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k = q.to(dtype), k.to(dtype)
    _, lse = _attend(q, k, k, scale=scale, return_lse=True)  # [B, H, S] over every key
    logits = q[:, :, text_len:] @ k[:, :, :text_len].transpose(-1, -2) * scale  # [B, H, N, L]
    return torch.exp(logits - lse[:, :, text_len:, None]).mean(1)


def object_mask(attn_map: Tensor, tokens, grid: tuple[int, int, int], threshold: float) -> Tensor:
    """The object's video tokens ``[N]`` (bool) from a video-to-text map ``[N, L]``: the columns of
    ``tokens`` summed, normalised per frame to [0, 1] (min-max over the frame's h x w tokens,
    ``+ 1e-6`` below, as the official code) and kept where ``>= threshold``."""
    f, h, w = grid
    if attn_map.dim() != 2 or attn_map.shape[0] != f * h * w:
        raise ValueError(f"attn_map must be [N, L] with N = f * h * w = {f * h * w}, got {tuple(attn_map.shape)}")
    idx = torch.as_tensor(list(tokens), dtype=torch.long, device=attn_map.device)
    a = attn_map[:, idx].sum(-1).reshape(f, h * w)
    lo, hi = a.amin(-1, keepdim=True), a.amax(-1, keepdim=True)
    return ((a - lo) / (hi - lo + 1e-6) >= threshold).reshape(-1)


def _tokens(value, name: str):
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    try:
        out = tuple(value)
    except TypeError:
        out = None
    if not out or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in out):
        raise ValueError(f"{name} must be a text token index >= 0 or a non-empty list of them (the object's tokens "
                         f"in the prompt), got {value!r}")
    return out


def _video_mask(mask, name: str):
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() not in (1, 3):
        got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a boolean tensor over the video tokens, [N] or [f, h, w] (True: the "
                         f"object), got {got}")
    return mask


class DiTCtrl(Sharing):
    """DiTCtrl (arXiv 2412.18597): KV sharing from the previous prompt's segment, mask-guided by the
    object's cross-attention map; see the module docstring for the math and what differs from the
    official code.

    In each group of rows (``chunks`` groups: 2 with classifier-free guidance) row 0 is the source
    and row j >= 1 the target of row j - 1. ``source_tokens`` / ``target_tokens``: the object's text
    token indices in the source's / target's prompt (official ``ref_token_idx`` / ``cur_token_idx``),
    or ``source_mask`` / ``target_mask``: its video tokens given directly; neither side: plain KV
    sharing (``KVSharingAdaLNMixin``). ``threshold``: on the per-frame normalised map.
    ``blocks`` / ``steps``: where the target shares (steps count sampling steps: ``calls_per_step``
    denoiser calls each, set by :func:`sample_multi_prompt`); ``map_blocks``: the blocks whose
    maps make the masks (default every block)."""

    name = "ditctrl"
    kinds = ("joint", "single")

    def __init__(self, *, source_tokens=None, target_tokens=None, source_mask: Tensor | None = None,
                 target_mask: Tensor | None = None, threshold: float = 0.3, chunks: int = 1, calls_per_step: int = 1,
                 map_blocks=None, blocks=None, steps=None):
        super().__init__(blocks=blocks, steps=steps)
        self.source_tokens, self.target_tokens = _tokens(source_tokens, "source_tokens"), _tokens(target_tokens,
                                                                                                  "target_tokens")
        self.source_mask, self.target_mask = _video_mask(source_mask, "source_mask"), _video_mask(target_mask,
                                                                                                  "target_mask")
        if self.source_tokens is not None and self.source_mask is not None:
            raise ValueError("give the source's object as source_tokens or as source_mask, not both")
        if self.target_tokens is not None and self.target_mask is not None:
            raise ValueError("give the target's object as target_tokens or as target_mask, not both")
        has_source = self.source_tokens is not None or self.source_mask is not None
        has_target = self.target_tokens is not None or self.target_mask is not None
        if has_source != has_target:
            raise ValueError("mask guidance needs the object in both segments: source_tokens or source_mask together "
                             "with target_tokens or target_mask (or none of them: plain KV sharing)")
        self.guided = has_source
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be a number in [0, 1] (on the per-frame normalised map), got {threshold!r}")
        for name, value in (("chunks", chunks), ("calls_per_step", calls_per_step)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.threshold, self.chunks, self.calls_per_step = float(threshold), chunks, calls_per_step
        self.map_blocks = map_blocks
        try:
            self._map_probe = Sharing(blocks=map_blocks)  # resolves map_blocks' names like blocks
        except ValueError as err:
            raise ValueError(f"map_blocks: {err}") from None
        self._maps_needed = self.guided and (self.source_mask is None or self.target_mask is None)
        self.reset()

    def bind(self, handle) -> None:
        super().bind(handle)
        try:
            self._map_probe.bind(handle)
        except ValueError as err:
            raise ValueError(f"map_blocks: {err}") from None

    def reset(self) -> None:
        self._map_step, self._map_sum, self._map_count = None, None, 0

    def _shares(self, site) -> bool:
        return self._indices is None or site.index in self._indices

    def _maps(self, site) -> bool:
        return self._maps_needed and (self._map_probe._indices is None or site.index in self._map_probe._indices)

    def active(self, site) -> bool:
        if site.kind not in self.kinds or not _in_steps(self.steps, site.step // self.calls_per_step):
            return False
        return self._shares(site) or self._maps(site)

    # -- the attention call -------------------------------------------------------------------------------

    def attend(self, call: AttnCall) -> Tensor:
        site, L = call.site, call.text_len
        groups = rows(call.batch, self.chunks)
        if site.step != self._map_step:  # a new denoiser call: a new map
            self.reset()
            self._map_step = site.step
        if self._maps(site):
            last = torch.tensor(list(groups[-1]), device=call.q.device)  # the conditional rows make the masks
            m = cross_attention_map(call.q[last], call.k[last], L, call.scale)  # [n, N, L]
            self._map_sum = m if self._map_sum is None else self._map_sum + m
            self._map_count += 1
        n = len(groups[0])
        if not self._shares(site) or n < 2:
            return call.attend()
        q, k, v = call.q, call.k, call.v
        out = torch.empty_like(q[..., :1]).expand(*q.shape[:3], v.shape[3]).contiguous()
        src = torch.tensor([g[0] for g in groups], device=q.device)
        out[src] = call.attend(q[src], k[src], v[src])  # the first segment of each group: stock
        t = torch.tensor([g[j] for g in groups for j in range(1, n)], device=q.device)
        r = torch.tensor([g[j - 1] for g in groups for j in range(1, n)], device=q.device)
        qt, ks, vs = q[t], k[r], v[r]
        if not self.guided:
            out[t] = call.attend(qt, ks, vs)
            return out
        if L == 0:
            raise ValueError(f"DiTCtrl's mask guidance needs text tokens in the attention call; {site.name} has none "
                             "(accepted: MM-DiT joint attention such as CogVideoX's)")
        source_fg, target_fg = self._object_masks(call, n)  # [n - 1, N] each, per target position
        source_fg, target_fg = source_fg.repeat(len(groups), 1), target_fg.repeat(len(groups), 1)
        text = torch.ones(len(t), L, dtype=torch.bool, device=q.device)
        video_q = qt[:, :, L:]
        fg = _attend(video_q, ks, vs, scale=call.scale, key_mask=torch.cat([text, source_fg], 1))
        bg = _attend(video_q, ks, vs, scale=call.scale, key_mask=torch.cat([text, ~source_fg], 1))
        video_out = torch.where(target_fg[:, None, :, None], fg, bg)  # [b, H, N, D]
        out[t] = torch.cat([call.attend(qt[:, :, :L], ks, vs), video_out], dim=2)  # text queries: every key
        return out

    def _object_masks(self, call: AttnCall, n: int) -> tuple[Tensor, Tensor]:
        grid = self._grid(call)
        N = grid[0] * grid[1] * grid[2]
        avg = None if self._map_sum is None else self._map_sum / self._map_count  # [n, N, L]
        out = []
        for side, mask, tokens, rows_of in (("source", self.source_mask, self.source_tokens, range(0, n - 1)),
                                            ("target", self.target_mask, self.target_tokens, range(1, n))):
            if mask is not None:
                if mask.numel() != N or (mask.dim() == 3 and tuple(mask.shape) != grid):
                    raise ValueError(f"{side}_mask has shape {tuple(mask.shape)} but {call.site.name} has {N} video "
                                     f"tokens, a grid (f, h, w) = {grid}; accepted: a boolean [{N}] or {list(grid)}")
                out.append(mask.reshape(1, N).to(call.q.device).expand(n - 1, N))
                continue
            if avg is None:
                raise ValueError(f"DiTCtrl has no cross-attention map at {call.site.name}: map_blocks={self.map_blocks!r} "
                                 "must include this block or one before it")
            if max(tokens) >= call.text_len:
                raise ValueError(f"{side}_tokens={list(tokens)} reach past the prompt's {call.text_len} text tokens; "
                                 f"accepted: indices 0 .. {call.text_len - 1}")
            out.append(torch.stack([object_mask(avg[j], tokens, grid, self.threshold) for j in rows_of]))
        return out[0], out[1]

    @staticmethod
    def _grid(call: AttnCall) -> tuple[int, int, int]:
        """The (f, h, w) of the call's video tokens: FLUX's image grid (one frame), or a video
        transformer's latent [F, C, H, W] over its ``patch_size``."""
        N = call.q.shape[2] - call.text_len
        if call.grid is not None and call.grid[0] * call.grid[1] == N:
            return (1, *call.grid)
        shape = getattr(call.handle, "_video_shape", None)
        patch = getattr(getattr(call.handle.model, "config", None), "patch_size", None)
        if shape is not None and isinstance(patch, int) and patch > 0:
            h, w = shape[2] // patch, shape[3] // patch
            if h * w and N % (h * w) == 0:
                return (N // (h * w), h, w)
        raise ValueError(f"DiTCtrl cannot tell the frame grid of {call.site.name}'s {N} video tokens; accepted: a "
                         "video transformer called with hidden_states [B, F, C, H, W] and a config.patch_size "
                         "(CogVideoX), or FLUX img_ids of one full grid")


# -- segments, prompts and latent blending --------------------------------------------------------------


def _int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def segment_windows(segments: int, frames: int, overlap: int) -> list[range]:
    """The latent frames of each of ``segments`` windows of ``frames`` frames, each ``overlap``
    frames into the previous one (stride ``frames - overlap``)."""
    _int(segments, "segments", 1)
    _int(frames, "frames", 1)
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < frames:
        raise ValueError(f"overlap={overlap!r} must be an integer in 0 .. frames - 1 = {frames - 1} (a window of "
                         f"{frames} frames must move on)")
    stride = frames - overlap
    return [range(i * stride, i * stride + frames) for i in range(segments)]


def video_length(segments: int, frames: int, overlap: int) -> int:
    """The long latent's frames: ``frames + (segments - 1) * (frames - overlap)``."""
    return segment_windows(segments, frames, overlap)[-1].stop


def blend_weights(frames: int) -> Tensor:
    """The triangle over a window's frames ``[frames]`` (float64): ``min(x, 2 - x)``,
    ``x = 2 (j + 0.5) / frames``, i.e. ``(2 min(j, frames - 1 - j) + 1) / frames`` (so written, exactly
    symmetric); largest in the middle, smallest at the edges."""
    j = torch.arange(_int(frames, "frames", 1), dtype=torch.float64)
    return (2 * torch.minimum(j, frames - 1 - j) + 1) / frames


def blend(outputs, windows, length: int, dim: int = 0) -> Tensor:
    """The windows' outputs blended into one long tensor: each ``outputs[i]`` (its frames along
    ``dim``) is weighted by :func:`blend_weights` over its window ``windows[i]`` (a window may come
    more than once), the contributions to each frame summed and divided by their weights' sum.
    A frame covered by no window is a ``ValueError``."""
    if len(outputs) != len(windows) or not outputs:
        raise ValueError(f"outputs and windows must pair up one to one; got {len(outputs)} outputs and "
                         f"{len(windows)} windows")
    first = outputs[0]
    shape = list(first.shape)
    shape[dim] = length
    total = torch.zeros(shape, dtype=first.dtype, device=first.device)
    weight = torch.zeros(length, dtype=torch.float64, device=first.device)
    view = [1] * first.dim()
    view[dim] = -1
    for out, window in zip(outputs, windows):
        window = list(window)
        if out.shape[dim] != len(window) or min(window) < 0 or max(window) >= length:
            raise ValueError(f"an output of {out.shape[dim]} frames (dim {dim}) does not fit its window "
                             f"{window[0]}..{window[-1]} of a video of {length} frames")
        w = blend_weights(len(window)).to(first.device)
        idx = torch.tensor(window, device=first.device)
        total.index_add_(dim, idx, out * w.to(out.dtype).view(view))
        weight.index_add_(0, idx, w)
    if not bool((weight > 0).all()):
        raise ValueError(f"frames {(weight == 0).nonzero().squeeze(1).tolist()} are covered by no window")
    return total / weight.to(total.dtype).view(view)


def segment_prompts(prompt_embeds, transitions: int = 0, longer_mid: int = 0) -> list[Tensor]:
    """Each segment's prompt embedding, in order: every prompt's (the middle prompts of three or
    more ``1 + longer_mid`` times), and between two prompts ``transitions`` segments interpolating
    linearly, ``(1 - a) c_i + a c_{i+1}``, ``a = (j + 1) / (transitions + 1)`` (official
    ``num_transition_blocks``, ``longer_mid_segment``). ``prompt_embeds``: a list of ``[L, C]``
    (or ``[1, L, C]``) tensors, or one ``[P, L, C]`` tensor."""
    _int(transitions, "transitions", 0)
    _int(longer_mid, "longer_mid", 0)
    embeds = [e[0] if e.dim() == 3 and e.shape[0] == 1 else e for e in prompt_embeds]
    if not embeds or any(e.dim() != 2 or e.shape != embeds[0].shape for e in embeds):
        raise ValueError("prompt_embeds must be one or more prompt embeddings of one shape [L, C] (or [1, L, C]), "
                         f"got shapes {[tuple(e.shape) for e in prompt_embeds]}")
    P, out = len(embeds), []
    for i, e in enumerate(embeds):
        out += [e] * (1 + (longer_mid if 0 < i < P - 1 else 0))
        if i < P - 1:
            out += [(1 - (j + 1) / (transitions + 1)) * e + (j + 1) / (transitions + 1) * embeds[i + 1]
                    for j in range(transitions)]
    return out


def rotary_embedding(transformer, frames: int, height: int, width: int):
    """CogVideoX's 3-D RoPE ``(cos, sin)`` for a window of ``frames`` latent frames of ``height`` x
    ``width`` latent pixels, as diffusers' CogVideoX pipeline makes it (1.0: crop-region grid; 1.5,
    with ``patch_size_t``: the "slice" grid); None where the model has no RoPE."""
    cfg = transformer.config
    if not getattr(cfg, "use_rotary_positional_embeddings", False):
        return None
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    p, p_t = cfg.patch_size, getattr(cfg, "patch_size_t", None)
    gh, gw = height // p, width // p
    if p_t is None:
        crops = get_resize_crop_region_for_grid((gh, gw), cfg.sample_width // p, cfg.sample_height // p)
        return get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=crops, grid_size=(gh, gw),
                                       temporal_size=frames)
    return get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=None, grid_size=(gh, gw),
                                   temporal_size=(frames + p_t - 1) // p_t, grid_type="slice",
                                   max_size=(cfg.sample_height // p, cfg.sample_width // p))


@torch.no_grad()
def sample_multi_prompt(transformer, scheduler, prompt_embeds, latents: Tensor, *, frames: int, overlap: int,
                        num_inference_steps: int = 50, negative_prompt_embeds: Tensor | None = None,
                        guidance_scale: float = 6.0, method: Sharing | None = None, transitions: int = 0,
                        longer_mid: int = 0, image_rotary_emb=None, step_kwargs: dict | None = None) -> Tensor:
    """A multi-prompt long video from a CogVideoX-style transformer, DiTCtrl's way: the segments of
    :func:`segment_prompts` on the windows of :func:`segment_windows`, each sampling step running
    every adjacent pair of windows as one batch (``[uncond k, uncond k+1, cond k, cond k+1]`` with
    ``negative_prompt_embeds``, else ``[cond k, cond k+1]``), classifier-free guidance per window,
    :func:`blend` of the windows' outputs, one ``scheduler`` step on the whole latent.

    ``latents``: the initial noise ``[1, T, C, H, W]`` with T = :func:`video_length`; ``method``:
    a :class:`Sharing` applied for the run (a :class:`DiTCtrl` with ``chunks`` 2 under guidance,
    1 without; its ``calls_per_step`` is set to the pairs per step), None: the stock model.
    ``scheduler``: diffusers' ``CogVideoXDDIMScheduler`` / ``CogVideoXDPMScheduler`` (or any with
    ``step(output, t, sample)``), its config as the pipeline's. ``image_rotary_emb``: default
    :func:`rotary_embedding` of one window. Returns the final latents ``[1, T, C, H, W]``."""
    from .sharing import apply

    segments = segment_prompts(prompt_embeds, transitions, longer_mid)
    K = len(segments)
    windows = segment_windows(K, frames, overlap)
    T = windows[-1].stop
    if not isinstance(latents, Tensor) or latents.dim() != 5 or latents.shape[:2] != (1, T):
        got = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
        raise ValueError(f"latents must be the initial noise [1, T, C, H, W] with T = {T} frames ({K} segments of "
                         f"{frames} frames, overlap {overlap}), got {got}")
    _int(num_inference_steps, "num_inference_steps", 1)
    cfg = negative_prompt_embeds is not None
    if cfg:
        negative = negative_prompt_embeds[0] if negative_prompt_embeds.dim() == 3 else negative_prompt_embeds
        if negative.shape != segments[0].shape:
            raise ValueError(f"negative_prompt_embeds must be one embedding of the prompts' shape "
                             f"{tuple(segments[0].shape)}, got {tuple(negative_prompt_embeds.shape)}")
    if isinstance(method, DiTCtrl):
        if method.chunks != (2 if cfg else 1):
            raise ValueError(f"the DiTCtrl method has chunks={method.chunks} but the run is "
                             f"{'with' if cfg else 'without'} classifier-free guidance; accepted: chunks={2 if cfg else 1}")
        method.calls_per_step = max(K - 1, 1)
    elif method is not None and not isinstance(method, Sharing):
        raise ValueError(f"method must be an attnkit.diffusion Sharing (e.g. DiTCtrl) or None, got {type(method).__name__}")
    if image_rotary_emb is None:
        image_rotary_emb = rotary_embedding(transformer, frames, latents.shape[3], latents.shape[4])
    if image_rotary_emb is not None:
        image_rotary_emb = tuple(e.to(latents.device, latents.dtype) for e in image_rotary_emb)
    from diffusers import CogVideoXDPMScheduler

    dpm = isinstance(scheduler, CogVideoXDPMScheduler)
    step_kwargs = dict(step_kwargs or {})
    pairs = [(k, k + 1) for k in range(K - 1)] or [(0,)]
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    timesteps = scheduler.timesteps
    latents = latents * scheduler.init_noise_sigma
    old_x0 = None
    handle = None if method is None else apply(transformer, method)
    try:
        for i, t in enumerate(timesteps):
            outputs, used = [], []
            for pair in pairs:
                x = torch.cat([latents[:, windows[w]] for w in pair])  # [p, F, C, H, W]
                text = torch.stack([segments[w] for w in pair]).to(latents.dtype)
                if cfg:
                    x = torch.cat([x, x])
                    text = torch.cat([negative[None].to(text.dtype).expand(len(pair), -1, -1), text])
                x = scheduler.scale_model_input(x, t)
                out = transformer(hidden_states=x, encoder_hidden_states=text, timestep=t.expand(x.shape[0]),
                                  image_rotary_emb=image_rotary_emb, return_dict=False)[0]
                out = out.to(torch.promote_types(out.dtype, torch.float32))
                if cfg:
                    uncond, cond = out.chunk(2)
                    out = uncond + guidance_scale * (cond - uncond)
                outputs += list(out)
                used += [windows[w] for w in pair]
            output = blend(outputs, used, T)[None]  # [1, T, C, H, W]
            if dpm:
                latents, old_x0 = scheduler.step(output, old_x0, t, timesteps[i - 1] if i > 0 else None, latents,
                                                 **step_kwargs, return_dict=False)
            else:
                latents = scheduler.step(output, t, latents, **step_kwargs, return_dict=False)[0]
            latents = latents.to(segments[0].dtype)
    finally:
        if handle is not None:
            handle.remove()
    return latents
