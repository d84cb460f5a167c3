"""Procedural image classification for the vision modules (LookupViT, attentive probes, concept slots).

Images are :mod:`attnkit.tasks.scenes` renders (one object of a shape, colour and size at a position,
on a textured background *style*), so every label and every object mask is known. A classifier reads
the image as patch tokens; the object covers a few of them, the background the rest, which is what the
three modules are about: compressing many tokens into few (LookupViT), aggregating patch features by
attention instead of a mean (probing), and reading which concept slots, and so which patches, a
prediction used (Concept-Centric Transformers).

    >>> task = ImageTask(label="shape", size=32, patch=4)
    >>> data = task.split(train=256, test=64, seed=0)
    >>> data["train"]["tokens"].shape      # (256, 64, 48): 8 x 8 patches of 4 x 4 x 3 pixels
    >>> data["train"]["mask"].shape        # (256, 64): the object's pixel fraction in each patch

Frozen features for probing (:class:`FrozenPatchEncoder`): a small ViT with **fixed random weights**
(seeded), not a trained one. No pretrained encoder can be downloaded here, and training a
masked-image-modelling encoder is beyond a CPU budget; a random ViT keeps each patch's content in its
token (residual blocks of random attention mix only a little), so its features are *local*, as the
patch features of MIM encoders are, which is the regime where the probing paper finds attentive
probing matters most (linear probing of a mean-pooled representation dilutes the small object among
the background patches). The encoder is deterministic given its seed, so probes of different kinds
see the same features.
"""

from __future__ import annotations

import torch
from torch import nn

from . import scenes as _scenes

__all__ = ["LABELS", "ImageTask", "patchify", "patch_fraction", "FrozenPatchEncoder", "sincos_positions"]

#: the attributes a task can classify (``position``: the 3 x 3 cell of the object's centre)
LABELS = ("shape", "colour", "style", "position", "size")
_CLASSES = {"shape": len(_scenes.SHAPES), "colour": len(_scenes.COLOURS), "style": len(_scenes.STYLES),
            "position": 9, "size": len(_scenes.SIZES)}


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``images`` (B, C, H, W) -> tokens (B, (H/p) * (W/p), C * p * p), row-major over the patch grid."""
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    B, C, H, W = images.shape
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1 or H % patch or W % patch:
        raise ValueError(f"patch must be a positive int dividing the image side {H}x{W}, got {patch!r}")
    x = images.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // patch) * (W // patch), C * patch * patch)


def patch_fraction(mask: torch.Tensor, patch: int) -> torch.Tensor:
    """``mask`` (B, 1, H, W) in {0, 1} -> (B, N): the fraction of each patch's pixels on the object."""
    return patchify(mask, patch).mean(-1)


def sincos_positions(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings (grid * grid, dim), half the channels per axis."""
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4 for 2-D sine-cosine positions, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    parts = []
    for axis in (ys.reshape(-1), xs.reshape(-1)):
        angle = axis[:, None] * omega[None]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).float()


class ImageTask:
    """Classify one attribute (:data:`LABELS`) of procedural scenes from patch tokens.

    Args:
        label: the attribute to classify (``shape`` by default: it needs the object's outline,
            which only a few patches hold).
        size: image side in pixels (a multiple of ``patch``).
        patch: patch side in pixels; tokens have ``3 * patch * patch`` channels.
        spread: the fraction of scenes whose object sits anywhere in its cell (else near its centre).
    """

    def __init__(self, label: str = "shape", size: int = 32, patch: int = 4, spread: float = 0.5):
        if label not in LABELS:
            raise ValueError(f"label must be one of {', '.join(LABELS)}, got {label!r}")
        size = _scenes.check_size(size)
        if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1 or size % patch:
            raise ValueError(f"patch must be a positive int dividing size={size}, got {patch!r}")
        if not 0.0 <= float(spread) <= 1.0:
            raise ValueError(f"spread must be a fraction in [0, 1], got {spread!r}")
        self.label, self.size, self.patch, self.spread = label, size, patch, float(spread)
        self.grid = size // patch
        self.num_tokens = self.grid * self.grid
        self.token_dim = 3 * patch * patch
        self.num_classes = _CLASSES[label]

    def batch(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``n`` fresh examples: ``image`` (n, 3, H, W), ``tokens`` (n, N, 3 p p), ``mask`` (n, N) the
        object's pixel fraction per patch, ``label`` (n,) and ``labels`` (every attribute)."""
        scenes = _scenes.sample_scenes(n, generator, spread=self.spread)
        out = _scenes.render_batch(scenes, self.size)
        labels = scenes.labels()
        return {"image": out["image"], "tokens": patchify(out["image"], self.patch),
                "mask": patch_fraction(out["mask"], self.patch), "label": labels[self.label],
                "labels": {k: labels[k] for k in LABELS}}

    def split(self, train: int = 2048, test: int = 512, seed: int = 0) -> dict[str, dict]:
        """A train and a test set drawn from disjoint generator streams of ``seed``."""
        for name, value in (("train", train), ("test", test)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        g_train = torch.Generator().manual_seed(2 * seed)
        g_test = torch.Generator().manual_seed(2 * seed + 1)
        return {"train": self.batch(train, g_train), "test": self.batch(test, g_test)}


class FrozenPatchEncoder(nn.Module):
    """A small ViT with fixed random weights (seeded): patch tokens (B, N, 3 p p) -> features (B, N, C).

    Pre-norm blocks (MHA + GELU MLP) on a linear patch embedding plus 2-D sine-cosine positions; every
    parameter is frozen (``requires_grad=False``). See the module docstring for why random.
    """

    def __init__(self, token_dim: int, grid: int, dim: int = 64, depth: int = 2, num_heads: int = 4, seed: int = 0):
        super().__init__()
        for name, value in (("token_dim", token_dim), ("grid", grid), ("dim", dim), ("depth", depth),
                            ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)  # the weights are a function of the seed only
        try:
            self.embed = nn.Linear(token_dim, dim)
            self.blocks = nn.ModuleList(
                nn.TransformerEncoderLayer(dim, num_heads, 2 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True) for _ in range(depth))
            self.norm = nn.LayerNorm(dim)
        finally:
            torch.random.set_rng_state(generator_state)
        self.register_buffer("positions", sincos_positions(grid, dim), persistent=False)
        self.grid, self.dim = grid, dim
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # frozen: always in eval mode (no dropout anyway)
        return super().train(False)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 3 or tokens.shape[1] != self.grid * self.grid:
            raise ValueError(f"tokens must be (B, {self.grid * self.grid}, token_dim), got {tuple(tokens.shape)}")
        x = self.embed(tokens) + self.positions
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    @torch.no_grad()
    def features(self, tokens: torch.Tensor, batch: int = 512) -> torch.Tensor:
        """:meth:`forward` over ``tokens`` in chunks of ``batch`` (the whole data set at once)."""
        return torch.cat([self(tokens[i:i + batch]) for i in range(0, tokens.shape[0], batch)])

