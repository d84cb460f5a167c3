"""MergeLock's effect on the shipped subject: merge two fine-tunes with one of them locked or not.

Two short CPU fine-tunes of the subject (``attnkit.hf.subject.default_subject()``, fp32):
A on passkey / multi-key rows, B on few-shot rows and stdlib text (``attnkit.tasks.longcontext``).
Then, with A as it is, A locked (:func:`attnkit.hf.mergelock.lock`) and A locked then "restored"
by the attacker's closed-form fit against the public base (:func:`estimate_key`):

- task arithmetic ``base + λ (A - base) + λ (B - base)`` (λ = --lam),
- weight averaging ``(A + B) / 2``,

each scored on passkey retrieval at 512 and 1024 bytes, few-shot classification and bits per byte
on held-out stdlib text. Writes JSON (with the command) and a bar chart::

    nice -n 10 python benchmarks/mergelock.py --out benchmarks/results/cpu/mergelock

Each fine-tune is capped by --budget-s (default 150 s) of training on one thread.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import random
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


def _finetune(base, mixture, *, steps, batch_size, lr, seed, budget_s, log):
    from attnkit.hf.subject import _split_loss

    model = copy.deepcopy(base).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    # a short linear warm-up: Adam's first steps move every weight by about lr, a jolt for a trained model
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 10))
    start, done, losses = time.perf_counter(), 0, []
    for step in range(steps):
        if time.perf_counter() - start > budget_s:
            break
        inputs, targets, answers = mixture.batch(batch_size, random.Random(seed * 1_000_003 + step), answers=True)
        text_loss, answer_loss = _split_loss(model(inputs).logits, targets, answers)
        loss = text_loss + answer_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        done = step + 1
        log(f"  step {done}: loss {losses[-1]:.3f} ({time.perf_counter() - start:.0f} s)")
    return model.eval(), {"steps": done, "seconds": round(time.perf_counter() - start, 1), "loss": losses}


def _merge(base, models, coefs):
    out = copy.deepcopy(base)
    sb = base.state_dict()
    merged = {k: sb[k] + sum(c * (m.state_dict()[k] - sb[k]) for m, c in zip(models, coefs)) for k in sb}
    out.load_state_dict(merged)
    return out.eval()


def _evaluate(model, val_text, n, seed):
    from attnkit.hf.subject import _accuracy
    from attnkit.tasks.longcontext import FEWSHOT_RULES, fewshot_example, passkey_example

    rng = random.Random(seed)
    out = {}
    with torch.no_grad():
        for length in (512, 1024):
            examples = [passkey_example(rng, val_text, length, rng.random()) for _ in range(n)]
            out[f"passkey_{length}"] = _accuracy(model, examples, "cpu")
        shots = [fewshot_example(rng, rng.randint(4, 12), FEWSHOT_RULES[i % 3]) for i in range(n)]
        out["fewshot"] = _accuracy(model, shots, "cpu")
        out["bits_per_byte"] = _bits_per_byte(model, val_text, 512, 4, seed + 1)
    return {k: round(v, 4) for k, v in out.items()}


def _bits_per_byte(model, text, seq_len, windows, seed):
    rng, total = random.Random(seed), 0.0
    for _ in range(windows):
        start = rng.randrange(len(text) - seq_len - 1)
        chunk = torch.tensor([list(text[start : start + seq_len + 1])])
        logits = model(chunk[:, :-1]).logits.float()
        total += float(torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum"))
    return total / (windows * seq_len) / math.log(2)


def _plot(record, file):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(record["results"])
    metrics = [("passkey_512", "passkey @512 (acc)"), ("passkey_1024", "passkey @1024 (acc)"),
               ("fewshot", "few-shot (acc)"), ("bits_per_byte", "bits per byte (lower is better)")]
    fig, axes = plt.subplots(1, 4, figsize=(18, 5.5), sharey=True)
    colours = ["#888888" if not ("TA" in r or "avg" in r) else
               "#d62728" if "locked" in r and "restored" not in r else
               "#ff7f0e" if "restored" in r else "#2ca02c" for r in rows]
    for ax, (metric, title) in zip(axes, metrics):
        values = [record["results"][r][metric] for r in rows]
        ax.barh(range(len(rows)), values, color=colours)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(values) * 1.25 or 1)
    fig.suptitle("MergeLock on the attnkit subject: merging two CPU fine-tunes (A: passkey, B: few-shot + text); "
                 "green: A as is, red: A locked, orange: A locked then fitted to the base without the key", fontsize=10)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/cpu/mergelock", help="path prefix for .json and .png")
    p.add_argument("--steps", type=int, default=50, help="most fine-tuning steps per model")
    p.add_argument("--budget-s", type=float, default=150.0, help="most seconds of training per fine-tune")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lam", type=float, nargs="+", default=[0.3, 1.0], help="task-arithmetic coefficients λ")
    p.add_argument("--n", type=int, default=24, help="prompts per accuracy")
    p.add_argument("--lock-seed", type=int, default=1234)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from transformers import AutoModelForCausalLM

    from attnkit.hf.mergelock import estimate_key, lock, unlock
    from attnkit.hf.subject import default_subject
    from attnkit.tasks.longcontext import SubjectMixture
    from attnkit.tasks.text import load_corpus

    def log(msg):
        print(msg, flush=True)

    t0 = time.perf_counter()
    train_text, val_text, corpus = load_corpus()
    base = AutoModelForCausalLM.from_pretrained(default_subject(), dtype=torch.float32).eval()
    mix_a = SubjectMixture(train_text, args.seq_len, weights={"text": 0.1, "passkey": 0.6, "multikey": 0.3},
                           max_pairs=2, max_shots=8)
    mix_b = SubjectMixture(train_text, args.seq_len, weights={"text": 0.5, "fewshot": 1.0}, max_pairs=2, max_shots=12)
    log("fine-tune A (passkey / multi-key)")
    a, train_a = _finetune(base, mix_a, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed + 1,
                           budget_s=args.budget_s, log=log)
    log("fine-tune B (few-shot / text)")
    b, train_b = _finetune(base, mix_b, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed + 2,
                           budget_s=args.budget_s, log=log)

    a_locked = copy.deepcopy(a)
    lock(a_locked, seed=args.lock_seed)
    a_restored = copy.deepcopy(a_locked)
    unlock(a_restored, estimate_key(a_locked, base))   # the attacker: no key, the public base
    with torch.no_grad():
        ids = torch.tensor([list(val_text[:256])])
        ref = a(ids).logits
        lock_logit_error = float((a_locked(ids).logits - ref).abs().max() / ref.abs().max())
        restored_logit_error = float((a_restored(ids).logits - ref).abs().max() / ref.abs().max())

    @torch.no_grad()
    def attention_distance(model):
        theirs = dict(a.named_parameters())
        return round(max(float((q - theirs[n]).norm() / theirs[n].norm()) for n, q in model.named_parameters()
                         if "self_attn" in n), 4)

    models = {"base (subject)": base, "A: passkey fine-tune": a, "A locked (alone)": a_locked,
              "B: few-shot/text fine-tune": b}
    for lam in args.lam:
        models[f"TA λ={lam}: A + B"] = _merge(base, [a, b], [lam, lam])
        models[f"TA λ={lam}: A locked + B"] = _merge(base, [a_locked, b], [lam, lam])
        models[f"TA λ={lam}: A locked, restored + B"] = _merge(base, [a_restored, b], [lam, lam])
    models["avg (A + B) / 2"] = _merge(base, [a, b], [0.5, 0.5])
    models["avg (A locked + B) / 2"] = _merge(base, [a_locked, b], [0.5, 0.5])
    models["avg (A locked, restored + B) / 2"] = _merge(base, [a_restored, b], [0.5, 0.5])
    results = {}
    for name, model in models.items():
        t = time.perf_counter()
        results[name] = _evaluate(model, val_text, args.n, args.seed + 100)
        log(f"{name}: {results[name]} ({time.perf_counter() - t:.0f} s)")

    def drop(merged, reference, metric):
        ref_value = results[reference][metric]
        return None if not ref_value else round(1 - results[merged][metric] / ref_value, 4)

    pairs = {f"TA λ={lam}": (f"TA λ={lam}: A locked + B", f"TA λ={lam}: A + B") for lam in args.lam}
    pairs["avg"] = ("avg (A locked + B) / 2", "avg (A + B) / 2")
    summary = {
        "relative_drop_locked_vs_unlocked_merge": {
            name: {m: drop(locked, unlocked, m) for m in ("passkey_512", "passkey_1024", "fewshot")}
            for name, (locked, unlocked) in pairs.items()},
        "locked_logits_max_rel_error": lock_logit_error,
        "restored_logits_max_rel_error": restored_logit_error,
        "attention_weight_distance_to_A": {"locked": attention_distance(a_locked),
                                           "restored": attention_distance(a_restored),
                                           "base": attention_distance(base), "B": attention_distance(b)},
    }
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    import transformers

    record = {
        "schema": "attnkit.mergelock/1",
        "command": "python " + " ".join(shlex.quote(x) for x in [sys.argv[0], *(argv if argv is not None
                                                                                else sys.argv[1:])]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "platform": platform.platform()},
        "args": vars(args),
        "corpus": corpus,
        "finetune": {"A": {"weights": mix_a.weights, **train_a}, "B": {"weights": mix_b.weights, **train_b}},
        "results": results,
        "summary": summary,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    _plot(record, out.with_suffix(".png"))
    log(json.dumps(summary, indent=1))
    log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')} in {record['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
