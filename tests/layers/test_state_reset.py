"""Every decoding mechanism: a state reused after ``reset()`` decodes like a fresh one."""

import pytest
import torch

import attnkit

from test_every_mechanism import build  # the shared small configurations

DECODING = [c.name for c in attnkit.mechanisms() if c.capabilities.decode]


def _randomised(layer):
    with torch.no_grad():  # weights that start at zero or as an identity (rcmha's convolution) would hide a leak
        for p in layer.parameters():
            p.add_(torch.randn_like(p), alpha=0.3)
    return layer


@pytest.mark.parametrize("name", DECODING)
def test_reset_state_decodes_like_a_fresh_one(name):
    """A sequence, then reset, then another: the second's outputs equal a fresh state's."""
    layer = _randomised(build(name).double())
    torch.manual_seed(1)
    first, second = torch.randn(2, 9, 32, dtype=torch.float64), torch.randn(2, 7, 32, dtype=torch.float64)
    with torch.no_grad():
        state = layer.init_state(2)
        layer(first[:, :5], state)
        for t in range(5, 9):
            layer(first[:, t : t + 1], state)
        state.reset()
        assert state.offset == 0
        reused = [layer(second[:, :4], state)] + [layer(second[:, t : t + 1], state) for t in range(4, 7)]
        fresh_state = layer.init_state(2)
        fresh = [layer(second[:, :4], fresh_state)] + [layer(second[:, t : t + 1], fresh_state) for t in range(4, 7)]
    torch.testing.assert_close(torch.cat(reused, 1), torch.cat(fresh, 1), rtol=0, atol=0)
    assert state.nbytes() == fresh_state.nbytes()


