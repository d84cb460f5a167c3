"""The layer protocol shared by every mechanism.

A layer maps ``x [B, T, C] -> y [B, T, C]``. Optional keyword arguments:

- ``state``: the layer's decode state from ``layer.init_state(batch_size)``; the layer
  reads it, appends this call's tokens and advances ``state.offset``. Feeding a sequence
  token by token (or in chunks) through one state gives the same outputs as one call.
- ``document_ids [B, T]``: packed sequences; tokens attend only within their document
  and positions restart at each document.

Every layer starts its forward with ``check_input(x, self.dim, self, state)``: one wording
for a bad ``x`` (shape, dtype, empty batch) and for a decode state that another mechanism,
another batch size or another width built.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from .._checks import positive_int
from ..state import State, _Constant

__all__ = ["AttentionLayer", "check_input", "check_state"]


def check_input(x: Tensor, dim: int, layer: nn.Module | None = None, state: State | None = None) -> None:
    """Raise a ValueError unless ``x`` is a floating tensor ``[B, T, C=dim]`` with B, T >= 1.

    With ``layer``: ``x`` must also have the dtype of the layer's parameters (unless autocast
    is on), and a ``state`` must be one that ``layer.init_state(B)`` builds (:func:`check_state`).
    """
    if not isinstance(x, Tensor) or x.dim() != 3:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor of shape [B, T, C], got {got}")
    if x.shape[-1] != dim:
        raise ValueError(f"x has width C={x.shape[-1]} but the layer was built with dim={dim}")
    if x.shape[1] == 0:
        raise ValueError("x has no tokens (T=0)")
    if x.shape[0] == 0:
        raise ValueError(f"x has an empty batch (B=0, shape {tuple(x.shape)}); pass at least one sequence")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor (the token features), got {x.dtype}; "
                         "cast it, e.g. x.float(), or embed token ids first")
    if layer is None or torch.compiler.is_compiling():  # compiled: checked by the eager call that traced it
        return
    dtypes = {p.dtype for p in _parameters_of(layer)}
    if x.dtype not in dtypes:
        dtypes = {d for d in dtypes if d.is_floating_point}
        if len(dtypes) == 1 and not torch.is_autocast_enabled(x.device.type):
            (dtype,) = dtypes
            raise ValueError(f"x is {x.dtype} but {type(layer).__name__}'s parameters are {dtype}; cast one to "
                             f"match: x.to({dtype}) or layer.to({x.dtype}) (or run under torch.autocast)")
    if state is not None:
        check_state(layer, state, x)


# Module.parameters() walks every submodule (~30 us for a layer with a few children, per call):
# each layer keeps its parameter list, rebuilt whenever any module anywhere registers or
# replaces a parameter (load_state_dict(assign=True) included). ``.to(dtype)`` keeps the
# Parameter objects, so their dtypes are read fresh on every call.
_PARAMETER_EPOCH = [0]


def _new_parameter(module, name, param):
    _PARAMETER_EPOCH[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_new_parameter)


def _parameters_of(layer: nn.Module) -> tuple:
    cached = layer.__dict__.get("_checked_parameters")
    if cached is None or cached[0] != _PARAMETER_EPOCH[0]:
        cached = (_PARAMETER_EPOCH[0], tuple(layer.parameters()))
        layer.__dict__["_checked_parameters"] = cached
    return cached[1]


def check_state(layer: nn.Module, state, x: Tensor) -> None:
    """Raise a ValueError unless ``state`` is what ``layer.init_state(B)`` builds for ``x [B, T, C]``:
    the same state class (not another mechanism's) with the same shapes (batch size, heads,
    head dims, window...). The check builds that state once on the meta device (no memory)
    and remembers, on the state, the layers and batch sizes it passed for."""
    name = type(layer).__name__
    if not isinstance(state, State):
        raise ValueError(f"state must be a decode state from {name}.init_state(batch_size), got {type(state).__name__}")
    B = x.shape[0]
    passed = state.__dict__.get("_fits", frozenset())
    if (id(layer), B) in passed:
        return
    try:
        expected = layer.init_state(B, device="meta")
    except NotImplementedError:
        raise ValueError(f"{name} does not decode: call it without a state") from None
    if type(state) is not type(expected):
        raise ValueError(f"state is a {type(state).__name__}, built by another mechanism's init_state; {name} decodes "
                         f"with a {type(expected).__name__}: use layer.init_state({B})")
    differences = _differences(state._constructed, expected._constructed)
    if differences:
        raise ValueError(f"state was built for another batch size or layer shape than this {name} with a batch of "
                         f"B={B}: {'; '.join(differences)}; use layer.init_state({B})")
    state._fits = passed | {(id(layer), B)}


#: built with any value: a KV cache's preallocated length is the caller's choice
_FREE = {"offset", "max_len"}


def _differences(got: dict, expected: dict, prefix: str = "") -> list[str]:
    """What differs between two states' recorded construction (tensor shapes, sizes), as text."""
    out = []
    for key in expected.keys() | got.keys():
        if key in _FREE:
            continue
        label = f"{prefix}{key}"
        a, b = got.get(key), expected.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{label}.")
        elif isinstance(a, (Tensor, _Constant)) and isinstance(b, (Tensor, _Constant)):
            if tuple(a.shape) != tuple(b.shape):
                out.append(f"{label} has shape {tuple(a.shape)}, needs {tuple(b.shape)}")
        elif isinstance(a, (Tensor, _Constant)) or isinstance(b, (Tensor, _Constant)) or a != b:
            out.append(f"{label}={_short(a)}, needs {_short(b)}")
    return sorted(out)


def _short(value) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, (Tensor, _Constant)) else repr(value)


class AttentionLayer(nn.Module):
    """Base class: ``forward(x, state=None, *, document_ids=None)`` and ``init_state``."""

    dim: int

    def __init_subclass__(cls, **kwargs):
        # every layer's own init_state checks batch_size first: a negative or fractional size
        # otherwise fails deep inside torch.empty, and 0 builds a state no forward accepts
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("init_state")
        if own is not None and not getattr(own, "_checks_batch_size", False):

            @functools.wraps(own)
            def init_state(self, batch_size, *args, **options):
                positive_int(batch_size, "batch_size")
                return own(self, batch_size, *args, **options)

            init_state._checks_batch_size = True
            cls.init_state = init_state

    def init_state(self, batch_size: int, *, max_len: int | None = None, device=None, dtype=None) -> State:
        raise NotImplementedError(f"{type(self).__name__} does not decode")

    def forward(self, x: Tensor, state: State | None = None, *, document_ids: Tensor | None = None) -> Tensor:
        raise NotImplementedError
