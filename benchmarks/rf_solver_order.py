"""How fast does RF-Solver's error fall with the step size, against Euler's, on ODEs with closed-form solutions?

Integrates, in float64 on CPU, from t = 1 to t = 0 (sampling) with ``euler`` and ``rf_solver``
(:mod:`attnkit.diffusion.rf_solver`) at 8 to 256 uniform steps: the rectified flow between
``N(mean, std^2)`` data and ``N(0, 1)`` noise (:class:`~attnkit.diffusion.rf_solver.GaussianFlow`,
the analytic velocity), the linear ``dx/dt = -2 t x`` and the nonlinear ``dx/dt = x^2``. Writes
the max error against the exact solution per step count, the log-log slopes fitted over 16-256
steps (the order), inversion-then-sampling errors at equal NFE (RF-Solver with n steps against
Euler with 2n) and a log-log plot beside the JSON.

    PYTHONPATH=src python benchmarks/rf_solver_order.py --out benchmarks/results/cpu/rf-solver-order.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from attnkit.diffusion.rf_solver import GaussianFlow, invert, rf_solver, sample

STEPS = (8, 16, 32, 64, 128, 256)
FIT = (16, 32, 64, 128, 256)


def problems():
    flow = GaussianFlow(mean=torch.linspace(-1.0, 2.0, 64, dtype=torch.float64), std=0.3)
    noise = torch.randn(8, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = torch.linspace(0.5, 2.0, 64, dtype=torch.float64)
    return {
        "gaussian flow N(mean, 0.3^2) <- N(0, 1)": (flow.velocity, flow.flow, noise),
        "linear dx/dt = -2 t x": (lambda x, t: -2 * t * x, lambda x, t0, t1: x * math.exp(-(t1 ** 2 - t0 ** 2)), x),
        "riccati dx/dt = x^2": (lambda x, t: x * x, lambda x, t0, t1: 1 / (1 / x - (t1 - t0)), x),
    }


def slope(steps, errors) -> float:
    return float(np.polyfit(np.log(1.0 / np.asarray(steps, dtype=float)), np.log(errors), 1)[0])


def measure() -> dict:
    out = {}
    for name, (velocity, exact, x) in problems().items():
        target = exact(x, 1.0, 0.0)
        row = {"steps": list(STEPS), "step_size": [1.0 / n for n in STEPS]}
        for label, order in (("euler", 1), ("rf_solver", 2)):
            errs = []
            for n in STEPS:
                got = rf_solver(velocity, x, torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64), order=order)
                errs.append((got.x - target).abs().max().item())
            row[f"{label}_max_error"] = errs
            row[f"{label}_nfe"] = [order * n for n in STEPS]
            row[f"{label}_order"] = slope(FIT, [e for n, e in zip(STEPS, errs) if n in FIT])
        out[name] = row
    return out


def reconstruction() -> list[dict]:
    """Invert data to noise then sample back, on the Gaussian flow: RF-Solver n steps (2n NFE)
    against Euler 2n steps (2n NFE), unshifted and with FLUX's shift at 4096 tokens."""
    flow = GaussianFlow(mean=torch.linspace(-1.0, 2.0, 64, dtype=torch.float64), std=0.3)
    x0 = flow.mean + 0.3 * torch.randn(8, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rows = []
    for n in (5, 10, 25):
        for seq in (None, 4096):
            row = {"nfe": 2 * n, "image_seq_len": seq}
            for label, order, steps in (("rf_solver", 2, n), ("euler", 1, 2 * n)):
                noise = invert(flow.velocity, x0, steps, image_seq_len=seq, order=order).x
                back = sample(flow.velocity, noise, steps, image_seq_len=seq, order=order).x
                row[f"{label}_steps"] = steps
                row[f"{label}_reconstruction_error"] = (back - x0).abs().max().item()
                row[f"{label}_inversion_error"] = (noise - flow.flow(x0, 0.0, 1.0)).abs().max().item()
            row["euler_over_rf_solver"] = row["euler_reconstruction_error"] / row["rf_solver_reconstruction_error"]
            rows.append(row)
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(result), figsize=(4.2 * len(result), 3.8), sharey=False)
    for ax, (name, row) in zip(axes, result.items()):
        for label, marker in (("euler", "o"), ("rf_solver", "s")):
            ax.loglog(row["step_size"], row[f"{label}_max_error"], marker=marker,
                      label=f"{label} (order {row[f'{label}_order']:.2f})")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step size (1 / steps)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("max |x(0) - exact|")
    fig.suptitle("RF-Solver-2 against Euler, sampling t = 1 -> 0, float64", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/cpu/rf-solver-order.json")
    a = p.parse_args(argv)
    result = measure()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    data = {
        "command": "PYTHONPATH=src python benchmarks/rf_solver_order.py" + "".join(f" {x}" for x in sys.argv[1:]),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "device": "cpu",
        "dtype": "float64",
        "error": "max over elements of |x(t=0) - exact x(t=0)|",
        "orders_fitted_over_steps": list(FIT),
        "problems": result,
        "reconstruction_at_equal_nfe": reconstruction(),
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    for name, row in result.items():
        print(f"{name}: euler order {row['euler_order']:.3f}, rf_solver order {row['rf_solver_order']:.3f}")
    for row in data["reconstruction_at_equal_nfe"]:
        print(f"NFE {row['nfe']} seq {row['image_seq_len']}: rf_solver {row['rf_solver_reconstruction_error']:.2e}, "
              f"euler {row['euler_reconstruction_error']:.2e} ({row['euler_over_rf_solver']:.0f}x)")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
