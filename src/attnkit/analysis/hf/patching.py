"""Head patching, circuit overlap and attention repair.

Circuit Component Reuse Across Tasks in Transformer Language Models (Merullo et al., arXiv
2310.08744): the heads that matter for one task (IOI) largely matter for another of similar
structure (Colored Objects, about 78% shared), and moving a few heads' attention repairs the
second task. Here, with the per-head outputs of :mod:`.capture`:

- Activation patching (denoising): run the corrupted prompt with one head's output (before
  ``o_proj``, every position) replaced by its output on the clean prompt. With the logit
  difference ``LD = logit[answer] - logit[foil]`` at the last position,
  ``effect[l, h] = LD_patched - LD_corrupt`` and the normalised effect
  ``(LD_patched - LD_corrupt) / (LD_clean - LD_corrupt)`` (1: the head alone restores the clean
  answer; 0: no effect), averaged over examples. Identical clean and corrupted prompts give
  exactly 0.
- Circuit overlap: the top-``k`` heads by normalised effect of two tasks, ``|A & B| / k``.
- Attention repair: at chosen query positions, chosen heads' attention is moved toward target
  keys, ``w' = (1 - alpha) w + alpha * onehot(target)`` (rows still sum to 1), their outputs
  recomputed as ``w' @ v``; the task's accuracy is compared with and without.
"""

from __future__ import annotations

import random
import re

import torch
from torch import Tensor

from .capture import capture, check_heads, check_layer, model_shape

__all__ = ["head_outputs", "logit_difference", "patch_heads", "top_heads", "circuit_overlap", "steer_attention",
           "retrieval_pairs", "teacher_forced_accuracy", "plot_effects", "kv_head_scores"]


def _check_ids(ids, name: str) -> Tensor:
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[1] == 0 or ids.is_floating_point():
        got = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be integer token ids [B, T] with T >= 1, got {got}")
    return ids


def _check_tokens(tokens, batch: int, name: str) -> Tensor:
    t = torch.as_tensor(tokens)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,) or t.is_floating_point():
        raise ValueError(f"{name} must be one integer token id per example ({batch}), got {tuple(t.shape)}")
    return t


def logit_difference(logits: Tensor, answer: Tensor, foil: Tensor) -> Tensor:
    """``logits[:, -1, answer] - logits[:, -1, foil]`` per example ``[B]`` (float64)."""
    last = logits[:, -1].double()
    rows = torch.arange(last.shape[0])
    return last[rows, answer] - last[rows, foil]


@torch.no_grad()
def head_outputs(model, input_ids: Tensor, **forward_kwargs) -> tuple[dict[int, Tensor], Tensor]:
    """Every layer's per-head outputs ``{layer: [B, T, Hq, Dv]}`` and the logits, on ``input_ids``."""
    kept: dict[int, Tensor] = {}
    with capture(model, lambda call: kept.__setitem__(call.layer, call.output.clone())):
        logits = model(_check_ids(input_ids, "input_ids"), **forward_kwargs).logits
    return kept, logits


@torch.no_grad()
def patch_heads(model, clean_ids: Tensor, corrupt_ids: Tensor, answer, foil, *, layers=None, heads=None) -> dict:
    """Per-head activation patching, clean -> corrupted (module docstring).

    Args:
        clean_ids, corrupt_ids: ``[B, T]`` token ids of one shape (the positions align).
        answer, foil: per example, the clean answer's token and the corrupted one's ``[B]``.
        layers, heads: which layers and query heads to patch (None: all).

    Returns ``{"effect": [L][H], "normalized": [L][H], "clean_ld", "corrupt_ld"}``; heads not
    patched are 0.
    """
    clean_ids, corrupt_ids = _check_ids(clean_ids, "clean_ids"), _check_ids(corrupt_ids, "corrupt_ids")
    if clean_ids.shape != corrupt_ids.shape:
        raise ValueError(f"clean_ids and corrupt_ids must have one shape [B, T] (patching aligns positions), got "
                         f"{tuple(clean_ids.shape)} and {tuple(corrupt_ids.shape)}")
    B = clean_ids.shape[0]
    answer, foil = _check_tokens(answer, B, "answer"), _check_tokens(foil, B, "foil")
    num_layers, num_heads, _ = model_shape(model)
    layer_list = (list(range(num_layers)) if layers is None else
                  [check_layer(x, num_layers, "layers") for x in ([layers] if isinstance(layers, int) else layers)])
    if not layer_list:
        raise ValueError(f"layers must not be empty; accepted: None (all {num_layers}) or layer indices")
    head_list = check_heads(heads, num_heads)
    clean, clean_logits = head_outputs(model, clean_ids)
    clean_ld = logit_difference(clean_logits, answer, foil)
    corrupt_ld = logit_difference(model(corrupt_ids).logits, answer, foil)
    denom = clean_ld - corrupt_ld
    effect = torch.zeros(num_layers, num_heads, dtype=torch.float64)
    normalized = torch.zeros(num_layers, num_heads, dtype=torch.float64)
    usable = denom.abs() > 1e-6  # examples where clean and corrupted differ at all
    for layer in layer_list:
        for h in head_list:
            def hook(call, layer=layer, h=h):
                out = call.output.clone()
                out[:, :, h] = clean[layer][:, :, h]
                return out

            with capture(model, hook, layers=[layer]):
                ld = logit_difference(model(corrupt_ids).logits, answer, foil)
            delta = ld - corrupt_ld
            effect[layer, h] = delta.mean()
            if usable.any():
                normalized[layer, h] = (delta[usable] / denom[usable]).mean()
    return {"effect": effect.tolist(), "normalized": normalized.tolist(), "clean_ld": clean_ld.tolist(),
            "corrupt_ld": corrupt_ld.tolist(), "layers": layer_list, "heads": head_list}


def top_heads(scores, k: int) -> list[tuple[int, int]]:
    """The ``k`` (layer, head) pairs with the largest ``scores [L][H]``, best first."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    if s.dim() != 2 or s.numel() == 0:
        raise ValueError(f"scores must be a non-empty [layers, heads] table, got shape {tuple(s.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= s.numel():
        raise ValueError(f"k must be an integer in [1, {s.numel()}] (layers x heads), got {k!r}")
    order = s.flatten().argsort(descending=True, stable=True)[:k]
    return [(int(i) // s.shape[1], int(i) % s.shape[1]) for i in order]


def circuit_overlap(scores_a, scores_b, k: int) -> dict:
    """Share of the top-``k`` heads of task A that are also in task B's top ``k`` (``|A & B| / k``)."""
    a, b = top_heads(scores_a, k), top_heads(scores_b, k)
    shared = sorted(set(a) & set(b))
    return {"k": k, "overlap": len(shared) / k, "shared": [list(x) for x in shared],
            "top_a": [list(x) for x in a], "top_b": [list(x) for x in b]}


def kv_head_scores(scores, group: int) -> list[list[float]]:
    """Query-head scores ``[L][Hq]`` as KV-head scores ``[L][Hkv]`` (the max over each KV head's
    ``group`` query heads): the unit that DuoAttention's retrieval heads are chosen in."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or s.dim() != 2 or s.shape[1] % group:
        raise ValueError(f"group must be an integer >= 1 dividing the {s.shape[-1]} query heads, got {group!r}")
    return s.view(s.shape[0], -1, group).amax(-1).tolist()


class steer_attention(capture):
    """Context manager: move ``heads``' attention toward target keys.

    Args:
        heads: ``[(layer, query head), ...]``.
        queries: ``[B, n]`` query positions (in the call's ``T``) to steer, per example.
        targets: ``[B, n]`` key positions, one per steered query.
        alpha: in ``[0, 1]``; ``w' = (1 - alpha) w + alpha onehot(target)``.

    Only prefill-style calls (the whole sequence at once) are steered.
    """

    def __init__(self, model, heads, queries, targets, *, alpha: float = 0.5):
        num_layers, num_heads, _ = model_shape(model)
        heads = list(heads)
        if not heads:
            raise ValueError("heads must name at least one (layer, head) pair; got an empty selection")
        by_layer: dict[int, list[int]] = {}
        for pair in heads:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"heads must hold (layer, head) pairs, got {pair!r}")
            layer = check_layer(pair[0], num_layers, "layer")
            by_layer.setdefault(layer, []).extend(check_heads([pair[1]], num_heads, "head"))
        queries, targets = torch.as_tensor(queries), torch.as_tensor(targets)
        if queries.dim() != 2 or queries.shape != targets.shape or queries.shape[1] == 0:
            raise ValueError(f"queries and targets must be [B, n] of one shape with n >= 1, got "
                             f"{tuple(queries.shape)} and {tuple(targets.shape)}")
        if not bool((targets <= queries).all()) or bool((targets < 0).any()):
            raise ValueError("each target key must be at or before its query position (causal attention), and >= 0")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
        self.by_layer, self.queries, self.targets, self.alpha = by_layer, queries, targets, float(alpha)
        super().__init__(model, self._steer, layers=sorted(by_layer))

    def _steer(self, call):
        B, T, S = call.query.shape[0], call.query.shape[2], call.key.shape[2]
        if T != S or self.queries.shape[0] != B or int(self.queries.max()) >= T:
            raise ValueError(f"steer_attention serves one call over the whole sequence of [B, n] = "
                             f"{list(self.queries.shape)} queries; got a call with B={B}, T={T}, S={S}")
        heads = self.by_layer[call.layer]
        rows = torch.arange(B)[:, None].expand_as(self.queries)  # (B, n)
        w = call.weights(heads)[rows, :, self.queries]  # (B, n, h, S): only the steered queries change
        w = w * (1 - self.alpha)
        w.scatter_add_(-1, self.targets[:, :, None, None].expand(-1, -1, len(heads), 1),
                       torch.full((B, self.queries.shape[1], len(heads), 1), self.alpha))
        kv = torch.tensor([h // call.group for h in heads])
        v = call.value[:, kv].float()  # (B, h, S, Dv)
        new = torch.einsum("bnhs,bhsd->bnhd", w, v)  # (B, n, h, Dv)
        out = call.output.clone()
        for i, h in enumerate(heads):
            out[rows, self.queries, h] = new[:, :, i].to(out.dtype)
        return out


TASKS = ("passkey", "multikey", "multikey-has")

# the multi-key task in a second format, one the subject was not trained on: same needles and
# question, other words ("charlie has the number 12345." / "What number does charlie have?")
_HAS_NEEDLE = (re.compile(rb" The pass key of (\w+) is (\d+)\. "), rb" \1 has the number \2. ")
_HAS_QUESTION = (re.compile(rb" What is the pass key of (\w+)\? The pass key of \1 is $"),
                 rb" What number does \1 have? \1 has the number ")


def retrieval_pairs(task: str, tokenizer, haystack: bytes, *, count: int, length: int, seed: int = 0,
                    num_pairs: int = 4) -> list[dict]:
    """Clean / corrupted prompt pairs of a retrieval task on byte text: the corrupted prompt has the
    asked key replaced by another 5-digit key whose first digit differs (same length, same
    haystack). ``task``: ``"passkey"``, ``"multikey"`` (``num_pairs`` name-key needles) or
    ``"multikey-has"`` (the same in other words: ``"<name> has the number <key>."``).
    Each item: ``clean``, ``corrupt`` (ids ``[T]``), ``answer``, ``foil`` (first answer tokens),
    ``key`` (clean key bytes), ``key_at`` (where the key starts in the prompt, in tokens)."""
    from ...tasks.longcontext import multikey_example, passkey_example

    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an integer >= 1, got {count!r}")
    rng = random.Random(seed)
    haystack = bytes(b for b in haystack if b < 128)  # ASCII: one byte, one character, one token
    items = []
    for _ in range(count):
        if task == "passkey":
            ex = passkey_example(rng, haystack, length, rng.random())
            prompt, at = ex.prompt, ex.prompt.index(ex.answer, ex.needle_at)
        elif task == "multikey":
            ex = multikey_example(rng, haystack, length, num_pairs)
            prompt, at = ex.prompt, ex.prompt.index(ex.answer, ex.needle_at)
        else:
            ex = multikey_example(rng, haystack, length, num_pairs)
            prompt = _HAS_NEEDLE[0].sub(_HAS_NEEDLE[1], ex.prompt)
            prompt = _HAS_QUESTION[0].sub(_HAS_QUESTION[1], prompt)
            needle = f" {ex.info['name']} has the number ".encode()
            at = prompt.index(needle) + len(needle)
        key = ex.answer
        if prompt[at:at + len(key)] != key:  # pragma: no cover - the task formats changed under us
            raise RuntimeError(f"retrieval_pairs: the {task} prompt does not hold its key where expected")
        other_first = rng.choice([d for d in b"123456789" if bytes([d]) != key[:1]])
        new_key = bytes([other_first]) + bytes(rng.choice(b"0123456789") for _ in range(len(key) - 1))
        corrupt = prompt[:at] + new_key + prompt[at + len(key):]
        enc = lambda b: tokenizer(b.decode("utf-8"), add_special_tokens=False).input_ids  # noqa: E731
        clean_ids, corrupt_ids = enc(prompt), enc(corrupt)
        if len(clean_ids) != len(corrupt_ids) or len(enc(prompt[:at])) != at:
            raise ValueError("retrieval_pairs needs a byte-level tokenizer (one token per byte), as the subject's")
        items.append({"clean": torch.tensor(clean_ids), "corrupt": torch.tensor(corrupt_ids),
                      "answer": enc(key)[0], "foil": enc(new_key)[0], "key": key,
                      "key_ids": enc(key), "key_at": at})
    return items


@torch.no_grad()
def teacher_forced_accuracy(model, items: list[dict], *, steer_heads=None, alpha: float = 0.5) -> dict:
    """Share of ``items`` (from :func:`retrieval_pairs`) whose whole key the model predicts under
    teacher forcing (prompt + key[:-1]; every key token is the argmax), optionally with
    ``steer_heads`` moved toward the needle's key tokens at the predicting positions."""
    if not items:
        raise ValueError("items must hold at least one example, got none")
    correct, digit_hits, digits = 0, 0, 0
    for item in items:
        key = torch.tensor(item["key_ids"])
        ids = torch.cat([item["clean"], key[:-1]])[None]
        P = item["clean"].shape[0]
        n = key.shape[0]
        queries = torch.arange(P - 1, P - 1 + n)[None]
        targets = torch.arange(item["key_at"], item["key_at"] + n)[None]
        if steer_heads:
            with steer_attention(model, steer_heads, queries, targets, alpha=alpha):
                logits = model(ids).logits
        else:
            logits = model(ids).logits
        pred = logits[0, queries[0]].argmax(-1)
        hits = pred == key
        correct += bool(hits.all())
        digit_hits += int(hits.sum())
        digits += n
    return {"accuracy": correct / len(items), "token_accuracy": digit_hits / digits, "examples": len(items)}


def plot_effects(maps: dict, file, *, marks: dict | None = None) -> None:
    """One heatmap per task of the normalised patching effect ``[L][H]``; ``marks`` draws a box
    around the given (layer, head) pairs per task (e.g. DuoAttention's retrieval heads)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(maps)
    fig, axes = plt.subplots(1, len(names), figsize=(1.5 + 2.6 * len(names), 5), squeeze=False)
    vmax = max(float(np.abs(np.array(maps[n])).max()) for n in names) or 1.0
    for ax, name in zip(axes[0], names):
        m = np.array(maps[name])
        im = ax.imshow(m, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        for layer, h in (marks or {}).get(name, []):
            ax.add_patch(plt.Rectangle((h - 0.5, layer - 0.5), 1, 1, fill=False, ec="black", lw=1.5))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
    fig.colorbar(im, ax=list(axes[0]), label="normalised patching effect")
    fig.savefig(file, dpi=110, bbox_inches="tight")
    plt.close(fig)


# -- attnkit analyze patch -------------------------------------------------------------------------


def add_parser(sub):
    from .cli import common_arguments

    p = sub.add_parser("patch", help="head patching on two retrieval tasks, their circuit overlap, attention repair",
                       description="Activation patching of every head's output (clean -> corrupted key) on two "
                       "retrieval tasks, the overlap of their top heads (arXiv 2310.08744), the overlap with "
                       "DuoAttention's retrieval heads (--duo), and the accuracy change on the second task when the "
                       "first task's top heads are steered to the asked key.")
    common_arguments(p)
    p.add_argument("--tasks", default="multikey,multikey-has",
                   help=f"two tasks, comma-separated, of {', '.join(TASKS)} (default: multikey,multikey-has: the "
                   "trained multi-key format and the same task in words the subject was not trained on)")
    p.add_argument("--length", type=int, default=256, help="prompt bytes before the format change (default: 256)")
    p.add_argument("--examples", type=int, default=8, help="prompt pairs per task, an integer >= 1 (default: 8)")
    p.add_argument("--pairs", type=int, default=4, help="needles of the multi-key tasks (default: 4)")
    p.add_argument("--top", type=int, default=4, help="top heads compared between the tasks (default: 4)")
    p.add_argument("--repair-heads", type=int, default=2, help="top heads of the first task steered (default: 2)")
    p.add_argument("--repair-examples", type=int, default=16, help="prompts of the repair (default: 16)")
    p.add_argument("--duo", default=None, help="a DuoAttention pattern TSV of this model (attnkit identify-duo) to "
                   "compare its retrieval heads with the first task's patching ranking")
    p.add_argument("--duo-sparsity", type=float, default=0.5, help="the pattern's streaming fraction (default: 0.5)")
    p.add_argument("--corpus", default=None, help="text file or folder (default: Python's stdlib source)")
    return p


def _batch(items, key):
    return torch.stack([i[key] for i in items])


def duo_overlap(pattern, kv_scores, sparsity: float) -> dict:
    """DuoAttention's full (retrieval) KV heads at ``sparsity`` against the same number of top
    KV heads by ``kv_scores [L][Hkv]``: ``overlap = |both| / k`` and the chance level ``k / N``."""
    full = pattern.full_heads(sparsity=sparsity)
    k = int(full.sum())
    n = full.numel()
    if k == 0:
        raise ValueError(f"--duo-sparsity {sparsity} leaves no full head of the {n}; accepted: a value below 1")
    duo = {tuple(x) for x in full.nonzero().tolist()}
    ranked = set(top_heads(kv_scores, k))
    return {"sparsity": sparsity, "k": k, "kv_heads": n, "overlap": len(duo & ranked) / k, "chance": k / n,
            "duo_heads": sorted(list(x) for x in duo), "analysis_heads": sorted(list(x) for x in ranked),
            "shared": sorted(list(x) for x in duo & ranked)}


def run(args) -> int:
    import time

    from rich.table import Table

    from ..._console import console
    from .cli import haystack, load_model, write_results

    for name in ("examples", "repair_examples", "top", "repair_heads"):
        value = getattr(args, name)
        if isinstance(value, bool) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value}")
    tasks = [t.strip() for t in args.tasks.split(",")]
    if len(tasks) != 2 or len(set(tasks)) != 2 or not set(tasks) <= set(TASKS):
        raise ValueError(f"--tasks must name two different tasks of {', '.join(TASKS)}, got {args.tasks!r}")
    model, tokenizer, path = load_model(args)
    pattern = None
    if args.duo is not None:
        from ...hf.duo import DuoPattern

        pattern = DuoPattern.load(args.duo)
        pattern.check(model)
    text = haystack(args.corpus)
    began = time.perf_counter()
    maps, accuracy = {}, {}
    for task in tasks:
        items = retrieval_pairs(task, tokenizer, text, count=args.examples, length=args.length, seed=args.seed,
                                num_pairs=args.pairs)
        maps[task] = patch_heads(model, _batch(items, "clean"), _batch(items, "corrupt"),
                                 [i["answer"] for i in items], [i["foil"] for i in items])
        accuracy[task] = teacher_forced_accuracy(model, items)
    first, second = tasks
    overlap = circuit_overlap(maps[first]["normalized"], maps[second]["normalized"], args.top)
    overlaps = {k: circuit_overlap(maps[first]["normalized"], maps[second]["normalized"], k)["overlap"]
                for k in range(1, 2 * args.top + 1)}
    num_layers, num_heads, num_kv = model_shape(model)
    # repair: the first task's top heads steered to the asked key on the second task; random heads as control
    chosen = top_heads(maps[first]["normalized"], args.repair_heads)
    rng = random.Random(args.seed)
    others = [(layer, h) for layer in range(num_layers) for h in range(num_heads) if (layer, h) not in chosen]
    control = rng.sample(others, args.repair_heads)
    items = retrieval_pairs(second, tokenizer, text, count=args.repair_examples, length=args.length,
                            seed=args.seed + 1, num_pairs=args.pairs)
    repair = {"task": second, "heads_from": first, "heads": [list(x) for x in chosen],
              "control_heads": [list(x) for x in control], "baseline": teacher_forced_accuracy(model, items),
              "runs": []}
    for alpha in (0.5, 1.0):
        for label, heads in (("top", chosen), ("random", control)):
            repair["runs"].append({"heads": label, "alpha": alpha,
                                   **teacher_forced_accuracy(model, items, steer_heads=heads, alpha=alpha)})
    duo = None
    if pattern is not None:
        kv_scores = kv_head_scores(maps[first]["normalized"], num_heads // num_kv)
        duo = {"task": first, **duo_overlap(pattern, kv_scores, args.duo_sparsity),
               "top4": duo_overlap_top(pattern, kv_scores, min(4, pattern.gates.numel()))}
    wall = time.perf_counter() - began

    table = Table(title=f"head patching · {path} · {args.examples} pairs per task (normalised effect)")
    table.add_column("task")
    table.add_column("accuracy", justify="right")
    table.add_column(f"top {args.top} heads (layer, head): effect")
    for task, result in maps.items():
        best = top_heads(result["normalized"], args.top)
        table.add_row(task, f"{accuracy[task]['accuracy']:.2f}",
                      ", ".join(f"({layer},{h}): {result['normalized'][layer][h]:.2f}" for layer, h in best))
    console().print(table)
    console().print(f"circuit overlap {first} / {second}, top {args.top}: {overlap['overlap']:.0%} shared "
                    f"{overlap['shared']}")
    runs = Table(title=f"attention repair on {second} with {first}'s top heads (baseline accuracy "
                       f"{repair['baseline']['accuracy']:.2f}, per key token {repair['baseline']['token_accuracy']:.2f})")
    for column in ("heads", "alpha", "accuracy", "per key token"):
        runs.add_column(column, justify="right")
    for r in repair["runs"]:
        heads = chosen if r["heads"] == "top" else control
        runs.add_row(f"{r['heads']} {[list(h) for h in heads]}", f"{r['alpha']:.1f}", f"{r['accuracy']:.2f}",
                     f"{r['token_accuracy']:.2f}")
    console().print(runs)
    marks = None
    if duo is not None:
        console().print(f"DuoAttention retrieval heads ({duo['k']} of {duo['kv_heads']} KV heads at sparsity "
                        f"{duo['sparsity']}) vs the top {duo['k']} KV heads by {first} patching: overlap "
                        f"{duo['overlap']:.0%} (chance {duo['chance']:.0%}); top {duo['top4']['k']}: "
                        f"{duo['top4']['overlap']:.0%} (chance {duo['top4']['chance']:.0%})")
        group = num_heads // num_kv
        marks = [(layer, kv * group + j) for layer, kv in duo["duo_heads"] for j in range(group)]
    titles = {t: f"{t} (acc {accuracy[t]['accuracy']:.2f})" for t in maps}
    data = {"model": path, "seed": args.seed, "tasks": tasks, "length": args.length, "examples": args.examples,
            "multikey_pairs": args.pairs, "wall_s": round(wall, 1), "accuracy": accuracy,
            "patching": maps, "circuit_overlap": overlap, "circuit_overlap_by_k": overlaps, "repair": repair,
            "duo": duo, "duo_pattern": args.duo}
    write_results(args, "patch", data, {"": lambda f: plot_effects(
        {titles[t]: maps[t]["normalized"] for t in maps}, f,
        marks=None if marks is None else {titles[t]: marks for t in maps})})
    return 0


def duo_overlap_top(pattern, kv_scores, k: int) -> dict:
    """The ``k`` KV heads of largest DuoAttention gate against the top ``k`` by ``kv_scores``."""
    gates = pattern.gates.tolist()
    duo, ranked = set(top_heads(gates, k)), set(top_heads(kv_scores, k))
    n = pattern.gates.numel()
    return {"k": k, "overlap": len(duo & ranked) / k, "chance": k / n, "duo_heads": sorted(list(x) for x in duo),
            "analysis_heads": sorted(list(x) for x in ranked)}
