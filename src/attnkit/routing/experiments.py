"""The paper's direction, measured: does graph-of-tokens routing fluctuate less at equal or better quality?

``train`` (default): a byte-level :class:`~attnkit.routing.RoutedLM` (2 attention + SMoE blocks, C = 64, 4 heads,
E = 8 experts, top-2, expert width 128) on :class:`attnkit.tasks.text.TextCorpus` (the Python standard library's
source, 128-byte windows), once per router (``topk``, ``similarity``, ``attention``) and seed, same data order,
same initial weights for every shared module. On request (``--routers``, with ``--tag``): ``similarity-t0.1``
(the similarity router at temperature 0.1) and ``similarity-learned`` (a learned rank-64 ``W_s``). AdamW 3e-3 with warm-up and cosine decay, load-balancing loss
weight 0.01. Every ``eval_every`` steps the model routes a fixed probe set (validation windows); measured:

- routing fluctuation (arXiv 2505.00792 / StableMoE): the share of probe tokens whose top-1 expert changed
  since the previous evaluation point, mean over layers; the headline is its mean over the second half of
  training (the paper's "late stage");
- quality: validation loss and bits per byte on held-out windows at the end;
- expert load on the probe set at the end: max share / mean share (1 = balanced) and the coefficient of variation.

``bench``: CPU forward latency (1 thread) and FLOPs (the cards' models) of each router's SMoE layer and block.

Run (writes ``routing.json`` / ``routing.png`` and ``routing-bench.json`` under ``--out``)::

    OMP_NUM_THREADS=1 nice -n 10 python -m attnkit.routing.experiments --seeds 0,1,2
    OMP_NUM_THREADS=1 nice -n 10 python -m attnkit.routing.experiments --routers similarity-t0.1,similarity-learned --tag variants
    OMP_NUM_THREADS=1 nice -n 10 python -m attnkit.routing.experiments --seeds 0 --steps 1000 --tag long-s0  # (and s1, s2)
    OMP_NUM_THREADS=1 nice -n 10 python -m attnkit.routing.experiments bench
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

from .._console import write_atomic
from .._checks import positive_int
from ..tasks.text import TextCorpus
from .blocks import RoutedLM, smoe_flops
from .cards import CARDS
from .metrics import expert_load, routing_fluctuation, top1_experts
from .smoe import SparseMoE

__all__ = ["run_train", "run_bench", "main", "ROUTER_NAMES"]

#: the runs: name -> (router, router options)
VARIANTS = {
    "topk": ("topk", {}),
    "similarity": ("similarity", {}),
    "attention": ("attention", {}),
    "similarity-t0.1": ("similarity", {"temperature": 0.1}),
    "similarity-learned": ("similarity", {"similarity": "learned"}),
}
#: the default runs: the paper's three routers (``--routers`` picks others of :data:`VARIANTS`)
ROUTER_NAMES = ("topk", "similarity", "attention")
MODEL = {"vocab_size": 256, "dim": 64, "num_layers": 2, "num_heads": 4, "num_experts": 8, "top_k": 2, "hidden": 128}


def _lr(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def probe_routing(model: RoutedLM, probe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 expert ``[L, B, T]``, chosen experts ``[L, B, T, k]``) of every block on the probe tokens."""
    was = model.training
    model.eval()
    model(probe)
    model.train(was)
    routings = model.routings()
    return torch.stack([top1_experts(r.probs) for r in routings]), torch.stack([r.experts for r in routings])


@torch.no_grad()
def validation_loss(model: RoutedLM, inputs: torch.Tensor, targets: torch.Tensor, batch: int = 32) -> float:
    was = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(inputs), batch):
        logits = model(inputs[i:i + batch])
        total += float(F.cross_entropy(logits.flatten(0, 1), targets[i:i + batch].flatten(), reduction="sum"))
    model.train(was)
    return total / targets.numel()


def _windows(task: TextCorpus, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(task._val) - task.seq_len - 1, (count,), generator=g)
    return task._windows(task._val, starts)


def train_one(router: str, seed: int, task: TextCorpus, *, steps: int, batch: int, eval_every: int,
              probe: torch.Tensor, val: tuple, lr: float = 3e-3, balance_weight: float = 0.01) -> dict:
    torch.manual_seed(seed)  # same initial weights for the modules every router shares
    name, options = VARIANTS[router]
    model = RoutedLM(router=name, **MODEL, **options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    data = torch.Generator().manual_seed(10_000 + seed)  # same batches for every router
    previous, _ = probe_routing(model, probe)
    curve, losses = [], []
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, steps, lr, warmup=steps // 20)
        inputs, targets = task.train_batch(batch, data)
        logits = model(inputs)
        lm_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss = lm_loss + balance_weight * model.aux_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(lm_loss.detach()))
        if (step + 1) % eval_every == 0:
            current, _ = probe_routing(model, probe)
            per_layer = [routing_fluctuation(p, c) for p, c in zip(previous, current)]
            curve.append({"step": step + 1, "fluctuation": sum(per_layer) / len(per_layer),
                          "per_layer": per_layer, "train_loss": sum(losses[-eval_every:]) / eval_every})
            previous = current
    seconds = time.perf_counter() - start
    _, chosen = probe_routing(model, probe)
    probs = torch.stack([r.probs for r in model.routings()])  # (L, B, T, E)
    entropy = float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean())
    top2 = probs.topk(2, dim=-1).values
    margin = float((top2[..., 0] - top2[..., 1]).mean())
    loads = [expert_load(layer, MODEL["num_experts"]) for layer in chosen]
    late = [c["fluctuation"] for c in curve[len(curve) // 2:]]
    val_loss = validation_loss(model, *val)
    return {"router": router, "seed": seed, "val_loss": val_loss, "bits_per_byte": val_loss / math.log(2),
            "late_fluctuation": sum(late) / len(late), "final_fluctuation": curve[-1]["fluctuation"],
            "load_max_over_mean": sum(load["max_over_mean"] for load in loads) / len(loads),
            "load_cv": sum(load["cv"] for load in loads) / len(loads),
            "final_balance_loss": float(model.aux_loss().detach()) / len(model.blocks),
            "routing_entropy": entropy, "top1_margin": margin, "train_seconds": seconds, "curve": curve, "load_share": [load["share"] for load in loads]}


def run_train(seeds, *, routers=ROUTER_NAMES, steps: int = 500, batch: int = 16, seq_len: int = 128,
              eval_every: int = 25, probe_windows: int = 16, val_windows: int = 64) -> dict:
    task = TextCorpus(seq_len=seq_len)
    probe, _ = _windows(task, probe_windows, seed=4242)
    val = _windows(task, val_windows, seed=777)
    rows = []
    for seed in seeds:
        for router in routers:
            row = train_one(router, seed, task, steps=steps, batch=batch, eval_every=eval_every, probe=probe, val=val)
            rows.append(row)
            print({k: v for k, v in row.items() if k not in ("curve", "load_share")}, flush=True)
    return {"task": task.config() | {"probe_tokens": probe.numel(), "val_tokens": val[1].numel()},
            "config": {**MODEL, "steps": steps, "batch": batch, "eval_every": eval_every, "lr": 3e-3,
                       "balance_weight": 0.01, "threads": torch.get_num_threads()}, "rows": rows}


def summarise(rows: list[dict]) -> list[dict]:
    """Mean, min and max over seeds of each router's scalar results."""
    out = []
    for router in dict.fromkeys(r["router"] for r in rows):
        mine = [r for r in rows if r["router"] == router]
        summary = {"router": router, "seeds": len(mine)}
        for field, value in mine[0].items():
            if isinstance(value, (int, float)) and field != "seed":
                values = [float(r[field]) for r in mine]
                summary[field] = sum(values) / len(values)
                summary[field + "_min"], summary[field + "_max"] = min(values), max(values)
        out.append(summary)
    return out


def _time_ms(call, repeat: int, device=None) -> float:
    sync = (lambda: torch.cuda.synchronize(device)) if device is not None and device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        call()
        times = []
        for _ in range(repeat):
            sync()
            start = time.perf_counter()
            call()
            sync()
            times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[repeat // 2]


def run_bench(*, batch: int = 8, seq: int = 256, dim: int = 256, heads: int = 4, repeat: int = 7,
              device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Forward latency (median of ``repeat``) and FLOPs of each card's block and of its SMoE layer alone
    (on ``device``: the GPU synchronised around each call)."""
    device = torch.device(device)
    rows = []
    x = torch.randn(batch, seq, dim, device=device, dtype=dtype)
    for card in CARDS:
        torch.manual_seed(0)
        block = card.build(dim, heads).eval().to(device=device, dtype=dtype)
        config = card.config(dim, heads)
        block_ms = _time_ms(lambda: block(x), repeat, device)
        moe: SparseMoE = block.moe
        attention = None
        if moe.needs_attention:
            with torch.no_grad():
                block.attn(block.attn_norm(x))
            attention = block.attn.last_inputs
        moe_ms = _time_ms(lambda: moe(x, attention), repeat, device)
        block_flops, moe_flops = card.flop_count(batch, seq, dim, heads), smoe_flops(batch, seq, config)
        rows.append({"name": card.name, "router": config["router"], "block_ms": block_ms, "smoe_ms": moe_ms,
                     "block_flops_fwd": block_flops.fwd, "smoe_flops_fwd": moe_flops.fwd,
                     "mixing_flops_fwd": moe_flops.attention_fwd,
                     "parameters": sum(p.numel() for p in block.parameters())})
        print(rows[-1], flush=True)
    return {"config": {"batch": batch, "seq": seq, "dim": dim, "heads": heads, "num_experts": 8, "top_k": 2,
                       "hidden": 2 * dim, "repeat": repeat, "threads": torch.get_num_threads(), "device": str(device),
                       "dtype": str(dtype).replace("torch.", ""),
                       "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
            "rows": rows}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, summary = result["rows"], result["summary"]
    colours = {name: f"C{i}" for i, name in enumerate(VARIANTS)}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for s in summary:
        mine = [r for r in rows if r["router"] == s["router"]]
        steps = [c["step"] for c in mine[0]["curve"]]
        for r in mine:
            ax1.plot(steps, [100 * c["fluctuation"] for c in r["curve"]], color=colours.get(s["router"]), alpha=0.25)
        mean = [100 * sum(r["curve"][i]["fluctuation"] for r in mine) / len(mine) for i in range(len(steps))]
        ax1.plot(steps, mean, color=colours.get(s["router"]), label=f"{s['router']} (mean of {len(mine)} seeds)")
        ax2.scatter([100 * r["late_fluctuation"] for r in mine], [r["bits_per_byte"] for r in mine],
                    color=colours.get(s["router"]), label=s["router"])
    ax1.set_yscale("log")
    ax1.set_xlabel("training step")
    ax1.set_ylabel("probe tokens whose top-1 expert changed (%)")
    ax1.set_title("routing fluctuation between evaluation points")
    ax1.legend()
    ax2.set_xlabel("late fluctuation (%), mean over the 2nd half of training")
    ax2.set_ylabel("validation bits per byte (lower is better)")
    ax2.set_title("quality vs stability, one point per seed")
    ax2.legend()
    fig.suptitle(f"SMoE routers on {result['task']['task']} (byte LM, E={result['config']['num_experts']}, "
                 f"top-{result['config']['top_k']}, {result['config']['steps']} steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnkit.routing.experiments", description=__doc__.split("\n")[0])
    parser.add_argument("run", nargs="?", default="train", choices=["train", "bench"])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--steps", type=int, default=500, help="training steps per run")
    parser.add_argument("--routers", default=",".join(ROUTER_NAMES), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--tag", default="", help="suffix of the output names: routing[-tag].json / .png")
    parser.add_argument("--out", default="benchmarks/results/cpu", help="folder for routing.json / routing-bench.json")
    bench = parser.add_argument_group("bench only")
    bench.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    bench.add_argument("--batch", type=int, default=8)
    bench.add_argument("--seq", type=int, default=256)
    bench.add_argument("--dim", type=int, default=256)
    bench.add_argument("--heads", type=int, default=4)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    torch.set_num_threads(1)  # small models on a shared CPU: threads only contend
    command = "python -m attnkit.routing.experiments " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = {"command": command.strip(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "torch": torch.__version__}
    if args.run == "bench":
        try:
            sizes = {k: positive_int(getattr(args, k), f"--{k}") for k in ("batch", "seq", "dim", "heads")}
        except ValueError as err:
            raise SystemExit(str(err)) from None
        if sizes["dim"] % sizes["heads"]:
            raise SystemExit(f"--dim ({sizes['dim']}) must be divisible by --heads ({sizes['heads']})")
        cuda = args.device == "cuda"
        result = {**header, **run_bench(**sizes, device=args.device, dtype=torch.bfloat16 if cuda else torch.float32,
                                        repeat=21 if cuda else 7)}
        stem = "routing-bench" + (f"-{args.tag}" if args.tag else "")
        write_atomic(out / f"{stem}.json", json.dumps(result, indent=1) + "\n")
        return 0
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    routers = tuple(args.routers.split(","))
    if not set(routers) <= set(VARIANTS):
        raise SystemExit(f"--routers takes {', '.join(VARIANTS)}, got {args.routers!r}")
    result = run_train(seeds, routers=routers, steps=positive_int(args.steps, "--steps"))
    result = {**header, **result, "summary": summarise(result["rows"])}
    stem = "routing" + (f"-{args.tag}" if args.tag else "")
    write_atomic(out / f"{stem}.json", json.dumps(result, indent=1) + "\n")
    plot(result, out / f"{stem}.png")
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
