"""MASA: every layer's q/k/v/o weights are its coefficients times the shared atoms (checked
against the formula, forward and every gradient, atoms included), one dictionary per model,
owned by the model (``model.shared``) and counted and saved once, parameter counts, decode ==
full forward, bad inputs. The model-level checks (old checkpoints, FSDP per block) are in
tests/models/test_shared_modules.py."""

from copy import deepcopy

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit.layers import MatrixAtomAttention, MultiHeadAttention
from attnkit.layers.matrix_atoms import MatrixAtoms
from attnkit.models import DecoderLM

from layer_checks import assert_forward_and_grads_match, decode_in_chunks


def formula(layer, x):
    """Weights written as sums over atoms, then plain causal attention with RoPE."""
    atoms = layer.qkv_proj._atoms
    cq, ck, cv = layer.qkv_proj.coefficients
    (co,) = layer.o_proj.coefficients
    combine = lambda c, d: sum(c[s] * d[s] for s in range(d.shape[0]))  # noqa: E731
    Wq, Wk, Wv, Wo = combine(cq, atoms.q), combine(ck, atoms.k), combine(cv, atoms.v), combine(co, atoms.o)
    B, T, _ = x.shape
    H, Hkv, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = (x @ Wq.T).view(B, T, H, D).transpose(1, 2)
    k = (x @ Wk.T).view(B, T, Hkv, D).transpose(1, 2)
    v = (x @ Wv.T).view(B, T, Hkv, D).transpose(1, 2)
    q, k = layer.rope(q, k)
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1), is_causal=True)
    return out.transpose(1, 2).reshape(B, T, H * D) @ Wo.T


@pytest.mark.parametrize("kv", [None, 2])
def test_layer_matches_formula(kv):
    torch.manual_seed(0)
    layer = MatrixAtomAttention(32, 4, kv, num_atoms=3).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    assert_forward_and_grads_match(layer, lambda x: formula(layer, x), x)


def test_one_dictionary_per_model():
    model = DecoderLM(vocab_size=64, dim=32, num_layers=6, num_heads=4, attention="masa")
    layers = [b.attn for b in model.layers]
    dictionary = model.shared["masa"]
    assert list(model.shared) == ["masa"]
    assert not any(layer.owns_atoms for layer in layers)
    assert all(layer.dictionary is dictionary and layer.qkv_proj._atoms is dictionary for layer in layers)
    assert dictionary.q.shape == (2, 32, 32)  # S = L / 3 atoms
    # the model owns it: no block holds it as a submodule, the state dict has one copy
    assert not any(isinstance(m, MatrixAtoms) for b in model.layers for m in b.modules())
    keys = list(model.state_dict())
    assert [k for k in keys if k.startswith("shared.")] == ["shared.masa.q", "shared.masa.k", "shared.masa.v", "shared.masa.o"]
    assert not any("atoms" in k for k in keys)
    # attention parameters: 4 S C^2 atoms + 4 S coefficients per layer, against 4 L C^2
    coefficients = sum(p.numel() for b in model.layers for p in b.attn.parameters())
    assert coefficients == 6 * 4 * 2
    attn = coefficients + sum(p.numel() for p in model.shared.parameters())
    assert attn == 4 * 2 * 32 * 32 + 6 * 4 * 2
    mha = DecoderLM(vocab_size=64, dim=32, num_layers=6, num_heads=4)
    assert model.num_parameters() == mha.num_parameters() - 4 * 6 * 32 * 32 + attn
    assert len(list(model.parameters())) == len({id(p) for p in model.parameters()})
    # a gradient step moves the shared atoms through every layer
    model(torch.randint(0, 64, (2, 8))).square().mean().backward()
    assert all(layer.qkv_proj.coefficients.grad is not None for layer in layers)
    assert dictionary.q.grad.abs().sum() > 0


def test_standalone_layer_owns_its_dictionary():
    layer = attnkit.build("masa", dim=32, num_heads=4)
    assert layer.owns_atoms and layer.dictionary is layer.atoms
    assert [k for k in layer.state_dict() if "atoms" in k] == ["atoms.q", "atoms.k", "atoms.v", "atoms.o"]
    assert layer(torch.randn(2, 5, 32)).shape == (2, 5, 32)


def test_dictionaries_of_other_shapes_get_their_own_key():
    """A stack mixing MASA layers of different head layouts needs one dictionary per shape."""
    model = DecoderLM(vocab_size=64, dim=32, num_layers=4, num_heads=4, attention=["masa", "mha", "masa", "masa"],
                      attention_options=[{}, {}, {"num_kv_heads": 2}, {}])
    assert list(model.shared) == ["masa", "masa_1"]
    attn = [b.attn for b in model.layers]
    assert attn[0].dictionary is attn[3].dictionary is model.shared["masa"]
    assert attn[2].dictionary is model.shared["masa_1"] and attn[2].shared_key == "masa_1"
    assert model.shared["masa_1"].k.shape == (1, 16, 32)
    assert model(torch.randint(0, 64, (2, 5))).shape == (2, 5, 64)


def test_whole_model_copies_keep_one_dictionary():
    model = DecoderLM(vocab_size=64, dim=32, num_layers=3, num_heads=4, attention="masa")
    twin = deepcopy(model).double()
    assert all(b.attn.dictionary is twin.shared["masa"] for b in twin.layers)
    assert twin.shared["masa"] is not model.shared["masa"] and twin.shared["masa"].q.dtype == torch.float64
    tokens = torch.randint(0, 64, (2, 5))
    torch.testing.assert_close(twin(tokens), model(tokens).double())


def test_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = DecoderLM(vocab_size=64, dim=32, num_layers=3, num_heads=4, attention="masa")
    tokens = torch.randint(0, 64, (2, 7))
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(DecoderLM.from_pretrained(tmp_path)(tokens), model(tokens))


@pytest.mark.parametrize("chunks", [[1] * 9, [4, 5]])
def test_decode_equals_full_forward(chunks):
    torch.manual_seed(0)
    layer = MatrixAtomAttention(32, 4, num_atoms=2).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    torch.testing.assert_close(decode_in_chunks(layer, x, chunks), layer(x))


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_atoms"):
        MatrixAtomAttention(32, 4, num_atoms=0)
    with pytest.raises(ValueError, match="bias"):
        MatrixAtomAttention(32, 4, bias=True)
    with pytest.raises(ValueError, match="shared must be the model's nn.ModuleDict .* got dict"):
        MatrixAtomAttention(32, 4, shared={})
    assert isinstance(MatrixAtomAttention(32, 4), MultiHeadAttention)
