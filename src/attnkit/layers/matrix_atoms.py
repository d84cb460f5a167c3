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

Who owns the dictionary. A standalone layer (``attnkit.build("masa", ...)``) owns its own, as
the submodule ``atoms``. In a model, the model owns it: :class:`~attnkit.models.DecoderLM`
passes its layers its ``shared`` :class:`~torch.nn.ModuleDict` at construction (see
``accepts_shared_modules``); the first MASA layer puts the dictionary there (key ``"masa"``,
``"masa_1"``, ... for dictionaries of other shapes) and every MASA layer keeps a plain
reference to it, not a submodule. So the dictionary is one module at the model's top level:
one copy in ``state_dict`` (``shared.masa.q``, ...), counted once by ``parameters()``, and a
per-block FSDP wrapping leaves it to the root unit, whose parameters stay gathered for the
whole forward and backward (a dictionary inside block 0 would be resharded after block 0 ran,
before block 5 reads it).
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
        self.shape = (dim, q_features, kv_features, num_atoms)
        self.num_atoms = num_atoms
        self.q = nn.Parameter(torch.randn(num_atoms, q_features, dim) * std)
        self.k = nn.Parameter(torch.randn(num_atoms, kv_features, dim) * std)
        self.v = nn.Parameter(torch.randn(num_atoms, kv_features, dim) * std)
        self.o = nn.Parameter(torch.randn(num_atoms, dim, q_features) * std)

    def extra_repr(self) -> str:
        dim, q_features, kv_features, num_atoms = self.shape
        return f"dim={dim}, q_features={q_features}, kv_features={kv_features}, num_atoms={num_atoms}"


class _AtomLinear(nn.Module):
    """``x -> x W^T`` with ``W`` the concatenation over ``names`` of ``sum_s c[s] atoms.<name>[s]``."""

    def __init__(self, atoms: MatrixAtoms, names: tuple[str, ...], generator: torch.Generator | None = None):
        super().__init__()
        self.__dict__["_atoms"] = atoms  # a reference, not a submodule: the layer or the model owns it
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
        shared: the model's :class:`~torch.nn.ModuleDict` of modules shared by its layers
            (DecoderLM passes its ``shared``): the dictionary is found or put there, and the
            model owns it. ``None``: this layer owns its dictionary (``self.atoms``).

    Example::

        >>> from attnkit.models import DecoderLM
        >>> model = DecoderLM(vocab_size=256, dim=64, num_layers=6, num_heads=4, attention="masa")
        >>> model.shared["masa"].q.shape          # 2 atoms shared by the 6 layers, owned by the model
        torch.Size([2, 64, 64])
        >>> model.layers[5].attn.dictionary is model.shared["masa"]
        True
    """

    accepts_layer_position = True
    accepts_shared_modules = True

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, *, num_atoms: int | None = None,
                 layer_idx: int = 0, num_layers: int = 1, shared: nn.ModuleDict | None = None, **options):
        if options.get("bias"):
            raise ValueError("MatrixAtomAttention has no projection biases (bias=True is not accepted)")
        if shared is not None and not isinstance(shared, nn.ModuleDict):
            raise ValueError(f"shared must be the model's nn.ModuleDict of shared modules (DecoderLM passes its "
                             f"`shared`) or None for a layer that owns its dictionary, got {type(shared).__name__}")
        super().__init__(dim, num_heads, num_kv_heads, **options)
        positive_int(num_layers, "num_layers")
        num_atoms = max(1, num_layers // 3) if num_atoms is None else num_atoms
        positive_int(num_atoms, "num_atoms")
        q_features, kv_features = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        shape = (dim, q_features, kv_features, num_atoms)
        self.owns_atoms = shared is None
        if self.owns_atoms:
            atoms = self.atoms = MatrixAtoms(*shape)
            self.shared_key = None
        else:
            self.shared_key = _dictionary_key(shared, shape)
            if self.shared_key not in shared:
                shared[self.shared_key] = MatrixAtoms(*shape)
            atoms = shared[self.shared_key]
            # a reference, not a submodule: the model owns the dictionary (counted and saved once)
            self.__dict__["_shared_atoms"] = atoms
        self.num_atoms, self.layer_idx = num_atoms, layer_idx
        generator = torch.Generator().manual_seed(1000 + layer_idx)
        self.qkv_proj = _AtomLinear(atoms, ("q", "k", "v"), generator)
        self.o_proj = _AtomLinear(atoms, ("o",), generator)

    @property
    def dictionary(self) -> MatrixAtoms:
        """The atoms this layer combines: its own, or the model's shared dictionary."""
        return self.atoms if self.owns_atoms else self._shared_atoms

    def extra_repr(self) -> str:
        where = "own" if self.owns_atoms else f"shared[{self.shared_key!r}]"
        return f"{super().extra_repr()}, num_atoms={self.num_atoms}, dictionary={where}"


def _dictionary_key(shared: nn.ModuleDict, shape: tuple) -> str:
    """The key of the dictionary of ``shape`` in ``shared``: an existing one of that shape, else
    the next free name (``masa``, then ``masa_1``, ... for layers of other widths or heads)."""
    keys = [k for k in shared if k == "masa" or k.startswith("masa_")]
    for key in keys:
        if isinstance(shared[key], MatrixAtoms) and shared[key].shape == shape:
            return key
    return "masa" if not keys else f"masa_{len(keys)}"


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
