"""Context-awareness on the shipped subject (arXiv 2411.02688; attnkit.hf.context).

1. The attention-allocation diagnostic on a passkey prompt in a chat format (user context /
   template / rest), before and after ContextSteer; heatmaps.
2. Accuracy on a context-dependent task (passkey and multi-key retrieval inside the chat
   format) with ContextSteer at several alphas (greedy exact match, computed teacher-forced: the
   greedy answer is right iff every answer byte is the argmax given the right earlier bytes).
3. The context-dependency metric on a mixed instruction set (passkey examples: context-dependent;
   stdlib text windows answered by an unrelated window: context-free), then two LoRA fine-tunes
   on the same set, without and with the indicator on the examples scored above the threshold;
   passkey accuracy (with / without the indicator at test time) and the response loss on
   held-out context-free examples.

    nice -n 10 python benchmarks/context_awareness.py --out benchmarks/results/cpu
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
import time
from pathlib import Path

import torch

import attnkit.hf as hf
from attnkit.hf.context import (SUBJECT_CHAT, ContextSteer, add_indicator, add_lora, attention_allocation,
                                context_dependency_scores, encode_chat, finetune, indicator_examples, merge_lora)
from attnkit.hf.subject import default_subject
from attnkit.tasks import load_corpus
from attnkit.tasks.longcontext import multikey_example, passkey_example

QUESTION = b" What is the pass key? The pass key is "


def ascii_text(b: bytes) -> str:
    return bytes(x if 9 <= x < 127 else 63 for x in b).decode()


def passkey_chat(ex, indicator=False):
    """user: the haystack with the needle and the question; assistant: "The pass key is <key>"."""
    if ex.kind == "passkey":
        body, lead = ex.prompt[: -len(QUESTION)], "The pass key is "
        question = " What is the pass key?"
    else:  # multikey: " What is the pass key of <name>? The pass key of <name> is "
        name = ex.info["name"]
        q = f" What is the pass key of {name}? The pass key of {name} is ".encode()
        body, lead, question = ex.prompt[: -len(q)], f"The pass key of {name} is ", f" What is the pass key of {name}?"
    user = ascii_text(body) + question
    if indicator:
        user = add_indicator(user)
    return [{"role": "user", "content": user}, {"role": "assistant", "content": lead + ex.answer.decode()}]


def text_chat(rng, text, n_user=160, n_answer=48):
    """A context-free example: the answer is a text window unrelated to the user's."""
    a = rng.randrange(len(text) - n_user)
    b = rng.randrange(len(text) - n_answer)
    return [{"role": "user", "content": ascii_text(text[a:a + n_user])},
            {"role": "assistant", "content": ascii_text(text[b:b + n_answer])}]


@torch.no_grad()
def answer_correct(model, convs, answers, alpha=1.0, heads="all"):
    """Teacher-forced greedy exact match of each conversation's answer (its last bytes)."""
    ok = []
    for conv, ans in zip(convs, answers):
        segs = encode_chat(TOK, conv, SUBJECT_CHAT)
        ids = segs.input_ids[:-len(SUBJECT_CHAT.assistant_suffix)]  # the response's end marker is not asked for
        n = len(ans)
        prompt_len = ids.shape[0] - n
        with hf.apply(model, ContextSteer(alpha=alpha, heads=heads, context=segs.user[:prompt_len])):
            logits = model(ids[None]).logits[0]
        pred = logits[prompt_len - 1: prompt_len - 1 + n].argmax(-1)
        ok.append(bool((pred == ids[prompt_len:]).all()))
    return sum(ok) / len(ok)


@torch.no_grad()
def response_loss(model, convs):
    import torch.nn.functional as F

    total, count = 0.0, 0
    for conv in convs:
        segs = encode_chat(TOK, conv, SUBJECT_CHAT)
        logits = model(segs.input_ids[None]).logits[0, :-1].float()
        tgt = segs.input_ids[1:]
        m = segs.response[1:]
        total += float(F.cross_entropy(logits[m], tgt[m], reduction="sum"))
        count += int(m.sum())
    return total / count


def user_share(model, conv, layer_mean=True):
    segs = encode_chat(TOK, conv, SUBJECT_CHAT)
    alloc = attention_allocation(model, segs.input_ids, segs.segments(), segs.response)
    return {k: round(float(v.mean()), 4) for k, v in alloc.share.items()}


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def main(argv=None):
    global TOK
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/cpu")
    parser.add_argument("--length", type=int, default=512, help="passkey prompt bytes")
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--steps", type=int, default=60, help="LoRA fine-tune steps (each run)")
    parser.add_argument("--layer", type=int, default=8, help="the metric's layer")
    parser.add_argument("--threshold", type=float, default=0.93, help="the paper: 0.6 (flags every example on the subject)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    path = default_subject()
    TOK = AutoTokenizer.from_pretrained(path)
    model = load(path)
    train, val, _ = load_corpus(max_bytes=2 << 20)
    record = {"command": "nice -n 10 python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
              "model": "attnkit.hf.subject.default_subject() (fp32)", "chat_format": vars(SUBJECT_CHAT) if hasattr(
                  SUBJECT_CHAT, "__dict__") else str(SUBJECT_CHAT), "threads": 1, "args": vars(args)}

    # 1. the diagnostic, before and after steering
    rng = random.Random(args.seed)
    ex = passkey_example(rng, val, 1024, 0.5)
    conv = passkey_chat(ex)
    segs = encode_chat(TOK, conv, SUBJECT_CHAT)
    prompt_len = int(segs.input_ids.shape[0] - segs.response.sum() - len(SUBJECT_CHAT.assistant_suffix))
    before = attention_allocation(model, segs.input_ids, segs.segments(), segs.response)
    steer = ContextSteer(alpha=0.5, context=segs.user[:prompt_len])
    after = attention_allocation(model, segs.input_ids, segs.segments(), segs.response, steer=steer)
    top = max(float(v.max()) for a in (before, after) for v in a.share.values())
    before.plot(out / "steer-context-allocation.png", title="subject, passkey in chat format (1024 bytes): "
                "share of the response's attention", vmax=top)
    after.plot(out / "steer-context-allocation-steered.png", title="same, ContextSteer alpha=0.5 on every head",
               vmax=top)
    record["diagnostic"] = {
        "prompt": {"bytes": int(segs.input_ids.shape[0]), "user": int(segs.user.sum()),
                   "template": int(segs.template.sum()), "response": int(segs.response.sum())},
        "before": {k: v.tolist() for k, v in before.share.items()},
        "after_alpha_0.5": {k: v.tolist() for k, v in after.share.items()},
        "mean_before": {k: round(float(v.mean()), 4) for k, v in before.share.items()},
        "mean_after": {k: round(float(v.mean()), 4) for k, v in after.share.items()}}
    print("diagnostic", record["diagnostic"]["mean_before"], record["diagnostic"]["mean_after"], f"{time.time() - t0:.0f}s",
          flush=True)

    # 2. accuracy with steering on context-dependent tasks
    rng = random.Random(args.seed + 1)
    tasks = {
        "passkey": [passkey_example(rng, val, args.length, rng.random()) for _ in range(args.samples)],
        "multikey-8": [multikey_example(rng, val, 2 * args.length, 8) for _ in range(args.samples)],
    }
    record["steering"] = {}
    for name, exs in tasks.items():
        convs = [passkey_chat(e) for e in exs]
        answers = [e.answer for e in exs]
        row = {}
        for alpha in (1.0, 0.9, 0.5, 2.0):
            row[str(alpha)] = answer_correct(model, convs, answers, alpha)
        record["steering"][name] = row
        print("steering", name, row, f"{time.time() - t0:.0f}s", flush=True)

    # 3. the metric, then fine-tunes without / with the indicator
    rng = random.Random(args.seed + 2)
    pk = [passkey_chat(passkey_example(rng, train, 256, rng.random())) for _ in range(16)]
    cf = [text_chat(rng, train) for _ in range(48)]
    convs = pk + cf
    kinds = ["passkey"] * len(pk) + ["text"] * len(cf)
    scores = []
    for c in convs:
        s = encode_chat(TOK, c, SUBJECT_CHAT)
        scores.append(float(context_dependency_scores(model, s.input_ids, s.user, s.response, layer=args.layer)[0]))
    flagged = [s > args.threshold for s in scores]
    record["metric"] = {
        "layer": args.layer, "threshold": args.threshold,
        "passkey": {"mean": sum(s for s, k in zip(scores, kinds) if k == "passkey") / len(pk),
                    "min": min(s for s, k in zip(scores, kinds) if k == "passkey"),
                    "flagged": sum(f for f, k in zip(flagged, kinds) if k == "passkey")},
        "text": {"mean": sum(s for s, k in zip(scores, kinds) if k == "text") / len(cf),
                 "max": max(s for s, k in zip(scores, kinds) if k == "text"),
                 "flagged": sum(f for f, k in zip(flagged, kinds) if k == "text")},
        "counts": {"passkey": len(pk), "text": len(cf)}}
    print("metric", record["metric"], f"{time.time() - t0:.0f}s", flush=True)

    rng = random.Random(args.seed + 3)
    test = [passkey_example(rng, val, args.length, rng.random()) for _ in range(args.samples)]
    test_mk = [multikey_example(rng, val, 2 * args.length, 8) for _ in range(args.samples)]
    held = [text_chat(rng, val) for _ in range(16)]

    def evaluate(m, steer_too=False):
        row = {"passkey": answer_correct(m, [passkey_chat(e) for e in test], [e.answer for e in test]),
               "passkey_with_indicator": answer_correct(m, [passkey_chat(e, True) for e in test],
                                                        [e.answer for e in test]),
               "multikey-8": answer_correct(m, [passkey_chat(e) for e in test_mk], [e.answer for e in test_mk]),
               "multikey-8_with_indicator": answer_correct(m, [passkey_chat(e, True) for e in test_mk],
                                                           [e.answer for e in test_mk])}
        if steer_too:
            row["multikey-8_steered_alpha_0.5"] = answer_correct(m, [passkey_chat(e) for e in test_mk],
                                                                 [e.answer for e in test_mk], 0.5)
        return {**row,
                "text_response_loss": round(response_loss(m, held), 4),
                "attention_share_passkey": user_share(m, passkey_chat(test[0])),
                "attention_share_passkey_with_indicator": user_share(m, passkey_chat(test[0], True))}

    record["finetune"] = {"base": evaluate(model, steer_too=True)}
    print("base", record["finetune"]["base"], f"{time.time() - t0:.0f}s", flush=True)
    sets = {"plain": convs, "indicator": indicator_examples(convs, scores, args.threshold)}
    curves = {}
    for name, data in sets.items():
        m = load(path)
        params = add_lora(m, rank=8, alpha=16, seed=args.seed)
        examples = [encode_chat(TOK, c, SUBJECT_CHAT) for c in data]
        t1 = time.time()
        curves[name] = finetune(m, examples, params, steps=args.steps, lr=2e-3, batch_size=4, seed=args.seed,
                                log_every=1)
        merge_lora(m)
        record["finetune"][name] = {"seconds": round(time.time() - t1, 1), "curve": curves[name],
                                    **evaluate(m, steer_too=name == "plain")}
        print(name, record["finetune"][name], f"{time.time() - t0:.0f}s", flush=True)
    record["finetune"]["setup"] = {"lora": {"rank": 8, "alpha": 16, "targets": "q,k,v,o"}, "steps": args.steps,
                                   "batch_size": 4, "lr": 2e-3, "examples": len(convs),
                                   "indicator_examples": sum(flagged)}
    record["seconds"] = round(time.time() - t0, 1)
    record["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    plot(record, curves, out / "steer-context.png")
    (out / "steer-context.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {out / 'steer-context.json'} in {record['seconds']} s")


def plot(record, curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    for name, row in record["steering"].items():
        alphas = sorted(row, key=float)
        ax.plot([float(a) for a in alphas], [row[a] for a in alphas], "o-", label=name)
    ax.set_xscale("log")
    ax.axvline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("alpha (< 1: toward the user's context; 1: off)")
    ax.set_ylabel("greedy exact match")
    ax.set_title("ContextSteer on every head")
    ax.legend()
    ax = axes[1]
    for name, curve in curves.items():  # both runs draw the same batches (same seed): a moving mean of 8 steps
        values = [v for _, v in curve]
        smooth = [sum(values[max(0, i - 7): i + 1]) / len(values[max(0, i - 7): i + 1]) for i in range(len(values))]
        ax.plot([s for s, _ in curve], smooth, label=name)
    ax.set_xlabel("LoRA step")
    ax.set_ylabel("response loss (nats/byte, mean of 8 steps)")
    ax.set_title("fine-tune loss")
    ax.legend()
    ax = axes[2]
    ft = record["finetune"]
    names = [n for n in ("base", "plain", "indicator") if n in ft]
    x = range(len(names))
    bars = [("passkey", "passkey"), ("passkey_with_indicator", "passkey + [IND]"), ("multikey-8", "multi-key 8"),
            ("multikey-8_with_indicator", "multi-key 8 + [IND]")]
    for j, (key, label) in enumerate(bars):
        ax.bar([i - 0.3 + 0.2 * j for i in x], [ft[n][key] for n in names], 0.2, label=label)
    ax.set_xticks(list(x), names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("greedy exact match")
    ax.set_title("chat-format retrieval: base and after LoRA fine-tunes")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


TOK = None

if __name__ == "__main__":
    main()
