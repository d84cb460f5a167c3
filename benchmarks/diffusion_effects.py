"""Do the attention-sharing methods of ``attnkit.diffusion`` show their papers' effects on the shipped subject?

Every method runs against its no-sharing baseline on the same seeds and the same initial noise,
with the shipped subject (:func:`attnkit.diffusion.subject.load`: a 6-block FLUX transformer on
32x32 procedural scenes) and measured by the shipped attribute probe
(:func:`attnkit.diffusion.probe.load`). Per seed every metric is one number (the mean over that
seed's target images); the JSON reports, per metric, the mean, std and 95% CI (1.96 std / sqrt n)
over seeds for the baseline and the method, and the paired difference (method - baseline) with
its 95% CI, beside the direction the paper claims and whether the CI of the difference shows it.

Experiments (``--steps`` Euler steps of the subject, default 16, guidance 1: the subject's
attributes read back as well without classifier-free guidance, and one batch half keeps the
methods' row bookkeeping simple):

- ``alignedgen`` (and ``shared-kv``, StyleAligned's sharing with AdaIN, its naive baseline): groups of
  4 prompts of different objects; the first names its style, the others do not (a style the
  prompt leaves open is what sharing has to settle). Style agreement with the reference and the
  group's style consistency should rise; the prompted shape and colour should stay readable.
- ``freecus`` and ``ir-diffusion``: a reference image of one object; 2 target prompts with a new
  style and a new position that do not name the shape or colour. The reference's identity
  (shape and colour as the probe reads them) should appear in the targets; also a pixel distance
  of the object crop (over the reference's object mask).
- ``rf-edit``: invert a generated image with RF-Solver under its caption, sample back under the
  caption with another colour: the colour should change, style / shape / position stay, and the
  pixels outside the object move less than when sampling back without the value sharing.
- ``diffuhaul``: drag the object to another grid cell. The baseline is the paper's naive one:
  the same seed with the moved layout (here: the target position word in the caption) and no
  attention sharing; the method adds DiffUHaul's attention parts to that. Centre error to the
  target cell's centre, appearance (probe and object-crop pixels) and the background.
- ``latentwarp``: a clip of an object moving over a background restyled (SDEdit from t = 0.7, the
  same noise in every frame) frame by frame (baseline) or with LatentWarp's cross-frame
  attention and latent warping; the warping error of :func:`attnkit.diffusion.flow.warping_error`
  along the source clip's flow should fall, while the new style is kept.
- ``rf-solver``: generated images inverted then reconstructed with RF-Solver-2 against Euler at
  equal model evaluations (``--nfe``); the reconstruction error should be lower with RF-Solver.

Run (CPU, one thread; the full run takes about 12 minutes of CPU time, 710 s in the committed record)::

    PYTHONPATH=src nice -n 10 python benchmarks/diffusion_effects.py \\
        --out benchmarks/results/cpu/diffusion-effects.json

``--quick`` (4 seeds, 8 steps, smaller groups) checks the wiring in seconds; ``--methods`` picks
experiments; grids ``diffusion-grid-<method>.png`` go beside the JSON (``--grid-dir``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import attnkit.diffusion as ad
from attnkit.diffusion import flow as flowlib
from attnkit.diffusion import probe as probelib
from attnkit.diffusion import rf_solver as rfs
from attnkit.diffusion import subject as subj
from attnkit.diffusion.alignedgen import AlignedGen
from attnkit.diffusion.diffuhaul import DiffUHaul
from attnkit.diffusion.freecus import FreeCus, flux_mu, reference_latents, reference_sigmas
from attnkit.diffusion.irdiffusion import IRDiffusion
from attnkit.diffusion.latentwarp import LatentWarp
from attnkit.diffusion.rf_edit import RFEdit
from attnkit.diffusion.sharing import SharedAttention
from attnkit.tasks import scenes as S

EXPERIMENTS = ("alignedgen", "freecus", "rf-edit", "diffuhaul", "latentwarp", "rf-solver")
# the result entries each experiment writes
RESULTS = {"alignedgen": ("shared-kv", "alignedgen"), "freecus": ("freecus", "ir-diffusion"), "rf-edit": ("rf-edit",),
           "diffuhaul": ("diffuhaul",), "latentwarp": ("latentwarp",), "rf-solver": ("rf-solver",)}
# a grid per method (alignedgen's experiment also writes shared-kv's, freecus's also ir-diffusion's)
GRID_SEEDS = 3

# -- metrics (pure functions of tensors; tests/diffusion/test_effects.py checks them) --------------------


def summary(values) -> dict:
    """Mean, std (n - 1), 95% CI half-width (1.96 std / sqrt n) and n of per-seed values."""
    x = torch.as_tensor([float(v) for v in values], dtype=torch.float64)
    if x.numel() == 0:
        raise ValueError("summary needs at least one value")
    n = x.numel()
    std = float(x.std()) if n > 1 else 0.0
    return {"mean": float(x.mean()), "std": std, "ci95": 1.96 * std / math.sqrt(n), "n": n}


def paired(baseline, method) -> dict:
    """The per-seed difference method - baseline: its :func:`summary`."""
    if len(baseline) != len(method):
        raise ValueError(f"paired values need one baseline per method value, got {len(baseline)} and {len(method)}")
    return summary([m - b for b, m in zip(baseline, method)])


def shows(diff: dict, direction: str) -> str:
    """``"yes"`` when the 95% CI of the paired difference lies on the claimed side of 0, ``"no"``
    when it lies on the other side, ``"unclear"`` when it holds 0."""
    if direction not in ("up", "down"):
        raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
    lo, hi = diff["mean"] - diff["ci95"], diff["mean"] + diff["ci95"]
    if (direction == "up" and lo > 0) or (direction == "down" and hi < 0):
        return "yes"
    if (direction == "up" and hi < 0) or (direction == "down" and lo > 0):
        return "no"
    return "unclear"


def agreement(values: torch.Tensor, reference: int = 0) -> float:
    """The fraction of the other entries of ``values`` (B,) equal to ``values[reference]``."""
    if values.dim() != 1 or values.numel() < 2:
        raise ValueError(f"values must be 1-D with at least 2 entries, got {tuple(values.shape)}")
    others = torch.cat([values[:reference], values[reference + 1:]])
    return float((others == values[reference]).float().mean())


def consistency(values: torch.Tensor) -> float:
    """The fraction of ``values`` (B,) that share the most common one (1.0: all equal; 1/B: all differ)."""
    if values.dim() != 1 or values.numel() < 1:
        raise ValueError(f"values must be 1-D and non-empty, got {tuple(values.shape)}")
    return float(values.bincount().max()) / values.numel()


def centre_error(read: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Distance (B,) between read and target centres (B, 2), in image fractions."""
    if read.shape != target.shape or read.dim() != 2 or read.shape[1] != 2:
        raise ValueError(f"centres must both be (B, 2), got {tuple(read.shape)} and {tuple(target.shape)}")
    return (read.float() - target.float()).norm(dim=1)


def crop(images: torch.Tensor, centres: torch.Tensor, half: int) -> torch.Tensor:
    """Windows (B, C, 2 half, 2 half) of images (B, C, H, W) around centres (B, 2) (x, y in image
    fractions), shifted inside the image where a centre is near the border."""
    B, C, H, W = images.shape
    out = []
    for img, (x, y) in zip(images, centres.tolist()):
        cx = min(max(round(x * W), half), W - half)
        cy = min(max(round(y * H), half), H - half)
        out.append(img[:, cy - half:cy + half, cx - half:cx + half])
    return torch.stack(out)


def masked_mse(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per image (B,): the mean squared difference of a and b (B, C, H, W) over the pixels where
    ``keep`` (B, 1, H, W) is True (0 where none is)."""
    if a.shape != b.shape or keep.shape != (a.shape[0], 1, *a.shape[2:]):
        raise ValueError(f"a, b must be (B, C, H, W) alike and keep (B, 1, H, W), got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}, {tuple(keep.shape)}")
    k = keep.to(a.dtype)
    err = ((a - b) ** 2).mean(1, keepdim=True) * k
    return err.flatten(1).sum(1) / k.flatten(1).sum(1).clamp_min(1)


def token_mask(pixel_mask: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """A pixel mask (H, W) as a mask over the token grid (H / patch, W / patch): a token is in
    when any of its pixels is."""
    H, W = pixel_mask.shape
    return pixel_mask.reshape(H // patch, patch, W // patch, patch).any(3).any(1)


def dilate(mask: torch.Tensor, pixels: int = 1) -> torch.Tensor:
    """Boolean masks (B, 1, H, W) grown by ``pixels`` (a square structuring element)."""
    k = 2 * pixels + 1
    return torch.nn.functional.max_pool2d(mask.float(), k, stride=1, padding=pixels) > 0


def object_box(centre, size: str, grid: int) -> tuple[int, int, int, int]:
    """The token box (y0, x0, y1, x1), half-open, of an object of ``size`` centred at ``centre``
    (x, y) in image fractions, on a grid of ``grid`` x ``grid`` tokens."""
    half = S._HALF_EXTENT[S.SIZES.index(size)]
    x, y = centre
    y0, x0 = max(math.floor((y - half) * grid), 0), max(math.floor((x - half) * grid), 0)
    y1, x1 = min(math.ceil((y + half) * grid), grid), min(math.ceil((x + half) * grid), grid)
    return y0, x0, y1, x1


# -- the subject ---------------------------------------------------------------------------------------


def caption(scene: S.Scene, drop=()) -> str:
    return " ".join(S.caption_words(scene, drop))


def noise_of(seed: int, n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def pick(g: torch.Generator, values, exclude=()) -> str:
    values = [v for v in values if v not in exclude]
    return values[int(torch.randint(len(values), (1,), generator=g))]


@torch.no_grad()
def euler(model, captions, noise, steps: int, *, start: int = 0, before=None, x=None) -> torch.Tensor:
    """The subject's Euler sampler (:func:`attnkit.diffusion.subject.sample`) from step ``start``
    (tokens ``x`` given there, else the noise), with ``before(i, x) -> x`` called before step i
    (FreeCus's reference latents, LatentWarp's alignment). Returns images (B, 3, H, W)."""
    grid = subj.timesteps(steps)
    size = model.config.image_size
    v = subj.velocity_fn(model, captions)
    x = model.pack(noise.float()) if x is None else x
    for i in range(start, steps):
        if before is not None:
            x = before(i - start, x)
        x = x + float(grid[i + 1] - grid[i]) * v(x, float(grid[i]))
    return model.unpack(x, size, size).clamp(-1, 1)


class Run:
    """What every experiment shares: the subject, the probe, the options and the grids."""

    def __init__(self, model, probe, *, seeds: int, steps: int, quick: bool, grid_dir: Path | None,
                 first: int = 0):
        self.model, self.probe, self.seeds, self.steps, self.quick = model, probe, seeds, steps, quick
        self.first, self.end = first, first + seeds  # this run's seeds: first .. end - 1
        self.grid_dir = grid_dir
        self.size = model.config.image_size
        self.tokens = self.size // 2
        self.grids: dict[str, str] = {}

    def read(self, images):
        return {k: v.cpu() for k, v in probelib.read(self.probe, images).items()}

    def grid(self, name: str, rows: list[torch.Tensor], columns: int) -> None:
        if self.grid_dir is None:
            return
        images = torch.cat(rows)
        path = self.grid_dir / f"diffusion-grid-{name}.png"
        subj.write_png(path, subj.image_grid(images, columns=columns, scale=4, pad=2))
        self.grids[name] = str(path)

    def object_mask(self, scene_read: S.Scene) -> torch.Tensor:
        """The pixel mask (1, H, W) of the object the probe read (rendered from its reading)."""
        return S.render(scene_read, self.size)["mask"] > 0.5


def result(rows: dict, claims: dict, seeds_used: int) -> dict:
    """rows: metric -> (baseline values, method values) per seed; claims: metric -> 'up' / 'down' /
    None (a check, not a claimed effect)."""
    out = {}
    for name, (base, meth) in rows.items():
        entry = {"baseline": summary(base), "method": summary(meth), "difference": paired(base, meth),
                 "values": {"baseline": list(base), "method": list(meth)}}
        if claims.get(name):
            entry["claim"] = claims[name]
            entry["shows"] = shows(entry["difference"], claims[name])
        out[name] = entry
    return {"n_seeds": seeds_used, "metrics": out}


# -- 1. AlignedGen and shared-kv ---------------------------------------------------------------------------


def exp_alignedgen(run: Run) -> dict:
    G = 3 if run.quick else 4  # prompts per group: the reference, then targets without a style word
    per_batch = 2  # groups per batch (chunks): 8 rows
    variants = {
        "baseline": None,
        # StyleAligned (AdaIN on q / k, the reference's image keys and values), every block: the naive baseline
        "shared-kv": lambda c: SharedAttention(0, adain=True, chunks=c),
        # the official defaults: single-stream blocks only (here 3 of 6 modules), lambda 1.1, ShiftPE, AdaIN
        "alignedgen": lambda c: AlignedGen(0, chunks=c),
    }
    metrics = {v: {m: [] for m in ("style_agreement", "style_consistency", "object_accuracy", "shape_accuracy",
                                   "colour_accuracy")} for v in variants}
    pictures = {v: [] for v in variants}
    for first in range(run.first, run.end, per_batch):
        seeds = list(range(first, min(first + per_batch, run.end)))
        caps, truth, noise = [], [], []
        for seed in seeds:
            g = torch.Generator().manual_seed(10_000 + seed)
            group = S.sample_scenes(G, g).scenes()
            truth.append(group)
            caps += [caption(group[0])] + [caption(s, drop=("style",)) for s in group[1:]]
            noise.append(noise_of(seed, G, run.size))
        noise = torch.cat(noise)
        for name, make in variants.items():
            if make is None:
                images = euler(run.model, caps, noise, run.steps)
            else:
                with ad.apply(run.model.transformer, make(len(seeds))):
                    images = euler(run.model, caps, noise, run.steps)
            r = run.read(images)
            for j, group in enumerate(truth):
                rows = slice(j * G, (j + 1) * G)
                style = r["style"][rows]
                m = metrics[name]
                m["style_agreement"].append(agreement(style, 0))
                m["style_consistency"].append(consistency(style))
                shape_ok = r["shape"][rows][1:] == torch.tensor([S.SHAPES.index(s.shape) for s in group[1:]])
                colour_ok = r["colour"][rows][1:] == torch.tensor([S.COLOURS.index(s.colour) for s in group[1:]])
                m["object_accuracy"].append(float((shape_ok & colour_ok).float().mean()))
                m["shape_accuracy"].append(float(shape_ok.float().mean()))
                m["colour_accuracy"].append(float(colour_ok.float().mean()))
            if first < GRID_SEEDS:
                pictures[name].append(images)
    claims = {"style_agreement": "up", "style_consistency": "up", "object_accuracy": None,
              "shape_accuracy": None, "colour_accuracy": None}
    out = {}
    for name in ("shared-kv", "alignedgen"):
        rows = {k: (metrics["baseline"][k], metrics[name][k]) for k in metrics["baseline"]}
        out[name] = result(rows, claims, run.seeds)
        out[name]["setup"] = {
            "group": f"{G} prompts: the reference (full caption) then {G - 1} without the style word",
            "options": ("SharedAttention(reference=0, adain=True), every block, every step" if name == "shared-kv"
                        else "AlignedGen(reference=0): ShiftPE, style_lambda 1.1, AdaIN; single-stream blocks "
                             "(the official default; 3 of the subject's 6 modules), every step")}
        if run.first:
            continue  # the grids come from the part that holds seed 0
        # rows: per shown seed, the baseline group then the method's
        n = min(GRID_SEEDS, run.seeds)
        base, meth = torch.cat(pictures["baseline"])[:n * G], torch.cat(pictures[name])[:n * G]
        run.grid(name, [torch.cat([base[i * G:(i + 1) * G], meth[i * G:(i + 1) * G]]) for i in range(n)], G)
    return out


# -- 2. FreeCus and IR-Diffusion -----------------------------------------------------------------------------

# FLUX.1's pivotal modules (double 0, 1, 2, 17, 18 of 19; single 6, 9, 34, 35, 37 of 38) mapped by
# relative depth onto the subject's 3 + 3: the first and last double block, the first and last single
FREECUS_BLOCKS = ("transformer_blocks.0", "transformer_blocks.2", "single_transformer_blocks.0",
                  "single_transformer_blocks.2")


def exp_subject(run: Run) -> dict:
    T = 2  # target prompts per seed (new styles, one new position)
    metrics = {v: {m: [] for m in ("identity", "shape_kept", "colour_kept", "crop_mse", "style_followed",
                                   "position_followed")} for v in ("baseline", "freecus", "ir-diffusion")}
    pictures = {v: [] for v in ("reference", "baseline", "freecus", "ir-diffusion")}
    n, N = run.tokens, run.tokens ** 2
    sigmas = reference_sigmas(run.steps, flux_mu(N), -1.0)  # FreeCus's dynamic shifting (mu negated)
    for seed in range(run.first, run.end):
        g = torch.Generator().manual_seed(20_000 + seed)
        ref = S.Scene.at(pick(g, S.STYLES), pick(g, S.SHAPES), pick(g, S.COLOURS), pick(g, S.SIZES),
                         pick(g, S.POSITIONS))
        cell = pick(g, S.POSITIONS, exclude=(ref.position,))
        styles = [pick(g, S.STYLES, exclude=(ref.style,))]
        styles.append(pick(g, S.STYLES, exclude=(ref.style, styles[0])))
        targets = [S.Scene.at(st, ref.shape, ref.colour, ref.size, cell) for st in styles]
        tcaps = [caption(t, drop=("shape", "colour")) for t in targets]
        rcap = caption(ref)
        noise = noise_of(seed, 1 + T, run.size)
        reference = euler(run.model, [rcap], noise[:1], run.steps)
        ref_read = probelib.read_scenes(run.probe, reference)[0]
        ref_mask = run.object_mask(ref_read)  # (1, H, W): the "segmentation" of the reference's subject
        subject_tokens = token_mask(ref_mask[0])
        variants = {"baseline": euler(run.model, tcaps, noise[1:], run.steps)}
        # FreeCus: the reference in row 0, its latents the clean reference noised at the shifted sigmas
        x0 = run.model.pack(reference)
        z = reference_latents(x0.double(), run.model.pack(noise[:1]).double(), sigmas).float()

        def put_reference(i, x):
            x = x.clone()
            x[0] = z[i][0]
            return x

        with ad.apply(run.model.transformer, FreeCus(0, mask=subject_tokens, blocks=FREECUS_BLOCKS)):
            variants["freecus"] = euler(run.model, [rcap] + tcaps, noise, run.steps, before=put_reference)[1:]
        # IR-Diffusion: [reference, target] groups (chunks), the reference's object moved onto the target's box
        box = object_box(S.cell_centre(cell), ref.size, n)
        batch = [rcap, tcaps[0], rcap, tcaps[1]]
        rows_noise = torch.stack([noise[0], noise[1], noise[0], noise[2]])
        with ad.apply(run.model.transformer, IRDiffusion((0,), 1, reference_masks=(subject_tokens,),
                                                         target_masks=(box,), chunks=T)):
            images = euler(run.model, batch, rows_noise, run.steps)
        variants["ir-diffusion"] = images[[1, 3]]
        ref_r = run.read(reference)
        ref_crop = crop(reference, ref_r["centre"], 6)
        ref_crop_mask = crop(ref_mask[None].float(), ref_r["centre"], 6) > 0.5
        for name, images in variants.items():
            r = run.read(images)
            shape_ok = r["shape"] == ref_r["shape"][0]
            colour_ok = r["colour"] == ref_r["colour"][0]
            m = metrics[name]
            m["identity"].append(float((shape_ok & colour_ok).float().mean()))
            m["shape_kept"].append(float(shape_ok.float().mean()))
            m["colour_kept"].append(float(colour_ok.float().mean()))
            crops = crop(images, r["centre"], 6)
            m["crop_mse"].append(float(masked_mse(crops, ref_crop.expand_as(crops),
                                                  ref_crop_mask.expand(len(crops), -1, -1, -1)).mean()))
            m["style_followed"].append(float((r["style"] == torch.tensor([S.STYLES.index(s) for s in styles]))
                                             .float().mean()))
            m["position_followed"].append(float((r["position"] == S.POSITIONS.index(cell)).float().mean()))
            if seed < GRID_SEEDS:
                pictures[name].append(images)
        if seed < GRID_SEEDS:
            pictures["reference"].append(reference)
    claims = {"identity": "up", "shape_kept": "up", "colour_kept": "up", "crop_mse": "down",
              "style_followed": None, "position_followed": None}
    out = {}
    for name in ("freecus", "ir-diffusion"):
        rows = {k: (metrics["baseline"][k], metrics[name][k]) for k in metrics["baseline"]}
        out[name] = result(rows, claims, run.seeds)
        out[name]["setup"] = {
            "prompts": f"reference: a full caption; {T} targets: a new style and position, size kept, no shape or "
                       "colour word (the identity must come from the reference)",
            "options": (f"FreeCus(reference=0, mask=the reference's object as the probe reads it, scale 1.1), blocks "
                        f"{list(FREECUS_BLOCKS)} (FLUX's pivotal modules by relative depth), every step; the "
                        "reference row holds the clean reference noised at FLUX's sigmas shifted by -mu "
                        f"(mu = {flux_mu(N):.3f} for {N} tokens)" if name == "freecus" else
                        "IRDiffusion(references=(0,), target_row=1, isolate, reposition): the reference's object "
                        "mask moved onto the target cell's object box, every block, every step")}
        if run.first:
            continue
        k = min(GRID_SEEDS, run.seeds)
        # per shown seed: a row [reference, baseline targets, method targets]
        run.grid(name, [torch.cat([pictures["reference"][i], pictures["baseline"][i], pictures[name][i]])
                        for i in range(k)], 1 + 2 * T)
    return out


# -- 3. RF-Edit -------------------------------------------------------------------------------------------------


def exp_rf_edit(run: Run) -> dict:
    steps = max(run.steps // 2, 2)  # RF-Solver-2: 2 evaluations a step, so as many as the sampler's
    inject = 2 if steps > 2 else 1
    keys = ("edited", "style_kept", "shape_kept", "position_kept", "size_kept", "background_mse")
    metrics = {v: {m: [] for m in keys} for v in ("baseline", "rf-edit")}
    pictures = {v: [] for v in ("source", "baseline", "rf-edit")}
    per_batch = 8
    for first in range(0, run.seeds, per_batch):
        seeds = list(range(first, min(first + per_batch, run.seeds)))
        src, new = [], []
        for seed in seeds:
            g = torch.Generator().manual_seed(30_000 + seed)
            scene = S.sample_scenes(1, g).scenes()[0]
            src.append(scene)
            new.append(pick(g, S.COLOURS, exclude=(scene.colour,)))
        scaps = [caption(s) for s in src]
        ecaps = [caption(S.Scene(s.style, s.shape, c, s.size, s.centre)) for s, c in zip(src, new)]
        noise = torch.cat([noise_of(seed, 1, run.size) for seed in seeds])
        source = euler(run.model, scaps, noise, run.steps)
        x0 = run.model.pack(source)
        edit = RFEdit(inject, single_from=1).schedule(steps)  # the official "single blocks past 20 of 38": 1, 2 of 3
        with torch.no_grad():
            with ad.apply(run.model.transformer, edit):
                zT = rfs.invert(subj.velocity_fn(run.model, scaps), x0, steps, callback=edit.callback).x
                edited = rfs.sample(subj.velocity_fn(run.model, ecaps), zT, steps, callback=edit.callback).x
            plain = rfs.sample(subj.velocity_fn(run.model, ecaps), zT, steps).x
        size = run.size
        outs = {"rf-edit": run.model.unpack(edited, size, size).clamp(-1, 1),
                "baseline": run.model.unpack(plain, size, size).clamp(-1, 1)}
        src_r = run.read(source)
        src_scenes = probelib.read_scenes(run.probe, source)
        src_masks = torch.stack([run.object_mask(s) for s in src_scenes])
        want = torch.tensor([S.COLOURS.index(c) for c in new])
        for name, images in outs.items():
            r = run.read(images)
            masks = torch.stack([run.object_mask(s) for s in probelib.read_scenes(run.probe, images)])
            keep = ~dilate(src_masks | masks, 1)
            bg = masked_mse(images, source, keep)
            for j in range(len(seeds)):
                m = metrics[name]
                m["edited"].append(float(r["colour"][j] == want[j]))
                for attr in ("style", "shape", "position", "size"):
                    m[f"{attr}_kept"].append(float(r[attr][j] == src_r[attr][j]))
                m["background_mse"].append(float(bg[j]))
            if first == 0:
                pictures[name].append(images[:GRID_SEEDS])
        if first == 0:
            pictures["source"].append(source[:GRID_SEEDS])
    claims = {"edited": "up", "style_kept": "up", "shape_kept": "up", "position_kept": "up", "size_kept": "up",
              "background_mse": "down"}
    rows = {k: (metrics["baseline"][k], metrics["rf-edit"][k]) for k in keys}
    out = result(rows, claims, run.seeds)
    out["setup"] = {"edit": "the colour word changed to another colour",
                    "options": f"RF-Solver-2, {steps} steps each way ({2 * steps} evaluations); RFEdit(inject="
                               f"{inject}, single_from=1): the values of single-stream blocks 1 and 2 (the official "
                               "'single blocks 20..37 of 38' by relative depth) shared in the first "
                               f"{inject} sampling steps; baseline: the same inversion sampled back without sharing"}
    k = min(GRID_SEEDS, run.seeds)
    src_p, base_p, meth_p = (torch.cat(pictures[v])[:k] for v in ("source", "baseline", "rf-edit"))
    run.grid("rf-edit", [torch.stack([src_p[i], base_p[i], meth_p[i]]) for i in range(k)], 3)
    return {"rf-edit": out}


# -- 4. DiffUHaul ---------------------------------------------------------------------------------------------


def exp_diffuhaul(run: Run) -> dict:
    n = run.tokens
    anchor_steps = max(run.steps // 4, 1)
    keys = ("centre_error", "cell_reached", "appearance_kept", "style_kept", "crop_mse", "background_mse")
    metrics = {v: {m: [] for m in keys} for v in ("baseline", "diffuhaul")}
    pictures = {v: [] for v in ("source", "baseline", "diffuhaul")}
    for seed in range(run.first, run.end):
        g = torch.Generator().manual_seed(40_000 + seed)
        src = S.Scene.at(pick(g, S.STYLES), pick(g, S.SHAPES), pick(g, S.COLOURS), pick(g, S.SIZES),
                         pick(g, S.POSITIONS))
        cell = pick(g, S.POSITIONS, exclude=(src.position,))
        tgt = S.Scene.at(src.style, src.shape, src.colour, src.size, cell)
        noise = noise_of(seed, 1, run.size)
        scap, tcap = caption(src), caption(tgt)
        source = euler(run.model, [scap], noise, run.steps)  # the source pass below reads its mask from this
        src_read = probelib.read_scenes(run.probe, source)[0]
        src_mask = run.object_mask(src_read)
        tokens = token_mask(src_mask[0])
        ys, xs = tokens.nonzero(as_tuple=True)
        goal = torch.tensor(S.cell_centre(cell))
        dy = round((float(goal[1]) - src_read.centre[1]) * n)
        dx = round((float(goal[0]) - src_read.centre[0]) * n)
        dy = min(max(dy, -int(ys.min())), n - 1 - int(ys.max()))  # keep the moved box on the grid
        dx = min(max(dx, -int(xs.min())), n - 1 - int(xs.max()))
        method = DiffUHaul(tokens, translation=(dy, dx), anchor_steps=anchor_steps)
        with ad.apply(run.model.transformer, method) as handle:
            handle.phase = "source"
            recorded = euler(run.model, [scap], noise, run.steps)
            handle.reset()
            handle.phase = "target"
            moved = euler(run.model, [tcap], noise, run.steps)
        source = recorded  # the source pass runs the stock attention (through attnkit's exact path)
        outs = {"baseline": euler(run.model, [tcap], noise, run.steps), "diffuhaul": moved}
        src_r = run.read(source)
        src_crop = crop(source, src_r["centre"], 6)
        src_crop_mask = crop(src_mask[None].float(), src_r["centre"], 6) > 0.5
        placed = run.object_mask(src_read.moved(tuple(goal.tolist())))
        for name, images in outs.items():
            r = run.read(images)
            m = metrics[name]
            m["centre_error"].append(float(centre_error(r["centre"], goal[None])[0]))
            m["cell_reached"].append(float(r["position"][0] == S.POSITIONS.index(cell)))
            m["appearance_kept"].append(float((r["shape"][0] == src_r["shape"][0]) & (r["colour"][0] == src_r["colour"][0])))
            m["style_kept"].append(float(r["style"][0] == src_r["style"][0]))
            m["crop_mse"].append(float(masked_mse(crop(images, r["centre"], 6), src_crop, src_crop_mask)[0]))
            read_mask = run.object_mask(probelib.read_scenes(run.probe, images)[0])
            keep = ~dilate((src_mask | placed | read_mask)[None], 1)
            m["background_mse"].append(float(masked_mse(images, source, keep)[0]))
            if seed < GRID_SEEDS:
                pictures[name].append(images)
        if seed < GRID_SEEDS:
            pictures["source"].append(source)
    claims = {"centre_error": "down", "cell_reached": "up", "appearance_kept": "up", "style_kept": "up",
              "crop_mse": "down", "background_mse": "down"}
    rows = {k: (metrics["baseline"][k], metrics["diffuhaul"][k]) for k in keys}
    out = result(rows, claims, run.seeds)
    out["setup"] = {
        "drag": "the object to the centre of another grid cell (translation in whole tokens, 1/16 of the side)",
        "baseline": "the paper's naive baseline: the same seed with the moved layout (the target position word in "
                    "the caption), no attention sharing",
        "options": f"DiffUHaul(source mask = the probe-read object, translation, localise=True, anchor_steps="
                   f"{anchor_steps} of {run.steps}, anchor=1), every block, every step; the target pass gets the "
                   "target caption too"}
    k = min(GRID_SEEDS, run.seeds)
    if not run.first:
        run.grid("diffuhaul", [torch.cat([pictures["source"][i], pictures["baseline"][i], pictures["diffuhaul"][i]])
                           for i in range(k)], 3)
    return {"diffuhaul": out}


# -- 5. LatentWarp ---------------------------------------------------------------------------------------------


def exp_latentwarp(run: Run) -> dict:
    frames = 4 if run.quick else 6
    strength = 0.7  # SDEdit: start from the source frames noised to t = 0.7
    start = round((1 - strength) * run.steps)
    run_steps = run.steps - start
    warp_steps = (0, max(run_steps // 2, 1))  # the paper warps in the early steps
    keys = ("warping_error", "style_followed", "object_kept", "motion_error")
    metrics = {v: {m: [] for m in keys} for v in ("baseline", "latentwarp")}
    pictures = {v: [] for v in ("source", "baseline", "latentwarp")}
    floor = []
    grid = subj.timesteps(run.steps)
    t0 = float(grid[start])
    for seed in range(run.first, run.end):
        g = torch.Generator().manual_seed(50_000 + seed)
        style = pick(g, S.STYLES)
        new_style = pick(g, S.STYLES, exclude=(style,))
        shape, colour, size = pick(g, S.SHAPES), pick(g, S.COLOURS), pick(g, S.SIZES)
        speed = 0.5 / (frames - 1)  # the object crosses half the image
        direction = int(torch.randint(4, (1,), generator=g))
        motion = [(speed, 0.0), (-speed, 0.0), (0.0, speed), (0.0, -speed)][direction]
        other = 0.25 + 0.5 * float(torch.rand(1, generator=g))
        begin = 0.25 if (motion[0] > 0 or motion[1] > 0) else 0.75
        centre = (begin, other) if motion[1] == 0 else (other, begin)
        made = S.clip(S.Scene(style, shape, colour, size, centre), frames, motion, run.size)
        source, centres = made["frames"], made["centres"]
        flow, occluded = flowlib.clip_flows(source)
        floor.append(float(flowlib.warping_error(source, flow, occluded)))
        cap = " ".join([new_style, size, colour, shape])
        noise = noise_of(seed, 1, run.size).expand(frames, -1, -1, -1)  # one noise for every frame
        x = run.model.pack((1 - t0) * source + t0 * noise)
        outs = {"baseline": euler(run.model, [cap] * frames, noise, run.steps, start=start, x=x)}
        method = LatentWarp(frames, flow=flow, occluded=occluded, warp_steps=warp_steps)
        with ad.apply(run.model.transformer, method):
            outs["latentwarp"] = euler(run.model, [cap] * frames, noise, run.steps, start=start, x=x,
                                       before=lambda i, z: method.align(z, i))
        for name, clip in outs.items():
            r = run.read(clip)
            m = metrics[name]
            m["warping_error"].append(float(flowlib.warping_error(clip, flow, occluded)))
            m["style_followed"].append(float((r["style"] == S.STYLES.index(new_style)).float().mean()))
            m["object_kept"].append(float(((r["shape"] == S.SHAPES.index(shape))
                                           & (r["colour"] == S.COLOURS.index(colour))).float().mean()))
            # a clip that stands still has no flicker either: does the object still follow the source's path?
            m["motion_error"].append(float(centre_error(r["centre"], centres).mean()))
            if seed < GRID_SEEDS:
                pictures[name].append(clip)
        if seed < GRID_SEEDS:
            pictures["source"].append(source)
    claims = {"warping_error": "down", "style_followed": None, "object_kept": None, "motion_error": None}
    rows = {k: (metrics["baseline"][k], metrics["latentwarp"][k]) for k in keys}
    out = result(rows, claims, run.seeds)
    out["source_clip_warping_error"] = summary(floor) | {"values": floor}
    out["setup"] = {
        "clip": f"{frames} frames of one object crossing half the image over a still background; restyled to "
                f"another style (caption: style size colour shape), SDEdit from t = {t0:.3f} ({run_steps} of "
                f"{run.steps} Euler steps), the same noise in every frame",
        "options": f"LatentWarp.from the source clip's Horn-Schunck flows and occlusion (flow.clip_flows): "
                   f"cross-frame attention to the anchor (frame 0) and the previous frame in every block and step, "
                   f"latent warping before steps {list(range(*warp_steps))} of the {run_steps} run"}
    k = min(GRID_SEEDS, run.seeds)
    if not run.first:
        run.grid("latentwarp", [torch.cat([pictures[v][i] for v in ("source", "baseline", "latentwarp")])
                            for i in range(k)], frames)
    return {"latentwarp": out}


# -- 6. RF-Solver ---------------------------------------------------------------------------------------------


def exp_rf_solver(run: Run, budgets) -> dict:
    per_batch = 16
    errs = {nfe: {"euler": [], "rf_solver": []} for nfe in budgets}
    pictures = {}
    for first in range(0, run.seeds, per_batch):
        seeds = list(range(first, min(first + per_batch, run.seeds)))
        caps = [caption(S.sample_scenes(1, torch.Generator().manual_seed(60_000 + s)).scenes()[0]) for s in seeds]
        noise = torch.cat([noise_of(s, 1, run.size) for s in seeds])
        images = euler(run.model, caps, noise, run.steps)
        x0 = run.model.pack(images)
        v = subj.velocity_fn(run.model, caps)
        with torch.no_grad():
            for nfe in budgets:
                for label, order, steps in (("rf_solver", 2, nfe // 2), ("euler", 1, nfe)):
                    back = rfs.sample(v, rfs.invert(v, x0, steps, order=order).x, steps, order=order).x
                    rec = run.model.unpack(back, run.size, run.size)
                    errs[nfe][label] += ((rec - images) ** 2).flatten(1).mean(1).sqrt().tolist()
                    if first == 0 and nfe == budgets[0]:
                        pictures[label] = rec[:GRID_SEEDS * 2].clamp(-1, 1)
        if first == 0:
            pictures["source"] = images[:GRID_SEEDS * 2]
    out = {}
    for nfe in budgets:
        out[f"nfe_{nfe}"] = result({"reconstruction_rmse": (errs[nfe]["euler"], errs[nfe]["rf_solver"])},
                                   {"reconstruction_rmse": "down"}, run.seeds)
        out[f"nfe_{nfe}"]["setup"] = {"euler_steps": nfe, "rf_solver_steps": nfe // 2,
                                      "evaluations_each_way": nfe}
    out["setup"] = {"images": f"generated by the subject ({run.steps} Euler steps), inverted then sampled back "
                              "under their own caption, uniform times; baseline: Euler, method: RF-Solver-2; "
                              "error: RMS pixel error in [-1, 1] units per image"}
    run.grid("rf-solver", [pictures["source"], pictures["euler"], pictures["rf_solver"]], len(pictures["source"]))
    return {"rf-solver": out}


# -- the command ------------------------------------------------------------------------------------------------


SHOWS = ("yes: the 95% CI of the paired per-seed difference (method - baseline) lies on the claimed side of 0; "
         "no: on the other side; unclear: it holds 0")


def _methods_of(command: str) -> list[str]:
    words = command.split()
    return words[words.index("--methods") + 1].split(",") if "--methods" in words[:-1] else list(EXPERIMENTS)


def _join(entries: list[dict]) -> dict:
    """One experiment's results from parts of disjoint seed ranges (in seed order): the per-seed
    values put together and summarised again."""
    if len(entries) == 1:
        return entries[0]
    out = dict(entries[0])
    if "metrics" in out:
        rows = {name: ([v for e in entries for v in e["metrics"][name]["values"]["baseline"]],
                       [v for e in entries for v in e["metrics"][name]["values"]["method"]])
                for name in out["metrics"]}
        claims = {name: e.get("claim") for name, e in out["metrics"].items()}
        out.update(result(rows, claims, sum(e["n_seeds"] for e in entries)))
    if "source_clip_warping_error" in out:
        floor = [v for e in entries for v in e["source_clip_warping_error"]["values"]]
        out["source_clip_warping_error"] = summary(floor) | {"values": floor}
    return out


def merge(parts, out: Path, argv=None) -> int:
    """One record from the records of runs started side by side: of disjoint ``--methods``, or of
    one experiment over disjoint seed ranges (``--first-seed``), with the same steps: their results
    (per-seed values joined and summarised again), grids and timings, and every command."""
    records = [json.loads(Path(p).read_text()) for p in parts]
    keys = ("steps", "quick", "subject", "probe")
    for r, p in zip(records[1:], parts[1:]):
        differ = [k for k in keys if r.get(k) != records[0].get(k)]
        if differ:
            raise SystemExit(f"--merge: {p} differs from {parts[0]} in {differ}; merge runs of one setup only")
    order = sorted(range(len(records)), key=lambda i: records[i].get("first_seed", 0))
    by_key: dict[str, list[int]] = {}
    for i in order:
        for k in records[i]["results"]:
            by_key.setdefault(k, []).append(i)
    for k, idx in by_key.items():
        spans = [(records[i].get("first_seed", 0), records[i].get("first_seed", 0) + records[i]["seeds"]) for i in idx]
        if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
            raise SystemExit(f"--merge: {k} repeats seeds across {[parts[i] for i in idx]} (seed ranges {spans})")
    merged = dict(records[0])
    # one command line, as the results README reads it: the parts side by side, then this merge
    merged["command"] = (" & ".join(r["command"] for r in records) + " & wait; "
                         + "PYTHONPATH=src python benchmarks/diffusion_effects.py "
                         + " ".join(sys.argv[1:] if argv is None else argv))
    # a part stopped after its first experiments is fine where another part ran the rest
    named = {m for r in records for m in r.get("methods") or _methods_of(r["command"])}
    have = {k for r in records for k in r["results"]}
    merged["parts"] = [{"command": r["command"], "git_commit": r["git_commit"], "complete": r.get("complete"),
                        "results": sorted(r["results"]), "seeds": [r.get("first_seed", 0),
                                                                   r.get("first_seed", 0) + r["seeds"]]}
                       for r in records]
    merged["complete"] = all(set(RESULTS[m]) <= have for m in named)
    merged["methods"] = [m for m in EXPERIMENTS if m in named]
    merged["grids"] = {k: v for r in records for k, v in r["grids"].items()}
    merged["timings"] = {}
    for r in records:  # one experiment's parts: their CPU seconds add up, they ran side by side
        for k, v in r["timings"].items():
            t = merged["timings"].setdefault(k, {"wall_s": 0.0, "cpu_s": 0.0})
            t["wall_s"], t["cpu_s"] = max(t["wall_s"], v.get("wall_s", 0.0)), round(t["cpu_s"] + v.get("cpu_s", 0.0), 1)
    merged["results"] = {k: _join([records[i]["results"][k] for i in idx]) for k, idx in by_key.items()}
    counts = [n for v in merged["results"].values() for n in
              ([v["n_seeds"]] if "n_seeds" in v else [x["n_seeds"] for x in v.values()
                                                      if isinstance(x, dict) and "n_seeds" in x])]
    merged["seeds"] = min(counts) if counts else max(r["seeds"] for r in records)  # the fewest of any experiment
    merged["first_seed"] = 0
    merged["cpu_s"] = round(sum(r["cpu_s"] for r in records), 1)
    merged["git_dirty"] = any(r["git_dirty"] for r in records)
    out.write_text(json.dumps(merged, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=None, help="seeds per method (default 32; --quick: 4)")
    p.add_argument("--steps", type=int, default=None, help="Euler steps of the subject (default 16; --quick: 8)")
    p.add_argument("--quick", action="store_true", help="a wiring check: 4 seeds, 8 steps, smaller groups")
    p.add_argument("--methods", default=",".join(EXPERIMENTS),
                   help=f"comma-separated experiments among {', '.join(EXPERIMENTS)} (alignedgen also runs shared-kv, "
                        "freecus also ir-diffusion)")
    p.add_argument("--nfe", default=None, help="RF-Solver's evaluation budgets, even ints (default 8,16; --quick: 4,8)")
    p.add_argument("--subject", default=None, help="the subject's folder (default: the shipped one)")
    p.add_argument("--probe", default=None, help="the probe's folder (default: the shipped one)")
    p.add_argument("--out", default="benchmarks/results/cpu/diffusion-effects.json")
    p.add_argument("--grid-dir", default=None, help="where the grids go (default: beside --out; 'none': no grids)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="the first seed (default 0): runs of other seed ranges can be merged (--merge)")
    p.add_argument("--merge", default=None,
                   help="comma-separated records of runs with disjoint --methods to merge into --out (runs nothing)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine more threads spin and burn CPU for nothing)")
    args = p.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else (4 if args.quick else 32)
    if seeds < 2:
        p.error(f"--seeds must be an int >= 2 (a spread needs two seeds), got {seeds}")
    steps = args.steps if args.steps is not None else (8 if args.quick else 16)
    if steps < 4:
        p.error(f"--steps must be an int >= 4 (RF-Edit and LatentWarp split the schedule), got {steps}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in EXPERIMENTS]
    if unknown or not methods:
        p.error(f"--methods got {unknown or args.methods!r}; accepted: a comma-separated subset of {', '.join(EXPERIMENTS)}")
    nfe_text = args.nfe if args.nfe is not None else ("4,8" if args.quick else "8,16")
    try:
        budgets = [int(b) for b in nfe_text.split(",")]
    except ValueError:
        p.error(f"--nfe must be comma-separated even ints >= 2, got {nfe_text!r}")
    if not budgets or any(b < 2 or b % 2 for b in budgets):
        p.error(f"--nfe must be comma-separated even ints >= 2 (RF-Solver-2 spends 2 per step), got {nfe_text!r}")
    if args.first_seed < 0:
        p.error(f"--first-seed must be an int >= 0, got {args.first_seed}")
    if args.first_seed and set(args.methods) & {"rf-edit", "rf-solver"}:
        p.error("--first-seed is for alignedgen, freecus, diffuhaul and latentwarp (rf-edit and rf-solver batch "
                "their seeds from 0)")
    if args.threads < 1:
        p.error(f"--threads must be an int >= 1, got {args.threads}")
    args.seeds, args.steps, args.methods, args.budgets = seeds, steps, methods, budgets
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.merge:
        return merge([p for p in args.merge.split(",") if p], Path(args.out), argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _main(args, argv)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process (the tests) keeps its own


def _main(args, argv) -> int:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid_dir = None if args.grid_dir == "none" else Path(args.grid_dir) if args.grid_dir else out.parent
    if grid_dir is not None:
        grid_dir.mkdir(parents=True, exist_ok=True)
    model = subj.load(args.subject).eval()
    probe = probelib.load(args.probe).eval()
    if model.config.image_size != 32:
        raise SystemExit(f"the experiments are laid out for 32x32 images; the subject draws "
                         f"{model.config.image_size}x{model.config.image_size}")
    run = Run(model, probe, seeds=args.seeds, steps=args.steps, quick=args.quick, grid_dir=grid_dir,
              first=args.first_seed)
    results, timings = {}, {}
    cpu0 = time.process_time()
    import diffusers

    def write(complete: bool) -> None:  # after every experiment: a run cut short keeps what it measured
        record = {
            "command": "PYTHONPATH=src nice -n 10 python benchmarks/diffusion_effects.py "
                       + " ".join(sys.argv[1:] if argv is None else argv),
            "git_commit": _git("rev-parse", "HEAD"),
            "git_dirty": bool(_git("status", "--porcelain", "--", "src", "benchmarks/diffusion_effects.py")),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "diffusers": diffusers.__version__},
            "device": "cpu", "threads": torch.get_num_threads(),
            "subject": str(args.subject or subj.DEFAULT_PATH.name), "probe": str(args.probe or "shipped"),
            "seeds": args.seeds, "steps": args.steps, "guidance": 1.0, "quick": args.quick, "complete": complete,
            "methods": args.methods, "first_seed": args.first_seed,
            "shows": SHOWS, "timings": timings, "cpu_s": round(time.process_time() - cpu0, 1),
            "grids": run.grids, "results": results,
        }
        out.write_text(json.dumps(record, indent=1) + "\n")

    for name in args.methods:
        start, c0 = time.perf_counter(), time.process_time()
        if name == "alignedgen":
            results.update(exp_alignedgen(run))
        elif name == "freecus":
            results.update(exp_subject(run))
        elif name == "rf-edit":
            results.update(exp_rf_edit(run))
        elif name == "diffuhaul":
            results.update(exp_diffuhaul(run))
        elif name == "latentwarp":
            results.update(exp_latentwarp(run))
        elif name == "rf-solver":
            results.update(exp_rf_solver(run, args.budgets))
        timings[name] = {"wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(time.process_time() - c0, 1)}
        print(f"{name}: {timings[name]['wall_s']} s", file=sys.stderr, flush=True)
        write(name == args.methods[-1])
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
