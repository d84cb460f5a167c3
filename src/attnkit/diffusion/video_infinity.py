"""Video-Infinity: long videos by clip parallelism and dual-scope temporal attention.

"Video-Infinity: Distributed Long Video Generation", Tan, Yang, Liu, Wang, arXiv 2406.16260
(official code: github.com/Yuanshi9815/Video-Infinity, on VideoCrafter2 as a diffusers
``UNet3DConditionModel``). A video of ``frames`` frames is cut into ``clips`` clips of
``F = frames / clips`` consecutive frames; each clip is denoised by a short-video model as it was
trained (F frames), on its own device, and the clips agree with each other because the temporal
attention of every clip also sees the others' keys and values.

Legend: T = ``frames`` (the whole video), F frames per clip, W ranks (processes), n = clips / W
clips per rank, P = h * w pixels of the call's feature map, H heads, D head dim, p = ``local``,
s = ``global_stride``, G the global frames. A temporal attention call of a UNet3D has q / k / v
``[B * P, H, F, D]``: one row per (batch row, pixel), its frames as the sequence; the batch rows
are ``chunks`` groups (classifier-free guidance's halves) of the rank's n clips, ``[chunk][clip]``.

Dual-scope attention. Query frame t (video frame index, in clip c) attends to

- **its clip's own frames** (all F; with ``window`` w only those with ``|u - t| <= w``);
- **local context**: the last p frames of clip c - 1 and the first p frames of clip c + 1
  (with ``window``, again only ``|u - t| <= w``; none past the video's ends), exchanged between
  neighbour ranks by point-to-point sends (rank r sends its first clip's first p frames to r - 1
  and its last clip's last p frames to r + 1);
- **global context**: the video frames ``{0, s, 2s, ...}`` (``global_stride`` s), gathered from
  every rank (an all-gather), the same G keys for every clip (a clip's own strided frames are
  among them, so they count twice, as in the official code);

    out_t = softmax(q_t [K_local(t); K_global]^T * scale + bias) [V_local(t); V_global]

with ``K_local(t) = [k_{cF-p} .. k_{cF-1}, k_{cF} .. k_{cF+F-1}, k_{cF+F} .. k_{cF+F+p-1}]`` masked
to the window, and ``bias = (switch, b)``: at timesteps >= ``switch`` the global keys' logits get
``+b``, below it ``-b`` (the same as ``+b`` on the local keys: a softmax does not move under a
shift of every logit), the official code's ``dynamic_scale`` (850, 10): early, noisy steps follow
the global context, later steps the local one.

What the official code does and what this file does. Its attention plugin builds exactly the keys
above with ``window = local`` (a sliding window of 2p + 1 frames around each query, the config's
``padding``) and takes ``top_k / W`` strided frames of each rank's clip as the global keys; at the
video's two ends it pads with zero keys and values that stay attendable, where this file leaves
them out (the stock model never attends past its ends). Its ``ConvLayerPlugin`` pads each
``TemporalConvLayer`` with 4 frames of the neighbour clips; its group-norm plugin (all-reduced
statistics) and Conv3d plugin are written but not mounted. This file implements the attention
(both scopes, the window, the bias schedule) and, with ``conv_context`` c (official: 4), the
convolution context: each ``TemporalConvLayer`` runs over its clip with c frames of each neighbour
clip (zeros past the video's ends, as there), cropped back to the clip. Group norms run per clip,
as the official default does.

Clip parallelism. ``group=None``: one process holds every clip, as rows of one batch (the
single-rank case; ``clips`` rows per chunk). ``group`` a ``torch.distributed`` process group (or
``"world"``): rank r of W holds clips ``r * n .. r * n + n - 1`` (n = clips / W, usually 1) and
the neighbour exchange and the all-gather run in every active attention call, gloo on CPU,
NCCL on GPUs. Both give the same output (the tests check it), inference only (the collectives
carry no gradients). :func:`denoise` runs a denoiser call on a rank's frames; :func:`shard_frames`
/ :func:`gather_frames` move between the whole video and a rank's frames.

Which model. Video-Infinity needs a temporal attention over a clip's frames, one sequence per
pixel, as in UNet3DConditionModel (``transformer_in`` and ``*.temp_attentions``) and UNetMotionModel
(``*.motion_modules``, the same layout; routed by name, not tested here); those modules are the
default ``blocks``. UNet3D is the official code's model (VideoCrafter2) and builds offline at a
tiny size, so the tests use it. A model whose attention mixes space and time in one sequence
(CogVideoX: frames x patches plus text in one call, time compressed by its VAE) has no per-clip
frame sequence to extend and is refused at :func:`apply`.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor

from .sharing import AttnCall, Sharing, _in_steps, _key_bias

__all__ = ["VideoInfinity", "TEMPORAL", "denoise", "shard_frames", "gather_frames", "split_clips", "merge_clips"]

# name parts of temporal attention modules: UNet3DConditionModel, UNetMotionModel (AnimateDiff)
TEMPORAL = ("transformer_in", "temp_attentions", "motion_modules")


def _is_temporal(name: str) -> bool:
    return any(part in TEMPORAL for part in name.split("."))


def _int(value, name: str, low: int, accepted: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}; accepted: {accepted}")
    return value


class VideoInfinity(Sharing):
    """Dual-scope temporal attention over a video of ``frames`` frames cut into ``clips`` clips
    (see the module docstring).

    ``local``: p, the frames taken from each neighbour clip (0: none; at most F = frames / clips).
    ``window``: None (each query sees its whole clip and the neighbours' p frames) or w >= 0 (only
    frames within w of the query; the official code uses ``window = local``). ``global_stride``:
    s, the video frames ``0, s, 2s, ...`` every clip also attends to (None: no global context;
    1 .. frames). ``bias``: None or ``(switch, b)``, ``+b`` on the global logits at timesteps
    ``>= switch``, ``-b`` below (official: ``(850, 10.0)``). ``conv_context``: c, the neighbour
    frames each temporal convolution layer also sees on each side (0: none, official 4; at most F;
    only in ``steps``). ``chunks``: classifier-free guidance's
    halves in the batch. ``group``: None (every clip in this process, as batch rows) or a
    ``torch.distributed`` process group / ``"world"`` (clip parallelism over its ranks).
    ``blocks`` / ``steps``: as :class:`Sharing`; ``blocks`` must name temporal attention modules
    (default: all of them). With ``local=0``, no ``global_stride`` and ``conv_context=0`` every clip
    runs on its own: the stock model."""

    name = "video-infinity"

    def __init__(self, frames: int = 16, clips: int = 2, *, local: int = 1, window: int | None = None,
                 global_stride: int | None = None, bias: tuple[float, float] | None = None, conv_context: int = 0,
                 chunks: int = 1, group=None, blocks=None, steps=None):
        super().__init__(blocks=blocks, steps=steps)
        frames = _int(frames, "frames", 1, "the whole video's frame count, a multiple of clips")
        clips = _int(clips, "clips", 1, f"a divisor of frames={frames}")
        if frames % clips:
            divisors = [d for d in range(1, frames + 1) if frames % d == 0]
            raise ValueError(f"frames={frames} does not split into clips={clips} equal clips; accepted: clips in "
                             f"{divisors} (or frames a multiple of {clips})")
        F = frames // clips
        local = _int(local, "local", 0, f"0 .. {F} (frames per clip: frames={frames} / clips={clips})")
        if local > F:
            raise ValueError(f"local={local} is more than a clip's {F} frames (frames={frames} / clips={clips}); "
                             f"accepted: 0 .. {F} (the context comes from the neighbour clips only)")
        conv_context = _int(conv_context, "conv_context", 0, f"0 .. {F} (the official code: 4)")
        if conv_context > F:
            raise ValueError(f"conv_context={conv_context} is more than a clip's {F} frames (frames={frames} / clips="
                             f"{clips}); accepted: 0 .. {F}")
        if window is not None:
            window = _int(window, "window", 0, "None or an integer >= 0 (the official code: window = local)")
        if global_stride is not None:
            global_stride = _int(global_stride, "global_stride", 1, f"None or 1 .. {frames} (the video's frames)")
            if global_stride > frames:
                raise ValueError(f"global_stride={global_stride} is larger than the video of frames={frames}; "
                                 f"accepted: None or 1 .. {frames}")
        if bias is not None:
            ok = (isinstance(bias, (tuple, list)) and len(bias) == 2
                  and all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in bias))
            if not ok:
                raise ValueError(f"bias must be None or (switch_timestep, logit_bias), two finite numbers, got {bias!r}; "
                                 "accepted e.g. (850, 10.0) (the official code)")
            bias = (float(bias[0]), float(bias[1]))
        self.chunks = _int(chunks, "chunks", 1, "1, or 2 for a batch with classifier-free guidance's halves")
        self.frames, self.clips, self.clip_frames = frames, clips, F
        self.local, self.window, self.global_stride, self.bias = local, window, global_stride, bias
        self.conv_context = conv_context
        self.group = _as_group(group)  # "world" stays a name until used: the default group may not exist yet
        if self.group is not None and _dist_ready():
            self._ranks()  # clips must split over the ranks: checked here when the group exists already

    # -- where it acts ----------------------------------------------------------------------------

    def bind(self, handle) -> None:
        super().bind(handle)
        temporal = {i for i, n in enumerate(handle.names) if _is_temporal(n)}
        if not temporal:
            raise ValueError(f"VideoInfinity: {type(handle.model).__name__} has no temporal attention modules (names "
                             f"with {', '.join(TEMPORAL)}); accepted: a video UNet such as UNet3DConditionModel or "
                             "UNetMotionModel, whose temporal attention runs over a clip's frames per pixel")
        if self._indices is None:
            self._indices = temporal
        spatial = sorted(handle.names[i] for i in self._indices - temporal)
        if spatial:
            roots = sorted({".".join(n.split(".")[:3]) if not n.startswith("transformer_in") else "transformer_in"
                            for n in (handle.names[i] for i in temporal)})
            raise ValueError(f"VideoInfinity: blocks selects {spatial[:3]}{'...' if len(spatial) > 3 else ''}, which "
                             f"are not temporal attention; accepted: temporal modules such as {', '.join(roots[:6])}")
        convs = [m for _, m in handle.model.named_modules() if type(m).__name__ == "TemporalConvLayer"]
        if self.conv_context and not convs:
            raise ValueError(f"conv_context={self.conv_context} but {type(handle.model).__name__} has no "
                             "TemporalConvLayer; accepted: conv_context=0 for this model")
        self._watch_batch(handle)
        if self.conv_context:
            ref = weakref.ref(handle)
            for module in convs:
                module.forward = self._conv_forward(module, ref)

    def _watch_batch(self, handle) -> None:
        """Note the denoiser's batch rows (a 5-D ``sample`` ``[B, C, F, h, w]``) before each call: a
        temporal attention call has ``B * P`` rows and P alone does not tell B. The spine's handle
        does not record B, so this hook does; it removes itself once the handle is removed."""
        self._batch_rows = None
        ref = weakref.ref(handle)

        def pre_forward(module, args, kwargs):
            live = ref()
            if live is None or live._hook is None:  # the handle was removed: so is this hook
                hook.remove()
                return
            sample = kwargs.get("sample", args[0] if args else None)
            self._batch_rows = int(sample.shape[0]) if isinstance(sample, Tensor) and sample.dim() == 5 else None

        hook = handle.model.register_forward_pre_hook(pre_forward, with_kwargs=True)

    def _conv_forward(self, module, ref):
        """``module``'s forward (a ``TemporalConvLayer``) with ``conv_context`` frames of the neighbour
        clips on each side (zeros past the video's ends, as the official ``ConvLayerPlugin``), its
        four convolutions run over the F + 2c frames and cropped back to F. The spine tells a method
        nothing at ``remove()``, so the wrapper checks the handle and puts the module's own forward
        back (and runs it) once the handle is gone."""
        own = type(module).forward.__get__(module)

        def forward(hidden_states: Tensor, num_frames: int = 1) -> Tensor:
            live = ref()
            if live is None or live._hook is None:  # the handle was removed: the stock layer again
                if module.__dict__.get("forward") is forward:
                    del module.forward
                return own(hidden_states, num_frames)
            if not _in_steps(self.steps, max(live.step, 0)):
                return own(hidden_states, num_frames)
            return self._conv_with_context(module, hidden_states, num_frames)

        return forward

    def _conv_with_context(self, module, hidden_states: Tensor, F: int) -> Tensor:
        """diffusers' ``TemporalConvLayer.forward`` with the clip padded by its neighbours' frames.
        ``hidden_states`` ``[B * F, Ch, h, w]`` -> the same shape."""
        rank, world = self._ranks()
        n, c = self.clips // world, self.conv_context
        if F != self.clip_frames:
            raise ValueError(f"VideoInfinity was built for clips of {self.clip_frames} frames but a temporal "
                             f"convolution runs on {F}; accepted: a denoiser run on clips of {self.clip_frames} frames")
        BF, Ch, h, w = hidden_states.shape
        B = BF // F
        if B != self.chunks * n:
            raise ValueError(f"the denoiser's batch has {B} rows, not chunks={self.chunks} x {n} clips on this rank; "
                             f"accepted: a denoiser batch of {self.chunks * n} rows")
        x = hidden_states.reshape(B, F, Ch, h, w).permute(0, 2, 1, 3, 4)  # [B, Ch, F, h, w]
        frames_last = x.reshape(self.chunks, n, Ch, F, h * w)  # frames at dim -2, as _edges wants them
        before, after = self._edges(frames_last, c, rank, world, clip_dim=1)
        padded = torch.cat([before, frames_last, after], dim=-2).reshape(B, Ch, F + 2 * c, h, w)
        out = module.conv4(module.conv3(module.conv2(module.conv1(padded))))[:, :, c:c + F]
        out = x + out
        return out.permute(0, 2, 1, 3, 4).reshape(BF, Ch, h, w)

    def _edges(self, x: Tensor, p: int, rank: int, world: int, clip_dim: int) -> tuple[Tensor, Tensor]:
        """``x`` with this rank's n clips at ``clip_dim`` and frames at dim -2: each clip's previous
        clip's last p frames and next clip's first p frames (same shape as ``x`` with p frames), from
        this rank or a neighbour rank, zeros past the video's ends."""
        F = x.shape[-2]
        at = (slice(None),) * clip_dim
        before, after = torch.zeros_like(x[..., :p, :]), torch.zeros_like(x[..., :p, :])
        before[at + (slice(1, None),)] = x[at + (slice(None, -1),)][..., F - p:, :]
        after[at + (slice(None, -1),)] = x[at + (slice(1, None),)][..., :p, :]
        from_left, from_right = self._exchange(x[at + (0,)][..., :p, :], x[at + (-1,)][..., F - p:, :], rank, world)
        if from_left is not None:
            before[at + (0,)] = from_left
        if from_right is not None:
            after[at + (-1,)] = from_right
        return before, after

    # -- the ranks --------------------------------------------------------------------------------

    def _ranks(self) -> tuple[int, int]:
        """(rank, world) of this process among the clip-parallel ranks; (0, 1) without a group."""
        if self.group is None:
            return 0, 1
        import torch.distributed as dist

        if not dist.is_initialized():
            raise ValueError("VideoInfinity: group was given but torch.distributed is not initialised; accepted: "
                             "group=None (one process) or a group of an initialised process group")
        pg = self.process_group
        world, rank = dist.get_world_size(pg), dist.get_rank(pg)
        if self.clips % world:
            raise ValueError(f"clips={self.clips} does not split over the group's {world} ranks; accepted: clips a "
                             f"multiple of {world} (one clip per rank: clips={world})")
        return rank, world

    @property
    def process_group(self):
        """The ``torch.distributed`` group of the clip-parallel ranks (None: one process)."""
        if self.group != "world":
            return self.group
        import torch.distributed as dist

        return dist.group.WORLD

    def _peer(self, rank: int) -> int:
        import torch.distributed as dist

        return dist.get_global_rank(self.process_group, rank)

    def _exchange(self, to_left: Tensor, to_right: Tensor, rank: int, world: int) -> tuple[Tensor | None, Tensor | None]:
        """Send ``to_left`` to rank - 1 and ``to_right`` to rank + 1; receive what they send back:
        (from the left neighbour, from the right neighbour), None past the first / last rank."""
        if world == 1:
            return None, None
        import torch.distributed as dist

        to_left, to_right = to_left.contiguous(), to_right.contiguous()  # slices; receive buffers dense too
        ops, from_left, from_right = [], None, None
        if rank > 0:
            from_left = torch.empty_like(to_right)
            ops += [dist.P2POp(dist.isend, to_left, self._peer(rank - 1), self.process_group),
                    dist.P2POp(dist.irecv, from_left, self._peer(rank - 1), self.process_group)]
        if rank < world - 1:
            from_right = torch.empty_like(to_left)
            ops += [dist.P2POp(dist.isend, to_right, self._peer(rank + 1), self.process_group),
                    dist.P2POp(dist.irecv, from_right, self._peer(rank + 1), self.process_group)]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        return from_left, from_right

    def global_frames(self) -> list[int]:
        """The video frames every clip also attends to: ``0, s, 2s, ...`` (empty without a stride)."""
        return [] if self.global_stride is None else list(range(0, self.frames, self.global_stride))

    def _gather_global(self, kv: Tensor, rank: int, world: int) -> Tensor:
        """``kv`` ``[2, C, n, R, H, F, D]`` (this rank's clips) -> the global frames' keys and values
        ``[2, C, R, H, G, D]``, the same on every rank."""
        n, F = self.clips // world, self.clip_frames
        span = n * F  # this rank's frames: [rank * span, (rank + 1) * span)
        mine = kv.permute(0, 1, 3, 4, 2, 5, 6).flatten(4, 5)  # [2, C, R, H, n * F, D], video order
        owned = [[t - r * span for t in self.global_frames() if r * span <= t < (r + 1) * span] for r in range(world)]
        if world == 1:
            return mine[..., torch.tensor(owned[0], device=kv.device), :]
        import torch.distributed as dist

        most = max(len(o) for o in owned)
        picked = mine[..., torch.tensor(owned[rank], device=kv.device, dtype=torch.long), :]
        if picked.shape[-2] < most:  # every rank sends the same size: pad, and drop the padding after
            pad = picked.new_zeros(*picked.shape[:-2], most - picked.shape[-2], picked.shape[-1])
            picked = torch.cat([picked, pad], dim=-2)
        parts = [torch.empty_like(picked) for _ in range(world)]
        dist.all_gather(parts, picked.contiguous(), group=self.process_group)
        return torch.cat([part[..., :len(o), :] for part, o in zip(parts, owned)], dim=-2)

    # -- the attention ----------------------------------------------------------------------------

    def key_mask(self, rank: int = 0, world: int = 1) -> Tensor:
        """Which keys each query of each of this rank's clips attends to: boolean
        ``[n, F, p + F + p + G]`` over ``[previous clip's last p, own F, next clip's first p,
        global G]`` (a neighbour past the video's ends, or outside the window, is False)."""
        n, F, p = self.clips // world, self.clip_frames, self.local
        G = len(self.global_frames())
        mask = torch.ones(n, F, p + F + p + G, dtype=torch.bool)
        t = torch.arange(F)[:, None]  # the query's frame within its clip
        u = torch.arange(-p, F + p)[None, :]  # the local keys' frames relative to the clip's start
        near = torch.ones(F, F + 2 * p, dtype=torch.bool) if self.window is None else (u - t).abs() <= self.window
        for j in range(n):
            c = rank * n + j  # the clip's index in the video
            inside = ((u >= 0) | (c > 0)) & ((u < F) | (c < self.clips - 1))
            mask[j, :, :F + 2 * p] = near & inside
        return mask

    def attend(self, call: AttnCall) -> Tensor:
        q, k, v = call.q, call.k, call.v
        F, p = self.clip_frames, self.local
        if q.shape[2] != F or k.shape[2] != F:
            raise ValueError(f"VideoInfinity was built for clips of {F} frames (frames={self.frames} / clips="
                             f"{self.clips}) but the temporal attention call {call.site.name} has {q.shape[2]} "
                             f"frames; accepted: a denoiser run on clips of {F} frames (see split_clips / denoise)")
        rank, world = self._ranks()
        n = self.clips // world
        rows = self.chunks * n
        if call.batch % rows or getattr(self, "_batch_rows", None) not in (None, rows):
            B = getattr(self, "_batch_rows", None)
            raise ValueError(f"the denoiser's batch has {B if B is not None else '?'} rows (the temporal attention "
                             f"call {call.batch}), not chunks={self.chunks} x {n} clips on this rank (clips={self.clips} over {world} rank(s)); accepted: a "
                             f"denoiser batch of {rows} rows (chunks x clips on this rank)")
        if p == 0 and self.global_stride is None and self.window is None:
            return call.attend()  # each clip on its own: the stock attention
        C, R, H, D = self.chunks, call.batch // rows, q.shape[1], q.shape[3]
        kv = torch.stack([k, v]).reshape(2, C, n, R, H, F, v.shape[3])  # [2, C, n, R, H, F, D]
        parts = [kv]
        if p:
            # the previous clip's last p frames and the next clip's first p, from this rank or a neighbour
            before, after = self._edges(kv, p, rank, world, clip_dim=2)
            parts = [before, kv, after]  # keys past the video's ends stay zero and are masked out
        if self.global_stride is not None:
            glob = self._gather_global(kv, rank, world)  # [2, C, R, H, G, D]
            parts.append(glob[:, :, None].expand(-1, -1, n, -1, -1, -1, -1))
        keys = torch.cat(parts, dim=-2).flatten(1, 3)  # [2, B * R, H, S', D]
        mask = self.key_mask(rank, world).to(q.device)  # [n, F, S']
        mask = mask[None, :, None, None].expand(C, -1, R, 1, -1, -1).flatten(0, 2)  # [B * R, 1, F, S']
        score_mod = None
        if self.bias is not None and self.global_stride is not None:
            switch, b = self.bias
            t = call.site.timestep
            if t is None:
                raise ValueError("VideoInfinity: bias needs the denoiser's timestep, and this call has none; accepted: "
                                 "bias=None, or a denoiser called with a timestep")
            t = float(t.flatten()[0]) if isinstance(t, Tensor) else float(t)
            score_mod = _key_bias(F + 2 * p, b if t >= switch else -b)
        return call.attend(q, keys[0], keys[1], mask=None if bool(mask.all()) else mask, score_mod=score_mod)


def _dist_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _as_group(group):
    if group is None:
        return None
    if isinstance(group, str):
        if group != "world":
            raise ValueError(f"group must be None, 'world' or a torch.distributed ProcessGroup, got {group!r}")
        return group
    import torch.distributed as dist

    if isinstance(group, dist.ProcessGroup):
        return group
    raise ValueError(f"group must be None, 'world' or a torch.distributed ProcessGroup, got {type(group).__name__}")


# -- clips and ranks -----------------------------------------------------------------------------------


def split_clips(video: Tensor, clips: int) -> Tensor:
    """``video`` ``[B, C, T, h, w]`` -> its clips as batch rows ``[B * clips, C, T / clips, h, w]``,
    row ``b * clips + c`` clip c of row b (``[chunk][clip]``, what :class:`VideoInfinity` reads)."""
    clips = _int(clips, "clips", 1, "a divisor of the video's frames")
    if not isinstance(video, Tensor) or video.dim() != 5:
        got = tuple(video.shape) if isinstance(video, Tensor) else type(video).__name__
        raise ValueError(f"video must be a tensor [B, C, T, h, w] (latents, frames third), got {got}")
    B, C, T, h, w = video.shape
    if T % clips:
        raise ValueError(f"the video's {T} frames do not split into clips={clips}; accepted: clips in "
                         f"{[d for d in range(1, T + 1) if T % d == 0]}")
    return video.reshape(B, C, clips, T // clips, h, w).transpose(1, 2).reshape(B * clips, C, T // clips, h, w)


def merge_clips(x: Tensor, clips: int) -> Tensor:
    """The inverse of :func:`split_clips`: ``[B * clips, C, F, h, w]`` -> ``[B, C, clips * F, h, w]``."""
    clips = _int(clips, "clips", 1, "the clips per video row")
    if not isinstance(x, Tensor) or x.dim() != 5 or x.shape[0] % clips:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor [B * clips, C, F, h, w] with clips={clips} dividing its rows, got {got}")
    BC, C, F, h, w = x.shape
    return x.reshape(BC // clips, clips, C, F, h, w).transpose(1, 2).reshape(BC // clips, C, clips * F, h, w)


def shard_frames(video: Tensor, method: VideoInfinity) -> Tensor:
    """This rank's frames of ``video`` ``[B, C, T, h, w]`` (T = ``method.frames``): ``[B, C, n * F, h, w]``
    (the whole video without a group)."""
    rank, world = method._ranks()
    if not isinstance(video, Tensor) or video.dim() != 5 or video.shape[2] != method.frames:
        got = tuple(video.shape) if isinstance(video, Tensor) else type(video).__name__
        raise ValueError(f"video must be [B, C, T, h, w] with T = frames = {method.frames}, got {got}")
    span = method.frames // world
    return video[:, :, rank * span:(rank + 1) * span]


def gather_frames(x: Tensor, method: VideoInfinity) -> Tensor:
    """Every rank's frames ``[B, C, n * F, h, w]`` put together: the whole video ``[B, C, T, h, w]``
    on every rank (an all-gather; ``x`` itself without a group)."""
    rank, world = method._ranks()
    if world == 1:
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=method.process_group)
    return torch.cat(parts, dim=2)


def denoise(model, sample: Tensor, timestep, encoder_hidden_states: Tensor, method: VideoInfinity, **kwargs) -> Tensor:
    """One denoiser call of Video-Infinity on this rank: ``sample`` ``[B, C, n * F, h, w]`` (this
    rank's frames, :func:`shard_frames`; the whole video without a group), ``encoder_hidden_states``
    ``[B, L, E]``; its n clips run as batch rows ``[B * n, ...]`` with ``method`` applied to
    ``model`` (a UNet3DConditionModel-like denoiser). ``B`` must be ``method.chunks``. Returns the
    denoiser's output for these frames, ``[B, C, n * F, h, w]``. ``kwargs`` go to the denoiser."""
    from .sharing import apply

    rank, world = method._ranks()
    n = method.clips // world
    if not isinstance(sample, Tensor) or sample.dim() != 5 or sample.shape[2] != n * method.clip_frames:
        got = tuple(sample.shape) if isinstance(sample, Tensor) else type(sample).__name__
        raise ValueError(f"sample must be this rank's frames [B, C, n * F, h, w] = [B, C, {n * method.clip_frames}, "
                         f"h, w] ({n} clip(s) of {method.clip_frames} frames), got {got}")
    if sample.shape[0] != method.chunks:
        raise ValueError(f"sample has {sample.shape[0]} rows but the method was built with chunks={method.chunks}; "
                         f"accepted: a batch of {method.chunks} row(s) (chunks)")
    if not isinstance(encoder_hidden_states, Tensor) or encoder_hidden_states.shape[0] != sample.shape[0]:
        got = tuple(encoder_hidden_states.shape) if isinstance(encoder_hidden_states, Tensor) else None
        raise ValueError(f"encoder_hidden_states must be [B, L, E] with B = {sample.shape[0]}, got {got}")
    with apply(model, method):
        out = model(split_clips(sample, n), timestep, encoder_hidden_states.repeat_interleave(n, dim=0),
                    return_dict=False, **kwargs)[0]
    return merge_clips(out, n)
