"""MambAttention's headline direction, measured on :class:`attnkit.tasks.speech.SpeechTask` (CPU, seeds):
does adding shared time/frequency attention to a Mamba speech enhancer help on noise it was not
trained on?

- ``train`` (default): MambAttention and the same model without attention (Mamba only, SEMamba-style;
  ``--models mambattention-separate`` adds the paper's ablation with separate T/F attention weights,
  which a plain run leaves out to stay near 10 CPU minutes) are trained identically on mixtures of
  the in-domain noises (white, pink, hum; SNR -5..10 dB), then scored by SI-SDR improvement (dB over
  the noisy input) on held-out clips: in-domain, two unseen noise kinds (babble, impulsive bursts) and
  an unseen lower SNR range (-10..-5 dB). ``speech.json`` / ``speech.png``.
- ``bench``: CPU forward latency, FLOPs (the cards' FLOP models) and parameters of every card at the
  experiment's size (1 s at 8 kHz: T = 126 frames, F = 65 bins). ``speech-bench.json`` / ``.png``.

Run (writes JSON and PNG under ``--out``)::

    OMP_NUM_THREADS=1 nice -n 10 python -m attnkit.speech.experiments --seeds 0,1,2
    OMP_NUM_THREADS=1 nice -n 10 python -m attnkit.speech.experiments --seeds 0,1,2 \
        --models mambattention-separate --tag sharing
    OMP_NUM_THREADS=1 nice -n 10 python -m attnkit.speech.experiments bench
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .._console import write_atomic
from .._checks import positive_int
from ..tasks.base import summarise_seeds
from ..tasks.speech import TRAIN_NOISES, SpeechTask, si_sdr
from .cards import CARDS
from .mambattention import MambAttention, enhancement_loss

__all__ = ["SMALL", "STFT", "TEST_SETS", "MODELS", "DEFAULT_MODELS", "train_model", "evaluate", "run_train",
           "run_bench", "summarise", "main"]

#: the model size trained here (the official: dim 64, 4 blocks, dense depth 4, d_state 16, expand 4, 8 heads)
SMALL = dict(dim=16, num_heads=4, num_blocks=1, dense_depth=1, d_state=4, expand=1, chunk_size=8)
#: 8 kHz, 16 ms windows, 8 ms hop: F = 65 bins (the official: 16 kHz, n_fft 400, hop 100)
STFT = dict(n_fft=128, hop=64)
MODELS = ("mambattention", "mambattention-separate", "semamba")
#: what a plain run trains (about 10 CPU minutes for 3 seeds); the sharing ablation is
#: ``--models mambattention-separate``
DEFAULT_MODELS = ("mambattention", "semamba")
#: held-out sets: (noise kinds, SNR range in dB); all but ``in-domain`` are out of domain
TEST_SETS = {
    "in-domain": (TRAIN_NOISES, (-5.0, 10.0)),
    "unseen babble": (("babble",), (-5.0, 10.0)),
    "unseen bursts": (("bursts",), (-5.0, 10.0)),
    "unseen low SNR": (TRAIN_NOISES, (-10.0, -5.0)),
}


def train_model(model: MambAttention, noisy: torch.Tensor, clean: torch.Tensor, *, steps: int, batch: int = 4,
                lr: float = 5e-3, seed: int = 0) -> list[float]:
    """AdamW (the official betas 0.8, 0.99) with a one-cycle schedule and gradient clipping at 1 on random
    minibatches of the (noisy, clean) waves ``[N, L]``; returns the loss of every step."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.8, 0.99), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    from ..tasks.speech import stft

    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(noisy.shape[0], (batch,), generator=generator)
        mag, phase = stft(noisy[idx], **STFT)
        loss, _ = enhancement_loss(model(mag, phase), clean[idx], **STFT)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def evaluate(model: MambAttention, noisy: torch.Tensor, clean: torch.Tensor, *, batch: int = 16) -> dict:
    """Mean SI-SDR of the noisy input and of the enhanced output, and their difference (dB)."""
    model.eval()
    before, after = [], []
    for start in range(0, noisy.shape[0], batch):
        x, y = noisy[start:start + batch], clean[start:start + batch]
        before.append(si_sdr(x, y))
        after.append(si_sdr(model.enhance(x, **STFT), y))
    before, after = torch.cat(before), torch.cat(after)
    return {"si_sdr_noisy": float(before.mean()), "si_sdr": float(after.mean()),
            "si_sdri": float((after - before).mean())}


def run_train(seeds: list[int], *, models=DEFAULT_MODELS, steps: int = 300, train_clips: int = 256,
              test_clips: int = 32, seconds: float = 0.5, batch: int = 4, lr: float = 5e-3,
              config: dict | None = None) -> dict:
    """Every model in ``models`` (card names) trained on ``train_clips`` in-domain mixtures per seed, scored
    on :data:`TEST_SETS` (``test_clips`` each, the same clips for every seed and model)."""
    config = {**SMALL, **(config or {})}
    task = SpeechTask(sample_rate=8000, seconds=seconds)
    cards = {c.name: c for c in CARDS}
    unknown = [m for m in models if m not in cards]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; accepted: {', '.join(cards)}")
    tests = {name: task.mixtures(test_clips, seed=10_000 + i, noises=noises, snr_range=snr)
             for i, (name, (noises, snr)) in enumerate(TEST_SETS.items())}
    rows = []
    for seed in seeds:
        train = task.mixtures(train_clips, seed=seed)
        for name in models:
            torch.manual_seed(seed)
            options = {k: v for k, v in config.items() if k not in ("dim", "num_heads")}
            model = cards[name].build(config["dim"], config["num_heads"], freq_bins=STFT["n_fft"] // 2 + 1, **options)
            start = time.perf_counter()
            losses = train_model(model, train["noisy"], train["clean"], steps=steps, batch=batch, lr=lr, seed=seed)
            row = {"model": name, "seed": seed, "train_seconds": time.perf_counter() - start,
                   "loss_first": sum(losses[:10]) / 10, "loss_last": sum(losses[-20:]) / 20,
                   "parameters": sum(p.numel() for p in model.parameters())}
            train_score = evaluate(model, train["noisy"][:test_clips], train["clean"][:test_clips])
            row["train clips si_sdri"] = train_score["si_sdri"]
            for test_name, data in tests.items():
                score = evaluate(model, data["noisy"], data["clean"])
                row[f"{test_name} si_sdri"] = score["si_sdri"]
                row[f"{test_name} si_sdr_noisy"] = score["si_sdr_noisy"]
            out_of_domain = [row[f"{t} si_sdri"] for t in TEST_SETS if t != "in-domain"]
            row["out-of-domain si_sdri"] = sum(out_of_domain) / len(out_of_domain)
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return {"config": {"model": config, "stft": STFT, "sample_rate": 8000, "seconds": seconds, "steps": steps,
                       "batch": batch, "lr": lr, "train_clips": train_clips, "test_clips": test_clips,
                       "train_noises": list(TRAIN_NOISES), "train_snr": list(task.snr_range),
                       "test_sets": {k: {"noises": list(n), "snr": list(s)} for k, (n, s) in TEST_SETS.items()},
                       "threads": torch.get_num_threads()},
            "rows": rows}


#: the paper's size: C 64, 4 blocks, 8 heads, d_state 16, expand 4, dense depth 4, n_fft 400 at 16 kHz
#: (F = 201 bins, 1 s = 161 frames at hop 100)
PAPER = dict(dim=64, num_heads=8, num_blocks=4, dense_depth=4, d_state=16, expand=4)


def run_bench(*, batch: int = 1, seconds: float = 1.0, repeat: int = 21, config: dict | None = None,
              device: str = "cpu", paper_size: bool = False) -> dict:
    """Forward latency (median of ``repeat``), FLOPs and parameters of every card at the experiment's
    size, or with ``paper_size`` at the paper's (C 64, 4 blocks, F = 201, 16 kHz frames); on
    ``device="cuda"`` the GPU is synchronised around each call."""
    config = {**(PAPER if paper_size else SMALL), **(config or {})}
    frames = int(round(seconds * (16000 / 100 if paper_size else 8000 / STFT["hop"]))) + 1
    freq_bins = 201 if paper_size else STFT["n_fft"] // 2 + 1
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    rows = []
    generator = torch.Generator().manual_seed(0)
    mag = torch.rand(batch, freq_bins, frames, generator=generator).to(device)
    phase = ((torch.rand(batch, freq_bins, frames, generator=generator) * 2 - 1) * torch.pi).to(device)
    options = {k: v for k, v in config.items() if k not in ("dim", "num_heads")}
    for card in CARDS:
        torch.manual_seed(0)
        model = card.build(config["dim"], config["num_heads"], freq_bins=freq_bins, **options).eval().to(device)
        with torch.no_grad():
            model(mag, phase)
            times = []
            for _ in range(repeat):
                sync()
                start = time.perf_counter()
                model(mag, phase)
                sync()
                times.append((time.perf_counter() - start) * 1e3)
        flops = card.flop_count(batch, frames, config["dim"], config["num_heads"], freq_bins=freq_bins, **options)
        rows.append({"name": card.name, "family": card.family, "latency_ms": sorted(times)[repeat // 2],
                     "flops_fwd": flops.fwd, "attention_flops_fwd": flops.attention_fwd,
                     "parameters": sum(p.numel() for p in model.parameters())})
        print(rows[-1], flush=True)
    # the paper's size, FLOPs only (its CPU forward is seconds): C 64, 4 blocks, 8 heads, d_state 16,
    # expand 4, dense depth 4, n_fft 400 at 16 kHz (F = 201), 1 s = 161 frames
    paper = dict(num_blocks=4, dense_depth=4, d_state=16, expand=4, freq_bins=201)
    paper_flops = {c.name: c.flop_count(1, 161, 64, 8, **paper).fwd for c in CARDS}
    return {"config": {"model": config, "stft": None if paper_size else STFT, "batch": batch, "seconds": seconds,
                       "frames": frames, "freq_bins": freq_bins, "repeat": repeat, "threads": torch.get_num_threads(),
                       "device": str(device), "paper_size": paper_size,
                       "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
            "rows": rows, "paper_size_flops_fwd_per_second_of_audio": paper_flops}


def summarise(result: dict) -> list[dict]:
    """Mean, min and max over seeds of every numeric field, per model."""
    return summarise_seeds(result["rows"], "model")


def plot(name: str, result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if name == "bench":
        rows = result["rows"]
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.barh([r["name"] for r in rows], [r["latency_ms"] for r in rows])
        for i, r in enumerate(rows):
            ax.text(r["latency_ms"], i, f" {r['flops_fwd'] / 1e6:.0f} MFLOP", va="center", fontsize=8)
        cfg = result["config"]
        ax.set_xlabel(f"CPU forward ms ({cfg['seconds']} s clip, T={cfg['frames']}, F={cfg['freq_bins']}, "
                      f"{cfg['threads']} thread)")
        ax.set_title("speech models: forward latency and FLOPs")
    else:
        sets = ["train clips", "in-domain", *[t for t in TEST_SETS if t != "in-domain"], "out-of-domain"]
        summary = result["summary"]
        fig, ax = plt.subplots(figsize=(9, 4))
        width = 0.8 / len(summary)
        for i, s in enumerate(summary):
            means = [s[f"{t} si_sdri"] for t in sets]
            low = [s[f"{t} si_sdri"] - s[f"{t} si_sdri_min"] for t in sets]
            high = [s[f"{t} si_sdri_max"] - s[f"{t} si_sdri"] for t in sets]
            xs = [j + (i - (len(summary) - 1) / 2) * width for j in range(len(sets))]
            ax.bar(xs, means, width, yerr=[low, high], capsize=3, label=f"{s['model']} ({s['parameters']:.0f} params)")
        ax.set_xticks(range(len(sets)), [t.replace("unseen ", "unseen\n") for t in sets])
        ax.axvline(len(sets) - 1.5, color="grey", lw=0.8, ls=":")
        ax.set_ylabel("SI-SDR improvement (dB)")
        ax.set_title(f"speech enhancement, {result['config']['steps']} steps, "
                     f"{len(result['rows']) // len(summary)} seeds (bars: mean, whiskers: min-max)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnkit.speech.experiments", description=__doc__.split("\n")[0])
    parser.add_argument("run", nargs="?", default="train", choices=["train", "bench"])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 300)")
    parser.add_argument("--train-clips", type=int, default=None, help="training mixtures per seed (default 256)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default 5e-3)")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"comma-separated cards, of {', '.join(MODELS)} (default {','.join(DEFAULT_MODELS)})")
    parser.add_argument("--tag", default="", help="suffix of the output names: speech[-bench][-tag].json")
    parser.add_argument("--out", default="benchmarks/results/cpu", help="folder for the JSON and PNG")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="bench only: where to time")
    parser.add_argument("--paper-size", action="store_true", help="bench only: the paper's model size (C 64, 4 blocks)")
    parser.add_argument("--batch", type=int, default=1, help="bench only: clips per call")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.run != "bench" and (args.device != "cpu" or args.paper_size or args.batch != 1):
        raise SystemExit("--device, --paper-size and --batch apply to the bench run only")
    torch.set_num_threads(1)  # small models on a shared CPU: threads only contend
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if args.run == "bench":
        try:
            batch = positive_int(args.batch, "--batch")
        except ValueError as err:
            raise SystemExit(str(err)) from None
        result = run_bench(device=args.device, paper_size=args.paper_size, batch=batch)
    else:
        models = tuple(m for m in args.models.split(",") if m)
        if not models or any(m not in MODELS for m in models):
            raise SystemExit(f"--models takes a comma-separated subset of {', '.join(MODELS)}, got {args.models!r}")
        options = {} if args.steps is None else {"steps": positive_int(args.steps, "--steps")}
        if args.train_clips is not None:
            options["train_clips"] = positive_int(args.train_clips, "--train-clips")
        if args.lr is not None:
            if not args.lr > 0:
                raise SystemExit(f"--lr must be positive, got {args.lr}")
            options["lr"] = args.lr
        result = run_train(seeds, models=models, **options)
        result["summary"] = summarise(result)
    result = {"command": "python -m attnkit.speech.experiments " + " ".join(sys.argv[1:] if argv is None else argv),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__, **result}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "speech" + ("-bench" if args.run == "bench" else "") + (f"-{args.tag}" if args.tag else "")
    write_atomic(out / f"{stem}.json", json.dumps(result, indent=1) + "\n")
    plot(args.run, result, out / f"{stem}.png")
    print(json.dumps(result.get("summary", result["rows"]), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
