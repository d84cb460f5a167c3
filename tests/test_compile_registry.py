"""Every registered card under ``torch.compile(fullgraph=True)``: no graph break, and the
compiled layer computes what the eager layer computes (forward, and the gradients of the
input and of every parameter).

On CPU the compile backend is ``aot_eager``: Dynamo traces the whole forward (a graph break
fails ``fullgraph``) and AOTAutograd traces forward and backward, without Inductor's code
generation, so the 31 cards compile in well under a minute. The CUDA variant runs the same
check with the default backend (Inductor).
"""

import pytest
import torch

import attnkit

SMALL = {"window": 5, "sink_tokens": 2, "keep_keys": 6, "block_size": 4, "local_blocks": 2, "vert_stride": 4,
         "max_len": 64}

# cards that fail in files this test does not fix: strict, so that a fix shows up
GRAPH_BREAKS: dict[str, str] = {}
# fails on CPU only (none today; dma's softplus backward once did under torch 2.13)
CPU_FAILURES: dict[str, str] = {}

NAMES = [c.name for c in attnkit.mechanisms()]


def build(name, device):
    card = attnkit.get(name)
    accepted = card.accepted_options()
    options = {k: v for k, v in SMALL.items() if k in accepted or k in card.defaults}
    torch.manual_seed(0)
    layer = card.build(32, 4, **options).to(device)
    with torch.no_grad():  # parameters that start at zero would hide a difference
        for p in layer.parameters():
            if p.dim() >= 1 and p.abs().max() == 0:
                p.normal_(0, 0.5)
    return layer


def check_compiled_equals_eager(name, device, backend, **tol):
    layer = build(name, device)
    torch._dynamo.reset()  # one card's compiled code must not count towards the next one's recompile limit
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    x = torch.randn(2, 16, 32, device=device)
    x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_eager, y_compiled = layer(x_eager), compiled(x_compiled)
    torch.testing.assert_close(y_compiled, y_eager, **tol)
    g = torch.randn_like(y_eager)
    params = [p for p in layer.parameters() if p.requires_grad]
    names = ["x"] + [n for n, p in layer.named_parameters() if p.requires_grad]
    eager = torch.autograd.grad(y_eager, [x_eager, *params], g, allow_unused=True)
    fast = torch.autograd.grad(y_compiled, [x_compiled, *params], g, allow_unused=True)
    for n, a, b in zip(names, eager, fast):
        assert (a is None) == (b is None), n
        if a is not None:
            torch.testing.assert_close(b, a, msg=lambda m: f"{name}: gradient of {n}: {m}", **tol)


def cases(failures, marks=()):
    return [pytest.param(n, marks=[*marks, *([pytest.mark.xfail(reason=failures[n], strict=True)]
                                            if n in failures else [])]) for n in NAMES]


@pytest.mark.parametrize("name", cases({**GRAPH_BREAKS, **CPU_FAILURES}))
def test_card_compiles_fullgraph_cpu(name):
    check_compiled_equals_eager(name, "cpu", "aot_eager")


@pytest.mark.parametrize("name", cases(GRAPH_BREAKS, marks=[pytest.mark.cuda]))
def test_card_compiles_fullgraph_cuda(name):
    check_compiled_equals_eager(name, "cuda", "inductor", atol=2e-4, rtol=2e-4)


def test_every_card_is_checked():
    assert len(NAMES) == len(set(NAMES)) >= 31
    assert set(GRAPH_BREAKS) | set(CPU_FAILURES) <= set(NAMES)
