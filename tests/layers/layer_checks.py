"""Checks every mechanism's tests share: decode == full forward, fast == reference."""

import torch


def decode_in_chunks(layer, x, chunks, **kwargs):
    """Feed ``x`` through one decode state in chunks of the given sizes; concatenated outputs."""
    state = layer.init_state(x.shape[0])
    outs, start = [], 0
    for n in chunks:
        outs.append(layer(x[:, start : start + n], state, **kwargs))
        start += n
    assert start == x.shape[1] and state.offset == x.shape[1]
    return torch.cat(outs, dim=1)


def assert_forward_and_grads_match(layer, reference_fn, x, *, params_of=None, **tol):
    """``layer(x)`` against ``reference_fn(x)`` (same parameters): output, input and every
    parameter gradient (of ``params_of``, default ``layer``; ``layer`` may be any callable)."""
    module = layer if params_of is None else params_of
    x = x.detach().requires_grad_()
    y, y_ref = layer(x), reference_fn(x)
    torch.testing.assert_close(y, y_ref, **tol)
    g = torch.randn_like(y)
    params = [p for p in module.parameters() if p.requires_grad]
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(y, [x, *params], g, allow_unused=True)
    ref_grads = torch.autograd.grad(y_ref, [x, *params], g, allow_unused=True)
    for name, a, b in zip(["x", *names], grads, ref_grads):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}", **tol)
