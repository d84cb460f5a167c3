"""ZeroTuning, ACT and soft injection of task embeddings on the subject's few-shot classification.

    nice -n 10 python benchmarks/steering_fewshot.py --out benchmarks/results/cpu/steer-fewshot

For each rule of ``attnkit.tasks.longcontext.FEWSHOT_RULES`` and each seed: calibration prompts
and disjoint test prompts (drawn from different random streams). Scored by the label-restricted
accuracy: the next-token logits of the two label words at the first byte where ``label + "\\n"``
differs (the common prefix, if any, is appended to the prompt), argmax over the two; also the
unrestricted first-byte accuracy (argmax over all 256 bytes equals the right byte).

- ZeroTuning (supervised accuracy and unsupervised entropy) and ACT: on the few-shot prompts
  themselves (labels drawn afresh per prompt, as the subject was trained).
- Soft injection: a task needs a fixed mapping to be run zero-shot, so each rule gets one fixed
  pair of classes and label words per seed; task embeddings from few-shot prompts of that task,
  mixing weights learnt on zero-shot prompts, tested zero-shot against zero-shot and few-shot ICL.

Writes ``<out>.json`` (with the command), ``<out>-accuracy.png``, ``<out>-heads.png``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

import attnkit.hf as hf
from attnkit.hf.act import fit_act
from attnkit.hf.steer import Steer
from attnkit.hf.subject import default_subject
from attnkit.hf.taskinject import fit_task_injection, task_embeddings
from attnkit.hf.zerotuning import Choices, ZeroTuningModifier, fit_zerotuning
from attnkit.tasks.longcontext import FEWSHOT_RULES, fewshot_example

FIXED_CLASSES = {"category": ("fruit", "animal"), "vowel": (0, 1), "length": (0, 1)}


def _choice(example, labels=None):
    """(prompt ids, (byte of option 0, byte of option 1), answer index) for label-restricted scoring."""
    labels = labels or example.info["labels"]
    a, b = (labels[0] + "\n").encode(), (labels[1] + "\n").encode()
    i = next(k for k in range(min(len(a), len(b))) if a[k] != b[k])
    answer = 0 if example.answer == labels[0].encode() else 1
    return list(example.prompt + a[:i]), (a[i], b[i]), answer


def choices(examples, labels=None) -> Choices:
    rows = [_choice(e, labels) for e in examples]
    return Choices([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], batch_size=64)


def unrestricted(model, ch: Choices) -> float:
    with torch.no_grad():
        full = ch.logits(model)
    right = torch.tensor([o[a] for o, a in zip(ch.options, ch.answers)])
    return float((full.argmax(-1) == right).float().mean())


def evaluate(model, ch, policy=None) -> dict:
    if policy is None:
        return {"restricted": ch.accuracy(model), "first_byte": unrestricted(model, ch)}
    with hf.apply(model, policy):
        return evaluate(model, ch)


def fixed_task(rng, rule, shots, labels, count):
    """Few-shot examples of one fixed task: classes FIXED_CLASSES[rule] named labels[0], labels[1]."""
    out = []
    while len(out) < count:
        e = fewshot_example(rng, shots, rule)
        classes = e.info["classes"]
        if sorted(map(str, classes)) != sorted(map(str, FIXED_CLASSES[rule])):
            continue
        old = e.info["labels"]
        new = [labels[FIXED_CLASSES[rule].index(c)] for c in classes]  # label of each class of this prompt
        prompt = e.prompt
        for k in range(2):  # through placeholders: old and new label words may overlap
            prompt = prompt.replace(f"Label: {old[k]}\n".encode(), f"Label: \x01{k}\n".encode())
        for k in range(2):
            prompt = prompt.replace(f"Label: \x01{k}\n".encode(), f"Label: {new[k]}\n".encode())
        out.append(type(e)(prompt, new[e.info["query_class"]].encode(), e.kind, None,
                           dict(e.info, labels=new)))
    return out


def zero_shot(example):
    """The query of a few-shot example without its shots."""
    from attnkit.tasks.longcontext import FEWSHOT_HEADER

    query = example.prompt[example.prompt.rindex(b"Input: "):]
    return type(example)(FEWSHOT_HEADER + query, example.answer, example.kind, None, example.info)


class FirstTokenMass(ZeroTuningModifier):
    """ZeroTuning's change (or none) on its heads, and every head's attention on the first token at
    the last query recorded (``mass[layer]`` ``[H]`` summed over rows)."""

    def __init__(self, gammas, num_layers, num_heads):
        super().__init__(gammas)
        self.all = tuple((l, h) for l in range(num_layers) for h in range(num_heads))
        self.mass, self.rows = torch.zeros(num_layers, num_heads, dtype=torch.float64), 0

    def heads(self, num_layers, num_heads):
        return self.all

    def weights(self, probs, view):
        m = (probs[:, :, -1:] * view.first_token()[:, :, -1:]).sum(-1)[:, :, 0]  # [B, h]
        self.mass[view.layer, view.heads] += m.sum(0).double()
        if view.layer == 0 and int(view.heads[0]) == 0:
            self.rows += probs.shape[0]
        return probs


def first_token_mass(model, ch, gammas, L, H):
    rec = FirstTokenMass(gammas, L, H)
    with torch.no_grad(), hf.apply(model, Steer(rec)):
        ch.logits(model)
    return (rec.mass / max(1, rec.rows)).tolist()


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_subject(), dtype=torch.float32).eval()
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    zt_candidates = [(l, h) for l in range(min(L, args.zt_layers)) for h in range(H)]
    # the official calibrates layers 2..L-2; --act-layers caps the range for CPU time
    act_candidates = [(l, h) for l in range(2, min(L - 1, 2 + args.act_layers)) for h in range(H)]
    results = {"rules": {}, "config": vars(args)}
    for rule in args.rules:
        per_seed = []
        for seed in range(args.seeds):
            t0 = time.time()
            cal_rng, test_rng = random.Random(1000 * seed + 1), random.Random(1000 * seed + 2)
            cal = choices([fewshot_example(cal_rng, args.shots, rule) for _ in range(args.cal)])
            test = choices([fewshot_example(test_rng, args.shots, rule) for _ in range(args.test)])
            row = {"seed": seed, "base": evaluate(model, test)}
            stamp = [time.time()]

            def lap(name):
                stamp.append(time.time())
                row.setdefault("stage_seconds", {})[name] = round(stamp[-1] - stamp[-2], 1)
            zt, zrep = fit_zerotuning(model, cal, mode="accuracy", candidates=zt_candidates, gammas=args.gammas)
            row["zerotuning"] = {**evaluate(model, test, zt), "gamma": zrep["gamma"], "heads": zrep["heads"],
                                 "direction": zrep["direction"], "calibration": zrep["sweep"]}
            lap("zerotuning")
            zte, erep = fit_zerotuning(model, cal, mode="entropy", candidates=zt_candidates, gammas=args.gammas)
            row["zerotuning_entropy"] = {**evaluate(model, test, zte), "gamma": erep["gamma"], "heads": erep["heads"],
                                         "direction": erep["direction"]}
            if seed == 0:
                row["first_token_mass"] = {"before": first_token_mass(model, test, {}, L, H),
                                           "after": first_token_mass(model, test, zt.modifier.gammas, L, H),
                                           "gammas": zt.table(L, H).tolist()}
            lap("zerotuning_entropy")
            act, arep = fit_act(model, cal, candidates=act_candidates, top=args.act_top)
            row["act"] = {**evaluate(model, test, act), "heads": arep["heads"], "beta": arep["beta"],
                          "threshold": arep["threshold"], "gain": arep["gain"].nan_to_num(0.0).tolist()}
            lap("act")
            # soft injection: one fixed task per (rule, seed)
            lrng = random.Random(1000 * seed + 3)
            from attnkit.tasks.longcontext import LABELS

            labels = lrng.sample(LABELS, 2)
            demo = fixed_task(random.Random(1000 * seed + 4), rule, args.shots, labels, args.embed_prompts)
            train = [zero_shot(e) for e in fixed_task(random.Random(1000 * seed + 5), rule, 2, labels, args.cal)]
            icl = fixed_task(random.Random(1000 * seed + 6), rule, args.shots, labels, args.test)
            zs = [zero_shot(e) for e in icl]
            E = task_embeddings(model, [list(e.prompt) for e in demo])
            tr = choices(train, labels)
            ti, trep = fit_task_injection(model, E, tr.prompts, [o[a] for o, a in zip(tr.options, tr.answers)],
                                          steps=args.inject_steps, lr=args.inject_lr, batch_size=16, seed=seed)
            zs_ch = choices(zs, labels)
            row["taskinject"] = {"labels": labels, "zero_shot": evaluate(model, zs_ch),
                                 "few_shot_icl": evaluate(model, choices(icl, labels)),
                                 "injected": evaluate(model, zs_ch, ti), "loss": trep["loss"][:: max(1, len(trep["loss"]) // 10)],
                                 "weights": trep["weights"].tolist()}
            lap("taskinject")
            row["seconds"] = time.time() - t0
            per_seed.append(row)
            print(f"{rule} seed {seed}: base {row['base']['restricted']:.3f} zt {row['zerotuning']['restricted']:.3f} "
                  f"zt-ent {row['zerotuning_entropy']['restricted']:.3f} act {row['act']['restricted']:.3f} | "
                  f"0-shot {row['taskinject']['zero_shot']['restricted']:.3f} icl "
                  f"{row['taskinject']['few_shot_icl']['restricted']:.3f} inj {row['taskinject']['injected']['restricted']:.3f}"
                  f" ({row['seconds']:.0f} s {row['stage_seconds']})", flush=True)
        results["rules"][rule] = per_seed
    return results


def _mean_std(xs):
    t = torch.tensor(xs, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(xs) > 1 else 0.0


def summary(results) -> dict:
    out = {}
    for rule, rows in results["rules"].items():
        get = {"base (few-shot)": lambda r: r["base"]["restricted"],
               "ZeroTuning (acc)": lambda r: r["zerotuning"]["restricted"],
               "ZeroTuning (entropy)": lambda r: r["zerotuning_entropy"]["restricted"],
               "ACT": lambda r: r["act"]["restricted"],
               "zero-shot (fixed task)": lambda r: r["taskinject"]["zero_shot"]["restricted"],
               "few-shot ICL (fixed task)": lambda r: r["taskinject"]["few_shot_icl"]["restricted"],
               "soft injection (0-shot)": lambda r: r["taskinject"]["injected"]["restricted"]}
        out[rule] = {k: _mean_std([f(r) for r in rows]) for k, f in get.items()}
    return out


def plots(results, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = results["summary"]
    rules = list(summ)
    methods = list(next(iter(summ.values())))
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        xs = [i + (j - len(methods) / 2 + 0.5) * width for i in range(len(rules))]
        ax.bar(xs, [summ[r][m][0] for r in rules], width, yerr=[summ[r][m][1] for r in rules], label=m, capsize=2)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(rules)), rules)
    ax.set_ylabel("label-restricted accuracy (mean ± sd over seeds)")
    ax.set_ylim(0, 1)
    ax.set_title(f"subject model, few-shot classification ({results['config']['seeds']} seeds, "
                 f"{results['config']['test']} test prompts each)")
    ax.legend(fontsize=7, ncol=4, loc="lower center")
    fig.tight_layout()
    fig.savefig(f"{out}-accuracy.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(len(rules), 5, figsize=(17, 3.6 * len(rules)), squeeze=False)
    for i, rule in enumerate(rules):
        r0 = results["rules"][rule][0]
        m = r0["first_token_mass"]
        ent = torch.zeros(len(m["gammas"]), len(m["gammas"][0]))  # the entropy variant's choice
        for l, h in r0["zerotuning_entropy"]["heads"]:
            ent[l, h] = torch.tensor(r0["zerotuning_entropy"]["gamma"]).log2()
        top = max(float(torch.tensor(m["before"]).max()), float(torch.tensor(m["after"]).max()), 1e-6)
        panels = [("ZeroTuning log2 gamma: acc (all 0) / entropy", ent, "coolwarm", (-2, 2), "log2 gamma (entropy)"),
                  ("first-token mass at the last query, before", torch.tensor(m["before"]), "viridis", (0, top), "mass"),
                  ("... after ZeroTuning (acc)", torch.tensor(m["after"]), "viridis", (0, top), "mass"),
                  ("ACT: gain when alone (chosen: x)", torch.tensor(r0["act"]["gain"]), "coolwarm", None, "acc gain"),
                  ("soft injection weights", torch.tensor(r0["taskinject"]["weights"]), "magma", (0, 1), "alpha")]
        for j, (title, t, cmap, lim, label) in enumerate(panels):
            ax = axes[i, j]
            if lim is None:
                v = float(t.abs().max()) or 1.0
                lim = (-v, v)
            im = ax.imshow(t.T.numpy(), cmap=cmap, vmin=lim[0], vmax=lim[1], aspect="auto")
            if j == 3:
                for l, h in r0["act"]["heads"]:
                    ax.text(l, h, "x", ha="center", va="center", fontsize=9)
            ax.set_title(f"{rule}: {title}", fontsize=8)
            ax.set_xlabel("layer")
            ax.set_ylabel("query head")
            fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    fig.savefig(f"{out}-heads.png", dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/cpu/steer-fewshot")
    p.add_argument("--rules", nargs="+", default=list(FEWSHOT_RULES))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--cal", type=int, default=16)
    p.add_argument("--test", type=int, default=60)
    p.add_argument("--zt-layers", type=int, default=2, help="ZeroTuning profiles the heads of the first N layers")
    p.add_argument("--gammas", type=float, nargs="+", default=[0.5, 2.0])
    p.add_argument("--act-top", type=int, default=4)
    p.add_argument("--act-layers", type=int, default=3, help="ACT tries the heads of layers 2 .. 2 + N - 1")
    p.add_argument("--embed-prompts", type=int, default=8)
    p.add_argument("--inject-steps", type=int, default=12)
    p.add_argument("--inject-lr", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot-only", action="store_true", help="redraw the plots from <out>.json")
    args = p.parse_args(argv)
    if args.plot_only:
        plots(json.loads(Path(f"{args.out}.json").read_text()), Path(args.out))
        return
    t0 = time.time()
    results = run(args)
    results["summary"] = summary(results)
    results["command"] = "nice -n 10 python benchmarks/steering_fewshot.py " + " ".join(argv if argv is not None
                                                                                       else sys.argv[1:])
    results["seconds"] = time.time() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(results, indent=1))
    plots(results, out)
    print(json.dumps(results["summary"], indent=1))


if __name__ == "__main__":
    main()
