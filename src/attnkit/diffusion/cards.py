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

from .latentwarp import LatentWarp  # noqa: E402

CARDS += (
    Card("latentwarp", "LatentWarp: Consistent Diffusion Latents for Zero-Shot Video-to-Video Translation",
         "2311.00353", "diffusion", LatentWarp, sharing_flops(1.0), defaults={"frames": 2}, kind="diffusion",
         capabilities=_CAPS,
         summary="a clip's frames as a batch: each frame's keys / values replaced by the anchor and previous "
                 "frame's, and the latents warped from the previous frame along the source flow (occlusion-masked)"),
)
