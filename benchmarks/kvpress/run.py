"""NVIDIA kvpress on `attnkit eval`'s passkey grid: accuracy, kept tokens and the cache's real bytes.

Runs inside the environment that ``benchmarks/kvpress/setup.sh`` builds (kvpress 0.5.5 pins
transformers < 5.3; attnkit's hf extra needs >= 5.17, so the two never share one environment)::

    bash benchmarks/kvpress/setup.sh
    .attnkit-cache/kvpress-env/bin/python benchmarks/kvpress/run.py --out benchmarks/results/cpu/kvpress-passkey.json

For each press and kept-token budget the model is measured on the prompts `attnkit eval` uses
(the same generator, held-out stdlib text, seed scheme and greedy exact match, so a row here and a
row of ``attnkit eval --method ...`` saw the same prompts):

- **accuracy**: per (length, depth) cell, ``--samples`` passkey prompts; greedy decoding of the
  key's tokens + 1; right when the generated text, leading whitespace removed, starts with the key;
- **kv_bytes**: the bytes of the cache's key and value tensors after the prefill of one prompt of
  each length (eval's timing prompt: depth 0.5), summed over layers (``numel * element_size``),
  measured, not computed from the settings;
- **kept_tokens**: the cache's tokens per KV head after that prefill (what memory holds), and
  **attended_tokens**: the tokens a KV head can still attend in decode, mean over layers and KV
  heads (they differ where kvpress emulates per-head budgets by masking keys: DuoAttentionPress,
  AdaKVPress).

Presses (``--presses``): ``full`` (no press), ``streaming`` (StreamingLLMPress, ``n_sink`` =
``--streaming-sink``), ``snapkv`` (SnapKVPress, observation window ``--snapkv-window``), ``adakv``
(AdaKVPress over SnapKVPress: head-wise budgets by masking), each at every ``--budgets`` (kept
tokens per KV head: ``compression_ratio`` is chosen per prompt length so that kvpress keeps
exactly that many), and ``duo`` (DuoAttentionPress with the gates of an attnkit DuoAttention
pattern file, ``--duo-pattern``; the ``--duo-sparsities`` fraction of KV heads with the smallest
gates stream with ``--duo-sink`` + ``--duo-window`` tokens, chosen by attnkit's rule). kvpress's
own DuoAttentionPress downloads the official patterns of six public models from GitHub, which no
machine of this project can reach, and its ``on_the_fly_scoring`` downloads a data set: the
pattern comes from a file instead, in the format ``attnkit identify-duo`` writes.

Protocols (``--protocol``): ``prompt`` (default; `attnkit eval`'s: the whole prompt, question
included, is prefilled under the press, then greedy decoding) and ``context-question`` (kvpress's
own pipeline: the haystack with its needle is prefilled and compressed without the question,
which is then fed against the compressed cache; the budget then counts the question's tokens
too, so a head holds the same number of tokens when the first answer token is computed). kvpress
compresses a layer's cache after that layer's attention has run over the whole prefill, so in
``prompt`` the first answer token is always computed with full attention; only the tokens after
it read the compressed cache.

One prefill serves every press (:class:`SharedPrefill`): since kvpress compresses a layer's cache
after the layer's attention ran on all the keys, the prefill is the same under every press, so
it runs once per batch and each press's own ``forward_hook`` is replayed on a copy of its cache;
per press and length the replay is checked against ``with press(model)`` on the timing prompt
(``replay_matches_press``), and the bytes are measured on kvpress's own path. A press kvpress
itself refuses (its fake-key search raises when the queries of a group span no half-space) is
recorded under ``failures``.

Writes a JSON (``--out``; ``rows``: method, options, kept tokens, length, depth, accuracy,
kv_bytes; ``summary``: one per press setting and length; with the versions (``pip freeze``), the
model and the command) and a PNG beside it: accuracy against the measured KV bytes, and against
the tokens a head attends.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
try:
    import attnkit  # noqa: F401 - setup.sh's environment names this checkout's src/ (a .pth file)
except ImportError:  # run with another Python: this checkout's source
    sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from attnkit.tasks.longcontext import passkey_example  # noqa: E402
from attnkit.tasks.passkey import QUESTION  # noqa: E402

SCHEMA = "attnkit.kvpress/1"
PRESSES = ("full", "streaming", "snapkv", "adakv", "duo")
PRESS_CLASSES = {"full": None, "streaming": "StreamingLLMPress", "snapkv": "SnapKVPress", "adakv": "AdaKVPress",
                 "duo": "DuoAttentionPress"}
DEFAULT_PRESSES = ("full", "streaming", "snapkv", "adakv", "duo")
# sink 4 + window 256 / 512 / 1024: the kept tokens of attnkit's streaming rows
DEFAULT_BUDGETS = (260, 516, 1028)
DEFAULT_LENGTHS = (2048, 4096)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_SAMPLES = 4  # attnkit eval's default prompts per cell
DEFAULT_DUO_SPARSITIES = (0.25, 0.5, 0.75)
PROTOCOLS = ("prompt", "context-question")
DTYPES = ("float32", "bfloat16", "float16")
DIGITS = 5
PATTERN_FILE = "full_attention_heads.tsv"  # attnkit identify-duo's and the official DuoAttention file name


# -- arguments ----------------------------------------------------------------------------------------


def _ints(text: str, option: str, minimum: int) -> list[int]:
    accepted = f"accepted: comma-separated integers >= {minimum}"
    out = []
    for item in str(text).split(","):
        try:
            number = int(item.strip())
        except ValueError:
            raise ValueError(f"{option}: {item.strip()!r} is not an integer; {accepted}") from None
        if number < minimum:
            raise ValueError(f"{option}: {number} is below {minimum}; {accepted}")
        out.append(number)
    if len(set(out)) != len(out):
        raise ValueError(f"{option} repeats a value ({text!r}); accepted: distinct values")
    return out


def _fractions(text: str, option: str, low: float, high: float, what: str) -> list[float]:
    accepted = f"accepted: comma-separated numbers in [{low:g}, {high:g}] ({what})"
    out = []
    for item in str(text).split(","):
        try:
            number = float(item.strip())
        except ValueError:
            raise ValueError(f"{option}: {item.strip()!r} is not a number; {accepted}") from None
        if not low <= number <= high:
            raise ValueError(f"{option}: {number:g} is outside [{low:g}, {high:g}]; {accepted}")
        out.append(number)
    if len(set(out)) != len(out):
        raise ValueError(f"{option} repeats a value ({text!r}); accepted: distinct values")
    return out


def _names(text: str, option: str, accepted: tuple[str, ...]) -> list[str]:
    out = []
    for item in str(text).split(","):
        name = item.strip()
        if name not in accepted:
            raise ValueError(f"{option}: {name!r} is unknown; accepted: comma-separated names of {', '.join(accepted)}")
        if name in out:
            raise ValueError(f"{option} names {name!r} twice; accepted: each once")
        out.append(name)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/kvpress/run.py",
        description="kvpress's presses (StreamingLLM, SnapKV, AdaKV, DuoAttention) on attnkit eval's passkey grid: "
        "accuracy, kept tokens and the KV cache's measured bytes; JSON and PNG. Run inside the environment of "
        "benchmarks/kvpress/setup.sh.")
    p.add_argument("--model", default=None,
                   help="a local Hugging Face causal-LM folder with its tokenizer (default: attnkit's shipped subject, "
                   "src/attnkit/hf/subject_model)")
    p.add_argument("--presses", default=",".join(DEFAULT_PRESSES),
                   help=f"comma-separated, of {', '.join(PRESSES)} (default: %(default)s)")
    p.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)),
                   help="kept tokens per KV head for streaming, snapkv and adakv (default: %(default)s: sink 4 + "
                   "window 256, 512, 1024)")
    p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)),
                   help="prompt lengths in tokens (default: %(default)s)")
    p.add_argument("--depths", default=",".join(f"{d:g}" for d in DEFAULT_DEPTHS),
                   help="needle depths in [0, 1] (default: %(default)s)")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                   help="prompts per (length, depth) cell, >= 1 (default: %(default)s, attnkit eval's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts, >= 0 (default: %(default)s, attnkit eval's)")
    p.add_argument("--protocol", default="prompt",
                   help="comma-separated, of prompt (attnkit eval's: the whole prompt prefilled under the press) and "
                   "context-question (kvpress's pipeline: the question fed after compression) (default: %(default)s)")
    p.add_argument("--streaming-sink", type=int, default=4, help="StreamingLLMPress n_sink, >= 0 (default: %(default)s)")
    p.add_argument("--snapkv-window", type=int, default=64,
                   help="SnapKVPress window_size (observation window, always kept), >= 1 (default: %(default)s)")
    p.add_argument("--snapkv-kernel", type=int, default=5, help="SnapKVPress kernel_size, odd >= 1 (default: %(default)s)")
    p.add_argument("--duo-pattern", default=None,
                   help="an attnkit DuoAttention pattern file (attnkit identify-duo --out; an official "
                   "full_attention_heads.tsv, or a folder holding one): one row per layer, one gate per KV head. "
                   "Without it the duo rows are skipped (kvpress would download the official pattern)")
    p.add_argument("--duo-sparsities", default=",".join(map(str, DEFAULT_DUO_SPARSITIES)),
                   help="fractions of KV heads that stream, in [0, 1] (default: %(default)s)")
    p.add_argument("--duo-sink", type=int, default=64, help="sink tokens of a streaming head, >= 0 (default: %(default)s)")
    p.add_argument("--duo-window", type=int, default=256,
                   help="recent tokens of a streaming head, >= 1 (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward, >= 1 (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="the model's dtype (default: %(default)s, "
                   "attnkit eval's on CPU)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads, >= 1 (default: %(default)s, attnkit eval's on CPU)")
    p.add_argument("--corpus", default=None,
                   help="a text file or folder whose held-out files are the haystack (default: the standard library)")
    p.add_argument("--out", default="kvpress-passkey.json",
                   help="the JSON to write; the PNG goes beside it with .png (default: %(default)s)")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked: ``ValueError`` naming the option, the value and what is accepted.
    Lists become Python lists (``presses``, ``budgets``, ``lengths``, ``depths``, ``protocol``,
    ``duo_sparsities``)."""
    args = build_parser().parse_args(argv)
    args.presses = _names(args.presses, "--presses", PRESSES)
    args.budgets = _ints(args.budgets, "--budgets", 1)
    args.lengths = _ints(args.lengths, "--lengths", 1)
    args.depths = _fractions(args.depths, "--depths", 0.0, 1.0, "0: the needle first, 1: last")
    args.protocol = _names(args.protocol, "--protocol", PROTOCOLS)
    args.duo_sparsities = _fractions(args.duo_sparsities, "--duo-sparsities", 0.0, 1.0,
                                     "the fraction of KV heads that stream")
    for option, value, minimum in (("--samples", args.samples, 1), ("--seed", args.seed, 0),
                                   ("--streaming-sink", args.streaming_sink, 0), ("--snapkv-window", args.snapkv_window, 1),
                                   ("--snapkv-kernel", args.snapkv_kernel, 1), ("--duo-sink", args.duo_sink, 0),
                                   ("--duo-window", args.duo_window, 1), ("--batch-size", args.batch_size, 1),
                                   ("--threads", args.threads, 1)):
        if value < minimum:
            raise ValueError(f"{option} must be an integer >= {minimum}, got {value}")
    if args.snapkv_kernel % 2 == 0:
        raise ValueError(f"--snapkv-kernel must be odd (SnapKVPress pads by kernel_size // 2 on both sides), "
                         f"got {args.snapkv_kernel}")
    small = [b for b in args.budgets if b <= args.streaming_sink and "streaming" in args.presses]
    if small:
        raise ValueError(f"--budgets {small} do not exceed --streaming-sink {args.streaming_sink}; accepted: budgets "
                         "> the sink (StreamingLLMPress keeps the sink plus a recent window)")
    small = [b for b in args.budgets if b <= args.snapkv_window and ({"snapkv", "adakv"} & set(args.presses))]
    if small:
        raise ValueError(f"--budgets {small} do not exceed --snapkv-window {args.snapkv_window}; accepted: budgets "
                         "> the observation window (SnapKVPress always keeps it)")
    if args.duo_pattern is not None and not Path(args.duo_pattern).exists():
        raise ValueError(f"--duo-pattern {args.duo_pattern!r} does not exist; accepted: a pattern file written by "
                         f"attnkit identify-duo, an official {PATTERN_FILE}, or a folder holding one")
    if args.corpus is not None and not Path(args.corpus).exists():
        raise ValueError(f"--corpus {args.corpus!r} does not exist; accepted: a text file or a folder of text files")
    return args


# -- prompts: attnkit eval's ----------------------------------------------------------------------------


def cell_rng(seed: int, *parts) -> random.Random:
    """`attnkit eval`'s generator of a cell's prompts: seeded by the string ``"seed-part-part"``
    (``(seed, "passkey", length, depth)`` for a cell, ``(seed, "timing", length)`` for the prompt
    whose KV bytes are measured), so every method and run sees the same prompts."""
    return random.Random("-".join(map(str, (seed, *parts))))


def _eval_haystack():
    """attnkit eval's prompt builder (``attnkit.hf.eval.Haystack``) where this attnkit has it."""
    try:
        from attnkit.hf.eval import Haystack
    except ImportError:
        return None
    return Haystack


def is_byte_tokenizer(tokenizer) -> bool:
    """Token id = UTF-8 byte value (attnkit's subject): the prompts of
    :func:`attnkit.tasks.longcontext.passkey_example` are then token sequences as they are."""
    try:
        probe = "Az 09\n\u00e9"
        return list(tokenizer(probe, add_special_tokens=False)["input_ids"]) == list(probe.encode())
    except Exception:  # noqa: BLE001 - any tokenizer that cannot say is not one
        return False


class Prompts:
    """The passkey prompts of `attnkit eval` for one tokenizer and held-out text.

    With ``attnkit.hf.eval`` present its ``Haystack`` builds them (token space, any tokenizer);
    without it (an attnkit from before eval landed) a byte-level tokenizer gets
    :func:`attnkit.tasks.longcontext.passkey_example` with the same generators, which builds the
    same bytes (tests/bench/test_kvpress_script.py checks the two agree)."""

    def __init__(self, tokenizer, held_out: bytes, *, use_eval: bool = True):
        self.tokenizer = tokenizer
        Haystack = _eval_haystack() if use_eval else None
        if Haystack is not None:
            self.haystack = Haystack(tokenizer, held_out)
            self.source = "attnkit.hf.eval.Haystack.passkey"
        elif is_byte_tokenizer(tokenizer):
            self.haystack = None
            # eval decodes the held-out bytes (invalid UTF-8 replaced) and tokenizes the text: the same bytes again
            self.text = held_out.decode("utf-8", errors="replace").encode("utf-8")
            self.source = "attnkit.tasks.longcontext.passkey_example"
        else:
            raise ValueError("--model: its tokenizer is not byte-level and this attnkit has no attnkit.hf.eval to build "
                             "token-space prompts; accepted: a byte-level model (attnkit's subject) or an attnkit with "
                             "attnkit eval")

    def passkey(self, rng: random.Random, length: int, depth: float) -> tuple[list[int], str]:
        """(prompt tokens, key): exactly ``length`` tokens, the question last."""
        if self.haystack is not None:
            return self.haystack.passkey(rng, length, depth)
        example = passkey_example(rng, self.text, length, depth)
        return list(example.prompt), example.answer.decode()

    def cell(self, seed: int, length: int, depth: float, samples: int) -> list[tuple[list[int], str]]:
        """A (length, depth) cell's ``samples`` prompts, as `attnkit eval` draws them."""
        rng = cell_rng(seed, "passkey", length, float(depth))
        return [self.passkey(rng, length, float(depth)) for _ in range(samples)]

    def timing(self, seed: int, length: int) -> list[int]:
        """The prompt whose cache bytes are measured (eval's timing prompt: depth 0.5)."""
        return self.passkey(cell_rng(seed, "timing", length), length, 0.5)[0]

    def question_tokens(self) -> int:
        """Tokens of the question that ends every prompt (what ``context-question`` feeds after the
        compression)."""
        if self.haystack is not None:
            return len(self.haystack.encode(QUESTION.decode()))
        return len(QUESTION)

    def encode_length(self, text: str) -> int:
        if self.haystack is not None:
            return len(self.haystack.encode(text))
        return len(text.encode())


def answer_correct(continuation: str, key: str) -> bool:
    """`attnkit eval`'s greedy exact match: the generated text, leading whitespace removed, starts with the key."""
    return continuation.lstrip().startswith(key)


# -- budgets ------------------------------------------------------------------------------------------------


def compression_ratio(k_len: int, kept: int) -> float:
    """The ``compression_ratio`` at which kvpress keeps exactly ``kept`` of ``k_len`` tokens
    (``kvpress.utils.compute_n_kept``: ``max(1, int(k_len * (1 - ratio)))``; StreamingLLMPress
    prunes ``k_len - int(k_len * (1 - ratio))``): ``1 - kept / k_len``, nudged down where the float
    product rounds below ``kept``."""
    if not 0 < kept < k_len:
        raise ValueError(f"kept tokens must be in [1, {k_len - 1}] for a prefill of {k_len} tokens, got {kept}")
    ratio = 1.0 - kept / k_len
    while int(k_len * (1 - ratio)) < kept:
        ratio = math.nextafter(ratio, 0.0)
    assert int(k_len * (1 - ratio)) == kept
    return ratio


# -- DuoAttention patterns ------------------------------------------------------------------------------------


def load_duo_gates(path, num_layers: int, num_kv_heads: int):
    """Gates ``[num_layers, num_kv_heads]`` (float64 tensor, clipped to [0, 1] as DuoAttention's
    loader does) from an attnkit pattern file (``attnkit identify-duo``: ``#`` lines of metadata,
    then one row of whitespace-separated gates per layer), an official ``full_attention_heads.tsv``,
    or a folder holding one. ``ValueError`` for a malformed file or one of another model's shape."""
    path = Path(path)
    if path.is_dir():
        path = path / PATTERN_FILE
    if not path.is_file():
        raise ValueError(f"--duo-pattern {str(path)!r} is not a file; accepted: a pattern file (attnkit identify-duo) or "
                         f"a folder holding {PATTERN_FILE}")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            rows.append([float(x) for x in text.split()])
        except ValueError:
            raise ValueError(f"--duo-pattern {str(path)!r}: line {number} is not numbers: {text[:60]!r}") from None
    if not rows or len({len(r) for r in rows}) != 1:
        raise ValueError(f"--duo-pattern {str(path)!r}: expected one row per layer of the same number of gates, got "
                         f"rows of {sorted({len(r) for r in rows})} gates")
    gates = torch.tensor(rows, dtype=torch.float64)
    if not bool(torch.isfinite(gates).all()):
        raise ValueError(f"--duo-pattern {str(path)!r} holds non-finite gates")
    if tuple(gates.shape) != (num_layers, num_kv_heads):
        raise ValueError(f"--duo-pattern {str(path)!r} has [num_layers, num_kv_heads] = {list(gates.shape)} but the "
                         f"model has [{num_layers}, {num_kv_heads}]: it belongs to another model; accepted: a pattern "
                         "identified on this model (attnkit identify-duo --model PATH)")
    return gates.clamp(0, 1)


def streaming_heads(gates, sparsity: float):
    """Boolean ``[num_layers, num_kv_heads]``, True for a streaming head: attnkit's rule
    (``DuoPattern.full_heads``): the ``floor(sparsity * N + 0.5)`` heads of smallest gate, ties in
    (layer, head) order. kvpress's own rule (``round``, an unstable argsort) can pick other heads
    among ties and rounds halves to even; this one makes a duo row here and attnkit's stream the
    same heads."""
    flat = gates.reshape(-1)
    count = min(flat.numel(), int(math.floor(sparsity * flat.numel() + 0.5)))
    order = torch.sort(flat, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:count]] = True
    return mask.reshape(gates.shape)


# -- presses ------------------------------------------------------------------------------------------------------


@dataclass
class Config:
    """One row of the comparison: a press at one setting. ``budget``: kept tokens per KV head for
    the scorer presses; ``sparsity``: duo's fraction of streaming heads."""

    press: str
    budget: int | None = None
    sparsity: float | None = None
    options: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.press == "full":
            return "full"
        if self.press == "duo":
            return f"duo s={self.sparsity:g} ({self.options['sink']}+{self.options['window']})"
        return f"{self.press} {self.budget}"

    def attnkit_equivalent(self) -> str | None:
        """The `attnkit eval --method` of the same kept tokens (for the side-by-side chart)."""
        if self.press == "full":
            return "full"
        if self.press == "streaming":
            sink = self.options["n_sink"]
            return f"streaming:sink={sink},window={self.budget - sink}"
        if self.press == "duo":
            return (f"duo:pattern=PATTERN,sparsity={self.sparsity:g},sink={self.options['sink']},"
                    f"window={self.options['window']}")
        return None


def configs(args) -> list[Config]:
    out = []
    for name in args.presses:
        if name == "full":
            out.append(Config("full"))
        elif name == "streaming":
            out += [Config("streaming", b, options={"n_sink": args.streaming_sink}) for b in args.budgets]
        elif name in ("snapkv", "adakv"):
            opts = {"window_size": args.snapkv_window, "kernel_size": args.snapkv_kernel}
            if name == "adakv":
                opts["alpha_safeguard"] = 0.20
            out += [Config(name, b, options=dict(opts)) for b in args.budgets]
        elif name == "duo":
            out += [Config("duo", sparsity=s, options={"sink": args.duo_sink, "window": args.duo_window})
                    for s in args.duo_sparsities]
    return out


def make_press(config: Config, k_len: int, question: int, streaming_mask=None):
    """The kvpress press of ``config`` for a prefill of ``k_len`` tokens (``question``: tokens fed
    after the compression, counted in the budget). ``None`` for full attention. Also returns the
    options as run (the compression ratio chosen, the window as set)."""
    import kvpress

    if config.press == "full":
        return None, {}
    if config.press == "duo":
        window = config.options["window"] - question
        if window < 1:
            raise ValueError(f"--duo-window {config.options['window']} leaves no recent tokens after the question's "
                             f"{question}; accepted: a window > {question} with --protocol context-question")
        press = _pattern_duo_press(kvpress)(head_compression_ratio=config.sparsity, sink=config.options["sink"],
                                            window=window, mask=streaming_mask)
        return press, {"head_compression_ratio": config.sparsity, "sink_size": config.options["sink"],
                       "recent_size": window}
    kept = config.budget - question
    ratio = compression_ratio(k_len, kept)
    if config.press == "streaming":
        press = kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=config.options["n_sink"])
    else:
        press = kvpress.SnapKVPress(compression_ratio=ratio, window_size=config.options["window_size"],
                                    kernel_size=config.options["kernel_size"])
        if config.press == "adakv":
            press = kvpress.AdaKVPress(press=press, alpha_safeguard=config.options["alpha_safeguard"])
    return press, {"compression_ratio": ratio, "kept_at_prefill": kept}


_DUO_CLASS = None


def _pattern_duo_press(kvpress):
    """DuoAttentionPress with its head pattern given (a streaming mask, a sink and a window) in
    place of ``load_attention_pattern``'s download; the compression itself is kvpress's."""
    global _DUO_CLASS
    if _DUO_CLASS is not None:
        return _DUO_CLASS

    @dataclass
    class PatternDuoAttentionPress(kvpress.DuoAttentionPress):
        sink: int = 64
        window: int = 256
        mask: object = None

        def post_init_from_model(self, model):
            self.sink_size, self.recent_size = self.sink, self.window
            self.streaming_mask = torch.as_tensor(self.mask, dtype=torch.bool, device=model.device)

    _DUO_CLASS = PatternDuoAttentionPress
    return _DUO_CLASS


# -- measuring ------------------------------------------------------------------------------------------------------


def cache_bytes(cache) -> int:
    """Bytes of the key and value tensors that a transformers cache's layers hold (as stored)."""
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _attn_modules(model):
    inner = model.model.language_model if hasattr(model.model, "language_model") else model.model
    return [layer.self_attn for layer in inner.layers]


def _masks(model) -> list:
    return [getattr(module, "masked_key_indices", None) for module in _attn_modules(model)]


def _set_masks(model, masks) -> None:
    # kvpress keeps a head-wise press's masked keys on the attention modules (module.masked_key_indices)
    for module, mask in zip(_attn_modules(model), masks):
        module.masked_key_indices = mask


def _clear_masks(model) -> None:
    _set_masks(model, [None] * len(_attn_modules(model)))


def attended_tokens(model, cache) -> float:
    """Mean over layers and KV heads (row 0 of the batch) of the keys a head can attend in decode:
    the cache's tokens less those kvpress masks with fake keys (``module.masked_key_indices``)."""
    counts = []
    for mask, layer in zip(_masks(model), cache.layers):
        heads, length = layer.keys.shape[1], layer.keys.shape[2]
        masked = torch.zeros(heads, dtype=torch.long)
        if mask is not None:
            batch, head = mask[0].cpu(), mask[1].cpu()
            masked += torch.bincount(head[batch == 0], minlength=heads)
        counts += (length - masked).tolist()
    return sum(counts) / len(counts)


def _positions(ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)


@torch.no_grad()
def _decode(model, cache, logits, steps: int, start: int) -> torch.Tensor:
    """Greedy tokens ``[B, steps]``: the first from ``logits [B, V]``, the rest decoded on ``cache``
    at positions ``start, start + 1, ...`` (given explicitly, as kvpress's pipeline does: a
    compressed cache is shorter than the text it stands for)."""
    token = logits.argmax(-1)
    tokens = [token]
    for i in range(steps - 1):
        pos = torch.full((token.shape[0], 1), start + i, device=token.device)
        out = model(input_ids=token[:, None], past_key_values=cache, position_ids=pos, use_cache=True)
        token = out.logits[:, -1].argmax(-1)
        tokens.append(token)
    return torch.stack(tokens, dim=1).cpu()


@torch.no_grad()
def press_prefill(model, press, ids: torch.Tensor, question: int):
    """kvpress as its users run it: the prefill inside ``with press(model)`` (its forward hooks
    compress each layer's cache after that layer's attention), then, with ``question`` > 0, the
    question's last tokens fed outside it (kvpress's pipeline). Returns (cache, logits of the last
    position [B, V]); the head-wise presses' masks stay on the modules."""
    from contextlib import nullcontext

    from transformers import DynamicCache

    cache = DynamicCache()
    context = ids.shape[1] - question
    pos = _positions(ids)
    with press(model) if press is not None else nullcontext():
        out = model(input_ids=ids[:, :context], past_key_values=cache, position_ids=pos[:, :context], use_cache=True,
                    logits_to_keep=1)
    if question:
        out = model(input_ids=ids[:, context:], past_key_values=cache, position_ids=pos[:, context:], use_cache=True,
                    logits_to_keep=1)
    return cache, out.logits[:, -1]


@torch.no_grad()
def generate(model, press, ids: torch.Tensor, steps: int, question: int) -> tuple[torch.Tensor, object]:
    """Greedy decoding of ``ids [B, T]`` for ``steps`` tokens after :func:`press_prefill`.
    Returns (tokens [B, steps], the cache)."""
    cache, logits = press_prefill(model, press, ids, question)
    return _decode(model, cache, logits, steps, ids.shape[1]), cache


class SharedPrefill:
    """One prefill, every press: kvpress compresses a layer's cache in a forward hook *after* the
    layer's attention has run on the uncompressed keys, so the prefill's hidden states, logits and
    uncompressed cache are the same under every press. This runs the prefill once (no press),
    records each attention module's hook arguments, and :meth:`replay` calls a press's own
    ``forward_hook`` with them on a copy of the cache, inside ``with press(model)`` (so its
    ``post_init_from_model`` and set-up run as usual): the cache and masks kvpress would have made,
    for the price of its compression alone. ``run`` checks this against :func:`press_prefill` on
    every (press, length) and records the result (``replay_matches_press``)."""

    @torch.no_grad()
    def __init__(self, model, ids: torch.Tensor, question: int):
        from transformers import DynamicCache

        self.model, self.ids, self.question = model, ids, question
        context = ids.shape[1] - question
        pos = _positions(ids)
        self.calls = []

        def record(module, args, kwargs, output):
            self.calls.append((module, dict(kwargs), output))

        hooks = [m.register_forward_hook(record, with_kwargs=True) for m in _attn_modules(model)]
        try:
            self.cache = DynamicCache()
            out = model(input_ids=ids[:, :context], past_key_values=self.cache, position_ids=pos[:, :context],
                        use_cache=True, logits_to_keep=1)
        finally:
            for h in hooks:
                h.remove()
        self.logits = out.logits[:, -1]

    def _copy(self):
        import copy

        cache = copy.copy(self.cache)
        # DynamicLayer.update concatenates into new tensors: layers may share the prefill's tensors
        cache.layers = [copy.copy(layer) for layer in self.cache.layers]
        return cache

    @torch.no_grad()
    def replay(self, press):
        """(cache, logits of the last position [B, V]) as :func:`press_prefill` gives them; the
        press's masks are set on the modules."""
        model, ids, question = self.model, self.ids, self.question
        cache = self._copy()
        _clear_masks(model)
        if press is not None:
            with press(model):
                for module, kwargs, output in self.calls:
                    press.forward_hook(module, [], {**kwargs, "past_key_values": cache}, output)
        if not question:
            return cache, self.logits
        context = ids.shape[1] - question
        out = model(input_ids=ids[:, context:], past_key_values=cache, position_ids=_positions(ids)[:, context:],
                    use_cache=True, logits_to_keep=1)
        return cache, out.logits[:, -1]


def caches_equal(a, b) -> bool:
    return len(a.layers) == len(b.layers) and all(
        torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values) for x, y in zip(a.layers, b.layers))


def masks_equal(a: list, b: list) -> bool:
    def same(x, y):
        if x is None or y is None:
            return x is None and y is None
        return all(torch.equal(u.cpu(), v.cpu()) for u, v in zip(x, y))

    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


@torch.no_grad()
def measure_prefill(model, press, ids: torch.Tensor, question: int, shared: "SharedPrefill | None" = None) -> dict:
    """The cache after :func:`press_prefill` of one prompt (batch 1): its bytes, tokens per KV head,
    the tokens a head can attend, the prefill's seconds; and whether :class:`SharedPrefill`'s
    replay of the press (``shared``: of the same ``ids`` and ``question``, made here if not given)
    gives the same cache, masks and logits."""
    _clear_masks(model)
    t0 = time.perf_counter()
    cache, logits = press_prefill(model, press, ids, question)
    if ids.device.type == "cuda":
        torch.cuda.synchronize(ids.device)
    seconds = time.perf_counter() - t0
    lengths = sorted({layer.keys.shape[2] for layer in cache.layers})
    result = {"kv_bytes": cache_bytes(cache), "kept_tokens": lengths[0] if len(lengths) == 1 else lengths,
              "attended_tokens": attended_tokens(model, cache), "prefill_s": seconds}
    masks = _masks(model)
    if shared is None:
        shared = SharedPrefill(model, ids, question)
    replayed, replay_logits = shared.replay(press)
    result["replay_matches_press"] = bool(caches_equal(cache, replayed) and masks_equal(masks, _masks(model))
                                          and torch.allclose(logits, replay_logits, rtol=1e-5, atol=1e-5))
    _clear_masks(model)
    return result


# -- the run ------------------------------------------------------------------------------------------------------


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("kvpress", "transformers", "torch", "numpy", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    try:
        freeze = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True, timeout=120)
        out["pip_freeze"] = freeze.stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        out["pip_freeze"] = None
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
        out["attnkit_commit"] = commit.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["attnkit_commit"] = None
    return out


def _model_folder(path) -> Path:
    folder = Path(path) if path is not None else REPO / "src" / "attnkit" / "hf" / "subject_model"
    if not (folder / "config.json").is_file():
        if path is None:
            raise ValueError(f"--model not given and the shipped subject is missing from {folder}; accepted: --model "
                             "PATH, a local Hugging Face causal-LM folder")
        raise ValueError(f"--model {str(path)!r} is not a Hugging Face model folder (no config.json); accepted: a "
                         "folder written by save_pretrained, with its tokenizer")
    return folder


def _load(folder: Path, dtype, device):
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # kvpress refuses eager attention for its head-wise presses and computes SnapKV's window itself under sdpa
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.to(device).eval(), tokenizer


def run(args, command: str | None = None, progress=print) -> dict:
    """Measure every press configuration of ``args`` (from :func:`parse_args`); returns the record."""
    import kvpress  # noqa: F401 - fails here, before any work, outside the kvpress environment

    from attnkit.tasks.text import load_corpus

    started = time.perf_counter()
    device = torch.device(args.device)
    folder = _model_folder(args.model)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    model, tokenizer = _load(folder, args.dtype, device)
    config = model.config
    num_layers, num_kv_heads = config.num_hidden_layers, config.num_key_value_heads
    limit = getattr(config, "max_position_embeddings", None)
    if limit and max(args.lengths) > limit:
        raise ValueError(f"--lengths {max(args.lengths)} exceeds the model's max_position_embeddings {limit}")
    _, held_out, corpus_info = load_corpus(args.corpus)
    prompts = Prompts(tokenizer, held_out)
    question = prompts.question_tokens()
    key_tokens = prompts.encode_length("9" * DIGITS)

    plan, skipped = configs(args), []
    gates = None
    if "duo" in args.presses:
        if args.duo_pattern is None:
            plan = [c for c in plan if c.press != "duo"]
            skipped.append({"press": "DuoAttentionPress", "reason": "no --duo-pattern: kvpress's DuoAttentionPress "
                            "downloads its head pattern (official patterns of six public models) from GitHub, which this "
                            "machine cannot reach; pass an attnkit identify-duo pattern of this model"})
        else:
            gates = load_duo_gates(args.duo_pattern, num_layers, num_kv_heads)
    for c in plan:
        if c.budget is not None and c.budget >= min(args.lengths):
            raise ValueError(f"--budgets {c.budget} is not below the shortest length {min(args.lengths)}; accepted: "
                             "budgets below every length (a press must drop something)")

    # an untimed warm-up: the first forward pays for one-time set-up (thread pools), not a press's prefill_s
    press_prefill(model, None, torch.tensor([prompts.timing(args.seed, min(args.lengths))], device=device), 0)
    rows, summary, failures = [], [], []
    cells = len(args.protocol) * len(args.lengths) * len(args.depths)
    done = 0
    for protocol in args.protocol:
        q = question if protocol == "context-question" else 0
        for length in args.lengths:
            # the press of each row at this length, its cache after one prompt's prefill (kvpress's own path)
            presses, prefills, ran, failed = [], [], [], [None] * len(plan)
            timing = torch.tensor([prompts.timing(args.seed, length)], device=device)
            timing_shared = SharedPrefill(model, timing, q)
            for i, c in enumerate(plan):
                press, options = make_press(c, length - q, q, streaming_heads(gates, c.sparsity) if c.press == "duo" else None)
                try:
                    prefill = measure_prefill(model, press, timing, q, timing_shared)
                except (ValueError, RuntimeError, AssertionError) as err:  # kvpress's own refusals
                    failed[i], prefill = _failure(err), {}
                    _clear_masks(model)
                if c.press == "duo" and not failed[i]:
                    prefill["kvpress_compression_ratio"] = press.compression_ratio
                    prefill["streaming_heads"] = int(streaming_heads(gates, c.sparsity).sum())
                presses.append(press)
                prefills.append(prefill)
                ran.append(options)
                progress(f"{protocol} {length} {c.label}: " + (f"FAILED in kvpress: {failed[i]}" if failed[i] else
                         f"kept {prefill['kept_tokens']}, attends {prefill['attended_tokens']:.0f}, "
                         f"{prefill['kv_bytes'] / 1e6:.2f} MB, replay "
                         f"{'matches' if prefill['replay_matches_press'] else 'DIFFERS'}")
                         + f" ({time.perf_counter() - started:.0f} s)")
            del timing_shared
            right = [[0] * len(args.depths) for _ in plan]
            for d, depth in enumerate(args.depths):
                cell = prompts.cell(args.seed, length, depth, args.samples)
                for start in range(0, len(cell), args.batch_size):
                    chunk = cell[start : start + args.batch_size]
                    ids = torch.tensor([p for p, _ in chunk], device=device)
                    shared = SharedPrefill(model, ids, q)  # one prefill for every press (see SharedPrefill)
                    for i, press in enumerate(presses):
                        if failed[i]:
                            continue
                        try:
                            cache, logits = shared.replay(press)
                            tokens = _decode(model, cache, logits, key_tokens + 1, length)
                        except (ValueError, RuntimeError, AssertionError) as err:
                            failed[i] = _failure(err)
                            progress(f"{protocol} {length} {plan[i].label}: FAILED in kvpress: {failed[i]}")
                            continue
                        for (_, key), gen in zip(chunk, tokens):
                            right[i][d] += answer_correct(tokenizer.decode(gen.tolist(), skip_special_tokens=True), key)
                    del shared
                    _clear_masks(model)
                done += 1
                progress(f"[{done}/{cells}] {protocol} {length} depth {depth:g}: " + ", ".join(
                    f"{c.label} {'failed' if failed[i] else f'{right[i][d] / len(cell):.2f}'}"
                    for i, c in enumerate(plan)) + f" ({time.perf_counter() - started:.0f} s)")
            for i, c in enumerate(plan):
                common = {"protocol": protocol, "method": PRESS_CLASSES[c.press] or "full", "label": c.label,
                          "options": {**c.options, **ran[i]}, "budget": c.budget, "sparsity": c.sparsity,
                          "attnkit_equivalent": c.attnkit_equivalent(), "length": length}
                if failed[i]:
                    common["error"] = failed[i]
                    failures.append(dict(common))
                    summary.append({**common, "mean_accuracy": None, **prefills[i]})
                    continue
                accuracy = [r / args.samples for r in right[i]]
                for depth, acc in zip(args.depths, accuracy):
                    rows.append({**common, "depth": depth, "accuracy": acc, "samples": args.samples,
                                 **{k: prefills[i][k] for k in ("kept_tokens", "attended_tokens", "kv_bytes")}})
                summary.append({**common, "mean_accuracy": sum(accuracy) / len(accuracy), **prefills[i]})
    versions = _versions()
    return {
        "schema": SCHEMA,
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": versions["attnkit_commit"],
        "versions": versions,
        "model": {"path": _shown_path(folder), "architecture": type(model).__name__, "num_layers": num_layers,
                  "num_heads": config.num_attention_heads, "num_kv_heads": num_kv_heads,
                  "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
                  "dtype": args.dtype, "config_sha256": _sha256(folder / "config.json")},
        "settings": {"presses": args.presses, "budgets": args.budgets, "lengths": args.lengths, "depths": args.depths,
                     "samples": args.samples, "seed": args.seed, "protocols": args.protocol,
                     "question_tokens": question, "device": str(device), "threads": torch.get_num_threads(),
                     "batch_size": args.batch_size, "duo_pattern": args.duo_pattern,
                     "duo_gates": gates.tolist() if gates is not None else None, "corpus": corpus_info,
                     "prompts": prompts.source,
                     "correct": "greedy: the generated text, leading whitespace removed, starts with the key",
                     "kv_bytes": "sum over layers of the cache's key and value tensors' numel * element_size after the "
                     "prefill of one prompt (depth 0.5; context-question: the question included), batch 1",
                     "kept_tokens": "the cache's tokens per KV head after that prefill",
                     "attended_tokens": "tokens a KV head can attend in decode, mean over layers and KV heads: kept "
                     "tokens less those masked by fake keys"},
        "skipped": skipped,
        "failures": failures,
        "summary": summary,
        "rows": rows,
        "wall_s": time.perf_counter() - started,
    }


def _shown_path(folder: Path) -> str:
    """A folder inside this checkout relative to it (the record reads the same on every machine)."""
    try:
        return folder.resolve().relative_to(REPO).as_posix()
    except ValueError:
        return str(folder.resolve())


def _failure(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- output ------------------------------------------------------------------------------------------------------------


def plot(record: dict, path) -> None:
    """Accuracy (mean over depths) against the measured KV bytes after the prefill (top row) and
    against the tokens a KV head can attend (bottom row), a column per length (and protocol): the
    head-wise presses move left in the bottom row only, since kvpress masks their keys and keeps
    them in memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    s = record["settings"]
    panels = [(p, n) for p in s["protocols"] for n in s["lengths"]]
    fig, axes = plt.subplots(2, len(panels), figsize=(5.6 * len(panels), 8.6), squeeze=False)
    # (colour, marker, filled): SnapKV hollow so that it shows over StreamingLLM at the same bytes
    styles = {"StreamingLLMPress": ("tab:blue", "o", True),
              "SnapKVPress": ("tab:orange", "s", False), "AdaKVPress": ("tab:green", "^", False),
              "DuoAttentionPress": ("tab:red", "D", True), "full": ("black", "*", True)}
    shown = set()
    for col, (protocol, length) in enumerate(panels):
        rows = [r for r in record["summary"] if r["protocol"] == protocol and r["length"] == length
                and r["mean_accuracy"] is not None]
        for row_index, (key, scale, label) in enumerate((
                ("kv_bytes", 1e6, "KV cache MB after the prefill, measured"),
                ("attended_tokens", 1, "tokens a KV head attends in decode (mean)"))):
            ax = axes[row_index][col]
            for method, (colour, marker, filled) in styles.items():
                mine = sorted((r for r in rows if r["method"] == method), key=lambda r: (r[key], r["label"]))
                if not mine:
                    continue
                shown.add(method)
                x = [r[key] / scale for r in mine]
                y = [r["mean_accuracy"] for r in mine]
                ax.plot(x, y, color=colour, linewidth=1.0, alpha=0.6)
                # full on top (Duo's points share its bytes); hollow markers let a point beneath show
                ax.scatter(x, y, marker=marker, s=160 if method == "full" else 70, zorder=4 if method == "full" else 3,
                           linewidths=1.5, facecolors=colour if filled else "none", edgecolors=colour)
                same_x = {}
                for r, xi, yi in zip(mine, x, y):
                    if method == "full":
                        continue
                    tag = f"s={r['sparsity']:g}" if method == "DuoAttentionPress" else str(r["budget"])
                    n = same_x.setdefault(round(xi, 6), [0])
                    # labels of points at one x (Duo's: the same bytes at every sparsity) stack upwards
                    ax.annotate(tag, (xi, yi), textcoords="offset points", fontsize=7, color=colour,
                                xytext=(6, (-13 if method in ("SnapKVPress", "AdaKVPress") else 6) + 10 * n[0]))
                    n[0] += 1
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_ylim(-0.05, 1.12)
            ax.set_xlabel(label + " (log)", fontsize=9)
            ax.set_ylabel("passkey accuracy, mean over depths", fontsize=9)
            ax.set_title(f"{length} tokens" + (f", protocol {protocol}" if len(s["protocols"]) > 1 else ""),
                         fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
    handles = [Line2D([], [], color=styles[m][0], marker=styles[m][1], linestyle="-", markersize=11 if m == "full" else 7,
                      markerfacecolor=styles[m][0] if styles[m][2] else "none") for m in styles if m in shown]
    fig.legend(handles, [m for m in styles if m in shown], loc="lower center", ncol=len(handles), fontsize=9,
               title="labels: kept tokens per KV head (budget); Duo: fraction of streaming KV heads", title_fontsize=8)
    v = record["versions"]
    fig.suptitle(f"kvpress {v.get('kvpress')} (transformers {v.get('transformers')}) on "
                 f"{Path(record['model']['path']).name}: passkey, {s['samples']} prompts per cell, "
                 f"{record['model']['dtype']}", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    partial = Path(path).with_name(f".{Path(path).name}.partial")
    fig.savefig(partial, dpi=110, format="png")
    os.replace(partial, path)
    plt.close(fig)


def print_summary(record: dict, stream=None) -> None:
    stream = stream or sys.stdout
    print(f"{'protocol':17} {'press':26} {'length':>6} {'acc':>5} {'kept':>6} {'attended':>8} {'KV MB':>8} "
          f"{'vs full':>7}", file=stream)
    full = {(r["protocol"], r["length"]): r["kv_bytes"] for r in record["summary"] if r["method"] == "full"}
    for r in record["summary"]:
        if r["mean_accuracy"] is None:
            print(f"{r['protocol']:17} {r['label']:26} {r['length']:>6} failed in kvpress: {r['error']}", file=stream)
            continue
        base = full.get((r["protocol"], r["length"]))
        ratio = f"{r['kv_bytes'] / base:.3f}" if base else "-"
        print(f"{r['protocol']:17} {r['label']:26} {r['length']:>6} {r['mean_accuracy']:>5.2f} {str(r['kept_tokens']):>6} "
              f"{r['attended_tokens']:>8.0f} {r['kv_bytes'] / 1e6:>8.2f} {ratio:>7}", file=stream)
    for s in record["skipped"]:
        print(f"skipped {s['press']}: {s['reason']}", file=stream)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except ValueError as err:
        print(f"run.py: error: {err}", file=sys.stderr)
        return 2
    try:
        import kvpress  # noqa: F401
    except ImportError:
        print("run.py: error: kvpress is not installed in this Python; run it inside the environment of "
              "benchmarks/kvpress/setup.sh (.attnkit-cache/kvpress-env/bin/python)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join([os.path.relpath(sys.executable), os.path.relpath(__file__)]
                       + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)])
    try:
        record = run(args, command, progress=lambda line: print(line, file=sys.stderr, flush=True))
    except ValueError as err:
        print(f"run.py: error: {err}", file=sys.stderr)
        return 2
    partial = out.with_name(f".{out.name}.partial")
    partial.write_text(json.dumps(record, indent=1))
    os.replace(partial, out)
    written = [str(out)]
    if not args.no_plot:
        plot(record, out.with_suffix(".png"))
        written.append(str(out.with_suffix(".png")))
    print_summary(record)
    print(f"wrote {', '.join(written)} ({record['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
