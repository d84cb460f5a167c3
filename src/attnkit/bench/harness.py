"""Speed and memory of every mechanism side by side: the engine behind ``attnkit bench``.

Rows of a run
-------------
- *layers*: every registered mechanism (or ``--mechanisms``), built at the run's width
  and fed ``x [B, T, C]``; FLOPs from the card's model; dense reference = the ``mha``
  layer at the same width.
- *ops*: the attention core alone on ``q [B, H, T, D]``: ``dense-sdpa`` (SDPA, dense
  causal; on CUDA also ``dense-sdpa-cudnn``, ``-flash``, ``-efficient``), ``flex`` (raw
  compiled FlexAttention on the ``--pattern`` block mask; ``dense-flex`` the same on dense causal),
  ``sigmoid`` (:func:`attnkit.ops.sigmoid_attend` on ``--pattern``, bias -log T), ``lightning``
  (:func:`attnkit.ops.linear.lightning.lightning_attend`, causal linear attention with ALiBi-slope
  decay; Triton on CUDA), ``fla-lightning`` (flash-linear-attention's ``chunk_lightning_attn``
  on its own ``[B, T, H, D]`` layout, when ``fla`` is installed), ``attend`` (``attnkit.attend``,
  auto dispatch, ``--pattern``) and ``reference`` (where it fits in memory); dense
  reference = ``dense-sdpa``. ``--pattern`` may name several patterns (comma-separated):
  the patterned rows (``PATTERNED_OPS``) are then measured once per pattern, the dense
  and linear rows once, and each cell records its ``pattern``.

How a cell is timed
-------------------
A cell's row and its dense reference (``mha`` for layers, ``dense-sdpa`` for ops, at the
same shapes) are warmed up, then sampled *interleaved*: each round times one reference
sample and one row sample (ABBA order, so neither always runs first) and, unless the
vendor peak is used, in the first round and every third, one square matmul of the cell's
dtype. The reference of a sequence length is built and warmed once and shared by that
length's cells (decode: one per cell, since every timed step grows its state). Both
members of a pair see the same machine state, so the speedup is the median of the
per-round ratios ``reference / row``, not a ratio of medians taken minutes apart. Rounds
go on until the p10-p90 band of the row's latency and of the ratio are within
``STOP_SPREAD`` of their medians (after at least ``repeat`` rounds), or ``max_time``
seconds of sampling have passed, or ``MAX_SAMPLES`` rounds were taken; a slow cell (a
call of a second or more, where a few rounds already measure it to a percent) stops at
``SLOW_ROUNDS`` rounds once ``SLOW_BUDGET`` x ``max_time`` seconds have passed, before
``repeat`` rounds: the default CUDA run's slowest cells would otherwise spend minutes each. ``noise`` is the
estimated relative standard error of the median speedup (of the median latency for the
reference rows themselves), ``~0.49 * (p90 - p10) / median / sqrt(n)``; a cell is
``noisy`` when it exceeds ``NOISE_LIMIT`` or has fewer than 3 samples: a second run may
then disagree by more than ~25 %. Timing uses CUDA events on GPU and ``perf_counter`` on
CPU, with Python's garbage collector paused while sampling.

Peak memory is measured on the last warm-up call (CUDA allocator above what was allocated
before; process RSS sampled by a thread on CPU). The % of peak divides the cell's
TFLOP/s (median latency) by the vendor's dense peak where the device and dtype are known
(H200 / H100 SXM bf16 and fp16: 989.4 TFLOP/s), otherwise by the best of the matmul
samples taken in every cell's rounds over the whole run (``peak.source`` says which; the
streamed cells carry the best so far, the final JSON the run's best): one matmul timed once
at the start, caught in a busy moment, made "% of peak" exceed 100. Decode mode:
per-token latency after a prefill of ``seq`` tokens, and the bytes of the decode state
holding exactly those ``seq`` tokens.

A cell whose shape a layer cannot serve is ``unsupported`` with the reason: layers with a
learned position table (``max_len``) are built long enough for the cell; on CUDA each layer
first runs on the meta device at the cell's shape, so that its own ``ValueError`` speaks
before any kernel is launched; and a ``ValueError`` during the cell (the project's error
for refused inputs) marks it unsupported too. A
failure inside a cell is recorded as ``error`` and the run goes on, except a CUDA context
fault (illegal memory access, device-side assert, driver error): the context cannot be
used afterwards, so the run stops there with ``stopped`` naming the cell; every cell
finished before it has already been handed to ``on_cell`` (the CLI streams them to a
JSON-lines file).

JSON schema (``"schema": "attnkit.bench/2"``)::

    {schema, command, created, complete: bool, stopped: null | {cell, kind, name, seq, message},
     git_commit (null outside a git checkout),
     device: {type, name, cores, cpu_model, torch_threads, load_average: [1, 5, 15 min] at the start,
              load_average_end (the machine's load: other processes make CPU timings noisy)},
     versions: {attnkit, torch, python, triton},
     config: {mechanisms, ops, seqs, batch, dim, heads, head_dim, dtype, device, mode, pattern,
              repeat (minimum rounds), warmup, max_time (seconds of sampling per cell), tokens_per_batch,
              compile, kv_heads, threads (torch CPU threads; null = torch's default), timing (latency: one call per sample | throughput: the mean of a burst of 10
              queued calls)},
     timer: {stop_spread, noise_limit, max_samples},
     peak: {source: "vendor spec" | "measured beside each cell", tflops (the vendor's, or the run's best matmul), note},
     suite (the ``--suite`` preset the run started from; null without one),
     cells: [{name, kind: "layer"|"op", family (the card's; "op" for ops), seq, batch,
              pattern (patterned op rows: the pattern spec; "" for the others),
              status: "ok"|"oom"|"unsupported"|"skipped"|"error", message, backend,
              latency_ms: {median, p10, p90, min, max, samples, spread ((p90-p10)/median)},
              dense_latency_ms (median of the interleaved reference samples),
              speedup_vs_dense, speedup_p10, speedup_p90 (per-round ratios), noise, noisy,
              peak_memory_bytes, flops, tflops, peak_tflops, pct_peak,
              flop_reduction, realised_fraction (speedup / flop_reduction),
              speedup_vs_dense_flex, realised_fraction_vs_flex (against the dense-flex cell's median, not interleaved),
              state_bytes, setup_s (seconds building, compiling and warming the row and its reference),
              elapsed_s (the cell's wall time, setup and sampling: where a run's minutes go)}]}

Allocator note: on CPU, :func:`run_bench` fixes glibc's mmap threshold (``mallopt``) so that
RSS follows tensor lifetimes. glibc offers no way to restore its dynamic threshold, so the
setting stays for the rest of the process: harmless for the ``attnkit bench`` CLI (one
process per run), worth knowing when ``run_bench`` is called from a long-lived process.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable

import torch

from .. import __version__, registry
from .._checks import parse_device
from .._meta import code_hash, cpu_model, git_commit
from .. import patterns as _patterns
from ..ops import attend, attend_reference, block_mask_for
from ..ops.softmax.flex import _flex_impl, flex_small_blocks, flex_tiles

__all__ = ["BenchConfig", "run_bench", "parse_pattern", "OPS", "default_config", "SCHEMA", "validate_config"]

SCHEMA = "attnkit.bench/2"
OPS = ("dense-sdpa", "dense-sdpa-cudnn", "dense-sdpa-flash", "dense-sdpa-efficient", "dense-flex", "flex", "attend",
       "sigmoid", "lightning", "fla-lightning", "reference")
#: op rows computed on ``--pattern`` (once per pattern); the others run dense causal (or full)
PATTERNED_OPS = ("flex", "attend", "sigmoid", "reference")
LINEAR_OPS = ("lightning", "fla-lightning")  # causal linear attention; FLOPs of the chunked form, not the pattern's
MODES = ("fwd", "fwdbwd", "decode")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
REFERENCE_MEMORY_FRACTION = 0.25
DENSE_LAYER, DENSE_OP = "mha", "dense-sdpa"

TIMINGS = ("latency", "throughput")
#: calls queued back to back per sample with ``timing="throughput"`` (the sample is their mean)
THROUGHPUT_BURST = 10
#: sampling stops early once the p10-p90 band of the latency and of the speedup ratio is within this of the median
STOP_SPREAD = 0.10
#: a cell is flagged noisy above this estimated relative standard error of its median speedup (latency)
NOISE_LIMIT = 0.07
#: most rounds per cell (decode: each round appends a token to the state)
MAX_SAMPLES = 100
# a slow cell stops at SLOW_ROUNDS rounds once SLOW_BUDGET * max_time seconds of sampling have passed
SLOW_ROUNDS = 5
SLOW_BUDGET = 5
#: dense bf16/fp16 tensor-core peaks (TFLOP/s, vendor spec sheets), matched on the device name in order
VENDOR_PEAKS = (("H100 PCIe", 756.0), ("H200", 989.4), ("H100", 989.4), ("A100", 312.0))
#: messages after which the CUDA context is unusable: the run stops instead of going on
CONTEXT_FAULTS = ("illegal memory access", "device-side assert", "cuda driver error", "unspecified launch failure",
                  "misaligned address", "illegal instruction", "uncorrectable ecc error")


@dataclass
class BenchConfig:
    mechanisms: list[str]
    ops: list[str]
    seqs: list[int]
    batch: int | None  # None: max(1, tokens_per_batch // seq)
    dim: int
    heads: int
    head_dim: int
    dtype: str
    device: str
    mode: str = "fwd"
    pattern: str = "causal"  # one spec, or several comma-separated (patterned op rows run once per pattern)
    repeat: int = 3  # fewest rounds per cell
    warmup: int = 2
    max_time: float = 0.5  # seconds of sampling per cell once ``repeat`` rounds are in
    tokens_per_batch: int = 32768
    compile: bool = False
    small_flex_tiles: bool = False  # enable_small_flex_backward_tiles() during the run (patterns' own 64-token blocks in training)
    kv_heads: int | None = None  # op rows: key/value heads (GQA-shaped core); None = heads
    threads: int | None = None  # torch CPU threads during the run; None = leave torch's setting
    timing: str = "latency"  # latency: one call per sample; throughput: a burst of THROUGHPUT_BURST calls per sample

    @property
    def patterns(self) -> list[str]:
        """The pattern specs of the run (``pattern`` split at commas), each in its canonical spelling
        (``window:016`` -> ``window:16``), so that one pattern written two ways is one pattern."""
        return [_canonical_pattern(p) for p in self.pattern.split(",")]

    @property
    def burst(self) -> int:
        return THROUGHPUT_BURST if self.timing == "throughput" else 1

    @property
    def op_kv_heads(self) -> int:
        return self.kv_heads if self.kv_heads is not None else self.heads

    def batch_for(self, seq: int) -> int:
        return self.batch if self.batch is not None else max(1, self.tokens_per_batch // seq)


def default_config(device: str) -> dict:
    """The built-in defaults: a small layer on CPU, a 1B-class layer on CUDA."""
    if device.startswith("cuda"):
        return dict(seqs=[2048, 4096, 8192, 16384, 32768], batch=None, dim=2048, heads=16, head_dim=128,
                    dtype="bfloat16", repeat=20, warmup=5, max_time=2.0, threads=None)
    # one CPU thread: on a machine shared with other work, an op split over two threads waits
    # for whichever is descheduled (measured here under load: mha at 256 tokens 440 ms with 2
    # threads, 19 ms with 1), which made two identical runs disagree by up to 10x
    return dict(seqs=[256, 512, 1024, 2048], batch=1, dim=512, heads=8, head_dim=64, dtype="float32",
                repeat=3, warmup=2, max_time=0.5, threads=1)


def _canonical_pattern(spec: str) -> str:
    """``spec`` without blanks and with its numbers written plainly (``window: 016`` -> ``window:16``);
    a spec whose numbers do not parse is returned stripped (parse_pattern then refuses it)."""
    kind, *numbers = spec.strip().split(":")
    try:
        return ":".join([kind.strip(), *(str(int(n)) for n in numbers)])
    except ValueError:
        return spec.strip()


def parse_pattern(spec: str, heads: int = 1) -> _patterns.Pattern:
    """``causal`` | ``full`` | ``window:W`` | ``sink:N:W`` | ``s2:BLOCK:LOCAL:STRIDE`` -> a Pattern
    (S2-Attention's per-head pattern is built for ``heads`` heads)."""
    parts = spec.split(":")
    try:
        if parts == ["causal"] or parts == ["full"]:
            return _patterns.resolve(parts[0])
        if parts[0] == "window" and len(parts) == 2:
            return _patterns.sliding_window(int(parts[1]))
        if parts[0] == "sink" and len(parts) == 3:
            return _patterns.sink_window(int(parts[1]), int(parts[2]))
        if parts[0] == "s2" and len(parts) == 4:
            block, local, stride = (int(p) for p in parts[1:])
            return _patterns.s2_strided(num_heads=heads, block_size=block, local_blocks=local, vert_stride=stride)
    except ValueError as err:
        if "invalid literal" not in str(err):
            # the pattern's own check ("window must be a positive integer, got 0"): say which option it was
            raise ValueError(f"--pattern {spec!r}: {err}") from None
    raise ValueError(f"unknown --pattern {spec!r}; accepted: causal, full, window:W, sink:N:W, s2:BLOCK:LOCAL:STRIDE")


# -- measurement primitives ----------------------------------------------------------------------
class _RssSampler:
    """Peak resident memory of this process while a block runs (CPU memory measurement)."""

    def __init__(self, interval: float = 0.0005):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:  # not Linux: fall back to the (monotonic) peak of the process
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self):
        gc.collect()  # cheap: run_bench froze the objects that existed before it
        self.base = self._rss()
        self.peak = self.base
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def used(self) -> int:
        return max(0, self.peak - self.base)


def _sample(fn: Callable[[], object], device: torch.device, burst: int = 1) -> float:
    """One sample in ms per call: ``burst`` calls queued back to back, divided by ``burst``
    (1 gives a call's latency, host launch gaps included; more gives throughput, where the
    host queues the next call while the GPU runs the previous one)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(burst):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / burst
    t0 = time.perf_counter()
    for _ in range(burst):
        fn()
    return (time.perf_counter() - t0) * 1e3 / burst


def _warm_up(fn: Callable[[], object], device: torch.device, warmup: int, *, memory: bool = True) -> int | None:
    """``warmup`` untimed calls (at least one); with ``memory``, the last measures peak memory
    (bytes above what was allocated before it): the allocator's peak on CUDA, sampled RSS on CPU."""
    for _ in range(warmup - 1 if memory else max(warmup, 1)):
        fn()
    if not memory:
        return None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with _RssSampler() as sampler:
        fn()
    return sampler.used


def _percentile(ordered: list[float], p: float) -> float:
    return ordered[min(len(ordered) - 1, int(round(p * (len(ordered) - 1))))]


def _spread(values: list[float]) -> float:
    """Width of the p10-p90 band relative to the median (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    ordered = sorted(values)
    median = statistics.median(ordered)
    return (_percentile(ordered, 0.9) - _percentile(ordered, 0.1)) / median if median > 0 else math.inf


def _rel_stderr(values: list[float]) -> float:
    """Relative standard error of the median, estimated from the p10-p90 band: for a normal
    sample the band is 2.563 sigma wide and the median's error 1.2533 sigma / sqrt(n)."""
    return 1.2533 / 2.563 * _spread(values) / math.sqrt(len(values)) if values else math.inf


@dataclass
class _Timed:
    row: list[float]
    ref: list[float]  # empty when the row was timed alone
    peak_tflops: list[float]  # the interleaved matmul samples (empty with a vendor peak)

    @property
    def ratios(self) -> list[float]:
        return [r / t for r, t in zip(self.ref, self.row)]


def _interleave(fn: Callable, ref: Callable | None, peak: "_Peak", device: torch.device, *, burst: int,
                min_rounds: int, max_time: float, max_rounds: int = MAX_SAMPLES) -> _Timed:
    """Time ``fn`` and ``ref`` alternately (ABBA) and a peak matmul beside them, round by round,
    until the spreads are small (after ``min_rounds``), ``max_time`` s of sampling pass, or
    ``max_rounds`` rounds were taken."""
    timed = _Timed([], [], [])
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside one sample of a pair would skew that pair
    try:
        start = time.perf_counter()
        while True:
            if ref is None:
                timed.row.append(_sample(fn, device, burst))
            elif len(timed.row) % 2 == 0:
                timed.ref.append(_sample(ref, device, burst))
                timed.row.append(_sample(fn, device, burst))
            else:
                timed.row.append(_sample(fn, device, burst))
                timed.ref.append(_sample(ref, device, burst))
            n = len(timed.row)
            if peak.measured and (n == 1 or n % 3 == 0):  # a matmul costs more than a short row: not every round
                timed.peak_tflops.append(peak.sample())
            if n >= max_rounds:
                break
            if n >= min(SLOW_ROUNDS, min_rounds) and time.perf_counter() - start >= SLOW_BUDGET * max_time:
                break  # a slow cell: a few rounds of seconds each measure it well enough
            if n >= min_rounds:
                if time.perf_counter() - start >= max_time:
                    break
                if _spread(timed.row) <= STOP_SPREAD and (ref is None or _spread(timed.ratios) <= STOP_SPREAD):
                    break
    finally:
        if gc_was_enabled:
            gc.enable()
    return timed


class _Peak:
    """The % of peak denominator: the vendor's dense peak where known, otherwise square
    matmuls of the run's dtype timed beside every cell (the best sample so far is the peak)."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device = device
        self.vendor = _vendor_peak(device, dtype)
        self.measured = self.vendor is None
        self.best: float | None = self.vendor
        if self.measured:
            n = 8192 if device.type == "cuda" else 1024
            self._a = torch.randn(n, n, device=device, dtype=dtype)
            self._b = torch.randn(n, n, device=device, dtype=dtype)
            self._flops = 2.0 * n**3
            self.size = n
            _sample(self._mm, device)  # warm-up: the first call picks and loads the kernel

    def _mm(self):
        return torch.mm(self._a, self._b)

    def sample(self) -> float:
        tflops = self._flops / (_sample(self._mm, self.device) * 1e-3) / 1e12
        self.best = max(self.best or 0.0, tflops)
        return tflops

    def describe(self) -> dict:
        if not self.measured:
            return {"source": "vendor spec", "tflops": self.vendor,
                    "note": "dense bf16/fp16 tensor-core peak from the vendor's spec sheet, matched on the device name"}
        return {"source": "measured beside each cell", "tflops": self.best,
                "note": f"best of the {self.size}x{self.size} matmuls of the run's dtype timed in every cell's rounds"}


def _vendor_peak(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in VENDOR_PEAKS if key in name), None)


def _fixed_mmap_threshold() -> None:
    """Make glibc return large blocks to the OS at once, so that RSS follows tensor lifetimes.

    glibc raises its mmap threshold after large frees and keeps later blocks on the heap,
    which would hide a cell's allocations behind the previous cell's. Fixing the threshold
    (128 KiB) turns that off, for the rest of the process (glibc cannot switch its dynamic
    threshold back on); a no-op where glibc is absent.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_MMAP_THRESHOLD = -3
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):
        pass


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def is_context_fault(err: BaseException) -> bool:
    """An error after which the CUDA context cannot be used (so the run must stop)."""
    text = str(err).lower()
    return any(key in text for key in CONTEXT_FAULTS)


class _ContextFault(Exception):
    def __init__(self, cell: "Cell", where: str):
        super().__init__(cell.message)
        self.cell, self.where = cell, where


class _Unsupported(Exception):
    """A cell that cannot run here (missing optional package, wrong device, a shape the layer
    refuses): reported with the reason, not failed."""


# -- rows -----------------------------------------------------------------------------------------
def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]


def _op_callable(name: str, q, k, v, pattern, dense_pattern) -> tuple[Callable, str]:
    """A zero-argument callable computing the op, and the backend it used."""
    import torch.nn.functional as F

    is_causal = dense_pattern.kind == "causal"
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    if name == "dense-sdpa":
        return (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, **gqa)), "sdpa"
    if name.startswith("dense-sdpa-"):
        from torch.nn.attention import sdpa_kernel

        backend = _sdpa_backend(name.rsplit("-", 1)[1])

        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, **gqa)

        return run, name.rsplit("-", 1)[1]
    if name in ("flex", "dense-flex"):
        from torch.nn.attention.flex_attention import flex_attention

        if name == "dense-flex":
            pattern = dense_pattern
        small = flex_small_blocks(q.device, q.requires_grad)  # the blocks attend would use
        block_mask = block_mask_for(pattern, q.shape[0], q.shape[1], q.shape[2], k.shape[2], 0, q.device, small_blocks=small)
        if q.device.type == "cuda":
            fn = _flex_impl(q.device)
            tile = pattern.flex_block_size if small else None
            options = {"kernel_options": flex_tiles(tile)} if tile else {}
            return (lambda: fn(q, k, v, block_mask=block_mask, **options, **gqa)), "flex"

        def eager():
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "called without torch.compile": that is what this row measures
                return flex_attention(q, k, v, block_mask=block_mask, **gqa)

        return eager, "flex (eager)"
    if name == "attend":
        from ..ops.softmax.dispatch import choose_backend

        backend = choose_backend(q, k, v, pattern, None, False, 0)
        return (lambda: attend(q, k, v, pattern=pattern)), backend
    if name == "sigmoid":
        from ..ops import sigmoid_attend
        from ..ops.softmax.dispatch import choose_backend
        from ..ops.sigmoid import choose_sigmoid_backend

        backend = choose_sigmoid_backend(q, v, pattern)
        if backend != "triton":  # the log-sigmoid path runs on whatever attend picks
            backend = choose_backend(q, k, v, pattern, "score_mod", True, 0) + " (log-sigmoid)"
        return (lambda: sigmoid_attend(q, k, v, pattern=pattern, bias=-math.log(q.shape[2]))), backend
    if name == "lightning":
        from ..ops.linear.lightning import alibi_slopes, lightning_attend

        slopes = torch.tensor(alibi_slopes(q.shape[1]), device=q.device)
        backend = "triton" if q.is_cuda else "chunked"
        return (lambda: lightning_attend(q, k, v, slopes, backend=backend)[0]), backend
    if name == "fla-lightning":
        from fla.ops.lightning_attn import chunk_lightning_attn  # present: _op_unsupported checked
        qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_(t.requires_grad) for t in (q, k, v))

        def run_fla():
            for t in (qt, kt, vt):
                t.grad = None
            return chunk_lightning_attn(qt, kt, vt, layer_idx=0, num_layers=1)[0]

        return run_fla, "fla chunk (B, T, H, D)"
    if name == "reference":
        return (lambda: attend_reference(q, k, v, pattern=pattern)), "reference"
    raise ValueError(f"unknown op {name!r}; accepted: {', '.join(OPS)}")


def _op_unsupported(name: str, cfg: BenchConfig, device: torch.device) -> str | None:
    """Why op row ``name`` cannot run in this configuration (None when it can); decided
    before any tensor is made."""
    if cfg.mode == "decode":
        return "ops are measured in fwd / fwdbwd; decode measures layers"
    if name.startswith("dense-sdpa-") and device.type != "cuda":
        return "SDPA backend choice is a CUDA feature"
    if name in ("flex", "dense-flex") and device.type == "cpu" and cfg.mode == "fwdbwd":
        return "FlexAttention has no backward on CPU"
    if name in ("sigmoid", *LINEAR_OPS) and cfg.op_kv_heads != cfg.heads:
        return f"the {name} op row takes as many key/value heads as query heads (no --kv-heads)"
    if name == "fla-lightning":
        try:
            import fla.ops.lightning_attn  # noqa: F401
        except ImportError:
            return "flash-linear-attention (fla) is not installed: pip install fla-core"
        if device.type != "cuda":
            return "fla's kernels run on CUDA only"
    return None


class _Skipped(Exception):
    """A cell left out on purpose (the reference op where its scores would not fit)."""


def _with_backward(fn: Callable, leaves: list[torch.Tensor]) -> Callable:
    def run():
        for t in leaves:
            t.grad = None
        out = fn()
        out.backward(torch.ones_like(out))

    return run


@dataclass
class _Work:
    """A built row, ready to call: ``fn()`` runs one step (forward, forward+backward or one decode token)."""

    fn: Callable[[], object]
    backend: str = ""
    flops: float | None = None
    state_bytes: int | None = None


def _op_work(name, cfg: BenchConfig, seq: int, device, dtype, pattern, dense_pattern) -> _Work:
    B = cfg.batch_for(seq)
    row_pattern = dense_pattern if name.startswith("dense-") else pattern
    H, D, Hkv = cfg.heads, cfg.head_dim, cfg.op_kv_heads
    if name == "reference":
        elem = 8 if dtype == torch.float64 else 4
        need = B * H * seq * seq * elem * (4 if cfg.mode == "fwdbwd" else 3)
        limit = _free_memory(device) * REFERENCE_MEMORY_FRACTION
        if need > limit:
            raise _Skipped(f"reference needs ~{need / 2**30:.1f} GiB of scores (limit {limit / 2**30:.1f} GiB)")
    if name in LINEAR_OPS:  # the chunked form: 4*64*D per token in its block + 4*D*D through the state
        flops = B * H * seq * (4.0 * 64 * D + 4.0 * D * D)
        row_pattern = dense_pattern
    else:
        flops = registry.dense_attention_flops(B, seq, num_heads=H, head_dim=D, pattern=row_pattern)
    gen = torch.Generator(device=device).manual_seed(seq)
    q, k, v = (torch.randn(B, h, seq, D, device=device, dtype=dtype, generator=gen) for h in (H, Hkv, Hkv))
    if cfg.mode == "fwdbwd":
        for t in (q, k, v):
            t.requires_grad_(True)
    fn, backend = _op_callable(name, q, k, v, row_pattern, dense_pattern)
    fn = _with_backward(fn, [q, k, v]) if cfg.mode == "fwdbwd" else torch.no_grad()(fn)
    return _Work(fn, backend, registry.FlopCount(attention_fwd=flops, projection_fwd=0.0).total(cfg.mode))


def _accepted(card) -> set[str]:
    import inspect

    return set(inspect.signature(card.layer.__init__).parameters)


def _layer_options(card, cfg: BenchConfig, seq: int) -> dict:
    """Build options the run sets: the head dim, and a learned position table (``max_len``)
    long enough for every position the cell reaches (decode appends up to a token per call)."""
    accepted = _accepted(card)
    options = {"head_dim": cfg.head_dim} if "head_dim" in accepted else {}
    if "max_len" in accepted:
        options["max_len"] = seq + ((cfg.warmup + 1 + MAX_SAMPLES) * cfg.burst if cfg.mode == "decode" else 0)
    return options


def _meta_preflight(card, cfg: BenchConfig, seq: int, options: dict, dtype) -> str | None:
    """Run the layer at the cell's shape on the meta device (shapes only, no data, no kernels):
    a ``ValueError`` from its own checks then says why the shape cannot be served before
    anything is launched on the GPU, where a bad launch can break the CUDA context. Other
    failures on meta (e.g. ``.item()`` of a meta tensor) say nothing and are ignored."""
    import warnings

    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            layer = card.build(cfg.dim, cfg.heads, **options).to(dtype=dtype)
            layer(torch.empty(cfg.batch_for(seq), seq, cfg.dim, dtype=dtype))
    except ValueError as err:
        return str(err).splitlines()[0][:300] if str(err) else type(err).__name__
    except Exception:  # noqa: BLE001 - meta cannot run everything; the real run decides
        return None
    return None


def _layer_work(name, cfg: BenchConfig, seq: int, device, dtype) -> _Work:
    card = registry.get(name)
    if cfg.mode == "decode" and not card.capabilities.decode:
        raise _Unsupported(f"{name} does not decode")
    B = cfg.batch_for(seq)
    options = _layer_options(card, cfg, seq)
    try:
        layer = card.build(cfg.dim, cfg.heads, **options)
    except ValueError as err:
        raise _Unsupported(f"{name} cannot be built at dim={cfg.dim}, heads={cfg.heads}: {err}") from None
    if device.type == "cuda":  # on CPU a refusal after some work costs nothing; the ValueError still says why
        reason = _meta_preflight(card, cfg, seq, options, dtype)
        if reason:
            raise _Unsupported(f"{name} refuses [B, T, C] = [{B}, {seq}, {cfg.dim}]: {reason}")
    layer = layer.to(device=device, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seq)
    backend = str(getattr(layer, "backend", "") or "")
    if cfg.mode == "decode":
        layer.eval()
        state = layer.init_state(B, device=device, dtype=dtype)
        with torch.no_grad():
            prefill = torch.randn(B, seq, cfg.dim, device=device, dtype=dtype, generator=gen)
            layer(prefill, state)
            del prefill
        token = torch.randn(B, 1, cfg.dim, device=device, dtype=dtype, generator=gen)
        step = card.flop_count(B, 1, cfg.dim, cfg.heads, **options)
        attn_step = registry.dense_attention_flops(B, 1, num_heads=cfg.heads, head_dim=cfg.head_dim,
                                                   pattern=getattr(layer, "pattern", "causal"), kv_len=seq)
        # each call appends one token: time and memory are per token at ~seq context
        return _Work(torch.no_grad()(lambda: layer(token, state)), backend, step.projection_fwd + attn_step,
                     state_bytes=state.nbytes())
    x = torch.randn(B, seq, cfg.dim, device=device, dtype=dtype, generator=gen)
    model = torch.compile(layer) if cfg.compile else layer
    if cfg.mode == "fwdbwd":
        x.requires_grad_(True)
        fn = _with_backward(lambda: model(x), [x, *layer.parameters()])
    else:
        fn = torch.no_grad()(lambda: model(x))
    return _Work(fn, backend, card.flop_count(B, seq, cfg.dim, cfg.heads, **options).total(cfg.mode))


@dataclass
class Cell:
    name: str
    kind: str
    seq: int
    batch: int
    family: str = ""
    pattern: str = ""
    status: str = "ok"
    message: str = ""
    backend: str = ""
    latency_ms: dict = field(default_factory=dict)
    dense_latency_ms: float | None = None
    speedup_vs_dense: float | None = None
    speedup_p10: float | None = None
    speedup_p90: float | None = None
    noise: float | None = None
    noisy: bool | None = None
    peak_memory_bytes: int | None = None
    flops: float | None = None
    tflops: float | None = None
    peak_tflops: float | None = None
    pct_peak: float | None = None
    flop_reduction: float | None = None
    realised_fraction: float | None = None
    speedup_vs_dense_flex: float | None = None
    realised_fraction_vs_flex: float | None = None
    state_bytes: int | None = None
    setup_s: float | None = None
    elapsed_s: float | None = None

    @property
    def label(self) -> str:
        return f"{row_label(self.name, self.pattern)} @ {self.seq} ({self.kind})"


def row_label(name: str, pattern: str) -> str:
    """A row's name with its pattern, unless that is dense causal (the default) or the row has none."""
    return f"{name} [{pattern}]" if pattern and pattern != "causal" else name


def _stats(times: list[float]) -> dict:
    ordered = sorted(times)
    return {"median": statistics.median(times), "p10": _percentile(ordered, 0.1), "p90": _percentile(ordered, 0.9),
            "min": ordered[0], "max": ordered[-1], "samples": len(times), "spread": _spread(times)}


def _set_peak(cell: Cell, peak_tflops: float | None) -> None:
    if cell.tflops is not None and peak_tflops:
        cell.peak_tflops = peak_tflops
        cell.pct_peak = 100.0 * cell.tflops / peak_tflops


def _summarise(cell: Cell, timed: _Timed, *, is_reference: bool, ref_flops: float | None,
               peak_tflops: float | None) -> None:
    """Fill the cell's numbers from its interleaved samples (``peak_tflops``: the % of peak denominator)."""
    cell.latency_ms = _stats(timed.row)
    ms = cell.latency_ms["median"]
    if cell.flops:
        cell.tflops = cell.flops / (ms * 1e-3) / 1e12
        _set_peak(cell, peak_tflops)
    if is_reference:
        cell.dense_latency_ms = ms
        cell.speedup_vs_dense = cell.speedup_p10 = cell.speedup_p90 = 1.0
        cell.flop_reduction = cell.realised_fraction = 1.0 if cell.flops else None
        cell.noise = _rel_stderr(timed.row)
    elif timed.ref:
        ratios = sorted(timed.ratios)
        cell.dense_latency_ms = statistics.median(timed.ref)
        cell.speedup_vs_dense = statistics.median(ratios)
        cell.speedup_p10, cell.speedup_p90 = _percentile(ratios, 0.1), _percentile(ratios, 0.9)
        cell.noise = _rel_stderr(ratios)
        if cell.flops and ref_flops:
            cell.flop_reduction = ref_flops / cell.flops
            cell.realised_fraction = cell.speedup_vs_dense / cell.flop_reduction
    else:
        cell.noise = _rel_stderr(timed.row)
    cell.noisy = len(timed.row) < 3 or cell.noise > NOISE_LIMIT


def _vs_flex(cell: Cell, flex_ref: Cell | None) -> None:
    """The comparison against dense causal FlexAttention (the patterned op rows' own kernel),
    from the two cells' medians."""
    if cell.kind == "op" and cell.status == "ok" and flex_ref is not None and cell.flops and flex_ref.flops:
        cell.speedup_vs_dense_flex = flex_ref.latency_ms["median"] / cell.latency_ms["median"]
        cell.realised_fraction_vs_flex = cell.speedup_vs_dense_flex / (flex_ref.flops / cell.flops)


def _free_memory(device) -> float:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _References:
    """The dense references of the current sequence length, built and warmed once and shared by
    the cells of that length (decode builds one per cell: every timed step grows its state)."""

    def __init__(self, mode: str):
        self.mode = mode
        self._built: dict[tuple[str, int], _Work] = {}

    def get(self, kind: str, seq: int, build: Callable[[], _Work], device) -> _Work:
        key = (kind, seq)
        if key in self._built:
            return self._built[key]
        if any(s != seq for _, s in self._built):  # a new length: free the previous one's tensors
            self._built.clear()
            _release(device)
        work = build()
        _warm_up(work.fn, device, 1, memory=False)
        if self.mode != "decode":
            self._built[key] = work  # failures are not kept: the next cell tries again
        return work


def _run_cell(kind: str, name: str, cfg: BenchConfig, seq: int, device, dtype, peak: _Peak, pattern,
              dense_pattern, references: _References | None = None, pattern_spec: str = "") -> Cell:
    """Build, warm up and time one (row, seq) cell interleaved with its dense reference.

    Raises :class:`_ContextFault` (carrying the finished cell) when the CUDA context broke."""
    references = references or _References(cfg.mode)
    dense_name = DENSE_LAYER if kind == "layer" else DENSE_OP
    cell = Cell(name=name, kind=kind, seq=seq, batch=cfg.batch_for(seq), pattern=pattern_spec,
                family=registry.get(name).family if kind == "layer" else "op")

    def build(row: str) -> _Work:
        if kind == "layer":
            return _layer_work(row, cfg, seq, device, dtype)
        return _op_work(row, cfg, seq, device, dtype, pattern, dense_pattern)

    where, work, ref = "row", None, None
    started = time.perf_counter()
    try:
        reason = _op_unsupported(name, cfg, device) if kind == "op" else None
        if reason:
            raise _Unsupported(reason)
        work = build(name)
        cell.backend, cell.flops, cell.state_bytes = work.backend, work.flops, work.state_bytes
        cell.peak_memory_bytes = _warm_up(work.fn, device, cfg.warmup)
        if name != dense_name:
            where = f"its dense reference {dense_name}"
            try:
                ref = references.get(kind, seq, lambda: build(dense_name), device)
            except Exception as err:  # noqa: BLE001 - the row is still timed, alone
                if is_context_fault(err):
                    raise
                ref = None
                cell.message = f"dense reference {dense_name} failed ({_first_line(err)}); timed alone, no speedup"
                _release(device)
            where = "row"
        cell.setup_s = round(time.perf_counter() - started, 3)
        timed = _interleave(work.fn, ref.fn if ref else None, peak, device, burst=cfg.burst, min_rounds=cfg.repeat,
                            max_time=cfg.max_time)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # an asynchronous fault surfaces here, in the cell that caused it
        _summarise(cell, timed, is_reference=name == dense_name, ref_flops=ref.flops if ref else None,
                   peak_tflops=peak.best)
    except _Unsupported as err:
        cell.status, cell.message = "unsupported", str(err)
    except _Skipped as err:
        cell.status, cell.message = "skipped", str(err)
    except Exception as err:  # noqa: BLE001 - a cell's failure is reported, the run goes on
        cell.latency_ms = {}
        if is_context_fault(err):
            cell.status = "error"
            cell.message = f"CUDA context fault in {where}: {_first_line(err)}"
            raise _ContextFault(cell, where) from err
        if _is_oom(err):
            cell.status, cell.message = "oom", "out of memory" + (f" in {where}" if where != "row" else "")
        elif isinstance(err, ValueError):  # the project's errors for inputs a layer or op refuses (e.g. a shape)
            cell.status, cell.message = "unsupported", str(err).splitlines()[0][:300]
        else:
            cell.status, cell.message = "error", _first_line(err)
    finally:
        del work, ref
        cell.elapsed_s = round(time.perf_counter() - started, 3)
    _release(device)
    return cell


def _versions() -> dict:
    out = {"attnkit": __version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        out["triton"] = None
    return out


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _device_info(device: torch.device) -> dict:
    info = {"type": device.type, "cores": os.cpu_count(), "cpu_model": cpu_model(), "load_average": _load_average()}
    if device.type == "cuda":
        return {**info, "name": torch.cuda.get_device_name(device)}
    return {**info, "name": cpu_model() or platform.machine(), "torch_threads": torch.get_num_threads()}


def _positive_int(value, option: str, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        accepted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{option} must be {accepted}, got {value!r}")


def validate_config(cfg: BenchConfig) -> tuple[torch.device, torch.dtype]:
    """Check every field before anything runs; a ``ValueError`` names the option, the value and what is accepted."""
    for option, values in (("--seq", cfg.seqs), ("--mechanisms", cfg.mechanisms), ("--ops", cfg.ops)):
        repeated = sorted({str(v) for v in values if list(values).count(v) > 1})
        if repeated:
            raise ValueError(f"{option} names {', '.join(repeated)} more than once; each row and length is measured once")
    if cfg.mode not in MODES:
        raise ValueError(f"unknown --mode {cfg.mode!r}; accepted: {', '.join(MODES)}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {cfg.dtype!r}; accepted: {', '.join(DTYPES)}")
    device = parse_device(cfg.device)
    known = [c.name for c in registry.mechanisms()]
    for name in cfg.mechanisms:
        if name not in known:
            raise ValueError(f"unknown mechanism {name!r}; registered: {', '.join(known)}")
    for name in cfg.ops:
        if name not in OPS:
            raise ValueError(f"unknown op {name!r}; accepted: {', '.join(OPS)}")
    if not cfg.mechanisms and not cfg.ops:
        raise ValueError("nothing to measure: --mechanisms and --ops are both empty ('none'); name at least one row")
    if not cfg.seqs:
        raise ValueError("--seq is empty; accepted: comma-separated positive integers, e.g. 256,1024")
    for s in cfg.seqs:
        _positive_int(s, "--seq values")
    if cfg.batch is not None:
        _positive_int(cfg.batch, "--batch")
    _positive_int(cfg.tokens_per_batch, "tokens_per_batch")
    _positive_int(cfg.dim, "--dim")
    _positive_int(cfg.heads, "--heads")
    _positive_int(cfg.head_dim, "--head-dim")
    if cfg.dim % cfg.heads:
        raise ValueError(f"--dim {cfg.dim} must be divisible by --heads {cfg.heads}")
    if cfg.kv_heads is not None and (isinstance(cfg.kv_heads, bool) or not isinstance(cfg.kv_heads, int)
                                     or cfg.kv_heads < 1 or cfg.heads % cfg.kv_heads):
        raise ValueError(f"--kv-heads must be a positive divisor of --heads {cfg.heads}, got {cfg.kv_heads!r}")
    if cfg.kv_heads is not None and not cfg.ops:  # layers take their own head layout: it would be recorded, unused
        raise ValueError(f"--kv-heads {cfg.kv_heads} shapes the op rows, and none is measured (--ops none); "
                         "accepted: add op rows, or leave --kv-heads out")
    if cfg.timing not in TIMINGS:
        raise ValueError(f"unknown --timing {cfg.timing!r}; accepted: {', '.join(TIMINGS)}")
    _positive_int(cfg.repeat, "--repeat")
    if cfg.repeat > MAX_SAMPLES:
        raise ValueError(f"--repeat must be at most {MAX_SAMPLES} (the most rounds a cell takes), got {cfg.repeat}")
    _positive_int(cfg.warmup, "--warmup", minimum=0)
    if cfg.threads is not None:
        _positive_int(cfg.threads, "--threads")
        cores = os.cpu_count() or 1
        if cfg.threads > cores:
            # more threads than cores only adds contention: the timings would measure the scheduler
            raise ValueError(f"--threads {cfg.threads} is more than this machine's {cores} CPU cores; accepted: 1..{cores}")
    if isinstance(cfg.max_time, bool) or not isinstance(cfg.max_time, (int, float)) or not 0 < cfg.max_time < math.inf:
        raise ValueError(f"--max-time must be a positive number of seconds, got {cfg.max_time!r}")
    specs = cfg.patterns
    if any(not p for p in specs):
        raise ValueError(f"--pattern {cfg.pattern!r} has an empty item; accepted: comma-separated patterns, "
                         "e.g. window:1024,sink:4:1024")
    repeated = sorted({p for p in specs if specs.count(p) > 1})
    if repeated:
        raise ValueError(f"--pattern names {', '.join(repeated)} more than once; each pattern is measured once")
    kinds = {parse_pattern(p, cfg.heads).kind for p in specs}
    if "full" in kinds and len(specs) > 1:
        raise ValueError(f"--pattern {cfg.pattern!r} mixes 'full' with other patterns; the dense rows are either "
                         "full or causal: run 'full' on its own")
    # a pattern no row computes would still be recorded (config, plot title, results README) as if measured
    touched = [o for o in cfg.ops if o in PATTERNED_OPS or ("full" in kinds and o not in LINEAR_OPS)]
    if specs != ["causal"] and not touched:
        raise ValueError(f"--pattern {cfg.pattern!r} applies to the op rows {', '.join(PATTERNED_OPS)} ('full' also to "
                         f"the dense ones), and none is measured (--ops {','.join(cfg.ops) or 'none'}); accepted: "
                         "add one of them to --ops, or leave --pattern out")
    return device, DTYPES[cfg.dtype]


def rows(cfg: BenchConfig) -> list[tuple[str, str, str]]:
    """(kind, name, pattern spec) of every row, in the order of a run: a patterned op row once
    per pattern (its spec), every other row once (spec "")."""
    out = [("layer", n, "") for n in cfg.mechanisms]
    for n in cfg.ops:
        out += [("op", n, p) for p in cfg.patterns] if n in PATTERNED_OPS else [("op", n, "")]
    return out


def run_bench(cfg: BenchConfig, *, progress: Callable[[str], None] | None = None, command: str | None = None,
              on_start: Callable[[dict], None] | None = None, on_cell: Callable[[dict], None] | None = None,
              suite: str | None = None) -> dict:
    """Run every (row, seq) cell; returns the JSON-ready result dict.

    ``on_start(header)`` gets the result without cells before the first cell, ``on_cell(cell)``
    each cell as it finishes (so that a caller can stream them to disk). A CUDA context fault
    stops the run: the result then has ``complete: false`` and ``stopped`` naming the cell; so
    does Ctrl-C. ``suite`` (the ``--suite`` preset the configuration came from) is recorded."""
    device, dtype = validate_config(cfg)
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    from ..ops.softmax.flex import small_flex_backward_tiles

    try:
        if cfg.small_flex_tiles:
            with small_flex_backward_tiles():
                return _run_bench(cfg, device, dtype, progress, command, on_start, on_cell, suite)
        return _run_bench(cfg, device, dtype, progress, command, on_start, on_cell, suite)
    finally:
        torch.set_num_threads(threads)


def _run_bench(cfg, device, dtype, progress, command, on_start, on_cell, suite) -> dict:
    if device.type == "cpu":
        _fixed_mmap_threshold()
    patterns = {spec: parse_pattern(spec, cfg.heads) for spec in cfg.patterns}
    full = any(p.kind == "full" for p in patterns.values())  # validate_config: then it is the only one
    dense_pattern = _patterns.full() if full else _patterns.causal()
    peak = _Peak(device, dtype)
    result = {
        "schema": SCHEMA,
        "command": command or " ".join(["attnkit", *sys.argv[1:]]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "complete": False,
        "stopped": None,
        "git_commit": git_commit(),
        "code_hash": code_hash(),
        "device": _device_info(device),
        "versions": _versions(),
        # the pattern as the cells name it (canonical spelling), not as typed: " window:016" was recorded verbatim
        "config": {**asdict(cfg), "pattern": ",".join(cfg.patterns),
                   "batch": cfg.batch if cfg.batch is not None else f"{cfg.tokens_per_batch}/seq"},
        "timer": {"stop_spread": STOP_SPREAD, "noise_limit": NOISE_LIMIT, "max_samples": MAX_SAMPLES,
                  "slow_rounds": SLOW_ROUNDS, "slow_budget_s": SLOW_BUDGET * cfg.max_time},
        "peak": peak.describe(),
        "suite": suite,
    }
    if on_start:
        on_start(dict(result))
    # the collections between cells (so that memory follows tensor lifetimes) then only walk
    # the objects made during the run, not the whole of torch's: 5 ms instead of 300
    gc.collect()
    gc.freeze()
    try:
        return _run_cells(cfg, result, device, dtype, peak, patterns, dense_pattern, progress, on_cell)
    finally:
        gc.unfreeze()


def _run_cells(cfg, result, device, dtype, peak, patterns, dense_pattern, progress, on_cell) -> dict:
    cells: list[Cell] = []
    references = _References(cfg.mode)
    dense_flex: dict[int, Cell] = {}
    stopped = None
    label = ""
    try:
        for seq in cfg.seqs:
            for kind, name, spec in rows(cfg):
                row = row_label(name, spec)
                label = f"{row} @ {seq} ({kind})"
                if progress:
                    progress(f"{row} @ {seq}")
                try:
                    cell = _run_cell(kind, name, cfg, seq, device, dtype, peak, patterns.get(spec, dense_pattern),
                                     dense_pattern, references, pattern_spec=spec)
                except _ContextFault as fault:
                    cell = fault.cell
                    stopped = {"cell": cell.label, "kind": kind, "name": name, "seq": seq, "message": cell.message}
                if kind == "op" and name == "dense-flex" and cell.status == "ok":
                    dense_flex[seq] = cell
                _vs_flex(cell, dense_flex.get(seq))
                cells.append(cell)
                if on_cell:
                    on_cell(asdict(cell))
                if stopped:
                    break
            if stopped:
                break
    except KeyboardInterrupt:
        stopped = {"cell": label, "kind": None, "name": None, "seq": None, "message": "interrupted (Ctrl-C)"}
    for cell in cells:  # dense-flex rows listed after the patterned ones
        if cell.speedup_vs_dense_flex is None:
            _vs_flex(cell, dense_flex.get(cell.seq))
    for cell in cells:  # the run's best matmul, now that every cell's samples are in
        _set_peak(cell, peak.best)
    result["peak"] = peak.describe()
    result["device"]["load_average_end"] = _load_average()
    result.update(complete=stopped is None, stopped=stopped, cells=[asdict(c) for c in cells])
    return result


def count_cells(cfg: BenchConfig) -> int:
    return len(cfg.seqs) * len(rows(cfg))


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
