"""Concept-Centric Transformer head against float64 references of the official math (slot attention and
the token -> concept cross-attention), its explanation's exact decomposition, and bad inputs."""

import pytest
import torch

from attnkit.vision import CARDS, ConceptCentricTransformer
from attnkit.vision.concepts import concept_entropy, concept_read_reference, slot_attention_reference


def _model(backend="sdpa", iterations=2):
    torch.manual_seed(0)
    return ConceptCentricTransformer(32, 4, num_concepts=5, num_classes=3, slot_iterations=iterations,
                                     backend=backend).double().eval()


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_forward_and_gradients_match_reference(backend):
    model = _model(backend)
    x = torch.randn(2, 12, 32, dtype=torch.float64, requires_grad=True)
    out = model(x)
    sa = model.slots
    slots0 = sa.initial_slots(2, x.dtype, x.device)
    ref_slots, _ = slot_attention_reference(sa.norm_inputs(x), slots0, {"q": sa.q.weight, "k": sa.k.weight,
                                            "v": sa.v.weight, "norm_slots": sa.norm_slots, "gru": sa.gru}, 2)
    concepts = ref_slots + model.slot_order
    w = {"q": model.q.weight, "k": model.kv.weight[:32], "v": model.kv.weight[32:], "out": model.out.weight,
         "bout": model.out.bias}
    ref = concept_read_reference(x, concepts, w, 4)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    params = [x, *model.parameters()]
    params = [p for p in params if p is not sa.log_sigma]  # the noise scale is unused in eval mode
    for a, b in zip(torch.autograd.grad((out * g).sum(), params), torch.autograd.grad((ref * g).sum(), params)):
        torch.testing.assert_close(a, b)


def test_slot_attention_competes_over_slots_and_averages_over_tokens():
    model = _model(iterations=1)
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    _, attn = model.slots(x)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 12, dtype=torch.float64))  # softmax over slots


def test_explanation_decomposes_the_logits_exactly():
    model = _model()
    x = torch.randn(3, 12, 32, dtype=torch.float64)
    ex = model.explain(x)
    torch.testing.assert_close(ex["logits"], model(x))
    torch.testing.assert_close(ex["contribution"].sum(1) + model.out.bias, ex["logits"])
    torch.testing.assert_close(ex["concept_attn"].sum(-1), torch.ones(3, 12, dtype=torch.float64))
    torch.testing.assert_close(ex["where"].sum(-1), torch.ones(3, dtype=torch.float64))
    predicted = ex["logits"].argmax(-1)
    rows = torch.arange(3)
    torch.testing.assert_close(ex["token_contribution"].mean(1) + model.out.bias[predicted], ex["logits"][rows, predicted])
    torch.testing.assert_close(ex["read"].sum(-1), torch.ones(3, dtype=torch.float64))
    for b in range(3):
        assert ex["top_concept"][b] == ex["contribution"][b, :, predicted[b]].argmax()
    assert 0 <= float(concept_entropy(ex["concept_attn"])) <= float(torch.log(torch.tensor(5.0))) + 1e-6


def test_training_mode_draws_slot_noise_eval_mode_does_not():
    model = _model()
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))


def test_card_builds():
    card = next(c for c in CARDS if c.name == "cct")
    model = card.build(32, 4, num_classes=4)
    assert model(torch.randn(2, 9, 32)).shape == (2, 4)
    assert card.flop_count(1, 64, 32, 4).fwd > 0


BAD = [
    (lambda: ConceptCentricTransformer(30, 4), "dim=30 is not divisible by num_heads=4"),
    (lambda: ConceptCentricTransformer(32, 4, num_concepts=0), "num_concepts must be a positive integer, got 0"),
    (lambda: ConceptCentricTransformer(32, 4, slot_iterations=0), "slot_iterations must be a positive integer, got 0"),
    (lambda: ConceptCentricTransformer(32, 4, backend="x"), "backend must be one of sdpa, reference, got 'x'"),
    (lambda: ConceptCentricTransformer(32, 4)(torch.randn(2, 9, 16)), r"x must have shape \(B, N, 32\)"),
    (lambda: ConceptCentricTransformer(32, 4).explain(torch.randn(9, 32)), r"x must have shape \(B, N, 32\)"),
]


@pytest.mark.parametrize("make,message", BAD)
def test_bad_inputs(make, message):
    with pytest.raises(ValueError, match=message):
        make()
