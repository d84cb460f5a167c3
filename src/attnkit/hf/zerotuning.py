"""ZeroTuning (Han et al., "ZeroTuning: Unlocking the Initial Token's Power to Enhance Large
Language Models Without Training", arXiv 2505.11739): scale the attention each chosen head pays
to the initial token by a per-head ``gamma``, then renormalise.

Scaling the initial token's weight ``a0`` by gamma and renormalising (``a0' = gamma a0 / D``,
``ai' = ai / D``, ``D = (gamma - 1) a0 + 1``) is exactly adding ``log gamma`` to that token's logit
before the softmax, which is what :class:`ZeroTuningModifier` does (``logits`` hook). gamma > 1
flattens what the head pays to the other tokens, gamma < 1 sharpens it. The initial token is each
row's first real (non-padding) token: the byte-level subject has no BOS, so it is the prompt's
first byte.

Choosing the gammas (:func:`fit_zerotuning`, the paper's three steps):

1. **head profiling**: each candidate head alone gets a probe gamma (``probe``, default 1.5 up);
   the change of the calibration score says whether the head prefers up-scaling (score rises)
   or down-scaling (score falls);
2. **selective rescaling**: the heads of the larger group (the dominant preference; ties: up) are
   the ones to tune, optionally only the ``top`` most sensitive of them;
3. **gamma search**: one gamma for those heads, swept over ``gammas`` on their side of 1 (> 1 for
   up-preferring heads, < 1 for down-preferring ones), keeping the best calibration score
   (gamma 1, nothing selected, competes too: a sweep never returns something worse than the model
   on the calibration set).

The score is the supervised accuracy on labelled calibration prompts (``mode="accuracy"``) or the
paper's unsupervised criterion, the negative mean entropy of the model's distribution over the
answer options (``mode="entropy"``: no labels needed). :class:`Choices` holds such prompts.

Deviations from the official code (FeijiangHan/ZeroTuning, a patched ``LlamaAttention``): the
official scales the initial token's post-softmax weight and renormalises; here ``log gamma`` is
added to the logit (the same numbers, one softmax, and it goes through any attention the
:class:`~attnkit.hf.steer.Steer` spine serves). The official sweeps per dataset over fixed head
lists and gamma grids by hand; :func:`fit_zerotuning` runs the profiling and the sweep for you and
returns the gamma of every head as a table (``ZeroTuning.table(num_layers, num_heads)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Sequence

import torch
from torch import Tensor

from .steer import HeadView, Modifier, Steer, check_heads

__all__ = ["ZeroTuningModifier", "ZeroTuning", "Choices", "fit_zerotuning", "left_padded"]


def _gamma(value, owner: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}: gamma must be a finite number > 0 (1: no change), got {value!r}")
    return float(value)


class ZeroTuningModifier(Modifier):
    """Add ``log gamma[(layer, head)]`` to the logit of each row's first real token, per query head.

    ``gammas``: ``{(layer, query head): gamma > 0}``. Heads whose gamma is 1 are not selected (the
    model stays bit-identical on them)."""

    def __init__(self, gammas: dict):
        self.gammas = {}
        for pair, g in dict(gammas).items():
            g = _gamma(g, f"ZeroTuning: head {pair!r}")
            if g != 1.0:
                self.gammas[tuple(pair)] = g
        self.selected = tuple(sorted(self.gammas))

    def heads(self, num_layers, num_heads):
        return check_heads(self.selected, num_layers, num_heads, owner="ZeroTuning")

    def logits(self, logits: Tensor, view: HeadView) -> Tensor:
        # [h] log gamma of this call's rows (heads of this group that are not selected never get here)
        lg = torch.tensor([math.log(self.gammas.get((view.layer, int(h)), 1.0)) for h in view.heads.tolist()],
                          dtype=logits.dtype, device=logits.device)
        return logits + lg[None, :, None, None] * view.first_token()


@dataclass
class ZeroTuning(Steer):
    """ZeroTuning as a named policy: ``attnkit.hf.apply(model, "zerotuning", gamma=1.5, heads=[(0, 1)])``.

    ``gamma`` (> 0) applies to every pair in ``heads`` (``(layer, query head)`` pairs); ``gammas``
    (``{(layer, head): gamma}``) gives heads their own value and wins over ``gamma`` where both name
    a head. The defaults select no head: the model is bit-identical. :func:`fit_zerotuning` chooses
    the heads and gamma on calibration prompts."""

    modifier: Modifier = field(default=None, init=False, repr=False, compare=False)
    gamma: float = 1.0
    heads: tuple = ()
    gammas: dict | None = None
    name: ClassVar[str] = "zerotuning"

    def __post_init__(self):
        g = _gamma(self.gamma, "ZeroTuning")
        table = {}
        for pair in self.heads:
            table[_pair(pair)] = g
        for pair, value in dict(self.gammas or {}).items():
            table[_pair(pair)] = value
        self.modifier = ZeroTuningModifier(table)
        super().__post_init__()

    def table(self, num_layers: int, num_heads: int) -> Tensor:
        """``[num_layers, num_heads]`` float64: every head's gamma (1 where untouched)."""
        out = torch.ones(num_layers, num_heads, dtype=torch.float64)
        for (layer, head), g in self.modifier.gammas.items():
            check_heads([(layer, head)], num_layers, num_heads, owner="ZeroTuning")
            out[layer, head] = g
        return out


def _pair(pair) -> tuple[int, int]:
    try:
        layer, head = (int(x) for x in pair)
    except (TypeError, ValueError):
        raise ValueError(f"ZeroTuning: a head must be a (layer, query head) pair of ints, got {pair!r}") from None
    return layer, head


# -- calibration prompts ------------------------------------------------------------------------


def left_padded(prompts, pad_id: int = 0, batch_size: int = 64, device=None):
    """Yield ``(rows, ids [b, T], mask [b, T], position_ids [b, T])`` over ``prompts`` (token-id
    lists) in batches, left-padded with ``pad_id`` so that every row's last token is at ``T - 1``;
    position ids count from each row's first real token (what the unpadded prompt would get)."""
    for lo in range(0, len(prompts), batch_size):
        rows = list(range(lo, min(len(prompts), lo + batch_size)))
        T = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for r, i in enumerate(rows):
            p = list(prompts[i])
            ids[r, T - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, T - len(p):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        yield rows, ids.to(device), mask.to(device), pos.to(device)


@dataclass
class Choices:
    """Prompts whose answer is one of a few options read off the next-token logits.

    ``prompts``: token-id lists; ``options``: per prompt, the token id of each option at the next
    position (e.g. the first byte where two label words differ); ``answers``: the index of the right
    option per prompt (None: unlabelled, only the entropy criterion can use them). Prompts are
    left-padded into batches (``pad_id``) with position ids counted from each row's first token.
    Raises ``ValueError`` on an empty set or mismatched lengths."""

    prompts: Sequence[Sequence[int]]
    options: Sequence[Sequence[int]]
    answers: Sequence[int] | None = None
    pad_id: int = 0
    batch_size: int = 64

    def __post_init__(self):
        if len(self.prompts) == 0:
            raise ValueError("Choices: the calibration set is empty; give at least one prompt")
        if len(self.options) != len(self.prompts):
            raise ValueError(f"Choices: {len(self.prompts)} prompts but {len(self.options)} option lists")
        widths = {len(o) for o in self.options}
        if len(widths) != 1 or widths.pop() < 2:
            raise ValueError("Choices: every prompt needs the same number (>= 2) of options, got "
                             f"{sorted({len(o) for o in self.options})}")
        if any(len(p) == 0 for p in self.prompts):
            raise ValueError("Choices: a prompt is empty")
        if self.answers is not None:
            if len(self.answers) != len(self.prompts):
                raise ValueError(f"Choices: {len(self.prompts)} prompts but {len(self.answers)} answers")
            n = len(self.options[0])
            bad = [a for a in self.answers if not 0 <= int(a) < n]
            if bad:
                raise ValueError(f"Choices: answer {bad[0]!r} out of range; accepted: 0 .. {n - 1}")

    def __len__(self) -> int:
        return len(self.prompts)

    def batches(self, device=None):
        """Yield ``(rows, ids [b, T], mask [b, T], position_ids [b, T])``, left-padded."""
        return left_padded(self.prompts, self.pad_id, self.batch_size, device)

    def logits(self, model) -> Tensor:
        """``[N, V]`` float32: the next-token logits after each prompt."""
        device = next(model.parameters()).device
        out = []
        for _, ids, mask, pos in self.batches(device):
            out.append(model(ids, attention_mask=mask, position_ids=pos).logits[:, -1].float())
        return torch.cat(out)

    def option_logits(self, model) -> Tensor:
        """``[N, C]``: the options' logits."""
        with torch.no_grad():
            full = self.logits(model)
        return full.gather(1, torch.tensor([list(o) for o in self.options], device=full.device))

    def accuracy(self, model, logits: Tensor | None = None) -> float:
        """Label-restricted accuracy: the right option has the largest logit among the options."""
        if self.answers is None:
            raise ValueError("Choices.accuracy needs answers; unlabelled prompts only support entropy()")
        logits = self.option_logits(model) if logits is None else logits
        answers = torch.tensor([int(a) for a in self.answers], device=logits.device)
        return float((logits.argmax(-1) == answers).float().mean())

    def entropy(self, model, logits: Tensor | None = None) -> float:
        """Mean entropy (nats) of the softmax over the options: ZeroTuning's unsupervised criterion."""
        logits = self.option_logits(model) if logits is None else logits
        logp = torch.log_softmax(logits.double(), -1)
        return float(-(logp.exp() * logp).sum(-1).mean())

    def score(self, model, mode: str) -> float:
        """Higher is better: the accuracy (``"accuracy"``) or the negative entropy (``"entropy"``)."""
        if mode == "accuracy":
            return self.accuracy(model)
        if mode == "entropy":
            return -self.entropy(model)
        raise ValueError(f"mode must be 'accuracy' or 'entropy', got {mode!r}")


# -- the calibration ----------------------------------------------------------------------------


def _score_with(model, policy, evaluate) -> float:
    from .attention import apply

    with torch.no_grad(), apply(model, policy):
        return float(evaluate(model))


def calibration_score(calibration, mode: str):
    """``model -> score`` from ``calibration``: a :class:`Choices` scored by ``mode`` (``"accuracy"``
    or ``"entropy"``), or a callable used as it is (shared by ZeroTuning's and ACT's fits)."""
    if isinstance(calibration, Choices):
        if mode not in ("accuracy", "entropy"):
            raise ValueError(f"mode must be 'accuracy' or 'entropy', got {mode!r}")
        return lambda m: calibration.score(m, mode)
    if callable(calibration):
        return calibration
    raise ValueError(f"calibration must be an attnkit.hf.zerotuning.Choices or a callable model -> score, "
                     f"got {type(calibration).__name__}")


def candidate_heads(model, candidates, owner: str):
    """``(num_layers, num_heads, pairs)``: ``candidates`` (default every head of ``model``) checked as
    (layer, query head) pairs; an empty list raises (shared by ZeroTuning's and ACT's fits)."""
    from .attention import _text_config

    config = _text_config(model)
    L, H = int(config.num_hidden_layers), int(config.num_attention_heads)
    pairs = check_heads(candidates if candidates is not None else [(l, h) for l in range(L) for h in range(H)],
                        L, H, owner=f"{owner}: candidates")
    if not pairs:
        raise ValueError(f"{owner}: candidates is empty; give the (layer, head) pairs to try")
    return L, H, pairs


def fit_zerotuning(model, calibration: Choices | Callable, *, mode: str = "accuracy", probe: float = 1.5,
                   gammas: Sequence[float] = (0.25, 0.5, 0.75, 1.5, 2.0, 3.0, 4.0), candidates=None,
                   top: int | None = None, seed: int = 0) -> tuple[ZeroTuning, dict]:
    """The paper's head profiling + selective rescaling + gamma search on ``calibration``.

    ``calibration``: a :class:`Choices` (scored by ``mode``: ``"accuracy"`` supervised, ``"entropy"``
    unsupervised) or a callable ``model -> score`` (higher is better). ``probe`` (> 0, != 1) is the
    profiling gamma; ``gammas`` (each > 0) the sweep; ``candidates`` the (layer, head) pairs profiled
    (default: all); ``top`` keeps only the ``top`` most sensitive heads of the dominant group (ties
    broken by ``seed``, see :func:`~attnkit.hf.steer.top_heads`). Returns ``(policy, report)``:
    ``report`` holds the base score, the per-head profile ``[L, H]`` (score change under the probe,
    NaN where not profiled), the chosen group (``"up"``/``"down"``), the heads, the sweep
    ``{gamma: score}`` and the chosen gamma."""
    from .steer import top_heads

    evaluate = calibration_score(calibration, mode)
    probe = _gamma(probe, "fit_zerotuning: probe")
    if probe == 1.0:
        raise ValueError("fit_zerotuning: probe must differ from 1 (gamma 1 changes nothing), got 1.0")
    gammas = [_gamma(g, "fit_zerotuning: gammas") for g in gammas]
    if not gammas:
        raise ValueError("fit_zerotuning: gammas is empty; give the gammas to sweep")
    L, H, pairs = candidate_heads(model, candidates, "fit_zerotuning")
    base = _score_with(model, ZeroTuning(), evaluate)
    profile = torch.full((L, H), float("nan"), dtype=torch.float64)
    for pair in pairs:
        profile[pair] = _score_with(model, ZeroTuning(gamma=probe, heads=(pair,)), evaluate) - base
    # a head "prefers" the probe's direction when the probe raised the score
    up = profile > 0 if probe > 1 else profile < 0
    down = profile < 0 if probe > 1 else profile > 0
    direction = "up" if int(up.sum()) >= int(down.sum()) else "down"
    group = up if direction == "up" else down
    sensitivity = profile.abs().nan_to_num(float("-inf")).masked_fill(~group, float("-inf"))
    k = int(group.sum()) if top is None else min(int(top), int(group.sum()))
    chosen = top_heads(sensitivity, k=k, seed=seed) if k > 0 else ()
    sweep = {1.0: base}
    side = [g for g in gammas if (g > 1) == (direction == "up") and g != 1]
    for g in side if chosen else []:
        sweep[g] = _score_with(model, ZeroTuning(gamma=g, heads=chosen), evaluate)
    best = max(sweep, key=lambda g: (sweep[g], -abs(math.log(g))))  # ties: the smaller change
    policy = ZeroTuning(gamma=best, heads=chosen if best != 1.0 else ())
    report = {"base": base, "profile": profile, "direction": direction, "heads": list(chosen),
              "sweep": sweep, "gamma": best, "mode": mode if isinstance(calibration, Choices) else "callable"}
    return policy, report
