"""Attention vs attribution: do attention weights rank the input tokens as feature attributions do?

"A Song of (Dis)agreement: Evaluating the Evaluation of Explainable Artificial Intelligence in
Natural Language Processing" (Neely, Schouten, Bleeker, Lucic; arXiv 2205.04559) compares two
attention-based explanations with feature attributions by the rank correlation (Kendall's tau,
Spearman's rho) of their token importances, example by example, and the attributions with each
other. It finds weak agreement everywhere, also among the attribution methods on transformers.

Here, for one prediction of a causal LM (the logit ``f`` of a target token at a predicting
position, e.g. the first byte of a few-shot label after ``"Label: "``), each method gives every
input token ``t`` a score:

- ``attention``: the last layer's attention row of the predicting position, averaged over heads;
- ``rollout``: attention rollout (Abnar & Zuidema, arXiv 2005.00928): per layer the head-averaged
  attention ``A_l`` with the residual added, ``0.5 A_l + 0.5 I``, rows renormalised, multiplied
  from the first layer up, ``R = Ã_L ... Ã_1``; the predicting position's row of ``R``;
- ``gradient``: ``||df/de_t||_2``, the gradient norm at token ``t``'s input embedding ``e_t``;
- ``input_x_gradient``: ``sum_c e_tc df/de_tc``;
- ``integrated_gradients``: ``sum_c (e_tc - b_tc) int_0^1 df/de_tc(b + a(e - b)) da`` with a baseline
  embedding ``b`` (zeros, or one token's embedding at every position), the integral by
  Gauss-Legendre quadrature on ``steps`` nodes; the scores add up to ``f(e) - f(b)`` (completeness);
- ``occlusion`` (leave one out): ``f(e) - f(e with e_t replaced by b_t)``.

Tokens are ranked by the magnitude ``|score|`` (attention is non-negative; a large negative
attribution is an important token too). Attention flow (the max-flow variant of rollout) is not
computed: it costs one max-flow problem per token and adds nothing to the rank comparison.

The rank correlations are implemented here (tau-b and rho with average ranks for ties, as
``scipy.stats.kendalltau`` and ``spearmanr`` compute them) so that scipy is not needed.

Usage (any HF causal LM that takes ``inputs_embeds``; eager attention so that weights come back)::

    >>> ex = explain(model, input_ids)                 # input_ids [T]; target: the argmax at the last position
    >>> ex.scores["rollout"].shape                     # (T,) float64, one score per input token
    >>> agreement(ex.scores)["attention", "integrated_gradients"]   # {"kendall_tau": ..., "spearman_rho": ...}
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["ATTENTION_METHODS", "ATTRIBUTION_METHODS", "METHODS", "rankdata", "kendall_tau", "spearman_rho",
           "pearson_r", "head_average", "last_layer_attention", "attention_rollout", "Explanation", "explain",
           "agreement", "summarize", "add_parser", "run"]

ATTENTION_METHODS = ("attention", "rollout")
ATTRIBUTION_METHODS = ("gradient", "input_x_gradient", "integrated_gradients", "occlusion")
METHODS = ATTENTION_METHODS + ATTRIBUTION_METHODS


# -- rank correlation ------------------------------------------------------------------------------


def _pair(x, y) -> tuple[Tensor, Tensor]:
    x = torch.as_tensor(x, dtype=torch.float64).detach().cpu()
    y = torch.as_tensor(y, dtype=torch.float64).detach().cpu()
    if x.dim() != 1 or y.dim() != 1 or x.numel() != y.numel():
        raise ValueError(f"x and y must be 1-D of the same length, got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if x.numel() < 2:
        raise ValueError(f"x and y need at least 2 values to correlate, got {x.numel()}")
    return x, y


def rankdata(x) -> Tensor:
    """Ranks 1..N of a 1-D sequence, ties sharing their average rank (``scipy.stats.rankdata``'s
    default 'average'); float64 [N]."""
    x = torch.as_tensor(x, dtype=torch.float64).detach().cpu()
    if x.dim() != 1:
        raise ValueError(f"x must be 1-D, got shape {tuple(x.shape)}")
    values, order = torch.sort(x, stable=True)
    _, counts = torch.unique_consecutive(values, return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)  # rank of each tie group's last member
    average = ends - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty_like(x)
    ranks[order] = torch.repeat_interleave(average, counts)
    return ranks


def pearson_r(x, y) -> float:
    """Pearson's correlation of two 1-D sequences (NaN when either is constant)."""
    x, y = _pair(x, y)
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum()) / denominator if denominator > 0 else math.nan


def spearman_rho(x, y) -> float:
    """Spearman's rank correlation: Pearson's r of the average ranks (NaN when either is constant)."""
    x, y = _pair(x, y)
    return pearson_r(rankdata(x), rankdata(y))


def kendall_tau(x, y) -> float:
    """Kendall's tau-b (ties in either sequence corrected for, ``scipy.stats.kendalltau``'s default):
    ``sum_{i<j} s^x_ij s^y_ij / sqrt(sum s^x_ij^2 * sum s^y_ij^2)`` with ``s^x_ij = sign(x_i - x_j)``.
    O(N^2) memory and time, which is what a few hundred tokens need (NaN when either is constant)."""
    x, y = _pair(x, y)
    sx = torch.sign(x[:, None] - x[None, :]).triu(1)  # [N, N], pairs i < j
    sy = torch.sign(y[:, None] - y[None, :]).triu(1)
    denominator = math.sqrt(float((sx * sx).sum()) * float((sy * sy).sum()))
    return float((sx * sy).sum()) / denominator if denominator > 0 else math.nan


# -- attention-based explanations --------------------------------------------------------------------


def _square_layers(attentions) -> list[Tensor]:
    """Layers' attention as [H, T, S]; a batch dimension of 1 is dropped."""
    if isinstance(attentions, Tensor):
        attentions = list(attentions)
    if len(attentions) == 0:
        raise ValueError("attentions is empty; accepted: one [H, T, S] (or [1, H, T, S]) tensor per layer")
    layers = []
    for i, a in enumerate(attentions):
        if a is None:
            raise ValueError(f"attentions[{i}] is None: the model returned no weights; load it with "
                             "attn_implementation='eager' and call it with output_attentions=True")
        if a.dim() == 4 and a.shape[0] == 1:
            a = a[0]
        if a.dim() != 3:
            raise ValueError(f"attentions[{i}] must be [H, T, S] or [1, H, T, S], got shape {tuple(a.shape)}")
        layers.append(a.detach().to(torch.float64))
    return layers


def _check_layer(layer: int, num_layers: int) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or not -num_layers <= layer < num_layers:
        raise ValueError(f"layer must be an integer in [{-num_layers}, {num_layers - 1}] (the model has {num_layers} "
                         f"layers; negative counts from the last), got {layer!r}")
    return layer % num_layers


def _check_heads(heads, num_heads: int) -> list[int]:
    if heads is None:
        return list(range(num_heads))
    heads = [heads] if isinstance(heads, int) else list(heads)
    if not heads:
        raise ValueError(f"heads is empty; accepted: None (all {num_heads}) or head indices in [0, {num_heads - 1}]")
    for h in heads:
        if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < num_heads:
            raise ValueError(f"heads must hold integers in [0, {num_heads - 1}] (the layer has {num_heads} heads), "
                             f"got {h!r} in {heads!r}")
    return heads


def _check_position(position: int, length: int) -> int:
    if isinstance(position, bool) or not isinstance(position, int) or not -length <= position < length:
        raise ValueError(f"position must be an integer in [{-length}, {length - 1}] (the sequence has {length} "
                         f"tokens; negative counts from the end), got {position!r}")
    return position % length


def head_average(attention: Tensor, heads=None) -> Tensor:
    """One layer's attention [H, T, S] (or [1, H, T, S]) averaged over ``heads`` (default all): [T, S] float64."""
    (layer,) = _square_layers([attention])
    return layer[_check_heads(heads, layer.shape[0])].mean(0)


def last_layer_attention(attentions, *, position: int = -1, layer: int = -1, heads=None) -> Tensor:
    """The attention row of ``position`` in ``layer`` (default the last), averaged over ``heads``:
    [S] float64. ``attentions``: one [H, T, S] (or [1, H, T, S]) tensor per layer, as HF models return them."""
    layers = _square_layers(attentions)
    a = layers[_check_layer(layer, len(layers))]
    return head_average(a, heads)[_check_position(position, a.shape[1])]


def attention_rollout(attentions, *, residual: float = 0.5, heads=None) -> Tensor:
    """Attention rollout (Abnar & Zuidema, arXiv 2005.00928): [T, T] float64, row ``i`` the share
    of position ``i``'s final representation traced back to each input token.

    Per layer ``Ã_l = rownorm(residual * I + (1 - residual) * mean_heads(A_l))`` (the identity stands
    for the residual stream), then ``R = Ã_L ... Ã_1``. ``attentions``: one [H, T, T] (or
    [1, H, T, T]) tensor per layer, first layer first."""
    if not 0 <= residual <= 1:
        raise ValueError(f"residual must be in [0, 1] (the identity's weight), got {residual!r}")
    layers = _square_layers(attentions)
    T = layers[0].shape[-1]
    rollout = torch.eye(T, dtype=torch.float64)
    for i, a in enumerate(layers):
        if a.shape[1:] != (T, T):
            raise ValueError(f"attention rollout needs square self-attention of one length; attentions[{i}] has "
                             f"shape {tuple(a.shape)}, attentions[0] {tuple(layers[0].shape)}")
        mixed = residual * torch.eye(T, dtype=torch.float64) + (1 - residual) * head_average(a, heads)
        mixed = mixed / mixed.sum(-1, keepdim=True)  # rows of masked positions need not sum to 1
        rollout = mixed @ rollout  # (T, T): layer l's output in terms of the inputs
    return rollout


# -- feature attributions ----------------------------------------------------------------------------


def _logit_fn(model, position: int, target: int, batch: int):
    """``f(embeds [n, T, C]) -> [n]``: the target's logit at ``position``, in chunks of ``batch``."""

    def f(embeds: Tensor) -> Tensor:
        out = [model(inputs_embeds=chunk, use_cache=False).logits[:, position, target] for chunk in embeds.split(batch)]
        return torch.cat(out)

    return f


def _gauss_legendre(steps: int) -> tuple[Tensor, Tensor]:
    """Nodes in (0, 1) and weights summing to 1 of the ``steps``-point Gauss-Legendre rule."""
    import numpy as np

    nodes, weights = np.polynomial.legendre.leggauss(steps)
    return torch.from_numpy((nodes + 1) / 2), torch.from_numpy(weights / 2)


def _gradients(f, embeds: Tensor) -> Tensor:
    """df/d embeds, for a batch [n, T, C] of points."""
    embeds = embeds.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(embeds).sum(), embeds)
    return grad


def integrated_gradients(f, embeds: Tensor, baseline: Tensor, steps: int = 16, batch: int = 16) -> Tensor:
    """Integrated gradients per token [T] (summed over the embedding), float64.

    ``f``: maps embeddings [n, T, C] to [n]; ``embeds``, ``baseline``: [T, C]. The path integral
    uses ``steps`` Gauss-Legendre nodes (exact for polynomials of degree 2*steps - 1 along the path)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1 (quadrature nodes on the path), got {steps!r}")
    nodes, weights = _gauss_legendre(steps)
    dtype = embeds.dtype
    delta = (embeds - baseline).detach()
    total = torch.zeros_like(embeds, dtype=torch.float64)
    for n, w in zip(nodes.split(batch), weights.split(batch)):
        points = baseline[None] + n.to(dtype)[:, None, None] * delta[None]  # (n, T, C)
        grads = _gradients(f, points).to(torch.float64)
        total += (w[:, None, None] * grads).sum(0)
    return (delta.to(torch.float64) * total).sum(-1)


def occlusion(f, embeds: Tensor, baseline: Tensor, batch: int = 16) -> Tensor:
    """Leave-one-out per token [T], float64: ``f(e) - f(e with row t replaced by baseline[t])``."""
    T = embeds.shape[0]
    with torch.no_grad():
        full = f(embeds[None])[0]
        drops = []
        for rows in torch.arange(T).split(batch):
            occluded = embeds[None].repeat(len(rows), 1, 1)  # (n, T, C)
            occluded[torch.arange(len(rows)), rows] = baseline[rows]
            drops.append(full - f(occluded))
    return torch.cat(drops).to(torch.float64)


@dataclass
class Explanation:
    """Token scores of one prediction. ``scores[method]``: [T] float64, signed for
    ``input_x_gradient``, ``integrated_gradients`` and ``occlusion``; ``f_input`` and
    ``f_baseline``: the explained logit at the input and at the all-baseline input; ``predicted``:
    the model's argmax at ``position``."""

    input_ids: list[int]
    target: int
    position: int
    predicted: int = -1
    scores: dict[str, Tensor] = field(default_factory=dict)
    f_input: float = math.nan
    f_baseline: float = math.nan


def _baseline_embeds(model, embeds: Tensor, baseline) -> Tensor:
    if isinstance(baseline, str) and baseline == "zero":
        return torch.zeros_like(embeds)
    if isinstance(baseline, int) and not isinstance(baseline, bool):
        vocab = model.get_input_embeddings().num_embeddings
        if not 0 <= baseline < vocab:
            raise ValueError(f"baseline token id must be in [0, {vocab - 1}], got {baseline}")
        row = model.get_input_embeddings()(torch.tensor([baseline], device=embeds.device))[0]
        return row.detach().to(embeds.dtype).expand_as(embeds).clone()
    if isinstance(baseline, Tensor):
        if baseline.shape != embeds.shape:
            raise ValueError(f"baseline tensor must have the embeddings' shape {tuple(embeds.shape)}, got "
                             f"{tuple(baseline.shape)}")
        return baseline.detach().to(embeds.dtype)
    raise ValueError(f"baseline must be 'zero', a token id or a [T, C] tensor, got {baseline!r}")


def explain(model, input_ids, target: int | None = None, *, methods: Sequence[str] = METHODS, position: int = -1,
            layer: int = -1, heads=None, steps: int = 16, baseline="zero", batch: int = 16) -> Explanation:
    """Score every input token for the logit of ``target`` at ``position`` by each of ``methods``.

    ``model``: an HF causal LM taking ``inputs_embeds`` (eager attention for the attention methods:
    ``attn_implementation="eager"``); ``input_ids``: [T] (or [1, T]); ``target``: a token id (default:
    the model's argmax at ``position``); ``layer``, ``heads``: for ``attention`` (default the last
    layer, all heads); ``heads`` also selects the heads that ``rollout`` averages; ``steps``:
    integrated-gradients quadrature nodes; ``baseline``: ``"zero"`` (all-zero embeddings), a token
    id (its embedding at every position) or a [T, C] tensor; ``batch``: forward passes per chunk."""
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 2 and input_ids.shape[0] == 1:
        input_ids = input_ids[0]
    if input_ids.dim() != 1 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be [T] or [1, T] with T >= 1, got shape {tuple(input_ids.shape)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty selection of {', '.join(METHODS)}, got {list(methods)!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    T = input_ids.numel()
    position = _check_position(position, T)
    embedding = model.get_input_embeddings()
    device = embedding.weight.device
    input_ids = input_ids.to(device)
    with torch.no_grad():
        embeds = embedding(input_ids[None])[0]  # (T, C), as the model would embed the ids itself
        wants_attention = any(m in ATTENTION_METHODS for m in methods)
        out = model(input_ids=input_ids[None], output_attentions=wants_attention, use_cache=False)
    vocab = out.logits.shape[-1]
    predicted = int(out.logits[0, position].argmax())
    if target is None:
        target = predicted
    if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < vocab:
        raise ValueError(f"target must be a token id in [0, {vocab - 1}], got {target!r}")
    ex = Explanation(input_ids.tolist(), target, position, predicted)
    if wants_attention:
        attentions = out.attentions
        if not attentions or any(a is None for a in attentions):
            raise ValueError(f"{type(model).__name__} returned no attention weights; load it with "
                             "attn_implementation='eager' (or call model.set_attn_implementation('eager'))")
        if "attention" in methods:
            ex.scores["attention"] = last_layer_attention(attentions, position=position, layer=layer, heads=heads)
        if "rollout" in methods:
            ex.scores["rollout"] = attention_rollout(attentions, heads=heads)[position]
    f = _logit_fn(model, position, target, batch)
    base = _baseline_embeds(model, embeds, baseline)
    with torch.no_grad():
        ex.f_input, ex.f_baseline = (float(v) for v in f(torch.stack([embeds, base])))
    if "gradient" in methods or "input_x_gradient" in methods:
        grad = _gradients(f, embeds[None])[0].to(torch.float64)
        if "gradient" in methods:
            ex.scores["gradient"] = grad.norm(dim=-1)
        if "input_x_gradient" in methods:
            ex.scores["input_x_gradient"] = (embeds.to(torch.float64) * grad).sum(-1)
    if "integrated_gradients" in methods:
        ex.scores["integrated_gradients"] = integrated_gradients(f, embeds, base, steps, batch)
    if "occlusion" in methods:
        ex.scores["occlusion"] = occlusion(f, embeds, base, batch)
    ex.scores = {m: ex.scores[m].detach().cpu() for m in methods}  # the order asked
    return ex


# -- agreement ---------------------------------------------------------------------------------------


def _token_selection(tokens, length: int) -> Tensor:
    if tokens is None:
        return torch.arange(length)
    tokens = torch.as_tensor(tokens)
    if tokens.dtype == torch.bool:
        if tokens.shape != (length,):
            raise ValueError(f"tokens as a mask must have shape ({length},), got {tuple(tokens.shape)}")
        tokens = tokens.nonzero().flatten()
    tokens = tokens.flatten().long()
    if tokens.numel() < 2:
        raise ValueError(f"tokens selects {tokens.numel()} token(s); a rank correlation needs at least 2 "
                         f"(accepted: None for all {length}, indices in [{-length}, {length - 1}], or a [T] mask)")
    if tokens.min() < -length or tokens.max() >= length:
        raise ValueError(f"tokens must be indices in [{-length}, {length - 1}], got {tokens.tolist()}")
    return tokens % length


def agreement(scores: dict[str, Tensor], tokens=None, *, absolute: bool = True) -> dict[tuple[str, str], dict]:
    """Rank agreement of every pair of methods on one example:
    ``{(a, b): {"kendall_tau": float, "spearman_rho": float}}`` for the pairs in ``scores``' order.

    ``tokens``: which tokens to rank (None: all; indices or a boolean [T] mask; fewer than 2 raise
    ``ValueError``); ``absolute``: rank by ``|score|`` (default) or by the signed score."""
    if len(scores) < 2:
        raise ValueError(f"scores must hold at least 2 methods to compare, got {list(scores)}")
    lengths = {m: s.numel() for m, s in scores.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"every method must score the same tokens, got lengths {lengths}")
    selection = _token_selection(tokens, next(iter(lengths.values())))
    ranked = {m: (s.abs() if absolute else s)[selection] for m, s in scores.items()}
    return {(a, b): {"kendall_tau": kendall_tau(ranked[a], ranked[b]), "spearman_rho": spearman_rho(ranked[a], ranked[b])}
            for a, b in itertools.combinations(ranked, 2)}


def summarize(per_example: Sequence[dict]) -> dict[tuple[str, str], dict]:
    """Mean and standard deviation (ddof 1) over examples of :func:`agreement`'s results:
    ``{pair: {"kendall_tau": {"mean", "std", "n"}, ...}}``. NaNs (a constant score vector has no
    ranking) are left out of both and of the count ``n``; None where a statistic is undefined."""
    if not per_example:
        raise ValueError("per_example is empty; accepted: a list of agreement() results")
    summary = {}
    for pair in per_example[0]:
        summary[pair] = {}
        for stat in ("kendall_tau", "spearman_rho"):
            values = torch.tensor([e[pair][stat] for e in per_example], dtype=torch.float64)
            values = values[~values.isnan()]
            n = values.numel()
            summary[pair][stat] = {"mean": float(values.mean()) if n else None,
                                   "std": float(values.std()) if n > 1 else None, "n": n}
    return summary


# -- attnkit analyze attribution ---------------------------------------------------------------------

DEFAULT_TASKS = ("fewshot", "passkey")


def add_parser(sub) -> None:
    """Register ``attnkit analyze attribution`` on an argparse subparsers object ``sub``."""
    p = sub.add_parser(
        "attribution",
        help="attention vs feature attribution: rank agreement of token importances (A Song of (Dis)agreement)",
        description="For the answer token's logit on synthetic prompts (few-shot labels, passkeys), score every "
        "input token by last-layer attention, attention rollout, gradient norm, input x gradient, integrated "
        "gradients and occlusion (leave one out), and report Kendall's tau and Spearman's rho between every pair "
        "of methods per example, aggregated as mean +- std (arXiv 2205.04559's comparison).",
    )
    p.add_argument("--model", default=None, help="a local Hugging Face causal-LM folder (default: the shipped subject)")
    p.add_argument("--task", nargs="+", default=list(DEFAULT_TASKS), choices=DEFAULT_TASKS,
                   help="prompt kinds (default: fewshot passkey)")
    p.add_argument("--examples", type=int, default=16, help="examples per task, an integer >= 1 (default: 16)")
    p.add_argument("--length", type=int, default=120,
                   help="prompt length in bytes: the few-shot maximum, the passkey length (>= 115) (default: 120)")
    p.add_argument("--steps", type=int, default=32, help="integrated-gradients quadrature nodes, >= 1 (default: 32)")
    p.add_argument("--baseline", default="pad",
                   help="baseline embedding for integrated gradients and occlusion: 'zero', 'pad' (the pad "
                   "token's embedding, else token 0) or a token id (default: pad)")
    p.add_argument("--layer", type=int, default=-1, help="layer of the raw-attention explanation (default: -1, the last)")
    p.add_argument("--seed", type=int, default=0, help="prompt seed (default: 0)")
    p.add_argument("--out", default=None, help="a folder (as the other analyses: analyze-attribution.json and .png in it) or "
                   "a .json file (a PNG beside it) (default: none, the table only)")
    p.add_argument("--plot", default=None, help="PNG path, or 'none' (default: the JSON path with .png)")
    p.set_defaults(func=run)


def _load_causal_lm(path):
    """(model in fp32 with eager attention, tokenizer or None) from a local folder."""
    from pathlib import Path

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"--model {str(path)!r} is not a Hugging Face model folder (no config.json in it); "
                         "accepted: a folder written by save_pretrained")
    quiet = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, KeyError, TypeError):
            tokenizer = None  # byte ids then (ASCII prompts), checked against the vocabulary below
    finally:
        transformers.logging.set_verbosity(quiet)
    return model.eval(), tokenizer


def _encode(tokenizer, data: bytes) -> list[int]:
    if tokenizer is None:
        return list(data)
    return tokenizer(data.decode("utf-8"), add_special_tokens=False)["input_ids"]


def _prompts(tasks, examples: int, length: int, seed: int):
    """(task, Example) pairs, deterministic in ``seed``; the passkey haystack is stdlib source text."""
    import random
    from pathlib import Path

    from ...tasks.longcontext import PASSKEY_MIN_LENGTH, fewshot_example, passkey_example

    haystack = Path(random.__file__).read_bytes()
    out = []
    for task in tasks:
        rng = random.Random(f"{seed}-{task}")
        for _ in range(examples):
            if task == "fewshot":
                out.append((task, fewshot_example(rng, 16, max_length=length)))
            else:
                if length < PASSKEY_MIN_LENGTH:
                    raise ValueError(f"--length must be >= {PASSKEY_MIN_LENGTH} for passkey prompts, got {length}")
                out.append((task, passkey_example(rng, haystack, length, rng.random())))
    return out


def _pair_key(pair) -> str:
    return f"{pair[0]}|{pair[1]}"


def run(args) -> int:
    """``attnkit analyze attribution``: table, and JSON + PNG when ``--out`` is given; returns 0."""
    import time
    from datetime import datetime, timezone

    from rich.table import Table

    from ..._console import check_writable, console, invoked_command, write_outputs
    from ..._meta import run_metadata
    from ...hf.subject import default_subject

    for name, minimum in (("examples", 1), ("steps", 1), ("length", 2)):
        value = getattr(args, name)
        if value < minimum:
            raise ValueError(f"--{name} must be an integer >= {minimum}, got {value}")
    if args.out and not str(args.out).endswith(".json"):  # a folder, as attnkit analyze's other subcommands take
        from pathlib import Path as _Path

        if _Path(args.out).is_file():
            raise ValueError(f"--out {args.out!r} is a file but not .json; accepted: a folder or a .json path")
        args.out = str(_Path(args.out) / "analyze-attribution.json")
    if args.out:
        check_writable(args.out, "--out")
    model_path = args.model or default_subject()
    model, tokenizer = _load_causal_lm(model_path)
    vocab = model.get_input_embeddings().num_embeddings
    if args.baseline == "zero":
        baseline = "zero"
    elif args.baseline == "pad":
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        baseline = int(pad) if pad is not None else 0
    else:
        try:
            baseline = int(args.baseline)
        except ValueError:
            raise ValueError(f"--baseline must be 'zero', 'pad' or a token id in [0, {vocab - 1}], "
                             f"got {args.baseline!r}") from None
    start = time.perf_counter()
    records, per_example = [], []
    for task, ex in _prompts(args.task, args.examples, args.length, args.seed):
        ids = _encode(tokenizer, ex.prompt)
        full = _encode(tokenizer, ex.prompt + ex.answer)
        target = full[len(ids)] if full[: len(ids)] == ids and len(full) > len(ids) else _encode(tokenizer, ex.answer)[0]
        if max(ids + [target]) >= vocab:
            raise ValueError(f"--model {str(model_path)!r} has {vocab} tokens but no tokenizer that maps the prompts "
                             "into them; accepted: a folder with tokenizer files, or a byte-level model (vocab >= 256)")
        e = explain(model, torch.tensor(ids), target, steps=args.steps, baseline=baseline, layer=args.layer)
        predicted = e.predicted
        agree = agreement(e.scores)
        per_example.append(agree)
        ig_sum = float(e.scores["integrated_gradients"].sum())
        delta = e.f_input - e.f_baseline
        records.append({
            "task": task, "tokens": len(ids), "target": target, "predicted": predicted, "correct": predicted == target,
            "f_input": e.f_input, "f_baseline": e.f_baseline, "ig_sum": ig_sum,
            "completeness_gap": abs(ig_sum - delta) / max(abs(delta), 1e-12),
            # a constant score vector has no ranking: NaN, written as null
            "agreement": {_pair_key(k): {stat: (None if math.isnan(x) else x) for stat, x in v.items()}
                          for k, v in agree.items()},
        })
    wall = time.perf_counter() - start
    summary = summarize(per_example)
    by_task = {t: summarize([a for a, r in zip(per_example, records) if r["task"] == t]) for t in args.task}
    result = {
        "schema": 1,
        "command": getattr(args, "command", None) or invoked_command("analyze"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": str(model_path),
        "model_class": type(model).__name__,
        "settings": {"tasks": list(args.task), "examples_per_task": args.examples, "length": args.length,
                     "ig_steps": args.steps, "ig_rule": "gauss-legendre", "baseline": baseline, "layer": args.layer,
                     "seed": args.seed, "ranking": "|score|", "explained": "logit of the answer's first token at the last prompt position"},
        "meta": run_metadata("cpu"),
        "methods": {"attention": list(ATTENTION_METHODS), "attribution": list(ATTRIBUTION_METHODS)},
        "summary": {_pair_key(k): v for k, v in summary.items()},
        "by_task": {t: {_pair_key(k): v for k, v in s.items()} for t, s in by_task.items()},
        "accuracy": {t: sum(r["correct"] for r in records if r["task"] == t) / max(1, sum(r["task"] == t for r in records))
                     for t in args.task},
        "completeness_gap_median": float(torch.tensor([r["completeness_gap"] for r in records]).median()),
        "examples": records,
        "wall_s": wall,
    }
    table = Table(title=f"attention vs attribution · {len(records)} examples ({', '.join(args.task)}) · "
                        f"{type(model).__name__} · ranks of |score|")
    for column in ("method a", "method b", "Kendall tau", "Spearman rho"):
        table.add_column(column, justify="left" if column.startswith("method") else "right")
    for (a, b), s in summary.items():
        tau, rho = s["kendall_tau"], s["spearman_rho"]
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        table.add_row(a, b, f"{fmt(tau['mean'], '+.3f')} ± {fmt(tau['std'], '.3f')}",
                      f"{fmt(rho['mean'], '+.3f')} ± {fmt(rho['std'], '.3f')}")
    out = console()
    out.print(table)
    out.print(f"answer accuracy: {result['accuracy']}; integrated gradients completeness gap "
              f"(|sum - (f(x) - f(b))| / |f(x) - f(b)|), median {result['completeness_gap_median']:.3f}; {wall:.1f} s")
    if args.out:
        write_outputs(result, args.out, args.plot, _plot, out)
    return 0


def _plot(result: dict, path) -> None:
    """Box plot of per-example tau for each attention-vs-attribution pair; heatmap of mean tau."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [*result["methods"]["attention"], *result["methods"]["attribution"]]
    short = {"attention": "attention", "rollout": "rollout", "gradient": "grad", "input_x_gradient": "x·grad",
             "integrated_gradients": "IG", "occlusion": "occlusion"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [1.3, 1]})
    pairs = [(a, b) for a in result["methods"]["attention"] for b in result["methods"]["attribution"]]
    data = [[r["agreement"][_pair_key(p)]["kendall_tau"] for r in result["examples"]] for p in pairs]
    data = [[v for v in d if v is not None] for d in data]
    left.boxplot(data, showmeans=True)
    left.set_xticks(range(1, len(pairs) + 1), [f"{short[a]}\nvs {short[b]}" for a, b in pairs], fontsize=8)
    left.axhline(0, color="grey", lw=0.8)
    left.set_ylabel("Kendall's tau per example")
    left.set_title("attention-based vs attribution token rankings")
    n = len(methods)
    grid = torch.full((n, n), float("nan"))
    for i, a in enumerate(methods):
        grid[i, i] = 1.0
        for j, b in enumerate(methods):
            key = _pair_key((a, b)) if _pair_key((a, b)) in result["summary"] else _pair_key((b, a))
            if i != j and key in result["summary"]:
                mean = result["summary"][key]["kendall_tau"]["mean"]
                grid[i, j] = float("nan") if mean is None else mean
    image = right.imshow(grid.numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
    right.set_xticks(range(n), [short[m] for m in methods], rotation=30, ha="right")
    right.set_yticks(range(n), [short[m] for m in methods])
    for i in range(n):
        for j in range(n):
            right.text(j, i, f"{float(grid[i, j]):.2f}", ha="center", va="center", fontsize=8)
    right.set_title("mean Kendall's tau, method x method")
    fig.colorbar(image, ax=right, shrink=0.8)
    fig.suptitle(f"{result['model_class']} · {len(result['examples'])} examples ({', '.join(result['settings']['tasks'])}) · "
                 f"answer logit · ranks of |score|", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
