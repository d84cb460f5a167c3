"""Attention sinks on any transformers model: first-token sinks and in-sequence sinks.

1. First-token sinks (When Attention Sink Emerges in Language Models, Gu et al., arXiv
   2410.10781), the definitions of :mod:`attnkit.analysis.sinks` applied per layer and head
   through :class:`~attnkit.analysis.hf.capture.capture`: for queries ``i >= 1``,
   ``share_h = mean_i w_i0 / sum_j w_ij``, ``weight_h = mean_i w_i0``, and head ``h`` is a sink
   head when ``weight_h > epsilon`` (0.3).
2. In-sequence sinks by massive activations (Sun et al., Massive Activations in Large Language
   Models, arXiv 2402.17762; the attention-sink tokens that ACT, arXiv 2406.15765, and the
   visual-sink work VAR, arXiv 2503.03321, find carry the same signature): in the residual
   stream ``h_l [T, C]`` after layer ``l``, with ``m_l = median |h_l|`` over all entries, a pair
   (token ``t``, dimension ``c``) is massive when ``|h_l[t, c]| > ratio * m_l`` (``ratio`` = 100)
   and ``|h_l[t, c]| >= min_magnitude``. A token with massive dimensions is a sink token; the
   report lists its position, its dimensions, its largest ``|h| / m`` and the attention it
   receives (mean over layers, heads and the queries that can see it).

Every layer is reduced as it runs (per-head numbers and a ``[S]`` vector of received attention),
so long inputs stream.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..sinks import first_token_metrics
from .capture import capture, model_shape

__all__ = ["massive_activations", "sink_analysis", "received_attention", "plot_sinks"]


def received_attention(weights: Tensor) -> Tensor:
    """Mean attention each key receives from the queries that may see it, ``[B, H, T, S] -> [S]``
    (float64; causal: key ``s`` is seen by the queries at positions ``>= s``)."""
    if weights.dim() != 4:
        raise ValueError(f"weights must be [B, H, T, S], got {tuple(weights.shape)}")
    B, H, T, S = weights.shape
    total = weights.sum(dim=(0, 1, 2), dtype=torch.float64)  # (S,)
    q_pos = torch.arange(S - T, S)
    seen_by = (q_pos[:, None] >= torch.arange(S)).sum(0).double()  # (S,) queries at or after s
    return total / (B * H * seen_by.clamp_min(1))


def massive_activations(hidden_states, *, ratio: float = 100.0, min_magnitude: float = 0.0, batch: int = 0) -> dict:
    """Massive activations in hidden states ``[(B, T, C)] * L`` (one entry per layer output, as
    ``output_hidden_states`` gives them after the embeddings); see the module docstring.

    Returns ``{"tokens": [{position, layers, dims, max_ratio, max_magnitude}],
    "per_layer": [{layer, median, max_ratio, position, dim}]}`` for row ``batch``."""
    if not ratio > 1:
        raise ValueError(f"ratio must be a number > 1 (a massive value's multiple of the median |h|), got {ratio!r}")
    if not min_magnitude >= 0:
        raise ValueError(f"min_magnitude must be >= 0, got {min_magnitude!r}")
    hidden_states = list(hidden_states)
    if not hidden_states:
        raise ValueError("hidden_states must hold at least one [B, T, C] tensor, got none")
    tokens: dict[int, dict] = {}
    per_layer = []
    for layer, h in enumerate(hidden_states):
        if h.dim() != 3 or not 0 <= batch < h.shape[0]:
            raise ValueError(f"hidden_states[{layer}] must be [B, T, C] with batch={batch} in [0, B), "
                             f"got {tuple(h.shape)}")
        a = h[batch].double().abs()  # (T, C)
        median = float(a.median())
        scaled = a / max(median, 1e-30)
        peak = int(scaled.argmax())
        per_layer.append({"layer": layer, "median": median, "max_ratio": float(scaled.max()),
                          "position": peak // a.shape[1], "dim": peak % a.shape[1]})
        hits = ((scaled > ratio) & (a >= min_magnitude)).nonzero().tolist()
        for t, c in hits:
            entry = tokens.setdefault(t, {"position": t, "layers": set(), "dims": set(), "max_ratio": 0.0,
                                          "max_magnitude": 0.0})
            entry["layers"].add(layer)
            entry["dims"].add(c)
            entry["max_ratio"] = max(entry["max_ratio"], float(scaled[t, c]))
            entry["max_magnitude"] = max(entry["max_magnitude"], float(a[t, c]))
    found = [dict(e, layers=sorted(e["layers"]), dims=sorted(e["dims"])) for _, e in sorted(tokens.items())]
    return {"ratio": ratio, "min_magnitude": min_magnitude, "tokens": found, "per_layer": per_layer}


@torch.no_grad()
def sink_analysis(model, input_ids: Tensor, *, epsilon: float = 0.3, ratio: float = 100.0,
                  min_magnitude: float = 0.0) -> dict:
    """First-token sink metrics per layer and head, and massive-activation sink tokens, of
    ``model`` on ``input_ids [B, T]`` (unpadded: token 0 is every row's first token)."""
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 2:
        got = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be [B, T] with T >= 2, got {got}")
    num_layers, num_heads, num_kv = model_shape(model)
    per_layer: dict[int, dict] = {}
    received: dict[int, Tensor] = {}

    def hook(call):
        # one head at a time, reduced right here: a layer's [B, H, T, S] never exists at once
        heads, seen = [], 0
        for h in range(num_heads):
            w = call.weights([h])  # (B, 1, T, S)
            heads.append(first_token_metrics(w, epsilon=epsilon))
            seen = seen + received_attention(w)
        per_layer[call.layer] = {k: torch.cat([m[k] for m in heads]) for k in heads[0]}
        received[call.layer] = seen / num_heads

    with capture(model, hook):
        out = model(input_ids, output_hidden_states=True)
    layers = []
    for layer in range(num_layers):
        m = per_layer[layer]
        layers.append({"layer": layer, "first_token_share": float(m["share"].mean()),
                       "first_token_weight": float(m["weight"].mean()), "sink_heads": float(m["sink"].double().mean()),
                       "head_share": m["share"].tolist(), "head_weight": m["weight"].tolist(),
                       "head_sink": m["sink"].tolist()})
    massive = massive_activations(out.hidden_states[1:], ratio=ratio, min_magnitude=min_magnitude)
    mean_received = torch.stack([received[i] for i in range(num_layers)]).mean(0)  # (S,)
    S = mean_received.shape[0]
    for token in massive["tokens"]:
        token["received_attention"] = float(mean_received[token["position"]])
        # the reference: what the key would receive if every causal row were uniform (row t: 1 / (t + 1))
        rows = torch.arange(token["position"], S, dtype=torch.float64) + 1
        token["uniform_attention"] = float((1 / rows).mean())
    mean = lambda key: sum(r[key] for r in layers) / len(layers)  # noqa: E731
    sink_heads = [[layer, h] for layer in range(num_layers) for h in range(num_heads) if layers[layer]["head_sink"][h]]
    return {"num_layers": num_layers, "num_heads": num_heads, "num_kv_heads": num_kv, "epsilon": epsilon,
            "tokens": int(input_ids.shape[1]), "batch": int(input_ids.shape[0]),
            "first_token_share": mean("first_token_share"), "first_token_weight": mean("first_token_weight"),
            "sink_heads": mean("sink_heads"), "sink_head_list": sink_heads, "layers": layers,
            "massive": massive, "in_sequence_sinks": [t["position"] for t in massive["tokens"] if t["position"] > 0],
            "received_attention": mean_received.tolist()}


def plot_sinks(report: dict, file, labels=None) -> None:
    """Heatmap of the first-token share per layer x head, and the largest ``|h| / median`` per
    token (the layer where it peaks), massive tokens marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    share = np.array([r["head_share"] for r in report["layers"]])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 2]})
    im = a1.imshow(share, aspect="auto", cmap="magma", vmin=0, vmax=1)
    a1.set_xlabel("query head")
    a1.set_ylabel("layer")
    a1.set_title(f"first-token share (sink heads: {report['sink_heads']:.0%})")
    fig.colorbar(im, ax=a1)
    received = np.array(report["received_attention"])
    a2.plot(received, lw=0.8, label="mean attention received")
    for t in report["massive"]["tokens"]:
        a2.axvline(t["position"], color="red", alpha=0.4, lw=1)
    a2.set_yscale("log")
    a2.set_xlabel("token position" + (" (red: massive-activation tokens)" if report["massive"]["tokens"] else ""))
    a2.set_title(f"attention received per key; massive activations (> {report['massive']['ratio']:g} x median)")
    a2.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


# -- attnkit analyze sinks -------------------------------------------------------------------------


def add_parser(sub):
    from .cli import common_arguments

    p = sub.add_parser("sinks", help="first-token sinks per layer and head, and massive-activation sink tokens",
                       description="First-token attention share and sink heads (arXiv 2410.10781's metric) per "
                       "layer and head, and in-sequence sink tokens by massive activations of the hidden states, on "
                       "windows of held-out text.")
    common_arguments(p)
    p.add_argument("--length", type=int, default=512, help="tokens per window, an integer >= 2 (default: 512)")
    p.add_argument("--windows", type=int, default=4, help="text windows (the batch), an integer >= 1 (default: 4)")
    p.add_argument("--epsilon", type=float, default=0.3, help="sink-head threshold on the mean first-token weight, "
                   "in (0, 1) (default: 0.3)")
    p.add_argument("--ratio", type=float, default=100.0, help="massive activation: |h| > ratio x median |h|, "
                   "a number > 1 (default: 100)")
    p.add_argument("--corpus", default=None, help="text file or folder (default: Python's stdlib source)")
    return p


def text_windows(tokenizer, text: bytes, length: int, count: int, seed: int) -> Tensor:
    """``count`` random windows of ``length`` tokens ``[count, length]`` from ``text``."""
    import random

    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ValueError(f"--length must be an integer >= 2, got {length!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"--windows must be an integer >= 1, got {count!r}")
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        # bytes -> tokens: a byte span long enough for any tokenizer of >= 1 byte per token
        start = rng.randrange(max(1, len(text) - 8 * length))
        ids = tokenizer(text[start:start + 8 * length].decode("utf-8", "ignore"), add_special_tokens=False).input_ids
        if len(ids) < length:
            raise ValueError(f"the corpus is too short for --length {length}")
        rows.append(ids[:length])
    return torch.tensor(rows)


def run(args) -> int:
    from rich.table import Table

    from ..._console import console
    from .cli import haystack, load_model, write_results

    model, tokenizer, path = load_model(args)
    ids = text_windows(tokenizer, haystack(args.corpus), args.length, args.windows, args.seed)
    report = sink_analysis(model, ids, epsilon=args.epsilon, ratio=args.ratio)
    table = Table(title=f"attention sinks · {path} · {args.windows} x {args.length} tokens · epsilon {args.epsilon}")
    for column in ("layer", "first-token share", "first-token weight", "sink heads", "max |h| / median"):
        table.add_column(column, justify="right")
    for row, m in zip(report["layers"], report["massive"]["per_layer"]):
        table.add_row(str(row["layer"]), f"{row['first_token_share']:.3f}", f"{row['first_token_weight']:.3f}",
                      f"{row['sink_heads']:.2f}", f"{m['max_ratio']:.1f} (t={m['position']}, dim {m['dim']})")
    console().print(table)
    tokens = report["massive"]["tokens"]
    console().print(f"mean first-token share {report['first_token_share']:.3f}; sink heads "
                    f"{len(report['sink_head_list'])} of {report['num_layers'] * report['num_heads']}; "
                    f"massive-activation tokens (> {args.ratio:g} x median, window 0): "
                    + (", ".join(f"t={t['position']} dims {t['dims'][:4]}" for t in tokens[:8]) or "none"))
    write_results(args, "sinks", {"model": path, "length": args.length, "windows": args.windows, "seed": args.seed,
                                  **report}, {"": lambda file: plot_sinks(report, file)})
    return 0
