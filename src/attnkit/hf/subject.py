"""``attnkit train-subject``: train the project's own small pretrained LLM and write it as a Hugging Face folder.

No model weights can be downloaded on the project's machines, so the HF methods need a subject
of their own: a byte-level Llama (GQA, RoPE) small enough to ship (bf16 safetensors <= 20 MB),
trained on the standard library's source text mixed with passkey and multi-key retrieval and
few-shot in-context classification (:mod:`attnkit.tasks.longcontext`). The folder loads offline::

    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> model = AutoModelForCausalLM.from_pretrained("subject")      # LlamaForCausalLM, bf16
    >>> tokenizer = AutoTokenizer.from_pretrained("subject")         # token id = UTF-8 byte value

Training: a :class:`~attnkit.models.DecoderLM` (attention ``gqa``), AdamW with linear warm-up and
cosine decay (``attnkit compare``'s schedule), bf16 autocast on CUDA. At the end the
weights are rounded to bf16 (what is shipped), evaluated (greedy passkey accuracy on a depth x
length grid, multi-key and few-shot accuracy, bits per byte on held-out stdlib files), converted
with :func:`attnkit.hf.to_hf` and written, with a byte tokenizer, a generation config, a loss curve
and a model card, into a temporary sibling folder that is renamed into place when complete.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
import uuid
from pathlib import Path

import torch
import torch.nn.functional as F

from .._console import write_atomic
from ..models.training import lr_at
from ..tasks.base import whole_number
from ..tasks.longcontext import FEWSHOT_RULES, SubjectMixture, fewshot_example, multikey_example, passkey_example

__all__ = ["PRESETS", "train_subject", "byte_tokenizer", "preset_parameters", "estimate_h200_seconds",
           "passkey_grid", "add_train_subject_parser", "DEFAULT_PATH", "default_subject", "SIZE_LIMIT_BYTES", "H200_BF16_FLOPS", "ASSUMED_MFU"]

SIZE_LIMIT_BYTES = 20 * 10**6
#: where the shipped subject lives: an HF folder inside the package (package data), trained on the H200 by
#: ``attnkit train-subject --out src/attnkit/hf/subject_model --device cuda``
DEFAULT_PATH = Path(__file__).resolve().parent / "subject_model"
H200_BF16_FLOPS = 989e12  # dense bf16 peak
ASSUMED_MFU = 0.40
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

# model, data and optimiser per preset. default: the H200 run; tiny: seconds on a CPU, for tests
PRESETS = {
    "tiny": {
        "model": dict(dim=64, num_layers=2, num_heads=4, num_kv_heads=2, rope_base=10000.0),
        "data": dict(seq_len=256, max_pairs=2, max_shots=8),
        "train": dict(batch_size=8, steps=100, lr=3e-3, warmup=20, weight_decay=0.1, min_lr_ratio=0.1, grad_clip=1.0),
        "eval": dict(lengths=(128, 256), per_cell=4, bpb_windows=8, multikey=8, fewshot=8),
        "log_every": 5,
    },
    "default": {
        # 12 x 256, 4 query / 2 KV heads of 64: 8.92 M parameters, 17.8 MB in bf16
        "model": dict(dim=256, num_layers=12, num_heads=4, num_kv_heads=2, rope_base=10000.0),
        "data": dict(seq_len=4096, max_pairs=8, max_shots=16),
        "train": dict(batch_size=32, steps=5000, lr=2e-3, warmup=250, weight_decay=0.1, min_lr_ratio=0.1, grad_clip=1.0),
        "eval": dict(lengths=(512, 1024, 2048, 4096), per_cell=40, bpb_windows=64, multikey=100, fewshot=200),
        "log_every": 25,
    },
}


def _model_args(preset: dict) -> dict:
    m = preset["model"]
    return dict(vocab_size=256, dim=m["dim"], num_layers=m["num_layers"], num_heads=m["num_heads"], attention="gqa",
                attention_options={"num_kv_heads": m["num_kv_heads"], "rope_base": m["rope_base"]})


def _check_preset(name) -> dict:
    if name not in PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {name!r}")
    return PRESETS[name]


def preset_parameters(name: str) -> int:
    """The parameter count of a preset's model (computed, not built): tied embedding, per layer two
    norms, q/k/v/o and the SwiGLU, and the final norm."""
    m = _check_preset(name)["model"]
    C, L, H, Hkv = m["dim"], m["num_layers"], m["num_heads"], m["num_kv_heads"]
    D, M = C // H, -(-int(8 * C / 3) // 64) * 64
    per_layer = 2 * C + C * (H + 2 * Hkv) * D + H * D * C + 3 * C * M
    return 256 * C + L * per_layer + C


def estimate_h200_seconds(name: str, steps: int | None = None) -> float:
    """Training time on one H200 at :data:`ASSUMED_MFU` of the bf16 peak: an estimate from FLOPs
    (6 per parameter per token for the matrices and the output layer, plus causal attention's
    6 T H D per layer per token), not a measurement."""
    preset = _check_preset(name)
    m, t = preset["model"], preset["train"]
    T = preset["data"]["seq_len"]
    matrices = preset_parameters(name) - 256 * m["dim"]  # the embedding lookup is free, the output layer is not
    per_token = 6 * (matrices + 256 * m["dim"]) + 6 * T * m["dim"] * m["num_layers"]
    tokens = (steps or t["steps"]) * t["batch_size"] * T
    return per_token * tokens / (ASSUMED_MFU * H200_BF16_FLOPS)


def default_subject() -> Path:
    """The shipped subject's folder (:data:`DEFAULT_PATH`); ``FileNotFoundError`` naming the way out
    when this copy of attnkit has none (a checkout from before it was trained)."""
    if not (DEFAULT_PATH / "config.json").is_file():
        raise FileNotFoundError(f"the shipped subject model is missing from {DEFAULT_PATH}; pass --model PATH (any "
                                "local Hugging Face causal-LM folder) or train one: attnkit train-subject --out DIR")
    return DEFAULT_PATH


# -- the tokenizer ------------------------------------------------------------------------------


def _byte_symbols() -> list[str]:
    """The printable character standing for each byte in a ByteLevel tokenizer (the scheme GPT-2
    introduced: printable Latin-1 bytes stand for themselves, the others for chr(256 + n) in order),
    so that ``tokenizers``' ByteLevel pre-tokenizer and decoder map text <-> these symbols."""
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    symbols, extra = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def byte_tokenizer(model_max_length: int = 4096):
    """A ``transformers`` fast tokenizer whose token ids are the UTF-8 bytes of the text (the ids
    DecoderLM trains on): a BPE over the 256 byte symbols with no merges, a ByteLevel pre-tokenizer
    without regex splitting or prefix space, and the ByteLevel decoder. No special tokens are
    added (the vocabulary stays 256); byte 0 doubles as the padding token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = _byte_symbols()
    core = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(symbols)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=symbols[0], clean_up_tokenization_spaces=False,
                                   model_max_length=model_max_length)


# -- evaluation ---------------------------------------------------------------------------------


@torch.no_grad()
def _greedy(model, prompts: list[bytes], max_new_tokens: int, device, batch_size: int = 16) -> list[bytes]:
    """Greedy continuations of byte prompts (batched by prompt length)."""
    out: list[bytes | None] = [None] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for length, same in by_length.items():
        for start in range(0, len(same), batch_size):  # bounded: fp32 prefill of 4k-byte prompts
            rows = same[start : start + batch_size]
            ids = torch.tensor([list(prompts[i]) for i in rows], dtype=torch.long, device=device)
            gen = model.generate(ids, max_new_tokens=max_new_tokens)[:, length:].cpu()
            for i, row in zip(rows, gen):
                out[i] = bytes(row.tolist())
    return out


def passkey_grid(model, haystack: bytes, lengths, depths=DEPTHS, *, per_cell: int, seed: int, device) -> dict:
    """``{str(length): {str(depth): accuracy}}``: greedy exact match of the 5 digits, ``per_cell``
    prompts per cell (haystack windows and keys drawn from ``seed``)."""
    rng = random.Random(seed)
    grid = {}
    for length in lengths:
        grid[str(length)] = {}
        for depth in depths:
            examples = [passkey_example(rng, haystack, length, depth) for _ in range(per_cell)]
            got = _greedy(model, [e.prompt for e in examples], len(examples[0].answer), device)
            grid[str(length)][str(depth)] = sum(g == e.answer for g, e in zip(got, examples)) / per_cell
    return grid


def _accuracy(model, examples, device) -> float:
    got = _greedy(model, [e.prompt for e in examples], max(len(e.answer) for e in examples), device)
    return sum(g[: len(e.answer)] == e.answer for g, e in zip(got, examples)) / len(examples)


@torch.no_grad()
def _bits_per_byte(model, text: bytes, seq_len: int, windows: int, seed: int, device) -> float:
    rng = random.Random(seed)
    total, count = 0.0, 0
    for _ in range(windows):
        start = rng.randrange(len(text) - seq_len - 1)
        chunk = torch.tensor(list(text[start : start + seq_len + 1]), dtype=torch.long, device=device)[None]
        logits = model(chunk[:, :-1]).float()
        total += float(F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"))
        count += seq_len
    return total / count / math.log(2)


def evaluate(model, val_text: bytes, preset: dict, seed: int, device) -> dict:
    """The card's numbers, on held-out stdlib files (the haystacks too)."""
    e = preset["eval"]
    seq_len = preset["data"]["seq_len"]
    was_training = model.training
    model.eval()
    grid = passkey_grid(model, val_text, e["lengths"], per_cell=e["per_cell"], seed=seed + 1, device=device)
    rng = random.Random(seed + 2)
    pairs = preset["data"]["max_pairs"]
    multikey = [multikey_example(rng, val_text, seq_len, rng.randint(1, pairs)) for _ in range(e["multikey"])]
    fewshot = {rule: [fewshot_example(rng, rng.randint(4, preset["data"]["max_shots"]), rule)
                      for _ in range(e["fewshot"] // len(FEWSHOT_RULES) or 1)] for rule in FEWSHOT_RULES}
    result = {
        "passkey": grid,
        "multikey_accuracy": _accuracy(model, multikey, device),
        "fewshot_accuracy": {rule: _accuracy(model, ex, device) for rule, ex in fewshot.items()},
        "bits_per_byte": _bits_per_byte(model, val_text, min(seq_len, 1024), e["bpb_windows"], seed + 3, device),
    }
    model.train(was_training)
    return result


# -- training -----------------------------------------------------------------------------------


def _check_out(out, force: bool) -> Path:
    if out is None or str(out) == "":
        raise ValueError("--out is required: the folder to write the model into")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; accepted: a folder (created; an existing one must be empty "
                         "unless --force)")
    cwd = Path.cwd().resolve()
    if path.resolve() == cwd or path.resolve() in cwd.parents:
        raise ValueError(f"--out {str(out)!r} is the folder this process runs in (or holds it); name a subfolder")
    if path.exists() and any(path.iterdir()) and not force:
        raise ValueError(f"--out {str(out)!r} is not empty; pass --force to replace it, or name a new folder")
    return path


def checkpoint_path(out) -> Path:
    """Where an unfinished run keeps its state: a hidden file beside ``out``."""
    path = Path(out)
    return path.parent / f".{path.name}.checkpoint.pt"


def _save_checkpoint(file: Path, state: dict) -> None:
    # a kill during the save leaves the previous checkpoint whole; --out's parent may not exist yet
    write_atomic(file, lambda f: torch.save(state, f))


def train_subject(out, *, preset: str = "default", steps: int | None = None, device: str = "cpu", seed: int = 0,
                  force: bool = False, corpus=None, progress=None, command: str | None = None,
                  max_minutes: float | None = None, checkpoint_minutes: float = 2.0,
                  budget_minutes: float | None = None, on_budget=None) -> dict:
    """Train the subject, evaluate it and write the HF folder ``out``; returns the record written to
    ``out/training.json`` plus ``"model"`` (the trained DecoderLM, fp32 holding the bf16-rounded weights)
    and ``"finished": True``.

    ``corpus``: a text file or folder instead of the standard library (tests use a small one).
    ``progress``: ``on_step(step, loss)`` called every ``log_every`` steps.

    Resuming: every ``checkpoint_minutes`` the model, the optimiser and the loss curve are saved to
    :func:`checkpoint_path` ``(out)``; a later call with the same settings continues from there
    (the batch of step ``i`` is drawn from its own generator seeded by ``(seed, i)``, so a resumed
    run sees the same data as an uninterrupted one). ``max_minutes``: stop training after so many
    minutes, save the checkpoint and return ``{"finished": False, "step": ..., "steps": ...}``
    (a device that limits each command's time can then run the same command again).

    ``budget_minutes``: fit the number of training steps to this many minutes on this device
    (training only; the evaluation comes after). Before training, :data:`PROBE_STEPS` steps run on
    a throw-away copy of the model and optimiser (the first ones untimed: warm-up); the run then
    trains ``min(steps, budget / seconds per step)`` steps from the untouched initialisation, so
    ``--steps N`` with the chosen ``N`` reproduces it exactly. The record keeps the probe's figures.
    For machines whose checkpoints cannot outlive a command. ``on_budget(budget)`` is called with the
    probe's figures once the number of steps is chosen (the command line's progress bar resizes).
    """
    from .._checks import parse_device
    from ..models import DecoderLM
    from ..tasks.text import load_corpus

    config = _check_preset(preset)
    steps = config["train"]["steps"] if steps is None else steps
    whole_number(steps, "--steps", minimum=1)
    whole_number(seed, "--seed", minimum=0)
    if max_minutes is not None and (isinstance(max_minutes, bool) or not isinstance(max_minutes, (int, float))
                                    or not max_minutes > 0):
        raise ValueError(f"--max-minutes must be a number > 0, got {max_minutes!r}")
    if budget_minutes is not None and (isinstance(budget_minutes, bool) or not isinstance(budget_minutes, (int, float))
                                       or not budget_minutes > 0):
        raise ValueError(f"--budget-minutes must be a number > 0, got {budget_minutes!r}")
    torch_device = parse_device(device)
    path = _check_out(out, force)
    t, data = config["train"], config["data"]
    train_text, val_text, corpus_info = load_corpus(corpus)
    need = 4 * (data["seq_len"] + 1)
    if len(val_text) < need:
        raise ValueError(f"the corpus's held-out files hold {len(val_text)} bytes; preset {preset} needs at least "
                         f"{need} (corpus: {corpus_info['root']})")
    mixture = SubjectMixture(train_text, data["seq_len"], max_pairs=data["max_pairs"], max_shots=data["max_shots"])

    torch.manual_seed(seed)
    model = DecoderLM(**_model_args(config)).to(torch_device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=t["lr"], betas=(0.9, 0.95), fused=torch_device.type == "cuda")
    cuda = torch_device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def train_step(model, opt, batch):
        if cuda:  # pinned: the copy does not wait for the GPU, so the next batch is built while this one trains
            batch = [x.pin_memory() for x in batch]
        inputs, targets, answers = (x.to(torch_device, non_blocking=True) for x in batch)
        with autocast:
            # DecoderLM.loss's hidden[targets != -100] needs the count on the host (a sync every step);
            # the output layer over every position (V = 256) is cheap and keeps the GPU queue full
            logits = model(inputs)
            text_loss, answer_loss = _split_loss(logits, targets, answers)
            loss = text_loss + answer_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss, text_loss, answer_loss

    budget = None
    if budget_minutes is not None and not checkpoint_path(path).exists():
        budget = _probe_steps(model, opt, train_step, lambda i: mixture.batch(
            t["batch_size"], random.Random(f"train-subject-probe:{seed}:{i}"), answers=True), torch_device)
        budget["minutes"] = budget_minutes
        budget["steps_asked"] = steps
        steps = max(1, min(steps, int(60 * budget_minutes / budget["seconds_per_step"])))
        budget["steps_chosen"] = steps
        if on_budget is not None:
            on_budget(budget)
    warmup = min(t["warmup"], max(1, steps // 10))
    curve, window = [], []
    log_every = min(config["log_every"], steps)
    settings = {"preset": preset, "steps": steps, "seed": seed, "model": _model_args(config), "corpus": corpus_info}
    ckpt, first, wall_before, resumed = checkpoint_path(path), 0, 0.0, []
    if ckpt.exists():
        state = torch.load(ckpt, map_location=torch_device, weights_only=True)
        if state["settings"] != settings:
            if not force:
                raise ValueError(f"{ckpt} holds an unfinished run with other settings ({state['settings']}); "
                                 f"rerun with those, delete the file, or pass --force to start afresh")
        else:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            first, curve, wall_before, resumed = state["step"], state["curve"], state["wall_s"], state["resumed"]
            resumed = [*resumed, first]
    start = last_save = time.perf_counter()

    def save(step):
        _save_checkpoint(ckpt, {"settings": settings, "model": model.state_dict(), "optimizer": opt.state_dict(),
                                "step": step, "curve": curve, "wall_s": wall_before + time.perf_counter() - start,
                                "resumed": resumed})

    for step in range(first, steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr=t["lr"], warmup=warmup, steps=steps, floor=t["min_lr_ratio"])
        batch = mixture.batch(t["batch_size"], random.Random(f"train-subject:{seed}:{step}"), answers=True)
        loss, text_loss, answer_loss = train_step(model, opt, batch)
        window.append(torch.stack([loss.detach(), text_loss.detach(), answer_loss.detach()]))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            value, text_value, answer_value = torch.stack(window).mean(0).tolist()
            window.clear()
            if not math.isfinite(value):
                raise FloatingPointError(f"train-subject: the training loss became {value} at step {step + 1}")
            curve.append([step + 1, value, text_value, answer_value])
            if progress:
                progress(step + 1, value)
            now = time.perf_counter()
            if max_minutes is not None and now - start >= 60 * max_minutes and step + 1 < steps:
                save(step + 1)
                return {"finished": False, "step": step + 1, "steps": steps, "checkpoint": str(ckpt)}
            if now - last_save >= 60 * checkpoint_minutes and step + 1 < steps:
                save(step + 1)
                last_save = time.perf_counter()
    if cuda:
        torch.cuda.synchronize(torch_device)
    wall = wall_before + time.perf_counter() - start
    with torch.no_grad():  # what is shipped: evaluate the bf16 weights (held in fp32)
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    evaluation = evaluate(model, val_text, config, seed, torch_device)
    record = {
        "command": command, "preset": preset, "seed": seed, "steps": steps, "device": str(torch_device),
        "model": _model_args(config), "parameters": model.num_parameters(), "data": {**data, "weights": mixture.weights},
        "train": {**t, "steps": steps, "warmup": warmup}, "corpus": corpus_info, "wall_s": wall,
        "tokens_per_s": steps * t["batch_size"] * data["seq_len"] / wall, "loss_curve": curve, "eval": evaluation,
        "resumed_at_steps": resumed, "budget": budget,
    }
    _write_folder(path, model.cpu(), record, force)
    ckpt.unlink(missing_ok=True)
    record["safetensors_bytes"] = (path / "model.safetensors").stat().st_size
    return {**record, "model": model, "finished": True}


#: steps of the --budget-minutes probe: the first PROBE_WARMUP untimed
PROBE_STEPS, PROBE_WARMUP = 24, 8


def _probe_steps(model, opt, train_step, batch_of, device) -> dict:
    """Seconds per training step, timed on copies of ``model`` and ``opt`` (the originals are not
    touched: the real run starts from the same initialisation as one without a budget)."""
    import copy

    probe_model = copy.deepcopy(model)
    twin = dict(zip(map(id, model.parameters()), probe_model.parameters()))
    probe_opt = type(opt)([{**{k: v for k, v in g.items() if k != "params"}, "params": [twin[id(p)] for p in g["params"]]}
                           for g in opt.param_groups])
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for i in range(PROBE_STEPS):
        if i == PROBE_WARMUP:
            sync()
            start = time.perf_counter()
        train_step(probe_model, probe_opt, batch_of(i))
    sync()
    per_step = (time.perf_counter() - start) / (PROBE_STEPS - PROBE_WARMUP)
    del probe_model, probe_opt
    return {"probe_steps": PROBE_STEPS, "probe_untimed": PROBE_WARMUP, "seconds_per_step": per_step}


def _split_loss(logits, targets, answers):
    """(mean cross-entropy over the text targets, mean over the answer targets); 0 for a kind the
    batch lacks. Counts stay on the device (no sync)."""
    per_position = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                                   reduction="none")  # (B T,) zero where ignored
    answers = answers.flatten()
    text = (targets.flatten() != -100) & ~answers
    text_loss = (per_position * text).sum() / text.sum().clamp_min(1)
    answer_loss = (per_position * answers).sum() / answers.sum().clamp_min(1)
    return text_loss, answer_loss


# -- the folder ---------------------------------------------------------------------------------


def _write_folder(path: Path, model, record: dict, force: bool) -> None:
    from transformers import GenerationConfig

    from .convert import to_hf

    path.parent.mkdir(parents=True, exist_ok=True)
    # a sibling, so that the final rename stays on one file system
    staging = path.parent / f".{path.name}.writing-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        hf = to_hf(model.float()).to(torch.bfloat16)
        # bytes have no BOS / EOS; LlamaConfig's defaults (1, 2) would stop generation at byte 0x02
        hf.config.bos_token_id = hf.config.eos_token_id = None
        hf.config.pad_token_id = 0
        hf.config.max_position_embeddings = record["data"]["seq_len"]
        hf.generation_config = GenerationConfig(do_sample=False, pad_token_id=0, bos_token_id=None, eos_token_id=None)
        hf.save_pretrained(staging, safe_serialization=True)
        # the weights get the config's mode (the umask's), not a private 0600 of the writer
        shutil.copymode(staging / "config.json", staging / "model.safetensors")
        byte_tokenizer(record["data"]["seq_len"]).save_pretrained(staging)
        record["safetensors_bytes"] = (staging / "model.safetensors").stat().st_size
        _plot_curve(record["loss_curve"], staging / "loss_curve.png")
        (staging / "training.json").write_text(json.dumps(record, indent=1))
        (staging / "README.md").write_text(model_card(record))
        if path.exists():
            if any(path.iterdir()) and not force:  # appeared while training
                raise ValueError(f"--out {str(path)!r} is no longer empty; pass --force to replace it")
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(path, old)
            try:
                os.rename(staging, path)
            except BaseException:
                os.rename(old, path)  # the user's folder goes back where it was
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _plot_curve(curve, file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [row[0] for row in curve]
    ax.plot(steps, [row[2] for row in curve], label="text (nats per byte)")
    ax.plot(steps, [row[3] for row in curve], label="answers of the synthetic tasks (nats per byte)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    ax.set_title("attnkit subject: training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(file, dpi=100)
    plt.close(fig)


def model_card(record: dict) -> str:
    """The README.md of the folder: architecture, data, training, the command and the evaluation."""
    m, d, t, e = record["model"], record["data"], record["train"], record["eval"]
    opts = m["attention_options"]
    heads = m["num_heads"]
    lengths = list(e["passkey"])
    depths = list(next(iter(e["passkey"].values())))
    rows = ["| depth \\ length | " + " | ".join(lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for depth in depths:
        rows.append(f"| {depth} | " + " | ".join(f"{e['passkey'][n][depth]:.2f}" for n in lengths) + " |")
    weights = ", ".join(f"{k} {v:g}" for k, v in d["weights"].items())
    fewshot = ", ".join(f"{rule} {acc:.2f}" for rule, acc in e["fewshot_accuracy"].items())
    command = record["command"] or (f"attnkit train-subject --out DIR --preset {record['preset']} --steps "
                                    f"{record['steps']} --seed {record['seed']}")
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [attnkit, byte-level, long-context, passkey]
---
# attnkit subject model ({record['preset']} preset)

A small byte-level Llama trained by attnkit as the default subject of its Hugging Face methods
(`attnkit.hf`): long-context retrieval to measure KV-cache methods on, and few-shot in-context
classification to measure steering methods on.

## Architecture
`LlamaForCausalLM` converted from attnkit's `DecoderLM` (`attnkit.hf.to_hf`), bf16 safetensors
({record['safetensors_bytes'] / 1e6:.2f} MB, {record['parameters']:,} parameters): width {m['dim']},
{m['num_layers']} layers, {heads} query heads and {opts['num_kv_heads']} KV heads (GQA) of dimension
{m['dim'] // heads}, RoPE (theta {opts['rope_base']:g}), SwiGLU MLP, RMSNorm, tied embeddings,
vocabulary 256: a token is a UTF-8 byte (the tokenizer maps text to its bytes; byte 0 is the padding
token; there is no BOS or EOS). Trained context: {d['seq_len']} bytes.

## Data
Rows of {d['seq_len']} bytes, drawn with weights {weights}:
- text: windows of the Python standard library's source ({record['corpus']['train_bytes']:,} bytes of
  training files; files with crc32(path) % 10 == 0 are held out), loss on every byte;
- passkey: a random 5-digit key stated at a random depth of stdlib haystack text and asked at the end
  (lengths up to {d['seq_len']});
- multi-key: 1 to {d['max_pairs']} (name, key) pairs at random depths, one name asked;
- few-shot: 2 to {d['max_shots']} labelled words (rules: {', '.join(FEWSHOT_RULES)}), label words drawn afresh
  per prompt and mapped to the classes at random, then a query.
Synthetic examples are packed into rows with the loss on their answers only
(`attnkit.tasks.longcontext`).

## Training
{record['steps']} steps of batch {t['batch_size']} x {d['seq_len']} bytes, AdamW (lr {t['lr']:g}, betas 0.9/0.95,
weight decay {t['weight_decay']:g} on matrices), {t['warmup']} warm-up steps then cosine decay to
{t['min_lr_ratio']:g} x lr, gradient clip {t['grad_clip']:g}; seed {record['seed']}; device {record['device']};
{record['wall_s']:.0f} s ({record['tokens_per_s']:,.0f} tokens/s){resumed_note(record)}.

    {command}
{budget_note(record)}
![training loss](loss_curve.png)

The training loss is the mean cross-entropy over text bytes plus the mean over answer bytes (each
averaged on its own, so that a few answer bytes per row are not drowned by the text); final: text
{record['loss_curve'][-1][2]:.4f}, answers {record['loss_curve'][-1][3]:.4f} nats per byte.

## Evaluation (the shipped bf16 weights, greedy, on held-out stdlib files)
Passkey accuracy (exact 5 digits) by depth of the needle and prompt length in bytes
({record_per_cell(record)} prompts per cell):

{chr(10).join(rows)}

- multi-key retrieval at {d['seq_len']} bytes: {e['multikey_accuracy']:.2f}
- few-shot classification: {fewshot}
- bits per byte on held-out stdlib text: {e['bits_per_byte']:.4f}
"""


def budget_note(record: dict) -> str:
    b = record.get("budget")
    if not b:
        return ""
    return (f"\nThe number of steps was chosen by `--budget-minutes {b['minutes']:g}`: a probe timed "
            f"{b['seconds_per_step']:.3f} s per step, so {b['steps_chosen']} of the {b['steps_asked']} steps asked. "
            f"`--steps {b['steps_chosen']}` in place of `--budget-minutes` reproduces the run exactly.\n")


def resumed_note(record: dict) -> str:
    steps = record.get("resumed_at_steps") or []
    return f"; resumed from checkpoints at steps {', '.join(map(str, steps))}" if steps else ""


def record_per_cell(record: dict) -> int:
    return PRESETS[record["preset"]]["eval"]["per_cell"]


# -- the command --------------------------------------------------------------------------------


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def add_train_subject_parser(sub) -> None:
    sizes = []
    for name, preset in PRESETS.items():
        n = preset_parameters(name)
        m = preset["model"]
        sizes.append(f"{name}: {m['num_layers']} layers x {m['dim']}, {m['num_heads']} query / {m['num_kv_heads']} KV "
                     f"heads, {n / 1e6:.2f} M parameters ({2 * n / 1e6:.1f} MB bf16), context "
                     f"{preset['data']['seq_len']}, {preset['train']['steps']} steps of batch "
                     f"{preset['train']['batch_size']}")
    estimate = estimate_h200_seconds("default")
    p = sub.add_parser(
        "train-subject",
        help="train attnkit's small byte-level subject LLM and write it as a Hugging Face folder",
        description="Train a byte-level GQA Llama on stdlib source text mixed with passkey, multi-key and few-shot "
        "in-context tasks; evaluate it (passkey accuracy by depth x length, bits per byte) and write an HF folder "
        "(bf16 safetensors, byte tokenizer, generation config, model card, loss curve) that "
        "AutoModelForCausalLM / AutoTokenizer load offline. Presets: " + "; ".join(sizes) + ". "
        f"The default preset is the H200 run: about {_minutes(estimate)} on one H200 by an estimate from FLOPs at "
        f"{ASSUMED_MFU:.0%} of {H200_BF16_FLOPS / 1e12:.0f} TFLOP/s bf16 (an estimate, not a measurement; a model "
        "this small usually runs below that utilisation). tiny: under a minute on a CPU (tests).",
    )
    p.add_argument("--out", required=True, help="the folder to write (must not exist or be empty, unless --force; required, no default)")
    p.add_argument("--preset", default="default", choices=list(PRESETS),
                   help=f"default (the H200 run, ~{_minutes(estimate)} estimated) | tiny (CPU, tests) (default: default)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps, an integer >= 1 (default: the preset's: "
                   + ", ".join(f"{n} {pr['train']['steps']}" for n, pr in PRESETS.items()) + ")")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:<index> (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data, an integer >= 0 (default: 0)")
    p.add_argument("--corpus", default=None, help="a text file or folder of text files to train on (default: the standard library's source)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder (and start afresh when a "
                   "checkpoint of other settings is there; default: refuse)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop training after this many minutes, keep a checkpoint beside --out and exit with status 3; "
                   "the same command run again resumes (for machines that limit a command's time; default: no limit). "
                   "A checkpoint is also saved every 2 minutes, so a killed run resumes too")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="fit the training to this many minutes on this device: time a few probe steps first, then "
                   "train min(--steps, minutes / seconds per step) steps; the chosen number is recorded, and "
                   "--steps N reproduces the run exactly (for machines whose checkpoints cannot outlive a command; "
                   "the evaluation's time comes on top; default: no budget)")
    p.set_defaults(func=cmd_train_subject)


def cmd_train_subject(args) -> int:
    from .._console import StepPrinter, console, err_console, invoked_command

    steps = args.steps if args.steps is not None else _check_preset(args.preset)["train"]["steps"]
    whole_number(steps, "--steps", minimum=1)
    from .._checks import parse_device

    whole_number(args.seed, "--seed", minimum=0)
    for flag, value in (("--max-minutes", args.max_minutes), ("--budget-minutes", args.budget_minutes)):
        if value is not None and not value > 0:
            raise ValueError(f"{flag} must be a number > 0, got {value!r}")
    parse_device(args.device)
    _check_out(args.out, args.force)  # before the corpus is read and anything trains
    if args.corpus is not None and not Path(args.corpus).exists():
        raise ValueError(f"--corpus: corpus path {args.corpus!r} does not exist; give a text file or a folder of text files")
    stream = sys.stderr
    bar = None
    if stream.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        bar = Progress(TextColumn("[bold]train-subject"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn(),
                       console=err_console())
        task = bar.add_task("train", total=steps, loss=float("nan"))
        bar.start()

        def on_step(step, loss):
            bar.update(task, completed=step, loss=loss)

        def on_budget(budget):
            bar.update(task, total=budget["steps_chosen"])
    else:
        printer = StepPrinter("train-subject", stream)
        printer.line(f"training preset {args.preset}, {steps} steps on {args.device}")
        on_step = printer.start(args.preset, steps)

        def on_budget(budget):
            printer.line(f"--budget-minutes {args.budget_minutes:g}: {budget['seconds_per_step']:.3f} s per step "
                         f"(probe), so {budget['steps_chosen']} of {budget['steps_asked']} steps")
            on_step_new = printer.start(args.preset, budget["steps_chosen"])
            on_step_box[0] = on_step_new

    on_step_box = [on_step]

    def progress(step, loss):
        on_step_box[0](step, loss)
    if checkpoint_path(args.out).exists():
        err_console().print(f"train-subject: found the checkpoint {checkpoint_path(args.out)}: resuming from it "
                            "(when its settings match)", highlight=False)
    try:
        record = train_subject(args.out, preset=args.preset, steps=steps, device=args.device, seed=args.seed,
                               force=args.force, corpus=args.corpus, progress=progress, on_budget=on_budget,
                               command=invoked_command("train-subject"), max_minutes=args.max_minutes,
                               budget_minutes=args.budget_minutes)
    finally:
        if bar is not None:
            bar.stop()
    if not record["finished"]:
        err_console().print(f"train-subject: stopped at step {record['step']} of {record['steps']} (--max-minutes); "
                            f"checkpoint {record['checkpoint']}; run the same command again to resume", highlight=False)
        return 3
    e = record["eval"]
    out = console()
    out.print(f"wrote {args.out}: {record['parameters']:,} parameters, {record['safetensors_bytes'] / 1e6:.2f} MB; "
              f"bits per byte {e['bits_per_byte']:.4f}; multi-key {e['multikey_accuracy']:.2f}")
    out.print("passkey accuracy by length: " + ", ".join(
        f"{n}: {sum(row.values()) / len(row):.2f}" for n, row in e["passkey"].items()))
    return 0
