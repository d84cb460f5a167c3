"""Quality side by side: train one DecoderLM per mechanism, identical in everything else.

Every run of a comparison shares the task, the data order (one generator seeded by
``seed``), the initialisation seed, the optimiser (AdamW, linear warm-up then cosine decay
to 10%), width, depth, heads, batch, steps and gradient clipping; only the attention
differs. A run's result is stored under ``cache_dir`` keyed by a hash of that full
configuration, so running the same command again reuses finished mechanisms.

Result JSON (``"schema": "attnkit.compare/1"``)::

    {schema, command, created, device, versions, task: {...}, config: {...},
     runs: [{mechanism, key, params, steps, wall_s, tokens_per_s, loss_curve: [[step, loss], ...],
             final_train_loss, eval: {<metric>: ..., ...}, metric, reused, status: "ok"|"diverged", message}]}
    (a diverged run: loss_curve up to the divergence, metric and timings null; it is not cached)
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from .. import __version__, registry
from .._checks import parse_number
from ..models import DecoderLM
from ..tasks import MQAR, Passkey, Task, TextCorpus

__all__ = ["CompareConfig", "PRESETS", "TASKS", "make_task", "run_compare", "train_one", "SCHEMA"]

SCHEMA = "attnkit.compare/1"
TASKS = ("mqar", "text", "passkey")

# model and optimiser per preset; task sizes per (preset, task)
PRESETS = {
    "cpu": {
        "model": dict(dim=128, num_layers=2, num_heads=8),
        "train": dict(batch_size=32, lr=3e-3, warmup=100, weight_decay=0.1),
        # MQAR: a narrow MLP (128 instead of 384: the MLP was ~70% of the compute per token) buys
        # 1000 steps in about the time of 600; MHA's escape from the "one of the 4 values" plateau
        # still depends on the seed (the MQAR docstring has the runs)
        "mqar": dict(task=dict(vocab_size=256, seq_len=64, num_pairs=4), steps=1000, train=dict(batch_size=128),
                     model=dict(mlp_hidden=128)),
        "text": dict(task=dict(seq_len=256), steps=600),
        "passkey": dict(task=dict(length=256), steps=800),
    },
    "gpu": {
        # 2 layers, lr 3e-3: MHA reaches 0.988 MQAR at 16 pairs / seq 256 / vocab 8192 in 3000 steps on
        # the H200, where 4 layers (lr 1e-3 or 3e-3) stayed near 0.06 (benchmarks/results/README.md)
        "model": dict(dim=256, num_layers=2, num_heads=8),
        "train": dict(batch_size=64, lr=3e-3, warmup=200, weight_decay=0.1),
        "mqar": dict(task=dict(vocab_size=8192, seq_len=256, num_pairs=16), steps=3000),
        "text": dict(task=dict(seq_len=512), steps=3000),
        "passkey": dict(task=dict(length=1024), steps=2000),
    },
}
DEFAULT_MECHANISMS = ("mha", "gqa", "no-mixing")  # the CPU default fits in 10 minutes on 2 cores


@dataclass
class CompareConfig:
    task: str = "mqar"
    mechanisms: list[str] = field(default_factory=lambda: list(DEFAULT_MECHANISMS))
    preset: str = "cpu"
    steps: int | None = None  # None: the preset's
    seed: int = 0
    device: str = "cpu"
    task_options: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)  # overrides of the preset's model
    train: dict = field(default_factory=dict)  # overrides of the preset's optimiser settings
    attention_options: dict = field(default_factory=dict)
    log_every: int = 10
    corpus: str | None = None
    cache_dir: str = ".attnkit-cache/compare"

    def resolved(self) -> dict:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown --preset {self.preset!r}; accepted: {', '.join(PRESETS)}")
        if self.task not in TASKS:
            raise ValueError(f"unknown --task {self.task!r}; accepted: {', '.join(TASKS)}")
        preset = PRESETS[self.preset]
        steps = self.steps if self.steps is not None else preset[self.task]["steps"]
        if steps < 1:
            raise ValueError(f"--steps must be >= 1, got {steps}")
        return {
            "model": {**preset["model"], **preset[self.task].get("model", {}), **self.model},
            "train": {**preset["train"], **preset[self.task].get("train", {}), **self.train, "steps": steps, "seed": self.seed},
            "task_options": {**preset[self.task]["task"], **self.task_options},
        }


def make_task(name: str, options: dict, corpus: str | None = None) -> Task:
    if name == "mqar":
        return MQAR(**options)
    if name == "text":
        return TextCorpus(path=corpus, **options)
    if name == "passkey":
        return Passkey(**options)
    raise ValueError(f"unknown task {name!r}; accepted: {', '.join(TASKS)}")


def lr_at(step: int, *, lr: float, warmup: int, steps: int, floor: float = 0.1) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``floor * lr`` at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _aux_loss(model) -> torch.Tensor | float:
    """Sum of auxiliary losses that layers expose as ``aux_loss`` (e.g. a router's load balance)."""
    total = 0.0
    for module in model.modules():
        aux = getattr(module, "aux_loss", None)
        if isinstance(aux, torch.Tensor):
            total = total + aux
    return total


def parse_mechanism(spec: str) -> tuple[str, dict]:
    """``name`` or ``name:key=value:key=value`` (per-mechanism layer options, e.g.
    ``sliding-window:window=16``) -> (name, options); numbers are parsed."""
    name, *items = spec.split(":")
    options = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"mechanism {spec!r}: expected name:key=value[:key=value...], got {item!r}")
        key, value = item.split("=", 1)
        options[key.strip().replace("-", "_")] = parse_number(value)
    return name.strip(), options


def run_key(mechanism: str, task: Task, resolved: dict, attention_options: dict, device: str) -> str:
    blob = json.dumps(
        {"mechanism": mechanism, "task": task.config(), **resolved, "attention_options": attention_options,
         "device": device.split(":")[0], "attnkit": __version__},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_one(mechanism: str, task: Task, resolved: dict, *, attention_options: dict, device: torch.device,
              log_every: int = 10, on_step: Callable[[int, float], None] | None = None, save_dir=None) -> dict:
    """Train one DecoderLM whose attention is ``mechanism``; returns the run record."""
    m, t = resolved["model"], resolved["train"]
    name, own_options = parse_mechanism(mechanism)
    torch.manual_seed(t["seed"])
    model = DecoderLM(vocab_size=task.vocab_size, attention=name, attention_options={**attention_options, **own_options},
                      **m).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t["lr"], betas=(0.9, 0.95), fused=device.type == "cuda",
    )
    data = torch.Generator().manual_seed(t["seed"])  # identical data order for every mechanism
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    curve, window = [], []
    start = time.perf_counter()
    for step in range(t["steps"]):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr=t["lr"], warmup=t["warmup"], steps=t["steps"])
        inputs, targets = task.train_batch(t["batch_size"], data)
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast:
            loss = model.loss(inputs, targets)
            total = loss + _aux_loss(model)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        window.append(loss.detach())
        if (step + 1) % log_every == 0 or step + 1 == t["steps"]:
            value = float(torch.stack(window).mean())
            window.clear()
            if not math.isfinite(value):
                raise Diverged(f"{mechanism}: training loss became {value} at step {step + 1}", curve, model.num_parameters())
            curve.append([step + 1, value])
            if on_step:
                on_step(step + 1, value)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    evaluation = task.evaluate(model, device)
    if save_dir is not None:
        model.save_pretrained(Path(save_dir) / mechanism.replace(":", "_").replace("=", "-"))
    return {
        "mechanism": mechanism,
        "params": model.num_parameters(),
        "steps": t["steps"],
        "wall_s": wall,
        "tokens_per_s": t["steps"] * t["batch_size"] * task.seq_len / wall,
        "loss_curve": curve,
        "final_train_loss": curve[-1][1],
        "eval": evaluation,
        "metric": evaluation[task.metric],
    }


class Diverged(FloatingPointError):
    """A run whose training loss became NaN or infinite: reported as a row, not cached."""

    def __init__(self, message: str, curve: list, params: int):
        super().__init__(message)
        self.curve, self.params = curve, params


def _versions() -> dict:
    return {"attnkit": __version__, "torch": torch.__version__, "python": platform.python_version()}


def run_compare(cfg: CompareConfig, *, progress=None, command: str | None = None, save_dir=None) -> dict:
    """Train (or reuse) one run per mechanism and return the JSON-ready comparison."""
    resolved = cfg.resolved()
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but PyTorch sees no CUDA device here; use --device cpu")
    known = [c.name for c in registry.mechanisms()]
    if not cfg.mechanisms:
        raise ValueError(f"--mechanisms is empty; registered: {', '.join(known)}")
    for spec in cfg.mechanisms:
        name, options = parse_mechanism(spec)
        if name not in known:
            raise ValueError(f"unknown mechanism {name!r}; registered: {', '.join(known)}")
        # build once here so that a wrong option fails before any training starts
        registry.get(name).build(resolved["model"]["dim"], resolved["model"]["num_heads"],
                                 **{**cfg.attention_options, **options})
    task = make_task(cfg.task, resolved["task_options"], cfg.corpus)
    cache = Path(cfg.cache_dir) / cfg.task
    runs = []
    for name in cfg.mechanisms:
        key = run_key(name, task, resolved, cfg.attention_options, cfg.device)
        path = cache / f"{name.replace(':', '_').replace('=', '-')}-{key}.json"
        if path.exists() and save_dir is None:
            record = json.loads(path.read_text())
            record["reused"] = True
            if progress:
                progress.reused(name)
        else:
            on_step = progress.start(name, resolved["train"]["steps"]) if progress else None
            try:
                record = train_one(name, task, resolved, attention_options=cfg.attention_options, device=device,
                                   log_every=cfg.log_every, on_step=on_step, save_dir=save_dir)
            except Diverged as err:  # the other mechanisms still run; this one is reported, not cached
                record = {"mechanism": name, "status": "diverged", "message": str(err), "params": err.params,
                          "steps": resolved["train"]["steps"], "loss_curve": err.curve, "metric": None,
                          "final_train_loss": None, "wall_s": None, "tokens_per_s": None, "key": key, "reused": False}
                runs.append(record)
                if progress:
                    progress.done(name)
                continue
            record["key"] = key
            record["status"] = "ok"
            cache.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record))
            record["reused"] = False
            if progress:
                progress.done(name)
        runs.append(record)
    return {
        "schema": SCHEMA,
        "command": command or " ".join(["attnkit", *sys.argv[1:]]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": {"type": device.type, "name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()},
        "versions": _versions(),
        "task": {**task.config(), "metric": task.metric, "higher_is_better": task.higher_is_better},
        "config": {**asdict(cfg), **resolved},
        "runs": runs,
    }
