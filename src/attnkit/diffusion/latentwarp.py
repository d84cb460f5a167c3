"""LatentWarp (Bao et al., arXiv 2311.00353): zero-shot video-to-video translation with an image
diffusion model, the frames of a clip denoised as one batch.

Two parts, each with its own schedule:

- **Cross-frame attention** (the attention calls; ``blocks`` / ``steps``). In every self-attention
  (FLUX: joint and single) call, frame ``i`` keeps its own queries but its keys and values are
  *replaced* by those of its reference frames, the anchor frame ``a`` and the previous frame
  ``i - 1`` (Rerender-A-Video's form, which LatentWarp adopts):
  ``out_i = softmax(q_i [k_a; k_{i-1}]^T * scale) [v_a; v_{i-1}]``. Frame 0 has no previous
  frame and uses ``[k_a; k_a]`` (a key set repeated whole does not move a softmax mean, so this is
  attention to the anchor alone); ``previous=False`` uses the anchor only. On FLUX each reference
  lends its whole sequence (its text tokens too), so that a clip of identical frames gives the
  plain output, as on a UNet (whose self-attention has no text).
- **Latent warping** (the latents between sampling steps; ``warp_steps``). Before step ``s`` the
  latent of frame ``i`` takes, where frame ``i`` of the source video is visible in frame ``i - 1``,
  the latent of frame ``i - 1`` warped along the source video's flow, frames in order so that
  frame ``i - 1`` is already aligned (as in the paper's frame-by-frame generation):
  ``z_i <- m_i * warp(z_{i-1}, f_{i->i-1}) + (1 - m_i) * z_i``, ``m_i = 1`` where not occluded. This
  constrains the queries of corresponding regions to agree, which the keys and values alone
  do not. The paper aligns only in the early steps (late-step resampling blurs the latents).
  The warping acts on the pipeline's latents, not inside the denoiser, so it is the diffusers
  callback :meth:`LatentWarp.callback` (or :meth:`LatentWarp.align` called by hand).

Shapes: latents ``[F, C, h, w]`` (UNet) or packed ``[F, N, C]`` (FLUX, 2x2 patches: unpacked to the
VAE latent grid, warped, packed again); ``flow`` ``[F - 1, 2, H, W]``: ``flow[i - 1]`` the flow from
frame ``i`` to frame ``i - 1`` of the source video in its pixels (:func:`attnkit.diffusion.flow.clip_flows`),
``occluded`` ``[F - 1, 1, H, W]`` bool.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import flow as _flow
from .sharing import AttnCall, Sharing, _as_steps, _in_steps, rows

__all__ = ["LatentWarp", "cross_frame_references"]


def cross_frame_references(frames: int, anchor: int = 0, previous: bool = True) -> list[tuple[int, ...]]:
    """Each frame's reference frames (whose keys and values it attends to), in key order: frame
    ``i`` -> ``(anchor, i - 1)``, frame 0 -> ``(anchor, anchor)``; ``previous=False``: ``(anchor,)``."""
    if previous:
        return [(anchor, i - 1 if i > 0 else anchor) for i in range(frames)]
    return [(anchor,) for _ in range(frames)]


class LatentWarp(Sharing):
    """LatentWarp on a clip of ``frames`` frames, denoised as one batch (``frames * chunks`` rows in
    the attention calls: ``chunks=2`` for a UNet pipeline's classifier-free guidance halves).

    ``anchor``: the anchor frame (default the first); ``previous``: also attend to the previous
    frame (the paper's form). ``flow`` / ``occluded``: the source clip's flows frame ``i`` -> ``i - 1``
    and their occlusion (None: cross-frame attention only; ``occluded`` None: every pixel counts as
    visible); :meth:`from_video` computes both. ``warp_steps``: before which sampling steps the
    latents are aligned (None: every step :meth:`align` is called for; ``(start, stop)`` or a set),
    ``blocks`` / ``steps``: where cross-frame attention acts. ``patch``: the packing of 3-D (FLUX)
    latents, 2x2 patches per token."""

    name = "latentwarp"

    def __init__(self, frames: int = 2, *, anchor: int = 0, previous: bool = True, flow: Tensor | None = None,
                 occluded: Tensor | None = None, warp_steps=None, chunks: int = 1, patch: int = 2, blocks=None,
                 steps=None):
        super().__init__(blocks=blocks, steps=steps)
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ValueError(f"frames must be an integer >= 1 (the clip's frame count), got {frames!r}")
        if isinstance(anchor, bool) or not isinstance(anchor, int) or not 0 <= anchor < frames:
            raise ValueError(f"anchor={anchor!r} is outside the clip of {frames} frames; accepted: 0 .. {frames - 1}")
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"chunks must be an integer >= 1, got {chunks!r}")
        if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
            raise ValueError(f"patch must be an integer >= 1, got {patch!r}")
        self.frames, self.anchor, self.previous, self.chunks, self.patch = frames, anchor, bool(previous), chunks, patch
        self.warp_steps = _as_steps(warp_steps)
        self.flow, self.occluded = None, None
        if flow is not None or occluded is not None:
            self.set_flow(flow, occluded)

    @classmethod
    def from_video(cls, video: Tensor, **options) -> "LatentWarp":
        """LatentWarp with the flows and occlusion of ``video`` ``[F, C, H, W]`` (the source clip, in
        pixels) from :func:`attnkit.diffusion.flow.clip_flows`; ``flow_options`` (a dict) go to the
        estimator, the other ``options`` to the constructor."""
        flow_options = options.pop("flow_options", {})
        flow, occluded = _flow.clip_flows(video, **flow_options)
        return cls(video.shape[0], flow=flow, occluded=occluded, **options)

    def set_flow(self, flow: Tensor | None, occluded: Tensor | None = None) -> None:
        """Set (or clear, with None) the source clip's flows ``[F - 1, 2, H, W]`` and occlusion."""
        F_ = self.frames
        if flow is None:
            if occluded is not None:
                raise ValueError("occluded was given without flow; accepted: flow [F - 1, 2, H, W] with it")
            self.flow = self.occluded = None
            return
        if (not isinstance(flow, Tensor) or flow.dim() != 4 or flow.shape[:2] != (F_ - 1, 2)
                or not flow.is_floating_point()):
            got = f"{tuple(flow.shape)} {flow.dtype}" if isinstance(flow, Tensor) else type(flow).__name__
            raise ValueError(f"flow must be a floating tensor [F - 1, 2, H, W] = [{F_ - 1}, 2, H, W] for the clip of "
                             f"{F_} frames (flow[i - 1]: frame i to frame i - 1, in pixels), got {got}")
        if occluded is not None and (not isinstance(occluded, Tensor) or occluded.dtype != torch.bool
                                     or tuple(occluded.shape) != (F_ - 1, 1, *flow.shape[2:])):
            got = f"{tuple(occluded.shape)} {occluded.dtype}" if isinstance(occluded, Tensor) else type(occluded).__name__
            raise ValueError(f"occluded must be a boolean tensor [F - 1, 1, H, W] = [{F_ - 1}, 1, {flow.shape[2]}, "
                             f"{flow.shape[3]}] (True: not visible in the previous frame), got {got}")
        self.flow, self.occluded = flow, occluded

    # -- cross-frame attention ----------------------------------------------------------------------

    def attend(self, call: AttnCall) -> Tensor:
        groups = rows(call.batch, self.chunks)
        if len(groups[0]) != self.frames:
            raise ValueError(f"LatentWarp was built for a clip of frames={self.frames} but the attention call has "
                             f"{call.batch} rows with chunks={self.chunks} ({len(groups[0])} frames per chunk); "
                             f"accepted: a batch of frames * chunks = {self.frames * self.chunks} rows (chunks=2 where a UNet "
                             "pipeline runs classifier-free guidance's halves in one batch)")
        refs = cross_frame_references(self.frames, self.anchor, self.previous)
        # per reference slot, the row lent to each row of the batch (row r of a chunk gets its chunk's refs[r])
        lent = [torch.tensor([g[refs[r][slot]] for g in groups for r in range(self.frames)], device=call.q.device)
                for slot in range(len(refs[0]))]
        k = torch.cat([call.k[idx] for idx in lent], dim=2)  # [B, H, slots * S, D]
        v = torch.cat([call.v[idx] for idx in lent], dim=2)
        return call.attend(call.q, k, v)

    # -- latent warping -----------------------------------------------------------------------------

    def align(self, latents: Tensor, step: int | None = None) -> Tensor:
        """The latents ``[F, C, h, w]`` (or FLUX's packed ``[F, N, C]``) aligned along the flow before
        sampling step ``step`` (None: regardless of ``warp_steps``); unchanged where the step is
        outside ``warp_steps`` or no flow is set. Returns a new tensor."""
        if not isinstance(latents, Tensor) or latents.dim() not in (3, 4):
            got = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise ValueError(f"latents must be [F, C, h, w] or packed [F, N, C], got {got}")
        if latents.shape[0] != self.frames:
            raise ValueError(f"latents hold {latents.shape[0]} frames but LatentWarp was built for frames="
                             f"{self.frames}; accepted: [{self.frames}, ...]")
        if self.flow is None or self.frames < 2 or (step is not None and not _in_steps(self.warp_steps, step)):
            return latents
        packed = latents.dim() == 3
        x = self._unpack(latents) if packed else latents
        flow = _flow.resize_flow(self.flow.to(device=x.device, dtype=x.dtype), x.shape[2:])
        keep = None if self.occluded is None else ~_flow._resize_mask(self.occluded.to(x.device), x.shape[2:])
        frames = [x[0]]
        for i in range(1, self.frames):
            moved = _flow.warp(frames[-1][None], flow[i - 1:i])[0]
            frames.append(moved if keep is None else torch.where(keep[i - 1], moved, x[i]))
        out = torch.stack(frames)
        return self._pack(out, latents.shape) if packed else out

    def callback(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """diffusers' ``callback_on_step_end``: after step ``step`` the latents are aligned for step
        ``step + 1``. Pass ``callback_on_step_end=method.callback,
        callback_on_step_end_tensor_inputs=["latents"]`` (and align the initial latents with
        ``method.align(latents, 0)`` where step 0 is to be aligned too)."""
        latents = callback_kwargs.get("latents")
        if latents is None:
            raise ValueError('LatentWarp.callback needs the latents: pass callback_on_step_end_tensor_inputs=["latents"]')
        return {"latents": self.align(latents, step + 1)}

    def _grid(self, tokens: int) -> tuple[int, int]:
        H, W = self.flow.shape[2:]
        f = math.sqrt(H * W / tokens)
        h, w = round(H / f), round(W / f)
        if h * w != tokens:
            raise ValueError(f"packed latents of {tokens} tokens do not form a grid of the flow's aspect {H}x{W}; "
                             "accepted: a flow at the source video's size (or any size of the same aspect)")
        return h, w

    def _unpack(self, latents: Tensor) -> Tensor:
        Fr, N, C = latents.shape
        p = self.patch
        if C % (p * p):
            raise ValueError(f"packed latents of {C} channels do not hold patch={p} x {p} patches")
        h, w = self._grid(N)
        # FLUX packs [F, c, h*p, w*p] as tokens (h, w) with channels (c, p, p)
        x = latents.view(Fr, h, w, C // (p * p), p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(Fr, C // (p * p), h * p, w * p)

    def _pack(self, x: Tensor, shape) -> Tensor:
        Fr, c, hp, wp = x.shape
        p = self.patch
        x = x.view(Fr, c, hp // p, p, wp // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(shape)

