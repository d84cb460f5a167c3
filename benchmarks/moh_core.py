"""Mixture-of-Head attention's core against MHA's, on one GPU (issue 5's MoH target).

Times the attention core alone (after the projections, before W_o): MHA through ``attend``
(cuDNN / FlashAttention through SDPA) against :class:`attnkit.layers.MixtureOfHeadsAttention`'s
``core`` (shared heads through ``attend``, each routed head on only the tokens that picked it),
with the routing of a freshly initialised router on random inputs (about balanced). Two
routed paths (``--paths``): ``picked``, cuDNN on dense rectangles
(:mod:`attnkit.ops.softmax.picked_causal`, what the layer picks when the cuDNN frontend is
installed) and ``flex``, gathered rows through FlexAttention (its fallback). Also times the
routed heads alone on each path, and the flex path's block mask. CUDA only.

    PYTHONPATH=src python benchmarks/moh_core.py --seq 8192,32768 --out moh-core.json
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
    a = p.parse_args()
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


if __name__ == "__main__":
    main()
