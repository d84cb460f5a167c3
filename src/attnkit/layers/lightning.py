"""Lightning Attention: TransNormerLLM's gated linear attention with exponential decay.

TransNormerLLM: A Faster and Better Large Language Model with Improved TransNormer (Qin et
al., arXiv 2307.14995); Lightning Attention-2 (Qin et al., arXiv 2401.04658); Various
Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention (TNL, Qin et
al., arXiv 2405.17381). Official code: the TransNormerLLM-7B model (Hugging Face
``OpenNLPLab/TransNormerLLM-7B``, ``NormLinearAttention``) and OpenNLPLab/lightning-attention
(``examples/module/tnl_attn.py``, ``TnlAttention``). The layer::

    q, k = SiLU(x W_q), SiLU(x W_k);  v = x W_v  (or SiLU(x W_v))          (B, H, T, D)
    o_i  = sum_{j <= i} lambda_h^(i - j) (q_i . k_j) v_j                   no softmax, no 1/sqrt(D)
    y    = W_o ( Norm(o) * act(gate(x)) )                                  output gate

The two official designs differ in four places; ``design`` picks one by name, and each of
the four arguments below overrides its part of the design:

=================== ================================ =====================================
``design``          ``"transnormerllm"`` (default)   ``"tnl"``
=================== ================================ =====================================
source              paper 2307.14995 and the 7B code lightning-attention ``TnlAttention``
``activate_values`` False (SiLU on q, k only)        True (SiLU on q, k and v)
``norm``            ``"srms"``: SRMSNorm, eps 1e-6   ``"layernorm"``: LayerNorm (gain and
                                                     bias), eps 1e-5
``gate_rank``       None: one full-rank ``C -> H*D`` ``head_dim``: ``C -> D -> H*D``
``gate_activation`` None: ``U = x W_u`` as is        ``"sigmoid"``
=================== ================================ =====================================

The card (``attnkit.build("lightning", ...)``) builds ``"transnormerllm"``, the design of the
paper it cites. ``design="mixed"`` is attnkit's former default (values SiLU'd, SRMSNorm,
rank-64 gate without a sigmoid: a mixture of the two, in neither official code), kept so
that results made with it can be reproduced.

``SRMSNorm(o) = o / sqrt(mean(o^2) + eps)`` over the H*D channels, without a gain (the
paper's "simple RMSNorm"). The decay ``lambda_h = exp(-s_h)`` follows the paper's schedule:
ALiBi's slopes ``s_h`` scaled per layer by ``1 - l / (L - 1) + 1e-5``, so the first layer
decays fastest and the last barely at all. :class:`~attnkit.models.DecoderLM` passes
``layer_idx`` and ``num_layers``; a standalone layer is the first of one (factor 1).

What differs from multi-head attention: no softmax and no positional encoding (the decay
orders tokens); cost and decode state are linear / constant in the context length. The
decode state is one ``[D, D]`` float32 matrix per head (:class:`~attnkit.state.RecurrentState`).
The math lives in :mod:`attnkit.ops.linear.lightning` (reference, PyTorch chunks, recurrence,
Triton on CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import head_dim_of, positive_int
from ..cards import Capabilities, Card, FlopCount
from ..ops.linear.lightning import LIGHTNING_BACKENDS, alibi_slopes, lightning_attend
from ..state import RecurrentState
from .base import AttentionLayer, check_input
from .multi_head import head_shape

__all__ = ["LightningAttention", "lightning_slopes", "LIGHTNING_DESIGNS"]

# name -> (activate_values, norm, gate_rank, gate_activation); gate_rank "head_dim" means D
LIGHTNING_DESIGNS = {
    "transnormerllm": dict(activate_values=False, norm="srms", gate_rank=None, gate_activation=None),
    "tnl": dict(activate_values=True, norm="layernorm", gate_rank="head_dim", gate_activation="sigmoid"),
    "mixed": dict(activate_values=True, norm="srms", gate_rank=64, gate_activation=None),
}
NORMS = ("srms", "layernorm")
GATE_ACTIVATIONS = (None, "sigmoid")


class _FromDesign:
    """Default of the arguments that a ``design`` fills in."""

    def __repr__(self):
        return "<from design>"


FROM_DESIGN = _FromDesign()


def lightning_slopes(num_heads: int, layer_idx: int = 0, num_layers: int = 1) -> Tensor:
    """TransNormerLLM's decay slopes ``[H]`` for layer ``layer_idx`` of ``num_layers``."""
    if not 0 <= layer_idx < num_layers:
        raise ValueError(f"layer_idx must be in [0, num_layers={num_layers}), got {layer_idx}")
    factor = 1.0 if num_layers == 1 else 1 - layer_idx / (num_layers - 1) + 1e-5
    return torch.tensor(alibi_slopes(num_heads), dtype=torch.float32) * factor


class LightningAttention(AttentionLayer):
    """Gated linear attention with per-head exponential decay (TransNormerLLM / Lightning).

    Args:
        dim: width C. num_heads: H. head_dim: D (default C // H).
        layer_idx, num_layers: position in the stack, for the decay schedule.
        slopes: explicit per-head slopes ``[H]`` (>= 0), overriding the schedule.
        design: ``"transnormerllm"`` (default), ``"tnl"`` or ``"mixed"`` (module docstring);
            sets the next four arguments, each of which can still be given to override it.
        activate_values: SiLU on v as well as q, k.
        norm: ``"srms"`` (SRMSNorm, no parameters) or ``"layernorm"`` (gain and bias).
        gate_rank: rank of the output gate ``W_u1 W_u2`` (an int, capped at C, or ``"head_dim"``
            for D), or ``None`` for one full-rank ``C -> H*D`` projection.
        gate_activation: ``None`` or ``"sigmoid"``, applied to the gate.
        norm_eps: the norm's epsilon (default 1e-6 for SRMSNorm, 1e-5 for LayerNorm, as in
            the official code).
        chunk_size: block length of the PyTorch chunked path.
        bias: biases in the projections.
        backend: ``auto`` | ``reference`` | ``chunked`` | ``recurrent`` | ``triton``
            (:func:`attnkit.ops.linear.lightning.lightning_attend`).

    Shapes: ``x [B, T, C] -> [B, T, C]``; decode state ``[B, H, D, D]`` float32.

    Example::

        >>> import torch
        >>> from attnkit.layers import LightningAttention
        >>> layer = LightningAttention(256, 8)
        >>> x = torch.randn(2, 100, 256)
        >>> state = layer.init_state(2)
        >>> y = torch.cat([layer(x[:, :60], state), layer(x[:, 60:], state)], dim=1)  # == layer(x)
    """

    accepts_layer_position = True

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        head_dim: int | None = None,
        layer_idx: int = 0,
        num_layers: int = 1,
        slopes=None,
        design: str = "transnormerllm",
        activate_values=FROM_DESIGN,
        norm=FROM_DESIGN,
        gate_rank=FROM_DESIGN,
        gate_activation=FROM_DESIGN,
        norm_eps: float | None = None,
        chunk_size: int = 64,
        bias: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        positive_int(dim, "dim")
        positive_int(num_heads, "num_heads")
        positive_int(num_layers, "num_layers")
        positive_int(chunk_size, "chunk_size")
        head_dim = head_dim_of(dim, num_heads, head_dim)
        if backend not in LIGHTNING_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(LIGHTNING_BACKENDS)}, got {backend!r}")
        if slopes is None:
            slopes = lightning_slopes(num_heads, layer_idx, num_layers)
        else:
            slopes = torch.as_tensor(slopes, dtype=torch.float32)
            if slopes.shape != (num_heads,) or (slopes < 0).any():
                raise ValueError(f"slopes must be {num_heads} non-negative values (one per head), got {slopes.tolist()}")
        if design not in LIGHTNING_DESIGNS:
            raise ValueError(f"design must be one of {', '.join(map(repr, LIGHTNING_DESIGNS))}, got {design!r}")
        chosen = dict(LIGHTNING_DESIGNS[design])
        for name, value in (("activate_values", activate_values), ("norm", norm), ("gate_rank", gate_rank),
                            ("gate_activation", gate_activation)):
            if value is not FROM_DESIGN:
                chosen[name] = value
        activate_values, norm, gate_rank, gate_activation = (
            chosen["activate_values"], chosen["norm"], chosen["gate_rank"], chosen["gate_activation"])
        if gate_rank == "head_dim":
            gate_rank = head_dim
        if not isinstance(activate_values, bool):
            raise ValueError(f"activate_values must be True or False, got {activate_values!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(map(repr, NORMS))}, got {norm!r}")
        if gate_rank is not None:
            positive_int(gate_rank, "gate_rank")
        if gate_activation not in GATE_ACTIVATIONS:
            raise ValueError(f"gate_activation must be None or 'sigmoid', got {gate_activation!r}")
        if norm_eps is None:
            norm_eps = 1e-6 if norm == "srms" else 1e-5
        elif isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)) or not norm_eps > 0:
            raise ValueError(f"norm_eps must be a positive number, got {norm_eps!r}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.layer_idx, self.num_layers = layer_idx, num_layers
        self.design, self.norm_type, self.gate_activation = design, norm, gate_activation
        self.activate_values, self.norm_eps = activate_values, float(norm_eps)
        self.chunk_size, self.backend = chunk_size, backend
        inner = num_heads * head_dim
        self.qkv_proj = nn.Linear(dim, 3 * inner, bias=bias)
        if gate_rank is None:
            self.gate = nn.Linear(dim, inner, bias=bias)
        else:
            rank = min(gate_rank, dim)
            # TNL's low-rank gate has biases on both factors when the layer has biases; attnkit's
            # former ("mixed") gate had none on the first
            first_bias = bias and design == "tnl"
            self.gate = nn.Sequential(nn.Linear(dim, rank, bias=first_bias), nn.Linear(rank, inner, bias=bias))
        self.norm = nn.LayerNorm(inner, eps=self.norm_eps) if norm == "layernorm" else None
        self.o_proj = nn.Linear(inner, dim, bias=bias)
        self.register_buffer("slopes", slopes, persistent=False)

    def init_state(self, batch_size: int, *, max_len=None, device=None, dtype=None) -> RecurrentState:
        device = device if device is not None else self.o_proj.weight.device
        state_dtype = torch.float64 if self.o_proj.weight.dtype == torch.float64 else torch.float32
        return RecurrentState(kv=torch.zeros(batch_size, self.num_heads, self.head_dim, self.head_dim,
                                             device=device, dtype=state_dtype))

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x [B, T, C]`` -> activated q, k, v ``[B, H, T, D]``."""
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = F.silu(q), F.silu(k)
        return q, k, (F.silu(v) if self.activate_values else v)

    def core(self, q: Tensor, k: Tensor, v: Tensor, initial: Tensor | None) -> tuple[Tensor, Tensor]:
        """The linear-attention op on activated ``q, k, v [B, H, T, D]`` from the state ``initial``
        ``[B, H, D, D]`` (or zeros): ``(o [B, H, T, D], final state)``. The seam a sequence-parallel
        wrapper replaces (``attnkit.distributed.parallelize``: LASP-2)."""
        return lightning_attend(q, k, v, self.slopes, initial_state=initial, backend=self.backend,
                                chunk_size=self.chunk_size)

    def forward(self, x: Tensor, state: RecurrentState | None = None, *, document_ids: Tensor | None = None) -> Tensor:
        check_input(x, self.dim, self, state)
        if document_ids is not None:
            raise ValueError("LightningAttention does not take document_ids (its state would carry across documents); "
                             "run each document as its own sequence")
        B, T, _ = x.shape
        q, k, v = self.project(x)
        o, final = self.core(q, k, v, None if state is None else state["kv"])
        if state is not None:
            state["kv"] = final.to(state["kv"].dtype)
            state.offset += T
        o = o.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, H*D)
        if self.norm is not None:
            o = self.norm(o)
        else:
            wide = o.to(torch.promote_types(o.dtype, torch.float32))
            o = o * torch.rsqrt(wide.square().mean(-1, keepdim=True) + self.norm_eps).to(o.dtype)  # SRMSNorm
        gate = self.gate(x)
        if self.gate_activation == "sigmoid":
            gate = torch.sigmoid(gate)
        return self.o_proj(o * gate)


def lightning_flops(batch: int, seq: int, config: dict) -> FlopCount:
    """Core: the chunked form, per token ``2*C*D`` (scores) + ``2*C*D`` (times v) within its
    block of ``C`` and ``4*D*D`` for the state read and update; projections: q, k, v, the
    gate and the output."""
    dim, heads, _, head_dim = head_shape(config)
    block = config.get("chunk_size", 64)
    core = batch * heads * seq * (4.0 * block * head_dim + 4.0 * head_dim * head_dim)
    inner = heads * head_dim
    rank = config.get("gate_rank", LIGHTNING_DESIGNS[config.get("design", "transnormerllm")]["gate_rank"])
    rank = head_dim if rank == "head_dim" else rank
    gate = 2.0 * dim * inner if rank is None else 2.0 * min(rank, dim) * (dim + inner)
    projection = batch * seq * (2.0 * dim * 3 * inner + gate + 2.0 * inner * dim)
    return FlopCount(attention_fwd=core, projection_fwd=projection)


CARDS = (
    Card(
        name="lightning",
        title="TransNormerLLM: A Faster and Better Large Language Model with Improved TransNormer",
        arxiv="2307.14995",
        family="linear",
        layer=LightningAttention,
        flops=lightning_flops,
        defaults={"design": "transnormerllm"},
        capabilities=Capabilities(bidirectional=False, varlen=False, backends=("reference", "chunked", "recurrent", "triton")),
        summary="linear attention with per-head exponential decay; TransNormerLLM's design (SiLU q/k, SRMSNorm, "
                "full-rank output gate; design='tnl' for TNL's); O(1) decode state",
    ),
)
