"""cuDNN SDPA's bf16 backward against float64, by head dim and layout (one subprocess per case).

Written when the diffusion subject's bf16 training on the H200 went NaN under PyTorch's default SDPA
choice (cuDNN on Hopper) and trained cleanly with flash, memory-efficient or math attention. This
probe times nothing: it compares outputs and all three gradients of cuDNN, flash and attnkit's
``attend`` (auto) with a float64 reference at B=2, H=4, T=600, head dims 16-256, contiguous
(B, H, T, D) and transposed (B, T, H, D) layouts, causal and full. Measured: every case agrees to
~2.5e-3 (bf16 rounding), so the subject's failure needs FLUX's own shapes (joint text + image
sequence of 26-266 tokens) and was not reproduced in isolation; the subject trains without cuDNN.

    python3 benchmarks/cudnn_backward_probe.py   # -> cudnn-backward-probe.json and a table, on a CUDA machine
"""
import json, subprocess, sys, torch
import torch.nn.functional as F

def one(D, layout):
    from torch.nn.attention import sdpa_kernel, SDPBackend
    import attnkit
    from attnkit.ops.softmax.dispatch import attend
    res = []
    for causal in (False, True):
        torch.manual_seed(0)
        B, H, T = 2, 4, 600
        if layout == "bshd":
            mk = lambda: torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
        else:
            mk = lambda: torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16).requires_grad_()
        q, k, v = mk(), mk(), mk()
        go = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = F.scaled_dot_product_attention(q64, k64, v64, is_causal=causal)
        ref.backward(go.double())
        refs = [ref.detach(), q64.grad, k64.grad, v64.grad]
        for name in ("cudnn", "flash", "attnkit-auto"):
            q.grad = k.grad = v.grad = None
            try:
                if name == "attnkit-auto":
                    out = attend(q, k, v, pattern="causal" if causal else None)
                else:
                    be = SDPBackend.CUDNN_ATTENTION if name == "cudnn" else SDPBackend.FLASH_ATTENTION
                    with sdpa_kernel([be]):
                        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                out.backward(go)
                torch.cuda.synchronize()
                errs = [float((a.double() - r).norm() / r.norm()) for a, r in zip([out, q.grad, k.grad, v.grad], refs)]
                res.append(dict(D=D, layout=layout, causal=causal, kernel=name, out=errs[0], dq=errs[1], dk=errs[2], dv=errs[3]))
            except Exception as e:
                res.append(dict(D=D, layout=layout, causal=causal, kernel=name, error=f"{type(e).__name__}: {str(e)[:120]}"))
                if "illegal" in str(e): break
    print(json.dumps(res))

if __name__ == "__main__":
    if len(sys.argv) > 1:
        one(int(sys.argv[1]), sys.argv[2]); sys.exit(0)
    rows = []
    for D in (16, 32, 40, 48, 64, 80, 96, 128, 256):
        for layout in ("bhsd", "bshd"):
            p = subprocess.run([sys.executable, __file__, str(D), layout], capture_output=True, text=True, timeout=120)
            line = [l for l in p.stdout.splitlines() if l.startswith("[")]
            if line: rows += json.loads(line[-1])
            else: rows.append(dict(D=D, layout=layout, error="crashed: " + p.stderr[-300:]))
    for r in rows:
        if "error" in r: print(r)
        else: print(f"D={r['D']:4d} {r['layout']} causal={r['causal']!s:5} {r['kernel']:13s} out {r['out']:.2e} dq {r['dq']:.2e} dk {r['dk']:.2e} dv {r['dv']:.2e}")
    with open('cudnn-backward-probe.json', 'w') as f:
        json.dump(rows, f)
