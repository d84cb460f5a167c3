"""Attention as explanation on the shipped subject and on tiny encoder-decoders (issue 25, items 3 and 4).

1. ``attnkit analyze attribution`` on the shipped subject (byte-level Llama): the answer byte's logit
   on few-shot and passkey prompts; last-layer attention and attention rollout against gradient,
   input x gradient, integrated gradients and occlusion, Kendall's tau and Spearman's rho per
   example ("A Song of (Dis)agreement", arXiv 2205.04559) ->
   ``cpu/analyze-attribution.json`` and ``.png``.
2. ``attnkit analyze crossattn`` on a tiny random Whisper and a tiny random BART (random weights:
   the mechanics and the numbers of the measure, not a finding about trained models) ->
   ``cpu/analyze-crossattn-whisper.json``, ``cpu/analyze-crossattn-bart.json`` and their PNGs.

    nice -n 10 python benchmarks/analyze_attribution.py                 # ~4 min on 1 thread
    python benchmarks/analyze_attribution.py --examples 2 --out-dir /tmp/a   # a dry run
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

if __name__ == "__main__":  # this checkout's attnkit, not an installed copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "cpu"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=15, help="subject prompts per task (default: 15)")
    p.add_argument("--steps", type=int, default=32, help="integrated-gradients nodes (default: 32)")
    p.add_argument("--length", type=int, default=116, help="prompt bytes (default: 116)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--parts", nargs="+", default=["attribution", "crossattn"], choices=["attribution", "crossattn"],
                   help="which analyses to run (default: both)")
    p.add_argument("--out-dir", default=str(RESULTS), help="folder of the result files (default: benchmarks/results/cpu)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/analyze_attribution.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))

    from attnkit.analysis.hf import attribution, crossattn

    parser = argparse.ArgumentParser(prog="attnkit analyze")
    sub = parser.add_subparsers()
    attribution.add_parser(sub)
    crossattn.add_parser(sub)
    out = Path(args.out_dir)
    runs = [
        ["attribution", "--examples", str(args.examples), "--steps", str(args.steps), "--length", str(args.length),
         "--out", str(out / "analyze-attribution.json")],
        ["crossattn", "--model", "tiny-whisper", "--examples", "16", "--steps", "6",
         "--out", str(out / "analyze-crossattn-whisper.json")],
        ["crossattn", "--model", "tiny-bart", "--examples", "16", "--steps", "6",
         "--out", str(out / "analyze-crossattn-bart.json")],
    ]
    for argv_run in runs:
        if argv_run[0] not in args.parts:
            continue
        run_args = parser.parse_args(argv_run)
        run_args.command = command.strip()
        if run_args.func(run_args) != 0:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
