"""AlignedGen: style-aligned images from a DiT (FLUX) by attention sharing with shifted positions.

Paper: "AlignedGen: Aligning Style Across Generated Images", Zhang, Du, Wang, Li, Gu, Zhang
(NeurIPS 2025), arXiv 2509.17088; official code github.com/Jiexuanz/AlignedGen
(``aligngen/attention_processor.py``, ``aligned_transformer.py``, ``aligned_pipeline.py``,
``inference.py``). Legend as in :mod:`attnkit.diffusion.sharing`: B rows, H heads, S tokens of
the call (L text first, then N image tokens), D head dim; ``r`` a target's reference row.

Why. Sharing attention naively in a DiT (every target also attends to the reference's image
keys, :class:`~attnkit.diffusion.sharing.SharedAttention`) makes the targets copy the
reference's layout: RoPE gives a target token at (i, j) and the reference token at (i, j) the
same position, so their scores carry a strong "same place" bias (the paper's "positional
collision"). **ShiftPE** moves the reference's keys to positions no target token has: the
reference sits beside the targets, (i, j) -> (i, j + w) with w the latent grid's width.

The computation, per attention call in the chosen blocks (``[B, H, S, D]``; a target row t with
reference r; ``p(x, ids)`` FLUX's RoPE of the pre-RoPE tensor x at position ids)::

    q_t' = [q_t[text], p(AdaIN(q~_t[img], q~_r[img]), ids)]          # q~: before RoPE
    k_t' = [k_t[text], p(AdaIN(k~_t[img], k~_r[img]), ids)]
    k_R  = lambda * p(k~_r[img], ids + (0, 0, w))                      # ShiftPE: beside the targets
    out_t = softmax([q_t' k_t'^T, q_t' k_R^T] * scale) [v_t ; v_r[img]]
    out_r = the stock attention of r                                  # the reference is not changed

with ``AdaIN(x, y) = (x - mean(x)) / sqrt(var(x) + eps) * sqrt(var(y) + eps) + mean(y)`` per head
and channel over the image tokens (unbiased variance, eps 1e-5, as the official code). That is
the paper's Advanced Attention Sharing (AAS) as the official code runs it: (1) only the
reference's **image** tokens are shared (its text is not; each target keeps its own text),
(2) the reference row is masked from the shared keys (``constrain_first``: it generates as if
alone), (3) the shared keys are scaled by ``style_lambda`` (1.1; a multiplier of their logits,
i.e. a temperature on the target-to-reference scores, not an additive bias), (4) AdaIN of the
targets' image queries and keys to the reference's statistics, before RoPE, (5) in FLUX's
single-stream blocks only (the official ``block=(19, 57)`` of 19 + 38 modules), at every step.

Options. ``shift``: ``True`` (the paper's ShiftPE: x + grid width), ``False`` (ShiftPE off: the
naive positions, for ablations), an int ``dx`` or a pair ``(dy, dx)`` added to the reference's
(y, x) ids; a shift that lands the reference on the targets' positions is a ``ValueError``.
``style_lambda``: a number > 0, or ``"decrease"`` (the official code's other mode:
``lambda = (t / 1000)^2`` of the scheduler's t, i.e. ``timestep^2`` of what FLUX's pipeline passes,
so sharing fades as denoising ends). ``adain=False`` drops the AdaIN. ``chunks``: classifier-free
guidance halves (1 for FLUX.1-dev, which is guidance-distilled).

What differs from the official code (the outputs are the same up to rounding):
- the reference row attends as the stock call (official: its q / k go through AdaIN with its
  own statistics, ``(x - m) / s * s + m``, and the shared keys are masked with -inf; the same
  values up to rounding);
- the shift is the grid's width read from FLUX's ``img_ids`` (official: ``width // 16`` of the
  pipeline's pixel width, the same number for FLUX's VAE x8 and 2x2 patches);
- blocks and steps are chosen by module name and denoiser call (official: by processor index and
  the sampling step index); ``blocks="single_transformer_blocks"`` is the official (19, 57);
- ``"decrease"`` reads the timestep the pipeline passes to the transformer (FLUX: t / 1000).

The paper's text was not at hand beyond its abstract and secondary summaries; the math above
follows the official code. A UNet has no RoPE: there ``shift`` must be ``False`` (then this is
StyleAligned's sharing with AlignedGen's scaling and masking).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sharing import AttnCall, Sharing, reference_rows

__all__ = ["AlignedGen"]


def _adain(x: Tensor, ref: Tensor, eps: float = 1e-5) -> Tensor:
    """x ``[b, H, N, D]`` normalised per head and channel over its tokens to ``ref``'s statistics
    (the official code's: unbiased variance, eps inside the square root)."""
    mu, sd = x.mean(2, keepdim=True), (x.var(2, keepdim=True) + eps).sqrt()
    rmu, rsd = ref.mean(2, keepdim=True), (ref.var(2, keepdim=True) + eps).sqrt()
    return (x - mu) / sd * rsd + rmu


def _as_shift(shift):
    if isinstance(shift, bool):
        return shift
    if isinstance(shift, int):
        return (0, shift)
    if (isinstance(shift, (tuple, list)) and len(shift) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) for s in shift)):
        return (int(shift[0]), int(shift[1]))
    raise ValueError(f"shift must be True (ShiftPE: beside the targets), False (off), an int dx or a pair (dy, dx) "
                     f"of ints, got {shift!r}")


class AlignedGen(Sharing):
    """AlignedGen (arXiv 2509.17088): shared attention with the reference's keys at shifted
    positions (ShiftPE), AdaIN, a logit scale and the reference kept stock; see the module
    docstring for the math and what differs from the official code.

    ``reference``: the reference row of each group (:func:`~attnkit.diffusion.sharing.rows`)."""

    name = "alignedgen"

    def __init__(self, reference: int = 0, *, shift=True, style_lambda: float | str = 1.1, adain: bool = True,
                 chunks: int = 1, blocks="single_transformer_blocks", steps=None):
        super().__init__(blocks=blocks, steps=steps)
        if isinstance(reference, bool) or not isinstance(reference, int) or reference < 0:
            raise ValueError(f"reference must be a row index >= 0, got {reference!r}")
        if style_lambda != "decrease" and (isinstance(style_lambda, bool) or not isinstance(style_lambda, (int, float))
                                           or not style_lambda > 0):
            raise ValueError(f"style_lambda must be a number > 0 or 'decrease' (lambda = timestep^2), "
                             f"got {style_lambda!r}")
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"chunks must be an integer >= 1, got {chunks!r}")
        self.reference, self.style_lambda, self.adain, self.chunks = reference, style_lambda, bool(adain), chunks
        self.shift = _as_shift(shift)

    def reference_ids(self, image_ids: Tensor) -> Tensor:
        """The positions ``[N, 3]`` (frame, y, x) the reference's keys take, given the targets'
        ``image_ids`` ``[N, 3]``: shifted by ``shift`` (``True``: by the grid's width along x), or
        the same ids with ShiftPE off. Raises ``ValueError`` where the shifted box meets the
        targets' box (positions would coincide)."""
        if self.shift is False:
            return image_ids
        y, x = image_ids[:, 1], image_ids[:, 2]
        height, width = int(y.max() - y.min()) + 1, int(x.max() - x.min()) + 1
        dy, dx = (0, width) if self.shift is True else self.shift
        if abs(dy) < height and abs(dx) < width:
            raise ValueError(f"shift={self.shift} puts the reference's positions on the targets' (their ids span "
                             f"{height} x {width} in (y, x)); accepted: |dy| >= {height} or |dx| >= {width}, True "
                             "(beside the targets), or False (ShiftPE off)")
        ids = image_ids.clone()
        ids[:, 1] += dy
        ids[:, 2] += dx
        return ids

    def _lambda(self, call: AttnCall) -> float:
        if self.style_lambda != "decrease":
            return float(self.style_lambda)
        t = call.site.timestep
        if t is None:
            raise ValueError("style_lambda='decrease' needs the timestep the pipeline passes to the denoiser; "
                             "this call has none")
        return float(t.reshape(-1)[0]) ** 2 if isinstance(t, Tensor) else float(t) ** 2

    def attend(self, call: AttnCall) -> Tensor:
        ref_of, targets, refs = reference_rows(call.batch, self.reference, self.chunks)
        q, k, v = call.q, call.k, call.v
        rope = call.k_plain is not None
        if self.shift is not False and not rope:
            raise ValueError(f"alignedgen: ShiftPE (shift={self.shift}) moves rotary positions, and {call.site.name} "
                             "has none (a UNet); pass shift=False there")
        if rope and call.image_ids is None:
            raise ValueError(f"alignedgen: {call.site.name} has RoPE but no image ids were seen (img_ids); "
                             "call the FLUX transformer with img_ids")
        out = torch.empty_like(q[..., :1]).expand(*q.shape[:3], v.shape[3]).contiguous()
        out[refs] = call.attend(q[refs], k[refs], v[refs]) if targets else call.attend()  # the reference: stock
        if not targets:
            return out
        t = torch.tensor(targets, device=q.device)
        r = torch.tensor([ref_of[i] for i in targets], device=q.device)
        img, L = call.image, call.text_len
        qt, kt = q[t], k[t]
        if self.adain:  # before RoPE (where there is one), as the official code
            if rope:
                qp, kp = call.q_plain, call.k_plain
                q_img = call.rotate(_adain(qp[t][:, :, img], qp[r][:, :, img]), call.image_ids)
                k_img = call.rotate(_adain(kp[t][:, :, img], kp[r][:, :, img]), call.image_ids)
            else:
                q_img, k_img = _adain(q[t][:, :, img], q[r][:, :, img]), _adain(k[t][:, :, img], k[r][:, :, img])
            qt = torch.cat([qt[:, :, :L], q_img], dim=2)
            kt = torch.cat([kt[:, :, :L], k_img], dim=2)
        if rope and self.shift is not False:
            k_ref = call.rotate(call.k_plain[r][:, :, img], self.reference_ids(call.image_ids))  # [b, H, N, D]
        else:
            k_ref = k[r][:, :, img]
        keys = torch.cat([kt, self._lambda(call) * k_ref], dim=2)  # [b, H, S + N, D]
        values = torch.cat([v[t], v[r][:, :, img]], dim=2)
        out[t] = call.attend(qt, keys, values)
        return out
