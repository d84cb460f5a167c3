"""What does ``attnkit.hf`` add to a model's own SDPA attention, and what does the head-wise cache save?

Issue 22's targets, on random weights of a real model shape (speed does not need trained weights):

- ``full`` (every head attends to every key, through ``attnkit.attend``) adds <= 3 % to prefill and
  to per-token decode against the same model on transformers' own ``sdpa``;
- a head-wise cache with half of the KV heads on sink 64 + window 256 (DuoAttention's split)
  decodes faster than the full cache at 32k and 64k and holds at most 0.55 of its KV bytes.

Three copies of one model (same weights): ``sdpa`` (the model as loaded), ``full`` and ``headwise``
(each under ``attnkit.hf.apply``). Every round times one call of each, in rotating order, and the
ratio to ``sdpa`` is the median of the per-round ratios (as ``attnkit bench`` does), so load drift
on the machine hits all three alike. Prefill: one forward of the whole context without a cache.
Decode: the cache holds the context, then one token per call. KV bytes: the tensors each cache
holds after the context.

    python benchmarks/hf_overhead.py --shape llama-3.2-1b --seq 8192,32768,65536 --out h200/hf-overhead.json
    python benchmarks/hf_overhead.py --shape tiny --device cpu --seq 256 --rounds 3   # a dry run
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from cuda_timing import save_results

SHAPES = {  # LlamaConfig fields of the published models (random weights); tiny: a CPU dry run
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, intermediate_size=8192, vocab_size=128256, rope_theta=500000.0),
    "llama-3.1-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, intermediate_size=14336, vocab_size=128256, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=128, vocab_size=256),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def dynamic_cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def profile_decode(models, caches, token, device) -> None:
    """Print where 3 decode calls of each variant spend their time (torch.profiler, top 10 operators)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name, model in models.items():
        sync(device)
        with profile(activities=activities) as prof:
            for _ in range(3):
                model(token, past_key_values=caches[name], use_cache=True)
            sync(device)
        print(f"--- profile: 3 decode calls of {name} (sorted by {sort})")
        print(prof.key_averages().table(sort_by=sort, row_limit=10, max_name_column_width=60))
        if device.type == "cuda":
            print(f"--- profile: 3 decode calls of {name} (sorted by self_cpu_time_total)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=60))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-3.2-1b", choices=list(SHAPES), help="model shape (default: llama-3.2-1b)")
    p.add_argument("--layers", type=int, default=None, help="keep only this many layers (default: all of the shape's)")
    p.add_argument("--seq", default="8192,32768,65536", help="comma-separated context lengths (default: 8192,32768,65536)")
    p.add_argument("--device", default="cuda", help="cuda | cpu (default: cuda)")
    p.add_argument("--rounds", type=int, default=15, help="timed rounds per measurement, each one call per variant (default: 15)")
    p.add_argument("--sink", type=int, default=64, help="sink tokens of the streaming heads (default: 64)")
    p.add_argument("--window", type=int, default=256, help="window of the streaming heads (default: 256)")
    p.add_argument("--out", default=None, help="JSON path for the rows (default: print only)")
    p.add_argument("--profile", action="store_true",
                   help="after the timings, profile 3 decode calls of each variant at the last --seq and print the "
                        "top operators by device and host time (where a decode step's time goes)")
    args = p.parse_args()
    seqs = [int(s) for s in args.seq.split(",")]
    if args.rounds < 1 or any(s < 1 for s in seqs) or (args.layers is not None and args.layers < 1):
        p.error("--rounds, --layers and every --seq length must be positive")

    import transformers
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    import attnkit.hf as hf

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = dict(SHAPES[args.shape])
    if args.layers is not None:
        shape["num_hidden_layers"] = args.layers
    config = LlamaConfig(**shape, max_position_embeddings=max(seqs) + 64, attn_implementation="sdpa")
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(device, dtype).eval()
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    half = [[h % 2 == 0 for h in range(kv_heads)] for _ in range(layers)]  # half of each layer's KV heads full
    models = {"sdpa": base, "full": copy.deepcopy(base), "headwise": copy.deepcopy(base)}
    handles = {"full": hf.apply(models["full"], "full"),
               "headwise": hf.apply(models["headwise"], hf.Headwise(full_heads=half, sink=args.sink, window=args.window))}
    print(f"{args.shape}: {layers} layers, {config.num_attention_heads} query / {kv_heads} KV heads of "
          f"{config.head_dim}, {dtype}, {device}; transformers {transformers.__version__}, torch {torch.__version__}")

    def new_cache(name):
        return handles[name].cache() if name == "headwise" else DynamicCache()

    rows = []
    with torch.no_grad():
        for seq in seqs:
            ids = torch.randint(0, config.vocab_size, (1, seq), device=device)
            token = torch.randint(0, config.vocab_size, (1, 1), device=device)
            caches = {}
            for name, model in models.items():  # the context in each cache (also the warm-up)
                caches[name] = new_cache(name)
                model(ids, past_key_values=caches[name], use_cache=True, logits_to_keep=1)
            names = list(models)
            prefill = {n: [] for n in names}
            decode = {n: [] for n in names}
            for r in range(args.rounds):
                order = names[r % 3:] + names[: r % 3]
                for n in order:
                    sync(device)
                    start = time.perf_counter()
                    models[n](ids, use_cache=False, logits_to_keep=1)  # as generate() prefills: last logits only
                    sync(device)
                    prefill[n].append(time.perf_counter() - start)
                for n in order:
                    sync(device)
                    start = time.perf_counter()
                    models[n](token, past_key_values=caches[n], use_cache=True)
                    sync(device)
                    decode[n].append(time.perf_counter() - start)
            full_bytes = dynamic_cache_bytes(caches["sdpa"])
            for n in names:
                kv = dynamic_cache_bytes(caches[n]) if n != "headwise" else caches[n].nbytes()
                row = {"shape": args.shape, "layers": layers, "seq": seq, "variant": n,
                       "prefill_ms": 1e3 * statistics.median(prefill[n]), "decode_ms": 1e3 * statistics.median(decode[n]),
                       "prefill_vs_sdpa": statistics.median(a / b for a, b in zip(prefill[n], prefill["sdpa"])),
                       "decode_vs_sdpa": statistics.median(a / b for a, b in zip(decode[n], decode["sdpa"])),
                       "kv_bytes": kv, "kv_vs_full": kv / full_bytes}
                rows.append(row)
                print(f"seq {seq:6d} {n:9s} prefill {row['prefill_ms']:9.2f} ms ({row['prefill_vs_sdpa']:.3f}x sdpa)  "
                      f"decode {row['decode_ms']:8.3f} ms ({row['decode_vs_sdpa']:.3f}x)  KV {kv / 2**20:9.1f} MiB "
                      f"({row['kv_vs_full']:.3f} of full)", flush=True)
            if args.profile and seq == seqs[-1]:
                profile_decode(models, caches, token, device)
            del caches
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for handle in handles.values():
        handle.remove()
    if device.type == "cuda":
        save_results(args.out, rows)
    elif args.out:
        print("(--out is written on CUDA runs only: the file records the GPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
