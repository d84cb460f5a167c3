"""The three papers' headline directions, measured on :class:`attnkit.tasks.images.ImageTask` (CPU, seeds):

- ``lookupvit``: a LookupViT classifier against a ViT classifier of the same width and depth, trained the
  same way: test accuracy, forward FLOPs per image (the cards' FLOP models) and CPU forward time.
- ``probing``: linear, standard attentive and efficient probes on the features of a frozen random ViT
  (:class:`attnkit.tasks.images.FrozenPatchEncoder`): test accuracy and trainable parameters.
- ``cct``: the Concept-Centric Transformer head against mean pooling + linear on the same small ViT
  backbone, trained end to end: accuracy, and whether the explanation localises the object (the top
  concept's slot attention mass inside the object's patches, against the uniform map's mass).
- ``bench``: CPU forward latency of every card at ViT-Ti-like shapes (224x224 image, 16 px patches:
  N = 196 tokens, C = 192, 3 heads).

Run (writes JSON and PNG under ``--out``)::

    nice -n 10 python -m attnkit.vision.experiments lookupvit --seeds 0,1,2 --out benchmarks/results/cpu
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._console import write_atomic
from .._checks import positive_int
from ..tasks.base import summarise_seeds
from ..tasks.images import FrozenPatchEncoder, ImageTask, sincos_positions
from .cards import CARDS
from .concepts import ConceptCentricTransformer
from .lookupvit import PatchClassifier, lookupvit_block_flops
from .probing import AttentiveProbe, EfficientProbe, LinearProbe, probe_parameters
from .vit import ViTBlock, vit_block_flops

__all__ = ["train_classifier", "run_lookupvit", "run_probing", "run_cct", "run_bench", "main"]


def train_classifier(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *, steps: int, batch: int = 64,
                     lr: float = 2e-3, seed: int = 0, extra_loss=None) -> float:
    """AdamW with a cosine schedule on random minibatches; returns the last-50-step mean loss."""
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(inputs.shape[0], (batch,), generator=generator)
        logits = model(inputs[idx])
        loss = F.cross_entropy(logits, labels[idx])
        if extra_loss is not None:
            loss = loss + extra_loss(model, inputs[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    model.eval()
    return sum(losses[-50:]) / len(losses[-50:])


@torch.no_grad()
def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    correct = sum(int((model(inputs[i:i + batch]).argmax(-1) == labels[i:i + batch]).sum())
                  for i in range(0, inputs.shape[0], batch))
    return correct / inputs.shape[0]


@torch.no_grad()
def forward_ms(model: nn.Module, inputs: torch.Tensor, repeat: int = 5) -> float:
    """Median CPU forward time of one batch, in ms."""
    model.eval()
    model(inputs)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        model(inputs)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def classifier_flops(model: PatchClassifier, config: dict) -> float:
    """Forward FLOPs per image of a :class:`PatchClassifier` (embedding, blocks, head)."""
    N, C, T = config["grid"] ** 2, config["dim"], config["token_dim"]
    blocks = config["depth"] * (
        lookupvit_block_flops(1, N, {"dim": C, "num_compressed": config["num_compressed"],
                                     "lookup_mlp_ratio": config["lookup_mlp_ratio"]}).fwd
        if model.block == "lookupvit" else vit_block_flops(1, N, {"dim": C}).fwd)
    return 2.0 * N * T * C + blocks + 2.0 * C * config["num_classes"]


def _data(task: ImageTask, seed: int, train: int, test: int):
    data = task.split(train=train, test=test, seed=seed)
    return data["train"], data["test"]


def run_lookupvit(seeds, *, steps: int = 200, train: int = 2048, test: int = 512, size: int = 32, patch: int = 4,
                  dim: int = 32, depth: int = 2, num_compressed: int = 4, label: str = "position",
                  blocks=("vit", "lookupvit")) -> dict:
    task = ImageTask(label=label, size=size, patch=patch)
    rows = []
    for seed in seeds:
        tr, te = _data(task, seed, train, test)
        for block in blocks:
            config = {"grid": task.grid, "dim": dim, "token_dim": task.token_dim, "depth": depth,
                      "num_compressed": num_compressed, "lookup_mlp_ratio": 0.5, "num_classes": task.num_classes}
            torch.manual_seed(seed)
            model = PatchClassifier(task.token_dim, task.grid, task.num_classes, dim=dim, num_heads=4, depth=depth,
                                    block=block, num_compressed=num_compressed)
            start = time.perf_counter()
            loss = train_classifier(model, tr["tokens"], tr["label"], steps=steps, seed=seed)
            rows.append({"seed": seed, "model": block, "accuracy": accuracy(model, te["tokens"], te["label"]),
                         "train_loss": loss, "train_s": time.perf_counter() - start,
                         "flops_per_image": classifier_flops(model, config),
                         "forward_ms_batch256": forward_ms(model, te["tokens"][:256]),
                         "parameters": sum(p.numel() for p in model.parameters())})
            print(rows[-1], flush=True)
    return {"task": {"label": label, "size": size, "patch": patch, "tokens": task.num_tokens, "train": train,
                     "test": test}, "config": {"dim": dim, "depth": depth, "heads": 4, "num_compressed": num_compressed,
                                               "steps": steps, "batch": 64}, "rows": rows}


def run_probing(seeds, *, steps: int = 200, train: int = 2048, test: int = 512, size: int = 32, patch: int = 4,
                dim: int = 64, label: str = "position", num_queries: int = 8) -> dict:
    task = ImageTask(label=label, size=size, patch=patch)
    rows = []
    for seed in seeds:
        tr, te = _data(task, seed, train, test)
        encoder = FrozenPatchEncoder(task.token_dim, task.grid, dim=dim, depth=2, num_heads=4, seed=seed)
        f_train, f_test = encoder.features(tr["tokens"]), encoder.features(te["tokens"])
        probes = {
            "linear": lambda: LinearProbe(dim, num_classes=task.num_classes),
            "attentive": lambda: AttentiveProbe(dim, 4, num_classes=task.num_classes),
            "efficient": lambda: EfficientProbe(dim, num_classes=task.num_classes, num_queries=num_queries),
            "efficient-d_out2": lambda: EfficientProbe(dim, num_classes=task.num_classes, num_queries=num_queries,
                                                       d_out=2),
        }
        for name, make in probes.items():
            torch.manual_seed(seed)
            probe = make()
            start = time.perf_counter()
            train_classifier(probe, f_train, tr["label"], steps=steps, seed=seed, lr=3e-3)
            rows.append({"seed": seed, "probe": name, "accuracy": accuracy(probe, f_test, te["label"]),
                         "parameters": probe_parameters(probe), "train_s": time.perf_counter() - start})
            print(rows[-1], flush=True)
    return {"task": {"label": label, "size": size, "patch": patch, "tokens": task.num_tokens, "train": train,
                     "test": test},
            "encoder": {"kind": "frozen random ViT (FrozenPatchEncoder, seeded per run)", "dim": dim, "depth": 2},
            "config": {"steps": steps, "batch": 64, "num_queries": num_queries}, "rows": rows}


class _Backbone(nn.Module):
    """Patch embedding + positions + ViT blocks + LayerNorm: tokens -> features (B, N, C)."""

    def __init__(self, token_dim, grid, dim, depth):
        super().__init__()
        self.embed = nn.Linear(token_dim, dim)
        self.register_buffer("positions", sincos_positions(grid, dim), persistent=False)
        self.blocks = nn.ModuleList(ViTBlock(dim, 4) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens):
        x = self.embed(tokens) + self.positions
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class _WithHead(nn.Module):
    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, tokens):
        return self.head(self.backbone(tokens))


class _MeanLinear(nn.Module):
    def __init__(self, dim, num_classes):
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.linear(x.mean(1))


@torch.no_grad()
def localisation(model: _WithHead, tokens: torch.Tensor, mask: torch.Tensor) -> dict:
    """Mass on the object's patches (each patch weighted by its object fraction) of three maps, against
    the uniform map's (chance): the top concept's slot attention (where it was gathered from), the
    tokens' attention to the top concept (who read it), and the positive per-token contributions to
    the predicted logit; also the best single concept's slot attention."""
    features = model.backbone(tokens)
    ex = model.head.explain(features)
    inside = (ex["where"] * mask).sum(1)  # (B,)
    chance = mask.mean(1)
    per_concept = torch.einsum("bns,bn->bs", ex["slot_attn"], mask)  # (B, S)
    positive = ex["token_contribution"].clamp_min(0)  # the tokens that push the predicted logit up
    return {"top_concept_mass": float(inside.mean()), "chance_mass": float(chance.mean()),
            "ratio_to_chance": float(inside.mean() / chance.mean()),
            "best_concept_ratio": float(per_concept.max(1).values.mean() / chance.mean()),
            "mean_concept_ratio": float(per_concept.mean(1).mean() / chance.mean()),
            "top_is_best_fraction": float((per_concept.argmax(1) == ex["top_concept"]).float().mean()),
            "read_ratio_to_chance": float((ex["read"] * mask).sum(1).mean() / chance.mean()),
            "contribution_ratio_to_chance": float((positive / positive.sum(1, keepdim=True).clamp_min(1e-12) * mask)
                                                  .sum(1).mean() / chance.mean())}


def run_cct(seeds, *, steps: int = 200, train: int = 2048, test: int = 512, size: int = 32, patch: int = 4,
            dim: int = 32, depth: int = 1, num_concepts: int = 8, label: str = "position") -> dict:
    task = ImageTask(label=label, size=size, patch=patch)
    rows = []
    for seed in seeds:
        tr, te = _data(task, seed, train, test)
        for head in ("mean-linear", "cct"):
            torch.manual_seed(seed)
            backbone = _Backbone(task.token_dim, task.grid, dim, depth)
            model = _WithHead(backbone, _MeanLinear(dim, task.num_classes) if head == "mean-linear" else
                              ConceptCentricTransformer(dim, 4, num_concepts=num_concepts, num_classes=task.num_classes))
            start = time.perf_counter()
            train_classifier(model, tr["tokens"], tr["label"], steps=steps, seed=seed)
            row = {"seed": seed, "head": head, "accuracy": accuracy(model, te["tokens"], te["label"]),
                   "parameters": sum(p.numel() for p in model.parameters()), "train_s": time.perf_counter() - start}
            if head == "cct":
                row |= localisation(model, te["tokens"], te["mask"])
            rows.append(row)
            print(rows[-1], flush=True)
    return {"task": {"label": label, "size": size, "patch": patch, "tokens": task.num_tokens, "train": train,
                     "test": test}, "config": {"dim": dim, "depth": depth, "num_concepts": num_concepts, "steps": steps,
                                               "batch": 64}, "rows": rows}


def run_bench(*, batch: int = 8, tokens=(196,), dim: int = 192, heads: int = 3, repeat: int = 5,
              device: str = "cpu", dtype: str = "float32") -> dict:
    """Forward latency and FLOPs of every vision card at ``tokens`` patch tokens per image (default:
    ViT-Ti at 224 x 224, 16 px patches, on the CPU; on CUDA, e.g. ViT-B in bf16 at 196-1024 tokens).
    The time is the median over ``repeat`` calls after two warm-up calls, the device synchronised
    around each call."""
    if isinstance(tokens, int):
        tokens = (tokens,)
    device = torch.device(device)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rows = []
    for n in tokens:
        x = torch.randn(batch, n, dim, device=device, dtype=torch_dtype)
        for card in CARDS:
            torch.manual_seed(0)
            num_heads = 1 if card.name == "efficient-probe" else heads
            module = card.build(dim, num_heads).eval().to(device=device, dtype=torch_dtype)
            if card.name == "lookupvit":
                c = torch.randn(batch, card.config(dim, heads)["num_compressed"], dim, device=device, dtype=torch_dtype)
                call = lambda m=module, c=c: m(x, c)  # noqa: E731
            else:
                call = lambda m=module: m(x)  # noqa: E731
            with torch.no_grad():
                for _ in range(2):
                    call()
                sync()
                times = []
                for _ in range(repeat):
                    start = time.perf_counter()
                    call()
                    sync()
                    times.append((time.perf_counter() - start) * 1e3)
            flops = card.flop_count(batch, n, dim, num_heads)
            rows.append({"name": card.name, "family": card.family, "tokens": n, "latency_ms": sorted(times)[repeat // 2],
                         "flops_fwd": flops.fwd, "attention_flops_fwd": flops.attention_fwd,
                         "parameters": sum(p.numel() for p in module.parameters())})
            print(rows[-1], flush=True)
            del module
    return {"config": {"batch": batch, "tokens": list(tokens), "dim": dim, "heads": heads, "repeat": repeat,
                       "device": str(device), "dtype": dtype,
                       "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                       "threads": torch.get_num_threads()}, "rows": rows}


RUNS = {"lookupvit": run_lookupvit, "probing": run_probing, "cct": run_cct}


def summarise(result: dict, key: str) -> list[dict]:
    """Mean and spread over seeds per ``key`` value (``model``, ``probe`` or ``head``)."""
    return summarise_seeds(result["rows"], key)


def plot(name: str, result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if name == "bench":
        config = result["config"]
        where = "CUDA" if config.get("device", "cpu").startswith("cuda") else "CPU"
        tokens = config["tokens"] if isinstance(config["tokens"], list) else [config["tokens"]]
        names = list(dict.fromkeys(r["name"] for r in result["rows"]))
        fig, ax = plt.subplots(figsize=(7, 3.8))
        width = 0.8 / len(tokens)
        for i, n in enumerate(tokens):  # one bar per card and token count
            by_name = {r["name"]: r["latency_ms"] for r in result["rows"] if r.get("tokens", n) == n}
            ax.barh([j + i * width for j in range(len(names))], [by_name.get(c, 0.0) for c in names], height=width,
                    label=f"N={n}")
        ax.set_yticks([j + 0.4 - width / 2 for j in range(len(names))], names)
        ax.set_xscale("log" if len(tokens) > 1 else "linear")
        ax.set_xlabel(f"{where} forward ms (batch {config['batch']}, C={config['dim']}, {config.get('dtype', 'float32')})")
        ax.legend(fontsize=8)
    else:
        key = {"lookupvit": "model", "probing": "probe", "cct": "head"}[name]
        x_field = {"lookupvit": "flops_per_image", "probing": "parameters", "cct": "parameters"}[name]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for s in result["summary"]:
            rows = [r for r in result["rows"] if r[key] == s[key]]
            ax.scatter([r[x_field] for r in rows], [r["accuracy"] for r in rows], label=s[key])
        if name == "probing":  # from hundreds to tens of thousands of parameters
            ax.set_xscale("log")
        ax.set_xlabel(x_field.replace("_", " "))
        ax.set_ylabel("test accuracy")
        ax.legend()
    ax.set_title(f"vision-{name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnkit.vision.experiments", description=__doc__.split("\n")[0])
    parser.add_argument("run", choices=[*RUNS, "bench"])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the run's own)")
    parser.add_argument("--label", default=None, help="the attribute to classify (default: the run's own)")
    parser.add_argument("--num-compressed", type=int, default=None, help="lookupvit: M (a square)")
    parser.add_argument("--blocks", default=None, help="lookupvit: which classifiers to train (vit,lookupvit)")
    parser.add_argument("--tag", default="", help="suffix of the output names: vision-<run>[-tag].json")
    parser.add_argument("--out", default="benchmarks/results/cpu", help="folder for vision-<run>.json and .png")
    bench = parser.add_argument_group("bench only")
    bench.add_argument("--device", default="cpu", help="bench: cpu or cuda")
    bench.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    bench.add_argument("--batch", type=int, default=8)
    bench.add_argument("--tokens", default="196", help="bench: comma-separated patch-token counts N per image")
    bench.add_argument("--dim", type=int, default=192)
    bench.add_argument("--heads", type=int, default=3)
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)  # small models on a shared CPU: threads only contend
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if args.run == "bench":
        try:
            tokens = tuple(positive_int(int(t), "--tokens") for t in args.tokens.split(","))
        except ValueError:
            raise SystemExit(f"--tokens must be comma-separated positive integers, got {args.tokens!r}") from None
        if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
            raise SystemExit(f"--device must be cpu or cuda (with a GPU), got {args.device!r}")
        if args.heads > 0 and args.dim % args.heads:
            raise SystemExit(f"--dim ({args.dim}) must be divisible by --heads ({args.heads})")
        try:
            sizes = {k: positive_int(getattr(args, k), f"--{k}") for k in ("batch", "dim", "heads")}
        except ValueError as err:
            raise SystemExit(str(err)) from None
        result = run_bench(tokens=tokens, device=args.device, dtype=args.dtype, repeat=20 if args.device == "cuda" else 5,
                           **sizes)
    else:
        options = {} if args.steps is None else {"steps": positive_int(args.steps, "--steps")}
        options |= {} if args.label is None else {"label": args.label}
        if args.num_compressed is not None:
            if args.run != "lookupvit":
                raise SystemExit("--num-compressed applies to the lookupvit run only")
            options["num_compressed"] = args.num_compressed
        if args.blocks is not None:
            if args.run != "lookupvit" or not set(args.blocks.split(",")) <= {"vit", "lookupvit"}:
                raise SystemExit(f"--blocks takes vit and / or lookupvit (lookupvit run only), got {args.blocks!r}")
            options["blocks"] = tuple(args.blocks.split(","))
        result = RUNS[args.run](seeds, **options)
        result["summary"] = summarise(result, {"lookupvit": "model", "probing": "probe", "cct": "head"}[args.run])
    import sys

    result = {"command": "python -m attnkit.vision.experiments " + " ".join(sys.argv[1:] if argv is None else argv),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__, **result}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"vision-{args.run}" + (f"-{args.tag}" if args.tag else "")
    write_atomic(out / f"{stem}.json", json.dumps(result, indent=1) + "\n")
    plot(args.run, result, out / f"{stem}.png")
    print(json.dumps(result.get("summary", result["rows"]), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
