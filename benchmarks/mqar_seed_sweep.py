"""Which MQAR training recipe makes MHA learn at every seed? Per-seed accuracy of candidate recipes.

At the CPU preset's MQAR default (vocab 256, seq 64, 4 pairs; width 128, 2 layers, 8 heads,
MLP 128, batch 128, lr 3e-3, 1000 steps) MHA reaches about 0.976 at some seeds and stays on the
0.26 "one of the 4 values" plateau at others. This trains MHA and the no-mixing control for
seeds 0-9 under each candidate recipe below (overrides of that default; evaluation is always
the default's: 4 pairs at length 64, uniform query slots) and writes the per-seed final
accuracy, the accuracy every ``--eval-every`` steps (when MHA escaped) and a summary per recipe.

Runs are cached like ``attnkit compare``'s (same keys and files under ``--cache-dir``), so a
command stopped by ``--time-limit`` or a timeout resumes where it stopped, and ``attnkit compare``
with the picked recipe reuses the runs. The JSON is rewritten after every finished run.

    PYTHONPATH=src python benchmarks/mqar_seed_sweep.py --list
    PYTHONPATH=src python benchmarks/mqar_seed_sweep.py --device cuda --recipes default,mix-pairs \\
        --out benchmarks/results/h200/mqar-seed-sweep.json
    # CPU numbers exactly as on a 2-core machine, 8 runs at a time on 16 cores:
    PYTHONPATH=src python benchmarks/mqar_seed_sweep.py --device cpu --threads 2 --jobs 8 --time-limit 540

One line per finished run (flushed), e.g.
``mix-pairs mha seed 3: accuracy 0.981 (final loss 0.412, 41 s; escaped by step 300)``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from attnkit._console import write_atomic  # noqa: E402
from attnkit._meta import run_metadata  # noqa: E402
from attnkit.compare import harness  # noqa: E402

SCHEMA = "attnkit.mqar-seed-sweep/1"
THRESHOLD = 0.95

# overrides of the CPU preset's MQAR run: {"steps", "task_options", "model", "train"}
RECIPES = {
    "default": dict(description="the CPU preset as it is"),
    "steps-2000": dict(description="twice the steps", steps=2000),
    "warmup-300": dict(description="longer warm-up", train=dict(warmup=300)),
    "lr-1e-3-steps-2000": dict(description="lower peak lr, twice the steps", steps=2000, train=dict(lr=1e-3)),
    "heads-2": dict(description="2 heads of width 64 (Zoology trains MHA with 1 head)", model=dict(num_heads=2)),
    "heads-1": dict(description="1 head of width 128", model=dict(num_heads=1)),
    "wd-0": dict(description="no weight decay", train=dict(weight_decay=0.0)),
    "mix-pairs": dict(description="training pairs mixed 1/2/4/8 (Zoology-style mixture; eval 4)",
                      task_options=dict(train_num_pairs=(1, 2, 4, 8))),
    "mix-pairs-lens": dict(description="pairs 2/4/8 x lengths 32/64 mixed",
                           task_options=dict(train_num_pairs=(2, 4, 8), train_seq_lens=(32, 64))),
    "gap-zoology": dict(description="Zoology's power-law query gaps (a = 0.01) in training",
                        task_options=dict(train_gap_power=0.01)),
    "mix-pairs-gap": dict(description="pair mixture 1/2/4/8 and power-law gaps",
                          task_options=dict(train_num_pairs=(1, 2, 4, 8), train_gap_power=0.01)),
    "mix-pairs-steps-2000": dict(description="pair mixture 1/2/4/8, twice the steps", steps=2000,
                                 task_options=dict(train_num_pairs=(1, 2, 4, 8))),
    "heads-2-mix-pairs": dict(description="2 heads and the pair mixture 1/2/4/8", model=dict(num_heads=2),
                              task_options=dict(train_num_pairs=(1, 2, 4, 8))),
}


def recipe_config(name: str, *, steps: int | None = None, extra_model: dict | None = None,
                  extra_task: dict | None = None) -> harness.CompareConfig:
    recipe = RECIPES[name]
    return harness.CompareConfig(task="mqar", preset="cpu", steps=steps or recipe.get("steps"), seeds=1,
                                 task_options={**recipe.get("task_options", {}), **(extra_task or {})},
                                 model={**recipe.get("model", {}), **(extra_model or {})},
                                 train=dict(recipe.get("train", {})))


def _seeds(text: str) -> list[int]:
    if "-" in text:
        low, high = text.split("-", 1)
        return list(range(int(low), int(high) + 1))
    return [int(s) for s in text.split(",") if s.strip()]


def _init_worker(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def run_one(recipe: str, mechanism: str, seed: int, device: str, cache_dir: str, eval_every: int | None,
            steps: int | None, extra_model: dict, extra_task: dict) -> dict:
    """Train (or reuse) one run; the record of harness.train_one plus ``reused``."""
    cfg = recipe_config(recipe, steps=steps, extra_model=extra_model, extra_task=extra_task)
    resolved = cfg.resolved()
    resolved = {**resolved, "train": {**resolved["train"], "seed": seed}}
    task = harness.make_task("mqar", resolved["task_options"])
    key = harness.run_key(mechanism, task, resolved, {}, device)
    path = Path(cache_dir) / "mqar" / f"{mechanism}-{key}.json"
    if path.exists():
        record, why = harness._read_cached(path, key)
        if record is not None and (record.get("eval_curve") or not eval_every):
            return {**record, "reused": True}
        if record is None:
            print(f"cache file {path} cannot be used ({why}); training again", file=sys.stderr, flush=True)
            harness._set_aside(path)
    record = harness.train_one(mechanism, task, resolved, attention_options={}, device=torch.device(device),
                               log_every=10, eval_every=eval_every)
    record.update(key=key, status="ok")
    write_atomic(path, json.dumps(record))
    return {**record, "reused": False}


def _escape_step(eval_curve: list | None) -> int | None:
    for step, accuracy in eval_curve or []:
        if accuracy >= THRESHOLD:
            return step
    return None


def summarise(runs: dict) -> dict:
    out = {}
    for mechanism, records in runs.items():
        accuracy = [r["accuracy"] for r in records]
        out[mechanism] = {"seeds_done": len(records), "min": min(accuracy), "mean": sum(accuracy) / len(accuracy),
                          "max": max(accuracy), f"at_least_{THRESHOLD}": sum(a >= THRESHOLD for a in accuracy)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated (default: all): {', '.join(RECIPES)}")
    parser.add_argument("--mechanisms", default="mha,no-mixing", help="comma-separated (default: mha,no-mixing)")
    parser.add_argument("--seeds", default="0-9", help="a range 0-9 or a list 0,3,5 (default: 0-9)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (default: cpu; cuda trains in bf16 autocast)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, in separate processes (default: 1: in sequence)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's; 2 = the 2-core CPU)")
    parser.add_argument("--eval-every", type=int, default=100, help="evaluate every N steps, 0 for never (default: 100)")
    parser.add_argument("--time-limit", type=float, default=None, help="start no run after this many seconds (default: none)")
    parser.add_argument("--steps", type=int, default=None, help="override every recipe's steps (quick checks; default: the recipe's)")
    parser.add_argument("--model", default="", help="extra model overrides for every recipe, key=value,... (default: none)")
    parser.add_argument("--task-options", default="", help="extra MQAR options for every recipe (default: none)")
    parser.add_argument("--cache-dir", default=".attnkit-cache/compare", help="(default: .attnkit-cache/compare)")
    parser.add_argument("--out", default="mqar-seed-sweep.json", help="JSON file (default: mqar-seed-sweep.json)")
    parser.add_argument("--list", action="store_true", help="print the recipes and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, recipe in RECIPES.items():
            overrides = {k: v for k, v in recipe.items() if k != "description"}
            print(f"{name:24s} {recipe['description']}  {overrides}")
        return 0
    from attnkit.compare.cli import _kv

    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {', '.join(unknown)}; known: {', '.join(RECIPES)}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    mechanisms = [m.strip() for m in args.mechanisms.split(",") if m.strip()]
    seeds = _seeds(args.seeds)
    extra_model, extra_task = _kv(args.model), _kv(args.task_options)
    for name in recipes:  # every recipe's options checked before the first run
        harness.prepare(recipe_config(name, steps=args.steps, extra_model=extra_model, extra_task=extra_task))
    _init_worker(args.threads)
    result = {"schema": SCHEMA, "command": " ".join(["python", *sys.argv]), "created": None,
              **run_metadata(args.device), "threshold": THRESHOLD, "seeds": seeds, "recipes": {}}
    for name in recipes:
        cfg = recipe_config(name, steps=args.steps, extra_model=extra_model, extra_task=extra_task)
        result["recipes"][name] = {"description": RECIPES[name]["description"],
                                   "overrides": {k: v for k, v in RECIPES[name].items() if k != "description"},
                                   "resolved": cfg.resolved(), "runs": {m: [] for m in mechanisms}, "summary": {}}
    out = Path(args.out)

    def record(recipe: str, mechanism: str, seed: int, rec: dict) -> None:
        entry = {"seed": seed, "accuracy": rec["metric"], "final_train_loss": rec["final_train_loss"],
                 "wall_s": rec["wall_s"], "escaped_by_step": _escape_step(rec.get("eval_curve")),
                 "eval_curve": rec.get("eval_curve"), "reused": rec["reused"]}
        runs = result["recipes"][recipe]["runs"][mechanism]
        runs.append(entry)
        runs.sort(key=lambda e: e["seed"])
        result["recipes"][recipe]["summary"] = summarise({m: r for m, r in result["recipes"][recipe]["runs"].items() if r})
        result["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_atomic(out, json.dumps(result, indent=1))
        escaped = entry["escaped_by_step"]
        print(f"{recipe} {mechanism} seed {seed}: accuracy {entry['accuracy']:.3f} (final loss {entry['final_train_loss']:.3f}, "
              f"{entry['wall_s']:.0f} s{', cached' if entry['reused'] else ''}"
              + (f"; >= {THRESHOLD} by step {escaped}" if escaped else "") + ")", flush=True)

    jobs = [(r, m, s) for r in recipes for m in mechanisms for s in seeds]
    start = time.perf_counter()
    late = lambda: args.time_limit is not None and time.perf_counter() - start > args.time_limit  # noqa: E731
    common = (args.device, args.cache_dir, args.eval_every or None, args.steps, extra_model, extra_task)
    skipped = 0
    if args.jobs == 1:
        for i, (r, m, s) in enumerate(jobs):
            if late():
                skipped = len(jobs) - i
                break
            record(r, m, s, run_one(r, m, s, *common))
    else:
        import multiprocessing

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                                 initargs=(args.threads,)) as pool:
            pending, queue = {}, list(jobs)
            while queue or pending:
                while queue and len(pending) < args.jobs and not late():
                    job = queue.pop(0)
                    pending[pool.submit(run_one, *job, *common)] = job
                if late():
                    skipped, queue = len(queue), []
                if not pending:
                    break
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    record(*pending.pop(future), future.result())
    for name in recipes:
        for mechanism, s in result["recipes"][name]["summary"].items():
            print(f"summary {name} {mechanism}: {s[f'at_least_{THRESHOLD}']}/{s['seeds_done']} seeds >= {THRESHOLD}, "
                  f"min {s['min']:.3f} mean {s['mean']:.3f} max {s['max']:.3f}", flush=True)
    if skipped:
        print(f"--time-limit reached: {skipped} run(s) not started; run the same command again to continue", flush=True)
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
