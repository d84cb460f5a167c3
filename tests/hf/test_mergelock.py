"""MergeLock (issue 24, item 8): invariance, unlock, keys, bad input, and the restoration attack."""

import copy

import pytest
import torch

pytest.importorskip("attnkit.hf")

from attnkit.hf.mergelock import MergeLockKey, _transform, estimate_key, lock, model_shape, unlock  # noqa: E402

from hf_models import VOCAB, tiny  # noqa: E402

IDS = torch.randint(1, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
BRANCHES = {"gemma3": ("vo",)}  # q_norm/k_norm: no weight transform passes through the QK branch


def _noisy(model, std=0.05, seed=0):
    """Random non-zero weights and biases everywhere (a fresh HF init has zero biases, which would
    hide a bias left untransformed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.randn(p.shape, generator=g) * std).to(p.dtype))
    return model


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.double()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _attention_weight_names(model):
    return [n for n, _ in model.named_parameters() if any(s in n for s in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                           "qkv_proj"))]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "phi3", "gemma3"])
def test_logits_unchanged_fp32(arch):
    model = _noisy(tiny(arch))
    before = _logits(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    branches = BRANCHES.get(arch, ("qk", "vo"))
    lock(model, seed=1, branches=branches)
    after = _logits(model)
    assert (after - before).abs().max() < 1e-4 * before.abs().max()
    # the locked branches' weights really moved (by O(1) relative), everything else is bit-identical
    attention = _attention_weight_names(model)
    moved = (("q_proj", "k_proj", "qkv_proj") * ("qk" in branches)
             + ("v_proj", "o_proj", "qkv_proj") * ("vo" in branches))
    for name, p in model.named_parameters():
        if any(f"{m}.weight" in name for m in moved):
            assert _rel(p.detach().double(), weights[name].double()) > 0.3, name
        elif name not in attention or not any(m in name for m in moved):
            assert torch.equal(p, weights[name]), name


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}),
    ("qwen2", {}),                                                           # q/k/v biases
    ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}),
    ("llama", {"num_key_value_heads": 1}),                                   # MQA: one B, N for all 4 query heads
    ("llama", {"num_key_value_heads": 4}),                                   # MHA
])
def test_invariance_is_exact_in_float64(arch, overrides):
    model = _noisy(tiny(arch, dtype=torch.float64, **overrides))
    before = _logits(model)
    key = lock(model, seed=2, spread=8.0)
    assert key.qk[0].shape == (model.config.num_key_value_heads, 16, 16)
    assert (_logits(model) - before).abs().max() < 1e-10 * before.abs().max()


def test_partial_rotary_gets_a_dense_block_on_the_pass_through_dims():
    model = tiny("phi3", rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    assert model_shape(model)["rotary_dim"] == 8
    b = lock(model, seed=0).qk[0][0]
    assert torch.count_nonzero(b[8:, 8:]) == 64 and torch.count_nonzero(b[:8, 8:]) == 0
    # rotary pairs (i, i + 4): a scaled rotation [[a, -c], [c, a]]
    assert torch.allclose(b[0, 0], b[4, 4]) and torch.allclose(b[0, 4], -b[4, 0]) and b[0, 1] == 0


def test_a_dense_qk_transform_would_break_rope_models():
    """Why the QK matrices are scaled rotations on the rotary pairs: the paper's dense invertible
    matrix (right for models without RoPE) changes a RoPE model's outputs."""
    model = _noisy(tiny("llama", dtype=torch.float64))
    before = _logits(model)
    g = torch.Generator().manual_seed(0)
    dense = tuple(torch.randn(2, 16, 16, generator=g, dtype=torch.float64) + 4 * torch.eye(16, dtype=torch.float64)
                  for _ in range(2))
    _transform(model, MergeLockKey(seed=None, shape=model_shape(model), qk=dense, vo=None), inverse=False)
    assert _rel(_logits(model), before) > 1e-3


def test_bf16_within_bf16_round_off():
    model = _noisy(tiny("llama"))
    ref32 = _logits(model)
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    before = _logits(model16)
    lock(model16, seed=3)
    after = _logits(model16)
    # as close to the unlocked bf16 model as bf16 itself is to fp32
    assert _rel(after, before) < max(2e-2, 4 * _rel(before, ref32))


def test_the_shipped_subject_is_unchanged():
    from transformers import AutoModelForCausalLM

    from attnkit.hf.subject import default_subject

    model = AutoModelForCausalLM.from_pretrained(default_subject(), dtype=torch.float32).eval()
    ids = torch.tensor([list(b"def lock(model, seed):\n    return key  # the pass key is 12345.")])
    before = _logits(model, ids)
    key = lock(model, seed=11)
    assert (_logits(model, ids) - before).abs().max() < 1e-4 * before.abs().max()
    assert key.shape == {"num_layers": 12, "num_heads": 4, "num_kv_heads": 2, "head_dim": 64, "rotary_dim": 64}


def test_the_shipped_subject_in_bf16():
    from transformers import AutoModelForCausalLM

    from attnkit.hf.subject import default_subject

    ids = torch.tensor([list(b"The pass key is 48213. What is the pass key?")])
    model = AutoModelForCausalLM.from_pretrained(default_subject(), dtype=torch.bfloat16).eval()
    before = _logits(model, ids)
    lock(model, seed=11)
    after = _logits(model, ids)
    # bf16's own round-off: measured 5.2e-3 against the unlocked bf16 model, which is itself 3.8e-3 from fp32
    assert _rel(after, before) < 1e-2
    assert (after.argmax(-1) == before.argmax(-1)).float().mean() > 0.95


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")  # transformers 5.25 renames it
def test_decoding_with_the_cache_is_unchanged():
    from hf_models import greedy_decode, padded_inputs

    model = _noisy(tiny("qwen2"))
    ids, mask = padded_inputs()
    from transformers import DynamicCache

    before = greedy_decode(model, ids, mask, DynamicCache(), steps=4)
    lock(model, seed=12)
    after = greedy_decode(model, ids, mask, DynamicCache(), steps=4)
    for x, y in zip(after, before):
        assert (x - y).abs().max() < 1e-4 * y.abs().max()


@pytest.mark.parametrize("arch", ["qwen2", "phi3"])
def test_unlock_restores_the_weights(arch):
    model = _noisy(tiny(arch))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    key = lock(model, seed=4)
    unlock(model, key)
    for name, p in model.named_parameters():
        assert (p - weights[name]).abs().max() <= 1e-6 * weights[name].abs().max(), name


def test_seeds_are_deterministic():
    a, b, c = (_noisy(tiny("llama")) for _ in range(3))
    ka, kb, kc = lock(a, seed=9), lock(b, seed=9), lock(c, seed=10)
    assert all(torch.equal(x, y) for x, y in zip(ka.qk + ka.vo, kb.qk + kb.vo))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.allclose(a.model.layers[0].self_attn.k_proj.weight, c.model.layers[0].self_attn.k_proj.weight)
    assert not torch.allclose(ka.vo[0], kc.vo[0])


def test_key_save_load_round_trip(tmp_path):
    model = _noisy(tiny("qwen2"))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    key = lock(model, seed=5, branches="vo")
    path = key.save(tmp_path / "model.mergelock")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.mergelock"]  # no temporary file left
    loaded = MergeLockKey.load(path)
    assert loaded.seed == 5 and loaded.branches == ("vo",) and loaded.qk is None
    unlock(model, loaded)
    for name, p in model.named_parameters():
        assert (p - weights[name]).abs().max() <= 1e-6 * weights[name].abs().max(), name


def test_a_failed_save_leaves_the_old_key(tmp_path, monkeypatch):
    key = lock(tiny("llama"), seed=1)
    path = key.save(tmp_path / "k")
    old = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        lock(tiny("llama"), seed=2).save(path)
    assert path.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["k"]


# -- merging, and the attacker's restoration ------------------------------------------------------


def _finetune(model, seed, std=0.01):
    return _noisy(copy.deepcopy(model), std=std, seed=seed)


def _task_arithmetic(base, models, lam=1.0):
    out = copy.deepcopy(base)
    sb = base.state_dict()
    out.load_state_dict({k: sb[k] + sum(lam * (m.state_dict()[k] - sb[k]) for m in models) for k in sb})
    return out


def test_merging_a_locked_model_breaks_and_the_least_squares_restoration_repairs_it():
    """The paper's threat: merge a locked fine-tune with another fine-tune of the same base. Plain
    merging breaks; the attacker's closed-form fit against the public base (estimate_key) undoes the
    lock and merging works again; a fit against an unrelated model does not."""
    base = _noisy(tiny("qwen2"))
    a, b = _finetune(base, 1), _finetune(base, 2)
    reference = _logits(_task_arithmetic(base, [a, b]))
    locked = copy.deepcopy(a)
    lock(locked, seed=6)
    assert _rel(_logits(locked), _logits(a)) < 1e-5                       # same function
    assert _rel(_logits(_task_arithmetic(base, [locked, b])), reference) > 0.3   # merging breaks

    restored = copy.deepcopy(locked)
    unlock(restored, estimate_key(locked, base))
    assert _rel(_logits(restored), _logits(a)) < 1e-5                     # the fit keeps the function
    assert _rel(_logits(_task_arithmetic(base, [restored, b])), reference) < 0.1

    # in weight space: the restored attention weights sit near a's, the locked ones far away; a fit
    # against an unrelated model (another random init) lands nowhere near
    unrelated = _noisy(tiny("qwen2", seed=7))
    wrong = copy.deepcopy(locked)
    unlock(wrong, estimate_key(locked, unrelated))
    assert _attention_distance(restored, a) < 0.2 < 0.5 < _attention_distance(locked, a)
    assert _attention_distance(wrong, a) > 0.4  # measured 0.55 (restored: 0.13, locked: 2.5)


def _attention_distance(model, other):
    """The largest relative distance between the two models' attention weight matrices."""
    theirs = dict(other.named_parameters())
    return max(_rel(p.detach().double(), theirs[n].detach().double()) for n, p in model.named_parameters()
               if n in _attention_weight_names(model) and n.endswith("weight"))


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [-1, True, 1.5, "1", None])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        lock(tiny("llama"), seed=seed)


@pytest.mark.parametrize("spread", [0, 0.5, float("inf"), float("nan"), True, "4"])
def test_bad_spread_is_a_non_invertible_or_meaningless_request(spread):
    with pytest.raises(ValueError, match="spread must be a finite number >= 1"):
        lock(tiny("llama"), spread=spread)


@pytest.mark.parametrize("branches", ["xy", (), ["qk", "ov"], 3])
def test_bad_branches(branches):
    with pytest.raises(ValueError, match="branches must be a non-empty collection"):
        lock(tiny("llama"), branches=branches)


def test_qk_norm_models_are_refused_with_the_way_out_and_left_untouched():
    model = tiny("gemma3")
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"q_norm/k_norm.*branches=\('vo',\)"):
        lock(model)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))


def test_unsupported_models():
    with pytest.raises(ValueError, match="transformers model with a .config"):
        lock(torch.nn.Linear(4, 4))
    model = tiny("llama")
    model.config.model_type = "cohere"  # interleaved RoPE pairs: not the layout the lock commutes with
    with pytest.raises(ValueError, match="model_type 'cohere' is not supported; accepted: llama"):
        lock(model)


def test_a_key_for_another_shape_names_the_mismatch():
    key = lock(tiny("llama"), seed=0)
    with pytest.raises(ValueError, match=r"num_layers: key 2 vs model 3"):
        unlock(tiny("llama", num_hidden_layers=3), key)
    with pytest.raises(ValueError, match=r"num_kv_heads: key 2 vs model 1"):
        unlock(tiny("llama", num_key_value_heads=1), key)
    with pytest.raises(ValueError, match=r"head_dim: key 16 vs model 8"):
        unlock(tiny("llama", head_dim=8), key)
    with pytest.raises(ValueError, match="key must be a MergeLockKey"):
        unlock(tiny("llama"), {"qk": key.qk})
    with pytest.raises(ValueError, match="locked_model and reference_model differ"):
        estimate_key(tiny("llama"), tiny("llama", num_hidden_layers=3))


def test_bad_keys(tmp_path):
    shape = model_shape(tiny("llama"))
    eye = torch.eye(16, dtype=torch.float64).expand(2, 16, 16)
    singular = eye.clone()
    singular[1, 3, 3] = 0
    with pytest.raises(ValueError, match="vo matrix of layer 1 is not invertible"):
        MergeLockKey(seed=0, shape=shape, qk=None, vo=(eye, singular))
    with pytest.raises(ValueError, match=r"qk must hold 2 tensors of shape \(2, 16, 16\)"):
        MergeLockKey(seed=0, shape=shape, qk=(eye,), vo=None)
    with pytest.raises(ValueError, match="qk and vo are both None"):
        MergeLockKey(seed=0, shape=shape, qk=None, vo=None)
    with pytest.raises(ValueError, match="shape must be a dict with keys"):
        MergeLockKey(seed=0, shape={"num_layers": 2}, qk=(eye, eye), vo=None)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"not a key")
    with pytest.raises(ValueError, match="is not a MergeLock key"):
        MergeLockKey.load(garbage)
    torch.save({"hello": 1}, tmp_path / "dict")
    with pytest.raises(ValueError, match="is not a MergeLock key"):
        MergeLockKey.load(tmp_path / "dict")
