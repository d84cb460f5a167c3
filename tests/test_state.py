"""Decode states: ``reset()`` returns a state to the condition it was built in (every registered
mechanism: tests/layers/test_state_reset.py)."""

import pytest
import torch

from attnkit.state import KVCache, RecurrentState, SinkWindowCache, State

def test_kv_cache_reset_forgets_tokens():
    cache = KVCache(1, 2, 4)
    cache.update(torch.randn(1, 2, 300, 4), torch.randn(1, 2, 300, 4))  # grows past 256
    cache.reset()
    assert cache.offset == 0 and cache.keys.shape[2] == 0 and cache.nbytes() == 0
    k = torch.randn(1, 2, 3, 4)
    keys, _ = cache.update(k, k)
    torch.testing.assert_close(keys, k)


def test_sink_window_cache_reset_restores_slots():
    cache = SinkWindowCache(1, 1, 2, sink_tokens=1, window=2)
    for t in range(5):
        cache.update(torch.full((1, 1, 1, 2), float(t)), torch.full((1, 1, 1, 2), float(t)))
    cache.reset()
    assert cache.offset == 0 and (cache._slot_positions == -1).all() and cache._last_positions is None
    k = torch.randn(1, 1, 3, 2)
    keys, _ = cache.update(k, k)  # a first chunk after reset: its own keys only
    torch.testing.assert_close(keys, k)


def test_recurrent_state_reset_restores_built_values_not_the_passed_tensors():
    kv = torch.zeros(2, 3)
    state = RecurrentState(kv=kv, m=torch.full((2,), float("-inf")), w=torch.arange(4.0))
    state["kv"].add_(5.0)  # in place: the tensor given to the constructor changes too
    state["m"] = torch.zeros(2)
    state["w"].mul_(0)
    state.offset = 7
    state.reset()
    assert state.offset == 0
    assert (state["kv"] == 0).all() and (state["m"] == float("-inf")).all()
    torch.testing.assert_close(state["w"], torch.arange(4.0))


def test_reset_removes_attributes_added_after_construction():
    class Tail(KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.tail = None

    cache = Tail(1, 1, 2)
    cache.tail = torch.ones(3)
    cache.extra = torch.ones(3)
    cache.reset()
    assert cache.tail is None and not hasattr(cache, "extra")


def test_reset_of_a_plain_state():
    state = State()
    state.offset = 4
    state.reset()
    assert state.offset == 0


@pytest.mark.cuda
def test_reset_keeps_a_cache_on_the_device_its_inputs_moved_it_to():
    cache = SinkWindowCache(1, 1, 2, sink_tokens=1, window=2)  # built on the CPU
    for t in range(4):
        cache.update(torch.randn(1, 1, 1, 2, device="cuda"), torch.randn(1, 1, 1, 2, device="cuda"))
    cache.reset()
    assert cache._slot_positions.is_cuda
    k = torch.randn(1, 1, 3, 2, device="cuda")
    keys, _ = cache.update(k, k)
    torch.testing.assert_close(keys, k)
