"""The diffusion methods' cards (``kind="diffusion"``): one per method, listed explicitly here.

``layer`` is the method class (a :class:`attnkit.diffusion.Sharing`), built by
``attnkit.diffusion.apply(pipe, name, **options)``. The FLOP model counts the attention core of
one attention layer of width ``dim`` with ``num_heads`` heads over ``seq`` tokens per image, for a
batch of ``batch`` images under the method: sharing with a reference makes each target attend to
``1 + shared`` times the keys (``config["shared_fraction"]``: the share of the sequence that is
shared, the image tokens)."""

from __future__ import annotations

from ..cards import Capabilities, Card, FlopCount
from .sharing import SharedAttention, Sharing

__all__ = ["CARDS", "sharing_flops"]

_CAPS = Capabilities(causal=False, bidirectional=True, decode=False, varlen=False, backends=("reference", "sdpa", "flex"))


def sharing_flops(extra_keys: float):
    """A FLOP model where each query attends to ``(1 + extra_keys) * seq`` keys."""

    def flops(batch: int, seq: int, config: dict) -> FlopCount:
        dim = config["dim"]
        keys = seq * (1 + extra_keys * config.get("shared_fraction", 1.0))
        return FlopCount(attention_fwd=4.0 * batch * seq * keys * dim, projection_fwd=0.0)

    return flops


CARDS = (
    Card("plain", "Plain attention (the model's own, through attnkit's processors)", None, "diffusion", Sharing,
         sharing_flops(0.0), kind="diffusion", capabilities=_CAPS,
         summary="the stock attention of every block: the switch-off baseline"),
    Card("shared-kv", "Style Aligned Image Generation via Shared Attention", "2312.02133", "diffusion",
         SharedAttention, sharing_flops(1.0), defaults={"reference": 0}, kind="diffusion", capabilities=_CAPS,
         summary="targets also attend to a reference image's keys and values (optionally AdaIN on q / k): "
                 "StyleAligned, AlignedGen's naive-sharing baseline"),
)

from .alignedgen import AlignedGen  # noqa: E402  (appended per method: union-merge friendly)
CARDS += (Card("alignedgen", "AlignedGen: Aligning Style Across Generated Images", "2509.17088", "diffusion",
               AlignedGen, sharing_flops(1.0), defaults={"reference": 0}, kind="diffusion", capabilities=_CAPS,
               summary="targets also attend to the reference's image keys at shifted RoPE positions (ShiftPE), "
                       "AdaIN on q / k, a logit scale, in FLUX's single blocks"),)
from .freecus import FreeCus  # noqa: E402
CARDS += (Card("freecus", "FreeCus: Free Lunch Subject-driven Customization in Diffusion Transformers", "2507.15249",
               "diffusion", FreeCus, sharing_flops(1.0), defaults={"reference": 0}, kind="diffusion",
               capabilities=_CAPS,
               summary="in pivotal modules only, targets also attend to a reference subject's keys and values "
                       "(scaled), the reference noised with FLUX's sigma shift negated"),)
from .rf_edit import RFEdit  # noqa: E402
CARDS += (Card("rf-edit", "Taming Rectified Flow for Inversion and Editing (RF-Edit)", "2411.04746", "diffusion",
               RFEdit, sharing_flops(0.0), defaults={"inject": 2, "single_from": 20}, kind="diffusion",
               capabilities=_CAPS,
               summary="the inversion's attention values replace the sampling pass's in the late single blocks "
                       "of the first sampling steps (use with attnkit.diffusion.rf_solver)"),)
from .irdiffusion import IRDiffusion  # noqa: E402

CARDS = CARDS + (
    Card("ir-diffusion", "Improving Multi-Subject Consistency in Open-Domain Image Generation with Isolation and "
         "Reposition Attention", "2411.19261", "diffusion", IRDiffusion, sharing_flops(1.0),
         defaults={"references": (0,), "target_row": 1, "reference_masks": ((0, 0, 1, 1),),
                   "target_masks": ((0, 0, 1, 1),)}, kind="diffusion", capabilities=_CAPS,
         summary="the target's subjects attend only to their own reference subject, scaled and moved onto the "
                 "target's subject (resampled, re-rotated), and not to each other (isolation)"),
)

from .diffuhaul import DiffUHaul  # noqa: E402

CARDS = CARDS + (
    Card("diffuhaul", "DiffUHaul: A Training-Free Method for Object Dragging in Images", "2406.01594", "diffusion",
         DiffUHaul, sharing_flops(1.0), defaults={"source_mask": (0, 0, 1, 1), "translation": (0, 0)},
         kind="diffusion", capabilities=_CAPS,
         summary="drags an object: a source pass records keys and values, the target pass shares them with the "
                 "object moved, masks object and background apart, and anchors early steps to the source"),
)

from .latentwarp import LatentWarp  # noqa: E402

CARDS += (
    Card("latentwarp", "LatentWarp: Consistent Diffusion Latents for Zero-Shot Video-to-Video Translation",
         "2311.00353", "diffusion", LatentWarp, sharing_flops(1.0), defaults={"frames": 2}, kind="diffusion",
         capabilities=_CAPS,
         summary="a clip's frames as a batch: each frame's keys / values replaced by the anchor and previous "
                 "frame's, and the latents warped from the previous frame along the source flow (occlusion-masked)"),
)

from .ditctrl import DiTCtrl  # noqa: E402

CARDS += (
    Card("ditctrl", "DiTCtrl: Exploring Attention Control in Multi-Modal Diffusion Transformer for Tuning-Free "
         "Multi-Prompt Longer Video Generation", "2412.18597", "diffusion", DiTCtrl, sharing_flops(0.0),
         defaults={}, kind="diffusion", capabilities=_CAPS,
         summary="multi-prompt video: the next prompt's segment attends to the previous segment's keys and values, "
                 "foreground to foreground and background to background by the object's cross-attention mask; "
                 "overlapping windows' latents blended with triangular weights (sample_multi_prompt)"),
)

from .video_infinity import VideoInfinity  # noqa: E402


def _video_infinity_flops(batch: int, seq: int, config: dict) -> FlopCount:
    """``seq``: a clip's frames F; each query attends to F + 2 * local + G keys (G global frames)."""
    frames, stride = config.get("frames", seq * config.get("clips", 1)), config.get("global_stride")
    keys = seq + 2 * config.get("local", 0) + (0 if stride is None else -(-frames // stride))
    return FlopCount(attention_fwd=4.0 * batch * seq * keys * config["dim"], projection_fwd=0.0)


CARDS += (
    Card("video-infinity", "Video-Infinity: Distributed Long Video Generation", "2406.16260", "diffusion",
         VideoInfinity, _video_infinity_flops, defaults={"frames": 16, "clips": 2, "local": 1, "global_stride": 4},
         kind="diffusion", capabilities=_CAPS,
         summary="a long video cut into clips, one per rank (clip parallelism, torch.distributed); each clip's "
                 "temporal attention also sees the neighbour clips' edge frames and strided global frames "
                 "(dual-scope attention)"),
)

from .idol import IDOLMaps  # noqa: E402

CARDS += (
    Card("idol", "IDOL: Unified Dual-Modal Latent Diffusion for Human-Centric Joint Video-Depth Generation",
         "2407.10937", "diffusion", IDOLMaps, sharing_flops(0.0), kind="diffusion", capabilities=_CAPS,
         summary="training-side: one denoiser for RGB and depth clips (modality label, cross-modal attention "
                 "between the streams, motion- and cross-attention-map-consistency losses; "
                 "attnkit.diffusion.idol); this processor records the text-to-image maps L_xattn needs"),
)
