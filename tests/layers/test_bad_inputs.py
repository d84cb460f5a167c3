"""Every registered mechanism answers bad inputs with a ValueError that says what to do: a
decode state from another mechanism, for another batch size or another width, integer or
mismatched-dtype ``x``, an empty batch."""

import pytest
import torch

import attnkit
from attnkit.state import KVCache

from test_every_mechanism import build  # the shared small configurations

NAMES = [c.name for c in attnkit.mechanisms()]
DECODING = [n for n in NAMES if attnkit.get(n).capabilities.decode]

#: layers whose forward does not yet pass itself and its state to check_input (files owned
#: elsewhere): the one-line change each needs, in layers/<file>.py
NEEDS_ONE_LINER: dict[str, str] = {}  # every layer calls check_input(x, dim, self, state) now


def _pending(name, *checks):
    """xfail(strict) where ``name`` needs its one-liner for one of ``checks``."""
    if name in NEEDS_ONE_LINER and name in checks:
        return [pytest.mark.xfail(strict=True, reason=f"needs {NEEDS_ONE_LINER[name]}")]
    return []


def _cases(names, *pending):
    return [pytest.param(n, marks=_pending(n, *pending)) for n in names]


def _foreign_state(name, batch):
    """A state of another mechanism, of another class than ``name``'s own."""
    own = type(build(name).init_state(batch)) if attnkit.get(name).capabilities.decode else None
    for other in ("lightning", "mha", "flow"):
        state = build(other).init_state(batch)
        if type(state) is not own:
            return state
    raise AssertionError("no foreign state")


@pytest.mark.parametrize("name", _cases(NAMES, "lightning", "chronos2-group"))
def test_state_of_another_mechanism(name):
    layer = build(name)
    with pytest.raises(ValueError, match="state|decode"):
        layer(torch.randn(2, 5, 32), _foreign_state(name, 2))


#: states that hold nothing per sequence (a token counter) cannot know a batch size or width
STATELESS = {"no-mixing", "chronos2-group"}


@pytest.mark.parametrize("name", _cases([n for n in DECODING if n not in STATELESS], "lightning"))
def test_state_for_another_batch_size(name):
    layer = build(name)
    with pytest.raises(ValueError, match=r"init_state\(2\)"):
        layer(torch.randn(2, 5, 32), layer.init_state(3))


@pytest.mark.parametrize("name", _cases([n for n in DECODING if n not in STATELESS], "lightning"))
def test_state_for_another_width(name):
    """A state that the same mechanism built at another width (head dim 16, not 8)."""
    layer = build(name)
    other = build(name, dim=64, heads=4)
    with pytest.raises(ValueError, match="init_state"):
        layer(torch.randn(2, 5, 32), other.init_state(2))


@pytest.mark.parametrize("name", NAMES)
def test_integer_x(name):
    with pytest.raises(ValueError, match="floating-point"):
        build(name)(torch.randint(0, 5, (2, 5, 32)))


@pytest.mark.parametrize("name", _cases(NAMES, "lightning", "chronos2-group"))
def test_bfloat16_x_into_a_float32_layer(name):
    with pytest.raises(ValueError, match=r"x\.to\(torch\.float32\)"):
        build(name)(torch.randn(2, 5, 32, dtype=torch.bfloat16))


@pytest.mark.parametrize("name", NAMES)
def test_empty_batch(name):
    with pytest.raises(ValueError, match="B=0"):
        build(name)(torch.randn(0, 5, 32))


@pytest.mark.parametrize("name", ["mha", "agent-causal", "flow", "moh"])
def test_autocast_lets_a_bfloat16_x_through(name):
    """Under autocast the projections run in bf16 on fp32 weights: not a dtype mismatch."""
    layer = build(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(2, 5, 32, dtype=torch.bfloat16))
    assert y.shape == (2, 5, 32)


def test_a_good_state_is_checked_once_and_rechecked_after_reset():
    layer = build("mha")
    state = layer.init_state(2)
    layer(torch.randn(2, 3, 32), state)
    assert (id(layer), 2) in state._fits
    state.reset()
    assert not hasattr(state, "_fits")
    layer(torch.randn(2, 1, 32), state)


def test_a_state_that_is_not_a_state():
    with pytest.raises(ValueError, match="decode state from MultiHeadAttention.init_state"):
        build("mha")(torch.randn(2, 3, 32), {"kv": torch.zeros(1)})


def test_a_decode_state_given_to_a_bidirectional_layer():
    with pytest.raises(ValueError, match="does not decode"):
        build("agent")(torch.randn(2, 16, 32), KVCache(2, 4, 8))
