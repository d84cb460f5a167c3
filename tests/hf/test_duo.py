"""DuoAttention (issue 23, item 2): the gated identification forward against float64 references,
the identification loop, the pattern file, quantile thresholding, deployment through
``attnkit.hf.apply(model, "duo", ...)`` with the head-wise cache's bytes, bad options."""

import argparse
import json
import random
from pathlib import Path

import pytest
import torch
from hf_models import tiny

hf = pytest.importorskip("attnkit.hf")

from attnkit.hf.duo import (  # noqa: E402
    CPU_SETTINGS,
    Duo,
    DuoPattern,
    GatedAttention,
    add_identify_parser,
    duo_batch,
    identify,
    model_identity,
)

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

SINK, WINDOW = 2, 5
HAYSTACK = Path(random.__file__).read_bytes()  # real text, a few tens of kB


def _byte_model(arch="llama", dtype=torch.float32, **overrides):
    return tiny(arch, dtype=dtype, vocab_size=256, max_position_embeddings=1024, **overrides)


def _ids(B=2, T=37, seed=0):
    return torch.randint(1, 256, (B, T), generator=torch.Generator().manual_seed(seed))


# -- a float64 reference of the gated forward: its own attention function, every mask materialised --

_REF = {"gates": None, "mode": "mix", "recorded": {}, "full_from": "self"}


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """alpha * full + (1 - alpha) * sink/window, from the definition: scores of every pair, the
    causal and sink/window masks built from positions, query head h reading KV head h // group."""
    B, Hq, T, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    group = Hq // Hkv
    k = key.double().repeat_interleave(group, dim=1)
    v = value.double().repeat_interleave(group, dim=1)
    scores = query.double() @ k.transpose(-1, -2) * (scaling if scaling is not None else D ** -0.5)
    i = torch.arange(S - T, S)[:, None]
    j = torch.arange(S)[None, :]
    causal = j <= i
    stream = causal & ((i - j < WINDOW) | (j < SINK))

    def attend(allowed):
        return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v  # [B, Hq, T, D]

    layer = module.layer_idx
    full = attend(causal)
    if _REF["mode"] == "full":
        _REF["recorded"][layer] = full
        out = full
    else:
        if _REF["full_from"] == "teacher":
            full = _REF["recorded"][layer]
        alpha = _REF["gates"][layer].double().repeat_interleave(group)[None, :, None, None]
        out = alpha * full + (1 - alpha) * attend(stream)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _reference_logits(model, ids, gates, full_from="self"):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("duo_test_reference", _reference_attention)
    AttentionMaskInterface.register("duo_test_reference", sdpa_mask)
    before = model.config._attn_implementation
    model.set_attn_implementation("duo_test_reference")
    try:
        _REF.update(gates=gates, full_from=full_from, recorded={})
        with torch.no_grad():
            if full_from == "teacher":
                _REF["mode"] = "full"
                model(ids, use_cache=False)
            _REF["mode"] = "mix"
            return model(ids, use_cache=False).logits
    finally:
        model.set_attn_implementation(before)


def _gated_logits(model, ids, gates, full_from="self", **kwargs):
    with torch.no_grad(), GatedAttention(model, gates, sink=SINK, window=WINDOW, full_from=full_from) as gated:
        if full_from == "teacher":
            with gated.teacher():
                model(ids, use_cache=False, **kwargs)
        return model(ids, use_cache=False, **kwargs).logits


# -- the gated forward ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3"])
@pytest.mark.parametrize("full_from", ["self", "teacher"])
def test_gates_one_equal_the_models_own_attention(arch, full_from):
    model = _byte_model(arch)
    ids = _ids()
    with torch.no_grad():
        plain = model(ids).logits  # the model's sdpa, its own sliding windows included
    got = _gated_logits(model, ids, torch.ones(2, 2), full_from)
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=0)
    # and the model is itself again afterwards
    assert model.config._attn_implementation != "attnkit_duo"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3"])
def test_gates_zero_equal_the_streaming_policy(arch):
    model = _byte_model(arch, dtype=torch.float64)
    ids = _ids(T=41)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding in row 1
    got = _gated_logits(model, ids, torch.zeros(2, 2, dtype=torch.float64), attention_mask=mask)
    with torch.no_grad(), hf.apply(model, hf.Streaming(sink=SINK, window=WINDOW)):
        want = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-10, rtol=0)
    # the streaming branch really bites here (else the comparison proves little)
    with torch.no_grad():
        assert not torch.allclose(model(ids, attention_mask=mask).logits[valid], want[valid], atol=1e-3)


@pytest.mark.parametrize("full_from", ["self", "teacher"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_mixed_gates_equal_a_float64_reference(arch, full_from):
    model = _byte_model(arch, dtype=torch.float64)
    ids = _ids(T=33, seed=1)
    gates = torch.tensor([[0.9, 0.2], [0.0, 0.6]], dtype=torch.float64)
    got = _gated_logits(model, ids, gates, full_from)
    want = _reference_logits(model, ids, gates, full_from)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    # GQA: the gate is the KV head's; moving one gate changes the outputs (the reference agrees again)
    other = gates.clone()
    other[0, 1] = 0.7
    moved = _gated_logits(model, ids, other, full_from)
    assert not torch.allclose(moved, got, atol=1e-6)
    torch.testing.assert_close(moved, _reference_logits(model, ids, other, full_from), atol=1e-10, rtol=0)


def test_materialised_streaming_mask_path(monkeypatch):
    # CUDA without cuDNN's band materialises the rule (FlexAttention would compile per length): the
    # same outputs, and the gradient reaches every gate through it
    import attnkit.hf.duo as duo

    model = _byte_model(dtype=torch.float64)
    ids = _ids(T=30, seed=2)
    gates = torch.tensor([[0.3, 0.8], [0.5, 0.1]], dtype=torch.float64)
    as_pattern = _gated_logits(model, ids, gates)
    monkeypatch.setattr(duo, "_needs_dense", lambda *args: True)
    torch.testing.assert_close(_gated_logits(model, ids, gates), as_pattern, atol=1e-12, rtol=0)
    trained = gates.clone().requires_grad_(True)
    with GatedAttention(model, trained, sink=SINK, window=WINDOW):
        model(ids, use_cache=False).logits.square().mean().backward()
    assert trained.grad is not None and bool((trained.grad != 0).all())


def test_a_vision_tower_keeps_its_own_attention():
    import transformers as tf

    text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=300, head_dim=16, sliding_window=6,
                layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299,
                             boi_token_index=297, eoi_token_index=298)
    torch.manual_seed(0)
    model = tf.Gemma3ForConditionalGeneration(config).eval()
    ids = torch.randint(1, 290, (1, 12), generator=torch.Generator().manual_seed(0))
    ids[0, 2:6] = 299  # the image's 4 soft tokens
    inputs = dict(input_ids=ids, pixel_values=torch.randn(1, 3, 28, 28), token_type_ids=(ids == 299).long())
    with torch.no_grad():
        ref = model(**inputs).logits
        with GatedAttention(model, torch.ones(2, 2), sink=SINK, window=WINDOW):
            assert model.config.vision_config._attn_implementation == "sdpa"
            out = model(**inputs, use_cache=False).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert model.config.text_config._attn_implementation == "sdpa"


def test_gated_forward_refuses_a_cache_and_an_applied_model():
    model = _byte_model()
    ids = _ids()
    with GatedAttention(model, torch.ones(2, 2)), torch.no_grad():
        model(ids[:, :-1], use_cache=True)  # a whole sequence with a cache being filled is fine
        with pytest.raises(ValueError, match="use_cache=False"):
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
            model(ids[:, :-1], past_key_values=cache, use_cache=True)
            model(ids[:, -1:], past_key_values=cache, use_cache=True)
    with hf.apply(model, "full"), pytest.raises(ValueError, match="remove"):
        with GatedAttention(model, torch.ones(2, 2)):
            pass
    with pytest.raises(ValueError, match=r"gates must be a float tensor \[num_layers, num_kv_heads\] = \[2, 2\]"):
        GatedAttention(model, torch.ones(3, 2))


# -- identification -------------------------------------------------------------------------------


def test_identification_reduces_its_loss_and_keeps_gates_in_range():
    model = _byte_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    common = dict(haystack=HAYSTACK, min_length=200, max_length=256, num_lengths=2, sink=SINK, window=8, log_every=1)
    # official start (gates 1): the distillation loss starts at 0 and the L1 penalty pulls the gates down
    official = identify(model, steps=4, **common)
    assert official.curve[0][1] == pytest.approx(0.0, abs=1e-10)
    assert official.curve[-1][3] < official.curve[0][3]
    assert bool((official.gates < 1).all())
    # from gates 0 without the penalty: the gates open and the distillation loss falls
    opened = identify(model, steps=8, init=0.0, reg_weight=0.0, lr=0.1, **common)
    first, last = opened.curve[0][1], opened.curve[-1][1]
    assert first > 0 and last < 0.6 * first
    assert bool((opened.gates > 0).all())
    # a learning rate far too large: the gates still end in [0, 1] (clamped every step)
    wild = identify(model, steps=3, init=0.5, lr=50.0, **common)
    assert bool(((wild.gates >= 0) & (wild.gates <= 1)).all())
    assert bool(((wild.gates == 0) | (wild.gates == 1)).any())
    # the model is untouched: weights, requires_grad flags, attention implementation
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.config._attn_implementation != "attnkit_duo"
    assert official.model == model_identity(model)
    assert official.settings["steps"] == 4 and official.settings["lengths"] == [200, 256]


@pytest.mark.parametrize("arch", ["mistral", "gemma3", "phi3"])
def test_identification_runs_on_other_architectures(arch):
    model = _byte_model(arch)  # Mistral's and Gemma 3's own sliding windows: the mask path of both branches
    pattern = identify(model, steps=2, haystack=HAYSTACK, min_length=200, max_length=200, num_lengths=1,
                       sink=SINK, window=8, log_every=1)
    assert pattern.shape == (2, 2) and len(pattern.curve) == 2 and pattern.model["model_type"] == model.config.model_type
    assert bool((pattern.gates < 1).all())


def test_duo_batch_supervises_the_question_and_answer():
    rng = random.Random(0)
    ids, supervised = duo_batch(rng, HAYSTACK, 3, 400)
    assert ids.shape == supervised.shape == (3, 400)
    for row, sup in zip(ids, supervised):
        tail = bytes(row[sup].tolist())
        assert tail.startswith(b" What is the pass key") and tail[-5:].isdigit()
        assert not sup[: -len(tail)].any()
    short_ids, short_sup = duo_batch(rng, HAYSTACK, 1, 120)  # the shortest: one pair
    assert short_ids.shape == (1, 120) and bytes(short_ids[0][short_sup[0]].tolist()).startswith(b" What is")
    with pytest.raises(ValueError, match="length=119 is too short for a retrieval prompt; accepted: >= 120"):
        duo_batch(rng, HAYSTACK, 1, 119)


def test_duo_batch_with_a_tokenizer():
    from attnkit.hf.subject import byte_tokenizer

    # the subject's tokenizer maps text to its bytes: the same ids and positions as the byte path
    ascii_haystack = bytes(b for b in HAYSTACK if b < 128)
    by_bytes = duo_batch(random.Random(3), ascii_haystack, 2, 300)
    by_tokenizer = duo_batch(random.Random(3), ascii_haystack, 2, 300, tokenizer=byte_tokenizer())
    assert torch.equal(by_bytes[0], by_tokenizer[0]) and torch.equal(by_bytes[1], by_tokenizer[1])


# -- the pattern ----------------------------------------------------------------------------------


def test_pattern_save_load_round_trip(tmp_path):
    model = _byte_model()
    pattern = identify(model, steps=2, haystack=HAYSTACK, min_length=200, max_length=220, num_lengths=1,
                       sink=SINK, window=8)
    file = pattern.save(tmp_path / "p.tsv")
    again = DuoPattern.load(file)
    assert again == pattern and torch.equal(again.gates, pattern.gates)
    # the official readers' view: numpy.loadtxt skips the metadata lines
    np = pytest.importorskip("numpy")
    assert np.allclose(np.loadtxt(file, delimiter="\t"), pattern.gates.numpy(), rtol=0, atol=0)
    # saving into a folder uses the official file name
    (tmp_path / "folder").mkdir()
    assert pattern.save(tmp_path / "folder").name == "full_attention_heads.tsv"
    assert DuoPattern.load(tmp_path / "folder") == pattern


def test_reads_the_official_format(tmp_path):
    folder = tmp_path / "official"
    folder.mkdir()
    # numpy.savetxt's layout (%.18e, tabs); training can leave values a hair outside [0, 1]
    rows = [[1.0000001, 0.0], [0.25, -1e-9]]
    (folder / "full_attention_heads.tsv").write_text(
        "\n".join("\t".join(f"{x:.18e}" for x in row) for row in rows) + "\n")
    (folder / "config.json").write_text(json.dumps({"sink_size": 128, "recent_size": 256, "lr": 0.02,
                                                    "reg_weight": 0.05}))
    pattern = DuoPattern.load(folder)
    assert pattern.gates.tolist() == [[1.0, 0.0], [0.25, 0.0]]
    assert pattern.settings["sink"] == 128 and pattern.settings["window"] == 256 and pattern.model == {}
    assert DuoPattern.load(folder / "full_attention_heads.tsv").gates.tolist() == pattern.gates.tolist()


@pytest.mark.parametrize("sparsity", [0.0, 1 / 24, 0.25, 0.5, 0.75, 23 / 24, 1.0])
def test_quantile_thresholding_gives_exactly_the_asked_fraction(sparsity):
    gates = torch.rand(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pattern = DuoPattern(gates)
    full = pattern.full_heads(sparsity=sparsity)
    streaming = round(sparsity * 24)
    assert int((~full).sum()) == streaming
    # the streaming heads are the ones of smallest gate
    if 0 < streaming < 24:
        assert gates[~full].max() < gates[full].min()
    # ties (every gate equal) still give the exact count
    assert int((~DuoPattern(torch.full((4, 6), 0.5)).full_heads(sparsity=sparsity)).sum()) == streaming
    policy = pattern.to_policy(sparsity=sparsity, sink=64, window=256)
    assert isinstance(policy, hf.Headwise) and policy.shape == (4, 6)
    assert sum(policy.rule(layer, h) is None for layer in range(4) for h in range(6)) == 24 - streaming


def test_threshold_mode():
    pattern = DuoPattern([[0.1, 0.5], [0.49, 1.0]])
    assert pattern.full_heads(threshold=0.5).tolist() == [[False, True], [False, True]]
    assert pattern.full_heads(threshold=0.0).all() and pattern.full_heads().sum() == 2
    for options, message in [(dict(sparsity=2), r"sparsity must be a number in \[0, 1\]"),
                             (dict(threshold=-0.5), r"threshold must be a number in \[0, 1\]"),
                             (dict(window=0), "window must be a positive integer, got 0"),
                             (dict(sink=-2), "sink must be a non-negative integer")]:
        with pytest.raises(ValueError, match=message):
            pattern.to_policy(**options)


# -- deployment -----------------------------------------------------------------------------------


def _expected_bytes(policy, B, T, head_dim, itemsize, layers=2, kv_heads=2):
    kept = 0
    for layer in range(layers):
        for h in range(kv_heads):
            rule = policy.rule(layer, h)
            kept += T if rule is None else min(T, rule.budget)
    return 2 * B * kept * head_dim * itemsize  # keys and values


def test_deploy_through_apply_frees_what_the_policy_says(tmp_path):
    model = _byte_model()
    pattern = DuoPattern([[0.9, 0.1], [0.3, 0.8]], model=model_identity(model))
    file = pattern.save(tmp_path / "p.tsv")
    ids = _ids(B=2, T=40)
    with torch.no_grad():
        with hf.apply(model, "duo", pattern=str(file), sparsity=0.5, sink=SINK, window=WINDOW) as handle:
            assert isinstance(handle.policy, Duo) and handle.policy.evicts
            cache = handle.cache()
            got = model(ids, past_key_values=cache, use_cache=True).logits
            assert cache.nbytes() == _expected_bytes(handle.policy, 2, 40, 16, 4)
            cache = handle.cache()  # decoding: the streaming heads stay at sink + window tokens
            more = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=5,
                                  do_sample=False)
            assert cache.get_seq_length() == more.shape[1] - 1 == 44
            assert cache.nbytes() == _expected_bytes(handle.policy, 2, 44, 16, 4)
        # the same table as a Headwise policy gives the same logits; the card name works too
        table = [[True, False], [False, True]]
        with hf.apply(model, hf.Headwise(full_heads=table, sink=SINK, window=WINDOW)) as handle:
            want = model(ids, past_key_values=handle.cache(), use_cache=True).logits
        with hf.apply(model, "hf-duo", pattern=pattern, sink=SINK, window=WINDOW):
            by_card = model(ids).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(by_card, want, atol=1e-6, rtol=0)
    assert Duo(pattern=pattern, sink=SINK, window=WINDOW).full_heads.tolist() == table


def test_the_card():
    card = next(c for c in hf.CARDS if c.name == "hf-duo")
    assert card.arxiv == "2410.10819" and card.layer is Duo
    policy = card.layer(pattern=DuoPattern([[0.2, 0.9]]), **card.defaults)
    assert isinstance(policy, hf.Policy) and (policy.sink, policy.window, policy.sparsity) == (64, 256, 0.5)
    assert card.flop_count(1, 2048, 256, 4).attention_fwd > 0


# -- bad options ----------------------------------------------------------------------------------

PATTERN = DuoPattern([[0.9, 0.1], [0.3, 0.8]])


@pytest.mark.parametrize("options, message", [
    (dict(pattern=PATTERN, sparsity=-0.1), r"sparsity must be a number in \[0, 1\].*got -0.1"),
    (dict(pattern=PATTERN, sparsity=1.5), r"sparsity must be a number in \[0, 1\].*got 1.5"),
    (dict(pattern=PATTERN, sparsity="half"), r"sparsity must be a number in \[0, 1\].*got 'half'"),
    (dict(pattern=PATTERN, sparsity=True), r"sparsity must be a number in \[0, 1\].*got True"),
    (dict(pattern=PATTERN, threshold=2.0), r"threshold must be a number in \[0, 1\]"),
    (dict(pattern=PATTERN, sparsity=0.5, threshold=0.5), "give sparsity or threshold, not both"),
    (dict(pattern=PATTERN, sink=-1), "sink must be a non-negative integer"),
    (dict(pattern=PATTERN, window=0), "window must be a positive integer, got 0"),
    (dict(pattern=PATTERN, window=-3), "window must be a positive integer, got -3"),
    (dict(pattern=PATTERN, window=2.5), "window must be a positive integer, got 2.5"),
    (dict(), "pattern is required"),
    (dict(pattern=42), "pattern must be a DuoPattern or the path"),
    (dict(pattern="/nonexistent/pattern.tsv"), "does not exist"),
])
def test_bad_options_raise_value_error(options, message):
    model = _byte_model()
    with pytest.raises(ValueError, match=message):
        hf.apply(model, "duo", **options)
    assert model.config._attn_implementation != "attnkit"  # nothing was applied


def test_a_pattern_for_another_model_is_refused(tmp_path):
    model = _byte_model()
    three_layers = DuoPattern([[0.1, 0.9]] * 3)
    with pytest.raises(ValueError, match=r"\[num_layers, num_kv_heads\] = \[3, 2\] but the model has \[2, 2\]"):
        hf.apply(model, "duo", pattern=three_layers)
    with pytest.raises(ValueError, match=r"\[3, 2\] but the model has \[2, 2\]"):
        three_layers.check(model)
    other = DuoPattern([[0.1, 0.9]] * 2, model={**model_identity(model), "hidden_size": 128})
    with pytest.raises(ValueError, match="hidden_size 128 vs 64"):
        other.check(model)
    DuoPattern([[0.1, 0.9]] * 2, model=model_identity(model)).check(model)  # its own model: fine


@pytest.mark.parametrize("text, message", [
    ("", "holds no gates"),
    ("0.5\t0.5\n0.5\n", "different numbers of KV heads"),
    ("0.5\tabc\n", "not tab-separated numbers"),
    ("nan\t0.5\n", "non-finite"),
    ('# {"format": "something-else"}\n0.5\t0.5\n', "format 'something-else'"),
])
def test_malformed_pattern_files(tmp_path, text, message):
    file = tmp_path / "bad.tsv"
    file.write_text(text)
    with pytest.raises(ValueError, match=message):
        DuoPattern.load(file)


@pytest.mark.parametrize("options, message", [
    (dict(steps=0), "steps must be a positive integer"),
    (dict(lr=0.0), "lr must be a finite number > 0"),
    (dict(reg_weight=-1.0), "reg_weight must be a finite number >= 0"),
    (dict(init=1.5), r"init must be a number in \[0, 1\]"),
    (dict(window=0), "window must be a positive integer"),
    (dict(min_length=300, max_length=200), "min_length=300 is larger than max_length=200"),
    (dict(max_length=50, min_length=40), "too short for a retrieval prompt"),
    (dict(full_from="both"), "full_from must be 'self' or 'teacher'"),
    (dict(backend="fast"), "unknown backend 'fast'"),
])
def test_identify_bad_options(options, message):
    model = _byte_model()
    with pytest.raises(ValueError, match=message):
        identify(model, **{"haystack": HAYSTACK, "steps": 1, "max_length": 256, **options})
    small_vocab = tiny("llama")  # 128 tokens: bytes do not fit
    with pytest.raises(ValueError, match="too few for byte ids"):
        identify(small_vocab, haystack=HAYSTACK, steps=1)


def test_pattern_bad_values():
    with pytest.raises(ValueError, match=r"gates must be finite numbers in \[0, 1\]"):
        DuoPattern([[0.5, 1.5]])
    with pytest.raises(ValueError, match="non-empty"):
        DuoPattern([])
    with pytest.raises(ValueError, match="numbers"):
        DuoPattern([["a", "b"]])


# -- the command ----------------------------------------------------------------------------------


def test_identify_duo_command(tmp_path, capsys):
    model = _byte_model()
    model.save_pretrained(tmp_path / "model")
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(HAYSTACK)
    parser = argparse.ArgumentParser(prog="attnkit")
    add_identify_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["identify-duo", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "p.tsv"),
                              "--preset", "cpu", "--steps", "2", "--min-length", "200", "--max-length", "256",
                              "--corpus", str(corpus), "--window", "8"])
    assert args.func(args) == 0
    pattern = DuoPattern.load(tmp_path / "p.tsv")
    assert pattern.shape == (2, 2) and pattern.settings["steps"] == 2 and pattern.settings["window"] == 8
    assert (tmp_path / "p.png").is_file()
    assert "full attention at sparsity 0.5" in capsys.readouterr().out
    assert CPU_SETTINGS["steps"] > 2  # the preset's own steps were overridden by --steps
    args = parser.parse_args(["identify-duo", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "q.tsv")])
    with pytest.raises(ValueError, match="holds no config.json"):
        args.func(args)
