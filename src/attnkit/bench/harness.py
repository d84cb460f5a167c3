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
  (:func:`attnkit.ops.lightning.lightning_attend`, causal linear attention with ALiBi-slope
  decay; Triton on CUDA), ``fla-lightning`` (flash-linear-attention's ``chunk_lightning_attn``
  on its own ``[B, T, H, D]`` layout, when ``fla`` is installed), ``attend`` (``attnkit.attend``,
  auto dispatch, ``--pattern``) and ``reference`` (where it fits in memory); dense
  reference = ``dense-sdpa``.

Per (row, seq) cell: median and spread of latency after warm-up (CUDA events on GPU),
peak memory (CUDA allocator on GPU; process RSS sampled by a thread on CPU), FLOPs,
TFLOP/s, % of the matmul peak measured in the same run, speedup over the dense
reference, the FLOP reduction against it and the realised fraction
``speedup / flop_reduction``. Decode mode: per-token latency after a prefill of ``seq``
tokens and the bytes of the decode state.

JSON schema (``"schema": "attnkit.bench/1"``)::

    {schema, command, created, device: {type, name, cores}, versions: {attnkit, torch, python, triton},
     config: {mechanisms, ops, seqs, batch, dim, heads, head_dim, dtype, device, mode, pattern, repeat, warmup,
             timing (latency: one call per sample | throughput: the mean of a burst of 10 queued calls), ...},
     matmul_tflops,
     cells: [{name, kind: "layer"|"op", seq, batch, status: "ok"|"oom"|"unsupported"|"skipped"|"error",
              message, backend, latency_ms: {median, p10, p90, min, max, samples},
              peak_memory_bytes, flops, tflops, pct_matmul_peak,
              speedup_vs_dense, flop_reduction, realised_fraction,
              speedup_vs_dense_flex, realised_fraction_vs_flex, state_bytes}]}
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
from .. import patterns as _patterns
from ..ops import attend, attend_reference, block_mask_for
from ..ops.attention import _flex_impl, flex_small_blocks, flex_tiles

__all__ = ["BenchConfig", "run_bench", "parse_pattern", "OPS", "default_config", "SCHEMA"]

SCHEMA = "attnkit.bench/1"
OPS = ("dense-sdpa", "dense-sdpa-cudnn", "dense-sdpa-flash", "dense-sdpa-efficient", "dense-flex", "flex", "attend",
       "sigmoid", "lightning", "fla-lightning", "reference")
LINEAR_OPS = ("lightning", "fla-lightning")  # causal linear attention; FLOPs of the chunked form, not the pattern's
MODES = ("fwd", "fwdbwd", "decode")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
REFERENCE_MEMORY_FRACTION = 0.25


TIMINGS = ("latency", "throughput")
#: calls queued back to back per sample with ``timing="throughput"`` (the sample is their mean)
THROUGHPUT_BURST = 10


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
    pattern: str = "causal"
    repeat: int = 5
    warmup: int = 2
    tokens_per_batch: int = 32768
    compile: bool = False
    kv_heads: int | None = None  # op rows: key/value heads (GQA-shaped core); None = heads
    timing: str = "latency"  # latency: one call per sample; throughput: a burst of THROUGHPUT_BURST calls per sample

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
                    dtype="bfloat16", repeat=20, warmup=5)
    return dict(seqs=[256, 512, 1024, 2048], batch=1, dim=512, heads=8, head_dim=64, dtype="float32",
                repeat=5, warmup=2)


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
            raise
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
        gc.collect()
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


def _time_calls(fn: Callable[[], None], device: torch.device, repeat: int, warmup: int, burst: int = 1) -> list[float]:
    """``repeat`` samples in ms per call. Each sample times ``burst`` calls queued back to back
    (divided by ``burst``): 1 gives each call's latency, host launch gaps included; more gives
    throughput, where the host queues the next call while the GPU runs the previous one."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(burst):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / burst)
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            for _ in range(burst):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / burst)
    return times


def _fixed_mmap_threshold() -> None:
    """Make glibc return large blocks to the OS at once, so that RSS follows tensor lifetimes.

    glibc raises its mmap threshold after large frees and keeps later blocks on the heap,
    which would hide a cell's allocations behind the previous cell's. Fixing the threshold
    (128 KiB) turns that off; a no-op where glibc is absent.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_MMAP_THRESHOLD = -3
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):
        pass


def _measure(fn, device, repeat, warmup, burst: int = 1) -> tuple[list[float], int]:
    """Latencies (ms) and peak memory (bytes above what was allocated before) of ``fn``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        times = _time_calls(fn, device, repeat, warmup, burst)
        peak = torch.cuda.max_memory_allocated(device) - base
        return times, peak
    times = _time_calls(fn, device, repeat, warmup, burst)
    # memory in one extra call, so that the sampling thread does not disturb the timings
    with _RssSampler() as sampler:
        fn()
    return times, sampler.used


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Peak matmul throughput on this device and dtype, measured now (the % of peak denominator)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = _time_calls(lambda: torch.mm(a, b), device, repeat=10 if device.type == "cuda" else 5, warmup=3)
    return 2 * n**3 / (statistics.median(times) * 1e-3) / 1e12


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


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
    if gqa and name in ("sigmoid", *LINEAR_OPS):
        raise _Unsupported(f"the {name} op row takes as many key/value heads as query heads (no --kv-heads)")
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
        from ..ops.attention import choose_backend

        backend = choose_backend(q, k, v, pattern, None, False, 0)
        return (lambda: attend(q, k, v, pattern=pattern)), backend
    if name == "sigmoid":
        from ..ops import sigmoid_attend

        from ..ops.attention import choose_backend

        from ..ops.sigmoid import choose_sigmoid_backend

        backend = choose_sigmoid_backend(q, v, pattern)
        if backend != "triton":  # the log-sigmoid path runs on whatever attend picks
            backend = choose_backend(q, k, v, pattern, "score_mod", True, 0) + " (log-sigmoid)"
        return (lambda: sigmoid_attend(q, k, v, pattern=pattern, bias=-math.log(q.shape[2]))), backend
    if name == "lightning":
        from ..ops.lightning import alibi_slopes, lightning_attend

        slopes = torch.tensor(alibi_slopes(q.shape[1]), device=q.device)
        backend = "triton" if q.is_cuda else "chunked"
        return (lambda: lightning_attend(q, k, v, slopes, backend=backend)[0]), backend
    if name == "fla-lightning":
        try:
            from fla.ops.lightning_attn import chunk_lightning_attn
        except ImportError as err:
            raise _Unsupported("flash-linear-attention (fla) is not installed: pip install fla-core") from err
        if not q.is_cuda:
            raise _Unsupported("fla's kernels run on CUDA only")
        qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_(t.requires_grad) for t in (q, k, v))
        def run_fla():
            for t in (qt, kt, vt):
                t.grad = None
            return chunk_lightning_attn(qt, kt, vt, layer_idx=0, num_layers=1)[0]

        return run_fla, "fla chunk (B, T, H, D)"
    if name == "reference":
        return (lambda: attend_reference(q, k, v, pattern=pattern)), "reference"
    raise ValueError(f"unknown op {name!r}; accepted: {', '.join(OPS)}")


class _Unsupported(Exception):
    """An op that cannot run here (missing optional package, wrong device): reported, not failed."""


def _with_backward(fn: Callable, leaves: list[torch.Tensor]) -> Callable:
    def run():
        for t in leaves:
            t.grad = None
        out = fn()
        out.backward(torch.ones_like(out))

    return run


@dataclass
class Cell:
    name: str
    kind: str
    seq: int
    batch: int
    status: str = "ok"
    message: str = ""
    backend: str = ""
    latency_ms: dict = field(default_factory=dict)
    peak_memory_bytes: int | None = None
    flops: float | None = None
    tflops: float | None = None
    pct_matmul_peak: float | None = None
    speedup_vs_dense: float | None = None
    flop_reduction: float | None = None
    realised_fraction: float | None = None
    speedup_vs_dense_flex: float | None = None
    realised_fraction_vs_flex: float | None = None
    state_bytes: int | None = None


def _stats(times: list[float]) -> dict:
    ordered = sorted(times)

    def pct(p):
        return ordered[min(len(ordered) - 1, int(round(p * (len(ordered) - 1))))]

    return {"median": statistics.median(times), "p10": pct(0.1), "p90": pct(0.9), "min": ordered[0],
            "max": ordered[-1], "samples": len(times)}


def _run_op_cell(name, cfg, seq, device, dtype, pattern, dense_pattern) -> Cell:
    B = cfg.batch_for(seq)
    cell = Cell(name=name, kind="op", seq=seq, batch=B)
    if cfg.mode == "decode":
        cell.status, cell.message = "unsupported", "ops are measured in fwd / fwdbwd; decode measures layers"
        return cell
    row_pattern = dense_pattern if name.startswith("dense-") else pattern
    if name.startswith("dense-sdpa-") and device.type != "cuda":
        cell.status, cell.message = "unsupported", "SDPA backend choice is a CUDA feature"
        return cell
    if name in ("flex", "dense-flex") and device.type == "cpu" and cfg.mode == "fwdbwd":
        cell.status, cell.message = "unsupported", "FlexAttention has no backward on CPU"
        return cell
    H, D, Hkv = cfg.heads, cfg.head_dim, cfg.op_kv_heads
    if name == "reference":
        elem = 8 if dtype == torch.float64 else 4
        need = B * H * seq * seq * elem * (4 if cfg.mode == "fwdbwd" else 3)
        limit = _free_memory(device) * REFERENCE_MEMORY_FRACTION
        if need > limit:
            cell.status = "skipped"
            cell.message = f"reference needs ~{need / 2**30:.1f} GiB of scores (limit {limit / 2**30:.1f} GiB)"
            return cell
    if name in LINEAR_OPS:  # the chunked form: 4*64*D per token in its block + 4*D*D through the state
        flops = B * H * seq * (4.0 * 64 * D + 4.0 * D * D)
        row_pattern = dense_pattern
    else:
        flops = registry.dense_attention_flops(B, seq, num_heads=H, head_dim=D, pattern=row_pattern)
    cell.flops = registry.FlopCount(attention_fwd=flops, projection_fwd=0.0).total(cfg.mode)
    try:
        gen = torch.Generator(device=device).manual_seed(seq)
        q, k, v = (torch.randn(B, h, seq, D, device=device, dtype=dtype, generator=gen) for h in (H, Hkv, Hkv))
        if cfg.mode == "fwdbwd":
            for t in (q, k, v):
                t.requires_grad_(True)
        fn, cell.backend = _op_callable(name, q, k, v, row_pattern, dense_pattern)
        if cfg.mode == "fwdbwd":
            fn = _with_backward(fn, [q, k, v])
        else:
            fn = torch.no_grad()(fn)
        times, cell.peak_memory_bytes = _measure(fn, device, cfg.repeat, cfg.warmup, cfg.burst)
        cell.latency_ms = _stats(times)
    except _Unsupported as err:
        cell.status, cell.message = "unsupported", str(err)
    except Exception as err:  # noqa: BLE001 - a cell's failure is reported, the run goes on
        _fail(cell, err)
    return cell


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


def _fail(cell: Cell, err: BaseException) -> None:
    if _is_oom(err):
        cell.status, cell.message = "oom", "out of memory"
    else:
        cell.status, cell.message = "error", f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
    cell.latency_ms = {}
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run_layer_cell(name, cfg, seq, device, dtype) -> Cell:
    B = cfg.batch_for(seq)
    card = registry.get(name)
    cell = Cell(name=name, kind="layer", seq=seq, batch=B)
    options = {"head_dim": cfg.head_dim} if "head_dim" in _accepted(card) else {}
    try:
        layer = card.build(cfg.dim, cfg.heads, **options).to(device=device, dtype=dtype)
        gen = torch.Generator(device=device).manual_seed(seq)
        if cfg.mode == "decode":
            if not card.capabilities.decode:
                cell.status, cell.message = "unsupported", f"{name} does not decode"
                return cell
            layer.eval()
            state = layer.init_state(B, device=device, dtype=dtype)
            with torch.no_grad():
                prefill = torch.randn(B, seq, cfg.dim, device=device, dtype=dtype, generator=gen)
                layer(prefill, state)
                del prefill
                token = torch.randn(B, 1, cfg.dim, device=device, dtype=dtype, generator=gen)
                # each timed step appends one token; time and memory are per token at ~seq context
                times, cell.peak_memory_bytes = _measure(lambda: layer(token, state), device, cfg.repeat, cfg.warmup, cfg.burst)
            cell.state_bytes = state.nbytes()
            step = card.flop_count(B, 1, cfg.dim, cfg.heads, **options)
            attn_step = registry.dense_attention_flops(B, 1, num_heads=cfg.heads, head_dim=cfg.head_dim,
                                                       pattern=getattr(layer, "pattern", "causal"), kv_len=seq)
            cell.flops = step.projection_fwd + attn_step
        else:
            x = torch.randn(B, seq, cfg.dim, device=device, dtype=dtype, generator=gen)
            model = torch.compile(layer) if cfg.compile else layer
            if cfg.mode == "fwdbwd":
                x.requires_grad_(True)
                fn = _with_backward(lambda: model(x), [x, *layer.parameters()])
            else:
                fn = torch.no_grad()(lambda: model(x))
            times, cell.peak_memory_bytes = _measure(fn, device, cfg.repeat, cfg.warmup, cfg.burst)
            cell.flops = card.flop_count(B, seq, cfg.dim, cfg.heads, **options).total(cfg.mode)
            cell.backend = getattr(layer, "backend", "") or ""
        cell.latency_ms = _stats(times)
    except Exception as err:  # noqa: BLE001
        _fail(cell, err)
    return cell


def _accepted(card) -> set[str]:
    import inspect

    return set(inspect.signature(card.layer.__init__).parameters)


def _derive(cells: list[Cell], matmul_tflops: float) -> None:
    """Throughput and the comparisons against the dense reference of each kind."""
    dense = {("layer", c.seq): c for c in cells if c.kind == "layer" and c.name == "mha" and c.status == "ok"}
    dense.update({("op", c.seq): c for c in cells if c.kind == "op" and c.name == "dense-sdpa" and c.status == "ok"})
    dense_flex = {c.seq: c for c in cells if c.kind == "op" and c.name == "dense-flex" and c.status == "ok"}
    for c in cells:
        if c.status != "ok":
            continue
        ms = c.latency_ms["median"]
        if c.flops:
            c.tflops = c.flops / (ms * 1e-3) / 1e12
            c.pct_matmul_peak = 100.0 * c.tflops / matmul_tflops if matmul_tflops else None
        ref = dense.get((c.kind, c.seq))
        if ref is not None:
            c.speedup_vs_dense = ref.latency_ms["median"] / ms
            if c.flops and ref.flops:
                c.flop_reduction = ref.flops / c.flops
                c.realised_fraction = c.speedup_vs_dense / c.flop_reduction
        flex_ref = dense_flex.get(c.seq)
        if c.kind == "op" and flex_ref is not None and c.flops and flex_ref.flops:
            # the same comparison against dense causal FlexAttention (the patterned rows' own kernel)
            c.speedup_vs_dense_flex = flex_ref.latency_ms["median"] / ms
            c.realised_fraction_vs_flex = c.speedup_vs_dense_flex / (flex_ref.flops / c.flops)


def _versions() -> dict:
    out = {"attnkit": __version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        out["triton"] = None
    return out


def _device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "cores": os.cpu_count()}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}


def validate_config(cfg: BenchConfig) -> tuple[torch.device, torch.dtype]:
    if cfg.mode not in MODES:
        raise ValueError(f"unknown --mode {cfg.mode!r}; accepted: {', '.join(MODES)}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {cfg.dtype!r}; accepted: {', '.join(DTYPES)}")
    try:
        device = torch.device(cfg.device)
    except RuntimeError:
        raise ValueError(f"unknown --device {cfg.device!r}; accepted: cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but PyTorch sees no CUDA device here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported --device {cfg.device!r}; accepted: cpu, cuda, cuda:N")
    known = [c.name for c in registry.mechanisms()]
    for name in cfg.mechanisms:
        if name not in known:
            raise ValueError(f"unknown mechanism {name!r}; registered: {', '.join(known)}")
    for name in cfg.ops:
        if name not in OPS:
            raise ValueError(f"unknown op {name!r}; accepted: {', '.join(OPS)}")
    for s in cfg.seqs:
        if s <= 0:
            raise ValueError(f"--seq values must be positive, got {s}")
    if cfg.dim % cfg.heads:
        raise ValueError(f"--dim {cfg.dim} must be divisible by --heads {cfg.heads}")
    if cfg.kv_heads is not None and (cfg.kv_heads < 1 or cfg.heads % cfg.kv_heads):
        raise ValueError(f"--kv-heads must be a positive divisor of --heads {cfg.heads}, got {cfg.kv_heads}")
    if cfg.timing not in TIMINGS:
        raise ValueError(f"unknown --timing {cfg.timing!r}; accepted: {', '.join(TIMINGS)}")
    if cfg.repeat < 1 or cfg.warmup < 0:
        raise ValueError(f"--repeat must be >= 1 and warm-up >= 0, got {cfg.repeat}, {cfg.warmup}")
    parse_pattern(cfg.pattern, cfg.heads)
    return device, DTYPES[cfg.dtype]


def run_bench(cfg: BenchConfig, *, progress: Callable[[str], None] | None = None, command: str | None = None) -> dict:
    """Run every (row, seq) cell; returns the JSON-ready result dict."""
    device, dtype = validate_config(cfg)
    if device.type == "cpu":
        _fixed_mmap_threshold()
    pattern = parse_pattern(cfg.pattern, cfg.heads)
    dense_pattern = _patterns.full() if pattern.kind == "full" else _patterns.causal()
    matmul = measure_matmul_tflops(device, dtype)
    cells: list[Cell] = []
    for seq in cfg.seqs:
        for name in cfg.mechanisms:
            if progress:
                progress(f"{name} @ {seq}")
            cells.append(_run_layer_cell(name, cfg, seq, device, dtype))
        for name in cfg.ops:
            if progress:
                progress(f"{name} @ {seq}")
            cells.append(_run_op_cell(name, cfg, seq, device, dtype, pattern, dense_pattern))
    _derive(cells, matmul)
    return {
        "schema": SCHEMA,
        "command": command or " ".join(["attnkit", *sys.argv[1:]]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": _device_info(device),
        "versions": _versions(),
        "config": {**asdict(cfg), "batch": cfg.batch if cfg.batch is not None else f"{cfg.tokens_per_batch}/seq"},
        "matmul_tflops": matmul,
        "cells": [asdict(c) for c in cells],
    }


def count_cells(cfg: BenchConfig) -> int:
    return len(cfg.seqs) * (len(cfg.mechanisms) + len(cfg.ops))


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)

