"""Which settings make DMA's CUDA fast path disagree with its float64 reference in the gradients?

The CUDA suite's ``test_cuda_fast_path_matches_reference[dma]`` (dim 256, 4 heads, keep_keys=6,
T=300) fails on the H200 with the gradient of ``qkv_proj.weight`` off by a relative 0.21, while
``tests/layers/test_dynamic_mask.py``'s CUDA test (2 KV heads, keep_keys=64) passes and the same
layer without selection (keep_keys=2048 > T) matched to 7e-7. This prints the relative error of
the output and of every gradient for a grid of settings, each in a fresh layer, so one run says
which setting breaks it: keep_keys (selection on or off), KV heads (GQA group), the FlexAttention
score_mod's captured bias (differentiated by FlexAttention) and the mask's copy of it.

    python benchmarks/dma_grad_check.py              # on a CUDA machine
"""

from __future__ import annotations

import argparse
import itertools

import torch

import attnkit


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-30))


def check(keep_keys: int, num_kv_heads: int, seq: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    fast = attnkit.build("dma", dim=256, num_heads=4, num_kv_heads=num_kv_heads, keep_keys=keep_keys).cuda()
    ref = attnkit.build("dma", dim=256, num_heads=4, num_kv_heads=num_kv_heads, keep_keys=keep_keys,
                        backend="reference").cuda().double()
    with torch.no_grad():  # as the test: parameters that start at zero (A) get values
        for p in fast.parameters():
            if p.abs().max() == 0 and p.dim() >= 1:
                p.normal_(0, 0.5)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, seq, 256, device="cuda")
    y, y_ref = fast(x), ref(x.double())
    g = torch.randn_like(y_ref)
    y.backward(g.float())
    y_ref.backward(g)
    out = {"out": relative(y, y_ref)}
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        out[name] = relative(a.grad, b.grad)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=300)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    for keep, kv in itertools.product((6, 64, 2048), (4, 2, 1)):
        errors = check(keep, kv, args.seq)
        print(f"keep_keys={keep:5d} kv_heads={kv}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()), flush=True)


if __name__ == "__main__":
    main()
