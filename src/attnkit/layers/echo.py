"""EchoAtt: attention probabilities shared across consecutive layers.

EchoAtt: Attend, Copy, then Adjust for More Efficient Large Language Models (Rajabzadeh et
al., arXiv 2409.14595). Inner layers of an LLM have very similar attention maps, so layers
are grouped into share blocks: the block's first layer (the *leader*) computes the
attention probabilities, the following layers (*followers*) reuse them with their own
values and output projection::

    leader    l:  P = softmax(q_l k_l^T / sqrt(D) + mask),   y_l = W_o,l (P  v_l)
    follower  m:                                             y_m = W_o,m (P  v_m)

so a follower has no query or key projection (fewer parameters) and computes no scores.

Two paths, one math. The reference path materialises ``P`` (float64) in the leader and
hands it to the followers. The fast path never materialises it: the leader hands its
rotated queries and (cached) keys to the followers, which call
:func:`attnkit.attend` with their own values: the same ``P`` inside a fused kernel
(FlashAttention / cuDNN on CUDA). Decoding shares the leader's key cache; a follower caches
only its values.

Layers find each other through the per-forward ``context`` dict that
:class:`~attnkit.models.DecoderLM` passes to layers with ``accepts_layer_context``, and
their role from ``layer_idx`` / ``num_layers``: layers ``first_layer .. last_layer`` form
blocks of ``block_size`` (the paper shares inner layers, so the first and last layers
can stay unshared). A standalone layer (one layer, no context) is plain multi-head
attention.
"""

from __future__ import annotations

from torch import Tensor, nn

from .. import patterns as _patterns
from .._checks import head_dim_of, positive_int
from ..cards import Capabilities, Card
from ..ops import BACKENDS, attend
from ..rope import RotaryEmbedding
from ..state import KVCache
from .base import AttentionLayer, check_input
from .multi_head import multi_head_flops, rotate_and_cache, with_documents

__all__ = ["EchoAttention"]


class EchoAttention(AttentionLayer):
    """Multi-head attention whose probabilities are shared within a block of layers.

    Args:
        dim, num_heads, num_kv_heads, head_dim, rope, rope_base, bias: as
            :class:`~attnkit.layers.MultiHeadAttention` (causal).
        layer_idx, num_layers: this layer's place in the stack (DecoderLM passes them).
        block_size: layers per share block (the leader plus ``block_size - 1`` followers).
        first_layer, last_layer: the shared range (default: every layer); layers outside it
            are ordinary attention layers.
        backend: ``auto`` (shared q/k through :func:`attnkit.attend`) or ``reference``
            (materialised probabilities passed on).

    Shapes: ``x [B, T, C] -> [B, T, C]``; ``context`` is the dict shared by the layers of
    one forward call. A follower called without its leader's context raises ``ValueError``.

    Example::

        >>> import torch
        >>> from attnkit.models import DecoderLM
        >>> model = DecoderLM(vocab_size=256, dim=64, num_layers=4, num_heads=4, attention="echo")
        >>> [block.attn.role for block in model.layers]
        ['leader', 'follower', 'leader', 'follower']
    """

    accepts_layer_position = True
    accepts_layer_context = True

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, *, head_dim: int | None = None,
                 layer_idx: int = 0, num_layers: int = 1, block_size: int = 2, first_layer: int = 0,
                 last_layer: int | None = None, rope: bool = True, rope_base: float = 10000.0, bias: bool = False,
                 backend: str = "auto"):
        super().__init__()
        positive_int(dim, "dim")
        positive_int(num_heads, "num_heads")
        positive_int(block_size, "block_size")
        num_kv_heads = positive_int(num_heads if num_kv_heads is None else num_kv_heads, "num_kv_heads")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        head_dim = head_dim_of(dim, num_heads, head_dim)
        last_layer = num_layers - 1 if last_layer is None else last_layer
        if not 0 <= layer_idx < num_layers:
            raise ValueError(f"layer_idx must be in [0, num_layers={num_layers}), got {layer_idx}")
        if not 0 <= first_layer <= last_layer < num_layers:
            raise ValueError(f"need 0 <= first_layer <= last_layer < num_layers={num_layers}, got "
                             f"first_layer={first_layer}, last_layer={last_layer}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if rope and head_dim % 2:
            raise ValueError(f"rope=True needs an even head_dim, got {head_dim}")
        self.dim, self.num_heads, self.num_kv_heads, self.head_dim = dim, num_heads, num_kv_heads, head_dim
        self.backend = backend
        shared = first_layer <= layer_idx <= last_layer
        offset = layer_idx - first_layer
        self.role = "follower" if shared and offset % block_size else ("leader" if shared else "plain")
        self.block = (first_layer + offset - offset % block_size) if shared else layer_idx  # the leader's index
        if self.role != "follower":
            self.qk_proj = nn.Linear(dim, (num_heads + num_kv_heads) * head_dim, bias=bias)
            self.rope = RotaryEmbedding(head_dim, rope_base) if rope else None
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=bias)

    def init_state(self, batch_size: int, *, max_len=None, device=None, dtype=None) -> KVCache:
        param = self.v_proj.weight
        device, dtype = device or param.device, dtype or param.dtype
        # a follower keeps only its values (a 1-channel placeholder stands in for keys)
        key_dim = 1 if self.role == "follower" else self.head_dim
        return KVCache(batch_size, self.num_kv_heads, key_dim, value_dim=self.head_dim, max_len=max_len,
                       device=device, dtype=dtype)

    def forward(self, x: Tensor, state: KVCache | None = None, *, document_ids: Tensor | None = None,
                context: dict | None = None) -> Tensor:
        check_input(x, self.dim, self, state)
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        v = self.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        key = ("echo", self.block)
        if self.role == "follower":
            if context is None or key not in context:
                raise ValueError(f"this EchoAttention layer is a follower of layer {self.block}: it needs its leader's "
                                 "queries and keys through `context` (run it inside DecoderLM, or pass the dict the "
                                 "leader wrote)")
            shared = context[key]
            if state is not None:
                _, v = state.update(v.new_zeros(B, Hkv, T, 1), v)
            if shared["probs"] is not None:  # reference: reuse the materialised probabilities
                group = H // Hkv
                out = (shared["probs"] @ v.repeat_interleave(group, dim=1).double()).to(x.dtype)
            else:
                out = attend(shared["q"], shared["k"], v, pattern=shared["pattern"], q_offset=shared["q_offset"],
                             backend=self.backend)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, H * D))

        q, k = self.qk_proj(x).split((H * D, Hkv * D), dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, Hkv, D).transpose(1, 2)
        pattern, positions = with_documents(_patterns.resolve("causal"), document_ids, state, B, T)
        offset = state.offset if state is not None else 0
        q, k, v, pattern, q_offset = rotate_and_cache(self.rope, q, k, v, pattern, state, offset, positions)
        probs = None
        if self.backend == "reference":
            probs = self.probabilities(q, k, pattern, q_offset)
            out = (probs @ v.repeat_interleave(H // Hkv, dim=1).double()).to(x.dtype)
        else:
            out = attend(q, k, v, pattern=pattern, q_offset=q_offset, backend=self.backend)
        if context is not None and self.role == "leader":
            context[key] = {"q": q, "k": k, "pattern": pattern, "q_offset": q_offset, "probs": probs}
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * D))

    def probabilities(self, q: Tensor, k: Tensor, pattern, q_offset: int | None) -> Tensor:
        """The leader's attention probabilities ``[B, H, T, S]``, materialised in float64."""
        B, H, T, D = q.shape
        S = k.shape[2]
        k = k.repeat_interleave(H // k.shape[1], dim=1)
        scores = (q.double() @ k.double().transpose(-1, -2)) * D**-0.5
        q_offset = S - T if q_offset is None else q_offset
        mask = pattern.dense(T, S, q_offset=q_offset, batch=B, heads=H, device=q.device)
        return scores.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)


CARDS = (
    Card(
        name="echo",
        title="EchoAtt: Attend, Copy, then Adjust for More Efficient Large Language Models",
        arxiv="2409.14595",
        family="sharing",
        layer=EchoAttention,
        flops=multi_head_flops,
        capabilities=Capabilities(bidirectional=False, backends=("reference", "sdpa", "flex")),
        summary="blocks of layers share one attention map: followers reuse the leader's q/k (no q/k projections)",
    ),
)
