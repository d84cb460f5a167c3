"""cuDNN's fused attention on a diagonal band: sliding window and sink + window, forward and backward.

PyTorch's SDPA reaches cuDNN's fused attention only for full and causal masks. The cuDNN
frontend's graph API (``pip install nvidia-cudnn-frontend``, the ``attnkit[cudnn]`` extra)
also takes a band around the diagonal, which is exactly the causal sliding window:

    out[b, h, i] = sum_{i - window < j <= i} softmax_j(scale * q[b,h,i] . k[b,g(h),j]) v[b,g(h),j]

with ``g(h) = h // (Hq // Hkv)``. StreamingLLM's ``sink_window(n, window)`` adds the first
``n`` keys to every row: the band runs through cuDNN and the sinks outside it are merged in by
log-sum-exp (:mod:`attnkit.ops.softmax.sink_merge_triton`, one pass over the rows each way; the backward
hands cuDNN the merged output and lse, the ring-attention identity).

Shapes: q ``[B, Hq, T, D]``, k and v ``[B, Hkv, T, D]`` (prefill and training: as many keys as
queries, the first query at position 0), any strides whose last one is 1; float16 or bfloat16;
D a multiple of 8, at most 128 (16, 32, 64 or 128 with sinks; at most 64 sinks).

Why: FlexAttention visits 9 key blocks per 128-row query block for a 1024-key window, and its
kernel runs at about 0.72 of cuDNN's rate on dense causal attention. On the H200 (training
step at 32k, bf16, 16 heads, D = 128) it realised 0.67 of the window's FLOP reduction over
dense FlexAttention and 0.47 of the sink + window's; this backend realises 0.93 and 0.81
(``benchmarks/results/h200/patterns-window-1024-fwdbwd.json`` and
``h200/patterns-sink-4-1024-fwdbwd.json``).

:func:`attnkit.attend` picks this backend (``backend="auto"``) for these patterns on CUDA when
:func:`supports` says yes, and runs it when asked (``backend="cudnn"``). One execution graph is
built per (shapes, strides, dtype, window, scale) and cached; the first call of a shape pays
its build (tens of milliseconds).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

from ...patterns import SinkWindow, SlidingWindow
from . import sink_merge_triton as _sinks

__all__ = ["available", "supports", "band_attention", "run", "why_unsupported", "clear_graph_cache"]

_FRONTEND = None  # the imported ``cudnn`` module, False when it cannot be imported
_MIN_CUDNN = 90200  # diagonal bands in both directions since cuDNN 9.2
_GRAPHS: "OrderedDict[tuple, tuple]" = OrderedDict()
_GRAPH_CACHE_SIZE = 128  # the picked-rows split (attnkit.ops.softmax.picked_causal) builds two per level
_HANDLES: dict = {}
_AVAILABLE: dict = {}


def _frontend():
    global _FRONTEND
    if _FRONTEND is None:
        try:
            import cudnn  # the cuDNN frontend's Python API (nvidia-cudnn-frontend)

            _FRONTEND = cudnn if hasattr(cudnn, "pygraph") else False
        except Exception:  # not installed, or built for another CUDA: the backend is simply absent
            _FRONTEND = False
    return _FRONTEND or None


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def available(device=None) -> bool:
    """Whether the band backend can run here: CUDA, compute capability >= 8.0, cuDNN >= 9.2, the frontend."""
    return _available_on(torch.device(device).index if device is not None else None)


@torch.compiler.assume_constant_result
def _available_on(index: int | None) -> bool:
    # a constant to torch.compile: the first call may come inside a compiled graph (a layer
    # compiled with fullgraph=True in a fresh process), where torch.backends.cudnn.version(),
    # a torch function returning an int, is a graph break (found by the CUDA suite on the H200)
    if not _cuda_available() or _frontend() is None:
        return False
    if index is None:
        index = torch.cuda.current_device()
    if index not in _AVAILABLE:
        _AVAILABLE[index] = (torch.cuda.get_device_capability(index) >= (8, 0)
                             and (torch.backends.cudnn.version() or 0) >= _MIN_CUDNN)
    return _AVAILABLE[index]


def why_unsupported(q: Tensor, k: Tensor, v: Tensor, pattern, score_mod, return_lse: bool, q_offset: int) -> str | None:
    """``None`` when the band backend serves these inputs, else the reason (for error messages)."""
    if type(pattern) not in (SlidingWindow, SinkWindow):
        return f"it serves the sliding_window and sink_window patterns only, got {pattern!r}"
    if type(pattern) is SinkWindow and not (_sinks.available() and pattern.sink_tokens <= _sinks.MAX_SINKS):
        return f"its sink merge needs triton and at most {_sinks.MAX_SINKS} sink tokens, got {pattern.sink_tokens}"
    if score_mod is not None or return_lse:
        return "it takes no score_mod and returns no log-sum-exp"
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return "it needs the head dim contiguous (stride 1) in q, k and v"
    # (under torch.compile the offsets are not traceable: the ops copy such inputs instead, _readable)
    if not torch.compiler.is_compiling() and not all(_is_readable(t) for t in (q, k, v)):
        return "it needs q, k and v 16-byte aligned (offsets and strides multiples of 8 elements)"
    if q.device.type != "cuda":
        return f"it runs on CUDA only, got {q.device}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"it takes float16 or bfloat16, got {q.dtype}"
    T, S, D = q.shape[2], k.shape[2], q.shape[3]
    if T != S or q_offset != 0:
        return f"it serves prefill and training (T == S, q_offset 0), got T={T}, S={S}, q_offset={q_offset}"
    if v.shape[3] != D or D % 8 != 0 or D > 128:
        return f"it takes one head dim D for q, k and v, a multiple of 8 and at most 128; got D={D}, Dv={v.shape[3]}"
    if type(pattern) is SinkWindow and D not in (16, 32, 64, 128):
        return f"its sink merge takes head dims 16, 32, 64 or 128, got D={D}"
    if not available(q.device):
        return ("the cuDNN frontend is not usable here (pip install nvidia-cudnn-frontend; "
                f"needs compute capability >= 8.0 and cuDNN >= 9.2, found {torch.backends.cudnn.version()})")
    return None


def _is_readable(t: Tensor) -> bool:
    """cuDNN reads 16-byte aligned rows: the offset and every stride a multiple of 8 elements."""
    return t.storage_offset() % 8 == 0 and all(st % 8 == 0 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)


def _readable(t: Tensor) -> Tensor:
    """``t`` itself, or a fresh (aligned) copy when cuDNN could not read it."""
    return t if _is_readable(t) else t.clone(memory_format=torch.contiguous_format)


def supports(q: Tensor, k: Tensor, v: Tensor, pattern, score_mod=None, return_lse: bool = False, q_offset: int = 0) -> bool:
    return why_unsupported(q, k, v, pattern, score_mod, return_lse, q_offset) is None


def clear_graph_cache() -> None:
    _GRAPHS.clear()


def _handle(device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _HANDLES:
        with torch.cuda.device(index):
            _HANDLES[index] = [_frontend().create_handle(), None]
    entry = _HANDLES[index]
    stream = torch.cuda.current_stream(index).cuda_stream
    if entry[1] != stream:  # set once per stream, not on every call
        _frontend().set_stream(handle=entry[0], stream=stream)
        entry[1] = stream
    return entry[0]


def _data_type(dtype: torch.dtype):
    fe = _frontend()
    return {torch.float16: fe.data_type.HALF, torch.bfloat16: fe.data_type.BFLOAT16}[dtype]


def _layout(t: Tensor) -> tuple:
    return tuple(t.shape), tuple(t.stride())


def _graph_tensor(graph, name: str, t: Tensor, data_type):
    return graph.tensor(name=name, dim=list(t.shape), stride=list(t.stride()), data_type=data_type)


def _mask_options(fe, mask: tuple) -> dict:
    """Graph options for ``("band", window)``, ``("causal",)`` or ``("full",)`` (no mask)."""
    if mask[0] == "full":
        return {}
    # TOP_LEFT alignment with T == S: key j is inside the band of query i iff i - window < j <= i
    options = {"diagonal_alignment": fe.diagonal_alignment.TOP_LEFT, "diagonal_band_right_bound": 0}
    if mask[0] == "band":
        options["diagonal_band_left_bound"] = mask[1]
    return options


def _finish(graph, fe) -> int:
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([fe.heur_mode.A, fe.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    return graph.get_workspace_size()


def _cached(key, build):
    hit = _GRAPHS.get(key)
    if hit is None:
        hit = build()
        _GRAPHS[key] = hit
        while len(_GRAPHS) > _GRAPH_CACHE_SIZE:
            _GRAPHS.popitem(last=False)
    else:
        _GRAPHS.move_to_end(key)
    return hit


def _execute(graph, workspace_size: int, pack: dict, device: torch.device) -> None:
    # a fresh workspace per call: the caching allocator makes it cheap, and it stays valid
    # whatever stream the graph runs on
    workspace = torch.empty(max(workspace_size, 1), dtype=torch.uint8, device=device)
    graph.execute(pack, workspace, handle=_handle(device))


def sdpa_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: tuple, out: Tensor | None = None,
                 stats: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """cuDNN's fused attention forward, ``(out, stats)``; ``stats`` is the rows' log-sum-exp
    ``[B, H, T, 1]`` float32. ``mask``: ``("band", window)``, ``("causal",)`` (top-left) or
    ``("full",)``. Writes into ``out`` and ``stats`` when given (any strides cuDNN reads).
    No checks: callers validate (:func:`why_unsupported`)."""
    fe = _frontend()
    B, H, T, _ = q.shape
    if out is None:
        out = torch.empty_like(q)  # q's strides: a [B, T, H, D] projection stays free to reshape back
    if stats is None:
        stats = torch.empty(B, H, T, 1, dtype=torch.float32, device=q.device)
    key = ("fwd", q.dtype, q.device, mask, scale, _layout(q), _layout(k), _layout(v), _layout(out), _layout(stats))

    def build():
        dt = _data_type(q.dtype)
        g = fe.pygraph(io_data_type=dt, intermediate_data_type=fe.data_type.FLOAT,
                       compute_data_type=fe.data_type.FLOAT, handle=_handle(q.device))
        tq, tk, tv = (_graph_tensor(g, n, t, dt) for n, t in (("q", q), ("k", k), ("v", v)))
        to, tstats = g.sdpa(name="sdpa", q=tq, k=tk, v=tv, generate_stats=True, attn_scale=scale,
                            **_mask_options(fe, mask))
        to.set_output(True).set_dim(list(out.shape)).set_stride(list(out.stride())).set_data_type(dt)
        tstats.set_output(True).set_dim(list(stats.shape)).set_stride(list(stats.stride()))
        tstats.set_data_type(fe.data_type.FLOAT)
        return g, _finish(g, fe), (tq, tk, tv, to, tstats)

    g, workspace, (tq, tk, tv, to, tstats) = _cached(key, build)
    _execute(g, workspace, {tq: q, tk: k, tv: v, to: out, tstats: stats}, q.device)
    return out, stats


def sdpa_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, grad_out: Tensor, stats: Tensor, scale: float,
                  mask: tuple, dq: Tensor | None = None, dk: Tensor | None = None,
                  dv: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """cuDNN's fused attention backward given ``out`` and ``stats`` (which may be a merged
    output and log-sum-exp: the keys' exact share of the gradients, the ring-attention
    identity); writes into ``dq, dk, dv`` when given. No checks: callers validate."""
    fe = _frontend()
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    key = ("bwd", q.dtype, q.device, mask, scale, _layout(q), _layout(k), _layout(v), _layout(out),
           _layout(grad_out), _layout(stats), _layout(dq), _layout(dk), _layout(dv))

    def build():
        dt = _data_type(q.dtype)
        g = fe.pygraph(io_data_type=dt, intermediate_data_type=fe.data_type.FLOAT,
                       compute_data_type=fe.data_type.FLOAT, handle=_handle(q.device))
        named = (("q", q), ("k", k), ("v", v), ("o", out), ("do", grad_out))
        tq, tk, tv, to, tdo = (_graph_tensor(g, n, t, dt) for n, t in named)
        tstats = _graph_tensor(g, "stats", stats, fe.data_type.FLOAT)
        tdq, tdk, tdv = g.sdpa_backward(name="sdpa_backward", q=tq, k=tk, v=tv, o=to, dO=tdo, stats=tstats,
                                        attn_scale=scale, **_mask_options(fe, mask))
        for t, like in ((tdq, dq), (tdk, dk), (tdv, dv)):
            t.set_output(True).set_dim(list(like.shape)).set_stride(list(like.stride())).set_data_type(dt)
        return g, _finish(g, fe), (tq, tk, tv, to, tdo, tstats, tdq, tdk, tdv)

    g, workspace, tensors = _cached(key, build)
    values = (q, k, v, out, grad_out, stats, dq, dk, dv)
    _execute(g, workspace, dict(zip(tensors, values)), q.device)
    return dq, dk, dv


def _forward(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float) -> tuple[Tensor, Tensor]:
    q, k, v = (_readable(t) for t in (q, k, v))
    return sdpa_forward(q, k, v, scale, ("band", window))


def _backward(q, k, v, out, grad_out, stats, window: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v, out, grad_out = (_readable(t) for t in (q, k, v, out, grad_out))
    return sdpa_backward(q, k, v, out, grad_out, stats, scale, ("band", window))


@torch.library.custom_op("attnkit::cudnn_band_fwd", mutates_args=())
def _band_fwd(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float) -> tuple[Tensor, Tensor]:
    return _forward(q, k, v, window, scale)


@_band_fwd.register_fake
def _band_fwd_fake(q, k, v, window, scale):
    B, H, T, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, T, 1), dtype=torch.float32)


@torch.library.custom_op("attnkit::cudnn_band_bwd", mutates_args=())
def _band_bwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, grad_out: Tensor, stats: Tensor, window: int,
              scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(q, k, v, out, grad_out, stats, window, scale)


@_band_bwd.register_fake
def _band_bwd_fake(q, k, v, out, grad_out, stats, window, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, window, scale = inputs
    out, stats = output
    ctx.save_for_backward(q, k, v, out, stats)
    ctx.window, ctx.scale = window, scale


def _laid_out_like(grad_out: Tensor, out: Tensor) -> Tensor:
    """dO in the output's layout (one backward graph per layout, and dO usually has it already)."""
    return grad_out if grad_out.stride() == out.stride() else torch.empty_like(out).copy_(grad_out)


def _grad(ctx, grad_out, _grad_stats):
    q, k, v, out, stats = ctx.saved_tensors
    dq, dk, dv = _band_bwd(q, k, v, out, _laid_out_like(grad_out, out), stats, ctx.window, ctx.scale)
    return dq, dk, dv, None, None


_band_fwd.register_autograd(_grad, setup_context=_setup_context)


@torch.library.custom_op("attnkit::cudnn_sink_band_fwd", mutates_args=())
def _sink_band_fwd(q: Tensor, k: Tensor, v: Tensor, sinks: int, window: int, scale: float) -> tuple[Tensor, Tensor]:
    o_band, lse_band = _forward(q, k, v, window, scale)
    return _sinks.sink_merge_forward(q, k[:, :, :sinks], v[:, :, :sinks], o_band, lse_band, window, scale)


@_sink_band_fwd.register_fake
def _sink_band_fwd_fake(q, k, v, sinks, window, scale):
    return _band_fwd_fake(q, k, v, window, scale)


@torch.library.custom_op("attnkit::cudnn_sink_band_bwd", mutates_args=())
def _sink_band_bwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, grad_out: Tensor, lse: Tensor, sinks: int,
                   window: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    # the band's backward handed the merged output and lse returns the band keys' exact share
    dq, dk, dv = _backward(q, k, v, out, grad_out, lse, window, scale)
    dk_sink, dv_sink = _sinks.sink_merge_backward(q, k[:, :, :sinks], v[:, :, :sinks], out, grad_out, lse, dq,
                                                  window, scale)
    dk[:, :, :sinks] += dk_sink
    dv[:, :, :sinks] += dv_sink
    return dq, dk, dv


@_sink_band_bwd.register_fake
def _sink_band_bwd_fake(q, k, v, out, grad_out, lse, sinks, window, scale):
    return _band_bwd_fake(q, k, v, out, grad_out, lse, window, scale)


def _sink_setup_context(ctx, inputs, output):
    q, k, v, sinks, window, scale = inputs
    _setup_context(ctx, (q, k, v, window, scale), output)
    ctx.sinks = sinks


def _sink_grad(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _sink_band_bwd(q, k, v, out, _laid_out_like(grad_out, out), lse, ctx.sinks, ctx.window, ctx.scale)
    return dq, dk, dv, None, None, None


_sink_band_fwd.register_autograd(_sink_grad, setup_context=_sink_setup_context)


def band_attention(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float | None = None,
                   sink_tokens: int = 0) -> Tensor:
    """Causal sliding-window attention through cuDNN, plus ``sink_tokens`` first keys every
    query also sees (StreamingLLM's sink + window). See the module docstring for shapes.

    Raises ``ValueError`` when cuDNN cannot serve the inputs; :func:`attnkit.attend` with
    ``backend="auto"`` falls back to FlexAttention instead.
    """
    pattern = SinkWindow(sink_tokens, window) if sink_tokens else SlidingWindow(window)
    reason = why_unsupported(q, k, v, pattern, None, False, 0)
    if reason is not None:
        raise ValueError(f"the cuDNN band backend cannot serve these inputs: {reason}")
    return run(q, k, v, window, scale, sink_tokens)


def run(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float | None, sink_tokens: int) -> Tensor:
    """:func:`band_attention` on inputs :func:`why_unsupported` already accepted."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if sink_tokens:
        return _sink_band_fwd(q, k, v, int(sink_tokens), int(window), float(scale))[0]
    return _band_fwd(q, k, v, int(window), float(scale))[0]
