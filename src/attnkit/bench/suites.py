"""Named presets of ``attnkit bench`` (``--suite NAME``): the measurements this project keeps.

A suite fixes the rows (``--mechanisms``, ``--ops``, ``--pattern``) and the mode, lengths and
sampling that answer one question; on CUDA its sizes are the H200 ones the committed results
use (``benchmarks/results/h200/<suite>-<mode>.json``, written by ``benchmarks/gpu.sh <suite>``),
on CPU smaller lengths. Any option given on the command line overrides the suite's value
(e.g. ``--suite patterns --seq 8192``). The run's JSON records the suite's name (``suite``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Suite", "SUITES", "get_suite", "suite_help"]


@dataclass(frozen=True)
class Suite:
    name: str
    measures: str  # the question it answers, one line (shown by `attnkit bench --help`)
    options: dict  # BenchConfig fields on every device
    cuda: dict = field(default_factory=dict)  # overrides on CUDA (the H200 sizes)
    cpu: dict = field(default_factory=dict)  # overrides on CPU
    modes: tuple[str, ...] = ("fwdbwd",)  # the modes benchmarks/gpu.sh runs; the first is the suite's --mode

    def config_fields(self, device: str) -> dict:
        """The BenchConfig fields this suite sets on ``device`` (its first mode included)."""
        extra = self.cuda if device.startswith("cuda") else self.cpu
        return {"mode": self.modes[0], **self.options, **extra}


_LONG = {"repeat": 5, "warmup": 2}  # layer rows at 32k-128k: a few rounds, as the committed runs took

SUITES: dict[str, Suite] = {s.name: s for s in (
    Suite("dense", "dense causal attention: attnkit.attend and FlexAttention against each SDPA backend; the dense "
          "layers (mha, gqa, mqa)",
          {"mechanisms": ["mha", "gqa", "mqa"],
           "ops": ["dense-sdpa", "dense-sdpa-cudnn", "dense-sdpa-flash", "dense-flex", "attend"]},
          modes=("fwdbwd", "fwd")),
    Suite("patterns", "sparse patterns (window 1024, sink 4 + window 1024, S2): their share of the FLOP reduction "
          "realised over dense cuDNN and dense FlexAttention; the pattern layers against mha",
          {"mechanisms": ["mha", "sliding-window", "streaming", "s2"],
           "ops": ["dense-sdpa", "dense-sdpa-cudnn", "dense-flex", "flex", "attend"],
           "pattern": "window:1024,sink:4:1024,s2:64:16:16"},
          cuda={"seqs": [32768, 131072], "repeat": 10, "warmup": 3},
          cpu={"seqs": [2048, 4096]}, modes=("fwdbwd", "fwd")),
    Suite("linear", "linear attention (Lightning, Flow, Agent): the Lightning kernels against dense cuDNN and "
          "flash-linear-attention, the linear layers against mha",
          {"mechanisms": ["mha", "lightning", "flow", "agent-causal", "agent"],
           "ops": ["dense-sdpa-cudnn", "lightning", "fla-lightning"]},
          cuda={"seqs": [2048, 8192, 32768, 131072], **_LONG}, modes=("fwdbwd", "fwd")),
    Suite("heads", "head and projection sharing (GQA, MQA, SQA and its variants, CCA, MoH, MASA, BAM, Echo): "
          "training step and memory against mha",
          {"mechanisms": ["mha", "gqa", "mqa", "sqa", "ssqa", "xsqa", "xsmqa", "cca", "ccgqa", "moh", "masa", "bam",
                          "echo"], "ops": []},
          cuda={"seqs": [8192, 32768], **_LONG}, modes=("fwdbwd", "fwd")),
    Suite("sigmoid", "sigmoid attention (bias -log T): the Triton kernels against softmax through cuDNN and SDPA; "
          "the sigmoid layer against mha",
          {"mechanisms": ["mha", "sigmoid"], "ops": ["dense-sdpa", "dense-sdpa-cudnn", "sigmoid"]},
          cuda={"seqs": [8192, 32768]}, modes=("fwd", "fwdbwd")),
    Suite("decode", "one token after a prefill of seq tokens: per-token latency and the decode state's bytes",
          {"mechanisms": ["mha", "gqa", "mqa", "sliding-window", "streaming", "lightning", "flow", "agent-causal",
                          "moh"], "ops": [], "batch": 1},
          cuda={"seqs": [4096, 16384, 65536, 131072]}, cpu={"seqs": [256, 1024, 4096]}, modes=("decode",)),
)}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"unknown --suite {name!r}; accepted: {', '.join(SUITES)}")
    return SUITES[name]


def suite_help() -> str:
    """One line per suite for ``attnkit bench --help``."""
    return "; ".join(f"{s.name}: {s.measures} ({'/'.join(s.modes)})" for s in SUITES.values())


if __name__ == "__main__":  # `python -m attnkit.bench.suites NAME`: the suite's modes (for benchmarks/gpu.sh)
    import sys

    if len(sys.argv) == 2 and sys.argv[1] in SUITES:
        print(" ".join(SUITES[sys.argv[1]].modes))
    else:
        print(f"usage: python -m attnkit.bench.suites {{{','.join(SUITES)}}}", file=sys.stderr)
        sys.exit(2)
