"""What does each attnkit.diffusion sharing method cost over the plain processor? (issue 26, speed)

A random-weight transformer shaped like FLUX.1-dev's blocks (width 3072, 24 heads of 128, RoPE
axes 16 / 56 / 56; one double-stream and one single-stream block), bf16 on CUDA, at 1024x1024
images (4,096 image tokens after FLUX's 2x2 packing of the 128x128 latent) and 512 text tokens,
a batch of ``--batch`` images (row 0 the reference). Per method: the time of the attention modules
(CUDA events around each attention module's forward, summed over the blocks; the median of
``--repeat`` forwards) against the stock processor's, and the ratio of (query, key) pairs the
method attends (counted from the attention calls) against the stock's. Sharing N images makes a
target attend more keys: that cost is expected, overhead beyond it is not; the target is
``time ratio <= 1.10 x pair ratio``.

    PYTHONPATH=src python benchmarks/diffusion_speed.py --out benchmarks/results/h200/diffusion-speed.json
    PYTHONPATH=src python benchmarks/diffusion_speed.py --device cpu --tiny   # a dry run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


def methods(grid: int, batch: int):
    """(label, builder) of every method at sizes that fit a ``grid x grid`` image and the batch."""
    import attnkit.diffusion as ad

    h = grid
    box = (h // 4, h // 4, h // 2, h // 2)  # a quarter of the image
    moved = (h // 2, h // 2, 3 * h // 4, 3 * h // 4)
    mask = torch.zeros(h, h, dtype=torch.bool)
    mask[box[0]:box[2], box[1]:box[3]] = True
    return [
        ("shared-kv", lambda: ad.SharedAttention(reference=0)),
        ("shared-kv+adain", lambda: ad.SharedAttention(reference=0, adain=True)),
        ("alignedgen", lambda: ad.build("alignedgen", reference=0, blocks=None)),
        ("freecus", lambda: ad.build("freecus", reference=0, mask=mask, blocks=None)),
        ("ir-diffusion", lambda: ad.build("ir-diffusion", references=(0,), target_row=1, reference_masks=(box,),
                                          target_masks=(moved,))),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=2, help="images, row 0 the reference (default: 2)")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help="a small model and image (a dry run)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.batch < 2 or a.repeat < 1:
        p.error("--batch must be >= 2 (a reference and a target) and --repeat >= 1")
    from diffusers import FluxTransformer2DModel

    import attnkit.diffusion as ad
    from attnkit.diffusion.sharing import AttnCall

    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if a.tiny:
        cfg = dict(attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                   axes_dims_rope=[4, 4, 8], in_channels=4)
        grid, text = 8, 8
    else:  # FLUX.1-dev's block shapes
        cfg = dict(attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                   axes_dims_rope=[16, 56, 56], in_channels=64)
        grid, text = 64, 512
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, num_layers=1, num_single_layers=1, **cfg).to(device, dtype).eval()
    B, N = a.batch, grid * grid
    ids = torch.zeros(grid, grid, 3, device=device)
    ids[..., 1] = torch.arange(grid, device=device)[:, None]
    ids[..., 2] = torch.arange(grid, device=device)[None, :]
    inputs = dict(hidden_states=torch.randn(B, N, cfg["in_channels"], device=device, dtype=dtype),
                  encoder_hidden_states=torch.randn(B, text, cfg["joint_attention_dim"], device=device, dtype=dtype),
                  pooled_projections=torch.randn(B, cfg["pooled_projection_dim"], device=device, dtype=dtype),
                  timestep=torch.full((B,), 0.5, device=device, dtype=dtype), img_ids=ids.reshape(-1, 3),
                  txt_ids=torch.zeros(text, 3, device=device), return_dict=False)
    modules = [m for _, m in ad.attention_modules(model)]
    S = text + N

    # timing and pair counting around each attention module
    pairs = [0]
    seen = [False]
    events = []

    def pre(module, args, kwargs):
        seen[0] = False
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            events.append([start, None])
        else:
            events.append([time.perf_counter(), None])

    def post(module, args, kwargs, out):
        if not seen[0]:
            pairs[0] += B * S * S  # the stock processor ran
        if device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            events[-1][1] = end
        else:
            events[-1][1] = time.perf_counter()

    original_attend = AttnCall.attend

    def counting_attend(self, q=None, k=None, v=None, **kw):
        seen[0] = True
        qq, kk = (self.q if q is None else q), (self.k if k is None else k)
        pairs[0] += qq.shape[0] * qq.shape[2] * kk.shape[2]
        return original_attend(self, q, k, v, **kw)

    hooks = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in modules]
    hooks += [m.register_forward_hook(post, with_kwargs=True) for m in modules]
    AttnCall.attend = counting_attend

    def measure(label):
        times = []
        with torch.no_grad():
            for r in range(a.repeat + 2):
                events.clear()
                pairs[0] = 0
                model(**inputs)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    ms = sum(s.elapsed_time(e) for s, e in events)
                else:
                    ms = 1e3 * sum(e - s for s, e in events)
                if r >= 2:
                    times.append(ms)
        return statistics.median(times), pairs[0]

    rows = []
    try:
        plain_ms, plain_pairs = measure("plain")
        rows.append({"method": "plain", "attention_ms": plain_ms, "time_ratio": 1.0, "pair_ratio": 1.0})
        print(f"{'plain':18s} {plain_ms:9.3f} ms", flush=True)
        for label, build in methods(grid, B):
            with ad.apply(model, build()) as handle:
                ms, n = measure(label)
                calls = handle.calls
            row = {"method": label, "attention_ms": ms, "time_ratio": ms / plain_ms, "pair_ratio": n / plain_pairs,
                   "calls_per_forward": calls / (a.repeat + 2)}
            row["overhead"] = row["time_ratio"] / row["pair_ratio"]
            row["within_target"] = row["overhead"] <= 1.10
            rows.append(row)
            print(f"{label:18s} {ms:9.3f} ms  time x{row['time_ratio']:.3f}  pairs x{row['pair_ratio']:.3f}  "
                  f"time / pairs {row['overhead']:.3f}", flush=True)
    finally:
        AttnCall.attend = original_attend
        for h in hooks:
            h.remove()
    record = {"command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "shape": {"batch": B, "image_tokens": N, "text_tokens": text, **cfg},
              "rows": rows}
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
