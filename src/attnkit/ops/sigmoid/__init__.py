"""Sigmoid attention: :func:`sigmoid_attend` with its reference and dispatch (``attend``) beside
its Triton forward and backward kernels (``sigmoid_triton``)."""

from .attend import SIGMOID_BACKENDS, choose_sigmoid_backend, sigmoid_attend, sigmoid_attend_reference

__all__ = ["sigmoid_attend", "sigmoid_attend_reference", "choose_sigmoid_backend", "SIGMOID_BACKENDS"]
