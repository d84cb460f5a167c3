"""The methods of ``attnkit.diffusion`` by name: ``apply(pipe, "shared-kv", reference=0)``.

One entry per method file; :func:`build` turns a name and options into the method object with a
``ValueError`` for an unknown name or option."""

from __future__ import annotations

import inspect

from .sharing import SharedAttention, Sharing

__all__ = ["METHODS", "build"]

METHODS: dict[str, type] = {
    "plain": Sharing,
    "shared-kv": SharedAttention,
}

from .latentwarp import LatentWarp  # noqa: E402

METHODS["latentwarp"] = LatentWarp


def build(name: str, **options) -> Sharing:
    """The method registered as ``name``, built with ``options``."""
    if name not in METHODS:
        raise ValueError(f"unknown attnkit.diffusion method {name!r}; accepted: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(k for k in options if k not in params or k == "self")
    if unknown:
        accepted = sorted(k for k, p in params.items() if k != "self" and p.kind is not p.VAR_KEYWORD)
        raise ValueError(f"method {name!r} does not take option(s) {unknown}; accepted: {', '.join(accepted)}")
    return cls(**options)

from .alignedgen import AlignedGen  # noqa: E402  (appended per method file: union-merge friendly)
METHODS["alignedgen"] = AlignedGen
from .freecus import FreeCus  # noqa: E402
METHODS["freecus"] = FreeCus
from .rf_edit import RFEdit  # noqa: E402
METHODS["rf-edit"] = RFEdit

from .irdiffusion import IRDiffusion  # noqa: E402

METHODS["ir-diffusion"] = IRDiffusion

from .diffuhaul import DiffUHaul  # noqa: E402

METHODS["diffuhaul"] = DiffUHaul

from .ditctrl import DiTCtrl  # noqa: E402

METHODS["ditctrl"] = DiTCtrl
from .video_infinity import VideoInfinity  # noqa: E402

METHODS["video-infinity"] = VideoInfinity
from .idol import IDOLMaps  # noqa: E402

METHODS["idol"] = IDOLMaps
