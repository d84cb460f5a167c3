"""MASA: Matrix Atom Sharing in Attention (projection weights from a dictionary shared by all layers).

Share Your Attention: Transformer Weight Sharing via Matrix-based Dictionary Learning
(arXiv 2508.04581). Each projection type has one dictionary of ``S`` full-size matrix atoms,
shared by every layer; layer ``l`` builds its weights as a linear combination::

    W_q^(l) = sum_s c_q[l, s] D_q[s],   likewise W_k, W_v, W_o          (D_*[s] full size)
    attention as in multi-head attention with these weights

so the attention parameters are ``4 S C^2 + 4 L S`` instead of ``4 L C^2`` (the paper keeps
about a third: ``S = L / 3``, the default here, at least 1). Atoms and coefficients train end
to end. What differs from :class:`~attnkit.layers.MultiHeadAttention`: only the source of
the projection weights; the attention, RoPE, patterns and KV cache are the same.

The dictionary lives in the first MASA layer of a :class:`~attnkit.models.DecoderLM` (which
passes the layers a ``shared`` dict at construction; see ``accepts_shared_modules``); the
other layers hold a reference, so the parameters are counted and saved once. A standalone
layer owns its own dictionary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import positive_int
from ..cards import Card, FlopCount
from .multi_head import MultiHeadAttention, head_shape, multi_head_flops

__all__ = ["MatrixAtomAttention", "MatrixAtoms"]


class MatrixAtoms(nn.Module):
    """The shared dictionaries: ``S`` atoms for each of W_q ``[H*D, C]``, W_k, W_v
    ``[Hkv*D, C]`` and W_o ``[C, H*D]``."""

    def __init__(self, dim: int, q_features: int, kv_features: int, num_atoms: int, std: float = 0.02):
        super().__init__()
        self.num_atoms = num_atoms
        self.q = nn.Parameter(torch.randn(num_atoms, q_features, dim) * std)
        self.k = nn.Parameter(torch.randn(num_atoms, kv_features, dim) * std)
        self.v = nn.Parameter(torch.randn(num_atoms, kv_features, dim) * std)
        self.o = nn.Parameter(torch.randn(num_atoms, dim, q_features) * std)


class _AtomLinear(nn.Module):
    """``x -> x W^T`` with ``W`` the concatenation over ``names`` of ``sum_s c[s] atoms.<name>[s]``."""

    def __init__(self, atoms: MatrixAtoms, names: tuple[str, ...], generator: torch.Generator | None = None):
        super().__init__()
        self.__dict__["_atoms"] = atoms  # a reference, not a submodule: the owner layer registers it
        self.names = names
        # unit-norm random coefficients: W starts with the atoms' scale and differs across layers
        c = torch.randn(len(names), atoms.num_atoms, generator=generator)
        self.coefficients = nn.Parameter(c / c.norm(dim=-1, keepdim=True))

    @property
    def weight(self) -> Tensor:
        """The combined weight (computed on each access)."""
        atoms = self._atoms
        return torch.cat([torch.einsum("s,sij->ij", c, getattr(atoms, n)) for c, n in zip(self.coefficients, self.names)])

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class MatrixAtomAttention(MultiHeadAttention):
    """Multi-head attention whose q, k, v, o weights are combinations of shared matrix atoms.

    Args:
        dim, num_heads, num_kv_heads, head_dim, pattern, rope, qk_norm, dropout, backend: as
            :class:`~attnkit.layers.MultiHeadAttention` (no projection biases).
        num_atoms: atoms per dictionary (default ``max(1, num_layers // 3)``).
        layer_idx, num_layers: place in the stack (DecoderLM passes them).
        shared: the dict through which the layers of one model find the dictionary
            (DecoderLM passes it; ``None``: this layer owns its atoms).

    Example::

        >>> from attnkit.models import DecoderLM
        >>> model = DecoderLM(vocab_size=256, dim=64, num_layers=6, num_heads=4, attention="masa")
        >>> model.layers[0].attn.atoms.q.shape          # 2 atoms shared by the 6 layers
        torch.Size([2, 64, 64])
    """

    accepts_layer_position = True
    accepts_shared_modules = True

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, *, num_atoms: int | None = None,
                 layer_idx: int = 0, num_layers: int = 1, shared: dict | None = None, **options):
        if options.get("bias"):
            raise ValueError("MatrixAtomAttention has no projection biases (bias=True is not accepted)")
        super().__init__(dim, num_heads, num_kv_heads, **options)
        positive_int(num_layers, "num_layers")
        num_atoms = max(1, num_layers // 3) if num_atoms is None else num_atoms
        positive_int(num_atoms, "num_atoms")
        q_features, kv_features = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        key = ("masa", dim, q_features, kv_features, num_atoms)
        if shared is not None and key in shared:
            atoms = shared[key]
            self.owns_atoms = False
        else:
            atoms = MatrixAtoms(dim, q_features, kv_features, num_atoms)
            self.atoms = atoms  # registered here only: parameters counted and saved once
            self.owns_atoms = True
            if shared is not None:
                shared[key] = atoms
        self.num_atoms, self.layer_idx = num_atoms, layer_idx
        generator = torch.Generator().manual_seed(1000 + layer_idx)
        self.qkv_proj = _AtomLinear(atoms, ("q", "k", "v"), generator)
        self.o_proj = _AtomLinear(atoms, ("o",), generator)


def masa_flops(batch: int, seq: int, config: dict) -> FlopCount:
    """As MHA, plus building the weights from the atoms: ``2 S`` FLOPs per weight entry."""
    base = multi_head_flops(batch, seq, config)
    dim, heads, kv_heads, head_dim = head_shape(config)
    atoms = config.get("num_atoms") or 1
    entries = dim * head_dim * (2 * heads + 2 * kv_heads)
    return FlopCount(attention_fwd=base.attention_fwd, projection_fwd=base.projection_fwd + 2.0 * atoms * entries)


CARDS = (
    Card(
        name="masa",
        title="Share Your Attention: Transformer Weight Sharing via Matrix-based Dictionary Learning",
        arxiv="2508.04581",
        family="sharing",
        layer=MatrixAtomAttention,
        flops=masa_flops,
        summary="q/k/v/o weights = per-layer combinations of matrix atoms shared across layers",
    ),
)
