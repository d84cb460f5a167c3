"""No token mixing: the control from Deconstructing Attention (Xue, Moosavi, Aletras;
arXiv 2510.11602), the relaxation that removes mixing across positions.

Attention whose weight matrix is the identity: every token attends only to itself, so

    y_t = W_o (W_v x_t)

No information moves between positions. The paper finds that models without token mixing
collapse to near-random behaviour; attnkit uses this layer as the control of
``attnkit compare``: a harness that cannot tell it from MHA on MQAR is broken. Decoding
needs no state beyond the position counter.
"""

from __future__ import annotations

from torch import Tensor, nn

from .._checks import head_dim_of, positive_int
from ..cards import Capabilities, Card, FlopCount
from ..state import State
from .base import AttentionLayer, check_input

__all__ = ["NoMixing"]


class _Counter(State):
    """Decode state of a layer that keeps nothing but the number of tokens seen."""

    def nbytes(self) -> int:
        return 0


class NoMixing(AttentionLayer):
    """``x [B, T, C] -> W_o W_v x``, position by position (no token mixing).

    Args:
        dim: width C.
        num_heads: kept for the common constructor signature; heads do not change the math.
        head_dim: D (default C // H); the value width is H * D.
        bias: biases in the projections.
    """

    def __init__(self, dim: int, num_heads: int, *, head_dim: int | None = None, bias: bool = False):
        super().__init__()
        positive_int(dim, "dim")
        positive_int(num_heads, "num_heads")
        head_dim = head_dim_of(dim, num_heads, head_dim)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.v_proj = nn.Linear(dim, num_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=bias)

    def init_state(self, batch_size: int, *, max_len=None, device=None, dtype=None) -> State:
        return _Counter()

    def forward(self, x: Tensor, state: State | None = None, *, document_ids: Tensor | None = None) -> Tensor:
        check_input(x, self.dim, self, state)
        if state is not None:
            state.offset += x.shape[1]
        return self.o_proj(self.v_proj(x))


def no_mixing_flops(batch: int, seq: int, config: dict) -> FlopCount:
    dim, heads = config["dim"], config["num_heads"]
    inner = heads * (config.get("head_dim") or dim // heads)
    return FlopCount(attention_fwd=0.0, projection_fwd=4.0 * batch * seq * dim * inner)


CARDS = (
    Card(
        name="no-mixing",
        title="Deconstructing Attention: Investigating Design Principles for Effective Language Modeling",
        arxiv="2510.11602",
        family="control",
        layer=NoMixing,
        flops=no_mixing_flops,
        capabilities=Capabilities(backends=("reference",)),
        summary="control: identity attention (each token sees only itself)",
    ),
)
