"""WAAD and FAI: local and global attention heads, preplan and anchor tokens, RL credit weights.

Attention Illuminates LLM Reasoning: The Preplan-and-Anchor Rhythm Enables Fine-Grained Policy
Optimization (Li et al., arXiv 2510.13554). For one head's causal attention ``A [T, T]`` (row
``t`` = query, ``A[t, s] = 0`` for ``s > t``):

- Windowed Average Attention Distance of token ``t`` (how far back it looks, distances clipped
  at the window ``W``)::

      WAAD_t = sum_{s <= t} A[t, s] * min(t - s, W)

- Future Attention Influence of token ``s`` (the mean attention it receives from the tokens
  after it)::

      FAI_s = 1 / (T - s - 1) * sum_{t > s} A[t, s]        (FAI of the last token: 0)

  ``exclude`` (10 here) leaves out the queries closer than ``exclude`` (``t - s < exclude``), so that
  FAI measures long-range influence rather than the next few tokens' local reads.

- Heads are locally or globally focused by their mean attention distance
  ``d_h = mean_t sum_s A[t, s] (t - s)`` over the queries, with the first ``sink`` keys left out
  and each row renormalised (an attention sink at token 0 would otherwise make every head look
  global): the ``fraction`` of heads with the smallest ``d_h`` are local, the ``fraction`` with
  the largest global, the others mixed (a rank rule: absolute distances scale with the sequence
  length). WAAD is read on the mean attention of the local heads (its sawtooth marks phrase
  chunks), FAI on the mean of the global heads.

- Preplan tokens: where the local WAAD jumps up, ``WAAD_t - WAAD_{t-1}`` in the top ``top``
  fraction and > 0 (a token that reaches back beyond the current chunk to start a new one).
  Anchor tokens: FAI in the top ``top`` fraction. Coupled: a preplan token within ``span``
  tokens before an anchor, and that anchor.

- Credit weights (the paper's three RL strategies, for a GRPO/PPO trainer): the per-token
  advantage is multiplied by ``gamma`` (> 1) at the selected tokens and by 1 elsewhere:
  ``"preplan"`` (local-chunk credit), ``"anchor"`` (global-anchor credit), ``"coupled"``
  (preplan tokens that lead into anchors, and the anchors). With ``normalize=True`` the weights
  of each row are scaled to mean 1 over the completion, so the total update size is unchanged.
  :func:`credit_weights` takes WAAD/FAI ``[B, T]`` and a completion mask and returns ``[B, T]``
  to multiply a trainer's per-token advantages (TRL's GRPO computes ``advantages [B]`` and a
  ``completion_mask [B, T]``: ``advantages[:, None] * credit_weights(...)``).

The window ``W`` (10), FAI's ``exclude`` (10, the window), the head ``fraction`` (0.3), ``top``
(0.1), ``span`` (3) and ``gamma`` (1.5) are this module's
defaults: the paper's exact values are not restated here; each is an argument.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .capture import capture, model_shape

__all__ = ["waad", "fai", "mean_distance", "classify_heads", "mark_tokens", "credit_weights", "waad_analysis",
           "plot_heads", "plot_signals", "STRATEGIES"]

STRATEGIES = ("preplan", "anchor", "coupled")
_MARK = {"local": "L", "global": "G"}


def _check_weights(weights: Tensor, name: str = "weights") -> Tensor:
    if not isinstance(weights, Tensor) or weights.dim() < 2 or weights.shape[-1] != weights.shape[-2]:
        got = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"{name} must be a causal attention map [..., T, T] (queries = keys), got {got}")
    if weights.shape[-1] == 0:
        raise ValueError(f"{name} must hold at least one token, got T = 0")
    return weights.double()


def _positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _distance(T: int, device) -> Tensor:
    pos = torch.arange(T, device=device)
    return (pos[:, None] - pos[None, :]).clamp(min=0).double()  # (T, T): t - s, 0 above the diagonal


def waad(weights: Tensor, window: int = 10) -> Tensor:
    """``WAAD_t`` of ``weights [..., T, T]`` -> ``[..., T]`` (float64)."""
    weights = _check_weights(weights)
    window = _positive_int(window, "window")
    return (weights * _distance(weights.shape[-1], weights.device).clamp(max=window)).sum(-1)


def fai(weights: Tensor, exclude: int = 10) -> Tensor:
    """``FAI_s`` of ``weights [..., T, T]`` -> ``[..., T]`` (float64): the mean over queries
    ``t > s`` (``t - s >= max(1, exclude)``) of ``A[t, s]``; 0 where no such query exists."""
    weights = _check_weights(weights)
    exclude = _positive_int(exclude, "exclude", minimum=0)
    T = weights.shape[-1]
    dist = _distance(T, weights.device)
    later = (dist >= max(1, exclude)).double()  # (T, T): query t counts for key s
    count = later.sum(0)  # (T,) queries counted per key
    return (weights * later).sum(-2) / count.clamp_min(1)


def mean_distance(weights: Tensor, sink: int = 1) -> Tensor:
    """Mean attention distance ``[..., T, T] -> [...]`` over the queries ``t >= sink``, the first
    ``sink`` keys left out and each row renormalised (float64)."""
    weights = _check_weights(weights)
    sink = _positive_int(sink, "sink", minimum=0)
    T = weights.shape[-1]
    if sink >= T:
        raise ValueError(f"sink must be < the number of tokens T = {T}, got {sink}")
    kept = weights[..., sink:, sink:]  # (..., T', T')
    rows = kept / kept.sum(-1, keepdim=True).clamp_min(1e-30)
    return (rows * _distance(T - sink, weights.device)).sum(-1).mean(-1)


def classify_heads(distances, fraction: float = 0.3) -> list[list[str]]:
    """``"local"`` for the ``ceil(fraction * N)`` heads of smallest mean distance, ``"global"`` for
    as many of the largest, ``"mixed"`` between (ties in (layer, head) order); ``distances [L, H]``."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 0.5:
        raise ValueError(f"fraction must be a number in (0, 0.5] (the share of heads called local, and global), "
                         f"got {fraction!r}")
    d = torch.as_tensor(distances, dtype=torch.float64)
    if d.dim() != 2 or d.numel() == 0:
        raise ValueError(f"distances must be a non-empty [layers, heads] table, got shape {tuple(d.shape)}")
    n = d.numel()
    k = min(n // 2, int(torch.ceil(torch.tensor(fraction * n)).item())) or 1
    order = d.flatten().argsort(stable=True)
    label = ["mixed"] * n
    for i in order[:k].tolist():
        label[i] = "local"
    for i in order[n - k:].tolist():
        label[i] = "global" if label[i] == "mixed" else label[i]
    return [label[r * d.shape[1]:(r + 1) * d.shape[1]] for r in range(d.shape[0])]


def _top(values: Tensor, mask: Tensor, top: float) -> Tensor:
    """Bool ``[B, T]``: per row, the ``ceil(top * n)`` largest ``values`` among the ``n`` masked tokens."""
    picked = torch.zeros_like(mask)
    for b in range(values.shape[0]):
        idx = mask[b].nonzero().flatten()
        if idx.numel() == 0:
            continue
        k = max(1, int(torch.ceil(torch.tensor(top * idx.numel())).item()))
        order = values[b, idx].argsort(descending=True, stable=True)[:k]
        picked[b, idx[order]] = True
    return picked


def _check_signals(waad_t, fai_t, mask):
    waad_t = torch.as_tensor(waad_t, dtype=torch.float64)
    fai_t = torch.as_tensor(fai_t, dtype=torch.float64)
    squeeze = waad_t.dim() == 1
    if squeeze:
        waad_t, fai_t = waad_t[None], fai_t[None]
    if waad_t.dim() != 2 or waad_t.shape != fai_t.shape:
        raise ValueError(f"waad and fai must be [T] or [B, T] of one shape, got {tuple(waad_t.shape)} and "
                         f"{tuple(fai_t.shape)}")
    if mask is None:
        mask = torch.ones(waad_t.shape, dtype=torch.bool)
    else:
        mask = torch.as_tensor(mask).bool()
        mask = mask[None] if mask.dim() == 1 else mask
        if mask.shape != waad_t.shape:
            raise ValueError(f"mask must have the shape of waad {tuple(waad_t.shape)}, got {tuple(mask.shape)}")
    if not bool(mask.any()):
        raise ValueError("mask selects no token (an empty token selection); mark the completion tokens True")
    return waad_t, fai_t, mask, squeeze


def mark_tokens(waad_t, fai_t, mask=None, *, top: float = 0.1, span: int = 3) -> dict:
    """Preplan, anchor and coupled tokens (module docstring) of WAAD/FAI ``[T]`` or ``[B, T]``;
    ``mask`` (same shape, bool) says which tokens count (e.g. the generated ones).
    Returns bool tensors ``{"preplan", "anchor", "coupled"}`` of the input's shape."""
    if not isinstance(top, (int, float)) or isinstance(top, bool) or not 0 < top <= 1:
        raise ValueError(f"top must be a fraction in (0, 1], got {top!r}")
    span = _positive_int(span, "span", minimum=0)
    waad_t, fai_t, mask, squeeze = _check_signals(waad_t, fai_t, mask)
    jump = torch.zeros_like(waad_t)
    jump[:, 1:] = waad_t[:, 1:] - waad_t[:, :-1]
    preplan = _top(jump, mask, top) & (jump > 0)
    anchor = _top(fai_t, mask, top)
    # a preplan token counts as coupled when an anchor follows within span tokens (or coincides)
    T = waad_t.shape[1]
    ahead = torch.zeros_like(anchor)
    for d in range(0, span + 1):
        ahead[:, : T - d] |= anchor[:, d:]
    coupled_pre = preplan & ahead
    behind = torch.zeros_like(anchor)
    for d in range(0, span + 1):
        behind[:, d:] |= coupled_pre[:, : T - d]
    coupled = coupled_pre | (anchor & behind)
    out = {"preplan": preplan, "anchor": anchor, "coupled": coupled}
    return {k: v[0] for k, v in out.items()} if squeeze else out


def credit_weights(waad_t, fai_t, mask=None, *, strategy: str = "coupled", gamma: float = 1.5, top: float = 0.1,
                   span: int = 3, normalize: bool = False) -> Tensor:
    """Per-token credit weights ``[T]`` or ``[B, T]`` (float32) for an RL trainer: ``gamma`` at the
    tokens ``strategy`` selects, 1 at the other masked tokens, 0 outside ``mask``; with
    ``normalize`` each row's masked weights average to 1. Multiply the per-token advantages."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
        raise ValueError(f"gamma must be a number > 0 (the weight of the selected tokens), got {gamma!r}")
    waad2, fai2, mask2, squeeze = _check_signals(waad_t, fai_t, mask)
    marks = mark_tokens(waad2, fai2, mask2, top=top, span=span)
    weights = torch.where(marks[strategy], float(gamma), 1.0) * mask2
    if normalize:
        weights = weights / (weights.sum(-1, keepdim=True) / mask2.sum(-1, keepdim=True).clamp_min(1))
        weights = weights * mask2
    weights = weights.float()
    return weights[0] if squeeze else weights


@torch.no_grad()
def waad_analysis(model, input_ids: Tensor, *, window: int = 10, sink: int = 1, exclude: int = 10,
                  fraction: float = 0.3, top: float = 0.1, span: int = 3, start: int = 0) -> dict:
    """Per head the mean distance and local/global class; per token WAAD (mean over the local
    heads) and FAI (mean over the global heads), the marked tokens, on ``input_ids [1, T]``.
    ``start``: the first token that counts (e.g. the first generated one). WAAD and FAI are
    linear in the attention map, so each head's signals are reduced as its layer runs and the
    head means taken afterwards: no layer's map is kept."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        got = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be one sequence [1, T], got {got}")
    T = input_ids.shape[1]
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < T:
        raise ValueError(f"start must be an integer in [0, {T}) (the first token that counts), got {start!r}")
    window = _positive_int(window, "window")
    num_layers, num_heads, _ = model_shape(model)
    head_waad, head_fai, head_dist = {}, {}, {}

    def hook(call):
        w = call.weights()[0]  # (H, T, T)
        head_waad[call.layer] = waad(w, window)
        head_fai[call.layer] = fai(w, exclude)
        head_dist[call.layer] = mean_distance(w, sink)

    with capture(model, hook):
        model(input_ids)
    dist = torch.stack([head_dist[i] for i in range(num_layers)])  # (L, H)
    classes = classify_heads(dist, fraction)
    is_local = torch.tensor([[c == "local" for c in row] for row in classes])
    is_global = torch.tensor([[c == "global" for c in row] for row in classes])
    all_waad = torch.stack([head_waad[i] for i in range(num_layers)])  # (L, H, T)
    all_fai = torch.stack([head_fai[i] for i in range(num_layers)])
    local, glob = is_local, is_global
    waad_t = all_waad[local].mean(0)  # classify_heads names at least one head of each class
    fai_t = all_fai[glob].mean(0)
    mask = torch.zeros(T, dtype=torch.bool)
    mask[start:] = True
    marks = mark_tokens(waad_t, fai_t, mask, top=top, span=span)
    return {"window": window, "sink": sink, "exclude": exclude, "fraction": fraction, "top": top, "span": span,
            "start": start,
            "tokens": T, "num_layers": num_layers, "num_heads": num_heads,
            "mean_distance": dist.tolist(), "classes": classes,
            "local_heads": int(local.sum()), "global_heads": int(glob.sum()),
            "waad": waad_t.tolist(), "fai": fai_t.tolist(),
            **{k: v.nonzero().flatten().tolist() for k, v in marks.items()}}


def plot_heads(report: dict, file) -> None:
    """Mean attention distance per layer x head, local heads outlined (distance < window)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    d = np.array(report["mean_distance"])
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * d.shape[1], 1 + 0.35 * d.shape[0]))
    im = ax.imshow(d, aspect="auto", cmap="viridis")
    for layer, row in enumerate(report["classes"]):
        for h, c in enumerate(row):
            ax.text(h, layer, _MARK.get(c, ""), ha="center", va="center",
                    color="white" if c == "local" else "black", fontsize=8)
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_title(f"mean attention distance (L: local, G: global: the {report['fraction']:.0%} nearest / farthest)",
                 fontsize=9)
    fig.colorbar(im, ax=ax, label="tokens")
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def plot_signals(report: dict, file, labels=None) -> None:
    """WAAD (local heads) and FAI (global heads) over the tokens, preplan / anchor tokens marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = report["start"]
    xs = list(range(start, report["tokens"]))
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(12, 5), sharex=True)
    a1.plot(xs, report["waad"][start:], lw=0.9, color="tab:blue")
    for t in report["preplan"]:
        a1.axvline(t, color="tab:orange", alpha=0.5, lw=1)
    a1.set_ylabel(f"WAAD (W={report['window']})")
    a1.set_title("WAAD of the local heads (orange: preplan tokens) / FAI of the global heads (red: anchor tokens)")
    a2.plot(xs, report["fai"][start:], lw=0.9, color="tab:green")
    for t in report["anchor"]:
        a2.axvline(t, color="tab:red", alpha=0.5, lw=1)
    a2.set_ylabel("FAI")
    a2.set_xlabel("token position")
    if labels is not None and len(xs) <= 120:
        a2.set_xticks(xs)
        a2.set_xticklabels([labels[i] for i in xs], fontsize=6, rotation=90)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


# -- attnkit analyze waad --------------------------------------------------------------------------


def add_parser(sub):
    from .cli import common_arguments

    p = sub.add_parser("waad", help="WAAD/FAI: local and global heads, preplan and anchor tokens of a generation",
                       description="Generate from a held-out text prompt, then read the attention over the whole "
                       "sequence: each head's mean attention distance (local / global heads), WAAD of the local heads "
                       "and FAI of the global heads per generated token, the preplan and anchor tokens, and the "
                       "per-token RL credit weights (arXiv 2510.13554).")
    common_arguments(p)
    p.add_argument("--prompt-length", type=int, default=384, help="prompt tokens, an integer >= 1 (default: 384)")
    p.add_argument("--new-tokens", type=int, default=160,
                   help="greedy tokens generated, an integer >= 2 (default: 160)")
    p.add_argument("--window", type=int, default=10, help="WAAD's clipping window W, an integer >= 1 (default: 10)")
    p.add_argument("--fraction", type=float, default=0.3, help="share of heads called local (and global), "
                   "in (0, 0.5] (default: 0.3)")
    p.add_argument("--top", type=float, default=0.1, help="share of generated tokens marked preplan (and anchor), "
                   "in (0, 1] (default: 0.1)")
    p.add_argument("--strategy", default="coupled", choices=STRATEGIES, help="credit strategy of the weights in the "
                   "JSON (default: coupled)")
    p.add_argument("--gamma", type=float, default=1.5, help="credit weight of the selected tokens (default: 1.5)")
    p.add_argument("--corpus", default=None, help="text file or folder (default: Python's stdlib source)")
    return p


def run(args) -> int:
    from rich.table import Table

    from ..._console import console
    from .cli import haystack, load_model, write_results
    from .sinks_hf import text_windows

    if isinstance(args.new_tokens, bool) or args.new_tokens < 2:
        raise ValueError(f"--new-tokens must be an integer >= 2, got {args.new_tokens}")
    model, tokenizer, path = load_model(args)
    prompt = text_windows(tokenizer, haystack(args.corpus), args.prompt_length, 1, args.seed)
    with torch.no_grad():
        ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    start = prompt.shape[1]
    report = waad_analysis(model, ids, window=args.window, fraction=args.fraction, top=args.top, start=start)
    mask = torch.zeros(ids.shape[1], dtype=torch.bool)
    mask[start:] = True
    weights = credit_weights(report["waad"], report["fai"], mask, strategy=args.strategy, gamma=args.gamma,
                             top=args.top, span=report["span"])
    labels = [tokenizer.decode([i]) for i in ids[0].tolist()]
    table = Table(title=f"local (L) and global (G) heads by mean attention distance · {path}")
    table.add_column("layer", justify="right")
    for h in range(report["num_heads"]):
        table.add_column(f"head {h}", justify="right")
    for layer, (row, classes) in enumerate(zip(report["mean_distance"], report["classes"])):
        table.add_row(str(layer), *(f"{d:.1f} {_MARK.get(c, '')}"
                                    for d, c in zip(row, classes)))
    console().print(table)
    show = lambda idx: ", ".join(f"{t}:{labels[t]!r}" for t in idx[:12])  # noqa: E731
    console().print(f"generated {ids.shape[1] - start} tokens: {tokenizer.decode(ids[0, start:])!r}")
    console().print(f"preplan tokens ({len(report['preplan'])}): {show(report['preplan'])}")
    console().print(f"anchor tokens ({len(report['anchor'])}): {show(report['anchor'])}")
    console().print(f"coupled tokens ({len(report['coupled'])}): {show(report['coupled'])}")
    data = {"model": path, "seed": args.seed, "prompt_length": start, "new_tokens": ids.shape[1] - start,
            "text": tokenizer.decode(ids[0, start:]), "token_labels": labels, **report,
            "credit": {"strategy": args.strategy, "gamma": args.gamma, "weights": weights.tolist()}}
    write_results(args, "waad", data, {"-heads": lambda f: plot_heads(report, f),
                                       "-signals": lambda f: plot_signals(report, f, labels)})
    return 0
