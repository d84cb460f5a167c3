"""The diffusion subject: a small FLUX transformer trained with rectified flow on procedural scenes.

No weights can be downloaded here, so attention-sharing methods (AlignedGen, FreeCus, IR-Diffusion,
RF-Edit, DiffUHaul, LatentWarp) need a text-to-image model of their own whose effects can be seen
and measured. This is one: diffusers' :class:`FluxTransformer2DModel` (the FLUX.1 architecture:
double-stream blocks over image and caption tokens, then single-stream blocks, joint attention
with 3-axis RoPE) at a small width, denoising 32x32 RGB pixels of :mod:`attnkit.diffusion.scenes`
directly (no VAE), conditioned on a caption encoder of our own.

Layout (FLUX's, so code written against FLUX pipelines carries over):

- an image (B, 3, H, W) in [-1, 1] is packed into tokens (B, N, 12), N = (H/2)(W/2): each token is a
  2x2 pixel patch, channel-major, as FLUX's ``_pack_latents`` packs 16-channel latents into 64
  (:meth:`SubjectModel.pack` / :meth:`SubjectModel.unpack`)
- image token ids are ``(0, row, col)`` on the token grid, caption token ids are zeros
  (:meth:`SubjectModel.image_ids`); the transformer's ``patch_size`` is 1
- the caption encoder: an embedding over :data:`~attnkit.diffusion.scenes.VOCAB` plus a learned
  position embedding gives ``encoder_hidden_states`` (B, L, caption_dim); the mean of the token
  embeddings gives ``pooled_projections`` (B, caption_dim); trained with the transformer

Rectified flow, FLUX/SD3 convention (t = 1 is noise, t = 0 the image)::

    x_t = (1 - t) x0 + t noise,      v = noise - x0,      loss = |v_theta(x_t, t, caption) - v|^2

with t logit-normal (sigmoid of a standard normal, SD3's choice), and the caption dropped word by
word (15%) and entirely (10%), so the subject completes partial captions and classifier-free
guidance has an unconditional branch (the all-pad caption). The transformer takes ``timestep`` in
[0, 1] and multiplies it by 1000 itself. Sampling integrates dx/dt = v from t = 1 to 0 with Euler
steps (:func:`sample`); :func:`velocity_fn` gives the velocity as a plain function for other solvers.

Train (the default preset: 3 double + 3 single blocks, 4 heads of 40, 4.13 M parameters, 16.5 MB
in float32)::

    python -m attnkit.diffusion.subject train --out src/attnkit/diffusion/subject_model --minutes 9 --device cuda

and use::

    >>> model = load("src/attnkit/diffusion/subject_model")
    >>> images = sample(model, ["stripes large red circle top-left", "dots"], seed=0, steps=20)  # (2, 3, 32, 32)
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import time
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._console import write_atomic
from .scenes import CAPTION_LENGTH, PAD_ID, VOCAB, caption_batch, check_size, encode_caption, render_batch, sample_scenes

__all__ = ["SubjectConfig", "SubjectModel", "PRESETS", "DEFAULT_PATH", "SAMPLE_CAPTIONS", "rf_loss", "velocity_fn",
           "sample", "timesteps", "train", "load", "save", "default_subject", "write_png", "image_grid", "main"]

#: where the shipped subject lives (the lead commits the H200-trained weights here)
DEFAULT_PATH = Path(__file__).resolve().parent / "subject_model"

# the captions of samples.png: every style, full and partial captions
SAMPLE_CAPTIONS = ("stripes large red circle top-left", "checks small blue square centre",
                   "dots large yellow triangle bottom-right", "gradient large green cross left",
                   "rings small magenta circle top", "stripes", "large cyan square", "")


@dataclass(frozen=True)
class SubjectConfig:
    """The subject's architecture: image side ``image_size`` (pixels, a multiple of 8), FLUX's
    ``num_layers`` double-stream and ``num_single_layers`` single-stream blocks of
    ``num_attention_heads`` heads of ``attention_head_dim``, RoPE over the (0, row, col) axes with
    ``axes_dims_rope`` (even, summing to the head dim), and the caption width ``caption_dim``."""

    image_size: int = 32
    num_layers: int = 3
    num_single_layers: int = 3
    num_attention_heads: int = 4
    attention_head_dim: int = 40
    axes_dims_rope: tuple[int, int, int] = (8, 16, 16)
    caption_dim: int = 128

    def __post_init__(self):
        check_size(self.image_size)
        for name in ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim", "caption_dim"):
            value = getattr(self, name)
            low = 0 if name in ("num_layers", "num_single_layers") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if self.num_layers + self.num_single_layers < 1:
            raise ValueError("num_layers + num_single_layers must be >= 1, got 0 blocks")
        axes = tuple(self.axes_dims_rope)
        if len(axes) != 3 or any(not isinstance(a, int) or a < 2 or a % 2 for a in axes) \
                or sum(axes) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope must be 3 even ints summing to attention_head_dim "
                             f"({self.attention_head_dim}), got {self.axes_dims_rope!r}")
        object.__setattr__(self, "axes_dims_rope", axes)

    @classmethod
    def from_dict(cls, data: dict) -> "SubjectConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown subject config keys {sorted(unknown)}; known: {sorted(names)}")
        return cls(**{k: tuple(v) if k == "axes_dims_rope" else v for k, v in data.items()})


PRESETS = {
    # seconds on a CPU, for tests
    "tiny": {"model": dict(image_size=8, num_layers=1, num_single_layers=1, num_attention_heads=2,
                           attention_head_dim=16, axes_dims_rope=(4, 6, 6), caption_dim=32),
             "train": dict(batch_size=8, steps=40, lr=3e-3, warmup=0, weight_decay=0.0, grad_clip=1.0, ema=0.0,
                           drop_word=0.15, drop_all=0.1, spread=0.5, min_lr_ratio=1.0, log_every=10, sample_steps=4)},
    # the H200 run: 4.13 M parameters, 16.5 MB in float32
    "default": {"model": dict(image_size=32, num_layers=3, num_single_layers=3, num_attention_heads=4,
                              attention_head_dim=40, axes_dims_rope=(8, 16, 16), caption_dim=128),
                "train": dict(batch_size=256, steps=30000, lr=6e-4, warmup=500, weight_decay=0.0, grad_clip=1.0,
                              ema=0.999, drop_word=0.15, drop_all=0.1, spread=0.5, min_lr_ratio=0.1, log_every=100,
                              sample_steps=30)},
}


class SubjectModel(nn.Module):
    """The FLUX transformer (``self.transformer``, where attention processors go) and the caption
    encoder. :meth:`forward` maps noisy image tokens (B, N, 12), times t (B,) in [0, 1] and caption
    ids (B, L) to the velocity (B, N, 12)."""

    def __init__(self, config: SubjectConfig | None = None):
        super().__init__()
        from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

        self.config = config = config or SubjectConfig()
        if not isinstance(config, SubjectConfig):
            raise ValueError(f"config must be a SubjectConfig, got {type(config).__name__}")
        self.transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=12, num_layers=config.num_layers, num_single_layers=config.num_single_layers,
            attention_head_dim=config.attention_head_dim, num_attention_heads=config.num_attention_heads,
            joint_attention_dim=config.caption_dim, pooled_projection_dim=config.caption_dim,
            guidance_embeds=False, axes_dims_rope=config.axes_dims_rope)
        self.caption_embed = nn.Embedding(len(VOCAB), config.caption_dim)
        self.caption_pos = nn.Parameter(torch.randn(CAPTION_LENGTH, config.caption_dim) * 0.02)

    @property
    def device(self) -> torch.device:
        return self.caption_pos.device

    # -- layout ---------------------------------------------------------------------------------

    @staticmethod
    def pack(images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, (H/2)(W/2), 4C), row-major over 2x2 patches, each token
        channel-major (c, dy, dx): FLUX's latent packing."""
        if images.ndim != 4 or images.shape[2] % 2 or images.shape[3] % 2:
            raise ValueError(f"images must be (B, C, H, W) with H and W even (2x2 pixels make a token), "
                             f"got shape {tuple(images.shape)}")
        B, C, H, W = images.shape
        x = images.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, H/2, W/2, C, 2, 2)
        return x.reshape(B, (H // 2) * (W // 2), C * 4)

    @staticmethod
    def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Tokens (B, N, 4C) -> images (B, C, height, width), the inverse of :meth:`pack`."""
        if height % 2 or width % 2 or tokens.ndim != 3 or tokens.shape[1] != (height // 2) * (width // 2) \
                or tokens.shape[2] % 4:
            raise ValueError(f"tokens of shape {tuple(tokens.shape)} do not unpack to {height}x{width} images: "
                             f"need (B, {(height // 2) * (width // 2)}, 4C) and even sides")
        B, _, C4 = tokens.shape
        x = tokens.view(B, height // 2, width // 2, C4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, H/2, 2, W/2, 2)
        return x.reshape(B, C4 // 4, height, width)

    @staticmethod
    def image_ids(height: int, width: int, device=None) -> torch.Tensor:
        """FLUX's image position ids (height * width, 3) for a token grid: ``(0, row, col)``, row-major."""
        rows = torch.arange(height, device=device).repeat_interleave(width)
        cols = torch.arange(width, device=device).repeat(height)
        return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).float()

    def caption_ids(self, captions) -> torch.Tensor:
        """Token ids (B, L) on the model's device from ids (B, L) or a list of caption strings
        (``""`` is the unconditional caption)."""
        if isinstance(captions, torch.Tensor):
            if captions.dtype != torch.long or captions.ndim != 2 or captions.shape[1] != CAPTION_LENGTH:
                raise ValueError(f"caption ids must be a LongTensor (B, {CAPTION_LENGTH}), got "
                                 f"{captions.dtype} {tuple(captions.shape)}")
            if captions.numel() and (captions.min() < 0 or captions.max() >= len(VOCAB)):
                raise ValueError(f"caption ids must lie in [0, {len(VOCAB)}), got {captions.min()}..{captions.max()}")
            return captions.to(self.device)
        if isinstance(captions, str) or not captions:
            raise ValueError(f"captions must be a LongTensor or a non-empty list of strings, got {captions!r}")
        return torch.stack([encode_caption(c) for c in captions]).to(self.device)

    def encode(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption ids (B, L) -> ``encoder_hidden_states`` (B, L, caption_dim) and ``pooled`` (B, caption_dim)."""
        words = self.caption_embed(ids)  # (B, L, D)
        return words + self.caption_pos, words.mean(dim=1)

    def forward(self, tokens: torch.Tensor, t, captions) -> torch.Tensor:
        """The velocity (B, N, 12) at noisy tokens (B, N, 12) and time ``t`` (a float or (B,), 1 = noise)."""
        ids = self.caption_ids(captions)
        B, N, _ = tokens.shape
        side = self.config.image_size // 2
        if N != side * side or ids.shape[0] != B:
            raise ValueError(f"tokens must be (B, {side * side}, 12) for {self.config.image_size}x"
                             f"{self.config.image_size} images with one caption each, got tokens "
                             f"{tuple(tokens.shape)} and {ids.shape[0]} captions")
        return self._velocity(tokens, self._times(t, B, tokens), ids)

    def _velocity(self, tokens: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` without its checks, for the training loop: the caption-id range check
        reads the ids back from the device, which would stall a GPU's queue every step."""
        side = self.config.image_size // 2
        hidden, pooled = self.encode(ids)
        return self.transformer(
            hidden_states=tokens, encoder_hidden_states=hidden, pooled_projections=pooled, timestep=t,
            img_ids=self.image_ids(side, side, tokens.device),
            txt_ids=torch.zeros(CAPTION_LENGTH, 3, device=tokens.device), return_dict=False)[0]

    def velocity(self, tokens: torch.Tensor, t, captions) -> torch.Tensor:
        """The velocity (B, N, 12): ``model(tokens, t, captions)`` under a name that says what it is."""
        return self(tokens, t, captions)

    @staticmethod
    def _times(t, batch: int, like: torch.Tensor) -> torch.Tensor:
        if isinstance(t, (int, float)) and not isinstance(t, bool):
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"t must lie in [0, 1] (1 is noise), got {t!r}")
            return torch.full((batch,), float(t), device=like.device)
        if not isinstance(t, torch.Tensor) or t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
            raise ValueError(f"t must be a float or a tensor () or ({batch},), got {t!r:.100}")
        return t.to(like.device, torch.float32).expand(batch)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


# -- training -----------------------------------------------------------------------------------


def rf_loss(model: SubjectModel, images: torch.Tensor, captions: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The rectified-flow loss of a batch: images (B, 3, H, W) in [-1, 1], caption ids (B, L) on the
    model's device (not checked: the training loop's hot path); noise and t (logit-normal) drawn
    from ``generator`` (on the images' device)."""
    x0 = model.pack(images)  # (B, N, 12)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    t = torch.sigmoid(torch.randn(x0.shape[0], generator=generator, device=x0.device))
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    return F.mse_loss(model._velocity(xt, t, captions).float(), noise - x0)


def _diagnose(model, images, captions, generator, autocast) -> str:
    """Which part of the last step is not finite: the batch, the weights, or the forward in the
    training precision versus float32 (a clue for a NaN that only one device shows)."""
    finite = lambda t: bool(torch.isfinite(t).all())  # noqa: E731
    parts = [f"images finite: {finite(images)}", f"captions in range: {bool((captions >= 0).all())}",
             "weights finite: " + str(all(finite(p) for p in model.parameters()))]
    with torch.no_grad():
        for name, context in (("training precision", autocast()), ("float32", torch.autocast(images.device.type,
                                                                                          enabled=False))):
            with context:
                parts.append(f"loss in {name}: {float(rf_loss(model, images, captions, generator)):.4g}")
    return "; ".join(parts)


def _training_precision(device: torch.device):
    """The context of the training forward: bf16 autocast on CUDA without cuDNN's attention.

    Measured on the H200 (torch 2.11, cuDNN 9 through PyTorch's SDPA, which FLUX's processor calls
    and PyTorch prefers on Hopper): cuDNN attention's backward in bf16 gives NaN gradients at this
    subject's head dims (16 in the tiny preset; 40 in the default one fails outright with a cuDNN
    execution error or an illegal memory access), while flash, memory-efficient and math train the
    same batches to the same loss. The backward kernel follows the forward's choice, so excluding
    cuDNN from the forward is enough. CPU trains in float32."""
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
    stack.enter_context(sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]))
    return stack


def _lr(train: dict, step: int, progress: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_lr_ratio`` by ``progress`` = 1."""
    if step < train["warmup"]:
        return train["lr"] * (step + 1) / train["warmup"]
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return train["lr"] * (train["min_lr_ratio"] + (1 - train["min_lr_ratio"]) * cosine)


def save(model: SubjectModel, out, record: dict | None = None) -> Path:
    """Write ``config.json`` (the architecture, and ``record`` under ``"training"``) and
    ``model.safetensors`` (float32) into ``out``, each atomically."""
    from safetensors.torch import save as safetensors_bytes

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(out / "model.safetensors", safetensors_bytes(state))
    config = {"model": asdict(model.config), "vocab": list(VOCAB), "caption_length": CAPTION_LENGTH,
              "convention": "rectified flow, x_t = (1 - t) x0 + t noise, v = noise - x0, t = 1 is noise",
              "training": record or {}}
    write_atomic(out / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    return out


def load(path=None, device="cpu") -> SubjectModel:
    """The subject saved in ``path`` (default: the shipped :data:`DEFAULT_PATH`), in eval mode."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else default_subject()
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} holds no subject (config.json and model.safetensors); train one: "
                                f"python -m attnkit.diffusion.subject train --out {path}")
    config = json.loads((path / "config.json").read_text())
    if list(config.get("vocab", [])) != list(VOCAB):
        raise ValueError(f"{path} was trained on another caption vocabulary than this attnkit's")
    model = SubjectModel(SubjectConfig.from_dict(config["model"]))
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.to(device).eval()


def default_subject() -> Path:
    """:data:`DEFAULT_PATH`; ``FileNotFoundError`` naming the training command when it holds no model."""
    if not (DEFAULT_PATH / "config.json").is_file():
        raise FileNotFoundError(f"the shipped diffusion subject is missing from {DEFAULT_PATH}; train it: "
                                f"python -m attnkit.diffusion.subject train --out {DEFAULT_PATH} --device cuda")
    return DEFAULT_PATH


def train(out, *, preset: str = "default", steps: int | None = None, minutes: float | None = None,
          device: str = "cpu", seed: int = 0, batch_size: int | None = None, save_every_s: float = 120.0,
          options: dict | None = None, progress=print) -> dict:
    """Train a subject on freshly rendered scenes and write it into ``out``: ``config.json``,
    ``model.safetensors`` (the EMA weights when the preset keeps an EMA), ``train.log`` (the loss
    curve), ``samples.png`` (:data:`SAMPLE_CAPTIONS` x 4 seeds) and ``README.md`` (a model card).

    Stops after ``steps`` (the preset's by default) or ``minutes`` of training, whichever comes
    first; the learning rate anneals by whichever is nearer its end, so a run cut by time still
    ends cooled. The weights and log are saved every ``save_every_s`` seconds too, so a run killed
    by a time limit keeps its last save. ``options`` overrides the preset's training settings
    (``lr``, ``ema``, ``drop_word``, ...). Returns the training record."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    cfg = {**PRESETS[preset]["train"]}
    unknown = set(options or {}) - set(cfg)
    if unknown:
        raise ValueError(f"options must name training settings among {', '.join(cfg)}, got {sorted(unknown)}")
    cfg.update(options or {})
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        cfg["steps"] = steps
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        cfg["batch_size"] = batch_size
    if minutes is not None and not minutes > 0:
        raise ValueError(f"minutes must be > 0, got {minutes!r}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is cuda but CUDA is not available")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)  # the initial weights
    config = SubjectConfig(**PRESETS[preset]["model"])
    model = SubjectModel(config).to(device).train()
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=(0.9, 0.99))
    ema = [p.detach().clone() for p in params] if cfg["ema"] else None
    data = torch.Generator(device=device).manual_seed(seed)
    autocast = lambda: _training_precision(device)  # noqa: E731 (a fresh context per step)
    budget = minutes * 60 if minutes is not None else None
    record = {"preset": preset, "seed": seed, "device": str(device), "batch_size": cfg["batch_size"],
              "planned_steps": cfg["steps"], "minutes": minutes, "parameters": model.parameter_count(),
              "train": cfg, "curve": []}
    log_lines = [f"# attnkit diffusion subject, preset {preset}: {json.dumps(asdict(config))}",
                 "# step loss(mean since last line) lr elapsed_s"]

    def ema_model() -> SubjectModel:
        if ema is None:
            return model
        shadow = SubjectModel(config).to(device)
        shadow.load_state_dict(model.state_dict())
        with torch.no_grad():
            for p, e in zip(shadow.parameters(), ema):
                p.copy_(e)
        return shadow.eval()

    def checkpoint(step, elapsed):
        record.update(steps=step, wall_s=round(elapsed, 1))
        save(ema_model(), out, record)
        write_atomic(out / "train.log", ("\n".join(log_lines) + "\n").encode())

    start = last_save = time.perf_counter()
    running, count, step, elapsed = 0.0, 0, 0, 0.0
    while step < cfg["steps"]:
        elapsed = time.perf_counter() - start
        if budget is not None and elapsed >= budget and step:  # a budget still allows one step
            break
        lr = _lr(cfg, step, max(step / cfg["steps"], elapsed / budget if budget else 0.0))
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.no_grad():
            batch = sample_scenes(cfg["batch_size"], data, cfg["spread"])
            images = render_batch(batch, config.image_size)["image"]
            captions = caption_batch(batch, cfg["drop_word"], cfg["drop_all"], data)
        with autocast():
            loss = rf_loss(model, images, captions, data)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        opt.step()
        if ema is not None:
            with torch.no_grad():
                decay = min(cfg["ema"], (1 + step) / (10 + step))  # a short memory while the weights move fast
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        step += 1
        running += loss.detach()
        count += 1
        if step % cfg["log_every"] == 0 or step == cfg["steps"]:
            mean = float(running / count)  # one device sync per log line
            running, count = 0.0, 0
            if not math.isfinite(mean):  # say where it broke instead of training on NaN weights
                raise FloatingPointError(f"the training loss is {mean} by step {step}: "
                                         + _diagnose(model, images, captions, data, autocast))
            elapsed = time.perf_counter() - start
            record["curve"].append([step, round(mean, 5)])
            log_lines.append(f"{step} {mean:.5f} {lr:.3g} {elapsed:.1f}")
            progress(f"step {step}/{cfg['steps']}  loss {mean:.4f}  lr {lr:.2e}  {elapsed:.0f} s  "
                     f"{step / max(elapsed, 1e-9):.1f} steps/s")
        if time.perf_counter() - last_save > save_every_s:
            checkpoint(step, time.perf_counter() - start)
            last_save = time.perf_counter()
    elapsed = time.perf_counter() - start
    if count:
        mean = float(running / count)
        record["curve"].append([step, round(mean, 5)])
        log_lines.append(f"{step} {mean:.5f} {lr:.3g} {elapsed:.1f}")
    record["final_loss"] = record["curve"][-1][1] if record["curve"] else None
    record["steps_per_s"] = round(step / max(elapsed, 1e-9), 2)
    checkpoint(step, elapsed)
    final = ema_model().eval()
    images = torch.cat([sample(final, list(SAMPLE_CAPTIONS), seed=s, steps=cfg["sample_steps"], guidance=2.0)
                        for s in range(4)])  # (4 * captions, 3, H, W): seed-major
    images = images.view(4, len(SAMPLE_CAPTIONS), *images.shape[1:]).transpose(0, 1).reshape(-1, *images.shape[1:])
    write_png(out / "samples.png", image_grid(images, columns=4, scale=4))
    write_atomic(out / "README.md", model_card(record, config).encode())
    progress(f"saved {out}: {step} steps in {elapsed:.0f} s, final loss {record['final_loss']}")
    return record


def model_card(record: dict, config: SubjectConfig) -> str:
    """The README.md of a trained subject's folder."""
    mb = record["parameters"] * 4 / 1e6
    budget = f"time budget {record['minutes']} min" if record["minutes"] else "no time budget"
    rows = "\n".join(f"| `{c or '(empty)'}` |" for c in SAMPLE_CAPTIONS)
    return f"""# attnkit diffusion subject

A FLUX-architecture transformer (diffusers `FluxTransformer2DModel`) trained from scratch with
rectified flow on attnkit's procedural scenes (`attnkit.diffusion.scenes`), for testing
attention-sharing methods offline. Load it with `attnkit.diffusion.subject.load(PATH)`.

| | |
| --- | --- |
| architecture | {config.num_layers} double + {config.num_single_layers} single blocks, {config.num_attention_heads} heads x {config.attention_head_dim}, RoPE axes {list(config.axes_dims_rope)} |
| images | {config.image_size}x{config.image_size} RGB in [-1, 1], 2x2 pixels per token (12 channels) |
| captions | {len(VOCAB)} words, {CAPTION_LENGTH} tokens, caption width {config.caption_dim} |
| parameters | {record['parameters']:,} ({mb:.1f} MB in float32) |
| preset | {record['preset']}, seed {record['seed']}, batch {record['batch_size']} |
| steps | {record['steps']} (planned {record['planned_steps']}; {budget}) |
| wall time | {record['wall_s']} s on {record['device']} ({record['steps_per_s']} steps/s) |
| final loss | {record['final_loss']} |
| weights | `model.safetensors`: the {'EMA (decay ' + str(record['train']['ema']) + ')' if record['train']['ema'] else 'final'} weights |

Convention: x_t = (1 - t) x0 + t noise, velocity noise - x0, t = 1 is noise; sample with Euler
steps from t = 1 to 0 (`attnkit.diffusion.subject.sample`).

`samples.png`: one row per caption below, four seeds per row, {record['train']['sample_steps']} Euler steps,
classifier-free guidance 2.0. The loss curve is `train.log`.

| caption |
| --- |
{rows}
"""


# -- sampling -----------------------------------------------------------------------------------


def velocity_fn(model: SubjectModel, captions, guidance: float = 1.0):
    """The velocity as a function ``v(x_tokens (B, N, 12), t: float or (B,)) -> (B, N, 12)`` for the
    given captions, with classifier-free guidance ``v_u + guidance (v_c - v_u)`` when ``guidance`` != 1
    (the unconditional branch is the all-pad caption). With guidance the transformer sees one batch
    of 2B: the B conditional rows, then the B unconditional ones (what a batch-sharing attention
    processor must know). Gradients flow unless the caller disables them."""
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number (1 = no guidance), got {guidance!r}")
    ids = model.caption_ids(captions)
    empty = torch.full_like(ids, PAD_ID)

    def velocity(x, t):
        if guidance == 1.0:
            return model(x, t, ids)
        tt = t if not isinstance(t, torch.Tensor) or t.ndim == 0 else torch.cat([t, t])
        both = model(torch.cat([x, x]), tt, torch.cat([ids, empty]))
        cond, uncond = both.chunk(2)
        return uncond + guidance * (cond - uncond)

    return velocity


def timesteps(steps: int) -> torch.Tensor:
    """The Euler grid from t = 1 (noise) to 0, (steps + 1,), float64 on the CPU."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)


@torch.no_grad()
def sample(model: SubjectModel, captions, *, seed: int = 0, generator: torch.Generator | None = None,
           steps: int = 30, guidance: float = 1.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] for ``captions`` (strings or ids (B, L)): Euler steps of the
    rectified-flow ODE from ``noise`` (B, 3, H, W) at t = 1 (default: drawn on the CPU from
    ``generator``, or a generator seeded with ``seed``, so a seed gives the same images on any device)."""
    grid = timesteps(steps)
    ids = model.caption_ids(captions)
    size = model.config.image_size
    if noise is None:
        if generator is None:
            generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(ids.shape[0], 3, size, size, generator=generator, device=generator.device)
    elif noise.shape != (ids.shape[0], 3, size, size):
        raise ValueError(f"noise must be ({ids.shape[0]}, 3, {size}, {size}), got {tuple(noise.shape)}")
    v = velocity_fn(model, ids, guidance)
    x = model.pack(noise.to(model.device, torch.float32))
    for i in range(steps):
        x = x + float(grid[i + 1] - grid[i]) * v(x, float(grid[i]))
    return model.unpack(x, size, size).clamp(-1, 1)


# -- images -------------------------------------------------------------------------------------


def image_grid(images: torch.Tensor, columns: int = 8, scale: int = 1, pad: int = 1) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> one uint8 picture (rows, cols, 3), ``columns`` per row,
    each enlarged ``scale`` times (nearest), ``pad`` pixels of white between them."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    B, _, H, W = images.shape
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = pixels.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    rows = -(-B // columns)
    h, w = H * scale + pad, W * scale + pad
    canvas = torch.full((3, rows * h + pad, columns * w + pad), 255, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, columns)
        canvas[:, pad + r * h: pad + r * h + H * scale, pad + c * w: pad + c * w + W * scale] = pixels[i]
    return canvas.permute(1, 2, 0).contiguous()


def write_png(path, picture: torch.Tensor) -> None:
    """Write a uint8 picture (rows, cols, 3) as an RGB PNG, atomically (zlib, no imaging library)."""
    if picture.dtype != torch.uint8 or picture.ndim != 3 or picture.shape[2] != 3:
        raise ValueError(f"picture must be uint8 (rows, cols, 3), got {picture.dtype} {tuple(picture.shape)}")
    rows, cols, _ = picture.shape
    raw = b"".join(b"\x00" + bytes(row) for row in picture.numpy().reshape(rows, cols * 3))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", cols, rows, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    write_atomic(Path(path), data)


# -- command ------------------------------------------------------------------------------------


def main(argv=None) -> int:
    """``python -m attnkit.diffusion.subject train|sample ...``"""
    parser = argparse.ArgumentParser(prog="python -m attnkit.diffusion.subject",
                                     description="Train or sample attnkit's diffusion subject.")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a subject and write it into a folder")
    tr.add_argument("--out", default=str(DEFAULT_PATH), help="the folder to write (default: the shipped subject's)")
    tr.add_argument("--preset", default="default", choices=list(PRESETS))
    tr.add_argument("--steps", type=int, default=None, help="at most this many steps (default: the preset's)")
    tr.add_argument("--minutes", type=float, default=None, help="at most this many minutes of training")
    tr.add_argument("--batch-size", type=int, default=None)
    tr.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    tr.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--save-every", type=float, default=120.0, help="seconds between checkpoints")
    sa = sub.add_parser("sample", help="sample captions into a PNG grid")
    sa.add_argument("--model", default=None, help="the subject's folder (default: the shipped one)")
    sa.add_argument("--caption", action="append", required=True, help="a caption (repeat for more rows)")
    sa.add_argument("--seeds", type=int, default=4, help="images per caption")
    sa.add_argument("--steps", type=int, default=30)
    sa.add_argument("--guidance", type=float, default=2.0)
    sa.add_argument("--out", required=True, help="the PNG to write")
    sa.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            train(args.out, preset=args.preset, steps=args.steps, minutes=args.minutes, device=args.device,
                  seed=args.seed, batch_size=args.batch_size, save_every_s=args.save_every,
                  options={"lr": args.lr} if args.lr is not None else None,
                  progress=lambda line: print(line, flush=True))
        else:
            model = load(args.model, args.device)
            rows = [sample(model, args.caption, seed=s, steps=args.steps, guidance=args.guidance)
                    for s in range(args.seeds)]
            images = torch.stack(rows, dim=1).flatten(0, 1)  # caption-major: one row per caption
            write_png(args.out, image_grid(images, columns=args.seeds, scale=4))
            print(f"wrote {args.out}")
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
