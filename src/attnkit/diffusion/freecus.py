"""FreeCus: training-free subject-driven customization of a DiT (FLUX) by pivotal attention sharing.

Paper: "FreeCus: Free Lunch Subject-driven Customization in Diffusion Transformers", Zhang et al.
(ICCV 2025), arXiv 2507.15249; official code github.com/Monalissaa/FreeCus
(``sa_handler_for_flux_clean.py``, ``infer.py``, ``flux_utils.py``). Legend as in
:mod:`attnkit.diffusion.sharing`: B rows, H heads, S tokens of the call (L text first, then N
image tokens), D head dim; n the reference's subject tokens.

Pivotal attention sharing. A reference image of the subject is run through the same FLUX
transformer (its latents noised at each step, see below) and, in a few "pivotal" attention
modules only, each target's queries also attend to the reference's **subject** image tokens
(its foreground: ``mask``), with their keys and the target's own text keys scaled by
``scale``::

    keys   = [scale * k_R[fg] ; scale * k_t[text] ; k_t[img]]     # k_R: the reference's, after RoPE
    values = [v_R[fg]         ; v_t[text]         ; v_t[img]]
    out_t  = softmax(q_t keys^T * s) values                         # elsewhere: the stock attention

(``scale`` multiplies those keys, so it is a temperature on their logits; ``scale_text=False``
leaves the text keys alone.) Sharing only in the pivotal modules keeps the subject's identity
without copying the reference's layout. The official pivotal modules of FLUX.1 (indices 0, 1, 2,
17, 18, 25, 28, 53, 54, 56 of its 19 + 38 attention modules) are the default ``blocks``
(:data:`PIVOTAL_FLUX`); every step shares. The reference's keys keep the reference's own RoPE
positions (the same grid as the target's: the official code does not shift them).

Dynamic shifting (the paper's "upgraded dynamic shifting"). FLUX's scheduler shifts its sigmas
by ``mu`` (larger for more image tokens: ``sigma' = e^mu / (e^mu + 1/sigma - 1)``). FreeCus noises
the reference with the shift **negated** (``mu -> -mu``, official ``--mu_shift_type negative``),
so at step i the reference's latents are ``z_i = (1 - sigma'_i) x0 + sigma'_i eps``, far less
noisy than the target's at the same step, while the transformer is still told the pipeline's
own timestep t_i: the reference's features keep fine detail. :func:`reference_sigmas`,
:func:`reference_latents` and :func:`reference_callback` compute those (``mu_scale``: -1 the
official default; -0.5 / -2 / 1 its ``half_negative`` / ``twice_negative`` / ``normal``).
It is not a shift of positions.

Two ways to give the reference (the same numbers: rows of a batch do not interact elsewhere):

- ``reference=0`` (one pass): row 0 of the batch (of each classifier-free guidance group,
  ``chunks``) is the reference; it attends as the stock call, and :func:`reference_callback`
  puts ``z_{i+1}`` in that row after every step (start the pipeline with ``z_0`` there).
- ``bank=KVBank()`` (two passes, the official form): with ``handle.phase = "reference"`` the
  method records the reference's subject keys and values per (module, step) while the pipeline
  runs on the reference's latents (``latents=z_0``, ``callback_on_step_end=reference_callback``);
  then ``handle.reset()``, ``handle.phase = "sample"``, and the target pass reads them.

What differs from the official code: the official pass records the keys already scaled
(``1.1 * k``) at every module and reads those of the pivotal ones; here the bank keeps them
unscaled and only in the chosen blocks (the scale is applied when they are used: the same
numbers). The foreground ``mask`` is given by the caller (official: BiRefNet's segmentation,
resized to the token grid, > 0); ``mask=None`` shares every image token. Out of scope: the
paper's MLLM caption enrichment (Qwen2-VL describes the subject, Qwen2.5 filters the
description, appended to the prompt of both passes): write that into the prompts yourself.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .sharing import AttnCall, KVBank, Sharing, reference_rows, rows

__all__ = ["FreeCus", "PIVOTAL_FLUX", "flux_mu", "reference_callback", "reference_latents", "reference_sigmas"]

#: The official pivotal attention modules of FLUX.1 (dev / schnell: 19 double + 38 single blocks).
PIVOTAL_FLUX = ("transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2", "transformer_blocks.17",
                "transformer_blocks.18", "single_transformer_blocks.6", "single_transformer_blocks.9",
                "single_transformer_blocks.34", "single_transformer_blocks.35", "single_transformer_blocks.37")


def _check_mask(mask):
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = f"{mask.dtype} tensor" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a boolean tensor over the reference's image tokens ([N] or [h, w]; True: "
                         f"the subject), got {got}")
    if not bool(mask.any()):
        raise ValueError("mask selects no token of the reference; accepted: a boolean mask with at least one True "
                         "(or None: every image token)")
    return mask.reshape(-1)


class FreeCus(Sharing):
    """FreeCus (arXiv 2507.15249): pivotal attention sharing with a reference subject; see the
    module docstring for the math, the two ways to give the reference, and what differs from
    the official code.

    ``reference``: the reference row of each group (one pass), or ``None`` with ``bank`` (two
    passes); ``mask``: boolean ``[N]`` (or ``[h, w]``) over the reference's image tokens, True on
    the subject; ``scale`` (1.1): multiplies the shared keys and, with ``scale_text``, the
    target's text keys; ``blocks``: the pivotal modules (default :data:`PIVOTAL_FLUX`)."""

    name = "freecus"

    def __init__(self, reference: int | None = None, *, bank: KVBank | None = None, mask: Tensor | None = None,
                 scale: float = 1.1, scale_text: bool = True, chunks: int = 1, blocks=PIVOTAL_FLUX, steps=None):
        super().__init__(blocks=blocks, steps=steps)
        if reference is not None and (isinstance(reference, bool) or not isinstance(reference, int) or reference < 0):
            raise ValueError(f"reference must be a row index >= 0 or None (with bank=), got {reference!r}")
        if (reference is None) == (bank is None):
            raise ValueError("FreeCus takes either reference=<row> (the reference in the same batch) or "
                             f"bank=KVBank() (recorded in a reference pass), got reference={reference!r}, "
                             f"bank={type(bank).__name__ if bank is not None else None}")
        if bank is not None and not isinstance(bank, KVBank):
            raise ValueError(f"bank must be an attnkit.diffusion.KVBank, got {type(bank).__name__}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"scale must be a number > 0, got {scale!r}")
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"chunks must be an integer >= 1, got {chunks!r}")
        self.reference, self.bank, self.scale, self.chunks = reference, bank, scale, chunks
        self.scale_text = bool(scale_text)
        self.mask = _check_mask(mask)

    def _subject(self, call: AttnCall) -> Tensor:
        """Indices of the shared tokens among the image tokens."""
        n = call.q.shape[2] - call.text_len
        if self.mask is None:
            return torch.arange(n, device=call.q.device)
        if self.mask.numel() != n:
            raise ValueError(f"mask has {self.mask.numel()} entries but {call.site.name} has {n} image tokens"
                             f"{f' (grid {call.grid[0]} x {call.grid[1]})' if call.grid else ''}; accepted: a mask "
                             "over the reference's image tokens at the latent resolution")
        return self.mask.to(call.q.device).nonzero().squeeze(1)

    def _shared(self, call: AttnCall, q: Tensor, k: Tensor, v: Tensor, k_ref: Tensor, v_ref: Tensor) -> Tensor:
        """Targets q / k / v ``[b, H, S, D]`` attending also to the reference's k_ref / v_ref ``[b, H, n, D]``."""
        L = call.text_len
        if self.scale_text and L:
            k = torch.cat([self.scale * k[:, :, :L], k[:, :, L:]], dim=2)
        keys = torch.cat([self.scale * k_ref, k], dim=2)  # [b, H, n + S, D]
        values = torch.cat([v_ref, v], dim=2)
        return call.attend(q, keys, values)

    def attend(self, call: AttnCall) -> Tensor:
        fg, img = self._subject(call), call.image
        q, k, v = call.q, call.k, call.v
        if self.reference is None:
            if call.site.phase == "reference":  # the reference pass: keep its subject's keys and values
                self.bank.put(call.site.name, call.site.step, k[:, :, img][:, :, fg], v[:, :, img][:, :, fg])
                return call.attend()
            try:
                k_ref, v_ref = self.bank.get(call.site.name, call.site.step, device=q.device)  # [Bref, H, n, D]
            except ValueError as err:
                raise ValueError(f"{err}; FreeCus records in a pass run with handle.phase = 'reference'") from None
            groups = rows(call.batch, self.chunks)
            if (k_ref.dim() != 4 or k_ref.shape[0] not in (1, len(groups)) or k_ref.shape[1] != q.shape[1]
                    or k_ref.shape[3] != q.shape[3]):
                raise ValueError(f"the bank's reference keys for {call.site.name} at step {call.site.step} are "
                                 f"{tuple(k_ref.shape)}; this call needs [1 or chunks={len(groups)}, {q.shape[1]}, n, "
                                 f"{q.shape[3]}] (was the reference pass run on one image, with the same model?)")
            if k_ref.shape[0] > 1:  # one reference per classifier-free guidance group
                k_ref = k_ref.repeat_interleave(len(groups[0]), dim=0)
                v_ref = v_ref.repeat_interleave(len(groups[0]), dim=0)
            else:
                k_ref, v_ref = k_ref.expand(call.batch, -1, -1, -1), v_ref.expand(call.batch, -1, -1, -1)
            return self._shared(call, q, k, v, k_ref, v_ref)
        ref_of, targets, refs = reference_rows(call.batch, self.reference, self.chunks)
        out = torch.empty_like(q[..., :1]).expand(*q.shape[:3], v.shape[3]).contiguous()
        out[refs] = call.attend(q[refs], k[refs], v[refs]) if targets else call.attend()  # the reference: stock
        if targets:
            t = torch.tensor(targets, device=q.device)
            r = torch.tensor([ref_of[i] for i in targets], device=q.device)
            out[t] = self._shared(call, q[t], k[t], v[t], k[r][:, :, img][:, :, fg], v[r][:, :, img][:, :, fg])
        return out


# -- dynamic shifting: the reference's latents per step -------------------------------------------------


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """FLUX's sigma shift ``mu`` for ``image_seq_len`` image tokens (linear in the token count,
    as FLUX's pipeline computes it from its scheduler's config)."""
    if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, int) or image_seq_len < 1:
        raise ValueError(f"image_seq_len must be an integer >= 1, got {image_seq_len!r}")
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def reference_sigmas(num_steps: int, mu: float, mu_scale: float = -1.0) -> Tensor:
    """The reference's noise levels ``[num_steps]`` (float64): FLUX's default sigmas
    ``linspace(1, 1 / num_steps)`` shifted with ``mu_scale * mu`` instead of ``mu``:
    ``sigma' = e^m / (e^m + 1 / sigma - 1)``, ``m = mu_scale * mu`` (-1: FreeCus's negative shift;
    1: the target's own sigmas; 0: unshifted)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    for name, value in (("mu", mu), ("mu_scale", mu_scale)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    sigma = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    shift = math.exp(mu_scale * mu)
    return shift / (shift + (1.0 / sigma - 1.0))


def reference_latents(x0: Tensor, noise: Tensor, sigmas: Tensor) -> Tensor:
    """The reference's latents at every step ``[len(sigmas), *x0.shape]``: the flow-matching
    interpolation ``(1 - sigma) x0 + sigma noise`` of the clean (packed) latents ``x0`` with one
    fixed ``noise`` of the same shape."""
    if not isinstance(x0, Tensor) or not isinstance(noise, Tensor) or x0.shape != noise.shape:
        raise ValueError(f"x0 and noise must be tensors of one shape, got "
                         f"{tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__} and "
                         f"{tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__}")
    if not isinstance(sigmas, Tensor) or sigmas.dim() != 1 or not bool(((sigmas >= 0) & (sigmas <= 1)).all()):
        raise ValueError("sigmas must be a 1-D tensor of noise levels in [0, 1] (see reference_sigmas)")
    s = sigmas.to(x0.dtype).reshape(-1, *([1] * x0.dim()))
    return (1 - s) * x0 + s * noise


def reference_callback(latents: Tensor, row: int = 0, chunks: int = 1):
    """A ``callback_on_step_end`` for a diffusers pipeline that puts the reference's latents of
    the next step, ``latents[i + 1]`` (``[steps, N, C]`` or ``[steps, 1, N, C]``, from
    :func:`reference_latents`), into row ``row`` of each group of the batch after step i. Start
    the pipeline with ``latents[0]`` in those rows (``pipe(latents=...)``)."""
    if not isinstance(latents, Tensor) or latents.dim() not in (3, 4):
        raise ValueError("latents must be the reference's latents per step, [steps, N, C] or [steps, 1, N, C]")
    if isinstance(row, bool) or not isinstance(row, int) or row < 0:
        raise ValueError(f"row must be a row index >= 0, got {row!r}")
    per_step = latents if latents.dim() == 3 else latents[:, 0]

    def callback(pipe, i, t, kwargs):
        current = kwargs["latents"]
        groups = rows(current.shape[0], chunks)
        if row >= len(groups[0]):
            raise ValueError(f"row={row} is outside the batch's groups of {len(groups[0])} rows")
        current = current.clone()
        nxt = per_step[min(i + 1, len(per_step) - 1)].to(current.device, current.dtype)
        for g in groups:
            current[g[row]] = nxt
        return {"latents": current}

    return callback
