"""S2 through FlexAttention on natural against reordered keys (issue 6's S2 targets).

``attend`` runs S2 self-attention on keys reordered per KV head, stripe blocks first
(:meth:`attnkit.patterns.S2Strided.key_order`), so that FlexAttention visits 128 x 128 blocks
instead of S2's 64-token ones. This times both orders in one process, next to dense causal SDPA
(the 8x target's baseline) and dense causal FlexAttention (the realised-fraction baseline),
training steps (forward + backward) or forwards alone. CUDA only.

    PYTHONPATH=src python benchmarks/s2_order.py --seq 32768,131072 --out s2-order.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from cuda_timing import save_results, timed, training_step

from attnkit import patterns
from attnkit.ops import attend
from attnkit.ops import attention as attention_module
from attnkit.registry import dense_attention_flops

#: name -> (permute_keys, extra FLEX_KERNEL_OPTIONS)
VARIANTS = {
    "natural": (False, {}),
    "reordered": (True, {}),
    "reordered-no-tma": (True, {"USE_TMA": False}),
    "reordered-tile128": (True, {"BLOCK_M": 128, "BLOCK_N": 128}),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq", default="32768,131072")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--variants", default="natural,reordered", help=f"of {', '.join(VARIANTS)}")
    p.add_argument("--mode", default="fwdbwd", choices=("fwd", "fwdbwd"))
    p.add_argument("--pattern", default="64:16:16", help="block_size:local_blocks:vert_stride")
    p.add_argument("--no-flex", dest="flex", action="store_false", help="skip dense FlexAttention (slow to compile)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    rows = []
    for T in (int(s) for s in a.seq.split(",")):
        run_shape(a, T, rows)
        save_results(a.out, rows)  # after each shape: a timeout keeps what was measured
        torch.cuda.empty_cache()
    save_results(a.out, rows)
    if not a.out:
        print(json.dumps(rows, indent=1))


def run_shape(a, T: int, rows: list) -> None:
    H, D = a.heads, a.head_dim
    bs, local, stride = (int(x) for x in a.pattern.split(":"))
    q, k, v = (torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=a.mode == "fwdbwd")
               for _ in range(3))
    g = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16)

    def step(fn):
        if a.mode == "fwdbwd":
            return training_step(fn, (q, k, v), g)
        return lambda: fn()

    def record(name, fn, **extra):
        t0 = time.perf_counter()
        try:
            ms = timed(step(fn), a.repeat)
        except Exception as err:  # noqa: BLE001 - report and go on
            print(f"T={T} {name}: {type(err).__name__}: {str(err)[:300]}", flush=True)
            rows.append({"seq": T, "path": name, "error": f"{type(err).__name__}: {str(err)[:300]}"})
            return None
        rows.append({"seq": T, "path": name, "mode": a.mode, "ms": ms, "first_call_s": time.perf_counter() - t0, **extra})
        print(f"T={T} {name:22s} {ms:9.3f} ms  (first calls {time.perf_counter() - t0:.0f} s)", flush=True)
        return ms

    sdpa_ms = record("dense-sdpa", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    flex_ms = record("dense-flex", lambda: attend(q, k, v, pattern="causal", backend="flex")) if a.flex else None
    s2 = patterns.s2_strided(num_heads=H, block_size=bs, local_blocks=local, vert_stride=stride)
    dense_flops = dense_attention_flops(1, T, num_heads=H, head_dim=D, pattern=patterns.causal())
    reduction = dense_flops / dense_attention_flops(1, T, num_heads=H, head_dim=D, pattern=s2)
    for name in a.variants.split(","):
        permute, options = VARIANTS[name]
        s2.permute_keys = permute
        attention_module.FLEX_KERNEL_OPTIONS = dict(options)
        try:
            ms = record(f"s2-{name}", lambda: attend(q, k, v, pattern=s2, backend="flex"))
        finally:
            attention_module.FLEX_KERNEL_OPTIONS = {}
        if ms is not None:
            row = rows[-1]
            row.update(flop_reduction=reduction, speedup_vs_dense_sdpa=sdpa_ms / ms if sdpa_ms else None,
                       realised_fraction_vs_flex=flex_ms / ms / reduction if flex_ms else None)
            print(f"    {row['speedup_vs_dense_sdpa']:.2f}x over SDPA; realises "
                  f"{row['realised_fraction_vs_flex'] or float('nan'):.2f} of its {reduction:.2f}x over dense flex",
                  flush=True)


if __name__ == "__main__":
    main()
