"""The recsys family's headline directions on the synthetic world (issue 28), 3 seeds each, CPU:

- MQSA-TED vs SASRec (next item, HR@10 / NDCG@10, full ranking of 200 items), with MQSA
  without TED as the ablation;
- DARE (decoupled embeddings) vs shared embeddings (CTR AUC on 200-behaviour histories, width 8;
  and top-10 retrieval recall of the attention against the world's true relevance);
- TIN vs DIN (CTR AUC on 50-behaviour histories), with DIN given the same time embeddings.

Plus a CPU speed row per card (forward + backward of one training batch).

    nice -n 10 python benchmarks/recsys_directions.py --part next   # or dare, tin, bench
    python benchmarks/recsys_directions.py --combine                # recsys.json + recsys.png
    python benchmarks/recsys_directions.py --plot                   # redraw the PNG from recsys.json

Each part writes ``benchmarks/results/cpu/recsys-<part>.partial.json``; ``--combine`` merges them
into ``benchmarks/results/cpu/recsys.json`` and draws ``recsys.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from attnkit.models.recsys import CARDS, DARE, DIN, MQSA, TIN
from attnkit.models.recsys.train import run_ctr, run_next_item
from attnkit.tasks.recsys import RecsysWorld

OUT = Path(__file__).resolve().parent / "results" / "cpu"
SEEDS = (0, 1, 2)
NEXT = dict(length=20, train_users=3000, eval_users=2000, epochs=20, lr=3e-3)
DARE_WORLD = dict(value_weight=1.0, click_bias=-1.0)
DARE_RUN = dict(length=200, train_rows=20000, eval_rows=5000, epochs=5)
TIN_RUN = dict(length=50, train_rows=20000, eval_rows=5000, epochs=12)


def part_next():
    rows = []
    for seed in SEEDS:
        world = RecsysWorld(seed=seed)
        for name, options, ted in (("sasrec", dict(alpha=1.0), 0.0), ("mqsa", dict(alpha=0.5, window=3), 0.0),
                                   ("mqsa-ted", dict(alpha=0.5, window=3), 0.1)):
            torch.manual_seed(seed)
            model = MQSA(32, 2, num_items=world.num_items, max_len=NEXT["length"], **options)
            result = run_next_item(model, world, seed=seed, ted_weight=ted, **NEXT)
            rows.append({"model": name, "seed": seed, **result})
            print(rows[-1], flush=True)
    return {"config": {**NEXT, "dim": 32, "heads": 2, "window": 3, "alpha": 0.5, "ted_weight": 0.1, "ted_tau": 0.1,
                       "ranking": "full ranking of all 200 items, history items not excluded"}, "rows": rows}


def part_dare():
    rows = []
    for seed in SEEDS:
        world = RecsysWorld(seed=seed, **DARE_WORLD)
        for name, decoupled in (("dare", True), ("dare-shared", False)):
            torch.manual_seed(seed)
            model = DARE(8, num_items=world.num_items, num_time_buckets=world.num_time_buckets, decoupled=decoupled)
            rows.append({"model": name, "seed": seed, **run_ctr(model, world, seed=seed, **DARE_RUN)})
            print(rows[-1], flush=True)
    return {"config": {**DARE_RUN, **DARE_WORLD, "dim": 8}, "rows": rows}


def part_tin():
    rows = []
    for seed in SEEDS:
        world = RecsysWorld(seed=seed)
        for name, make in (("tin", lambda w: TIN(16, num_items=w.num_items, num_time_buckets=w.num_time_buckets)),
                           ("din", lambda w: DIN(16, num_items=w.num_items, num_time_buckets=w.num_time_buckets)),
                           ("din+time", lambda w: DIN(16, num_items=w.num_items,
                                                      num_time_buckets=w.num_time_buckets, use_time=True))):
            torch.manual_seed(seed)
            rows.append({"model": name, "seed": seed, **run_ctr(make(world), world, seed=seed, **TIN_RUN)})
            print(rows[-1], flush=True)
    return {"config": {**TIN_RUN, "dim": 16}, "rows": rows}


def part_bench(repeat: int = 10, device: str = "cpu"):
    """ms per training step (forward + backward) of each card at a fixed batch: CPU with 1 thread, or
    ``device="cuda"`` (float32, the GPU synchronised around each step)."""
    torch.set_num_threads(1)
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    rows = []
    for card in CARDS:
        next_item = card.layer is MQSA
        dim, heads, batch, seq = (32, 2, 128, 20) if next_item else (16, 1, 256, 200)
        model = card.build(dim, heads, num_items=200).to(device)
        if next_item:
            inputs = (torch.randint(0, 200, (batch, seq)),)
        else:
            inputs = (torch.randint(0, 200, (batch, seq)), torch.randint(0, 8, (batch, seq)),
                      torch.randint(0, 200, (batch,)))
        inputs = tuple(t.to(device) for t in inputs)
        times = []
        for i in range(repeat + 2):
            sync()
            start = time.perf_counter()
            model(*inputs).float().mean().backward()
            sync()
            if i >= 2:
                times.append(time.perf_counter() - start)
        flops = card.flop_count(batch, seq, dim, heads, num_items=200)
        rows.append({"name": card.name, "batch": batch, "seq": seq, "dim": dim, "ms_fwdbwd": 1e3 * statistics.median(times),
                     "gflop_fwd": flops.fwd / 1e9})
        print(rows[-1], flush=True)
    return {"config": {"threads": 1, "repeat": repeat, "device": str(device),
                       "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
            "rows": rows}


def _summary(rows, metrics):
    out = {}
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        out[name] = {m: {"mean": statistics.mean(r[m] for r in mine), "std": statistics.pstdev(r[m] for r in mine),
                         "per_seed": [r[m] for r in mine]} for m in metrics if m in mine[0]}
    return out


BASELINES = {"sasrec", "dare-shared", "din", "din+time"}  # grey in the plot; the papers' modules in blue


def plot(result: dict) -> None:
    """recsys.png from a combined result (``--plot`` redraws it from recsys.json)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (("next_item", "ndcg", "next item: NDCG@10 (full ranking)", "oracle_ndcg"),
              ("dare", "auc", "long sequences (T=200, width 8): AUC", "oracle_auc"),
              ("tin", "auc", "semantic-temporal CTR (T=50): AUC", "oracle_auc"))
    for ax, (key, metric, title, oracle) in zip(axes, panels):
        summary = result[key]["summary"]
        names = list(summary)
        for i, name in enumerate(names):
            vals = summary[name][metric]["per_seed"]
            baseline = name in BASELINES
            ax.bar(i, summary[name][metric]["mean"], color="C7" if baseline else "C0")
            ax.scatter([i] * len(vals), vals, color="k", s=10, zorder=3)
        ax.axhline(summary[names[0]][oracle]["mean"], color="C3", ls="--", lw=1, label="Bayes ceiling")
        ax.set_xticks(range(len(names)), names)
        ax.set_title(title, fontsize=10)
        low = min(min(summary[n][metric]["per_seed"]) for n in names)
        ax.set_ylim(max(0.0, low - 0.1), summary[names[0]][oracle]["mean"] + 0.05)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("attnkit recsys on the synthetic world (3 seeds; dots: seeds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(OUT / "recsys.png", dpi=110)


def combine():
    parts = {}
    for p in ("next", "dare", "tin", "bench"):  # a part may come in several files (seeds run in parallel)
        files = [json.loads(f.read_text()) for f in sorted(OUT.glob(f"recsys-{p}*.partial.json"))]
        rows = sorted((r for f in files for r in f["rows"]), key=lambda r: (r.get("seed", 0),))
        parts[p] = {"config": files[0]["config"], "rows": rows}
    result = {
        "command": "nice -n 10 python benchmarks/recsys_directions.py --part {next,dare,tin,bench}; --combine",
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__, "seeds": list(SEEDS),
        "next_item": {"config": parts["next"]["config"],
                      "summary": _summary(parts["next"]["rows"], ("hr", "ndcg", "oracle_hr", "oracle_ndcg", "seconds")),
                      "rows": parts["next"]["rows"]},
        "dare": {"config": parts["dare"]["config"],
                 "summary": _summary(parts["dare"]["rows"], ("auc", "recall", "oracle_auc", "seconds")),
                 "rows": parts["dare"]["rows"]},
        "tin": {"config": parts["tin"]["config"],
                "summary": _summary(parts["tin"]["rows"], ("auc", "recall", "oracle_auc", "seconds")),
                "rows": parts["tin"]["rows"]},
        "bench": parts["bench"],
    }
    (OUT / "recsys.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result)
    print(json.dumps({k: result[k]["summary"] for k in ("next_item", "dare", "tin")}, indent=1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("next", "dare", "tin", "bench"))
    parser.add_argument("--seeds", help="a subset of the seeds, e.g. 1,2 (to run seeds in parallel processes)")
    parser.add_argument("--combine", action="store_true")
    parser.add_argument("--plot", action="store_true", help="redraw recsys.png from recsys.json")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="--part bench only: where to time")
    parser.add_argument("--out", default=None, help="--part bench --device cuda: the JSON to write")
    args = parser.parse_args(argv)
    if args.device == "cuda" and args.part != "bench":
        parser.error("--device cuda applies to --part bench only")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device here")
        result = part_bench(device="cuda")
        command = "python benchmarks/recsys_directions.py " + " ".join(sys.argv[1:] if argv is None else argv)
        out = Path(args.out) if args.out else OUT.parent / "h200" / "recsys-bench.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": command, **result}, indent=1) + "\n")
        return 0
    if args.part:
        global SEEDS
        suffix = ""
        if args.seeds:
            SEEDS = tuple(int(s) for s in args.seeds.split(","))
            suffix = "-s" + "-".join(map(str, SEEDS))
        torch.set_num_threads(1)
        result = {"next": part_next, "dare": part_dare, "tin": part_tin, "bench": part_bench}[args.part]()
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / f"recsys-{args.part}{suffix}.partial.json").write_text(json.dumps(result, indent=1) + "\n")
    if args.combine:
        combine()
    if args.plot:
        plot(json.loads((OUT / "recsys.json").read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
