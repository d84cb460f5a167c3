"""RF-Edit: editing by sharing self-attention values from the inversion into the sampling pass.

Taming Rectified Flow for Inversion and Editing (Wang et al., arXiv 2411.04746; official code
github.com/wangjiangshan0725/RF-Solver-Edit, ``FLUX_Image_Edit/src/flux/modules/layers.py`` and
``sampling.py``). The image is inverted to noise with :mod:`attnkit.diffusion.rf_solver` under the
source prompt, then sampled back under the edited prompt. During the inversion, in the chosen
blocks and in the first ``inject`` solver steps of the sampling schedule (the last ``inject`` of
the inversion), every evaluation stores the attention values ``V`` of each chosen block; during
the sampling, the same step and stage reads them and attends with them in place of its own:

    out = softmax(q k^T * scale) V_inversion

so the edited image keeps the source's content and layout where the prompt does not change it.
The pairing follows the official code: an inversion step from ``t_a`` to ``t_b`` and the sampling
step from ``t_b`` to ``t_a`` share one key, ``(max(t_a, t_b), stage)`` (``stage``: the solver's
main or midpoint evaluation), which :meth:`RFEdit.callback` sets from the solver's callback.

Defaults as the official FLUX code: the single-stream blocks after the 20th (``id > 19`` of FLUX's
38: ``single_from=20``), all of the sequence's values (text and image tokens, every batch row).
On a model with fewer single blocks give ``single_from`` (or ``blocks=``) yourself. What differs
from the official code: the values are kept in a :class:`KVBank` by module name (CPU by default,
as the official in-memory path keeps them on the host); the steps are chosen by solver step, not
by the pipeline's index list (the same steps).
"""

from __future__ import annotations

from torch import Tensor

from .sharing import AttnCall, KVBank, Sharing

__all__ = ["RFEdit"]


class RFEdit(Sharing):
    """Value sharing from the inversion into the sampling (see the module docstring).

    Args:
        inject: sampling steps (from the first) whose evaluations read the inversion's values;
            the matching last ``inject`` inversion steps record them. 0: no sharing (the stock
            model in both passes).
        single_from: the single-stream blocks with index >= this share (FLUX: 20 of 38, the
            official ``id > 19``); ``None`` with ``blocks=`` given: those blocks instead.
        bank: where the values live (default: a new :class:`KVBank` on the CPU).
        blocks: module names / prefixes / indices (overrides ``single_from``).

    Use: ``edit = RFEdit(inject=2, single_from=1)``; ``handle = apply(model, edit)``; invert with
    ``callback=edit.callback``, then sample with ``callback=edit.callback`` (the callback says which
    pass it is from the direction of time).
    """

    name = "rf-edit"
    kinds = ("joint", "single")

    def __init__(self, inject: int = 2, *, single_from: int | None = 20, bank: KVBank | None = None, blocks=None):
        if isinstance(inject, bool) or not isinstance(inject, int) or inject < 0:
            raise ValueError(f"inject must be an integer >= 0 (sampling steps that share values), got {inject!r}")
        if single_from is not None and (isinstance(single_from, bool) or not isinstance(single_from, int)
                                        or single_from < 0):
            raise ValueError(f"single_from must be None or an integer >= 0, got {single_from!r}")
        if blocks is None and single_from is None:
            raise ValueError("give single_from (the first single-stream block that shares) or blocks")
        super().__init__(blocks=blocks)
        self.inject, self.single_from = inject, single_from
        self.bank = KVBank(device="cpu") if bank is None else bank
        if not isinstance(self.bank, KVBank):
            raise ValueError(f"bank must be an attnkit.diffusion.KVBank, got {type(bank).__name__}")
        self._key: tuple[int, str] | None = None
        self._inverse = False
        self._share = False
        self._steps_total: int | None = None

    def bind(self, handle) -> None:
        super().bind(handle)
        if self.blocks is None:
            singles = [i for i, n in enumerate(handle.names) if n.startswith("single_transformer_blocks.")]
            chosen = {i for i in singles if int(handle.names[i].split(".")[1]) >= self.single_from}
            if not chosen:
                raise ValueError(f"RFEdit: single_from={self.single_from} leaves no single-stream block (the model has "
                                 f"{len(singles)}); accepted: 0 .. {max(len(singles) - 1, 0)}, or blocks=")
            self._indices = chosen

    def callback(self, step: int, t: float, t_next: float, x: Tensor, stage: str) -> None:
        """The solver's callback (:func:`attnkit.diffusion.rf_solver.rf_solver`): which pass, step
        and stage the next evaluation belongs to."""
        self._inverse = t_next > t
        self._key = (int(round(max(t, t_next) * 10**9)), stage)
        self._share = self._in_window(step)

    def schedule(self, steps: int) -> "RFEdit":
        """Tell the method the number of solver steps of both passes (needed to find the last
        ``inject`` inversion steps). Returns self."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        self._steps_total = steps
        return self

    def _in_window(self, step: int) -> bool:
        n = self._steps_total
        if n is None:
            raise ValueError("RFEdit: call edit.schedule(steps) with the solver's number of steps before the passes")
        # sampling step i shares when i < inject; inversion step i covers sampling step n - 1 - i
        return (n - 1 - step if self._inverse else step) < self.inject

    def active(self, site) -> bool:
        return self._key is not None and self._share and super().active(site)

    def attend(self, call: AttnCall) -> Tensor:
        key, stage = self._key
        if self._inverse:
            self.bank.put(call.site.name, key, call.v, tag=stage)
            return call.attend()
        (v,) = self.bank.get(call.site.name, key, tag=stage, device=call.v.device)
        if v.shape != call.v.shape:
            raise ValueError(f"RFEdit: the inversion's values at {call.site.name} are {tuple(v.shape)}, this pass's "
                             f"{tuple(call.v.shape)}; invert and sample the same batch and size")
        return call.attend(call.q, call.k, v.to(call.v.dtype))

    def reset(self) -> None:
        self._key, self._share = None, False
