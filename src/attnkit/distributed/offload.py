"""Attention offloading (Lamina: "Efficient and Economic Large Language Model Inference with
Attention Offloading", Chen et al., arXiv 2405.01814): in decoding, the KV cache and the attention
over it live on a memory-rich *attention worker*, while the projections and MLPs stay on the
compute device. Each layer of each decode step the compute rank sends the new ``q [B, H, T, D]``
and ``k, v [B, Hkv, T, D]``; the worker appends ``k, v`` to the cache of that (layer, sequence
slot), attends, and returns ``out [B, H, T, D]``. The device then holds weights only, so the decode
batch is bounded by the workers' memory rather than by the device's.

Protocol (point-to-point ``dist.send`` / ``recv``, gloo or NCCL): a header of ``HEADER`` int64s
``[op, layer, slot, B, H, Hkv, T, D, dtype]``, then for ``ATTEND`` one tensor, ``q, k, v`` of the
shapes it names flattened and concatenated, answered by ``out``. ``OPEN`` starts an empty cache for ``(layer, slot)``, ``FREE``
drops one, ``STOP`` ends :func:`serve` (which returns its counts). Every shape is checked on the
compute rank before anything is sent, so a mistake is a ``ValueError`` there, not a hang.

Overlap: :meth:`OffloadedAttention.submit` posts the request without waiting and
:meth:`OffloadedAttention.finish` waits for the answer, so :func:`pingpong_step` can run micro-batch
B's projections while the worker attends for micro-batch A (Lamina's rotational pipelining, two
stages here). :func:`offload_plan` is the memory / time model.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..layers.multi_head import MultiHeadAttention
from ..ops import attend
from ..state import State

__all__ = ["AttentionClient", "OffloadedAttention", "RemoteKVState", "offload", "offload_plan", "pingpong_step", "serve"]

STOP, OPEN, ATTEND, FREE = 0, 1, 2, 3
HEADER = 9
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _rank_arg(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer rank, got {value!r}")
    return value


class AttentionClient:
    """The compute rank's end of the protocol: talks to the attention worker ``server_rank``
    (a global rank) of ``group`` (default: the default group). Counts what it sends and
    receives (``sent_bytes``, ``received_bytes``)."""

    def __init__(self, server_rank: int, group=None) -> None:
        self.server_rank = _rank_arg(server_rank, "server_rank")
        if dist.is_initialized():
            world = dist.get_world_size()  # ranks are global ones, also with a group
            if server_rank >= world:
                raise ValueError(f"server_rank={server_rank} is not a rank of this job (world size {world})")
            if server_rank == dist.get_rank():
                raise ValueError(f"server_rank={server_rank} is this process; the attention worker must be another rank")
        self.group = group
        self.sent_bytes = 0
        self.received_bytes = 0
        self._next_slot = 0
        self.stopped = False
        #: ``("submit" | "wait", layer, slot)`` in the order they happened (how the tests see the ping-pong)
        self.events: list[tuple[str, int, int]] = []

    def _header(self, op, layer=0, slot=0, B=0, H=0, Hkv=0, T=0, D=0, dtype=torch.float32) -> Tensor:
        return torch.tensor([op, layer, slot, B, H, Hkv, T, D, _DTYPES.index(dtype)], dtype=torch.int64)

    def _check_live(self) -> None:
        if self.stopped:
            raise ValueError("this AttentionClient has sent stop(); the attention worker no longer serves it")

    def _send(self, tensors, wait: bool = True) -> list:
        works = []
        for t in tensors:
            t = t.contiguous()
            self.sent_bytes += t.numel() * t.element_size()
            if wait:
                dist.send(t, self.server_rank, group=self.group)
            else:
                works.append((dist.isend(t, self.server_rank, group=self.group), t))
        return works

    def new_slot(self) -> int:
        slot, self._next_slot = self._next_slot, self._next_slot + 1
        return slot

    def open(self, layer: int, slot: int) -> None:
        """An empty cache for ``(layer, slot)`` on the worker (replacing one that was there)."""
        self._check_live()
        self._send([self._header(OPEN, layer, slot)])

    def free(self, layer: int, slot: int) -> None:
        """Drop the worker's cache of ``(layer, slot)``."""
        self._check_live()
        self._send([self._header(FREE, layer, slot)])

    def release(self, state: list) -> None:
        """Drop the worker's caches of a finished model state (``model.init_state``'s list):
        a worker that serves many sequences frees each one's memory when it is done."""
        for s in state:
            if not isinstance(s, RemoteKVState):
                raise ValueError(f"release takes the RemoteKVStates of an offloaded model's state, got {type(s).__name__}")
        for s in state:
            self.free(s.layer, s.slot)

    def submit(self, layer: int, slot: int, q: Tensor, k: Tensor, v: Tensor):
        """Post one attention request without waiting; :meth:`wait` gives its ``out``."""
        self._check_live()
        B, H, T, D = q.shape
        header = self._header(ATTEND, layer, slot, B, H, k.shape[1], T, D, q.dtype)
        # one message for q, k, v: each message costs the worker a round of its transport
        works = self._send([header, torch.cat([q.flatten(), k.flatten(), v.flatten()])], wait=False)
        out = torch.empty(B, H, T, D, dtype=q.dtype, device=q.device)
        works.append((dist.irecv(out, self.server_rank, group=self.group), None))
        self.events.append(("submit", layer, slot))
        return works, out, layer, slot

    def wait(self, handle) -> Tensor:
        works, out, layer, slot = handle
        for work, _ in works:
            work.wait()
        self.events.append(("wait", layer, slot))
        self.received_bytes += out.numel() * out.element_size()
        return out

    def stop(self) -> None:
        """End the worker's :func:`serve` loop."""
        if not self.stopped:
            self._send([self._header(STOP)])
            self.stopped = True


def serve(client_rank: int = 0, group=None, *, backend: str = "reference", device=None, latency: float = 0.0) -> dict:
    """The attention worker's loop: hold one KV cache per ``(layer, slot)``, answer each
    ``ATTEND`` request (append ``k, v``; causal attention of the new queries over the whole
    cache, the queries being its newest tokens) until ``STOP``. Returns counts:
    ``requests``, ``peak_kv_bytes`` (largest total cache held), ``caches`` (held at the end).
    ``device``: where the caches live (default CPU; the device of an NCCL group's rank there).
    ``latency``: seconds added to each answer, to stand for a slower attention device or link
    (how the ping-pong's overlap shows on one machine). A header it cannot read (a client of
    another version) is a ``ValueError`` here."""
    _rank_arg(client_rank, "client_rank")
    if isinstance(latency, bool) or not isinstance(latency, (int, float)) or not 0 <= latency < math.inf:
        raise ValueError(f"latency must be a finite number of seconds >= 0, got {latency!r}")
    caches: dict[tuple[int, int], list[Tensor]] = {}
    requests = peak = held = 0  # held: bytes of all caches now, kept as they change

    def size(key) -> int:
        cache = caches.get(key)
        return 2 * cache[0].numel() * cache[0].element_size() if cache else 0
    header = torch.empty(HEADER, dtype=torch.int64)
    while True:
        dist.recv(header, client_rank, group=group)
        op, layer, slot, B, H, Hkv, T, D, code = header.tolist()
        key = (layer, slot)
        if op == STOP:
            return {"requests": requests, "peak_kv_bytes": peak, "caches": len(caches)}
        if op == OPEN:
            held -= size(key)
            caches[key] = []
            continue
        if op == FREE:
            held -= size(key)
            caches.pop(key, None)
            continue
        if op != ATTEND or not 0 <= code < len(_DTYPES) or min(B, H, Hkv, T, D) < 1 or H % Hkv:
            raise ValueError(f"attention worker got a header it cannot serve: {header.tolist()} "
                             f"(expected [op in 0..3, layer, slot, B, H, Hkv, T, D, dtype code 0..{len(_DTYPES) - 1}])")
        dtype = _DTYPES[code]
        packed = torch.empty(B * (H + 2 * Hkv) * T * D, dtype=dtype, device=device)
        dist.recv(packed, client_rank, group=group)
        q, k, v = packed.split([B * H * T * D, B * Hkv * T * D, B * Hkv * T * D])
        q, k, v = q.view(B, H, T, D), k.view(B, Hkv, T, D), v.view(B, Hkv, T, D)
        cache = caches.setdefault(key, [])
        if cache and (cache[0].shape[:2] != k.shape[:2] or cache[0].shape[3] != D or cache[0].dtype != dtype):
            raise ValueError(f"cache {key} holds {tuple(cache[0].shape)} {cache[0].dtype}, got k {tuple(k.shape)} {dtype}")
        if cache:
            # one concatenation per request: the worker's cost is the read of the whole cache anyway
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        held -= size(key)
        caches[key] = [k, v]
        held += size(key)
        out = attend(q, k, v, pattern="causal", backend=backend)  # q_offset: S - T, the newest tokens
        if latency:
            time.sleep(latency)
        dist.send(out.contiguous(), client_rank, group=group)
        requests += 1
        peak = max(peak, held)


class RemoteKVState(State):
    """Decode state of an offloaded layer: the position (``offset``) and the worker's cache key
    ``(layer, slot)``; the keys and values themselves are on the attention worker, so
    ``nbytes()`` (device memory) is 0. ``reset()`` empties the worker's cache too."""

    def __init__(self, client: AttentionClient, layer: int, slot: int, batch_size: int, num_kv_heads: int,
                 head_dim: int) -> None:
        super().__init__()
        self.client, self.layer, self.slot = client, layer, slot
        self.batch_size, self.num_kv_heads, self.head_dim = batch_size, num_kv_heads, head_dim

    def nbytes(self) -> int:
        return 0

    def reset(self) -> None:
        super().reset()
        self.client.open(self.layer, self.slot)


class OffloadedAttention(nn.Module):
    """A :class:`MultiHeadAttention` whose decode-time attention runs on the attention worker.

    Without a state (training, a prefill without cache) it is the wrapped layer. With a
    :class:`RemoteKVState` (from :meth:`init_state`) the projections, RoPE and the output
    projection run here and ``q, k, v`` go to the worker. Shapes: ``x [B, T, C] -> [B, T, C]``.
    Decoding only: no gradient flows through the worker's attention."""

    def __init__(self, layer: MultiHeadAttention, index: int, client: AttentionClient) -> None:
        super().__init__()
        self.layer, self.index, self.client = layer, index, client

    def init_state(self, batch_size: int, *, max_len: int | None = None, device=None, dtype=None) -> RemoteKVState:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        layer = self.layer
        state = RemoteKVState(self.client, self.index, self.client.new_slot(), batch_size, layer.num_kv_heads,
                              layer.head_dim)
        self.client.open(self.index, state.slot)
        return state

    def submit(self, x: Tensor, state: RemoteKVState):
        """Project ``x [B, T, C]`` and post the attention request; returns a handle for :meth:`finish`."""
        layer = self.layer
        if not isinstance(state, RemoteKVState):
            raise ValueError(f"an offloaded layer decodes with the RemoteKVState from its init_state, got "
                             f"{type(state).__name__}")
        if x.dim() != 3 or x.shape[-1] != layer.dim:
            raise ValueError(f"x must be [B, T, C={layer.dim}], got {tuple(x.shape)}")
        B, T, _ = x.shape
        if B != state.batch_size:
            raise ValueError(f"x has batch {B} but the state was built for batch_size={state.batch_size}")
        if x.dtype not in _DTYPES:
            raise ValueError(f"x dtype {x.dtype} cannot be sent; accepted: {', '.join(map(str, _DTYPES))}")
        q, k, v = layer.project(x, state)
        offset = state.offset
        q, k, v = layer.adjust(x, q, k, v, torch.arange(offset, offset + T, device=x.device)[None], state)
        if layer.rope is not None:
            q, k = layer.rope(q, k, offset=offset)
        state.offset += T
        return self.client.submit(self.index, state.slot, q, k, v), B, T

    def finish(self, handle) -> Tensor:
        """Wait for the worker's ``out`` and apply the output projection: ``[B, T, C]``."""
        request, B, T = handle
        out = self.client.wait(request)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(B, T, self.layer.num_heads * self.layer.head_dim)
        return self.layer.dropout(self.layer.o_proj(out))

    def forward(self, x: Tensor, state=None, *, document_ids: Tensor | None = None) -> Tensor:
        if state is None:
            return self.layer(x, None, document_ids=document_ids)
        if document_ids is not None:
            raise ValueError("document_ids (packed sequences) cannot be combined with a decode state")
        return self.finish(self.submit(x, state))


def _offloadable(layer) -> bool:
    """Plain softmax attention with a causal pattern: the worker runs exactly ``attend(causal)``."""
    return (isinstance(layer, MultiHeadAttention) and type(layer).core is MultiHeadAttention.core
            and type(layer).project is MultiHeadAttention.project and type(layer).adjust is MultiHeadAttention.adjust
            and layer.extra_value_channels == 0 and layer.pattern.kind == "causal")


def offload(model: nn.Module, server_rank: int, group=None) -> AttentionClient:
    """Make ``model`` (a :class:`attnkit.models.DecoderLM`) decode with its attention on the worker
    ``server_rank`` (which runs :func:`serve`): every layer's attention becomes an
    :class:`OffloadedAttention`, in place. ``model.generate`` and ``model(tokens, state)`` then
    work unchanged. Returns the client; call ``client.stop()`` when done."""
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError(f"model must be a DecoderLM (with .layers of blocks), got {type(model).__name__}")
    for i, block in enumerate(layers):
        attn = block.attn
        if isinstance(attn, OffloadedAttention):
            raise ValueError(f"layer {i} is already offloaded (to rank {attn.client.server_rank})")
        if not _offloadable(attn):
            raise ValueError(
                f"layer {i} attention is {type(attn).__name__} (pattern {getattr(attn, 'pattern', None)!r}); offloading "
                "accepts plain MultiHeadAttention (mha, gqa, mqa) with the causal pattern")
    client = AttentionClient(server_rank, group)
    for i, block in enumerate(layers):
        block.attn = OffloadedAttention(block.attn, i, client)
    return client


@torch.no_grad()
def pingpong_step(model: nn.Module, tokens: list, states: list) -> list:
    """One forward of several micro-batches through an offloaded ``model``, interleaved: while the
    worker attends for micro-batch ``i`` at layer ``l``, this rank projects micro-batch ``i + 1``
    (or finishes micro-batch ``i - 1``'s MLP). ``tokens``: one ``[B_i, T]`` per micro-batch;
    ``states``: one model state each (``model.init_state``). Returns their logits
    ``[B_i, T, V]``, equal to ``model(tokens[i], states[i])``."""
    if len(tokens) != len(states) or not tokens:
        raise ValueError(f"pingpong_step needs one state per micro-batch, got {len(tokens)} token batches and "
                         f"{len(states)} states")
    blocks = list(model.layers)
    for i, block in enumerate(blocks):
        if not isinstance(block.attn, OffloadedAttention):
            raise ValueError(f"layer {i} is not offloaded; call offload(model, server_rank) first")
    for m, state in enumerate(states):
        if not isinstance(state, (list, tuple)) or len(state) != len(blocks):
            got = f"{len(state)} entries" if isinstance(state, (list, tuple)) else type(state).__name__
            raise ValueError(f"states[{m}] must be a model state with one entry per layer ({len(blocks)}), got {got}; "
                             "use model.init_state(batch_size)")
    xs = [model.embed(t) for t in tokens]
    pending = [blocks[0].attn.submit(blocks[0].attn_norm(x), s[0]) for x, s in zip(xs, states)]
    for li, block in enumerate(blocks):
        for m in range(len(xs)):
            x = xs[m] + block.attn.finish(pending[m])
            x = x + block.mlp(block.mlp_norm(x))
            xs[m] = x
            if li + 1 < len(blocks):  # this micro-batch's next request goes out before the next one is finished
                nxt = blocks[li + 1].attn
                pending[m] = nxt.submit(blocks[li + 1].attn_norm(x), states[m][li + 1])
    return [model.logits(model.norm(x)) for x in xs]


def offload_plan(*, num_params: int, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 context: int, device_bytes: float, worker_bytes: float | None = None, dtype_bytes: int = 2,
                 reserve_bytes: float = 0.0, batch: int | None = None, compute_s: float | None = None,
                 attention_s: float | None = None, bandwidth: float | None = None) -> dict:
    """Memory and time of decoding with and without attention offloading (a model, not a measurement).

    Memory: weights ``num_params x dtype_bytes`` on the device; a sequence of ``context`` tokens
    caches ``2 x num_layers x num_kv_heads x head_dim x context x dtype_bytes``. Without offloading
    the cache shares the device with the weights: ``max_batch_local = floor((device - weights -
    reserve) / kv_per_seq)``. With offloading the device keeps per sequence only one layer's
    ``q, out, k, v`` of one token, ``(2H + 2Hkv) D dtype_bytes``, and the worker's memory bounds the
    cache: ``max_batch_offload = min(device bound, floor(worker_bytes / kv_per_seq))`` (no worker
    bound when ``worker_bytes`` is None).

    Traffic per layer per token at batch B (default ``max_batch_offload``): ``q`` and ``out``,
    ``2 B H D dtype_bytes`` (``q_out_bytes``), plus the new ``k, v``, ``2 B Hkv D dtype_bytes``
    (``transfer_bytes = q_out_bytes + kv_bytes``).

    Time per decode step (when ``compute_s`` (projections + MLP of one layer for the batch),
    ``attention_s`` (the worker's attention of one layer) and ``bandwidth`` (bytes / s) are given):
    ``sequential_s = L (compute + attention + transfer)``; with two micro-batches in ping-pong the
    compute rank and the worker + link work at once, ``pipelined_s = L max(c, a + x) + min(c, a + x) / 2``
    (the half-batch fill of the pipeline)."""
    for name, value in (("num_params", num_params), ("num_layers", num_layers), ("num_heads", num_heads),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim), ("context", context),
                        ("dtype_bytes", dtype_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    for name, value in (("device_bytes", device_bytes), ("worker_bytes", worker_bytes), ("reserve_bytes", reserve_bytes),
                        ("compute_s", compute_s), ("attention_s", attention_s), ("bandwidth", bandwidth)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
                                  or not math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if bandwidth == 0:
        raise ValueError("bandwidth must be > 0 (bytes per second)")
    weights = num_params * dtype_bytes
    kv_per_seq = 2 * num_layers * num_kv_heads * head_dim * context * dtype_bytes
    free = device_bytes - weights - reserve_bytes
    local = max(0, math.floor(free / kv_per_seq))
    on_device_per_seq = (2 * num_heads + 2 * num_kv_heads) * head_dim * dtype_bytes
    offloaded = max(0, math.floor(free / on_device_per_seq))
    if worker_bytes is not None:
        offloaded = min(offloaded, math.floor(worker_bytes / kv_per_seq))
    B = offloaded if batch is None else batch
    if isinstance(B, bool) or not isinstance(B, int) or B < 0:
        raise ValueError(f"batch must be a non-negative integer, got {batch!r}")
    q_out = 2 * B * num_heads * head_dim * dtype_bytes
    kv_new = 2 * B * num_kv_heads * head_dim * dtype_bytes
    plan = {"weight_bytes": weights, "kv_bytes_per_seq": kv_per_seq, "max_batch_local": local,
            "max_batch_offload": offloaded, "batch": B, "q_out_bytes": q_out, "kv_bytes": kv_new,
            "transfer_bytes": q_out + kv_new, "worker_kv_bytes": B * kv_per_seq}
    if compute_s is not None and attention_s is not None and bandwidth is not None:
        x = plan["transfer_bytes"] / bandwidth
        c, a = compute_s, attention_s
        plan.update(transfer_s=x, sequential_s=num_layers * (c + a + x),
                    pipelined_s=num_layers * max(c, a + x) + min(c, a + x) / 2)
    return plan
