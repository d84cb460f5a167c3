"""IDOL: one denoiser, shared by two modalities (RGB video and depth), generating both jointly.

After *IDOL: Unified Dual-Modal Latent Diffusion for Human-Centric Joint Video-Depth Generation*
(Zhai et al., ECCV 2024, arXiv 2407.10937). The authors have released no code (their repository
holds the project page only), so this is written from the paper: its abstract, its architecture
figure (per block: spatial, temporal and cross-attention, then a cross-modal attention shared by the
two streams; the modality given by a one-hot label embedded beside the timestep) and its
figure of feature motion fields. IDOL is a *training-side* method: it changes the model and its
loss, not a pretrained model's attention at sampling time.

What is built here, on the diffusion subject (:mod:`attnkit.diffusion.subject`, diffusers'
``FluxTransformer2DModel`` plus a caption encoder):

- **Two streams, one set of parameters.** A clip's RGB frames and its depth frames (depth in
  [0.2, 1] drawn as three equal channels in [-1, 1]) are two rows of one batch through the same
  transformer. Each row is a whole clip: F frames of N tokens, FLUX position ids ``(frame, row,
  col)``, so FLUX's joint attention is spatio-temporal (it stands in for the paper's spatial and
  temporal attention).
- **Modality label.** ``nn.Embedding(2, caption_dim)`` added to the pooled caption vector, which
  FLUX turns into the time-text conditioning of every block (the paper adds its label embedding to
  the timestep embedding): the label says which modality a row denoises.
- **Cross-modal attention.** After every FLUX block (double and single), each stream's image
  tokens attend to both streams' tokens of the same clip (``[own; other]``, RoPE at the tokens'
  positions, so a token and its counterpart in the other modality share a position), one module
  per block shared by both streams, its output projection zero-initialised (an IDOL model made
  from a trained subject starts as that subject). ``B`` legend below: clips; rows are ``2B``
  (video rows first, then depth).
- **Motion-consistency loss** ``L_mo``: each block's image features (before its cross-modal
  attention), per stream, give a *feature motion field*: for every token of frame f, the soft
  argmax of its matches in frame f + 1 (a softmax over the cost volume of layer-normalised
  features, temperature ``motion_temperature``), minus its own position, in image fractions
  (:func:`motion_field`). ``L_mo`` is the mean squared difference between the video and depth
  streams' fields, averaged over blocks. It is an attention whose values are positions, so it runs
  on attnkit's fast attention path.
- **Cross-attention-map-consistency loss** ``L_xattn``: in every FLUX attention call, the image
  queries' attention over the caption tokens (softmax over the L caption keys only: the
  text-to-image cross-attention map a UNet's cross-attention computes), video row against depth
  row, mean squared difference, averaged over calls (:func:`xattn_maps` via
  :class:`IDOLMaps`, an attention method of :func:`attnkit.diffusion.apply`).

Training (rectified flow, the subject's convention: ``x_t = (1 - t) x0 + t noise``, t = 1 noise)
uses one t per clip for both streams and minimises
``L_rf(video) + L_rf(depth) + motion_weight L_mo + xattn_weight L_xattn``. :func:`sample` runs
Euler steps on both streams at once. Train on the H200 (the default preset starts from the
shipped subject's weights)::

    python -m attnkit.diffusion.idol train --out idol_model --preset default --device cuda --minutes 8.5

and measure on a CPU (a tiny model trained twice, with and without the consistency losses)::

    nice -n 10 python -m attnkit.diffusion.idol measure --out benchmarks/results/cpu/idol-cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._console import write_atomic
from ..ops import attend
from .scenes import CAPTION_LENGTH, PAD_ID, SceneBatch, caption_batch, check_size, render_batch, sample_scenes
from .sharing import AttnCall, Sharing, apply
from .subject import DEFAULT_PATH as SUBJECT_PATH, SAMPLE_CAPTIONS, SubjectConfig, SubjectModel, _training_precision, \
    image_grid, write_png

__all__ = ["MODALITIES", "PRESETS", "IDOLModel", "IDOLMaps", "CrossModalAttention", "cross_modal_reference",
           "motion_field", "motion_field_reference", "motion_consistency", "motion_consistency_reference",
           "xattn_maps", "xattn_consistency", "xattn_consistency_reference", "sample_clips", "depth_to_image",
           "image_to_depth", "idol_loss", "train_idol", "sample", "object_masks", "agreement",
           "denoised_agreement", "measure", "save", "load", "main"]

#: the modality labels, in label-index order
MODALITIES = ("video", "depth")

_OBJECT_DEPTH_CUT = 0.45  # objects lie at 0.2 / 0.3, every background at >= 0.6
_SATURATION_CUT = 0.45    # object colours have saturation (max - min) >= 0.7, backgrounds <= 0.23

PRESETS = {
    # seconds on a CPU, for tests
    "tiny": {"model": dict(image_size=8, num_layers=1, num_single_layers=1, num_attention_heads=2,
                           attention_head_dim=16, axes_dims_rope=(4, 6, 6), caption_dim=32),
             "frames": 2,
             "train": dict(batch_size=4, steps=30, lr=3e-3, motion_weight=1.0, xattn_weight=1.0,
                           motion_temperature=0.5, travel=0.3, drop_word=0.15, drop_all=0.1, grad_clip=1.0,
                           log_every=10, sample_steps=4)},
    # the CPU measurement: 16x16 clips of 3 frames, about a minute per run on one core. The
    # consistency weights (10) make the two losses a visible share of the total: L_mo and L_xattn
    # start near 0.02 and 0.005 against a rectified-flow loss near 1 (the paper's weights are not
    # known to us)
    "cpu": {"model": dict(image_size=16, num_layers=1, num_single_layers=1, num_attention_heads=2,
                          attention_head_dim=16, axes_dims_rope=(4, 6, 6), caption_dim=32),
            "frames": 3,
            "train": dict(batch_size=8, steps=300, lr=2e-3, motion_weight=10.0, xattn_weight=10.0,
                          motion_temperature=0.5, travel=0.3, drop_word=0.15, drop_all=0.1, grad_clip=1.0,
                          log_every=50, sample_steps=12)},
    # the H200 run: the subject's architecture (4.13 M + the cross-modal attention), from its weights
    "default": {"model": dict(image_size=32, num_layers=3, num_single_layers=3, num_attention_heads=4,
                              attention_head_dim=40, axes_dims_rope=(8, 16, 16), caption_dim=128),
                "frames": 4,
                "train": dict(batch_size=64, steps=6000, lr=3e-4, motion_weight=10.0, xattn_weight=10.0,
                              motion_temperature=0.5, travel=0.3, drop_word=0.15, drop_all=0.1, grad_clip=1.0,
                              log_every=100, sample_steps=30)},
}


def _modality_index(name, argument: str = "modalities") -> int:
    if not isinstance(name, str) or name not in MODALITIES:
        raise ValueError(f"{argument} must name modalities among {', '.join(MODALITIES)}, got {name!r}")
    return MODALITIES.index(name)


# -- cross-modal attention ------------------------------------------------------------------------


class CrossModalAttention(nn.Module):
    """Each stream's tokens attend to both streams' tokens of the same clip.

    Input ``hidden`` (2B, T, C): rows ``0..B-1`` one stream, ``B..2B-1`` the other, row ``b`` and
    ``b + B`` the same clip. Row r's queries attend to the keys / values of ``[row r; its partner]``
    (2T tokens), rotated with FLUX's RoPE at the tokens' positions (``rope`` = (cos, sin), each
    (T, head_dim), or None). Returns the residual update (2B, T, C); the output projection starts
    at zero."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be a multiple of num_heads ({num_heads})")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, hidden: torch.Tensor, rope=None) -> torch.Tensor:
        rows, T, C = hidden.shape
        if rows % 2:
            raise ValueError(f"hidden must hold 2B rows (one stream, then the other), got {rows}")
        x = self.norm(hidden)
        both = torch.cat([x, x.roll(rows // 2, dims=0)], dim=1)  # (2B, 2T, C): own tokens, then the partner's
        split = lambda t: t.unflatten(-1, (self.num_heads, self.head_dim))  # noqa: E731  (.., H, D)
        q, k, v = split(self.to_q(x)), split(self.to_k(both)), split(self.to_v(both))
        if rope is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            cos, sin = rope
            q = apply_rotary_emb(q, (cos, sin), sequence_dim=1)
            k = apply_rotary_emb(k, (torch.cat([cos, cos]), torch.cat([sin, sin])), sequence_dim=1)
        # SDPA: attnkit's auto choice may take cuDNN on an H200, whose bf16 gradients the subject found NaN
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=self.head_dim ** -0.5,
                     backend="sdpa")
        return self.to_out(out.transpose(1, 2).flatten(2))


def _rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """FLUX's RoPE written out: consecutive channel pairs (x0, x1) of x (R, T, H, D) turn by the
    angle whose cos / sin (T, D) FLUX repeats for both members of a pair."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, None, 0::2], sin[:, None, 0::2]  # (T, 1, D/2)
    return torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1).flatten(-2)


def cross_modal_reference(module: CrossModalAttention, hidden: torch.Tensor, rope=None) -> torch.Tensor:
    """:class:`CrossModalAttention` in float64 with the softmax materialised, written plainly:
    for every clip and stream, queries of the stream against keys of [stream; other stream]."""
    W = {n: (getattr(module, n).weight.double(), getattr(module, n).bias.double())
         for n in ("to_q", "to_k", "to_v", "to_out")}
    h = hidden.double()
    rows, T, C = h.shape
    B, H, D = rows // 2, module.num_heads, module.head_dim
    x = F.layer_norm(h, (C,), eps=1e-6)
    lin = lambda name, t: t @ W[name][0].T + W[name][1]  # noqa: E731
    outs = []
    for r in range(rows):
        partner = (r + B) % rows
        keys_in = torch.cat([x[r], x[partner]])  # (2T, C)
        q = lin("to_q", x[r]).view(T, H, D)
        k = lin("to_k", keys_in).view(2 * T, H, D)
        v = lin("to_v", keys_in).view(2 * T, H, D)
        if rope is not None:
            cos, sin = (t.double() for t in rope)
            q = _rotate_reference(q[None], cos, sin)[0]
            k = _rotate_reference(k[None], torch.cat([cos, cos]), torch.cat([sin, sin]))[0]
        heads = []
        for j in range(H):
            scores = q[:, j] @ k[:, j].T / math.sqrt(D)  # (T, 2T)
            p = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
            p = p / p.sum(dim=1, keepdim=True)
            heads.append(p @ v[:, j])
        outs.append(lin("to_out", torch.cat(heads, dim=1)))
    return torch.stack(outs)


# -- the consistency losses ---------------------------------------------------------------------------


def _positions(grid: tuple[int, int], device, dtype) -> torch.Tensor:
    """Token centres (N, 2) as ``(x, y)`` in image fractions, row-major over the (h, w) grid."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=dtype), torch.arange(w, device=device, dtype=dtype),
                            indexing="ij")
    return torch.stack([(xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h], dim=1)


def _check_features(features: torch.Tensor, grid) -> tuple[int, int]:
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(g, int) and g > 0 for g in grid)):
        raise ValueError(f"grid must be a pair (h, w) of positive ints, got {grid!r}")
    if features.ndim != 4 or features.shape[1] < 2 or features.shape[2] != grid[0] * grid[1]:
        raise ValueError(f"features must be (R, F, N, C) with F >= 2 frames and N = h * w = {grid[0] * grid[1]} "
                         f"tokens, got {tuple(features.shape)}")
    return tuple(grid)


def motion_field(features: torch.Tensor, grid, temperature: float = 0.5) -> torch.Tensor:
    """The feature motion field (R, F-1, N, 2): for each token p of frame f, the expected position
    of its match in frame f + 1 minus its own position, ``(dx, dy)`` in image fractions::

        M_f(p) = sum_q softmax_q(<f_f(p), f_{f+1}(q)> / (sqrt(C) temperature)) pos(q) - pos(p)

    with ``f`` the features (R, F, N, C) layer-normalised per token; ``grid`` the tokens' (h, w).
    Runs as one attention (queries frame f, keys frame f + 1, values the positions) on attnkit's
    fast path."""
    grid = _check_features(features, grid)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    R, Fr, N, C = features.shape
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32  # bf16 features: cost in float32
    f = F.layer_norm(features.to(dtype), (C,))
    pos = _positions(grid, features.device, dtype)
    q = f[:, :-1].reshape(R * (Fr - 1), 1, N, C)
    k = f[:, 1:].reshape(R * (Fr - 1), 1, N, C)
    v = pos.expand(R * (Fr - 1), 1, N, 2)
    with torch.autocast(features.device.type, enabled=False):
        expected = attend(q, k, v.contiguous(), scale=1.0 / (math.sqrt(C) * temperature), backend="sdpa")
    return expected.view(R, Fr - 1, N, 2) - pos


def motion_field_reference(features: torch.Tensor, grid, temperature: float = 0.5) -> torch.Tensor:
    """:func:`motion_field` in float64 with the cost volume and its softmax materialised."""
    grid = _check_features(features, grid)
    f = features.double()
    R, Fr, N, C = f.shape
    f = (f - f.mean(-1, keepdim=True)) / torch.sqrt(f.var(-1, unbiased=False, keepdim=True) + 1e-5)
    pos = _positions(grid, f.device, torch.float64)
    out = torch.zeros(R, Fr - 1, N, 2, dtype=torch.float64, device=f.device)
    for r in range(R):
        for i in range(Fr - 1):
            cost = f[r, i] @ f[r, i + 1].T / (math.sqrt(C) * temperature)  # (N, N): token p against q
            p = torch.exp(cost - cost.max(dim=1, keepdim=True).values)
            p = p / p.sum(dim=1, keepdim=True)
            out[r, i] = p @ pos - pos
    return out


def _pair(features: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if features.shape[0] % 2:
        raise ValueError(f"{name} must hold 2B rows (video rows, then depth rows), got {features.shape[0]}")
    return features.chunk(2)


def motion_consistency(features, grid, temperature: float = 0.5) -> torch.Tensor:
    """``L_mo``: the mean over blocks of the mean squared difference between the video rows' and the
    depth rows' :func:`motion_field`. ``features``: a list of (2B, F, N, C), one per block."""
    if not features:
        raise ValueError("features must be a non-empty list of (2B, F, N, C) block features")
    total = 0.0
    for h in features:
        field = motion_field(h, grid, temperature)
        video, depth = _pair(field, "features")
        total = total + (video - depth).square().mean()
    return total / len(features)


def motion_consistency_reference(features, grid, temperature: float = 0.5) -> torch.Tensor:
    """:func:`motion_consistency` in float64, from :func:`motion_field_reference`, summed plainly."""
    total = torch.zeros((), dtype=torch.float64)
    for h in features:
        field = motion_field_reference(h, grid, temperature)
        B = field.shape[0] // 2
        diff = 0.0
        for b in range(B):
            diff = diff + ((field[b] - field[b + B]) ** 2).sum()
        total = total + diff / (B * field[0].numel())
    return total / len(features)


def xattn_maps(q_image: torch.Tensor, k_text: torch.Tensor, scale: float) -> torch.Tensor:
    """The cross-attention map (R, H, N, L): the image queries' softmax over the caption keys only.
    ``q_image`` (R, H, N, D), ``k_text`` (R, H, L, D). Small (L is the caption length), so it is
    computed as a matrix."""
    return torch.softmax(torch.einsum("rhnd,rhld->rhnl", q_image, k_text) * scale, dim=-1)


def xattn_consistency(maps) -> torch.Tensor:
    """``L_xattn``: the mean over attention calls of the mean squared difference between the video
    rows' and the depth rows' cross-attention maps. ``maps``: a list of (2B, H, N, L)."""
    if not maps:
        raise ValueError("maps must be a non-empty list of (2B, H, N, L) cross-attention maps")
    total = 0.0
    for a in maps:
        video, depth = _pair(a, "maps")
        total = total + (video - depth).square().mean()
    return total / len(maps)


def xattn_consistency_reference(q_images, k_texts, scale: float) -> torch.Tensor:
    """``L_xattn`` in float64 from the queries and keys of each call (lists of (2B, H, N, D) and
    (2B, H, L, D)), the softmax over caption keys written out per row, head and query."""
    total = torch.zeros((), dtype=torch.float64)
    for q, k in zip(q_images, k_texts):
        q, k = q.double(), k.double()
        R, H, N, _ = q.shape
        B = R // 2
        diff, count = 0.0, 0
        for b in range(B):
            for h in range(H):
                for n in range(N):
                    maps = []
                    for r in (b, b + B):
                        s = (k[r, h] @ q[r, h, n]) * scale  # (L,)
                        e = torch.exp(s - s.max())
                        maps.append(e / e.sum())
                    diff = diff + ((maps[0] - maps[1]) ** 2).sum()
                    count += maps[0].numel()
        total = total + diff / count
    return total / len(q_images)


class IDOLMaps(Sharing):
    """The attention method IDOL's training runs under: the stock attention everywhere (bit for bit),
    and, while ``recording`` is on, each FLUX call's text-to-image cross-attention map
    (:func:`xattn_maps` of the image queries and the caption keys, with gradients) appended to
    ``maps`` for ``L_xattn``. Registered as ``"idol"``: ``attnkit.diffusion.apply(transformer, "idol")``
    on any FLUX transformer records the maps of a pass."""

    name = "idol"
    kinds = ("joint", "single")

    def __init__(self, *, recording: bool = True, blocks=None, steps=None):
        super().__init__(blocks=blocks, steps=steps)
        self.recording = bool(recording)
        self.maps: list[torch.Tensor] = []

    def active(self, site) -> bool:
        return self.recording and super().active(site)

    def attend(self, call: AttnCall) -> torch.Tensor:
        out = call.attend()
        if call.text_len:
            self.maps.append(xattn_maps(call.q[:, :, call.image], call.k[:, :, :call.text_len], call.scale))
        return out

    def reset(self) -> None:
        self.maps = []


# -- the dual-modal model -----------------------------------------------------------------------------


class IDOLModel(nn.Module):
    """The subject (``self.subject``: FLUX transformer and caption encoder) shared by the RGB and
    depth streams, a modality embedding (``self.modality``) and one :class:`CrossModalAttention`
    per FLUX block (``self.cross_modal``). :meth:`forward` maps the two streams' noisy tokens,
    each (B, F, N, 12), times (B,) and captions (B, L) to their velocities."""

    def __init__(self, config: SubjectConfig | None = None, frames: int = 2):
        super().__init__()
        config = config or SubjectConfig()
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ValueError(f"frames must be an int >= 1, got {frames!r}")
        self.frames = frames
        self.subject = SubjectModel(config)
        self.config = config
        dim = config.num_attention_heads * config.attention_head_dim
        self.modality = nn.Embedding(len(MODALITIES), config.caption_dim)
        nn.init.normal_(self.modality.weight, std=0.1)  # small: a model made from the subject starts near it
        blocks = list(self.subject.transformer.transformer_blocks) + list(self.subject.transformer.single_transformer_blocks)
        self.cross_modal = nn.ModuleList(CrossModalAttention(dim, config.num_attention_heads) for _ in blocks)
        self._ctx = None
        for i, block in enumerate(blocks):
            block.register_forward_hook(self._block_hook(i), with_kwargs=True)
        self._maps = IDOLMaps(recording=False)
        self._handle = apply(self.subject.transformer, self._maps)

    @property
    def device(self) -> torch.device:
        return self.subject.device

    @property
    def grid(self) -> tuple[int, int]:
        side = self.config.image_size // 2
        return side, side

    def _block_hook(self, index: int):
        def hook(module, args, kwargs, output):
            ctx = self._ctx
            if ctx is None:  # the transformer called on its own: a plain subject
                return None
            encoder_hidden, hidden = output
            if ctx["record"]:
                ctx["features"].append(hidden.unflatten(1, (ctx["frames"], -1)))  # (2B, F, N, C)
            if ctx["cross_modal"]:
                rope = kwargs.get("image_rotary_emb")
                if rope is not None:
                    L = encoder_hidden.shape[1]
                    rope = (rope[0][L:], rope[1][L:])
                hidden = hidden + self.cross_modal[index](hidden, rope)
            return encoder_hidden, hidden
        return hook

    def image_ids(self, frames: int, device=None) -> torch.Tensor:
        """FLUX position ids (F * N, 3) of a clip: ``(frame, row, col)``, frame-major."""
        h, w = self.grid
        one = SubjectModel.image_ids(h, w, device)
        ids = one.repeat(frames, 1)
        ids[:, 0] = torch.arange(frames, device=device).repeat_interleave(h * w).float()
        return ids

    def forward(self, video: torch.Tensor, depth: torch.Tensor, t, captions, *,
                modalities=("video", "depth"), cross_modal: bool = True, record: bool = False):
        """Velocities ``(v_video, v_depth)``, each (B, F, N, 12), of noisy tokens ``video`` and
        ``depth`` (B, F, N, 12) at time ``t`` (float or (B,)) under ``captions`` (ids (B, L) or
        strings). ``modalities``: the label each stream gets (the default; swap them to see the
        label steer). ``cross_modal=False`` leaves the cross-modal attention out. With
        ``record=True`` also returns a dict: ``features`` (a list per block of (2B, F, N, C)) and
        ``maps`` (a list per attention call of (2B, H, F N, L)) for the consistency losses."""
        if not isinstance(video, torch.Tensor) or not isinstance(depth, torch.Tensor):
            raise ValueError("video and depth must be tensors of tokens (B, F, N, 12)")
        if video.shape != depth.shape:
            raise ValueError(f"video and depth must have the same shape (B, F, N, 12), got video "
                             f"{tuple(video.shape)} and depth {tuple(depth.shape)}")
        h, w = self.grid
        if video.ndim != 4 or video.shape[2] != h * w or video.shape[3] != 12:
            raise ValueError(f"video and depth must be (B, F, {h * w}, 12) for {self.config.image_size}x"
                             f"{self.config.image_size} frames, got {tuple(video.shape)}")
        if not isinstance(modalities, (tuple, list)) or len(modalities) != 2:
            raise ValueError(f"modalities must be a pair of labels among {', '.join(MODALITIES)}, got {modalities!r}")
        labels = [_modality_index(m) for m in modalities]
        ids = self.subject.caption_ids(captions)
        B, Fr = video.shape[:2]
        if ids.shape[0] != B:
            raise ValueError(f"captions must give one caption per clip: {B} clips, got {ids.shape[0]} captions")
        t = self.subject._times(t, B, video)
        return self._velocity(video, depth, t, ids, labels, cross_modal, record)

    def _velocity(self, video, depth, t, ids, labels=(0, 1), cross_modal=True, record=False):
        """:meth:`forward` without its checks (the training loop's hot path)."""
        B, Fr, N, _ = video.shape
        x = torch.cat([video, depth]).flatten(1, 2)  # (2B, F N, 12)
        words, pooled = self.subject.encode(ids)
        # (2B,), made on the device: a copy from host memory would wait for a GPU's queue every step
        label = torch.cat([torch.full((B,), labels[0], device=x.device), torch.full((B,), labels[1], device=x.device)])
        ctx = {"frames": Fr, "record": record, "cross_modal": cross_modal, "features": []}
        self._ctx = ctx
        self._maps.recording = record
        self._maps.maps = []
        try:
            out = self.subject.transformer(
                hidden_states=x, encoder_hidden_states=torch.cat([words, words]),
                pooled_projections=torch.cat([pooled, pooled]) + self.modality(label), timestep=torch.cat([t, t]),
                img_ids=self.image_ids(Fr, x.device), txt_ids=torch.zeros(CAPTION_LENGTH, 3, device=x.device),
                return_dict=False)[0]
        finally:
            self._ctx = None
            self._maps.recording = False
        v_video, v_depth = out.view(2 * B, Fr, N, -1).chunk(2)
        if record:
            maps, self._maps.maps = self._maps.maps, []
            return v_video, v_depth, {"features": ctx["features"], "maps": maps}
        return v_video, v_depth

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


# -- data -------------------------------------------------------------------------------------------


def depth_to_image(depth: torch.Tensor) -> torch.Tensor:
    """Depth (..., 1, H, W) in [0.2, 1] -> three equal channels (..., 3, H, W) in [-1, 1] (the RGB
    stream's layout, so one set of parameters denoises both)."""
    x = (depth - 0.6) / 0.4
    return x.expand(*depth.shape[:-3], 3, *depth.shape[-2:])


def image_to_depth(image: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`depth_to_image`: the channel mean, (..., 1, H, W), as a distance."""
    return image.mean(dim=-3, keepdim=True) * 0.4 + 0.6


def sample_clips(n: int, frames: int, size: int, generator: torch.Generator, travel: float = 0.3,
                 drop_word: float = 0.0, drop_all: float = 0.0) -> dict:
    """``n`` clips of ``frames`` frames: one scene each, its object moving on a straight line from a
    start in [0.2, 0.8]^2 by up to ``travel`` (image fractions) per axis over the clip, kept inside
    [0.15, 0.85]. Returns ``video`` (n, F, 3, H, W) in [-1, 1], ``depth`` (n, F, 1, H, W),
    ``mask`` (n, F, 1, H, W) and ``captions`` (n, L): frame 0's caption, words dropped as
    :func:`~attnkit.diffusion.scenes.caption_batch` drops them. On ``generator``'s device."""
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be an int >= 1, got {frames!r}")
    if not 0.0 <= travel <= 0.6:
        raise ValueError(f"travel must lie in [0, 0.6] (image fractions), got {travel!r}")
    size = check_size(size)
    device = generator.device
    base = sample_scenes(n, generator, 0.0)
    start = 0.2 + 0.6 * torch.rand(n, 2, generator=generator, device=device)
    end = (start + travel * (2 * torch.rand(n, 2, generator=generator, device=device) - 1)).clamp(0.15, 0.85)
    w = torch.linspace(0, 1, frames, device=device).view(1, frames, 1) if frames > 1 else \
        torch.zeros(1, 1, 1, device=device)
    centres = start[:, None] * (1 - w) + end[:, None] * w  # (n, F, 2)
    rep = lambda t: t.repeat_interleave(frames)  # noqa: E731
    batch = SceneBatch(rep(base.style), rep(base.shape), rep(base.colour), rep(base.size), centres.reshape(-1, 2))
    out = render_batch(batch, size)
    first = SceneBatch(base.style, base.shape, base.colour, base.size, start)
    captions = caption_batch(first, drop_word, drop_all, generator if (drop_word or drop_all) else None)
    shape = lambda t: t.view(n, frames, *t.shape[1:])  # noqa: E731
    return {"video": shape(out["image"]), "depth": shape(out["depth"]), "mask": shape(out["mask"]),
            "captions": captions, "centres": centres}


def _pack(frames: torch.Tensor) -> torch.Tensor:
    """(B, F, 3, H, W) -> tokens (B, F, N, 12)."""
    B, Fr = frames.shape[:2]
    return SubjectModel.pack(frames.flatten(0, 1)).unflatten(0, (B, Fr))


def _unpack(tokens: torch.Tensor, size: int) -> torch.Tensor:
    B, Fr = tokens.shape[:2]
    return SubjectModel.unpack(tokens.flatten(0, 1), size, size).unflatten(0, (B, Fr))


# -- training ---------------------------------------------------------------------------------------


def idol_loss(model: IDOLModel, video: torch.Tensor, depth: torch.Tensor, captions: torch.Tensor,
              generator: torch.Generator, *, motion_weight: float = 1.0, xattn_weight: float = 1.0,
              motion_temperature: float = 0.5) -> tuple[torch.Tensor, dict]:
    """The IDOL loss of a batch of clips: ``video`` (B, F, 3, H, W) in [-1, 1], ``depth`` (B, F, 1,
    H, W) in [0.2, 1], caption ids (B, L). One t per clip (logit-normal) for both streams, noise
    drawn from ``generator``. Returns the total and its parts (``rf``, ``motion``, ``xattn``, detached)."""
    xv, xd = _pack(video), _pack(depth_to_image(depth))
    B = xv.shape[0]
    t = torch.sigmoid(torch.randn(B, generator=generator, device=xv.device))
    nv = torch.randn(xv.shape, generator=generator, device=xv.device)
    nd = torch.randn(xd.shape, generator=generator, device=xv.device)
    tt = t.view(B, 1, 1, 1)
    record = bool(motion_weight or xattn_weight)
    out = model._velocity((1 - tt) * xv + tt * nv, (1 - tt) * xd + tt * nd, t, captions, record=record)
    rf = F.mse_loss(out[0], nv - xv) + F.mse_loss(out[1], nd - xd)
    total, parts = rf, {"rf": rf.detach()}
    if record:
        aux = out[2]
        if motion_weight and xv.shape[1] > 1:
            mo = motion_consistency(aux["features"], model.grid, motion_temperature)
            total, parts["motion"] = total + motion_weight * mo, mo.detach()
        if xattn_weight:
            xa = xattn_consistency(aux["maps"])
            total, parts["xattn"] = total + xattn_weight * xa, xa.detach()
    return total, parts


def _checkpoint(model: IDOLModel, out, record: dict, preset: str) -> None:
    save(model, out, record, preset)
    lines = ["# attnkit IDOL, preset " + preset, "# " + " ".join(record["curve"][0]) if record["curve"] else "#"]
    lines += [" ".join(str(v) for v in row.values()) for row in record["curve"]]
    write_atomic(Path(out) / "train.log", "\n".join(lines) + "\n")


def _preset(preset: str) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    return PRESETS[preset]


def train_idol(out=None, *, preset: str = "default", steps: int | None = None, minutes: float | None = None,
               device: str = "cpu", seed: int = 0, batch_size: int | None = None, options: dict | None = None,
               init=None, save_every_s: float = 120.0, progress=print) -> tuple[IDOLModel, dict]:
    """Train an IDOL model on freshly rendered clips; returns ``(model, record)`` and, with ``out``,
    writes ``config.json``, ``model.safetensors``, ``train.log`` (the loss curve) and ``samples.png``
    (per clip: the RGB frames, then the depth frames) into it; the weights and log also every
    ``save_every_s`` seconds, so a run killed by a time limit keeps its last save.

    ``options`` override the preset's training settings (``motion_weight``, ``xattn_weight``,
    ``lr``, ...; 0 switches a loss off). ``init``: a subject folder whose weights start the shared
    transformer (``"subject"``: the shipped one; the default preset's choice when it exists), or
    None for random weights."""
    spec = _preset(preset)
    cfg = {**spec["train"]}
    unknown = set(options or {}) - set(cfg)
    if unknown:
        raise ValueError(f"options must name training settings among {', '.join(cfg)}, got {sorted(unknown)}")
    cfg.update(options or {})
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
            cfg[name] = value
    if minutes is not None and not minutes > 0:
        raise ValueError(f"minutes must be > 0, got {minutes!r}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is cuda but CUDA is not available")
    torch.manual_seed(seed)  # the initial weights
    config = SubjectConfig(**spec["model"])
    model = IDOLModel(config, spec["frames"])
    if init == "subject" or (init is None and preset == "default" and (SUBJECT_PATH / "config.json").is_file()):
        init = SUBJECT_PATH
    if init is not None:
        from .subject import load as load_subject

        subject = load_subject(init)
        if subject.config != config:
            raise ValueError(f"init {init} holds a subject of another architecture ({subject.config}) than preset "
                             f"{preset!r} ({config})")
        model.subject.load_state_dict(subject.state_dict())
    model = model.to(device).train()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0, betas=(0.9, 0.99))
    data = torch.Generator(device=device).manual_seed(seed)
    size, frames = config.image_size, spec["frames"]
    budget = minutes * 60 if minutes is not None else None
    record = {"preset": preset, "seed": seed, "device": str(device), "frames": frames, "init": str(init) if init else None,
              "parameters": model.parameter_count(), "train": cfg, "curve": []}
    start = last_save = time.perf_counter()
    sums, count, step = {}, 0, 0
    while step < cfg["steps"]:
        if budget is not None and time.perf_counter() - start >= budget and step:
            break
        with torch.no_grad():
            clips = sample_clips(cfg["batch_size"], frames, size, data, cfg["travel"], cfg["drop_word"], cfg["drop_all"])
        with _training_precision(device):  # the subject's: bf16 autocast, SDPA without cuDNN, on CUDA
            loss, parts = idol_loss(model, clips["video"], clips["depth"], clips["captions"], data,
                                    motion_weight=cfg["motion_weight"], xattn_weight=cfg["xattn_weight"],
                                    motion_temperature=cfg["motion_temperature"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        opt.step()
        step += 1
        count += 1
        for k, v in {"loss": loss.detach(), **parts}.items():
            sums[k] = sums.get(k, 0.0) + v
        if step % cfg["log_every"] == 0 or step == cfg["steps"]:
            means = {k: round(float(v / count), 5) for k, v in sums.items()}
            if not math.isfinite(means["loss"]):
                raise FloatingPointError(f"the IDOL training loss is {means['loss']} by step {step}")
            record["curve"].append({"step": step, **means})
            progress(f"step {step}/{cfg['steps']}  " + "  ".join(f"{k} {v:.4f}" for k, v in means.items())
                     + f"  {time.perf_counter() - start:.0f} s")
            sums, count = {}, 0
        if out is not None and time.perf_counter() - last_save > save_every_s:
            record.update(steps=step, wall_s=round(time.perf_counter() - start, 1))
            _checkpoint(model, out, record, preset)
            last_save = time.perf_counter()
    record.update(steps=step, wall_s=round(time.perf_counter() - start, 1))
    record["final"] = record["curve"][-1] if record["curve"] else None
    model.eval()
    if out is not None:
        _checkpoint(model, out, record, preset)
        clips = sample(model, list(SAMPLE_CAPTIONS[:4]), seed=0, steps=cfg["sample_steps"])
        depth_rgb = depth_to_image(clips["depth"])
        rows = torch.cat([clips["video"], depth_rgb], dim=1)  # (4, 2F, 3, H, W)
        write_png(Path(out) / "samples.png", image_grid(rows.flatten(0, 1).float(), columns=2 * frames, scale=4))
    return model, record


# -- sampling and agreement ---------------------------------------------------------------------------


@torch.no_grad()
def sample(model: IDOLModel, captions, *, seed: int = 0, steps: int = 20, guidance: float = 1.0,
           frames: int | None = None, cross_modal: bool = True) -> dict:
    """RGB and depth clips generated jointly: Euler steps from t = 1 to 0 on both streams at once
    (noise drawn on the CPU from ``seed``). Returns ``video`` (B, F, 3, H, W) in [-1, 1] and
    ``depth`` (B, F, 1, H, W), a distance. ``guidance`` != 1: classifier-free guidance against the
    all-pad caption."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number (1 = no guidance), got {guidance!r}")
    frames = model.frames if frames is None else frames
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be an int >= 1, got {frames!r}")
    ids = model.subject.caption_ids(captions)
    B, size = ids.shape[0], model.config.image_size
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(2, B, frames, 3, size, size, generator=g)
    xv, xd = (_pack(n).to(model.device) for n in noise)
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    empty = torch.full_like(ids, PAD_ID)
    for i in range(steps):
        t = torch.full((B,), float(grid[i]), device=model.device)
        if guidance == 1.0:
            vv, vd = model._velocity(xv, xd, t, ids, cross_modal=cross_modal)
        else:
            both = model._velocity(torch.cat([xv, xv]), torch.cat([xd, xd]), torch.cat([t, t]), torch.cat([ids, empty]),
                                   cross_modal=cross_modal)
            (cv, uv), (cd, ud) = (v.chunk(2) for v in both)
            vv, vd = uv + guidance * (cv - uv), ud + guidance * (cd - ud)
        dt = float(grid[i + 1] - grid[i])
        xv, xd = xv + dt * vv, xd + dt * vd
    video = _unpack(xv, size).clamp(-1, 1)
    depth = image_to_depth(_unpack(xd, size).clamp(-1, 1))
    return {"video": video, "depth": depth}


def object_masks(video: torch.Tensor, depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The object as each modality shows it, (..., H, W) booleans: in RGB (``video`` (..., 3, H, W)
    in [-1, 1]) the saturated pixels (max - min channel > 0.45 in [0, 1] units: every object colour
    is saturated, every background muted); in ``depth`` (..., 1, H, W) the pixels nearer than 0.45
    (objects lie at 0.2 / 0.3, backgrounds at >= 0.6)."""
    rgb = (video + 1) / 2
    saturation = rgb.amax(dim=-3) - rgb.amin(dim=-3)
    return saturation > _SATURATION_CUT, depth[..., 0, :, :] < _OBJECT_DEPTH_CUT


def agreement(video: torch.Tensor, depth: torch.Tensor) -> dict:
    """How well generated depth agrees with generated RGB, per frame then averaged: ``iou`` of the
    two :func:`object_masks` (frames where both are empty count as 1), ``centre_distance`` of the
    masks' centroids in image fractions (frames where either mask is empty left out, their share
    in ``empty``), ``correlation``: the Pearson correlation over a frame's pixels of the RGB
    saturation with the depth's nearness (``-depth``), a soft score that still reads blurry or faint
    objects, and ``chance_iou`` / ``chance_correlation``: the same with each clip's depth paired with
    the next clip's RGB (what unrelated streams score)."""
    if video.shape[:-3] != depth.shape[:-3] or video.shape[-2:] != depth.shape[-2:]:
        raise ValueError(f"video (..., 3, H, W) and depth (..., 1, H, W) must match, got {tuple(video.shape)} and "
                         f"{tuple(depth.shape)}")
    a, b = object_masks(video, depth)
    a, b = a.flatten(0, -3), b.flatten(0, -3)  # (frames, H, W)
    rgb = (video.flatten(0, -4).double() + 1) / 2
    saturation = (rgb.amax(dim=1) - rgb.amin(dim=1)).flatten(1)  # (frames, H W)
    nearness = -depth.flatten(0, -4).double().flatten(1)

    def correlation(x, y):
        x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
        return (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1)).clamp(min=1e-12)

    def iou(x, y):
        inter, union = (x & y).sum((-2, -1)).float(), (x | y).sum((-2, -1)).float()
        return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))

    H, W = a.shape[-2:]
    ys, xs = torch.meshgrid((torch.arange(H) + 0.5) / H, (torch.arange(W) + 0.5) / W, indexing="ij")

    def centre(m):
        n = m.sum((-2, -1)).float().clamp(min=1)
        return torch.stack([(m * xs).sum((-2, -1)) / n, (m * ys).sum((-2, -1)) / n], dim=-1)

    both = (a.sum((-2, -1)) > 0) & (b.sum((-2, -1)) > 0)
    dist = (centre(a) - centre(b)).norm(dim=-1)
    frames = video.shape[-4] if video.ndim >= 5 else 1
    shifted = b.roll(frames, dims=0)  # the next clip's depth (a whole clip further)
    return {"iou": round(float(iou(a, b).mean()), 4),
            "centre_distance": round(float(dist[both].mean()), 4) if both.any() else None,
            "empty": round(1 - float(both.float().mean()), 4),
            "correlation": round(float(correlation(saturation, nearness).mean()), 4),
            "chance_iou": round(float(iou(a, shifted).mean()), 4),
            "chance_correlation": round(float(correlation(saturation, nearness.roll(frames, dims=0)).mean()), 4),
            "frames": int(a.shape[0])}


@torch.no_grad()
def denoised_agreement(model: IDOLModel, clips: dict, t: float, seed: int = 0) -> dict:
    """:func:`agreement` of the model's one-step clean estimates ``x_t - t v`` of rendered ``clips``
    (from :func:`sample_clips`) noised to time ``t`` (both streams, noise from ``seed``): whether the
    joint denoiser keeps RGB and depth aligned where the noise hides most of the object. Cheaper to
    reach than sampling's agreement after a short training."""
    if not 0.0 < t <= 1.0:
        raise ValueError(f"t must lie in (0, 1], got {t!r}")
    xv, xd = _pack(clips["video"]).to(model.device), _pack(depth_to_image(clips["depth"])).to(model.device)
    g = torch.Generator().manual_seed(seed)
    nv, nd = (torch.randn(x.shape, generator=g).to(model.device) for x in (xv, xd))
    yv, yd = (1 - t) * xv + t * nv, (1 - t) * xd + t * nd
    tt = torch.full((xv.shape[0],), float(t), device=model.device)
    vv, vd = model._velocity(yv, yd, tt, clips["captions"].to(model.device))
    size = model.config.image_size
    video = _unpack(yv - t * vv, size).clamp(-1, 1)
    depth = image_to_depth(_unpack(yd - t * vd, size).clamp(-1, 1))
    return agreement(video.cpu(), depth.cpu())


def measure(out=None, *, preset: str = "cpu", steps: int | None = None, seed: int = 0, clips: int = 32,
            sample_steps: int | None = None, guidance: float = 2.0, device: str = "cpu",
            minutes: float | None = None, command: str | None = None, progress=print) -> dict:
    """Train ``preset`` twice from the same seed for the same steps, with and without the two
    consistency losses (``motion_weight`` = ``xattn_weight`` = 0); from each, sample ``clips``
    clips jointly (``guidance``, captions of rendered clips) and score :func:`agreement`, and score
    :func:`denoised_agreement` of those rendered clips at t = 0.6 and 0.8; also the rendered
    clips' own agreement (the measure's ceiling). ``minutes`` caps each run's training (the GPU
    comparison: ``--preset default --device cuda --minutes 3.5``). Writes the JSON to ``out`` when given."""
    spec = _preset(preset)
    sample_steps = sample_steps or spec["train"]["sample_steps"]
    g = torch.Generator().manual_seed(seed + 1)
    truth = sample_clips(clips, spec["frames"], spec["model"]["image_size"], g, spec["train"]["travel"])
    result = {"command": command, "preset": preset, "seed": seed, "clips": clips, "sample_steps": sample_steps,
              "guidance": guidance, "ground_truth": agreement(truth["video"], truth["depth"]), "runs": {}}
    captions = truth["captions"]
    for name, opts in (("without_consistency_losses", {"motion_weight": 0.0, "xattn_weight": 0.0}),
                       ("with_consistency_losses", {})):
        progress(f"-- {name}")
        model, record = train_idol(None, preset=preset, steps=steps, minutes=minutes, device=device, seed=seed,
                                   options=opts, progress=progress)
        gen = {k: v.cpu() for k, v in sample(model, captions, seed=seed + 2, steps=sample_steps,
                                             guidance=guidance).items()}
        result["runs"][name] = {"options": opts, "steps": record["steps"], "wall_s": record["wall_s"],
                                "final": record["final"], "agreement": agreement(gen["video"], gen["depth"]),
                                "denoised_t0.6": denoised_agreement(model, truth, 0.6, seed + 3),
                                "denoised_t0.8": denoised_agreement(model, truth, 0.8, seed + 3)}
    if out is not None:
        write_atomic(out, json.dumps(result, indent=2) + "\n")
    return result


# -- saving -----------------------------------------------------------------------------------------


def save(model: IDOLModel, out, record: dict | None = None, preset: str | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (float32) into ``out``, each atomically."""
    from safetensors.torch import save as safetensors_bytes

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(out / "model.safetensors", safetensors_bytes(state))
    config = {"model": asdict(model.config), "frames": model.frames, "preset": preset, "modalities": list(MODALITIES),
              "depth_encoding": "three equal channels (depth - 0.6) / 0.4", "training": record or {}}
    write_atomic(out / "config.json", json.dumps(config, indent=2) + "\n")
    return out


def load(path, device="cpu") -> IDOLModel:
    """The IDOL model saved in ``path``, in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} holds no IDOL model (config.json and model.safetensors); train one: "
                                f"python -m attnkit.diffusion.idol train --out {path}")
    config = json.loads((path / "config.json").read_text())
    model = IDOLModel(SubjectConfig.from_dict(config["model"]), config["frames"])
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.to(device).eval()


# -- command ------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    """``python -m attnkit.diffusion.idol train|measure ...``"""
    parser = argparse.ArgumentParser(prog="python -m attnkit.diffusion.idol",
                                     description="Train IDOL (joint RGB + depth clips) or measure its consistency losses.")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train an IDOL model and write it into a folder")
    tr.add_argument("--out", required=True)
    tr.add_argument("--preset", default="default", choices=list(PRESETS))
    tr.add_argument("--steps", type=int, default=None)
    tr.add_argument("--minutes", type=float, default=None)
    tr.add_argument("--batch-size", type=int, default=None)
    tr.add_argument("--motion-weight", type=float, default=None)
    tr.add_argument("--xattn-weight", type=float, default=None)
    tr.add_argument("--init", default=None, help="a subject folder to start from ('subject': the shipped one)")
    tr.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    tr.add_argument("--seed", type=int, default=0)
    me = sub.add_parser("measure", help="train a preset with and without the consistency losses and compare")
    me.add_argument("--out", default=None, help="the JSON to write")
    me.add_argument("--preset", default="cpu", choices=list(PRESETS))
    me.add_argument("--steps", type=int, default=None)
    me.add_argument("--clips", type=int, default=32)
    me.add_argument("--seed", type=int, default=0)
    me.add_argument("--minutes", type=float, default=None, help="at most this many minutes of training per run")
    me.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    say = lambda line: print(line, flush=True)  # noqa: E731
    try:
        if args.command == "train":
            opts = {k: v for k, v in (("motion_weight", args.motion_weight), ("xattn_weight", args.xattn_weight))
                    if v is not None}
            train_idol(args.out, preset=args.preset, steps=args.steps, minutes=args.minutes, device=args.device,
                       seed=args.seed, batch_size=args.batch_size, options=opts, init=args.init, progress=say)
        else:
            command = " ".join(["python -m attnkit.diffusion.idol", *(sys.argv[1:] if argv is None else argv)])
            result = measure(args.out, preset=args.preset, steps=args.steps, seed=args.seed, clips=args.clips,
                             device=args.device, minutes=args.minutes, command=command, progress=say)
            print(json.dumps({k: {m: v[m] for m in ("agreement", "denoised_t0.6", "denoised_t0.8")}
                              for k, v in result["runs"].items()}, indent=2))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
