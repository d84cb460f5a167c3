"""IR-Diffusion: isolation and reposition attention for multi-subject consistency.

"Improving Multi-Subject Consistency in Open-Domain Image Generation with Isolation and
Reposition Attention", He et al., arXiv 2411.19261 (official code: the DreamStory repository,
SDXL). Each reference row holds one subject (or several); the target row holds them all.

Legend: S tokens of the call (L text tokens, then N = h * w image tokens), T_i the target's region
of subject i, R_i the region of subject i in its reference row r_i, ``src_i(p)`` the reference cell
that target cell p takes its token from (:mod:`attnkit.diffusion.regions`: nearest-neighbour
resampling of R_i's bounding box onto T_i's bounding box).

For the target row, with its own q / k / v and, per subject i, extra keys and values taken from
its reference:

* **reposition** (``reposition=True``): the reference's subject is scaled and moved onto the
  target's subject: for every cell p of T_i's bounding box with ``src_i(p)`` in R_i, a key
  ``RoPE_p(k_plain[r_i, src_i(p)])`` and value ``v[r_i, src_i(p)]``, i.e. the reference token
  resampled to p and, in FLUX, rotated at p's position (``call.rotate``; the official SDXL code
  resamples the hidden states before the projections, the same for a per-token projection and a
  nearest-neighbour resampling). ``reposition=False``: the reference tokens of R_i at their own
  positions.
* **isolation** (``isolate=True``): an image query in T_i sees none of the target's own keys in
  T_j, j != i (subjects do not attend to each other), and only subject i's reference keys.
* the target's background image queries and its text queries see the target's own keys only.

    out_target[p] = softmax(q_p [K_own; K_ref]^T * scale + log M[p]) [V_own; V_ref]

with ``M[p]`` the boolean mask above. Every other row (the references) attends as usual. A single
subject whose regions are the whole image makes IR-Diffusion StyleAligned's shared attention for
the target's image queries (:class:`attnkit.diffusion.SharedAttention`).

Differences from plain attention: the target attends to extra (moved) reference keys and its
subjects are isolated. From the official code: isolation is applied wherever the method acts
(there it is applied in the layers without sharing, and sharing layers leave the target's own
keys unmasked); no DIFT feature injection and no mutual cross-attention (out of scope here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from . import regions as _regions
from .sharing import AttnCall, Sharing, rows

__all__ = ["IRDiffusion", "Plan"]


@dataclass
class Plan:
    """What the target row attends to in one call: ``mask`` ``[S, S + n]`` (True: the pair counts;
    the first S columns are the target's own keys, then the n reference keys), per subject the
    reference cells ``src`` and the target cells ``dst`` of its n_i extra keys (flat grid indices)."""

    mask: Tensor
    src: list[Tensor]
    dst: list[Tensor]


class IRDiffusion(Sharing):
    """Isolation and reposition attention (see the module docstring).

    ``references``: one row index per subject (within each group of ``chunks``), the row that holds
    that subject; ``target_row``: the row holding all subjects (not ``target``: :func:`apply` takes
    that name). ``reference_masks`` / ``target_masks``:
    one region per subject, a boolean ``[h, w]`` mask over the image-token grid or a box
    ``(y0, x0, y1, x1)`` in token units (half-open). Target regions must not overlap (isolation
    would hide a token from itself). ``chunks=2`` for classifier-free guidance's halves."""

    name = "ir-diffusion"

    def __init__(self, references: Sequence[int] = (0,), target_row: int = 1, *, reference_masks=(), target_masks=(),
                 isolate: bool = True, reposition: bool = True, chunks: int = 1, blocks=None, steps=None):
        super().__init__(blocks=blocks, steps=steps)
        if isinstance(references, int) and not isinstance(references, bool):
            references = (references,)
        references = tuple(references)
        if not references or any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in references):
            raise ValueError(f"references must be row indices >= 0, one per subject, got {references!r}")
        if isinstance(target_row, bool) or not isinstance(target_row, int) or target_row < 0:
            raise ValueError(f"target_row must be a row index >= 0, got {target_row!r}")
        if target_row in references:
            raise ValueError(f"target_row={target_row} is also a reference row ({list(references)}); the target "
                             "must be another row")
        n = len(references)
        reference_masks, target_masks = tuple(reference_masks), tuple(target_masks)
        if len(reference_masks) != n or len(target_masks) != n:
            raise ValueError(f"{n} subject(s) (references={list(references)}) need {n} reference_masks and {n} "
                             f"target_masks, got {len(reference_masks)} and {len(target_masks)}")
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"chunks must be an integer >= 1, got {chunks!r}")
        self.references, self.target_row, self.chunks = references, target_row, chunks
        self.reference_masks = tuple(_regions.as_spec(m, f"reference_masks[{i}]")
                                     for i, m in enumerate(reference_masks))
        self.target_masks = tuple(_regions.as_spec(m, f"target_masks[{i}]") for i, m in enumerate(target_masks))
        self.isolate, self.reposition = bool(isolate), bool(reposition)
        self._plans: dict = {}

    def reset(self) -> None:
        self._plans.clear()

    def plan(self, grid, text_len: int, image_ids: Tensor | None = None) -> Plan:
        """The target row's mask and moved cells for a call with this ``grid`` (h, w) and
        ``text_len`` (see :class:`Plan`); ``ValueError`` on a region that does not fit the grid or
        target regions that overlap."""
        key = (grid, text_len)
        if key in self._plans:
            return self._plans[key]
        targets = [_regions.region(m, grid, f"target_masks[{i}]") for i, m in enumerate(self.target_masks)]
        refs = [_regions.region(m, grid, f"reference_masks[{i}]") for i, m in enumerate(self.reference_masks)]
        for i in range(len(targets)):
            for j in range(i):
                if bool((targets[i] & targets[j]).any()):
                    raise ValueError(f"target_masks[{j}] and target_masks[{i}] overlap in "
                                     f"{int((targets[i] & targets[j]).sum())} token(s); IR-Diffusion isolates "
                                     "subjects, so their target regions must be disjoint")
        table = _regions.token_table(image_ids, grid) + text_len  # cell -> sequence position
        S = text_len + grid[0] * grid[1]
        own = torch.ones(S, S, dtype=torch.bool)
        rows_of = [table[_regions.cells(t)] for t in targets]  # the target's query positions per subject
        if self.isolate:
            for i, qi in enumerate(rows_of):
                for j, kj in enumerate(rows_of):
                    if i != j:
                        own[qi[:, None], kj[None, :]] = False
        srcs, dsts, cols = [], [], []
        for i, (ref, tgt) in enumerate(zip(refs, targets)):
            if self.reposition:
                moved = _regions.move(ref, _regions.bbox(tgt))
                src, dst = moved.src, moved.dst
            else:
                src = dst = _regions.cells(ref)
            block = torch.zeros(S, src.numel(), dtype=torch.bool)
            block[rows_of[i]] = True  # only subject i's target queries see subject i's reference
            srcs.append(src), dsts.append(dst), cols.append(block)
        plan = Plan(torch.cat([own, *cols], dim=1), srcs, dsts)
        self._plans[key] = plan
        return plan

    def attend(self, call: AttnCall) -> Tensor:
        groups = rows(call.batch, self.chunks)
        size = len(groups[0])
        for what, idx in (("references", max(self.references)), ("target_row", self.target_row)):
            if idx >= size:
                raise ValueError(f"{what} index {idx} is outside the batch's groups of {size} rows (batch "
                                 f"{call.batch}, chunks={self.chunks}); accepted: 0 .. {size - 1}")
        plan = self.plan(call.grid, call.text_len, call.image_ids)
        table = (_regions.token_table(call.image_ids, call.grid) + call.text_len).to(call.q.device)
        q, k, v = call.q, call.k, call.v
        targets = [g[self.target_row] for g in groups]
        others = [r for r in range(call.batch) if r not in targets]
        out = torch.empty_like(q[..., :1]).expand(*q.shape[:3], v.shape[3]).contiguous()
        if others:  # the references (and any other row) attend as usual
            out[others] = call.attend(q[others], k[others], v[others])
        mask = plan.mask.to(q.device)[None, None]  # [1, 1, S, S + n]
        for g, t in zip(groups, targets):
            keys, values = [k[t:t + 1]], [v[t:t + 1]]
            for i, (src, dst) in enumerate(zip(plan.src, plan.dst)):
                r = g[self.references[i]]
                at, to = table[src.to(q.device)], table[dst.to(q.device)]
                if call.k_plain is not None:  # FLUX: the reference token rotated at its new position
                    ids = call.image_ids[(to - call.text_len)]
                    keys.append(call.rotate(call.k_plain[r:r + 1, :, at], ids))
                else:
                    keys.append(k[r:r + 1, :, at])
                values.append(v[r:r + 1, :, at])
            out[t:t + 1] = call.attend(q[t:t + 1], torch.cat(keys, 2), torch.cat(values, 2), mask=mask)
        return out
