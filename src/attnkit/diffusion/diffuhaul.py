"""DiffUHaul: dragging an object in an image by attention.

"DiffUHaul: A Training-Free Method for Object Dragging in Images", Avrahami et al.,
arXiv 2406.01594 (SIGGRAPH Asia 2024; no official code released). The paper works on BlobGEN, a
layout-conditioned model; here its three attention parts act on any FLUX / UNet model through
attnkit's processors, with the object given as a region of the source image and a drag.

Legend: S tokens of the call (L text, then N = h * w image tokens); M_s the object's region in
the source, M_t the moved region in the target (M_s's bounding box translated by ``translation``
or resampled onto ``target_box``; ``src(p)`` the source cell of target cell p, see
:mod:`attnkit.diffusion.regions`); k_s / v_s the source pass's image keys (before RoPE) and values.

Two passes over one handle, told apart by ``handle.phase``:

* ``"source"``: the source image is denoised as usual and every active call records k_s / v_s
  of its image tokens in ``method.bank`` (a :class:`KVBank`, by module and step);
* ``"target"`` (after ``handle.reset()``, so steps count from 0 again): row b of the target batch
  reads row b of the source (or row 0 when the source pass had one row) and attends to

  - its own keys and values, where in the early steps (``step < anchor_steps``) those of the
    object cells p in M_t are **anchored** to the dragged source object:
    ``k_p <- (1 - a) k_p + a RoPE_p(k_s[src(p)])``, same for v, ``a = anchor * (1 - step / anchor_steps)``;
  - **the source's keys and values (self-attention sharing)**: the object's, dragged
    (``RoPE_p(k_s[src(p)])``, ``v_s[src(p)]`` for p in M_t) and the source's background
    (cells outside M_s, at their own positions); the vacated object cells are left out;
  - with ``localise=True`` (**attention masking per object**), an image query in M_t sees only the
    object keys (its own in M_t and the dragged source object) and the text; an image query
    outside M_t only the background keys (its own outside M_t, the source's background) and the
    text. Text queries see every key.

    out[p] = softmax(q_p [K_own'; K_obj; K_bg]^T * scale + log M[p]) [V_own'; V_obj; V_bg]

Differences from the paper (whose exact formulas we could not read; the abstract and summaries
say: "attention masking in each denoising step ... self-attention sharing ... in the early
denoising steps, we interpolate the attention features between source and target images ... in
the later steps, we pass the localized features from the source"): BlobGEN's gated
self-attention masking (blob text tokens to their own regions) becomes the object / background
masking of image tokens above; sharing extends the target's keys (StyleAligned-style) instead of
replacing them; the interpolated features are the object cells' keys and values with a linear
decay of ``a``; the later steps' nearest-neighbour feature copying and the DDPM self-attention
bucketing for real images are not implemented."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import regions as _regions
from .sharing import AttnCall, KVBank, Sharing

__all__ = ["DiffUHaul", "Drag"]

_TAG = "diffuhaul"


@dataclass
class Drag:
    """The geometry of one call: ``src`` / ``dst`` flat cells of the dragged object (source cell,
    target cell), ``background`` the source's cells outside M_s, ``target`` (M_t) and ``source``
    (M_s) ``[h, w]`` masks, and ``mask`` ``[S, S + n_obj + n_bg]`` (localised or all True)."""

    src: Tensor
    dst: Tensor
    background: Tensor
    source: Tensor
    target: Tensor
    mask: Tensor


class DiffUHaul(Sharing):
    """Object dragging with localised attention, sharing from a recorded source pass, and early-step
    anchoring (see the module docstring).

    ``source_mask``: the object in the source image, a boolean ``[h, w]`` mask over the image-token
    grid or a box ``(y0, x0, y1, x1)`` (token units, half-open). Exactly one of ``translation``
    ``(dy, dx)`` (token units) and ``target_box`` (the box the object's bounding box is resampled
    onto). ``localise``: attention masking per object. ``anchor_steps``: the early steps with
    anchoring (0: none), ``anchor``: its strength at step 0 in [0, 1]. ``bank``: where the source
    pass's keys and values go (default: a new :class:`KVBank`; ``device="cpu"`` spares GPU memory);
    :meth:`reset` keeps it (the target pass needs it), ``method.bank.clear()`` empties it."""

    name = "diffuhaul"

    def __init__(self, source_mask=(0, 0, 1, 1), *, translation=None, target_box=None, localise: bool = True,
                 anchor_steps: int = 0, anchor: float = 1.0, bank: KVBank | None = None, blocks=None, steps=None):
        super().__init__(blocks=blocks, steps=steps)
        self.source_mask = _regions.as_spec(source_mask, "source_mask")
        if (translation is None) == (target_box is None):
            raise ValueError("give exactly one of translation=(dy, dx) and target_box=(y0, x0, y1, x1), got "
                             f"translation={translation!r}, target_box={target_box!r}")
        if translation is not None and not (isinstance(translation, (tuple, list)) and len(translation) == 2 and all(
                isinstance(t, int) and not isinstance(t, bool) for t in translation)):
            raise ValueError(f"translation must be (dy, dx), two ints in token units, got {translation!r}")
        self.translation = None if translation is None else tuple(translation)
        self.target_box = None if target_box is None else _regions.as_spec(tuple(target_box) if isinstance(
            target_box, list) else target_box, "target_box")
        if isinstance(self.target_box, Tensor):
            raise ValueError("target_box must be a box (y0, x0, y1, x1), not a mask")
        if isinstance(anchor_steps, bool) or not isinstance(anchor_steps, int) or anchor_steps < 0:
            raise ValueError(f"anchor_steps must be an integer >= 0, got {anchor_steps!r}")
        if isinstance(anchor, bool) or not isinstance(anchor, (int, float)) or not 0 <= anchor <= 1:
            raise ValueError(f"anchor must be a number in [0, 1], got {anchor!r}")
        if bank is not None and not isinstance(bank, KVBank):
            raise ValueError(f"bank must be an attnkit.diffusion.KVBank, got {type(bank).__name__}")
        self.localise, self.anchor_steps, self.anchor = bool(localise), anchor_steps, float(anchor)
        self.bank = KVBank() if bank is None else bank
        self._drags: dict = {}

    def reset(self) -> None:
        self._drags.clear()  # the bank stays: the target pass reads what the source pass wrote

    def weight(self, step: int) -> float:
        """The anchoring weight ``a`` at ``step``: ``anchor * (1 - step / anchor_steps)`` before
        ``anchor_steps``, 0 after."""
        return self.anchor * (1 - step / self.anchor_steps) if step < self.anchor_steps else 0.0

    def drag(self, grid, text_len: int, image_ids: Tensor | None = None) -> Drag:
        """The geometry and the target's mask for a call with this ``grid`` and ``text_len``;
        ``ValueError`` on a region that does not fit the grid or a target box outside the image."""
        key = (grid, text_len)
        if key in self._drags:
            return self._drags[key]
        source = _regions.region(self.source_mask, grid, "source_mask")
        if self.translation is not None:
            y0, x0, y1, x1 = _regions.bbox(source)
            dy, dx = self.translation
            box = (y0 + dy, x0 + dx, y1 + dy, x1 + dx)
            if box[0] < 0 or box[1] < 0 or box[2] > grid[0] or box[3] > grid[1]:
                raise ValueError(f"translation={self.translation} moves the object's box {(y0, x0, y1, x1)} to {box}, "
                                 f"outside the image grid (h, w) = {tuple(grid)}")
        else:
            box = self.target_box
            _regions.region(box, grid, "target_box")
        moved = _regions.move(source, box)
        background = _regions.cells(~source)
        table = _regions.token_table(image_ids, grid) + text_len
        S, n_obj, n_bg = text_len + grid[0] * grid[1], moved.src.numel(), background.numel()
        mask = torch.ones(S, S + n_obj + n_bg, dtype=torch.bool)
        if self.localise:
            obj_rows, bg_rows = table[_regions.cells(moved.mask)], table[_regions.cells(~moved.mask)]
            mask[obj_rows[:, None], bg_rows[None, :]] = False  # the object does not see the target's background
            mask[obj_rows, S + n_obj:] = False  # nor the source's background
            mask[bg_rows[:, None], obj_rows[None, :]] = False  # the background does not see the object
            mask[bg_rows, S:S + n_obj] = False
        out = Drag(moved.src, moved.dst, background, source, moved.mask, mask)
        self._drags[key] = out
        return out

    def attend(self, call: AttnCall) -> Tensor:
        phase, site = call.site.phase, call.site
        img = call.image
        if phase not in ("source", "target"):
            raise ValueError(f"DiffUHaul needs handle.phase = 'source' (record the source image) or 'target' "
                             f"(drag), got {phase!r}")
        geo = self.drag(call.grid, call.text_len, call.image_ids)  # a bad drag is refused in the source pass already
        if phase == "source":
            self.bank.put(site.name, site.step, (call.k if call.k_plain is None else call.k_plain)[:, :, img],
                          call.v[:, :, img], tag=_TAG)
            return call.attend()
        k_s, v_s = self.bank.get(site.name, site.step, tag=_TAG, device=call.q.device)
        B = call.batch
        if k_s.shape[0] not in (1, B) or k_s.shape[2] != img.stop - img.start:
            raise ValueError(f"the source pass recorded [B, H, N] = {list(k_s.shape[:3])} at {site.name} step "
                             f"{site.step}; this target call has batch {B} and {img.stop - img.start} image tokens "
                             "(accepted: the same batch or a source batch of 1, the same image size)")
        k_s, v_s = k_s.expand(B, -1, -1, -1), v_s.expand(B, -1, -1, -1)
        cell_token = _regions.token_table(call.image_ids, call.grid).to(call.q.device)  # cell -> image token

        def keys_at(src: Tensor, dst: Tensor) -> Tensor:  # source tokens of cells src placed at cells dst
            k = k_s[:, :, cell_token[src]]
            if call.k_plain is None:
                return k
            return call.rotate(k, call.image_ids[cell_token[dst]])

        src, dst, bg = (t.to(call.q.device) for t in (geo.src, geo.dst, geo.background))
        k_obj, v_obj = keys_at(src, dst), v_s[:, :, cell_token[src]]
        k_bg, v_bg = keys_at(bg, bg), v_s[:, :, cell_token[bg]]
        k, v = call.k, call.v
        a = self.weight(site.step)
        if a > 0:  # soft anchoring: the target's object cells pulled to the dragged source object
            at = call.text_len + cell_token[dst]
            k, v = k.clone(), v.clone()
            k[:, :, at] = (1 - a) * k[:, :, at] + a * k_obj
            v[:, :, at] = (1 - a) * v[:, :, at] + a * v_obj
        keys, values = torch.cat([k, k_obj, k_bg], 2), torch.cat([v, v_obj, v_bg], 2)
        return call.attend(call.q, keys, values, mask=geo.mask.to(call.q.device)[None, None])
