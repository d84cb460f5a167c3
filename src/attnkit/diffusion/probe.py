"""An attribute probe: a small CNN that reads a scene's attributes back from an image.

The diffusion subject (:mod:`attnkit.diffusion.subject`) draws :mod:`attnkit.diffusion.scenes`;
this probe, trained on the renderer's own clean images, says which style, shape, colour, size and
grid cell an image shows and where the object's centre is. It turns an attention-sharing method's
effect into numbers: the fraction of a batch that shares the style AlignedGen is meant to share
(:func:`consistency`), whether a DiffUHaul move put the object where it was asked (``centre``),
whether a generated image shows what its caption says (:func:`accuracy`).

Architecture: the image and two coordinate channels (x, y in [-1, 1], so that position survives the
pooling) -> five 3x3 conv stages with GroupNorm and GELU (two of them halve the side) -> an average
pool to 4x4 (where) beside a global max pool (what) -> a 128-wide hidden layer -> one classification
head per attribute of
:data:`~attnkit.diffusion.scenes.ATTRIBUTES` (``position`` is the cell 0..8) and a centre head
(x, y in image fractions, through a sigmoid). Training adds Gaussian noise of a random level
(std up to 0.1) to the images, so a slightly imperfect generated image still reads.

Train (seconds on the H200, about a minute on a CPU at 32x32)::

    python -m attnkit.diffusion.probe train --out src/attnkit/diffusion/probe_model --size 32 --steps 2000 --device cuda

(the shipped probe, :data:`DEFAULT_PATH`: 16 s on the H200, held-out accuracy 1.000 on style, size,
colour and shape, 0.998 on the grid cell, centre error 0.010 of the image side)

and use::

    >>> probe = load("probe")
    >>> out = read(probe, images)                 # {"style": (B,), ..., "position": (B,), "centre": (B, 2)}
    >>> accuracy(probe, images, scenes)           # {"style": 1.0, ..., "centre_error": 0.01}
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._console import write_atomic
from .scenes import ATTRIBUTES, COLOURS, POSITIONS, SHAPES, SIZES, STYLES, Scene, SceneBatch, check_size, render_batch, sample_scenes

__all__ = ["DEFAULT_PATH", "Probe", "train_probe", "read", "read_scenes", "accuracy", "consistency", "save", "load", "main"]

_CLASSES = {"style": len(STYLES), "size": len(SIZES), "colour": len(COLOURS), "shape": len(SHAPES),
            "position": len(POSITIONS)}
_CENTRE_WEIGHT = 20.0  # the centre's MSE is ~1e-3 when good: weighed to matter beside the cross-entropies


class Probe(nn.Module):
    """The CNN for ``size`` x ``size`` images (a multiple of 8) with ``width`` channels in its first
    stage. :meth:`forward` maps images (B, 3, size, size) in [-1, 1] to a dict of logits (B, classes)
    per attribute and ``centre`` (B, 2) in image fractions."""

    def __init__(self, size: int = 32, width: int = 32):
        super().__init__()
        self.size = check_size(size)
        if isinstance(width, bool) or not isinstance(width, int) or width < 8 or width % 8:
            raise ValueError(f"width must be a positive multiple of 8, got {width!r}")
        self.width = width
        stage = lambda cin, cout, stride: nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.GELU())
        self.convs = nn.Sequential(stage(5, width, 1), stage(width, width, 1), stage(width, 2 * width, 2),
                                   stage(2 * width, 2 * width, 1), stage(2 * width, 4 * width, 2))  # (B, 4w, H/4, W/4)
        # a 4x4 average keeps where things are (position, centre); a global max says what is there
        # anywhere (shape, colour) without each of the 16 places having to learn it apart
        self.hidden = nn.Sequential(nn.Linear(4 * width * 17, 128), nn.GELU())
        self.heads = nn.ModuleDict({name: nn.Linear(128, n) for name, n in _CLASSES.items()})
        self.centre = nn.Linear(128, 2)
        c = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
        self.register_buffer("coords", torch.stack(torch.meshgrid(c, c, indexing="xy")), persistent=False)  # (2, H, W)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.size, self.size):
            raise ValueError(f"images must be (B, 3, {self.size}, {self.size}) for this probe, got {tuple(images.shape)}")
        x = torch.cat([images, self.coords.expand(images.shape[0], -1, -1, -1)], dim=1)  # (B, 5, H, W)
        maps = self.convs(x)
        pooled = torch.cat([F.adaptive_avg_pool2d(maps, 4).flatten(1), maps.amax(dim=(2, 3))], dim=1)  # (B, 4w * 17)
        hidden = self.hidden(pooled)
        out = {name: head(hidden) for name, head in self.heads.items()}
        out["centre"] = torch.sigmoid(self.centre(hidden))
        return out


def _loss(out: dict, labels: dict) -> tuple[torch.Tensor, dict]:
    parts = {name: F.cross_entropy(out[name], labels[name]) for name in ATTRIBUTES}
    parts["centre"] = _CENTRE_WEIGHT * F.mse_loss(out["centre"], labels["centre"])
    return sum(parts.values()), parts


def train_probe(steps: int = 2000, size: int = 32, device="cpu", *, seed: int = 0, batch_size: int = 128,
                width: int = 32, lr: float = 2e-3, noise: float = 0.1, spread: float = 0.5, progress=None) -> Probe:
    """A probe trained for ``steps`` AdamW steps (cosine-decayed ``lr``) on batches of freshly rendered
    scenes (``spread`` as in :func:`~attnkit.diffusion.scenes.sample_scenes`) with Gaussian noise of
    std uniform in [0, ``noise``]; returned in eval mode, its training
    record (loss curve, wall time) in ``probe.record``."""
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be a std in [0, 1], got {noise!r}")
    device = torch.device(device)
    torch.manual_seed(seed)  # the initial weights
    probe = Probe(size, width).to(device).train()
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    data = torch.Generator(device=device).manual_seed(seed)
    curve, start = [], time.perf_counter()
    log_every = max(1, steps // 20)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        with torch.no_grad():
            batch = sample_scenes(batch_size, data, spread)
            images = render_batch(batch, size)["image"]
            level = torch.rand(batch_size, 1, 1, 1, generator=data, device=device) * noise
            images = images + level * torch.randn(images.shape, generator=data, device=device)
        loss, _ = _loss(probe(images), batch.labels())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            curve.append([step + 1, round(loss.item(), 5)])
            if progress:
                progress(f"probe step {step + 1}/{steps}  loss {loss.item():.4f}  {time.perf_counter() - start:.0f} s")
    probe.record = {"steps": steps, "size": size, "width": width, "batch_size": batch_size, "lr": lr, "noise": noise,
                    "spread": spread, "seed": seed, "curve": curve, "wall_s": round(time.perf_counter() - start, 1)}
    return probe.eval()


@torch.no_grad()
def read(probe: Probe, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The probe's reading of images (B, 3, size, size) in [-1, 1]: an index (B,) per attribute of
    :data:`~attnkit.diffusion.scenes.ATTRIBUTES` (into STYLES, SIZES, ...; ``position`` the cell
    ``row * 3 + col``) and ``centre`` (B, 2), ``(x, y)`` in image fractions."""
    out = probe(images.to(next(probe.parameters()).device, torch.float32))
    readout = {name: out[name].argmax(dim=1) for name in ATTRIBUTES}
    readout["centre"] = out["centre"]
    return readout


def read_scenes(probe: Probe, images: torch.Tensor) -> list[Scene]:
    """The probe's reading as scenes (the object at the read centre; the cell head is not used)."""
    r = {k: v.cpu() for k, v in read(probe, images).items()}
    return SceneBatch(r["style"], r["shape"], r["colour"], r["size"], r["centre"].clamp(0, 1)).scenes()


def _labels(scenes) -> dict[str, torch.Tensor]:
    batch = scenes if isinstance(scenes, SceneBatch) else SceneBatch.of(scenes)
    return {k: v.cpu() for k, v in batch.labels().items()}


def accuracy(probe: Probe, images: torch.Tensor, scenes) -> dict[str, float]:
    """How well the probe reads images (B, 3, size, size) of ``scenes`` (a list of Scene or a
    SceneBatch): the fraction right per attribute, and ``centre_error``, the mean distance between
    read and true centres in image fractions."""
    labels = _labels(scenes)
    if labels["style"].shape[0] != images.shape[0]:
        raise ValueError(f"images and scenes must match one to one, got {images.shape[0]} images and "
                         f"{labels['style'].shape[0]} scenes")
    r = {k: v.cpu() for k, v in read(probe, images).items()}
    out = {name: float((r[name] == labels[name]).float().mean()) for name in ATTRIBUTES}
    out["centre_error"] = float((r["centre"] - labels["centre"]).norm(dim=1).mean())
    return out


def consistency(probe: Probe, images: torch.Tensor) -> dict[str, float]:
    """Per attribute, the fraction of the batch that shares its most common reading: 1.0 when every
    image shows one style (what AlignedGen aims at), 1/B at the least when all differ."""
    r = read(probe, images)
    return {name: float(r[name].bincount().max()) / r[name].shape[0] for name in ATTRIBUTES}


def save(probe: Probe, out) -> Path:
    """Write ``probe.safetensors`` and ``probe.json`` (size, width, training record) into ``out``."""
    from safetensors.torch import save as safetensors_bytes

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in probe.state_dict().items()}
    write_atomic(out / "probe.safetensors", safetensors_bytes(state))
    meta = {"size": probe.size, "width": probe.width, "record": getattr(probe, "record", {})}
    write_atomic(out / "probe.json", (json.dumps(meta, indent=2) + "\n").encode())
    return out


#: the shipped probe (32x32, trained on the H200 by the command in the module docstring)
DEFAULT_PATH = Path(__file__).resolve().parent / "probe_model"


def load(path=None, device="cpu") -> Probe:
    """The probe saved in ``path`` (default: the shipped :data:`DEFAULT_PATH`), in eval mode."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DEFAULT_PATH
    if not (path / "probe.json").is_file() or not (path / "probe.safetensors").is_file():
        raise FileNotFoundError(f"{path} holds no probe (probe.json and probe.safetensors); train one: "
                                f"python -m attnkit.diffusion.probe train --out {path}")
    meta = json.loads((path / "probe.json").read_text())
    probe = Probe(meta["size"], meta["width"])
    probe.load_state_dict(load_file(str(path / "probe.safetensors")))
    probe.record = meta.get("record", {})
    return probe.to(device).eval()


def main(argv=None) -> int:
    """``python -m attnkit.diffusion.probe train --out DIR [--size 32] [--steps 2000] [--device cuda]``"""
    parser = argparse.ArgumentParser(prog="python -m attnkit.diffusion.probe",
                                     description="Train the attribute probe of attnkit's scenes.")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a probe, check it on held-out scenes and save it")
    tr.add_argument("--out", required=True)
    tr.add_argument("--size", type=int, default=32)
    tr.add_argument("--steps", type=int, default=2000)
    tr.add_argument("--batch-size", type=int, default=128)
    tr.add_argument("--width", type=int, default=32)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        probe = train_probe(args.steps, args.size, args.device, seed=args.seed, batch_size=args.batch_size,
                            width=args.width, progress=lambda line: print(line, flush=True))
        held_out = sample_scenes(1000, torch.Generator().manual_seed(args.seed + 1_000_003))
        scores = accuracy(probe, render_batch(held_out, args.size)["image"], held_out)
        probe.record["held_out"] = {k: round(v, 4) for k, v in scores.items()}
        save(probe, args.out)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("held-out accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
