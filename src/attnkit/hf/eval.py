"""``attnkit eval``: the long-context probe of attention methods on a local Hugging Face causal LM.

For each method (``--method name:key=value,...``, one row each, side by side) the model runs
with the method applied (:func:`attnkit.hf.apply` and its head-wise KV cache) and is measured on

- **retrieval accuracy** on a depth x length grid: ``passkey`` (a 5-digit key stated once in
  held-out standard-library source text, asked at the end) and ``needle`` (several named keys,
  one asked: the multi-key retrieval the subject model was trained on). Greedy decoding; a prompt
  counts as right when the generated text, leading whitespace removed, starts with the key.
  ``length`` counts tokens of the model's tokenizer (bytes for the byte-level subject) and is the
  whole prompt; ``depth`` is the fraction of the haystack before the asked needle (0: first);
- **bits per byte** of held-out standard-library text: windows of ``bpb_length`` tokens, every
  token after the first predicted, the summed negative log-likelihood divided by the UTF-8 bytes
  those tokens cover and by ln 2;
- **KV-cache bytes** after the prefill of one prompt of each length (the bytes of the cache's key
  and value tensors, as stored: what the method really keeps);
- **prefill latency** of that prompt and **decode latency** per generated token after it (batch 1);
- **peak memory** during that prefill and decode: ``torch.cuda.max_memory_allocated`` on CUDA; on
  the CPU the process's peak resident memory (``VmHWM``, reset before each measurement where
  Linux allows it), which includes the weights and everything else the process holds.

Every method sees the same prompts (each cell's are drawn from the seed, the task, the length and
the depth), so the rows differ by the method alone. :func:`run` returns the record that
``attnkit eval`` writes as JSON beside two PNGs (the needle-in-a-haystack heatmaps, and accuracy
against KV bytes)::

    >>> from attnkit.hf import eval as hf_eval
    >>> record = hf_eval.run("path/to/model", ["full", "streaming:sink=4,window=256"], lengths=[1024])
    >>> record["methods"][1]["accuracy"]["passkey"]["1024"]        # {depth: accuracy}
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from array import array
from datetime import datetime, timezone
from pathlib import Path

import torch

from .._checks import parse_value
from .._console import write_atomic
from ..tasks.longcontext import NAMES, _multikey_needle, _multikey_question
from ..tasks.passkey import QUESTION, _needle
from .policies import METHODS, Policy, resolve

__all__ = ["run", "parse_method", "parse_methods", "add_eval_parser", "cmd_eval", "plot_heatmaps",
           "plot_accuracy_vs_kv", "print_tables", "write_record", "DEFAULT_METHODS", "DEFAULT_LENGTHS",
           "DEFAULT_DEPTHS", "DEFAULT_SAMPLES", "TASKS", "SCHEMA"]

SCHEMA = "attnkit.eval/1"
DEFAULT_METHODS = ("full", "streaming:sink=4,window=256")
DEFAULT_LENGTHS = (1024, 2048, 4096)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_SAMPLES = 4
TASKS = ("passkey", "needle")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIN_HAYSTACK = 16  # haystack tokens a prompt must keep around its needles
DIGITS = 5
JSON_NAME, HEATMAP_NAME, TRADEOFF_NAME = "eval.json", "heatmaps.png", "accuracy_vs_kv.png"


# -- methods ------------------------------------------------------------------------------------


def parse_method(text: str) -> tuple[str, dict]:
    """``"streaming:sink=4,window=256"`` -> ``("streaming", {"sink": 4, "window": 256})``.

    Raises ``ValueError`` naming ``text`` for a malformed spec; the name and options are checked
    by :func:`attnkit.hf.policies.resolve` (see :func:`parse_methods`)."""
    accepted = "accepted: NAME or NAME:key=value,key=value (e.g. streaming:sink=4,window=256)"
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"--method {text!r} is empty; {accepted}")
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"--method {text!r} names no method before ':'; {accepted}")
    options: dict = {}
    if sep:
        if not rest.strip():
            raise ValueError(f"--method {text!r} has nothing after ':'; {accepted}")
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not eq or not key or not value:
                raise ValueError(f"--method {text!r}: {item.strip()!r} is not key=value; {accepted}")
            if key in options:
                raise ValueError(f"--method {text!r}: option {key!r} is given twice; accepted: each key once")
            options[key] = parse_value(value)
    return name, options


def parse_methods(methods) -> list[tuple[str, Policy]]:
    """``[(label, policy)]`` from method specs (strings as :func:`parse_method` reads them) or
    :class:`Policy` objects; every spec is resolved here, so a bad one fails before any work."""
    if isinstance(methods, (str, Policy)):
        methods = [methods]
    methods = list(methods)
    if not methods:
        raise ValueError(f"--method: no method given; accepted: one or more of {', '.join(METHODS)} "
                         "(NAME:key=value,...)")
    out = []
    for spec in methods:
        if isinstance(spec, Policy):
            label, policy = repr(spec), spec
        else:
            name, options = parse_method(spec)
            try:
                policy = resolve(name, options)
            except (ValueError, TypeError) as err:
                raise ValueError(f"--method {spec!r}: {err}") from None
            label = spec.strip()
        if any(policy == other for _, other in out):  # by equality: a policy of one's own may not hash
            raise ValueError(f"--method {label!r} is given twice (the same method and options); accepted: "
                             "each method once")
        out.append((label, policy))
    return out


# -- argument checks ------------------------------------------------------------------------------


def _int_list(value, option: str, minimum: int = 1) -> list[int]:
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        number = item
        if isinstance(item, str):
            try:
                number = int(item.strip())
            except ValueError:
                raise ValueError(f"{option}: {item.strip()!r} is not an integer; accepted: comma-separated "
                                 f"integers >= {minimum}") from None
        if isinstance(number, bool) or not isinstance(number, int) or number < minimum:
            raise ValueError(f"{option}: {number!r} is not an integer >= {minimum}; accepted: comma-separated "
                             f"integers >= {minimum}")
        out.append(number)
    if not out:
        raise ValueError(f"{option} is empty; accepted: comma-separated integers >= {minimum}")
    if len(set(out)) != len(out):
        raise ValueError(f"{option} repeats a value ({value!r}); accepted: distinct values")
    return out


def _depth_list(value) -> list[float]:
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        number = item
        if isinstance(item, str):
            try:
                number = float(item.strip())
            except ValueError:
                raise ValueError(f"--depths: {item.strip()!r} is not a number; accepted: comma-separated numbers "
                                 "in [0, 1] (0: the needle first, 1: last)") from None
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0.0 <= number <= 1.0:
            raise ValueError(f"--depths: {number!r} is outside [0, 1]; accepted: comma-separated numbers in [0, 1] "
                             "(0: the needle first, 1: last)")
        out.append(float(number))
    if not out:
        raise ValueError("--depths is empty; accepted: comma-separated numbers in [0, 1]")
    if len(set(out)) != len(out):
        raise ValueError(f"--depths repeats a value ({value!r}); accepted: distinct values")
    return out


def _whole(value, option: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{option} must be an integer >= {minimum}, got {value!r}")
    return value


def _tasks(value) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    out = []
    for item in items:
        for task in (TASKS if item == "both" else [item]):
            if task not in TASKS:
                raise ValueError(f"--task {item!r} is unknown; accepted: {', '.join(TASKS)} or both")
            if task not in out:
                out.append(task)
    if not out:
        raise ValueError(f"--task is empty; accepted: {', '.join(TASKS)} or both")
    return out


def _dtype(name, device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r} is unknown; accepted: {', '.join(DTYPES)}")
    return DTYPES[name]


# -- the model --------------------------------------------------------------------------------------


def _model_folder(path) -> Path:
    if path is None:
        from .subject import default_subject

        try:
            return default_subject()
        except FileNotFoundError as err:
            raise ValueError(f"--model not given and {err}") from None
    folder = Path(path)
    if not folder.exists():
        raise ValueError(f"--model {str(path)!r} does not exist; accepted: a local Hugging Face causal-LM folder "
                         "(config.json, weights and a tokenizer)")
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ValueError(f"--model {str(path)!r} is not a Hugging Face model folder (no config.json in it); accepted: "
                         "a folder written by save_pretrained (config.json, weights and a tokenizer)")
    return folder


def _load(folder: Path, device, dtype):
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # its notes would break into attnkit's own progress bar
    transformers.utils.logging.disable_progress_bar()
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"--model {str(folder)!r} does not load as a Hugging Face causal LM "
                             f"(AutoModelForCausalLM): {str(err).splitlines()[0][:300]}") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"--model {str(folder)!r} has no usable tokenizer (AutoTokenizer): "
                             f"{str(err).splitlines()[0][:300]}; accepted: a folder with the tokenizer files "
                             "(tokenizer.save_pretrained(folder))") from None
    finally:
        transformers.logging.set_verbosity(quiet)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return model.to(device).eval(), tokenizer


def _model_info(folder: Path, model, tokenizer, dtype) -> dict:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    raw = (folder / "config.json").read_bytes()
    heads = int(config.num_attention_heads)
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    return {
        "path": str(folder.resolve()),
        "config_sha256": hashlib.sha256(raw).hexdigest(),
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "num_layers": int(config.num_hidden_layers),
        "num_heads": heads,
        "num_kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(config, "head_dim", None) or config.hidden_size // heads),
        "hidden_size": int(config.hidden_size),
        "vocab_size": int(config.vocab_size),
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(dtype).replace("torch.", ""),
        "weights": [{"file": p.name, "bytes": p.stat().st_size} for p in weights],
        "tokenizer": type(tokenizer).__name__,
        "model_max_length": _tokenizer_limit(tokenizer),
    }


def _tokenizer_limit(tokenizer) -> int | None:
    limit = getattr(tokenizer, "model_max_length", None)
    # transformers' stand-in for "no limit" is int(1e30)
    return int(limit) if isinstance(limit, int) and limit < 10**12 else None


def _length_limit(info: dict) -> tuple[int | None, str]:
    limits = [(v, name) for v, name in ((info["max_position_embeddings"], "max_position_embeddings of its config"),
                                        (info["model_max_length"], "model_max_length of its tokenizer"))
              if isinstance(v, int) and v > 0]
    return min(limits) if limits else (None, "")


def _cache_argument(model) -> str:
    """transformers 5.25 calls the cache ``cache=`` (``past_key_values=`` still works, with a
    FutureWarning); 5.17 knows only ``past_key_values=``."""
    import inspect

    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


# -- prompts -------------------------------------------------------------------------------------------


class Haystack:
    """Held-out text as the model's tokens, and the prompts and text windows drawn from it.

    ``prefix``: the special tokens the tokenizer puts before a text (a BOS), which every prompt
    and text window starts with. Prompts are built in token space: a window of haystack tokens,
    the needles' tokens cut in at their depths, the question's tokens last; so a prompt has
    exactly the asked length for any tokenizer (for the byte-level subject: the same bytes as
    :func:`attnkit.tasks.longcontext.passkey_example` would give)."""

    def __init__(self, tokenizer, text: bytes):
        self.tokenizer = tokenizer
        self.text = text.decode("utf-8", errors="replace")
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        if backend is not None:
            # by chunks of lines into compact arrays: one Encoding of a megabyte of text, or lists of
            # Python ints and tuples, would hold ~100 MB more in the process whose peak memory the CPU
            # measurement reports
            self.ids, self.starts, self.ends = array("q"), array("q"), array("q")
            pos = 0
            while pos < len(self.text):
                end = len(self.text) if pos + 65536 >= len(self.text) else self.text.rfind("\n", pos, pos + 65536) + 1
                end = end if end > pos else min(len(self.text), pos + 65536)
                enc = backend.encode(self.text[pos:end], add_special_tokens=False)
                self.ids.extend(enc.ids)
                self.starts.extend(o[0] + pos for o in enc.offsets)
                self.ends.extend(o[1] + pos for o in enc.offsets)
                pos = end
        else:  # a slow tokenizer: no offsets, bytes of a window are counted by decoding it
            self.ids = array("q", tokenizer(self.text, add_special_tokens=False, verbose=False)["input_ids"])
            self.starts = self.ends = None
        probe = self.encode("x")
        full = tokenizer("x", verbose=False)["input_ids"]
        at = next((i for i in range(len(full) - len(probe) + 1) if full[i : i + len(probe)] == probe), 0)
        self.prefix = list(full[:at])

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def _window(self, rng: random.Random, size: int) -> list[int]:
        if size > len(self.ids):
            raise ValueError(f"the held-out text has {len(self.ids)} tokens, fewer than the {size} a prompt needs; "
                             "use a larger --corpus")
        start = rng.randrange(len(self.ids) - size + 1)
        return self.ids[start : start + size].tolist()

    def fixed_tokens(self, task: str, pairs: int) -> int:
        """Tokens of a prompt that are not haystack (prefix, needles, question), for the longest
        names and a 5-digit key: a length must exceed this by :data:`MIN_HAYSTACK`."""
        key = "9" * DIGITS
        if task == "passkey":
            return len(self.prefix) + len(self.encode(_needle(key).decode())) + len(self.encode(QUESTION.decode()))
        names = sorted(NAMES, key=len, reverse=True)[:pairs]
        needles = sum(len(self.encode(_multikey_needle(n, key).decode())) for n in names)
        return len(self.prefix) + needles + len(self.encode(_multikey_question(names[0]).decode()))

    def passkey(self, rng: random.Random, length: int, depth: float) -> tuple[list[int], str]:
        """(prompt tokens, key): the passkey needle after ``round(depth * n)`` of ``n`` haystack tokens."""
        key = str(rng.randrange(10 ** (DIGITS - 1), 10**DIGITS))
        needle = self.encode(_needle(key).decode())
        question = self.encode(QUESTION.decode())
        n_hay = length - len(self.prefix) - len(needle) - len(question)
        if n_hay < 1:
            raise ValueError(f"--lengths: {length} tokens leave no room for a haystack around the passkey needle")
        hay = self._window(rng, n_hay)
        cut = int(round(depth * n_hay))
        return self.prefix + hay[:cut] + needle + hay[cut:] + question, key

    def needle(self, rng: random.Random, length: int, depth: float, pairs: int) -> tuple[list[int], str]:
        """(prompt tokens, key): ``pairs`` named keys ("The pass key of <name> is <key>."), the
        asked one after ``round(depth * n)`` haystack tokens, the others at random depths."""
        names = rng.sample(NAMES, pairs)
        keys = [str(rng.randrange(10 ** (DIGITS - 1), 10**DIGITS)) for _ in names]
        needles = [self.encode(_multikey_needle(n, k).decode()) for n, k in zip(names, keys)]
        question = self.encode(_multikey_question(names[0]).decode())
        n_hay = length - len(self.prefix) - sum(map(len, needles)) - len(question)
        if n_hay < 1:
            raise ValueError(f"--lengths: {length} tokens leave no room for a haystack around {pairs} needles")
        hay = self._window(rng, n_hay)
        cuts = [int(round(depth * n_hay))] + [rng.randint(0, n_hay) for _ in names[1:]]
        order = sorted(range(pairs), key=lambda i: (cuts[i], i))
        tokens, done = list(self.prefix), 0
        for i in order:
            tokens += hay[done : cuts[i]] + needles[i]
            done = cuts[i]
        return tokens + hay[done:] + question, keys[0]

    def text_window(self, rng: random.Random, length: int) -> tuple[list[int], int]:
        """(tokens, bytes): ``length`` tokens (``prefix`` and haystack), and the UTF-8 bytes of the text
        the predicted tokens cover (every token but the first; all of them after a prefix). Exact
        when the window's edges fall between characters; a byte token holding part of a multi-byte
        character at an edge counts the whole character (a few bytes in a window of thousands)."""
        n = length - len(self.prefix)  # the window, prefix included, is ``length`` tokens
        if n < 2 or n > len(self.ids):
            raise ValueError(f"--bpb-length {length}: accepted: {len(self.prefix) + 2} to "
                             f"{len(self.ids) + len(self.prefix)} tokens (the held-out text's)")
        start = rng.randrange(len(self.ids) - n + 1)
        ids = self.ids[start : start + n].tolist()
        first = 0 if self.prefix else 1
        if self.starts is not None:
            begin, end = self.starts[start + first], self.ends[start + n - 1]
            count = len(self.text[begin:end].encode("utf-8"))
        else:
            count = len(self.tokenizer.decode(ids[first:]).encode("utf-8"))
        return self.prefix + ids, count


def answer_correct(continuation: str, key: str) -> bool:
    """Greedy exact match: the generated text, leading whitespace removed, starts with the key."""
    return continuation.lstrip().startswith(key)


# -- measuring -------------------------------------------------------------------------------------------


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_nbytes(cache) -> int:
    """Bytes of a cache's key and value tensors: ``HeadwiseCache.nbytes()``, or the tensors of a
    transformers cache's layers (``DynamicCache``)."""
    if callable(getattr(cache, "nbytes", None)):
        return int(cache.nbytes())
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


class _Peak:
    """Peak memory of a measured stretch: CUDA's allocator peak, or the CPU process's peak resident set."""

    def __init__(self, device):
        self.device = device
        if device.type == "cuda":
            self.kind = ("cuda: torch.cuda.max_memory_allocated during the prefill and decode (weights, activations "
                         "and cache: every tensor the allocator holds), reset before each measurement")
        elif self._reset():
            self.kind = ("cpu: the process's peak resident memory (VmHWM) during the prefill and decode, reset before "
                         "each measurement (/proc/self/clear_refs); it includes the weights, Python and every other "
                         "allocation of the process, so it is an upper bound on what the method needs")
        else:
            self.kind = ("cpu: the process's peak resident memory since it started (getrusage ru_maxrss: this system "
                         "cannot reset it), an upper bound that never decreases from one measurement to the next")

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return _Peak._hwm() is not None
        except OSError:
            return False

    @staticmethod
    def _hwm() -> int | None:
        try:
            found = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
        except OSError:
            return None
        return int(found.group(1)) * 1024 if found else None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._reset()

    def read(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        hwm = self._hwm()
        if hwm is not None:
            return hwm
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@torch.no_grad()
def _greedy(model, handle, ids: torch.Tensor, steps: int, cache_arg: str, peak: _Peak | None = None) -> dict:
    """Greedy decoding of ``ids [B, T]`` for ``steps`` tokens on a fresh head-wise cache; the
    prefill's and the decode's wall time, and the cache's bytes after the prefill."""
    device = ids.device
    cache = handle.cache()
    if peak is not None:
        peak.start()
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_arg: cache})
    token = out.logits[:, -1].argmax(-1)
    _sync(device)
    t1 = time.perf_counter()
    kv_bytes = _cache_nbytes(cache)
    tokens = [token]
    for _ in range(steps - 1):
        out = model(input_ids=token[:, None], use_cache=True, **{cache_arg: cache})
        token = out.logits[:, -1].argmax(-1)
        tokens.append(token)
    _sync(device)
    t2 = time.perf_counter()
    return {"tokens": torch.stack(tokens, dim=1).cpu(), "prefill_s": t1 - t0,
            "decode_s_per_token": (t2 - t1) / (steps - 1) if steps > 1 else None, "kv_bytes": kv_bytes,
            "peak_memory_bytes": peak.read() if peak is not None else None}


@torch.no_grad()
def _bits_per_byte(model, haystack: Haystack, length: int, windows: int, seed: int, device, handle=None,
                   cache_arg: str = "past_key_values") -> float:
    # each window on a fresh head-wise cache: a method whose rule keeps state between calls (H2O's
    # scores) cannot run on the model's own cache, and the others compute the same logits on either
    rng = random.Random(f"{seed}-bpb")
    nats, count = 0.0, 0
    for _ in range(windows):
        ids, n_bytes = haystack.text_window(rng, length)
        x = torch.tensor([ids], device=device)
        cache = {cache_arg: handle.cache(), "use_cache": True} if handle is not None else {"use_cache": False}
        logits = model(input_ids=x, **cache).logits[0, :-1].float()
        nats += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
        count += n_bytes
    return nats / count / math.log(2)


def _cell_rng(seed: int, *parts) -> random.Random:
    # a string seed: the same prompts for every method and every run with this seed
    return random.Random("-".join(map(str, (seed, *parts))))


# -- the run --------------------------------------------------------------------------------------


def run(model=None, methods=DEFAULT_METHODS, *, lengths=DEFAULT_LENGTHS, depths=DEFAULT_DEPTHS,
        samples: int = DEFAULT_SAMPLES, tasks=("passkey",), pairs: int = 4, device: str = "cpu",
        dtype: str | None = None, seed: int = 0, bpb_windows: int = 8, bpb_length: int | None = None,
        decode_tokens: int = 32, batch_size: int = 8, corpus=None, threads: int | None = None, progress=None,
        command: str | None = None, beyond_context: bool = False) -> dict:
    """Measure each method on the model; returns the record ``attnkit eval`` writes.

    Args:
        model: a local Hugging Face causal-LM folder (config, weights, tokenizer); ``None``: the
            shipped subject (:func:`attnkit.hf.subject.default_subject`).
        methods: method specs (``"full"``, ``"streaming:sink=4,window=256"``: a name of
            :data:`attnkit.hf.policies.METHODS` and its options) or :class:`Policy` objects.
        lengths: prompt lengths in tokens; each at most the model's ``max_position_embeddings``
            and its tokenizer's ``model_max_length``. depths: needle depths in [0, 1].
        samples: prompts per (task, length, depth) cell. tasks: ``"passkey"``, ``"needle"`` or both.
        pairs: named keys in a ``needle`` prompt (one asked). seed: the prompts and text windows.
        bpb_windows, bpb_length: text windows for bits per byte, and their tokens (default:
            1024, or the longest length the model takes if smaller).
        decode_tokens: tokens generated after the timed prefill (decode latency is their mean).
        batch_size: prompts per forward in the accuracy cells. corpus: a text file or folder
            instead of the standard library (its held-out files are the haystack).
        threads: torch CPU threads during the run (default: 1 on CPU, as ``attnkit bench``: on a
            machine shared with other work a thread waiting for a descheduled one stalls every op,
            which makes small decode steps tens of times slower; torch's own on CUDA).
        progress: ``progress(done, total, description)``, called as the work advances.
        beyond_context: allow lengths past the model's ``max_position_embeddings`` (the context it
            was trained on) and its tokenizer's ``model_max_length``: the test of a length-extension
            method such as LongHeads, with ``full`` as the row that shows the model failing there.
            The record's ``settings`` say the limit was lifted. Bits per byte stays within the limit.

    Returns:
        dict: ``{"schema", "command", "created", "model": {path, config_sha256, ...}, "settings",
        "meta", "peak_memory_kind", "methods": [{"label", "name", "policy", "accuracy": {task:
        {length: {depth: acc}}}, "mean_accuracy": {task: {length: acc}}, "bits_per_byte",
        "lengths": {length: {"kv_bytes", "prefill_s", "decode_s_per_token", "peak_memory_bytes"}},
        "samples": [{task, length, depth, key, generated, correct}], "wall_s"}], "wall_s"}``. Lengths and depths are JSON keys: ``str(length)``, ``str(float(depth))``.
    """
    from .._checks import parse_device

    started = time.perf_counter()
    plan = parse_methods(methods)
    lengths = _int_list(lengths, "--lengths")
    depths = _depth_list(depths)
    tasks = _tasks(tasks)
    _whole(samples, "--samples", 1)
    _whole(pairs, "--pairs", 1)
    if pairs > len(NAMES):
        raise ValueError(f"--pairs must be in [1, {len(NAMES)}] (the number of names), got {pairs}")
    _whole(seed, "--seed", 0)
    _whole(bpb_windows, "--bpb-windows", 0)
    _whole(decode_tokens, "--decode-tokens", 2)
    _whole(batch_size, "--batch-size", 1)
    if bpb_length is not None:
        _whole(bpb_length, "--bpb-length", 2)
    if threads is not None:
        _whole(threads, "--threads", 1)
    if not isinstance(beyond_context, bool):
        raise ValueError(f"beyond_context must be True or False, got {beyond_context!r}")
    torch_device = parse_device(device)
    torch_dtype = _dtype(dtype, torch_device)
    if corpus is not None and not Path(corpus).exists():
        raise ValueError(f"--corpus {str(corpus)!r} does not exist; accepted: a text file or a folder of text files")

    folder = _model_folder(model)
    if threads is None and torch_device.type == "cpu":
        threads = 1
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(folder, plan, lengths, depths, samples, tasks, pairs, torch_device, torch_dtype, seed, bpb_windows,
                    bpb_length, decode_tokens, batch_size, corpus, progress, command, started, beyond_context)
    finally:
        torch.set_num_threads(threads_before)


def _run(folder, plan, lengths, depths, samples, tasks, pairs, torch_device, torch_dtype, seed, bpb_windows, bpb_length,
         decode_tokens, batch_size, corpus, progress, command, started, beyond_context=False) -> dict:
    from .._meta import run_metadata
    from ..tasks.text import load_corpus
    from .attention import apply

    hf_model, tokenizer = _load(folder, torch_device, torch_dtype)
    info = _model_info(folder, hf_model, tokenizer, torch_dtype)
    limit, why = _length_limit(info)
    if limit is not None and not beyond_context:
        too_long = [n for n in lengths if n > limit]
        if too_long:
            raise ValueError(f"--lengths {too_long} exceed(s) {limit}, the {why} ({folder}); accepted: lengths <= "
                             f"{limit} (--beyond-context lifts this limit: the test of a length-extension method "
                             f"such as LongHeads)")
    if bpb_length is None:
        bpb_length = min(1024, limit) if limit is not None else 1024
    elif limit is not None and bpb_length > limit:
        raise ValueError(f"--bpb-length {bpb_length} exceeds {limit}, the {why}; accepted: <= {limit}")
    for label, policy in plan:  # a policy built for another model's shape fails now, not after an hour
        try:
            apply(hf_model, policy).remove()
        except ValueError as err:
            raise ValueError(f"--method {label!r} cannot run on {folder}: {err}") from None

    _, held_out, corpus_info = load_corpus(corpus)
    haystack = Haystack(tokenizer, held_out)
    for task in tasks:
        need = haystack.fixed_tokens(task, pairs) + MIN_HAYSTACK
        short = [n for n in lengths if n < need]
        if short:
            what = "a passkey prompt" if task == "passkey" else f"a needle prompt with {pairs} pairs"
            raise ValueError(f"--lengths {short} is shorter than the {need} tokens {what} needs with this tokenizer "
                             f"(needles, question and {MIN_HAYSTACK} haystack tokens); accepted: lengths >= {need}")
    longest = max(lengths + [bpb_length if bpb_windows else 0])
    if len(haystack.ids) < longest + 1:
        raise ValueError(f"the held-out text of the corpus ({corpus_info['root']}) has {len(haystack.ids)} tokens, "
                         f"fewer than the {longest + 1} the longest prompt needs; use a larger --corpus")

    cache_arg = _cache_argument(hf_model)
    peak = _Peak(torch_device)
    cells = len(tasks) * len(lengths) * len(depths)
    total = len(plan) * (cells + len(lengths) + (1 if bpb_windows else 0))
    done = 0

    def advance(description: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, description)

    if progress is not None:
        progress(0, total, f"{len(plan)} method(s), {cells} cell(s) each")
    rows = []
    for label, policy in plan:
        row = {"label": label, "name": getattr(policy, "name", "") or type(policy).__name__, "policy": repr(policy),
               "accuracy": {t: {} for t in tasks}, "mean_accuracy": {t: {} for t in tasks}, "bits_per_byte": None,
               "lengths": {}, "samples": []}
        handle = apply(hf_model, policy)
        method_started = time.perf_counter()
        try:
            # an untimed warm-up: the first calls pay for one-time set-up (thread pools, kernels)
            warm = haystack.passkey(_cell_rng(seed, "warm-up"), lengths[0], 0.5)[0]
            _greedy(hf_model, handle, torch.tensor([warm], device=torch_device), 2, cache_arg)
            for length in lengths:
                ids, _ = haystack.passkey(_cell_rng(seed, "timing", length), length, 0.5)
                got = _greedy(hf_model, handle, torch.tensor([ids], device=torch_device), decode_tokens, cache_arg,
                              peak)
                row["lengths"][str(length)] = {k: got[k] for k in ("kv_bytes", "prefill_s", "decode_s_per_token",
                                                                   "peak_memory_bytes")}
                advance(f"{label}: {length} timing")
                for task in tasks:
                    per_depth = {}
                    for depth in depths:
                        rng = _cell_rng(seed, task, length, depth)
                        prompts = [haystack.passkey(rng, length, depth) if task == "passkey"
                                   else haystack.needle(rng, length, depth, pairs) for _ in range(samples)]
                        right = 0
                        for start in range(0, samples, batch_size):
                            chunk = prompts[start : start + batch_size]
                            steps = max(len(haystack.encode(key)) for _, key in chunk) + 1
                            ids = torch.tensor([p for p, _ in chunk], device=torch_device)
                            out = _greedy(hf_model, handle, ids, steps, cache_arg)["tokens"]
                            for (_, key), gen in zip(chunk, out):
                                text = tokenizer.decode(gen.tolist(), skip_special_tokens=True)
                                ok = answer_correct(text, key)
                                right += ok
                                row["samples"].append({"task": task, "length": length, "depth": depth, "key": key,
                                                       "generated": text, "correct": ok})
                        per_depth[str(depth)] = right / samples
                        advance(f"{label}: {task} {length} d={depth:g}")
                    row["accuracy"][task][str(length)] = per_depth
                    row["mean_accuracy"][task][str(length)] = sum(per_depth.values()) / len(per_depth)
            if bpb_windows:
                row["bits_per_byte"] = _bits_per_byte(hf_model, haystack, bpb_length, bpb_windows, seed, torch_device,
                                                     handle, cache_arg)
                advance(f"{label}: bits/byte")
        finally:
            handle.remove()
        row["wall_s"] = time.perf_counter() - method_started
        rows.append(row)

    import transformers

    meta = run_metadata(torch_device)
    meta["versions"]["transformers"] = transformers.__version__
    return {
        "schema": SCHEMA,
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": info,
        "settings": {"methods": [label for label, _ in plan], "lengths": lengths, "depths": depths, "samples": samples,
                     "tasks": tasks, "pairs": pairs, "seed": seed, "device": str(torch_device),
                     "dtype": info["dtype"], "bpb_windows": bpb_windows, "bpb_length": bpb_length,
                     "decode_tokens": decode_tokens, "batch_size": batch_size, "corpus": corpus_info,
                     "threads": torch.get_num_threads(), "beyond_context": beyond_context,
                     "length_unit": "tokens of the model's tokenizer", "prefix_tokens": len(haystack.prefix),
                     "correct": "greedy: the generated text, leading whitespace removed, starts with the key"},
        "meta": meta,
        "peak_memory_kind": peak.kind,
        "methods": rows,
        "wall_s": time.perf_counter() - started,
    }


# -- output ----------------------------------------------------------------------------------------


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def print_tables(record: dict, console) -> None:
    """The terminal tables: per method and length (accuracy per task, KV bytes, latency, memory),
    then each method's accuracy grid (depth x length)."""
    from rich.table import Table

    s = record["settings"]
    tasks = s["tasks"]
    table = Table(title=f"attnkit eval · {Path(record['model']['path']).name} · {s['device']} {s['dtype']} · "
                  f"{s['samples']} prompt(s) per cell",
                  caption=f"accuracy: mean over depths {', '.join(f'{d:g}' for d in s['depths'])}; KV bytes after the "
                  "prefill of one prompt; latency at batch 1; bits/byte on held-out text "
                  f"({s['bpb_windows']} windows of {s['bpb_length']} tokens)")
    columns = ["method", "length"] + [f"{t} acc" for t in tasks] + ["KV bytes", "vs first", "prefill s",
                                                                     "decode ms/token", "peak memory", "bits/byte"]
    for col in columns:
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=col != "method")
    first = record["methods"][0]["lengths"]
    for row in record["methods"]:
        for i, (length, m) in enumerate(row["lengths"].items()):
            base = first[length]["kv_bytes"]
            ratio = f"{m['kv_bytes'] / base:.3f}" if base else "-"
            decode = "-" if m["decode_s_per_token"] is None else f"{m['decode_s_per_token'] * 1e3:.1f}"
            bpb = "" if i else ("-" if row["bits_per_byte"] is None else f"{row['bits_per_byte']:.4f}")
            table.add_row(row["label"] if i == 0 else "", length,
                          *[f"{row['mean_accuracy'][t][length]:.2f}" for t in tasks], fmt_bytes(m["kv_bytes"]), ratio,
                          f"{m['prefill_s']:.3f}", decode, fmt_bytes(m["peak_memory_bytes"]), bpb,
                          end_section=i == len(row["lengths"]) - 1)
    console.print(table)
    for task in tasks:
        grid = Table(title=f"{task} accuracy by depth (rows) and length (columns)")
        grid.add_column("method")
        grid.add_column("depth", justify="right")
        for length in map(str, s["lengths"]):
            grid.add_column(length, justify="right")
        for row in record["methods"]:
            acc = row["accuracy"][task]
            for i, depth in enumerate(s["depths"]):
                grid.add_row(row["label"] if i == 0 else "", f"{depth:g}",
                             *[_acc_text(acc[str(n)][str(depth)]) for n in s["lengths"]],
                             end_section=i == len(s["depths"]) - 1)
        console.print(grid)
    console.print(f"[dim]peak memory: {record['peak_memory_kind']}[/]", highlight=False)


def _acc_text(value: float) -> str:
    colour = "green" if value >= 0.9 else "yellow" if value >= 0.5 else "red"
    return f"[{colour}]{value:.2f}[/]"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("attnkit eval's plots need matplotlib: pip install 'attnkit[plot]'") from None
    return plt


def _save(fig, path: Path) -> None:
    write_atomic(path, lambda f: fig.savefig(f, dpi=110, format="png"))  # a reader never sees half a PNG


def plot_heatmaps(record: dict, path) -> None:
    """One needle-in-a-haystack heatmap per method (and task): accuracy by depth (rows, the needle
    first at the top) and length (columns), 0 red to 1 green, every cell annotated."""
    plt = _pyplot()
    s = record["settings"]
    rows, tasks = record["methods"], s["tasks"]
    lengths, depths = [str(n) for n in s["lengths"]], s["depths"]
    cols = len(rows)
    width = max(3.2, 0.9 * len(lengths) + 1.6)
    height = max(2.4, 0.45 * len(depths) + 1.4)
    fig, axes = plt.subplots(len(tasks), cols, figsize=(width * cols + 1.2, height * len(tasks) + 0.6), squeeze=False,
                             layout="constrained")
    image = None
    for r, task in enumerate(tasks):
        for c, row in enumerate(rows):
            ax = axes[r][c]
            grid = [[row["accuracy"][task][n][str(d)] for n in lengths] for d in depths]
            image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
            for i, line in enumerate(grid):
                for j, value in enumerate(line):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=9,
                            color="black" if 0.2 < value < 0.85 else "white" if value <= 0.2 else "black")
            ax.set_xticks(range(len(lengths)), lengths, fontsize=8)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=8)
            if r == len(tasks) - 1:
                ax.set_xlabel("prompt length (tokens)", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{task}: needle depth", fontsize=9)
            if r == 0:
                ax.set_title(row["label"], fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.8, label="accuracy (greedy exact match)")
    fig.suptitle(f"attnkit eval · {Path(record['model']['path']).name} · {s['samples']} prompt(s) per cell",
                 fontsize=10)
    _save(fig, Path(path))
    plt.close(fig)


def plot_accuracy_vs_kv(record: dict, path) -> None:
    """Accuracy (mean over depths) against the KV-cache bytes after the prefill: one point per
    method and length, a method's points joined, each labelled with its length (points that
    coincide, e.g. a streaming method's constant cache, share one label)."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    s = record["settings"]
    tasks = s["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.6 * len(tasks), 4.6), squeeze=False)
    colours = plt.get_cmap("tab10")
    markers = "osD^vP*X"
    handles = []
    for ax, task in zip(axes[0], tasks):
        for i, row in enumerate(record["methods"]):
            lengths = list(row["lengths"])
            x = [row["lengths"][n]["kv_bytes"] for n in lengths]
            y = [row["mean_accuracy"][task][n] for n in lengths]
            line, = ax.plot(x, y, marker=markers[i % len(markers)], color=colours(i % 10), label=row["label"],
                            linewidth=1.2, markersize=7, alpha=0.9)
            if ax is axes[0][0]:
                handles.append(line)
            labels: dict = {}
            for xi, yi, n in zip(x, y, lengths):
                labels.setdefault((xi, yi), []).append(n)
            for (xi, yi), names in labels.items():
                ax.annotate(", ".join(names), (xi, yi), textcoords="offset points", xytext=(6, 4 + 9 * (i % 3)),
                            fontsize=7, color=colours(i % 10))
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_bytes(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.margins(x=0.2)
        ax.set_ylim(-0.05, 1.1)
        ax.set_xlabel("KV-cache bytes after the prefill (log scale; labels: prompt length in tokens)", fontsize=8)
        ax.set_ylabel(f"{task} accuracy, mean over depths", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(f"{task}: accuracy vs KV-cache memory", fontsize=10)
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 3), fontsize=8, frameon=False)
    fig.suptitle(f"attnkit eval · {Path(record['model']['path']).name}", fontsize=10)
    rows_of_legend = -(-len(handles) // 3)
    fig.tight_layout(rect=(0, 0.05 + 0.04 * rows_of_legend, 1, 1))
    _save(fig, Path(path))
    plt.close(fig)


def write_record(record: dict, out, plots: bool = True) -> list[Path]:
    """Write ``eval.json`` (atomically: written beside, then renamed) and the two PNGs into the
    folder ``out``; returns the paths written."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = write_atomic(folder / JSON_NAME, json.dumps(record, indent=1))
    written = [path]
    if plots:
        plot_heatmaps(record, folder / HEATMAP_NAME)
        plot_accuracy_vs_kv(record, folder / TRADEOFF_NAME)
        written += [folder / HEATMAP_NAME, folder / TRADEOFF_NAME]
    return written


def _out_folder(out) -> tuple[Path, bool]:
    """``(folder, created)``: ``--out``, or a fresh ``attnkit-eval-<UTC timestamp>`` folder here,
    and whether this call created it (the write check makes it); refused when it is a file or
    cannot be written."""
    if out is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        folder, n = Path(f"attnkit-eval-{stamp}"), 1
        while folder.exists():
            n += 1
            folder = Path(f"attnkit-eval-{stamp}-{n}")
    else:
        folder = Path(out)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"--out {str(out)!r} is a file; accepted: a folder (created if missing)")
    from .._console import check_writable

    existed = folder.exists()
    check_writable(folder / JSON_NAME, "--out")  # creates the folder
    return folder, not existed


# -- the command ----------------------------------------------------------------------------------------


def add_eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="long-context probe of attnkit.hf methods on a local Hugging Face causal LM",
        description="Apply each --method to the model and measure, side by side: passkey / multi-key needle "
        "retrieval accuracy on a depth x length grid (greedy; the needle-in-a-haystack heatmap), bits per byte "
        "on held-out standard-library text, the KV-cache bytes after a prefill (measured from the cache's "
        "tensors), prefill latency, per-token decode latency and peak memory. Writes eval.json, heatmaps.png "
        "and accuracy_vs_kv.png into --out. Lengths are in tokens of the model's tokenizer.",
    )
    p.add_argument("--model", default=None,
                   help="a local Hugging Face causal-LM folder with its tokenizer (default: the shipped subject, "
                   "attnkit.hf.subject.DEFAULT_PATH)")
    p.add_argument("--method", action="append", default=None, metavar="NAME[:key=value,...]",
                   help=f"a method and its options, repeatable, one row each (names: {', '.join(METHODS)}; values "
                   "are read as int, float, true/false, else text) (default: "
                   + " and ".join(DEFAULT_METHODS) + ")")
    p.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)),
                   help="comma-separated prompt lengths in tokens, each at most the model's max_position_embeddings "
                   "(default: %(default)s)")
    p.add_argument("--depths", default=",".join(f"{d:g}" for d in DEFAULT_DEPTHS),
                   help="comma-separated needle depths in [0, 1] (0: first in the haystack) (default: %(default)s)")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                   help="prompts per (task, length, depth) cell, >= 1 (default: %(default)s)")
    p.add_argument("--task", default="passkey", choices=[*TASKS, "both"],
                   help="passkey (one key) | needle (multi-key: --pairs named keys, one asked) | both "
                   "(default: %(default)s)")
    p.add_argument("--pairs", type=int, default=4, help="named keys in a needle prompt, 1 to 32 (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: %(default)s)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="the model's dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the prompts and text windows, >= 0 (default: %(default)s)")
    p.add_argument("--bpb-windows", type=int, default=8,
                   help="held-out text windows for bits per byte, >= 0 (0: skip) (default: %(default)s)")
    p.add_argument("--bpb-length", type=int, default=None,
                   help="tokens per bits-per-byte window (default: 1024, or the model's limit if smaller)")
    p.add_argument("--decode-tokens", type=int, default=32,
                   help="tokens decoded after the timed prefill, >= 2 (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="prompts per forward in the accuracy cells, >= 1 (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads, >= 1; more use more cores, 1 is steadier on a machine shared with other "
                   "work (default: 1 on CPU, torch's own on CUDA)")
    p.add_argument("--corpus", default=None,
                   help="a text file or folder whose held-out files are the haystack (default: the standard library)")
    p.add_argument("--beyond-context", action="store_true",
                   help="allow --lengths past the model's max_position_embeddings (its trained context) and its "
                   "tokenizer's model_max_length: the test of a length-extension method such as LongHeads, with "
                   "full attention as the row that shows the model failing there")
    p.add_argument("--out", default=None,
                   help="folder for eval.json, heatmaps.png and accuracy_vs_kv.png (default: a new "
                   "attnkit-eval-<UTC date-time> folder here)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    import sys

    from .._console import StepPrinter, console, err_console, invoked_command

    methods = args.method if args.method else list(DEFAULT_METHODS)
    parse_methods(methods)  # a bad spec is refused before anything is created
    _pyplot()  # before the run: a missing matplotlib must not cost it
    folder, created = _out_folder(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    bar = task = printer = None
    if sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        bar = Progress(TextColumn("[bold]eval[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), TimeRemainingColumn(), console=err_console(), transient=True)
    else:
        printer = StepPrinter("eval", sys.stderr)
    last = [-1.0]

    def progress(done, total, description):
        nonlocal task
        if bar is not None:
            if task is None:
                bar.start()
                task = bar.add_task(description, total=total)
            bar.update(task, completed=done, description=description)
        elif done == 0 or done == total or done / total >= last[0] + 0.1:
            last[0] = done / total
            printer.line(f"{done}/{total} {description}")

    try:
        record = run(args.model, methods, lengths=args.lengths, depths=args.depths, samples=args.samples,
                     tasks=args.task, pairs=args.pairs, device=args.device, dtype=args.dtype, seed=args.seed,
                     bpb_windows=args.bpb_windows, bpb_length=args.bpb_length, decode_tokens=args.decode_tokens,
                     batch_size=args.batch_size, corpus=args.corpus, threads=args.threads, progress=progress,
                     command=invoked_command("eval"), beyond_context=args.beyond_context)
    except BaseException:
        if created and not any(folder.iterdir()):
            folder.rmdir()  # a refused or interrupted run leaves no empty folder behind
        raise
    finally:
        if bar is not None:
            bar.stop()
    out = console()
    print_tables(record, out)
    written = write_record(record, folder)
    out.print(f"wrote {', '.join(map(str, written))} ({record['wall_s']:.0f} s)", highlight=False)
    return 0
