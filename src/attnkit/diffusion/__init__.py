"""attnkit.diffusion: attention sharing for diffusers pipelines (needs ``attnkit[diffusion]``).

:func:`apply` sets attnkit's attention processors on a pipeline's denoiser (FLUX-style
transformers, UNets) and hands each attention call to a method, which decides what each image's
queries attend to; ``remove()`` (or leaving ``with``) restores the pipeline. See
docs/diffusion.md."""

from __future__ import annotations

try:
    import diffusers as _diffusers  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised where the extra is missing
    raise ImportError('attnkit.diffusion needs diffusers: pip install "attnkit[diffusion]"') from err

from .cards import CARDS
from .methods import METHODS, build
from .sharing import (AttnCall, Handle, KVBank, SharedAttention, Sharing, Site, adain, apply, attention_modules,
                      rows)

__all__ = ["CARDS", "METHODS", "AttnCall", "Handle", "KVBank", "SharedAttention", "Sharing", "Site", "adain",
           "apply", "attention_modules", "build", "rows"]

from . import rf_solver  # noqa: E402  (RF-Solver: rectified-flow sampling and inversion, a module)
from .rf_solver import RFSolverScheduler  # noqa: E402

__all__ += ["rf_solver", "RFSolverScheduler"]
from .alignedgen import AlignedGen  # noqa: E402  (appended per method: union-merge friendly)
__all__ += ["AlignedGen"]
from .freecus import FreeCus  # noqa: E402
__all__ += ["FreeCus"]
from .rf_edit import RFEdit  # noqa: E402
__all__ += ["RFEdit"]
from .diffuhaul import DiffUHaul  # noqa: E402
from .irdiffusion import IRDiffusion  # noqa: E402

__all__ += ["DiffUHaul", "IRDiffusion"]
from . import flow  # noqa: E402  (optical flow, warping, occlusion: LatentWarp's classical estimator)
from .latentwarp import LatentWarp  # noqa: E402
__all__ += ["flow", "LatentWarp"]
from . import ditctrl  # noqa: E402  (DiTCtrl: multi-prompt video, KV sharing and latent blending)
from .ditctrl import DiTCtrl  # noqa: E402
__all__ += ["ditctrl", "DiTCtrl"]
from . import video_infinity  # noqa: E402  (clip parallelism: split_clips, denoise, shard_frames, gather_frames)
from .video_infinity import VideoInfinity  # noqa: E402
__all__ += ["video_infinity", "VideoInfinity"]
from . import idol  # noqa: E402  (IDOL: joint RGB + depth generation, a training-side method)
from .idol import IDOLMaps, IDOLModel  # noqa: E402
__all__ += ["idol", "IDOLMaps", "IDOLModel"]
