"""The spine of ``attnkit.diffusion``: attention processors through which a method decides what
each image's (or frame's) queries attend to, set on a diffusers model and removable.

Legend: B batch rows (images or frames), H heads, S tokens of the call (text first, then image
tokens, in FLUX's joint attention), D head dim, N image tokens, L text tokens.

How it hooks in. :func:`apply` walks the denoiser (``pipe.transformer`` or ``pipe.unet``, or the
model itself) for diffusers' attention modules (``AttentionModuleMixin`` ones such as FLUX's
``FluxAttention``, and ``Attention`` in UNets), sets an attnkit processor on each with
``set_processor``, and keeps the processors it replaced: :meth:`Handle.remove` puts them back.
A forward pre-hook on the denoiser counts its calls (``step``) and records the timestep, the
text length and FLUX's ``img_ids`` of the current call, so every attention call knows where it is.

What a method sees. Per attention call the processor asks the method ``active(site)`` (cheap:
the module and step); where it says no, **the replaced processor runs unchanged**, so a method
switched off reproduces the stock model bit for bit. Where it says yes, the processor computes
q / k / v exactly as diffusers' own processor does (projections, QK norms, FLUX's RoPE) and hands
them to ``method.attend(call)`` as an :class:`AttnCall` (``[B, H, S, D]``); the method returns the
attention output ``[B, H, S, D]`` and the processor finishes as diffusers does (output
projections, the split back into image and text streams). ``call.attend(...)`` is attnkit's
exact attention (SDPA / FlexAttention on CUDA), so a method never writes softmax itself.

The shared parts every sharing method needs live here: the reference / target rows of a batch
(:func:`rows`, with classifier-free guidance's halves), a :class:`KVBank` that keeps keys and
values of one pass for another, masks over image tokens (``call.attend(mask=...)``), re-rotating
keys at shifted positions (:meth:`AttnCall.rotate`), and per-block / per-step schedules
(``blocks`` / ``steps`` of :class:`Sharing`).

    >>> import attnkit.diffusion as ad                                       # doctest: +SKIP
    >>> with ad.apply(pipe, "shared-kv", reference=0) as handle:             # doctest: +SKIP
    ...     images = pipe(prompt_embeds=..., num_inference_steps=28).images
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from .. import patterns as _patterns
from ..ops.softmax import attend as _attend

__all__ = ["AttnCall", "Handle", "KVBank", "Sharing", "SharedAttention", "Site", "apply", "attention_modules",
           "rows", "reference_rows", "adain"]


# -- where a call is -------------------------------------------------------------------------------


@dataclass
class Site:
    """Where an attention call is: the module's name in the denoiser, its index among the routed
    modules, its kind, and the denoiser call it belongs to.

    ``kind``: ``"joint"`` (MM-DiT double block: text and image streams projected separately,
    attended together), ``"single"`` (MM-DiT single block: one stream, text tokens first),
    ``"self"`` / ``"cross"`` (a UNet's or video transformer's ``Attention``; cross: keys from the
    text). ``step``: the denoiser's forward calls since the handle was made or :meth:`Handle.reset`
    (a pipeline calls it once per sampling step, twice where it runs classifier-free guidance as
    two calls). ``timestep``: what the pipeline passed (FLUX: ``t`` in [0, 1]; UNets: 0-999)."""

    name: str
    index: int
    kind: str
    step: int
    timestep: Tensor | None
    phase: str | None


@dataclass
class AttnCall:
    """One attention call handed to a method. q / k / v ``[B, H, S, D]`` as the model attends them
    (QK norms and, FLUX, RoPE applied); ``q_plain`` / ``k_plain`` the same before RoPE (None where
    the model has no RoPE). The first ``text_len`` tokens are text (FLUX: joint and single blocks;
    0 in a UNet's self-attention); the image tokens follow. ``image_ids`` ``[N, 3]``: FLUX's
    (frame, y, x) positions of the image tokens in this call, ``grid`` their (h, w) when they form
    a full grid. ``scale``: the model's softmax scale."""

    site: Site
    q: Tensor
    k: Tensor
    v: Tensor
    q_plain: Tensor | None
    k_plain: Tensor | None
    text_len: int
    image_ids: Tensor | None
    grid: tuple[int, int] | None
    scale: float
    handle: "Handle"
    stock: Callable[[], Tensor] = field(repr=False, default=None)

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def image(self) -> slice:
        """The image tokens' slice of the sequence."""
        return slice(self.text_len, self.q.shape[2])

    def attend(self, q: Tensor | None = None, k: Tensor | None = None, v: Tensor | None = None, *,
               mask: Tensor | None = None, score_mod=None, backend: str = "auto") -> Tensor:
        """Exact softmax attention of q ``[B, H, T, D]`` over k / v ``[B, H, S', D]`` (default: the
        call's own), bidirectional, the model's scale; ``mask`` boolean ``[B|1, 1|H, T, S']``
        (True: the pair counts). -> ``[B, H, T, D]``."""
        q = self.q if q is None else q
        k = self.k if k is None else k
        v = self.v if v is None else v
        if q is self.q and k is self.k and v is self.v and mask is None and score_mod is None:
            return self.stock()  # the model's own attention path: bit for bit what diffusers computes
        pattern = None if mask is None else _patterns.DenseMask(_check_mask(mask, q, k))
        return _attend(q, k, v, pattern=pattern, scale=self.scale, score_mod=score_mod, backend=backend)

    def rotate(self, x_plain: Tensor, ids: Tensor) -> Tensor:
        """``x_plain`` ``[B, H, S, D]`` (before RoPE) rotated at positions ``ids`` ``[S, 3]`` with the
        model's own position embedding (FLUX's ``pos_embed``): how a method moves tokens, e.g.
        AlignedGen's shifted positions. Raises ``ValueError`` on a model without such an embedding."""
        pos_embed = self.handle.pos_embed
        if pos_embed is None:
            raise ValueError("rotate: this model has no FLUX-style pos_embed (rotary position ids); "
                             "accepted: FluxTransformer2DModel-like denoisers")
        if ids.dim() != 2 or ids.shape[0] != x_plain.shape[2]:
            raise ValueError(f"rotate: ids must be [S, n_axes] with S = {x_plain.shape[2]}, got {tuple(ids.shape)}")
        from diffusers.models.embeddings import apply_rotary_emb

        cos, sin = pos_embed(ids)
        return apply_rotary_emb(x_plain, (cos.to(x_plain.device), sin.to(x_plain.device)), sequence_dim=2)


def _check_mask(mask: Tensor, q: Tensor, k: Tensor) -> Tensor:
    B, H, T, S = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if (not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[0] not in (1, B)
            or mask.shape[1] not in (1, H) or tuple(mask.shape[2:]) != (T, S)):
        got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a boolean tensor [B|1, H|1, T, S] = [{B}|1, {H}|1, {T}, {S}], got {got}")
    if not bool(mask.any(-1).all()):
        raise ValueError("mask leaves a query with no key to attend; every row of the mask needs a True")
    return mask


# -- batches: references and targets ------------------------------------------------------------------


def rows(batch: int, chunks: int = 1) -> list[range]:
    """The batch's groups: ``chunks`` equal parts (classifier-free guidance runs ``[uncond, cond]``
    as two halves of one batch: ``chunks=2``), each of ``batch // chunks`` rows. A reference index
    is counted within each group, so the unconditional half shares with its own reference."""
    if chunks < 1 or batch % chunks:
        raise ValueError(f"chunks={chunks} does not divide the batch of {batch} rows; accepted: a divisor of "
                         f"{batch} (1, or 2 for a batch with classifier-free guidance's halves)")
    n = batch // chunks
    return [range(c * n, (c + 1) * n) for c in range(chunks)]


def reference_rows(batch: int, reference: int, chunks: int = 1) -> tuple[list[int], list[int], list[int]]:
    """``(ref_of, targets, refs)`` of a batch with one reference per group (:func:`rows`):
    ``ref_of[i]`` the reference row of row ``i``, the target rows, the reference rows. A reference
    index outside the groups is a ``ValueError``."""
    groups = rows(batch, chunks)
    if reference >= len(groups[0]):
        raise ValueError(f"reference={reference} is outside the batch's groups of {len(groups[0])} rows "
                         f"(batch {batch}, chunks={chunks}); accepted: 0 .. {len(groups[0]) - 1}")
    ref_of = [g[reference] for g in groups for _ in g]
    return ref_of, [i for i in range(batch) if ref_of[i] != i], [i for i in range(batch) if ref_of[i] == i]


def adain(x: Tensor, ref: Tensor, eps: float = 1e-5) -> Tensor:
    """Adaptive instance normalisation over tokens: ``x`` ``[B, H, S, D]`` given ``ref``'s per-head,
    per-channel mean and std over its tokens (StyleAligned's normalisation of queries and keys)."""
    mu, sd = x.mean(2, keepdim=True), x.std(2, keepdim=True, unbiased=False)
    rmu, rsd = ref.mean(2, keepdim=True), ref.std(2, keepdim=True, unbiased=False)
    return (x - mu) / (sd + eps) * rsd + rmu


class KVBank:
    """Keys and values kept from one pass to be used in another, by (module name, step, tag).

    A method records during a reference pass (e.g. an inversion) and reads them in the target
    pass (RF-Edit, DiffUHaul, FreeCus). ``device``: where to keep them (default: where they were;
    ``"cpu"`` to spare GPU memory). ``nbytes`` is what the bank holds."""

    def __init__(self, device: str | torch.device | None = None):
        self.device = None if device is None else torch.device(device)
        self._store: dict[tuple, tuple[Tensor, ...]] = {}

    def put(self, name: str, step: int, *tensors: Tensor, tag: str = "") -> None:
        self._store[name, int(step), tag] = tuple(
            (t.detach() if self.device is None else t.detach().to(self.device)) for t in tensors)

    def get(self, name: str, step: int, tag: str = "", device=None) -> tuple[Tensor, ...]:
        key = (name, int(step), tag)
        if key not in self._store:
            steps = sorted({s for n, s, t in self._store if n == name and t == tag})
            raise ValueError(f"KVBank holds nothing for module {name!r} at step {step} (tag {tag!r}); it holds "
                             f"steps {steps[:8]}{'...' if len(steps) > 8 else ''} of that module "
                             "(was the reference pass run with the same number of steps?)")
        out = self._store[key]
        return out if device is None else tuple(t.to(device) for t in out)

    def __contains__(self, key) -> bool:
        name, step, *tag = key
        return (name, int(step), tag[0] if tag else "") in self._store

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self._store.values() for t in ts)


# -- methods ---------------------------------------------------------------------------------------------


class Sharing:
    """Base of a method. ``blocks``: which attention modules it acts in: ``None`` (all), or names /
    name prefixes of modules (``"transformer_blocks"``, ``"single_transformer_blocks.3"``,
    ``"down_blocks.1"``) or their indices among the routed modules; a name that matches nothing is
    a ``ValueError`` at :func:`apply`. ``steps``: which denoiser calls, ``None`` (all), a
    ``(start, stop)`` pair (``start <= step < stop``) or a collection of steps. ``kinds``: which
    kinds of call (:class:`Site`), default self-attention-like ones (``joint``, ``single``,
    ``self``). Elsewhere the stock processor runs.

    Subclasses implement :meth:`attend` (and may override :meth:`active`, :meth:`bind`)."""

    name = "sharing"
    kinds: tuple[str, ...] = ("joint", "single", "self")

    def __init__(self, *, blocks=None, steps=None):
        self.blocks = None if blocks is None else _as_blocks(blocks)
        self.steps = _as_steps(steps)
        self._indices: set[int] | None = None

    def bind(self, handle: "Handle") -> None:
        """Called by :func:`apply` with the routed modules known: resolve ``blocks``."""
        if self.blocks is None:
            self._indices = None
            return
        names = handle.names
        chosen: set[int] = set()
        for entry in self.blocks:
            if isinstance(entry, int):
                if not 0 <= entry < len(names):
                    raise ValueError(f"{type(self).__name__}: block index {entry} is outside the model's "
                                     f"{len(names)} attention modules; accepted: 0 .. {len(names) - 1}")
                chosen.add(entry)
                continue
            hit = {i for i, n in enumerate(names) if n == entry or n.startswith(entry + ".")}
            if not hit:
                roots = sorted({".".join(n.split(".")[:2]) for n in names})
                raise ValueError(f"{type(self).__name__}: blocks names {entry!r}, which matches none of the model's "
                                 f"attention modules; accepted: a module name or prefix such as "
                                 f"{', '.join(roots[:6])}{', ...' if len(roots) > 6 else ''}")
            chosen |= hit
        self._indices = chosen

    def active(self, site: Site) -> bool:
        if site.kind not in self.kinds:
            return False
        if self._indices is not None and site.index not in self._indices:
            return False
        return _in_steps(self.steps, site.step)

    def attend(self, call: AttnCall) -> Tensor:
        return call.attend()

    def reset(self) -> None:
        """Forget per-run state (called by :meth:`Handle.reset`)."""


def _as_blocks(blocks) -> tuple:
    if isinstance(blocks, (str, int)):
        blocks = (blocks,)
    out = []
    for b in blocks:
        if isinstance(b, bool) or not isinstance(b, (str, int)):
            raise ValueError(f"blocks must hold module names (str) or indices (int), got {b!r}")
        out.append(b)
    if not out:
        raise ValueError("blocks is empty; accepted: None (every block) or at least one name / index")
    return tuple(out)


def _as_steps(steps):
    if steps is None:
        return None
    if isinstance(steps, tuple) and len(steps) == 2 and all(isinstance(s, int) and not isinstance(s, bool)
                                                             for s in steps):
        if not 0 <= steps[0] < steps[1]:
            raise ValueError(f"steps=(start, stop) needs 0 <= start < stop, got {steps}")
        return range(*steps)
    try:
        out = frozenset(int(s) for s in steps)
    except (TypeError, ValueError):
        raise ValueError(f"steps must be None, (start, stop) or a collection of step numbers, got {steps!r}") from None
    if any(s < 0 for s in out):
        raise ValueError(f"steps must be >= 0, got {sorted(out)}")
    return out


def _in_steps(steps, step: int) -> bool:
    return steps is None or step in steps


class SharedAttention(Sharing):
    """Attention sharing with reference rows (StyleAligned-style; the naive baseline of AlignedGen).

    Every target row's queries attend to its own keys and, in addition, to the image keys and
    values of the reference row of its group (:func:`rows`): ``out_i = softmax([q_i k_i^T,
    q_i k_r^T] * scale) [v_i; v_r]``. The reference row itself attends as usual. ``adain=True``
    first normalises each target's queries and keys to the reference's statistics over its image
    tokens (StyleAligned's AdaIN, Hertz et al., arXiv 2312.02133), which pulls the targets' style
    to the reference's. ``reference_scale`` (default 1) multiplies the target-to-reference scores
    as an additive ``log(reference_scale)`` on their logits (StyleAligned's "shared attention
    scaling"); ``chunks``: the batch's classifier-free guidance halves (1 for FLUX).

    ``share_text=True`` shares the reference's text keys too (the whole sequence). Then a batch
    whose rows are all equal gives the stock output (every key repeated once does not move a
    softmax-weighted mean): the identity the switch-off test checks. Sharing image keys only (the
    default, StyleAligned's) doubles the weight of the image tokens against the text in such a
    batch, so it is not the identity there."""

    name = "shared-kv"

    def __init__(self, reference: int = 0, *, adain: bool = False, reference_scale: float = 1.0, chunks: int = 1,
                 share_text: bool = False, blocks=None, steps=None):
        super().__init__(blocks=blocks, steps=steps)
        if isinstance(reference, bool) or not isinstance(reference, int) or reference < 0:
            raise ValueError(f"reference must be a row index >= 0, got {reference!r}")
        if not isinstance(reference_scale, (int, float)) or isinstance(reference_scale, bool) or reference_scale <= 0:
            raise ValueError(f"reference_scale must be a number > 0, got {reference_scale!r}")
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"chunks must be an integer >= 1, got {chunks!r}")
        self.reference, self.adain, self.reference_scale, self.chunks = reference, bool(adain), reference_scale, chunks
        self.share_text = bool(share_text)

    def attend(self, call: AttnCall) -> Tensor:
        ref_of, targets, refs = reference_rows(call.batch, self.reference, self.chunks)
        q, k, v = call.q, call.k, call.v
        shared = slice(0, q.shape[2]) if self.share_text else call.image
        out = torch.empty_like(q[..., :1]).expand(*q.shape[:3], v.shape[3]).contiguous()
        # the reference rows attend as usual (on their own they are the stock call)
        out[refs] = call.attend(q[refs], k[refs], v[refs]) if targets else call.attend()
        if not targets:
            return out
        t = torch.tensor(targets, device=q.device)
        r = torch.tensor([ref_of[i] for i in targets], device=q.device)
        qt, kt = q[t], k[t]
        if self.adain:  # StyleAligned: the targets' image queries and keys take the reference's statistics
            img = call.image
            qt, kt = qt.clone(), kt.clone()
            qt[:, :, img] = adain(q[t][:, :, img], q[r][:, :, img])
            kt[:, :, img] = adain(k[t][:, :, img], k[r][:, :, img])
        k_ref = k[r][:, :, shared]  # [b, H, N', D]: the reference's own keys
        S = kt.shape[2]
        keys = torch.cat([kt, k_ref], dim=2)  # [b, H, S + N', D]
        values = torch.cat([v[t], v[r][:, :, shared]], dim=2)
        out[t] = call.attend(qt, keys, values, score_mod=_key_bias(S, math.log(self.reference_scale))
                             if self.reference_scale != 1.0 else None)
        return out


def _key_bias(first: int, bias: float):
    """A score_mod adding ``bias`` to the logits of keys at index >= ``first`` (the shared ones)."""

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + (kv_idx >= first).to(score.dtype) * bias  # in the scores' dtype (float64 stays exact)

    return score_mod


# -- processors -------------------------------------------------------------------------------------------


def attention_modules(model) -> list[tuple[str, Any]]:
    """The diffusers attention modules of ``model``, in module order: ``(name, module)``."""
    try:
        from diffusers.models.attention import AttentionModuleMixin
        from diffusers.models.attention_processor import Attention
    except ImportError as err:  # pragma: no cover - the extra is missing
        raise ImportError('attnkit.diffusion needs diffusers: pip install "attnkit[diffusion]"') from err
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (AttentionModuleMixin, Attention))]


def _kind(module) -> str:
    if type(module).__name__ == "FluxAttention":
        return "joint" if getattr(module, "added_kv_proj_dim", None) is not None else "single"
    return "cross" if getattr(module, "is_cross_attention", False) else "self"


class _FluxProcessor:
    """FLUX's attention (diffusers' ``FluxAttnProcessor``) with the core handed to the method."""

    def __init__(self, handle: "Handle", index: int, name: str, original):
        self.handle, self.index, self.name, self.original = weakref.proxy(handle), index, name, original
        self.kind = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        site = self.handle._site(self.index, self.name, self.kind)
        method = self.handle.method
        if not method.active(site) or attention_mask is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, e_query, e_key, e_value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))  # [B, S, H, D]
        query, key = attn.norm_q(query), attn.norm_k(key)
        text_len = self.handle._text_len if site.kind == "single" else 0
        if attn.added_kv_proj_dim is not None and encoder_hidden_states is not None:
            e_query, e_key, e_value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (e_query, e_key, e_value))
            e_query, e_key = attn.norm_added_q(e_query), attn.norm_added_k(e_key)
            query, key, value = (torch.cat(p, dim=1) for p in ((e_query, query), (e_key, key), (e_value, value)))
            text_len = encoder_hidden_states.shape[1]
        q_plain, k_plain = query, key
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        def stock():  # diffusers' own dispatch on the call's own q / k / v
            from diffusers.models.attention_dispatch import dispatch_attention_fn

            out = dispatch_attention_fn(query, key, value, attn_mask=None, backend=getattr(self.original,
                                        "_attention_backend", None), parallel_config=None)
            return out.transpose(1, 2)

        call = AttnCall(site, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                        None if image_rotary_emb is None else q_plain.transpose(1, 2),
                        None if image_rotary_emb is None else k_plain.transpose(1, 2),
                        text_len, self.handle._image_ids, self.handle._grid, attn.head_dim ** -0.5, self.handle, stock)
        out = self.handle._run(call)  # [B, H, S, D]
        hidden = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            e_out, hidden = hidden.split_with_sizes([encoder_hidden_states.shape[1],
                                                     hidden.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            hidden = attn.to_out[1](attn.to_out[0](hidden.contiguous()))
            return hidden, attn.to_add_out(e_out.contiguous())
        return hidden


class _AttentionProcessor:
    """diffusers' ``AttnProcessor2_0`` (UNet and video transformer ``Attention``) with the core
    handed to the method (self- and cross-attention; no RoPE)."""

    def __init__(self, handle: "Handle", index: int, name: str, original):
        self.handle, self.index, self.name, self.original = weakref.proxy(handle), index, name, original
        self.kind = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        site = self.handle._site(self.index, self.name, self.kind)
        if not self.handle.method.active(site) or attention_mask is not None or args or kwargs:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        import torch.nn.functional as F

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            B, C, Hh, Ww = hidden_states.shape
            hidden_states = hidden_states.view(B, C, Hh * Ww).transpose(1, 2)
        B = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else (
            attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states)
        key, value = attn.to_k(context), attn.to_v(context)
        D = key.shape[-1] // attn.heads
        query, key, value = (t.view(B, -1, attn.heads, D).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        def stock():
            return F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)

        call = AttnCall(site, query, key, value, None, None, 0, None, self.handle._grid_of(query.shape[2]),
                        attn.scale if getattr(attn, "scale", None) else D ** -0.5, self.handle, stock)
        out = self.handle._run(call)
        hidden = out.transpose(1, 2).reshape(B, -1, attn.heads * D).to(query.dtype)
        hidden = attn.to_out[1](attn.to_out[0](hidden))
        if ndim == 4:
            hidden = hidden.transpose(-1, -2).reshape(B, C, Hh, Ww)
        if attn.residual_connection:
            hidden = hidden + residual
        return hidden / attn.rescale_output_factor


class _CogVideoXProcessor:
    """CogVideoX's joint attention (diffusers' ``CogVideoXAttnProcessor2_0``: text tokens first,
    then the video's, RoPE on the video tokens) with the core handed to the method."""

    def __init__(self, handle: "Handle", index: int, name: str, original):
        self.handle, self.index, self.name, self.original = weakref.proxy(handle), index, name, original
        self.kind = None

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        site = self.handle._site(self.index, self.name, self.kind)
        if not self.handle.method.active(site) or attention_mask is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        import torch.nn.functional as F
        from diffusers.models.embeddings import apply_rotary_emb

        text_len = encoder_hidden_states.shape[1]
        hidden = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        B = hidden.shape[0]
        query, key, value = attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden)
        D = key.shape[-1] // attn.heads
        query, key, value = (t.view(B, -1, attn.heads, D).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:  # the video tokens only, as diffusers does
            query = torch.cat([query[:, :, :text_len], apply_rotary_emb(query[:, :, text_len:], image_rotary_emb)], 2)
            if not attn.is_cross_attention:
                key = torch.cat([key[:, :, :text_len], apply_rotary_emb(key[:, :, text_len:], image_rotary_emb)], 2)

        def stock():
            return F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)

        call = AttnCall(site, query, key, value, None, None, text_len, None, None, D ** -0.5, self.handle, stock)
        out = self.handle._run(call)
        out = out.transpose(1, 2).reshape(B, -1, attn.heads * D)
        out = attn.to_out[1](attn.to_out[0](out))
        e_out, out = out.split([text_len, out.shape[1] - text_len], dim=1)
        return out, e_out


# -- the handle ----------------------------------------------------------------------------------------


class Handle:
    """A method applied to a denoiser; :meth:`remove` restores it (also on leaving a ``with``).

    ``step``: the denoiser's forward calls since the handle was made or :meth:`reset`;
    ``phase``: a free label a method or a caller sets (``"invert"`` / ``"sample"``) that every
    :class:`Site` carries; ``calls``: attention calls the method handled (not the stock ones)."""

    def __init__(self, model, method: Sharing):
        self.model, self.method = model, method
        self.step, self.phase, self.calls = -1, None, 0
        self._timestep = None
        self._text_len = 0
        self._image_ids = None
        self._grid = None
        self._latent_hw = None
        self._video_shape = None
        self.pos_embed = getattr(model, "pos_embed", None) if hasattr(getattr(model, "pos_embed", None),
                                                                       "axes_dim") else None
        self._modules = attention_modules(model)
        if not self._modules:
            raise ValueError(f"{type(model).__name__} has no diffusers attention modules (AttentionModuleMixin / "
                             "Attention); accepted: a diffusers pipeline, or its transformer / unet")
        self.names = [n for n, _ in self._modules]
        self._originals = []
        for i, (name, module) in enumerate(self._modules):
            original = module.get_processor() if hasattr(module, "get_processor") else module.processor
            flux = type(module).__name__ == "FluxAttention"
            if flux and type(original).__name__ != "FluxAttnProcessor":
                self._restore()
                raise ValueError(f"{name} runs {type(original).__name__}; attnkit.diffusion routes FLUX attention "
                                 "only over diffusers' FluxAttnProcessor (IP-Adapter and other processors: remove "
                                 "them first)")
            cog = type(original).__name__ == "CogVideoXAttnProcessor2_0"
            proc = (_FluxProcessor if flux else _CogVideoXProcessor if cog else _AttentionProcessor)(self, i, name,
                                                                                                   original)
            proc.kind = "joint" if cog else _kind(module)
            module.set_processor(proc)
            self._originals.append((module, original))
        self._hook = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        try:
            method.bind(self)
        except Exception:
            self.remove()
            raise

    # the denoiser's call: count it and note what its attention calls need
    def _pre_forward(self, module, args, kwargs):
        self.step += 1
        self._timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        ehs = kwargs.get("encoder_hidden_states")
        self._text_len = int(ehs.shape[1]) if isinstance(ehs, Tensor) else 0
        ids = kwargs.get("img_ids")
        if isinstance(ids, Tensor) and ids.dim() == 3:  # an old 3D layout: [B, N, 3]
            ids = ids[0]
        self._image_ids = ids if isinstance(ids, Tensor) else None
        self._grid = _grid(self._image_ids)
        sample = kwargs.get("sample", args[0] if args else None)  # a UNet's latents [B, C, h, w]
        self._latent_hw = tuple(sample.shape[-2:]) if isinstance(sample, Tensor) and sample.dim() == 4 else None
        video = kwargs.get("hidden_states", args[0] if args else None)  # a video transformer's [B, F, C, H, W]
        self._video_shape = tuple(video.shape[1:]) if isinstance(video, Tensor) and video.dim() == 5 else None

    def _grid_of(self, tokens: int):
        """A UNet block's (h, w) from the latent's aspect and its token count."""
        if self._latent_hw is None:
            return None
        h0, w0 = self._latent_hw
        f = math.sqrt(h0 * w0 / tokens)
        h, w = round(h0 / f), round(w0 / f)
        return (h, w) if h * w == tokens else None

    def _site(self, index: int, name: str, kind: str) -> Site:
        return Site(name, index, kind, max(self.step, 0), self._timestep, self.phase)

    def _run(self, call: AttnCall) -> Tensor:
        out = self.method.attend(call)
        if not isinstance(out, Tensor) or out.shape[:3] != call.q.shape[:3]:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"{type(self.method).__name__}.attend returned {got}; it must return [B, H, T, D] with "
                             f"[B, H, T] = {list(call.q.shape[:3])}")
        self.calls += 1
        return out

    def reset(self) -> "Handle":
        """Start counting steps again (before a new pipeline run) and clear the method's state."""
        self.step, self.calls = -1, 0
        self.method.reset()
        return self

    def _restore(self):
        for module, original in reversed(self._originals):
            module.set_processor(original)
        self._originals = []

    def remove(self) -> None:
        """Put back every processor this handle replaced and drop its hook (idempotent)."""
        self._restore()
        if getattr(self, "_hook", None) is not None:
            self._hook.remove()
            self._hook = None

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _grid(ids: Tensor | None):
    if ids is None or ids.dim() != 2 or ids.shape[1] < 3 or ids.shape[0] == 0:
        return None
    h = int(ids[:, 1].max()) - int(ids[:, 1].min()) + 1
    w = int(ids[:, 2].max()) - int(ids[:, 2].min()) + 1
    return (h, w) if h * w == ids.shape[0] else None


def _denoiser(target):
    for attr in ("transformer", "unet"):
        model = getattr(target, attr, None)
        if isinstance(model, torch.nn.Module):
            return model
    if isinstance(target, torch.nn.Module):
        return target
    raise ValueError(f"apply takes a diffusers pipeline (with .transformer or .unet) or a denoiser module, got "
                     f"{type(target).__name__}")


def apply(target, method: Sharing | str, /, **options) -> Handle:
    """Apply ``method`` (a :class:`Sharing` or a registered name with ``options``) to a diffusers
    pipeline's denoiser (``pipe.transformer`` / ``pipe.unet``) or to a denoiser module. Returns the
    :class:`Handle`; use it as a context manager or call ``remove()``."""
    from .methods import build

    if isinstance(method, str):
        method = build(method, **options)
    elif options:
        raise ValueError(f"options {sorted(options)} go with a method name; got a {type(method).__name__} object "
                         "(set them on the object)")
    if not isinstance(method, Sharing):
        raise ValueError(f"method must be an attnkit.diffusion Sharing or a method name, got {type(method).__name__}")
    return Handle(_denoiser(target), method)
