"""Issue 28, families ``pooling`` and ``multimodal``: each module against its baseline on its task, 3 seeds.

    nice -n 10 python benchmarks/pooling_multimodal.py pooling      # ~3 min on 1 CPU thread
    nice -n 10 python benchmarks/pooling_multimodal.py multimodal   # ~3 min
    nice -n 10 python benchmarks/pooling_multimodal.py speed        # CPU ms of each module and its baseline
    python benchmarks/pooling_multimodal.py plot                    # both PNGs from the JSONs

pooling: the shipped subject LM (attnkit/hf/subject_model, 12 x 256, frozen, float32) embeds
(docstring, code) pairs of stdlib functions (attnkit.tasks.pairs.function_pairs, 80 bytes each); a
pooling head is trained alone with in-batch InfoNCE on 800 pairs and scored by recall@1/@10 of the
code given the docstring among 400 held-out pairs.

multimodal: 2-layer pre-norm classifiers (width 32, 2 heads) over A's symbol tokens then B's feature
tokens (attnkit.tasks.pairs.TwoModalityMatch), the attention being MODA (duplex), MODA one-way (the
released code's direction) or plain joint MHA (attnkit's ``mha``, full pattern, no RoPE); accuracy
on 4096 fresh samples (length 4, 8 symbols: chance 1/4) after 500 steps, and the learning curve
(accuracy every 50 steps on 1024 probe samples; its mean is ``curve_auc``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import attnkit
from attnkit.multimodal import ModularDuplexAttention
from attnkit.pooling import (LastTokenPooling, MeanPooling, TrainablePooling, contrastive_loss, hidden_states,
                             layer_means, recall_at)
from attnkit.tasks.pairs import TwoModalityMatch, function_pairs

OUT = Path(__file__).resolve().parent / "results" / "cpu"
SEEDS = (0, 1, 2)


def _header(command: str) -> dict:
    return {"command": command, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


# -- pooling ---------------------------------------------------------------------------------


def _encode(texts: list[bytes], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros(len(texts), length, dtype=torch.long)
    mask = torch.zeros(len(texts), length, dtype=torch.bool)
    for i, t in enumerate(texts):
        ids[i, : len(t)] = torch.tensor(list(t), dtype=torch.long)
        mask[i, : len(t)] = True
    return ids, mask


@torch.no_grad()
def _features(model, texts, length=80, batch=50):
    """Per-layer token means (N, L, C), last-layer tokens (N, T, C) and masks: all any head reads."""
    ids, mask = _encode(texts, length)
    means, last = [], []
    for s in range(0, len(texts), batch):
        h = hidden_states(model, ids[s : s + batch], mask[s : s + batch].long())  # (b, L, T, C)
        means.append(layer_means(h, mask[s : s + batch]))
        last.append(h[:, -1])
    return torch.cat(means), torch.cat(last), mask


class _FromFeatures(nn.Module):
    """Feeds a head the (B, L, T, C) view it reads from the cached features: the per-layer means as
    L one-token layers (their mean is themselves) or the last layer's tokens as one layer."""

    def __init__(self, head, reads):
        super().__init__()
        self.head, self.reads = head, reads

    def forward(self, means, last, mask):
        if self.reads == "means":
            return self.head(means[:, :, None, :], None)
        return self.head(last[:, None], mask)


def run_pooling(args) -> dict:
    from transformers import AutoModelForCausalLM

    from attnkit.hf.subject import default_subject

    torch.set_num_threads(args.threads)
    t0 = time.time()
    pairs = function_pairs(max_pairs=1200)
    model = AutoModelForCausalLM.from_pretrained(default_subject(), dtype=torch.float32).eval()
    L, C = model.config.num_hidden_layers, model.config.hidden_size
    cache = Path(args.cache)
    if cache.is_file():
        feats = torch.load(cache)
    else:
        q = _features(model, [p[0] for p in pairs])
        k = _features(model, [p[1] for p in pairs])
        feats = {"q": q, "k": k}
        torch.save(feats, cache)
    print(f"features: {len(pairs)} pairs, {time.time() - t0:.0f} s", flush=True)
    n_train = 800
    methods = {
        "multi-layer-pooling": lambda: _FromFeatures(TrainablePooling(C, L, num_heads=4, num_latents=8), "means"),
        "last-layer-pooling": lambda: _FromFeatures(TrainablePooling(C, L, num_heads=4, num_latents=8,
                                                                     source="last-layer"), "tokens"),
        "last-token-pooling": lambda: _FromFeatures(LastTokenPooling(C), "tokens"),
        "mean-pooling": lambda: _FromFeatures(MeanPooling(C), "tokens"),
    }
    rows = []
    for name, make in methods.items():
        for seed in SEEDS:
            torch.manual_seed(seed)
            head = make()
            opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.01)
            g = torch.Generator().manual_seed(seed)
            start = time.time()
            for step in range(args.steps):
                idx = torch.randperm(n_train, generator=g)[: args.batch]
                a = head(*(t[idx] for t in feats["q"]))
                b = head(*(t[idx] for t in feats["k"]))
                loss = contrastive_loss(a, b)
                opt.zero_grad()
                loss.backward()
                opt.step()
            head.eval()
            with torch.no_grad():
                test = slice(n_train, len(pairs))
                r = recall_at(head(*(t[test] for t in feats["q"])), head(*(t[test] for t in feats["k"])))
            head.train()
            rows.append({"method": name, "seed": seed, "recall@1": r[1], "recall@10": r[10],
                         "final_loss": float(loss.detach()), "train_s": time.time() - start,
                         "parameters": sum(p.numel() for p in head.parameters())})
            print(json.dumps(rows[-1]), flush=True)
    return {"command": "python benchmarks/pooling_multimodal.py pooling", "header": {**_header("python benchmarks/pooling_multimodal.py pooling"), "subject": "attnkit/hf/subject_model",
                       "layers": L, "width": C, "pairs": len(pairs), "train": n_train, "test": len(pairs) - n_train,
                       "bytes": 80, "steps": args.steps, "batch": args.batch, "lr": args.lr},
            "rows": rows, "summary": _summary(rows, ("recall@1", "recall@10"))}


# -- multimodal -------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, dim, attention):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), attention, nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, modality):
        a = self.norm1(x)
        x = x + (self.attn(a, modality) if isinstance(self.attn, ModularDuplexAttention) else self.attn(a))
        return x + self.mlp(self.norm2(x))


class FusionClassifier(nn.Module):
    """A's symbols (embedding + position) and B's features (linear) as one sequence of 2n tokens
    with a modality embedding; two blocks; one logit per A position, read at B's first token."""

    def __init__(self, attention: str, task: TwoModalityMatch, dim=32, heads=2, layers=2):
        super().__init__()
        self.symbols = nn.Embedding(task.num_symbols, dim)
        self.position = nn.Parameter(0.02 * torch.randn(task.length, dim))
        self.features = nn.Linear(task.feature_dim, dim)
        self.b_position = nn.Parameter(0.02 * torch.randn(task.length, dim))  # B's first token is the query
        self.modality_embedding = nn.Embedding(2, dim)

        def make():
            if attention == "joint-attention":
                return attnkit.build("mha", dim=dim, num_heads=heads, pattern="full", rope=False)
            return ModularDuplexAttention(dim, heads, duplex=attention == "moda")

        self.blocks = nn.ModuleList(_Block(dim, make()) for _ in range(layers))
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, task.num_classes))

    def forward(self, a, b):
        n = a.shape[1]
        modality = torch.cat([torch.zeros_like(a), torch.ones_like(a)], dim=1)  # (B, 2n)
        x = torch.cat([self.symbols(a) + self.position, self.features(b * b.shape[-1] ** 0.5) + self.b_position], dim=1) + self.modality_embedding(modality)
        for block in self.blocks:
            x = block(x, modality)
        return self.head(x[:, n])  # read out at B's first token, the query


def run_multimodal(args) -> dict:
    torch.set_num_threads(args.threads)
    task = TwoModalityMatch(length=4, num_symbols=8)
    probe = task.batch(1024, torch.Generator().manual_seed(9999))  # the learning-curve probe
    rows = []
    for name in ("moda", "moda-oneway", "joint-attention"):
        for seed in SEEDS:
            torch.manual_seed(seed)
            model = FusionClassifier(name, task)
            opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
            g = torch.Generator().manual_seed(100 + seed)
            start, curve = time.time(), []
            for step in range(1, args.steps + 1):
                a, b, y = task.batch(args.batch, g)
                loss = F.cross_entropy(model(a, b), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if step % 50 == 0:
                    with torch.no_grad():
                        curve.append(float((model(*probe[:2]).argmax(-1) == probe[2]).float().mean()))
            train_s = time.time() - start
            with torch.no_grad():
                a, b, y = task.batch(4096, torch.Generator().manual_seed(10_000 + seed))
                acc = float((model(a, b).argmax(-1) == y).float().mean())
            reached = next((50 * (i + 1) for i, c in enumerate(curve) if c >= 0.9), None)
            rows.append({"method": name, "seed": seed, "accuracy": acc, "steps_to_90": reached,
                         "curve_every_50": curve, "final_loss": float(loss.detach()), "train_s": train_s,
                         "parameters": sum(p.numel() for p in model.parameters())})
            print(json.dumps(rows[-1]), flush=True)
    world = {"num_symbols": task.num_symbols, "length": task.length, "feature_dim": task.feature_dim, "noise": task.noise}
    return {"command": "python benchmarks/pooling_multimodal.py multimodal", "header": {**_header("python benchmarks/pooling_multimodal.py multimodal"), "task": world,
                       "steps": args.steps, "batch": args.batch, "lr": args.lr, "width": 32, "heads": 2, "layers": 2},
            "rows": rows, "summary": _summary(rows, ("accuracy", "curve_auc"))}


# -- speed: what attnkit bench cannot host (not x (B, T, C) -> (B, T, C) layers) -------------------


def _time_ms(fn, repeats, device="cpu"):
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    times = []
    for _ in range(repeats + 1):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - start))
    return sorted(times[1:])[len(times[1:]) // 2]  # median, the first call dropped as warm-up


def run_speed(args) -> dict:
    """Forward and forward+backward milliseconds (median) of each module and its baseline at the
    shapes of their tasks' real use: pooling heads over (32, 12, 128, 256) hidden states; MODA and
    joint attention on (8, 256, 256) with 4 heads and two modalities of 128 tokens each. On the CPU in
    float32; with ``--device cuda`` in bfloat16, the GPU synchronised around each call."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    put = lambda m: m.to(device=device, dtype=dtype)  # noqa: E731
    rows = []
    hidden = torch.randn(32, 12, 128, 256, device=device, dtype=dtype)
    mask = torch.ones(32, 128, dtype=torch.bool, device=device)
    heads = {"multi-layer-pooling": TrainablePooling(256, 12), "last-layer-pooling": TrainablePooling(256, 12, source="last-layer"),
             "last-token-pooling": LastTokenPooling(256), "mean-pooling": MeanPooling(256)}
    for name, head in heads.items():
        head = put(head)
        fwd = _time_ms(lambda: head(hidden, mask), args.repeats, device)
        fwdbwd = _time_ms(lambda: head(hidden, mask).float().sum().backward(), args.repeats, device)
        rows.append({"family": "pooling", "method": name, "shape": "hidden (32, 12, 128, 256)", "fwd_ms": fwd,
                     "fwdbwd_ms": fwdbwd})
    x = torch.randn(8, 256, 256, device=device, dtype=dtype)
    modality = torch.cat([torch.zeros(8, 128), torch.ones(8, 128)], dim=1).long().to(device)
    layers = {"moda": ModularDuplexAttention(256, 4), "moda-oneway": ModularDuplexAttention(256, 4, duplex=False),
              "joint-attention": attnkit.build("mha", dim=256, num_heads=4, pattern="full", rope=False)}
    for name, layer in layers.items():
        layer = put(layer)
        call = (lambda l=layer: l(x, modality)) if isinstance(layer, ModularDuplexAttention) else (lambda l=layer: l(x))
        fwd = _time_ms(call, args.repeats, device)
        fwdbwd = _time_ms(lambda: call().float().sum().backward(), args.repeats, device)
        rows.append({"family": "multimodal", "method": name, "shape": "x (8, 256, 256), 4 heads", "fwd_ms": fwd,
                     "fwdbwd_ms": fwdbwd})
    for r in rows:
        print(json.dumps(r), flush=True)
    command = "python benchmarks/pooling_multimodal.py " + " ".join(sys.argv[1:] if args.argv is None else args.argv)
    where = (f"CUDA ({torch.cuda.get_device_name(device)}), bfloat16" if device.type == "cuda"
             else "CPU, float32; a machine shared with other jobs: ratios more than absolutes")
    return {"command": command, "header": {**_header(command), "repeats": args.repeats, "device": str(device),
                                           "note": f"{where}, median"},
            "rows": rows}


# -- tables and plots -------------------------------------------------------------------------


def _summary(rows, metrics):
    for r in rows:  # the mean of the learning curve: how early a method learns, not only where it ends
        if "curve_every_50" in r:
            r["curve_auc"] = sum(r["curve_every_50"]) / len(r["curve_every_50"])
    out = {}
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        out[name] = {}
        for m in metrics:
            values = torch.tensor([r[m] for r in mine])
            out[name][m] = {"mean": float(values.mean()), "std": float(values.std()) if len(mine) > 1 else 0.0,
                            "seeds": [r[m] for r in mine]}
    return out


def plot(family: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads((OUT / f"{family}.json").read_text())
    summary = data["summary"]
    metrics = list(next(iter(summary.values())))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        names = list(summary)
        means = [summary[n][m]["mean"] for n in names]
        stds = [summary[n][m]["std"] for n in names]
        ax.bar(range(len(names)), means, yerr=stds, color=["C0"] + ["C7"] * (len(names) - 1), capsize=4)
        for i, n in enumerate(names):
            ax.scatter([i] * len(summary[n][m]["seeds"]), summary[n][m]["seeds"], color="k", s=8, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(m)
        ax.set_title(f"{family}: {m} (3 seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT / f"{family}.png", dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("family", choices=("pooling", "multimodal", "speed", "plot"))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", default="/tmp/attnkit_pooling_features.pt")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="speed only: where to time")
    parser.add_argument("--out", default=None, help="speed only: the JSON to write "
                        "(default: benchmarks/results/cpu/pooling-multimodal-speed.json)")
    args = parser.parse_args(argv)
    args.argv = argv
    if args.family == "plot":
        for family in ("pooling", "multimodal"):
            if (OUT / f"{family}.json").is_file():
                plot(family)
        return
    if args.family == "speed":
        if args.device == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device here")
        out = Path(args.out) if args.out else OUT / "pooling-multimodal-speed.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(run_speed(args), indent=1) + "\n")
        return
    defaults = {"pooling": (300, 64, 1e-3), "multimodal": (500, 64, 3e-3)}[args.family]
    args.steps = args.steps or defaults[0]
    args.batch = args.batch or defaults[1]
    args.lr = args.lr or defaults[2]
    result = (run_pooling if args.family == "pooling" else run_multimodal)(args)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.family}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(args.family)
    for name, s in result["summary"].items():
        print(name, {m: f"{v['mean']:.3f} ± {v['std']:.3f}" for m, v in s.items()})


if __name__ == "__main__":
    sys.exit(main())
