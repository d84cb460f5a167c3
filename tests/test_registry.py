"""The registry is one explicit list: every layer module's ``CARDS`` is listed in
``registry.LAYER_CARDS`` (and nothing else is), in the order ``attnkit list`` has always shown;
card kinds and run-time registration check their input."""

import ast
import importlib
import pkgutil

import pytest

import attnkit
from attnkit import cards, layers, registry
from attnkit.layers.multi_head import multi_head_flops

# the order of `attnkit list` before registration became explicit (it was the import order of layers/)
ORDER = ["mha", "gqa", "mqa", "agent", "agent-causal", "bam", "cca", "ccgqa", "fixed-mixing", "l2-attention",
         "static-qk", "dma", "echo", "flow", "chronos2-group", "chronos2", "lightning", "masa", "moh", "no-mixing",
         "rcmha", "s2", "selective", "sigmoid", "sigmoid-nobias", "sqa", "ssqa", "xsqa", "xsmqa", "sliding-window",
         "streaming"]
ORDER += ["titans-mac", "titans-mag", "titans-mal", "hcam"]  # memory family (issue 28)


def _layer_modules():
    return [importlib.import_module(f"attnkit.layers.{m.name}") for m in pkgutil.iter_modules(layers.__path__)]


def test_names_and_order_unchanged():
    assert [c.name for c in attnkit.mechanisms()] == ORDER
    assert [c.name for c in registry.LAYER_CARDS] == ORDER
    assert all(c.kind == "layer" for c in registry.LAYER_CARDS)


def test_every_layer_modules_cards_are_listed_and_nothing_else():
    defined = [card for module in _layer_modules() for card in getattr(module, "CARDS", ())]
    assert all(isinstance(card, cards.Card) for card in defined)
    assert sorted(c.name for c in defined) == sorted(c.name for c in registry.LAYER_CARDS)
    assert {id(c) for c in defined} == {id(c) for c in registry.LAYER_CARDS}  # the very objects, listed once


def test_layer_modules_register_nothing_on_import():
    """No layer module calls anything named ``register`` at module level: its cards are data."""
    for module in _layer_modules():
        tree = ast.parse(open(module.__file__).read())
        calls = [node.value.func for node in tree.body if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)]
        names = [getattr(f, "id", getattr(f, "attr", None)) for f in calls]
        assert "register" not in names, module.__name__


def test_card_types_still_reachable_from_registry():
    """Code that imported the card types from ``attnkit.registry`` keeps working."""
    assert registry.Card is cards.Card is attnkit.Card
    assert registry.FlopCount is cards.FlopCount and registry.Capabilities is cards.Capabilities
    assert registry.dense_attention_flops is cards.dense_attention_flops


def _card(name="my-mha", **kw):
    return cards.Card(name=name, title="t", arxiv=None, family="baseline", layer=layers.MultiHeadAttention,
                      flops=multi_head_flops, **kw)


def test_register_a_card_of_ones_own(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    card = attnkit.register(_card())
    assert [c.name for c in attnkit.mechanisms()] == ORDER + ["my-mha"]
    assert attnkit.get("my-mha") is card
    assert attnkit.build("my-mha", dim=32, num_heads=4).num_heads == 4
    with pytest.raises(ValueError, match="'my-mha' is already registered"):
        attnkit.register(_card())
    with pytest.raises(ValueError, match="'mha' is already registered"):
        attnkit.register(_card("mha"))
    with pytest.raises(ValueError, match="register takes an attnkit.Card, got dict"):
        attnkit.register({"name": "x"})


def test_kinds(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    with pytest.raises(ValueError, match="kind must be one of layer, hf, diffusion(, [a-z]+)*, got 'plugin'"):
        _card(kind="plugin")
    attnkit.register(_card("my-hf", kind="hf"))
    assert [c.name for c in attnkit.mechanisms(kind="hf")] == ["my-hf"]
    assert [c.name for c in attnkit.mechanisms(kind="layer")] == ORDER
    assert [c.name for c in attnkit.mechanisms("baseline", kind="layer")] == ["mha", "gqa", "mqa"]
    with pytest.raises(ValueError, match="kind must be one of layer, hf, diffusion(, [a-z]+)*, got 'layers'"):
        attnkit.mechanisms(kind="layers")


def test_unknown_name_error_unchanged():
    with pytest.raises(ValueError, match=r"unknown mechanism 'nope'; registered: mha, gqa, mqa, agent"):
        attnkit.get("nope")
    with pytest.raises(ValueError, match=r"gqa does not take option\(s\) \['bogus'\]"):
        attnkit.build("gqa", dim=32, num_heads=4, bogus=1)


def test_a_switch_given_anything_but_a_bool_is_refused():
    # the string "False" is truthy: before this check titans-mag:rope=False from the command line built RoPE
    with pytest.raises(ValueError, match=r"titans-mag: option rope is a switch, True or False; got 'False'"):
        registry.build("titans-mag", dim=64, num_heads=4, rope="False")
    with pytest.raises(ValueError, match=r"option output_norm is a switch"):  # forwarded to the base class
        registry.build("titans-mal", dim=64, num_heads=4, output_norm=0)
    assert registry.build("titans-mag", dim=64, num_heads=4, rope=False).rope is None
    assert "rope" in registry.get("titans-mac").switch_options()


def test_a_misspelt_option_of_a_forwarding_layer_lists_the_accepted_keys():
    # sliding-window forwards **options to MultiHeadAttention: the message still names every key
    with pytest.raises(ValueError, match=r"sliding-window does not take option\(s\) \['windw'\]; accepted: .*num_kv_heads.*window"):
        registry.build("sliding-window", dim=64, num_heads=4, windw=4)
