"""Regions over the image-token grid shared by the region-aware methods (IR-Diffusion, DiffUHaul).

A region is given either as a boolean mask ``[h, w]`` over the grid of image tokens of an
attention call (``call.grid``) or as a box ``(y0, x0, y1, x1)`` in token units, half-open
(rows ``y0 <= y < y1``, columns ``x0 <= x < x1``). Boxes need no grid at construction; both are
checked against the call's grid when the method first acts (a mask of another size is a
``ValueError``).

Moving a region (IR-Diffusion's reposition, DiffUHaul's drag) maps every cell ``p`` of the
destination box to the source cell ``src(p)`` by nearest-neighbour resampling, the rule of
``torch.nn.functional.interpolate(mode="nearest")``: ``src_y = y0_s + floor((p_y - y0_t) * h_s / h_t)``
(and the same for x). The moved region is the destination cells whose source cell is inside the
source region."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Move", "as_spec", "bbox", "cells", "move", "region", "token_table"]


def as_spec(spec, what: str):
    """Check a region given at construction: a boolean ``[h, w]`` tensor with a True, or a box of
    four integers ``(y0, x0, y1, x1)`` with ``0 <= y0 < y1`` and ``0 <= x0 < x1``."""
    if isinstance(spec, Tensor):
        if spec.dtype != torch.bool or spec.dim() != 2:
            raise ValueError(f"{what} must be a boolean mask [h, w] or a box (y0, x0, y1, x1), got a tensor "
                             f"{tuple(spec.shape)} {spec.dtype}")
        if not bool(spec.any()):
            raise ValueError(f"{what} is an empty mask (no True); a region needs at least one token")
        return spec.detach().cpu()
    if (isinstance(spec, (tuple, list)) and len(spec) == 4
            and all(isinstance(c, int) and not isinstance(c, bool) for c in spec)):
        y0, x0, y1, x1 = spec
        if not (0 <= y0 < y1 and 0 <= x0 < x1):
            raise ValueError(f"{what} box (y0, x0, y1, x1) = {tuple(spec)} needs 0 <= y0 < y1 and 0 <= x0 < x1 "
                             "(token units, half-open)")
        return tuple(spec)
    raise ValueError(f"{what} must be a boolean mask [h, w] or a box (y0, x0, y1, x1) of ints, got {spec!r}")


def region(spec, grid, what: str) -> Tensor:
    """The region as a boolean ``[h, w]`` mask on ``grid``; a mask of another size or a box past the
    grid is a ``ValueError``."""
    if grid is None:
        raise ValueError(f"{what}: this attention call's image tokens do not form a full grid (call.grid is None); "
                         "regions need FLUX img_ids of one full grid or a UNet latent")
    h, w = grid
    if isinstance(spec, Tensor):
        if tuple(spec.shape) != (h, w):
            raise ValueError(f"{what} is a mask of the wrong size {tuple(spec.shape)}: this call's image tokens form "
                             f"a grid of (h, w) = {(h, w)}; accepted: a boolean mask of that size or a box")
        return spec
    y0, x0, y1, x1 = spec
    if y1 > h or x1 > w:
        raise ValueError(f"{what} box (y0, x0, y1, x1) = {tuple(spec)} lies outside the image grid (h, w) = {(h, w)}")
    out = torch.zeros(h, w, dtype=torch.bool)
    out[y0:y1, x0:x1] = True
    return out


def bbox(mask: Tensor) -> tuple[int, int, int, int]:
    """The bounding box ``(y0, x0, y1, x1)`` (half-open) of a non-empty mask."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


def cells(mask: Tensor) -> Tensor:
    """Flat row-major cell indices ``[n]`` of the True entries of ``mask`` ``[h, w]``."""
    return torch.nonzero(mask.reshape(-1), as_tuple=True)[0]


@dataclass
class Move:
    """A region moved into a box: ``src`` / ``dst`` flat cell indices ``[n]`` (each destination cell
    and the source cell it takes its token from) and ``mask`` ``[h, w]``, the moved region."""

    src: Tensor
    dst: Tensor
    mask: Tensor


def move(source: Tensor, box: tuple[int, int, int, int]) -> Move:
    """Move the region ``source`` ``[h, w]`` (its bounding box) into ``box`` by nearest-neighbour
    resampling (see the module docstring)."""
    h, w = source.shape
    sy0, sx0, sy1, sx1 = bbox(source)
    ty0, tx0, ty1, tx1 = box
    th, tw = ty1 - ty0, tx1 - tx0
    ys = sy0 + (torch.arange(th) * (sy1 - sy0)) // th  # [th]: the source row of each destination row
    xs = sx0 + (torch.arange(tw) * (sx1 - sx0)) // tw
    src = (ys[:, None] * w + xs[None, :]).reshape(-1)
    dst = ((ty0 + torch.arange(th))[:, None] * w + (tx0 + torch.arange(tw))[None, :]).reshape(-1)
    keep = source.reshape(-1)[src]
    mask = torch.zeros(h * w, dtype=torch.bool)
    mask[dst[keep]] = True
    return Move(src[keep], dst[keep], mask.view(h, w))


def token_table(image_ids: Tensor | None, grid) -> Tensor:
    """``[h * w]``: the image token (counted from the first image token) at each flat grid cell.
    FLUX: read from ``img_ids`` (frame, y, x); without ids (a UNet): row-major."""
    h, w = grid
    if image_ids is None:
        return torch.arange(h * w)
    ys = (image_ids[:, 1] - image_ids[:, 1].min()).long().cpu()
    xs = (image_ids[:, 2] - image_ids[:, 2].min()).long().cpu()
    table = torch.empty(h * w, dtype=torch.long)
    table[ys * w + xs] = torch.arange(image_ids.shape[0])
    return table
