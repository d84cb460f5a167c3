"""DecoderLM: decode == full forward, generate through the state, save/load, per-layer mechanisms."""

import pytest
import torch

from attnkit.models import DecoderLM


def small_model(**kwargs):
    torch.manual_seed(0)
    defaults = dict(vocab_size=50, dim=32, num_layers=2, num_heads=4, attention="gqa")
    defaults.update(kwargs)
    return DecoderLM(**defaults).double()


def test_decode_equals_full_forward():
    model = small_model(attention=["mha", "mqa"])
    tokens = torch.randint(0, 50, (2, 11))
    full = model(tokens)
    state = model.init_state(2)
    steps = [model(tokens[:, :4], state)] + [model(tokens[:, i : i + 1], state) for i in range(4, 11)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full)


def test_generate_greedy_matches_argmax_of_full_forward():
    model = small_model()
    prompt = torch.randint(0, 50, (2, 5))
    out = model.generate(prompt, max_new_tokens=6)
    assert out.shape == (2, 11)
    assert torch.equal(out[:, :5], prompt)
    logits = model(out[:, :-1])
    assert torch.equal(logits[:, 4:].argmax(-1), out[:, 5:])


def test_sampling_is_seeded():
    model = small_model()
    prompt = torch.randint(0, 50, (1, 3))
    a = model.generate(prompt, 8, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 8, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_save_and_load_roundtrip(tmp_path):
    model = small_model(attention=["mha", "gqa"], attention_options={"qk_norm": True})
    model.save_pretrained(tmp_path / "ckpt")
    loaded = DecoderLM.from_pretrained(tmp_path / "ckpt").double()
    tokens = torch.randint(0, 50, (2, 7))
    torch.testing.assert_close(loaded(tokens), model(tokens))
    assert loaded.config == model.config
    assert loaded.embed.weight.data_ptr() != 0


def test_packed_training_batch_equals_separate():
    model = small_model()
    a, b = torch.randint(0, 50, (1, 6)), torch.randint(0, 50, (1, 4))
    ids = torch.tensor([[0] * 6 + [1] * 4])
    packed = model(torch.cat([a, b], 1), document_ids=ids)
    torch.testing.assert_close(packed, torch.cat([model(a), model(b)], 1))


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_layers=2"):
        DecoderLM(vocab_size=10, dim=32, num_layers=2, num_heads=4, attention=["mha"])
    with pytest.raises(ValueError, match="unknown mechanism"):
        DecoderLM(vocab_size=10, dim=32, num_layers=1, num_heads=4, attention="nope")
    model = small_model()
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.randn(2, 3))
    with pytest.raises(ValueError, match="init_state"):
        model(torch.randint(0, 50, (1, 3)), state=[None])


def test_loss_only_where_supervised():
    """loss() runs the output layer on the supervised positions only: the same value and
    gradients as cross-entropy over the full logits with ignore_index=-100."""
    import torch.nn.functional as F

    model = small_model()
    tokens = torch.randint(0, 50, (3, 9))
    targets = torch.full((3, 9), -100)
    targets[0, 2], targets[1, 5], targets[2, 8], targets[2, 0] = 7, 11, 3, 49
    loss = model.loss(tokens, targets)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    full = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, full)
    for got, want in zip(grads, torch.autograd.grad(full, list(model.parameters()))):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="targets"):
        model.loss(tokens, targets[:, :4])
