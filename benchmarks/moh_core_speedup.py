"""How much faster is Mixture-of-Head attention's core than MHA's? On one GPU (issue 5's MoH target: 1.5x).

Times the attention core alone (after the projections, before W_o): MHA through ``attend``
(cuDNN / FlashAttention through SDPA) against :class:`attnkit.layers.MixtureOfHeadsAttention`'s
``core`` (shared heads through ``attend``, each routed head on only the tokens that picked it),
with the routing of a freshly initialised router on random inputs (about balanced). Two
routed paths (``--paths``): ``picked``, cuDNN on dense rectangles
(:mod:`attnkit.ops.softmax.picked_causal`, what the layer picks when the cuDNN frontend is
installed) and ``flex``, gathered rows through FlexAttention (its fallback). Also times the
routed heads alone on each path, and the flex path's block mask. CUDA only.

    PYTHONPATH=src python benchmarks/moh_core_speedup.py --seq 32768 --shared 4,0 --paths picked,picked-serial,flex \\
        --out benchmarks/results/h200/moh-core.json --plot benchmarks/results/h200/moh-core.png
    python benchmarks/moh_core_speedup.py --replot benchmarks/results/h200/moh-core.json   # the chart alone
"""

from __future__ import annotations

import argparse
import json

import torch

from attnkit import patterns
from attnkit.layers import MixtureOfHeadsAttention
from attnkit.ops import attend
from attnkit.ops.softmax import flex as attention_module
from attnkit.layers import mixture_of_heads as moh_module
from attnkit.ops.softmax import picked_causal
from attnkit.ops.softmax.flex import block_mask_for
from cuda_timing import save_results, timed


def plot(result: dict, out: str, target: float) -> None:
    """Bar chart: one group per (MoH configuration, mode), one bar per routed path (speedup over
    MHA's core in the same call), beside the FLOP reduction and the target line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["mechanism"] != "mha"]
    groups = sorted({(r["mechanism"], r["mode"]) for r in rows}, key=lambda g: (g[0], g[1] != "fwd"))
    order = {"picked": 0, "picked-serial": 1, "flex": 2}
    paths = sorted({r["path"] for r in rows}, key=lambda x: order.get(x, 3))
    fig, ax = plt.subplots(figsize=(3 + 2.4 * len(groups), 4.6))
    width = 0.8 / (len(paths) + 1)
    for i, (mechanism, mode) in enumerate(groups):
        cells = {r["path"]: r for r in rows if (r["mechanism"], r["mode"]) == (mechanism, mode)}
        for j, path in enumerate(paths):
            if path in cells:
                x = i + (j - len(paths) / 2) * width
                speedup = cells[path]["speedup_vs_mha"]
                ax.bar(x, speedup, width * 0.9, color=f"C{j}", label=path if i == 0 else None)
                ax.text(x, speedup + 0.02, f"{speedup:.2f}", ha="center", fontsize=8)
        flops = next(iter(cells.values()))["flop_reduction"]
        x = i + (len(paths) / 2) * width
        ax.bar(x, flops, width * 0.9, color="lightgray", label="FLOP reduction" if i == 0 else None)
        ax.text(x, flops + 0.02, f"{flops:.2f}", ha="center", fontsize=8)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(target, color="red", ls="--", lw=1, label=f"target {target}x")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{m.replace('moh ', '')}\n{mode}" for m, mode in groups], fontsize=8)
    ax.set_ylabel("speedup over MHA's core (same call)")
    seq = rows[0]["seq"]
    ax.set_title(f"MoH attention core vs MHA, T={seq}, {result.get('device', '')}", fontsize=9)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)
    ax.legend(fontsize=8, loc="upper center", ncol=len(paths) + 2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq", default="8192,32768")
    p.add_argument("--tokens", type=int, default=32768, help="batch = tokens / seq")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--shared", default="4,0", help="shared-head counts to run (half of the rest active)")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--flex-options", default="{}",
                   help="';'-separated JSON kernel_options sets for the routed heads' FlexAttention "
                        "(attnkit.ops.softmax.flex.FLEX_KERNEL_OPTIONS), each timed in turn, e.g. '{};{\"USE_TMA\": true}'")
    p.add_argument("--paths", default="picked,flex",
                   help="routed-head paths to time: picked (cuDNN, shared heads on a side stream), picked-serial "
                        "(the same, one stream), flex")
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=None, help="PNG bar chart of the speedups (matplotlib)")
    p.add_argument("--target", type=float, default=1.5, help="the speedup line drawn on the chart")
    p.add_argument("--replot", default=None, metavar="JSON",
                   help="draw --plot from a JSON this script wrote, without measuring (any machine)")
    a = p.parse_args()
    if a.replot:
        plot(json.load(open(a.replot)), a.plot or a.replot.rsplit(".", 1)[0] + ".png", a.target)
        return
    option_sets = [json.loads(o) for o in a.flex_options.split(";")]
    real_supports = picked_causal.supports
    H, D = a.heads, a.head_dim
    rows = []
    for T in (int(s) for s in a.seq.split(",")):
        B = max(1, a.tokens // T)
        shape = dict(device="cuda", dtype=torch.bfloat16)
        q, k, v = (torch.randn(B, H, T, D, **shape, requires_grad=True) for _ in range(3))
        g = torch.randn(B, H, T, D, **shape)

        def step(core, backward):
            def run():
                if not backward:
                    with torch.no_grad():
                        return core()
                for t in (q, k, v):
                    t.grad = None
                core().backward(g)
            return run

        mha = lambda: attend(q, k, v, pattern="causal")  # noqa: E731
        for mode in ("fwd", "fwdbwd"):
            mha_ms = timed(step(mha, mode == "fwdbwd"), a.repeat)
            rows.append({"seq": T, "batch": B, "mode": mode, "mechanism": "mha", "ms": mha_ms})
            print(f"T={T} B={B} {mode:6s} mha core {mha_ms:8.2f} ms", flush=True)
        combos = [(int(s), o, path) for s in a.shared.split(",") for path in a.paths.split(",")
                  for o in (option_sets if path == "flex" else [{}])]
        for shared, options, path in combos:
            # the flex path is the layer's fallback when picked_causal does not serve the inputs
            moh_module._picked.supports = real_supports if path.startswith("picked") else (lambda *args: False)
            moh_module.OVERLAP_SHARED_HEADS = path != "picked-serial"  # picked-serial: shared heads on the main stream
            attention_module.FLEX_KERNEL_OPTIONS = dict(options)
            layer = MixtureOfHeadsAttention(H * D, H, shared_heads=shared).to(**shape)
            x = torch.randn(B, T, H * D, **shape)
            with torch.no_grad():
                gates = layer.gates(x)
            active = layer.active_heads

            def moh():
                layer._gates = gates
                return layer.core(q, k, v, patterns.causal(), None)

            picked = gates[1].transpose(1, 2)
            counts = picked.sum(-1)
            M = int(counts.max())
            order = torch.argsort((~picked).to(torch.int8), dim=-1, stable=True)[..., :M]
            valid = torch.arange(M, device="cuda") < counts[..., None]
            query_rows = torch.where(valid, order, torch.full_like(order, -1))
            pattern = patterns.AtQueryPositions(patterns.causal(), query_rows)
            R = H - shared
            mask_ms = timed(lambda: block_mask_for(pattern, B, R, M, T, 0, q.device), a.repeat)
            qr = torch.randn(B, R, M, D, **shape, requires_grad=True)
            kr, vr = k[:, shared:].detach().requires_grad_(), v[:, shared:].detach().requires_grad_()

            qd = q[:, shared:].detach().requires_grad_()

            def routed_call():
                if path == "flex":
                    return attend(qr, kr, vr, pattern=pattern, q_offset=0, backend="flex")
                # picked and picked-serial differ only in where the shared heads run
                return picked_causal.picked_causal_attention(qd, kr, vr, picked, engine="cudnn")

            def routed_only(backward):
                def run():
                    if not backward:
                        with torch.no_grad():
                            return routed_call()
                    for t in (qr, kr, vr, qd):
                        t.grad = None
                    routed_call().sum().backward()
                return run

            for mode in ("fwd", "fwdbwd"):
                ms = timed(step(moh, mode == "fwdbwd"), a.repeat)
                routed_ms = timed(routed_only(mode == "fwdbwd"), a.repeat)
                mha_ms = next(r["ms"] for r in rows if r["seq"] == T and r["mode"] == mode and r["mechanism"] == "mha")
                theory = H / (shared + (H - shared) * active / (H - shared))
                row = {"seq": T, "batch": B, "mode": mode, "mechanism": f"moh shared={shared} active={active}/{R}",
                       "path": path, "ms": ms, "speedup_vs_mha": mha_ms / ms, "flop_reduction": theory,
                       "rows_per_routed_head": M, "routed_alone_ms": routed_ms,
                       "block_mask_ms": mask_ms if path == "flex" else None, "flex_options": options}
                rows.append(row)
                print(f"T={T} B={B} {mode:6s} moh shared={shared} active={active}/{R} {path} {options}: {ms:8.2f} ms "
                      f"= {mha_ms / ms:.2f}x mha (FLOPs {theory:.2f}x); routed heads alone {routed_ms:.2f} ms, "
                      f"block mask {mask_ms:.2f} ms, M={M} of {T}", flush=True)
    save_results(a.out, rows)
    if a.plot:
        plot({"rows": rows, "device": torch.cuda.get_device_name()}, a.plot, a.target)


if __name__ == "__main__":
    main()
