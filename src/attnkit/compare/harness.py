"""Quality side by side: train one DecoderLM per mechanism, identical in everything else.

Every run of a comparison shares the task, the data order (one generator seeded by the
run's seed), the initialisation seed, the optimiser (AdamW, linear warm-up then cosine decay
to ``min_lr_ratio``), width, depth, heads, batch, steps and gradient clipping; only the
attention differs. Each mechanism trains once per seed (``seed``, ``seed + 1``, ...,
``seeds`` of them): whether a small model leaves a plateau can hinge on the seed, so the
table reports the mean, min and max over seeds. A run's result is stored under
``cache_dir`` keyed by a hash of that full configuration, the seed, the device type, the
torch version and a hash of attnkit's source (:func:`attnkit._meta.code_hash`), so running
the same command again reuses finished runs, and a change to the code never does. Cache
files are written atomically; one that cannot be read is named, renamed to ``*.bad`` and
trained again.

Result JSON (``"schema": "attnkit.compare/2"``)::

    {schema, command, created, git: {commit, dirty}, code_hash, versions, device: {type, name},
     cpu: {model, threads}, platform, warnings: [str, ...],
     task: {..., metric, higher_is_better, chance}, config: {...}, seeds: [int, ...],
     runs: [{mechanism, status: "ok" | "diverged" | "partly diverged", message,
             metric (mean over the seeds that finished), metric_min, metric_max, metrics: [per seed, null if diverged],
             params, steps, wall_s (mean per seed), tokens_per_s (mean), final_train_loss (mean),
             loss_curve: [[step, mean loss over finished seeds], ...], reused (every seed from the cache),
             per_seed: [{seed, key, status, metric, eval: {<metric>: ..., ...}, loss_curve, final_train_loss,
                         wall_s, tokens_per_s, reused, message}, ...]}]}
    (a diverged seed: loss_curve up to the divergence, metric and timings null; it is not cached)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from .. import registry
from .._checks import parse_device, parse_value
from .._console import write_atomic
from .._meta import code_hash, run_metadata
from ..models import DecoderLM
from ..models.training import lr_at
from ..patterns import Pattern
from ..tasks import MQAR, Passkey, Task, TextCorpus

__all__ = ["CompareConfig", "PRESETS", "TASKS", "make_task", "run_compare", "train_one", "SCHEMA",
           "TRAIN_KEYS", "MODEL_KEYS", "task_option_keys", "prepare"]

SCHEMA = "attnkit.compare/2"
TASKS = ("mqar", "text", "passkey")
TASK_CLASSES = {"mqar": MQAR, "text": TextCorpus, "passkey": Passkey}

# optimiser settings every preset shares unless it says otherwise
TRAIN_DEFAULTS = dict(min_lr_ratio=0.1, grad_clip=1.0, beta1=0.9, beta2=0.95)

# model and optimiser per preset; task sizes per (preset, task); seeds per comparison
PRESETS = {
    "cpu": {
        "model": dict(dim=128, num_layers=2, num_heads=8),
        "train": dict(batch_size=32, lr=3e-3, warmup=100, weight_decay=0.1),
        "seeds": 3,
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
        # the H200 (benchmarks/results/h200/compare-mqar.json), where 4 layers (lr 1e-3 or 3e-3) stayed
        # near 0.06 (0.051 at lr 3e-3: h200-mqar-sweep-a-lr3e-3.json, in git at 9c8ea52)
        "model": dict(dim=256, num_layers=2, num_heads=8),
        "train": dict(batch_size=64, lr=3e-3, warmup=200, weight_decay=0.1),
        "seeds": 3,
        "mqar": dict(task=dict(vocab_size=8192, seq_len=256, num_pairs=16), steps=3000),
        "text": dict(task=dict(seq_len=512), steps=3000),
        "passkey": dict(task=dict(length=1024), steps=2000),
    },
}
DEFAULT_MECHANISMS = ("mha", "gqa", "no-mixing")


def _integer(minimum):
    def check(value):
        return not isinstance(value, bool) and isinstance(value, int) and value >= minimum
    return check


def _number(low, high=math.inf, *, low_open=False, high_open=False):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        return (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    return check


# accepted --train / --model keys: (check, what is accepted)
TRAIN_KEYS = {
    "batch_size": (_integer(1), "an integer >= 1"),
    "lr": (_number(0, low_open=True), "a number > 0 (peak learning rate)"),
    "warmup": (_integer(0), "an integer >= 0 (linear warm-up steps)"),
    "weight_decay": (_number(0), "a number >= 0 (AdamW, on matrices only)"),
    "min_lr_ratio": (_number(0, 1), "a number in [0, 1] (the cosine decay's floor, as a fraction of lr)"),
    "grad_clip": (_number(0), "a number >= 0 (gradient norm clip; 0: none)"),
    "beta1": (_number(0, 1, high_open=True), "a number in [0, 1) (AdamW)"),
    "beta2": (_number(0, 1, high_open=True), "a number in [0, 1) (AdamW)"),
}
MODEL_KEYS = {
    "dim": (_integer(1), "an integer >= 1 (model width C)"),
    "num_layers": (_integer(1), "an integer >= 1"),
    "num_heads": (_integer(1), "an integer >= 1"),
    "mlp_hidden": (_integer(1), "an integer >= 1 (SwiGLU width)"),
    "norm_eps": (_number(0, low_open=True), "a number > 0 (RMSNorm)"),
}


def task_option_keys(task: str) -> dict:
    """Accepted ``--task-options`` keys of ``task`` -> their defaults (the text corpus's path is ``--corpus``)."""
    if task not in TASK_CLASSES:
        raise ValueError(f"unknown --task {task!r}; accepted: {', '.join(TASKS)}")
    out = {}
    for f in fields(TASK_CLASSES[task]):
        if f.init and f.name != "path":
            out[f.name] = f.default
    return out


def _check_options(options: dict, accepted: dict, option: str) -> None:
    for key, value in options.items():
        if key not in accepted:
            raise ValueError(f"{option}: unknown key {key!r}; accepted: {', '.join(accepted)}")
        check, what = accepted[key]
        if not check(value):
            raise ValueError(f"{option}: {key} must be {what}, got {value!r}")


@dataclass
class CompareConfig:
    task: str = "mqar"
    mechanisms: list[str] = field(default_factory=lambda: list(DEFAULT_MECHANISMS))
    preset: str = "cpu"
    steps: int | None = None  # None: the preset's
    seed: int = 0  # the first seed
    seeds: int | None = None  # how many seeds (seed, seed + 1, ...); None: the preset's
    device: str = "cpu"
    task_options: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)  # overrides of the preset's model
    train: dict = field(default_factory=dict)  # overrides of the preset's optimiser settings
    attention_options: dict = field(default_factory=dict)
    log_every: int = 10
    corpus: str | None = None
    cache_dir: str = ".attnkit-cache/compare"

    def seed_list(self) -> list[int]:
        seeds = self.seeds if self.seeds is not None else PRESETS.get(self.preset, {}).get("seeds", 1)
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            raise ValueError(f"--seeds must be an integer >= 1, got {seeds!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"--seed must be an integer >= 0, got {self.seed!r}")
        return list(range(self.seed, self.seed + seeds))

    def resolved(self) -> dict:
        """The model, optimiser and task settings after the preset and the overrides, every key and
        value checked (a clear ``ValueError`` before any training)."""
        if self.preset not in PRESETS:
            raise ValueError(f"unknown --preset {self.preset!r}; accepted: {', '.join(PRESETS)}")
        if self.task not in TASKS:
            raise ValueError(f"unknown --task {self.task!r}; accepted: {', '.join(TASKS)}")
        _check_options(self.train, TRAIN_KEYS, "--train")
        _check_options(self.model, MODEL_KEYS, "--model")
        accepted = task_option_keys(self.task)
        for key in self.task_options:
            if key not in accepted:
                hint = " (the corpus is --corpus)" if key == "path" else ""
                raise ValueError(f"--task-options: unknown key {key!r} for task {self.task}{hint}; "
                                 f"accepted: {', '.join(accepted)}")
        if not isinstance(self.log_every, int) or self.log_every < 1:
            raise ValueError(f"log_every must be an integer >= 1, got {self.log_every!r}")
        preset = PRESETS[self.preset]
        steps = self.steps if self.steps is not None else preset[self.task]["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"--steps must be an integer >= 1, got {steps!r}")
        return {
            "model": {**preset["model"], **preset[self.task].get("model", {}), **self.model},
            "train": {**TRAIN_DEFAULTS, **preset["train"], **preset[self.task].get("train", {}), **self.train,
                      "steps": steps, "seed": self.seed},
            "task_options": {**preset[self.task]["task"], **self.task_options},
        }


def make_task(name: str, options: dict, corpus: str | None = None) -> Task:
    if name not in TASK_CLASSES:
        raise ValueError(f"unknown task {name!r}; accepted: {', '.join(TASKS)}")
    accepted = task_option_keys(name)
    unknown = [key for key in options if key not in accepted]
    if unknown:
        raise ValueError(f"task {name}: unknown option(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(accepted)}")
    if name == "text":
        return TextCorpus(path=corpus, **options)
    return TASK_CLASSES[name](**options)


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
    ``sliding-window:window=16``) -> (name, options); numbers and true / false are parsed."""
    name, *items = spec.split(":")
    options = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"mechanism {spec!r}: expected name:key=value[:key=value...], got {item!r}")
        key, value = item.split("=", 1)
        options[key.strip().replace("-", "_")] = parse_value(value)
    return name.strip(), options


def run_key(mechanism: str, task: Task, resolved: dict, attention_options: dict, device: str) -> str:
    """Cache key of one run: its whole configuration (seed included), the device type, torch's
    version and attnkit's source (so a fix or an upgrade trains again instead of reusing)."""
    blob = json.dumps(
        {"mechanism": mechanism, "task": task.config(), **resolved, "attention_options": attention_options,
         "device": device.split(":")[0], "torch": torch.__version__, "code": code_hash()},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_one(mechanism: str, task: Task, resolved: dict, *, attention_options: dict, device: torch.device,
              log_every: int = 10, on_step: Callable[[int, float], None] | None = None, save_dir=None,
              eval_every: int | None = None, save_name: str | None = None) -> dict:
    """Train one DecoderLM whose attention is ``mechanism``; returns the run record.

    ``eval_every``: also evaluate every so many steps (``eval_curve: [[step, metric], ...]`` in the
    record); evaluation draws from its own generator, so the training is the same with or without it.
    ``save_dir``: save the trained model under ``save_dir/<mechanism>`` (``<mechanism>-<save_name>``
    when ``save_name`` is given: the further seeds of a comparison).
    """
    m, t = resolved["model"], resolved["train"]
    t = {**TRAIN_DEFAULTS, **t}  # records made before these keys existed
    name, own_options = parse_mechanism(mechanism)
    torch.manual_seed(t["seed"])
    model = DecoderLM(vocab_size=task.vocab_size, attention=name, attention_options={**attention_options, **own_options},
                      **m).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t["lr"], betas=(t["beta1"], t["beta2"]), fused=device.type == "cuda",
    )
    data = torch.Generator().manual_seed(t["seed"])  # identical data order for every mechanism
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    curve, window, eval_curve = [], [], []
    start = time.perf_counter()
    for step in range(t["steps"]):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr=t["lr"], warmup=t["warmup"], steps=t["steps"], floor=t["min_lr_ratio"])
        inputs, targets = task.train_batch(t["batch_size"], data)
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast:
            loss = model.loss(inputs, targets)
            total = loss + _aux_loss(model)
        total.backward()
        if t["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
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
        if eval_every and (step + 1) % eval_every == 0 and step + 1 != t["steps"]:
            eval_curve.append([step + 1, task.evaluate(model, device)[task.metric]])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    evaluation = task.evaluate(model, device)
    if save_dir is not None:
        folder = mechanism.replace(":", "_").replace("=", "-") + (f"-{save_name}" if save_name else "")
        model.save_pretrained(Path(save_dir) / folder)
    record = {
        "mechanism": mechanism,
        "seed": t["seed"],
        "params": model.num_parameters(),
        "steps": t["steps"],
        "wall_s": wall,
        "tokens_per_s": t["steps"] * t["batch_size"] * task.seq_len / wall,
        "loss_curve": curve,
        "final_train_loss": curve[-1][1],
        "eval": evaluation,
        "metric": evaluation[task.metric],
    }
    if eval_every:
        record["eval_curve"] = [*eval_curve, [t["steps"], evaluation[task.metric]]]
    return record


class Diverged(FloatingPointError):
    """A run whose training loss became NaN or infinite: reported as a row, not cached."""

    def __init__(self, message: str, curve: list, params: int):
        super().__init__(message)
        self.curve, self.params = curve, params


# a cached record must hold these to be reused (older or damaged files lack some)
_RECORD_FIELDS = ("mechanism", "key", "status", "params", "steps", "wall_s", "tokens_per_s", "loss_curve",
                  "final_train_loss", "eval", "metric")


def _read_cached(path: Path, key: str) -> tuple[dict | None, str | None]:
    """(record, None) for a good cache file; (None, why) for one that cannot be used."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return None, f"{type(err).__name__}: {err}"
    if not isinstance(record, dict):
        return None, f"expected a JSON object, found {type(record).__name__}"
    missing = [f for f in _RECORD_FIELDS if f not in record]
    if missing:
        return None, f"missing field(s) {', '.join(missing)}"
    if record["key"] != key or record["status"] != "ok":
        return None, f"key {record['key']!r} / status {record['status']!r} do not match ({key!r} / 'ok')"
    number = (int, float)
    types = {"params": int, "steps": int, "wall_s": number, "tokens_per_s": number, "final_train_loss": number,
             "metric": number, "eval": dict, "loss_curve": list}
    wrong = [f"{name} ({type(record[name]).__name__})" for name, kind in types.items()
             if not isinstance(record[name], kind) or isinstance(record[name], bool)]
    if wrong:
        return None, f"field(s) of the wrong type: {', '.join(wrong)}"
    if not record["loss_curve"]:
        return None, "loss_curve is empty"
    return record, None


def _set_aside(path: Path) -> Path:
    """Rename an unusable cache file to ``<name>.bad`` (kept for inspection) and return the new path."""
    bad = path.with_name(path.name + ".bad")
    os.replace(path, bad)
    return bad


def dense_pattern_warning(spec: str, layer, seq_len: int, num_heads: int) -> str | None:
    """A warning when ``layer``'s pattern keeps every causal pair at ``seq_len``: then the
    mechanism computes plain causal attention there, and the comparison says nothing about it."""
    pattern = getattr(layer, "pattern", None)
    if not isinstance(pattern, Pattern) or pattern.kind in ("causal", "full"):
        return None
    causal = seq_len * (seq_len + 1) / 2
    pairs = pattern.pairs(seq_len, seq_len, heads=num_heads)
    if pairs < causal:
        return None
    return (f"{spec}: its pattern {pattern!r} keeps all {causal:.0f} causal (query, key) pairs per head at sequence "
            f"length {seq_len}, so it trains as plain causal attention here; use a longer sequence or a smaller "
            f"window / block size / stride to see the pattern's effect")


def _summarise(name: str, per_seed: list[dict]) -> dict:
    """One table row from the runs of one mechanism over the seeds."""
    ok = [r for r in per_seed if r["status"] == "ok"]
    metrics = [r["metric"] for r in ok]
    mean = lambda values: sum(values) / len(values) if values else None  # noqa: E731
    status = "ok" if len(ok) == len(per_seed) else "diverged" if not ok else "partly diverged"
    diverged = [r for r in per_seed if r["status"] != "ok"]
    curve = []
    if ok:
        steps = [s for s, _ in ok[0]["loss_curve"]]
        curve = [[step, mean([r["loss_curve"][i][1] for r in ok])] for i, step in enumerate(steps)]
    elif per_seed:
        curve = per_seed[0]["loss_curve"]
    return {
        "mechanism": name,
        "status": status,
        "message": "; ".join(f"seed {r['seed']}: {r['message']}" for r in diverged) or None,
        "seeds": [r["seed"] for r in per_seed],
        "metric": mean(metrics),
        "metric_min": min(metrics) if metrics else None,
        "metric_max": max(metrics) if metrics else None,
        "metrics": [r["metric"] for r in per_seed],
        "params": per_seed[0]["params"],
        "steps": per_seed[0]["steps"],
        "wall_s": mean([r["wall_s"] for r in ok]),
        "tokens_per_s": mean([r["tokens_per_s"] for r in ok]),
        "final_train_loss": mean([r["final_train_loss"] for r in ok]),
        "loss_curve": curve,
        "reused": all(r["reused"] for r in per_seed),
        "per_seed": per_seed,
    }


def prepare(cfg: CompareConfig) -> tuple[dict, list[int], Task, torch.device, list[str]]:
    """Check the whole configuration before any training: (resolved settings, seeds, task, device,
    warnings). Every mistake is a ``ValueError`` naming the option, the value and what is accepted."""
    resolved = cfg.resolved()
    seeds = cfg.seed_list()
    device = parse_device(cfg.device)
    known = [c.name for c in registry.mechanisms()]
    if not cfg.mechanisms:
        raise ValueError(f"--mechanisms is empty; registered: {', '.join(known)}")
    task = make_task(cfg.task, resolved["task_options"], cfg.corpus)
    m = resolved["model"]
    notes = []
    repeated = sorted({m for m in cfg.mechanisms if list(cfg.mechanisms).count(m) > 1})
    if repeated:
        raise ValueError(f"--mechanisms names {', '.join(repeated)} more than once; each trains once per seed")
    for spec in cfg.mechanisms:
        name, options = parse_mechanism(spec)
        if name not in known:
            raise ValueError(f"unknown mechanism {name!r}; registered: {', '.join(known)}")
        # build once here so that a wrong option fails before any training starts
        layer = registry.get(name).build(m["dim"], m["num_heads"], **{**cfg.attention_options, **options})
        warning = dense_pattern_warning(spec, layer, task.seq_len, m["num_heads"])
        if warning:
            notes.append(warning)
    return resolved, seeds, task, device, notes


def run_compare(cfg: CompareConfig, *, progress=None, command: str | None = None, save_dir=None) -> dict:
    """Train (or reuse) one run per mechanism and seed, and return the JSON-ready comparison.

    ``progress``: an object with ``start(label, steps) -> on_step(step, loss)``, ``done(label)``,
    ``reused(label)`` and ``note(message)`` (warnings; without it they go to :func:`warnings.warn`).
    """
    resolved, seeds, task, device, notes = prepare(cfg)

    def note(message: str) -> None:
        if progress:
            progress.note(message)
        else:
            warnings.warn(message, stacklevel=3)

    for message in notes:
        note(message)
    cache = Path(cfg.cache_dir) / cfg.task
    runs = []
    for name in cfg.mechanisms:
        per_seed = []
        for seed in seeds:
            label = name if len(seeds) == 1 else f"{name} seed {seed}"
            run_resolved = {**resolved, "train": {**resolved["train"], "seed": seed}}
            key = run_key(name, task, run_resolved, cfg.attention_options, cfg.device)
            path = cache / f"{name.replace(':', '_').replace('=', '-')}-{key}.json"
            record = None
            if path.exists() and save_dir is None:
                record, why = _read_cached(path, key)
                if record is None:
                    bad = _set_aside(path)
                    message = f"cache file {path} cannot be used ({why}); moved it to {bad} and training {label} again"
                    notes.append(message)
                    note(message)
                else:
                    record["reused"] = True
                    if progress:
                        progress.reused(label)
            if record is None:
                on_step = progress.start(label, run_resolved["train"]["steps"]) if progress else None
                try:
                    record = train_one(name, task, run_resolved, attention_options=cfg.attention_options, device=device,
                                       log_every=cfg.log_every, on_step=on_step,
                                       save_dir=save_dir, save_name=None if seed == seeds[0] else f"seed{seed}")
                except Diverged as err:  # the other runs still go on; this one is reported, not cached
                    record = {"mechanism": name, "seed": seed, "status": "diverged", "message": str(err),
                              "params": err.params, "steps": run_resolved["train"]["steps"], "loss_curve": err.curve,
                              "metric": None, "eval": None, "final_train_loss": None, "wall_s": None,
                              "tokens_per_s": None, "key": key, "reused": False}
                else:
                    record["key"] = key
                    record["status"] = "ok"
                    write_atomic(path, json.dumps(record))
                    record["reused"] = False
                if progress:
                    progress.done(label)
            record.setdefault("seed", seed)
            record.setdefault("message", None)
            per_seed.append(record)
        runs.append(_summarise(name, per_seed))
    evaluated = [r for row in runs for r in row["per_seed"] if r.get("eval")]
    return {
        "schema": SCHEMA,
        "command": command or " ".join(["attnkit", *sys.argv[1:]]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **run_metadata(device),
        "warnings": notes,
        "task": {**task.config(), "metric": task.metric, "higher_is_better": task.higher_is_better,
                 "chance": evaluated[0]["eval"].get("chance") if evaluated else None},
        "config": {**asdict(cfg), **resolved},
        "seeds": seeds,
        "runs": runs,
    }
