"""Cross-attention vs saliency in encoder-decoder models: how much of the input relevance does
cross-attention show?

"Cross-Attention is Half Explanation in Speech-to-Text Models" (Papi, Fucci, Gaido, Negri,
Bentivogli; arXiv 2509.18010) compares, for each generated token ``y_i``, the cross-attention
scores over the encoder frames, ``CA^(l,h)[i, :]`` per decoder layer ``l`` and head ``h`` and
averaged over heads and layers, with saliency maps of the same prediction: the input saliency
``SM_X`` (relevance of the input features, summed over the feature axis and brought to the encoder's
frame rate) and the encoder-output saliency ``SM_H`` (relevance of each encoder output frame, which
is what cross-attention reads directly). Their measure is Pearson's correlation between the two
maps over the frames, averaged over tokens: about 0.5 against ``SM_X`` ("half explanation") and
0.52-0.75 against ``SM_H`` for the best aggregation.

Here, saliency is the gradient of the predicted token's log-probability: for step ``i``
(teacher-forced on the decoder tokens so far),

    SM_X[i, s] = sum over the input positions pooled into frame s of ||d log p(y_i) / d x_t||_2
    SM_H[i, s] = ||d log p(y_i) / d h_s||_2

with ``x`` the encoder input (Whisper's log-mel features [F, T], pooled by the encoder's stride
T / S; or the token embeddings of a text encoder, one per frame) and ``h`` the encoder output
[S, C]. The paper's own saliency is perturbation-based (SPES); a gradient is the cheap stand-in. For
every head, layer and the aggregate, :meth:`CrossAttentionSaliency.explained` gives Pearson's r per
token (the paper's measure) and ``r^2`` (the share of the saliency's variance over frames that the
attention scores account for linearly), averaged over tokens.

Works with any HF ``*ForConditionalGeneration`` whose config says ``is_encoder_decoder`` (Whisper,
BART, T5, ...), loaded with eager attention so that ``cross_attentions`` come back::

    >>> result = cross_attention_saliency(model, {"input_features": features}, decoder_input_ids)
    >>> result.cross_attention.shape        # (L, H, I, S): decoder layers, heads, steps, encoder frames
    >>> result.explained()["aggregate"]      # {"input": {"r": ..., "r2": ...}, "encoder": {...}}
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .attribution import pearson_r

__all__ = ["TINY_MODELS", "has_cross_attention", "check_cross_attention", "pool_frames", "CrossAttentionSaliency",
           "cross_attention_saliency", "greedy_decoder_ids", "tiny_encoder_decoder", "add_parser", "run"]

TINY_MODELS = ("tiny-whisper", "tiny-bart", "tiny-t5")


def has_cross_attention(model) -> bool:
    """Whether ``model`` is an encoder-decoder whose decoder cross-attends to the encoder."""
    return bool(getattr(model.config, "is_encoder_decoder", False)) and hasattr(model, "get_encoder")


def check_cross_attention(model) -> None:
    """``ValueError`` naming the model class when it has no cross-attention."""
    if not has_cross_attention(model):
        raise ValueError(f"{type(model).__name__} has no cross-attention (config.is_encoder_decoder is "
                         f"{getattr(model.config, 'is_encoder_decoder', None)!r}); accepted: an encoder-decoder model "
                         "such as WhisperForConditionalGeneration, BartForConditionalGeneration or "
                         "T5ForConditionalGeneration")


def pool_frames(saliency: Tensor, frames: int) -> Tensor:
    """Bring per-input-position saliency [..., T] to the encoder's ``frames`` [..., S] by summing
    groups of ``T / S`` positions (the encoder's stride; Whisper: 2), or by area interpolation
    (times T / S, to keep the total) when T is not a multiple of S."""
    T = saliency.shape[-1]
    if T == frames:
        return saliency
    if T % frames == 0:
        return saliency.unflatten(-1, (frames, T // frames)).sum(-1)
    flat = saliency.reshape(-1, 1, T)
    return (F.adaptive_avg_pool1d(flat, frames) * (T / frames)).reshape(*saliency.shape[:-1], frames)


@dataclass
class CrossAttentionSaliency:
    """One input's maps, float64. ``cross_attention``: [L, H, I, S]; ``input_saliency`` (SM_X) and
    ``encoder_saliency`` (SM_H): [I, S]; ``tokens``: the I explained tokens (the token predicted at
    each decoder step)."""

    cross_attention: Tensor
    input_saliency: Tensor
    encoder_saliency: Tensor
    tokens: list[int] = field(default_factory=list)

    def correlations(self) -> dict[str, Tensor]:
        """Pearson's r per token: ``{"input" | "encoder": {"heads": [L, H, I], "layers": [L, I], "aggregate": [I]}}``
        of cross-attention (per head; head mean per layer; mean over all layers and heads) against SM_X / SM_H."""
        L, H, I, _ = self.cross_attention.shape
        out = {}
        for name, saliency in (("input", self.input_saliency), ("encoder", self.encoder_saliency)):
            heads = torch.tensor([[[pearson_r(self.cross_attention[l, h, i], saliency[i]) for i in range(I)]
                                   for h in range(H)] for l in range(L)], dtype=torch.float64)
            layer_mean = self.cross_attention.mean(1)  # (L, I, S)
            layers = torch.tensor([[pearson_r(layer_mean[l, i], saliency[i]) for i in range(I)] for l in range(L)],
                                  dtype=torch.float64)
            overall = self.cross_attention.mean((0, 1))  # (I, S)
            aggregate = torch.tensor([pearson_r(overall[i], saliency[i]) for i in range(I)], dtype=torch.float64)
            out[name] = {"heads": heads, "layers": layers, "aggregate": aggregate}
        return out

    def explained(self) -> dict:
        """Token means of :meth:`correlations`, as floats, with ``r2 = mean r^2``: ``{"aggregate":
        {"input": {"r", "r2"}, "encoder": {...}}, "layers": [...], "heads": [[...]]}`` (NaN tokens,
        from a constant map, left out)."""
        corr = self.correlations()

        def stats(values: Tensor) -> dict:
            values = values[~values.isnan()]
            return {"r": float(values.mean()), "r2": float((values**2).mean())} if values.numel() else {"r": None, "r2": None}

        L, H = self.cross_attention.shape[:2]
        return {
            "aggregate": {k: stats(v["aggregate"]) for k, v in corr.items()},
            "layers": [{k: stats(v["layers"][l]) for k, v in corr.items()} for l in range(L)],
            "heads": [[{k: stats(v["heads"][l, h]) for k, v in corr.items()} for h in range(H)] for l in range(L)],
        }


def _encoder_inputs(model, inputs: dict) -> tuple[str, Tensor, dict]:
    """(name of the differentiable input, that tensor [1, ...] with grad, the encoder's keyword arguments)."""
    name = getattr(model, "main_input_name", "input_ids")
    if name not in inputs:
        raise ValueError(f"inputs must hold {name!r} (the encoder input of {type(model).__name__}), got keys {sorted(inputs)}")
    extra = {k: v for k, v in inputs.items() if k != name}
    x = inputs[name]
    if x.shape[0] != 1:
        raise ValueError(f"inputs[{name!r}] must have batch size 1, got shape {tuple(x.shape)}")
    if name == "input_ids":
        x = model.get_encoder().get_input_embeddings()(x).detach()  # the encoder's own embedding (and its scale)
        return "inputs_embeds", x.requires_grad_(True), extra
    if not x.is_floating_point():
        raise ValueError(f"inputs[{name!r}] must be floating point features, got {x.dtype}")
    return name, x.detach().clone().requires_grad_(True), extra


def cross_attention_saliency(model, inputs: dict, decoder_input_ids: Tensor, targets=None) -> CrossAttentionSaliency:
    """Cross-attention and gradient saliency of each decoder step's prediction (see the module docstring).

    ``model``: an HF encoder-decoder with eager attention; ``inputs``: the encoder inputs for batch 1
    (``{"input_features": [1, F, T]}`` for Whisper, ``{"input_ids": [1, S]}`` (+ ``attention_mask``)
    for text); ``decoder_input_ids``: [1, I] (or [I]), teacher-forced; ``targets``: the I tokens to
    explain (default: the argmax at each step)."""
    check_cross_attention(model)
    decoder_input_ids = torch.as_tensor(decoder_input_ids)
    if decoder_input_ids.dim() == 1:
        decoder_input_ids = decoder_input_ids[None]
    if decoder_input_ids.dim() != 2 or decoder_input_ids.shape[0] != 1 or decoder_input_ids.shape[1] == 0:
        raise ValueError(f"decoder_input_ids must be [I] or [1, I] with I >= 1, got shape {tuple(decoder_input_ids.shape)}")
    name, x, extra = _encoder_inputs(model, inputs)
    encoder_out = model.get_encoder()(**{name: x}, **extra)
    hidden = encoder_out.last_hidden_state  # (1, S, C)
    out = model(encoder_outputs=encoder_out, decoder_input_ids=decoder_input_ids, output_attentions=True,
                use_cache=False, **{k: v for k, v in extra.items() if k == "attention_mask"})
    if not out.cross_attentions or any(a is None for a in out.cross_attentions):
        raise ValueError(f"{type(model).__name__} returned no cross-attention weights; load it with "
                         "attn_implementation='eager' (or call model.set_attn_implementation('eager'))")
    I = decoder_input_ids.shape[1]
    log_probs = out.logits[0].log_softmax(-1)  # (I, V)
    if targets is None:
        targets = log_probs.argmax(-1).tolist()
    targets = [int(t) for t in targets]
    if len(targets) != I:
        raise ValueError(f"targets must hold one token per decoder step ({I}), got {len(targets)}")
    vocab = log_probs.shape[-1]
    bad = [t for t in targets if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"targets must be token ids in [0, {vocab - 1}], got {bad}")
    frames = hidden.shape[1]
    input_saliency, encoder_saliency = [], []
    for i, t in enumerate(targets):
        gx, gh = torch.autograd.grad(log_probs[i, t], (x, hidden), retain_graph=i < I - 1)
        if name == "input_features":
            per_position = gx[0].to(torch.float64).norm(dim=0)  # (T,): over the feature (mel) axis
        else:
            per_position = gx[0].to(torch.float64).norm(dim=-1)  # (S,) for embeddings [S, C]
        input_saliency.append(pool_frames(per_position, frames))
        encoder_saliency.append(gh[0].to(torch.float64).norm(dim=-1))
    cross = torch.stack([a[0].detach().to(torch.float64) for a in out.cross_attentions])  # (L, H, I, S)
    return CrossAttentionSaliency(cross, torch.stack(input_saliency), torch.stack(encoder_saliency), targets)


def greedy_decoder_ids(model, inputs: dict, steps: int) -> Tensor:
    """[1, 1 + steps]: the decoder start token, then ``steps`` greedy tokens (no cache; small models)."""
    check_cross_attention(model)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1 (decoder tokens to generate), got {steps!r}")
    start = model.config.decoder_start_token_id
    if start is None:
        start = getattr(model.generation_config, "decoder_start_token_id", None) or 0
    ids = torch.tensor([[int(start)]])
    with torch.no_grad():
        for _ in range(steps):
            logits = model(**inputs, decoder_input_ids=ids, use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids[:, :-1]  # the last token is explained at the last step, not fed


def tiny_encoder_decoder(kind: str, seed: int = 0):
    """A tiny random encoder-decoder with eager attention (no download): ``tiny-whisper`` (8 mel
    bins, 64 input frames -> 32 encoder frames), ``tiny-bart`` or ``tiny-t5`` (vocabulary 128);
    2 + 2 layers, 4 heads, width 32. Returns (model, example inputs)."""
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "tiny-whisper":
        config = tf.WhisperConfig(vocab_size=128, num_mel_bins=8, encoder_layers=2, decoder_layers=2, d_model=32,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_source_positions=32, max_target_positions=32,
                                  decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  suppress_tokens=None, begin_suppress_tokens=None)
        model = tf.WhisperForConditionalGeneration(config)
        inputs = {"input_features": torch.randn(1, 8, 64)}
    elif kind == "tiny-bart":
        config = tf.BartConfig(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                               max_position_embeddings=64, decoder_start_token_id=2, pad_token_id=1, bos_token_id=0,
                               eos_token_id=2, forced_eos_token_id=None)
        model = tf.BartForConditionalGeneration(config)
        inputs = {"input_ids": torch.randint(3, 128, (1, 16))}
    elif kind == "tiny-t5":
        config = tf.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                             decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        model = tf.T5ForConditionalGeneration(config)
        inputs = {"input_ids": torch.randint(2, 128, (1, 16))}
    else:
        raise ValueError(f"kind must be one of {', '.join(TINY_MODELS)}, got {kind!r}")
    model.set_attn_implementation("eager")
    return model.eval(), inputs


# -- attnkit analyze crossattn -----------------------------------------------------------------------


def add_parser(sub) -> None:
    """Register ``attnkit analyze crossattn`` on an argparse subparsers object ``sub``."""
    p = sub.add_parser(
        "crossattn",
        help="cross-attention vs input saliency in encoder-decoder models (Cross-Attention is Half Explanation)",
        description="For each greedy decoder step of an encoder-decoder model, correlate the cross-attention scores "
        "over the encoder frames (per head, per layer, all layers and heads) with gradient saliency of the "
        "predicted token's log-probability w.r.t. the encoder input (SM_X) and the encoder output (SM_H): "
        "Pearson's r per token, averaged (arXiv 2509.18010's measure), and r^2.",
    )
    p.add_argument("--model", default="tiny-whisper",
                   help=f"a local HF encoder-decoder folder, or one of {', '.join(TINY_MODELS)} (random weights, "
                   "built offline) (default: tiny-whisper)")
    p.add_argument("--examples", type=int, default=8, help="random inputs to average over, an integer >= 1 (default: 8)")
    p.add_argument("--steps", type=int, default=6, help="greedy decoder steps explained per input, >= 1 (default: 6)")
    p.add_argument("--input-length", type=int, default=16,
                   help="encoder tokens of a text model's random input (default: 16; Whisper takes its fixed frames)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs and tiny weights (default: 0)")
    p.add_argument("--out", default=None, help="a folder (as the other analyses: analyze-crossattn.json and .png in it) or "
                   "a .json file (a PNG beside it) (default: none, the table only)")
    p.add_argument("--plot", default=None, help="PNG path, or 'none' (default: the JSON path with .png)")
    p.set_defaults(func=run)


def _load_encoder_decoder(spec: str, seed: int):
    """(model with eager attention, a function seed -> random encoder inputs, description)."""
    from pathlib import Path

    if spec in TINY_MODELS:
        model, example = tiny_encoder_decoder(spec, seed)
        name = next(iter(example))
        shape = tuple(example[name].shape)
        return model, _random_inputs(model, name, shape), f"{spec} (random weights)"
    folder = Path(spec)
    if not (folder / "config.json").is_file():
        raise ValueError(f"--model {spec!r} is neither one of {', '.join(TINY_MODELS)} nor a Hugging Face model folder "
                         "(no config.json in it)")
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    quiet = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model = None
        for auto in ("AutoModelForSpeechSeq2Seq", "AutoModelForSeq2SeqLM", "AutoModelForCausalLM"):
            try:
                model = getattr(transformers, auto).from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
                break
            except (ValueError, KeyError, OSError):
                continue
    finally:
        transformers.logging.set_verbosity(quiet)
    if model is None:
        raise ValueError(f"--model {spec!r} ({type(config).__name__}) loads as no sequence-to-sequence or causal LM class")
    check_cross_attention(model.eval())
    name = model.main_input_name
    if name == "input_features":
        frames = 2 * getattr(config, "max_source_positions", 1500)
        shape = (1, getattr(config, "num_mel_bins", 80), frames)
    else:
        shape = (1, 16)
    return model, _random_inputs(model, name, shape), str(folder)


def _random_inputs(model, name: str, shape: tuple):
    vocab = model.config.vocab_size

    def make(seed: int, input_length: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        if name == "input_features":
            return {name: torch.randn(*shape, generator=g)}
        return {name: torch.randint(3, vocab, (1, input_length), generator=g)}

    return make


def run(args) -> int:
    """``attnkit analyze crossattn``: table, and JSON + PNG when ``--out`` is given; returns 0."""
    import time
    from datetime import datetime, timezone

    from rich.table import Table

    from ..._console import check_writable, console, invoked_command, write_outputs
    from ..._meta import run_metadata

    for name, minimum in (("examples", 1), ("steps", 1), ("input_length", 2)):
        value = getattr(args, name)
        if value < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {value}")
    if args.out and not str(args.out).endswith(".json"):  # a folder, as attnkit analyze's other subcommands take
        from pathlib import Path as _Path

        if _Path(args.out).is_file():
            raise ValueError(f"--out {args.out!r} is a file but not .json; accepted: a folder or a .json path")
        args.out = str(_Path(args.out) / "analyze-crossattn.json")
    if args.out:
        check_writable(args.out, "--out")
    model, make_inputs, description = _load_encoder_decoder(args.model, args.seed)
    start = time.perf_counter()
    results = []
    for e in range(args.examples):
        inputs = make_inputs(args.seed * 1000 + e, args.input_length)
        decoder_ids = greedy_decoder_ids(model, inputs, args.steps)
        results.append(cross_attention_saliency(model, inputs, decoder_ids))
    wall = time.perf_counter() - start
    corr = [r.correlations() for r in results]

    def gather(kind: str, level: str) -> Tensor:  # tokens of all examples on the last axis
        return torch.cat([c[kind][level] for c in corr], dim=-1)

    def stats(values: Tensor) -> dict:
        values = values[~values.isnan()]
        if values.numel() == 0:
            return {"r": None, "r_std": None, "r2": None, "n": 0}
        return {"r": float(values.mean()), "r_std": float(values.std()) if values.numel() > 1 else None,
                "r2": float((values**2).mean()), "n": values.numel()}

    L, H = results[0].cross_attention.shape[:2]
    summary = {kind: {"aggregate": stats(gather(kind, "aggregate")),
                      "layers": [stats(gather(kind, "layers")[l]) for l in range(L)],
                      "heads": [[stats(gather(kind, "heads")[l, h]) for h in range(H)] for l in range(L)]}
               for kind in ("input", "encoder")}
    first = results[0]
    result = {
        "schema": 1,
        "command": getattr(args, "command", None) or invoked_command("analyze"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": description,
        "model_class": type(model).__name__,
        "settings": {"examples": args.examples, "steps": args.steps, "input_length": args.input_length, "seed": args.seed,
                     "saliency": "L2 norm of d log p(predicted token) / d input, summed over the positions of each "
                     "encoder frame (input) or per encoder output frame (encoder)",
                     "measure": "Pearson r per decoder step over encoder frames, averaged (arXiv 2509.18010); "
                     "r2 = mean of r^2"},
        "meta": run_metadata("cpu"),
        "shape": {"decoder_layers": L, "heads": H, "encoder_frames": int(first.cross_attention.shape[-1])},
        "summary": summary,
        "example": {"tokens": first.tokens, "cross_attention_mean": first.cross_attention.mean((0, 1)).tolist(),
                    "input_saliency": first.input_saliency.tolist(), "encoder_saliency": first.encoder_saliency.tolist()},
        "wall_s": wall,
    }
    fmt = lambda s: "-" if s["r"] is None else f"{s['r']:+.3f} ± {s['r_std'] or 0:.3f}  (r² {s['r2']:.3f})"  # noqa: E731
    table = Table(title=f"cross-attention vs saliency · {description} · {args.examples} inputs x {args.steps} steps · "
                        "Pearson r per token, mean ± std")
    for column in ("cross-attention", "vs input saliency (SM_X)", "vs encoder-output saliency (SM_H)"):
        table.add_column(column, justify="left" if column == "cross-attention" else "right")
    table.add_row("all layers and heads", fmt(summary["input"]["aggregate"]), fmt(summary["encoder"]["aggregate"]))
    for l in range(L):
        table.add_row(f"layer {l} (head mean)", fmt(summary["input"]["layers"][l]), fmt(summary["encoder"]["layers"][l]))
    for l in range(L):
        for h in range(H):
            table.add_row(f"layer {l} head {h}", fmt(summary["input"]["heads"][l][h]), fmt(summary["encoder"]["heads"][l][h]))
    out = console()
    out.print(table)
    out.print(f"{wall:.1f} s")
    if args.out:
        write_outputs(result, args.out, args.plot, _plot, out)
    return 0


def _plot(result: dict, path) -> None:
    """Per-head r (two heatmaps: SM_X, SM_H), per-layer and aggregate r, and one example's maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.5), gridspec_kw={"width_ratios": [1, 1, 1.1, 1.6]})
    for ax, kind, label in ((axes[0], "input", "SM_X (input)"), (axes[1], "encoder", "SM_H (encoder output)")):
        grid = torch.tensor([[h["r"] if h["r"] is not None else float("nan") for h in layer] for layer in s[kind]["heads"]])
        image = ax.imshow(grid.numpy(), cmap="RdBu_r", vmin=-1, vmax=1)
        for l in range(grid.shape[0]):
            for h in range(grid.shape[1]):
                ax.text(h, l, f"{float(grid[l, h]):.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(grid.shape[1]))
        ax.set_yticks(range(grid.shape[0]))
        ax.set_xlabel("head")
        ax.set_ylabel("decoder layer")
        ax.set_title(f"per-head r vs {label}", fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.7)
    names = ["all"] + [f"L{l}" for l in range(len(s["input"]["layers"]))]
    for offset, kind in ((-0.2, "input"), (0.2, "encoder")):
        values = [s[kind]["aggregate"]["r"]] + [layer["r"] for layer in s[kind]["layers"]]
        axes[2].bar([i + offset for i in range(len(names))], [v if v is not None else 0 for v in values], width=0.4,
                    label="SM_X" if kind == "input" else "SM_H")
    axes[2].set_xticks(range(len(names)), names)
    axes[2].set_ylim(-1, 1)
    axes[2].axhline(0, color="grey", lw=0.8)
    axes[2].legend(fontsize=8)
    axes[2].set_title("mean r: all layers and heads, per layer", fontsize=9)
    ex = result["example"]
    def norm(values):  # min-max, so that the shapes compare
        v = torch.tensor(values)
        return ((v - v.min()) / (v.max() - v.min()).clamp_min(1e-30)).numpy()

    axes[3].plot(norm(ex["cross_attention_mean"][-1]), label="cross-attention (mean of layers, heads)")
    axes[3].plot(norm(ex["input_saliency"][-1]), label="SM_X")
    axes[3].plot(norm(ex["encoder_saliency"][-1]), label="SM_H")
    axes[3].set_xlabel("encoder frame")
    axes[3].set_title("first input, last step (each map min-max scaled)", fontsize=9)
    axes[3].legend(fontsize=8)
    fig.suptitle(f"cross-attention vs saliency · {result['model']} · {result['settings']['examples']} inputs x "
                 f"{result['settings']['steps']} steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
