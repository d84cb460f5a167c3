"""attnkit eval (issue 22, item 7): the grid's accuracy, KV bytes, outputs, bad input and the command.

The model whose answers the tests control is built by hand, not trained: a 2-layer byte-level
Llama that solves passkey retrieval by induction. Layer 0 has two heads whose scores depend on
position only (RoPE on constant query / key biases, peaked at offsets 1 and 2): they copy the
previous two tokens into the residual stream. Layer 1's head attends from position ``i`` to the
position ``j`` whose two preceding tokens equal ``(t[i-1], t[i])``, with a bonus when ``t[j]`` is a
digit, and the output layer writes ``t[j]``; its content dimensions sit on RoPE pairs of
negligible frequency, so the match does not depend on distance. After "... The pass key is" it
therefore emits the digits that followed "is " in the needle, if it can see the needle: under
StreamingLLM with a window that leaves the needle out it cannot. :func:`simulate` computes the
same rule in plain Python, an answer independent of the model, the attention code and eval.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import subprocess
import sys

import pytest
import torch

hf = pytest.importorskip("attnkit.hf")

from attnkit.cli import main  # noqa: E402
from attnkit.hf import eval as hf_eval  # noqa: E402
from attnkit.hf.subject import byte_tokenizer  # noqa: E402
from attnkit.tasks.longcontext import PASSKEY_MIN_LENGTH as PASSKEY_MIN  # noqa: E402
from attnkit.tasks.longcontext import _multikey_needle, _multikey_question  # noqa: E402
from attnkit.tasks.passkey import QUESTION, _needle  # noqa: E402
from attnkit.tasks.text import load_corpus  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

ALPHABET = "0123456789 .?\nabcdefghijklmnopqrstuvwxyzTWR"
K = 48  # one-hot width of a token code (the alphabet, then one code for every other byte)
C, D, HEADS, POSITIONAL_PAIRS, THETA = 4 * K, 160, 2, 16, 1e24
WORDS = ("alpha", "grass", "river", "stone", "quiet", "field", "maple", "cedar", "north", "light", "under", "green")
LENGTHS, DEPTHS, SAMPLES, SEED = (320, 448), (0.0, 0.5, 1.0), 4, 0  # seed 0: no key repeats a digit pair (a tie)
SINK, WINDOW = 4, 128
METHODS = ["full", f"streaming:sink={SINK},window={WINDOW}"]


def _code(byte: int) -> int:
    return ALPHABET.index(chr(byte)) if chr(byte) in ALPHABET else K - 1


def induction_model():
    """The hand-built induction Llama (module docstring). Residual stream: [token | previous token |
    the one before | layer 1's output], K dimensions each."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=C, intermediate_size=8, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=HEADS, head_dim=D, attention_bias=True,
                         rope_parameters={"rope_type": "default", "rope_theta": THETA}, max_position_embeddings=2048,
                         tie_word_embeddings=False, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None,
                         pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    TOKEN, PREV1, PREV2, OUT = 0, K, 2 * K, 3 * K
    half = D // 2
    omega = [THETA ** (-2 * k / D) for k in range(half)]
    # RoPE pairs (k, k + D/2) with k >= POSITIONAL_PAIRS turn by < 2e-5 rad per position: position-free
    still = list(range(POSITIONAL_PAIRS, half)) + list(range(half + POSITIONAL_PAIRS, D))
    layer0, layer1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # the MLPs stay zero
        for norm in [model.model.norm] + [n for b in model.model.layers for n in (b.input_layernorm,
                                                                                b.post_attention_layernorm)]:
            norm.weight.fill_(1.0)
        for byte in range(256):
            model.model.embed_tokens.weight[byte, TOKEN + _code(byte)] = 1.0
        for h in range(HEADS):  # layer 0, head h: score peaked at key position i - (h + 1)
            offset = h + 1
            for k in range(POSITIONAL_PAIRS):
                layer0.q_proj.bias[h * D + k] = 400.0 * math.cos(omega[k] * offset)
                layer0.q_proj.bias[h * D + half + k] = -400.0 * math.sin(omega[k] * offset)
                layer0.k_proj.bias[h * D + k] = 1.0
            for c in range(K):  # the attended token, into PREV1 (h = 0) or PREV2 (h = 1); the norm scales by sqrt(C)
                layer0.v_proj.weight[h * D + c, TOKEN + c] = 1.0 / math.sqrt(C)
                layer0.o_proj.weight[(PREV1 if h == 0 else PREV2) + c, h * D + c] = 1.0
        norm = math.sqrt(C / 3)  # layer 1's input norm: three one-hots
        strength = 25.0 * math.sqrt(D)  # 25 nats per matching token, and for a digit
        for c in range(K):
            layer1.q_proj.weight[still[c], TOKEN + c] = strength / norm
            layer1.q_proj.weight[still[K + c], PREV1 + c] = strength / norm
            layer1.k_proj.weight[still[c], PREV1 + c] = 1.0 / norm
            layer1.k_proj.weight[still[K + c], PREV2 + c] = 1.0 / norm
            layer1.v_proj.weight[c, TOKEN + c] = 1.0 / norm
            layer1.o_proj.weight[OUT + c, c] = 1.0
        layer1.q_proj.bias[still[2 * K]] = strength
        for digit in range(10):
            layer1.k_proj.weight[still[2 * K], TOKEN + digit] = 1.0 / norm
        for byte in range(256):
            if chr(byte) in ALPHABET:
                model.lm_head.weight[byte, OUT + _code(byte)] = 10.0
    model.generation_config = GenerationConfig(do_sample=False, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    return model


def simulate(prompt: list[int], key: str, steps: int, sink=None, window=None):
    """The induction rule in plain Python, over the keys a sink + window policy leaves visible
    (all when ``window`` is None): True / False for whether the greedy answer starts with ``key``
    (eval's rule), None when a tie between different tokens leaves it open."""
    seq, text = list(prompt), ""
    for _ in range(steps):
        if hf_eval.answer_correct(text, key):
            return True  # what follows the key does not count
        i = len(seq) - 1
        visible = [j for j in range(2, i + 1) if window is None or i - j < window or j < sink]
        score = {j: (seq[j - 1] == seq[i]) + (seq[j - 2] == seq[i - 1]) + chr(seq[j]).isdigit() for j in visible}
        best = max(score.values())
        tokens = sorted({seq[j] for j in visible if score[j] == best})
        if len(tokens) > 1:
            on_track = [t for t in tokens if _on_track(text + chr(t), key)]
            return False if not on_track else None
        seq.append(tokens[0])
        text += chr(tokens[0])
    return hf_eval.answer_correct(text, key)


def _on_track(text: str, key: str) -> bool:
    rest = text.lstrip()
    return rest.startswith(key) or key.startswith(rest)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(model folder, haystack corpus file): the induction model with the byte tokenizer, and a
    text of digit-free words (the last tenth is the held-out haystack)."""
    root = tmp_path_factory.mktemp("eval")
    induction_model().save_pretrained(root / "model")
    byte_tokenizer(2048).save_pretrained(root / "model")
    rng = random.Random(0)
    corpus = root / "haystack.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(1200)))
    return root / "model", corpus


@pytest.fixture(scope="module")
def record(folders):
    model, corpus = folders
    return hf_eval.run(str(model), METHODS, lengths=LENGTHS, depths=DEPTHS, samples=SAMPLES, tasks="both", pairs=2,
                       seed=SEED, corpus=str(corpus), bpb_windows=2, bpb_length=96, decode_tokens=3, batch_size=3)


def _prompts(folders, task="passkey", pairs=2):
    """Each cell's prompts, drawn again as eval draws them."""
    from transformers import AutoTokenizer

    model, corpus = folders
    haystack = hf_eval.Haystack(AutoTokenizer.from_pretrained(model), load_corpus(str(corpus))[1])
    out = {}
    for length in LENGTHS:
        for depth in DEPTHS:
            rng = hf_eval._cell_rng(SEED, task, length, depth)
            out[length, depth] = [haystack.passkey(rng, length, depth) if task == "passkey"
                                  else haystack.needle(rng, length, depth, pairs) for _ in range(SAMPLES)]
    return out


def test_the_grid_equals_an_independent_computation(record, folders):
    prompts = _prompts(folders)
    full, streaming = record["methods"]
    assert [full["label"], streaming["label"]] == METHODS
    for (length, depth), cell in prompts.items():
        keys = [s["key"] for s in full["samples"] if (s["task"], s["length"], s["depth"]) == ("passkey", length, depth)]
        assert keys == [key for _, key in cell]  # the prompts drawn again are the run's
        for row, sink, window in ((full, None, None), (streaming, SINK, WINDOW)):
            expected = [simulate(ids, key, 6, sink, window) for ids, key in cell]
            assert None not in expected, (length, depth)  # the seed gives no open ties
            got = row["accuracy"]["passkey"][str(length)][str(depth)]
            assert got == sum(expected) / SAMPLES, (row["label"], length, depth)
    # what the case is built to show: full attention finds the needle everywhere; streaming only where its
    # window reaches it (depth 1: the needle ends where the question starts)
    for length in map(str, LENGTHS):
        assert min(full["accuracy"]["passkey"][length].values()) >= 0.75
        assert streaming["accuracy"]["passkey"][length] == {"0.0": 0.0, "0.5": 0.0, "1.0": 1.0}
        assert full["mean_accuracy"]["passkey"][length] == sum(full["accuracy"]["passkey"][length].values()) / 3


def test_full_matches_the_models_own_attention(record, folders):
    # each prompt again through transformers' own generate (sdpa attention, its own cache): the same verdicts
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folders[0], dtype=torch.float32).eval()
    assert model.config._attn_implementation != hf.IMPLEMENTATION
    prompts = _prompts(folders)
    verdicts = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a CPU shared with other work, many threads stall each other
    try:
        gens = {}
        for (length, depth), cell in prompts.items():
            with torch.no_grad():
                gens[length, depth] = model.generate(torch.tensor([p for p, _ in cell]), max_new_tokens=6)[:, length:]
    finally:
        torch.set_num_threads(threads)
    for (length, depth), cell in prompts.items():
        gen = gens[length, depth]
        verdicts[length, depth] = [hf_eval.answer_correct(bytes(g.tolist()).decode(), key)
                                   for g, (_, key) in zip(gen, cell)]
    got = {}
    for s in record["methods"][0]["samples"]:
        if s["task"] == "passkey":
            got.setdefault((s["length"], s["depth"]), []).append(s["correct"])
    assert got == verdicts


def test_prompts_are_the_asked_length_with_the_needle_at_its_depth(folders):
    for (length, depth), cell in _prompts(folders).items():
        for ids, key in cell:
            prompt = bytes(ids)
            needle = _needle(key)
            n_hay = length - len(needle) - len(QUESTION)
            assert len(ids) == length and prompt.endswith(QUESTION)
            assert prompt.index(needle) == round(depth * n_hay)
            assert not any(chr(b).isdigit() for b in prompt.replace(needle, b""))  # the haystack holds no digits
    needles = re.compile(rb" The pass key of (\w+) is (\d+)\. ")
    for (length, depth), cell in _prompts(folders, "needle", pairs=3).items():
        for ids, key in cell:
            prompt = bytes(ids)
            found = list(needles.finditer(prompt))
            assert len(ids) == length and len(found) == 3  # three named keys
            asked = next(m for m in found if m.group(2) == key.encode())
            name = asked.group(1).decode()
            assert prompt.endswith(_multikey_question(name)) and asked.group(0) == _multikey_needle(name, key)
            n_hay = length - len(_multikey_question(name)) - sum(len(m.group(0)) for m in found)
            hay_before = asked.start() - sum(len(m.group(0)) for m in found if m.start() < asked.start())
            assert hay_before == round(depth * n_hay)


def test_needle_task_runs_and_reports_a_grid(record):
    for row in record["methods"]:
        grid = row["accuracy"]["needle"]
        assert set(grid) == {str(n) for n in LENGTHS}
        assert all(set(g) == {str(d) for d in DEPTHS} and all(0.0 <= v <= 1.0 for v in g.values())
                   for g in grid.values())


def test_kv_bytes_are_measured_and_streaming_keeps_its_budget(record):
    full, streaming = record["methods"]
    per_token = 2 * 2 * HEADS * D * 4  # layers x (keys, values) x KV heads x head dim x float32
    budget = hf.SinkWindow(SINK, WINDOW).budget
    for length in LENGTHS:
        f, s = full["lengths"][str(length)], streaming["lengths"][str(length)]
        assert f["kv_bytes"] == length * per_token
        assert s["kv_bytes"] == min(length, budget) * per_token < f["kv_bytes"]
        assert f["prefill_s"] > 0 and f["decode_s_per_token"] > 0 and f["peak_memory_bytes"] > 0
    assert 0 < full["wall_s"] + streaming["wall_s"] <= record["wall_s"]
    assert "cpu" in record["peak_memory_kind"]


def test_cache_bytes_of_the_models_own_cache():
    # a transformers DynamicCache (no nbytes()): the bytes of its layers' key and value tensors
    from transformers import DynamicCache

    model = induction_model()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.randint(97, 120, (3, 50)), past_key_values=cache, use_cache=True)
    assert hf_eval._cache_nbytes(cache) == 3 * 50 * 2 * 2 * HEADS * D * 4


def test_bits_per_byte_is_the_models_loss_on_held_out_text(record, folders):
    # the induction model predicts a token seen before in the same context: on text it is far from
    # uniform (8 bits) and streaming, which sees less, is no better than full
    full, streaming = (row["bits_per_byte"] for row in record["methods"])
    assert 0 < full <= streaming
    s = record["settings"]
    assert (s["bpb_windows"], s["bpb_length"]) == (2, 96)


def test_a_method_that_keeps_state_between_calls_runs_to_the_end(folders):
    # H2O's rule needs the head-wise cache on every forward: bits per byte crashed when it ran on the
    # model's own cache (after the whole grid); with a budget larger than the window its logits are full's
    model, corpus = folders
    rec = hf_eval.run(str(model), ["full", "h2o:budget=200,sink=4"], lengths="320", depths="0.5", samples=1,
                      corpus=str(corpus), bpb_windows=2, bpb_length=96, decode_tokens=2)
    full, h2o = (row["bits_per_byte"] for row in rec["methods"])
    assert math.isfinite(h2o) and abs(h2o - full) < 1e-5


def _bos_byte_tokenizer():
    """The byte tokenizer with a BOS token (id 256) put before every text, as Llama's does."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    core = byte_tokenizer().backend_tokenizer
    core.add_special_tokens(["<s>"])
    core.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", model_max_length=4096)


def test_text_windows_and_prompts_with_and_without_a_bos_token():
    text = b"plain ascii text, one byte per token: " * 8
    plain = hf_eval.Haystack(byte_tokenizer(), text)
    ids, count = plain.text_window(random.Random(0), 20)
    assert plain.prefix == [] and len(ids) == 20 and count == 19  # every token but the first is predicted
    bos = hf_eval.Haystack(_bos_byte_tokenizer(), text)
    ids, count = bos.text_window(random.Random(0), 20)
    assert bos.prefix == [256] and ids[0] == 256 and len(ids) == 20 and count == 19  # BOS predicts the first byte
    hay = b"no digits here at all, just words and spaces " * 40
    for haystack in (hf_eval.Haystack(byte_tokenizer(), hay), hf_eval.Haystack(_bos_byte_tokenizer(), hay)):
        for depth in (0.0, 0.5, 1.0):
            prompt, key = haystack.passkey(random.Random(1), 300, depth)
            assert len(prompt) == 300 and prompt[: len(haystack.prefix)] == haystack.prefix
            body = bytes(prompt[len(haystack.prefix):])
            n_hay = 300 - len(haystack.prefix) - len(_needle(key)) - len(QUESTION)
            assert body.index(_needle(key)) == round(depth * n_hay)
        assert haystack.fixed_tokens("passkey", 1) + hf_eval.MIN_HAYSTACK == len(haystack.prefix) + PASSKEY_MIN


def test_record_and_files(record, tmp_path, folders):
    written = hf_eval.write_record(record, tmp_path / "out")
    assert [p.name for p in written] == ["eval.json", "heatmaps.png", "accuracy_vs_kv.png"]
    for p in written[1:]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(written[0].read_text())
    assert saved["schema"] == hf_eval.SCHEMA and saved["methods"][0]["accuracy"] == record["methods"][0]["accuracy"]
    model = saved["model"]
    assert model["path"] == str(folders[0].resolve())
    assert model["config_sha256"] == hashlib.sha256((folders[0] / "config.json").read_bytes()).hexdigest()
    assert (model["num_layers"], model["num_heads"], model["num_kv_heads"], model["head_dim"]) == (2, 2, 2, D)
    assert {"torch", "transformers", "attnkit"} <= set(saved["meta"]["versions"])
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no partial file left


def test_the_command_end_to_end(folders, tmp_path, capsys, monkeypatch):
    model, corpus = folders
    monkeypatch.chdir(tmp_path)
    argv = ["eval", "--model", str(model), "--method", "full", "--method", "streaming:sink=4,window=64",
            "--lengths", "160", "--depths", "0,1", "--samples", "1", "--corpus", str(corpus), "--bpb-windows", "1",
            "--bpb-length", "64", "--decode-tokens", "2"]
    monkeypatch.setattr(sys, "argv", ["attnkit", *argv])
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "attnkit eval" in out.out and "streaming:sink=4,window=64" in out.out and "wrote" in out.out
    assert "eval: " in out.err  # plain progress lines when stderr is not a terminal
    [folder] = tmp_path.glob("attnkit-eval-*")  # the default --out: a fresh folder here
    assert {p.name for p in folder.iterdir()} == {"eval.json", "heatmaps.png", "accuracy_vs_kv.png"}
    saved = json.loads((folder / "eval.json").read_text())
    assert saved["command"].startswith("attnkit eval --model ")
    assert saved["settings"]["methods"] == ["full", "streaming:sink=4,window=64"]
    assert saved["settings"]["threads"] == 1


def test_options_parse_to_policies():
    assert hf_eval.parse_method("streaming:sink=0,window=16") == ("streaming", {"sink": 0, "window": 16})
    assert hf_eval.parse_method("x:a=1.5,b=true,c=False,d=text") == ("x", {"a": 1.5, "b": True, "c": False, "d": "text"})
    [(label, policy)] = hf_eval.parse_methods(["streaming:window=32"])
    assert label == "streaming:window=32" and policy == hf.Streaming(window=32)
    # a method registered later (another file's METHODS entry) resolves without eval knowing it
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Window(hf.Policy):
        name = "window-test"
        window: int = 8

        def rule(self, layer_idx, kv_head):
            return hf.SinkWindow(0, self.window)

    hf.METHODS["window-test"] = Window
    try:
        assert hf_eval.parse_methods(["window-test:window=3"])[0][1] == Window(3)
    finally:
        del hf.METHODS["window-test"]

    @dataclass  # not frozen: unhashable, which policies of one's own may well be
    class Loose(hf.Policy):
        window: int = 8

        def rule(self, layer_idx, kv_head):
            return hf.SinkWindow(0, self.window)

    assert [p for _, p in hf_eval.parse_methods([Loose(), Loose(3)])] == [Loose(), Loose(3)]
    with pytest.raises(ValueError, match="is given twice"):
        hf_eval.parse_methods([Loose(), Loose()])


BAD_RUN = [  # (keyword arguments, words the message must hold)
    (dict(methods=["nope"]), ["--method 'nope'", "unknown method 'nope'", "full, streaming"]),
    (dict(methods=["streaming:window"]), ["--method 'streaming:window'", "'window' is not key=value"]),
    (dict(methods=["streaming:window="]), ["'window=' is not key=value"]),
    (dict(methods=["streaming:"]), ["nothing after ':'"]),
    (dict(methods=[":window=3"]), ["names no method"]),
    (dict(methods=["streaming:size=3"]), ["does not take option(s) ['size']", "accepted: sink, window"]),
    (dict(methods=["streaming:window=0"]), ["--method 'streaming:window=0'", "window must be a positive integer"]),
    (dict(methods=["streaming:window=4,window=5"]), ["option 'window' is given twice"]),
    (dict(methods=["streaming:window=8", "streaming:window=8"]), ["is given twice"]),
    (dict(methods=["headwise:full_heads=abc"]), ["--method 'headwise:full_heads=abc'", "full_heads"]),
    (dict(methods=[]), ["no method given"]),
    (dict(lengths="0"), ["--lengths: 0 is not an integer >= 1"]),
    (dict(lengths="128,abc"), ["--lengths: 'abc' is not an integer"]),
    (dict(lengths=""), ["--lengths: '' is not an integer"]),
    (dict(lengths="128,128"), ["--lengths repeats a value"]),
    (dict(depths="0,1.5"), ["--depths: 1.5 is outside [0, 1]"]),
    (dict(depths="-0.1"), ["--depths: -0.1 is outside [0, 1]"]),
    (dict(depths="half"), ["--depths: 'half' is not a number"]),
    (dict(samples=0), ["--samples must be an integer >= 1, got 0"]),
    (dict(tasks="haystack"), ["--task 'haystack' is unknown", "passkey, needle or both"]),
    (dict(pairs=0), ["--pairs must be an integer >= 1, got 0"]),
    (dict(pairs=40), ["--pairs must be in [1, 32]"]),
    (dict(seed=-1), ["--seed must be an integer >= 0"]),
    (dict(decode_tokens=1), ["--decode-tokens must be an integer >= 2"]),
    (dict(batch_size=0), ["--batch-size must be an integer >= 1"]),
    (dict(threads=0), ["--threads must be an integer >= 1"]),
    (dict(device="tpu"), ["--device 'tpu'"]),
    (dict(dtype="int8"), ["--dtype 'int8' is unknown", "float32, bfloat16, float16"]),
    (dict(corpus="/no/such/corpus"), ["--corpus '/no/such/corpus' does not exist"]),
]


@pytest.mark.parametrize("kwargs, words", BAD_RUN, ids=[str(list(k.values())[0])[:30] for k, _ in BAD_RUN])
def test_bad_arguments_are_refused_before_any_work(kwargs, words, folders):
    kwargs = {"lengths": "320", "corpus": str(folders[1]), **kwargs}
    with pytest.raises(ValueError) as err:
        hf_eval.run(str(folders[0]), kwargs.pop("methods", ["full"]), **kwargs)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_bad_models_are_refused(folders, tmp_path):
    model, corpus = folders
    run = lambda path, **kw: hf_eval.run(str(path), ["full"], corpus=str(corpus), **{"lengths": "320", **kw})  # noqa: E731
    cases = []
    cases.append((tmp_path / "missing", {}, ["does not exist", "Hugging Face causal-LM folder"]))
    (tmp_path / "file.txt").write_text("x")
    cases.append((tmp_path / "file.txt", {}, ["is not a Hugging Face model folder (no config.json"]))
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", {}, ["is not a Hugging Face model folder"]))
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    cases.append((tmp_path / "odd", {}, ["does not load as a Hugging Face causal LM"]))
    bare = tmp_path / "bare"
    induction_model().save_pretrained(bare)  # no tokenizer
    cases.append((bare, {}, ["has no usable tokenizer"]))
    short = tmp_path / "short"
    induction_model().save_pretrained(short)
    byte_tokenizer(256).save_pretrained(short)  # the tokenizer takes 256 tokens, the model 2048 positions
    cases.append((short, {}, ["--lengths [320] exceed(s) 256, the model_max_length of its tokenizer"]))
    cases.append((model, {"lengths": "320,4096"}, ["--lengths [4096] exceed(s) 2048, the max_position_embeddings"]))
    cases.append((model, {"lengths": "64"}, ["--lengths [64] is shorter than the", "a passkey prompt needs"]))
    cases.append((model, {"lengths": "140", "tasks": "needle", "pairs": 4},
                  ["--lengths [140] is shorter than the", "a needle prompt with 4 pairs"]))
    cases.append((model, {"bpb_length": 4096}, ["--bpb-length 4096 exceeds 2048"]))
    for path, kwargs, words in cases:
        with pytest.raises(ValueError) as err:
            run(path, **kwargs)
        for word in words:
            assert word in str(err.value), (path, str(err.value))
    # a policy built for another model's shape is refused before the run
    wrong = hf.Headwise(full_heads=[[True, False, True]] * 5)
    with pytest.raises(ValueError, match=r"cannot run on .*full_heads has shape \[5, 3\]"):
        hf_eval.run(str(model), [wrong], lengths="320", corpus=str(corpus))


def test_beyond_context_lifts_the_length_limit_and_says_so(folders, tmp_path):
    # the same weights with a tokenizer that takes 256 tokens: refused at 320 (with the way out named), run
    # with beyond_context=True, and then the answers are the unlimited model's
    model, corpus = folders
    short = tmp_path / "short"
    induction_model().save_pretrained(short)
    byte_tokenizer(256).save_pretrained(short)
    kwargs = dict(lengths="320", depths="0.5", samples=2, corpus=str(corpus), bpb_windows=0, decode_tokens=2)
    with pytest.raises(ValueError, match="exceed.*--beyond-context lifts this limit"):
        hf_eval.run(str(short), ["full"], **kwargs)
    lifted = hf_eval.run(str(short), ["full"], beyond_context=True, **kwargs)
    plain = hf_eval.run(str(model), ["full"], **kwargs)
    assert lifted["settings"]["beyond_context"] is True and plain["settings"]["beyond_context"] is False
    assert [s["generated"] for s in lifted["methods"][0]["samples"]] == \
        [s["generated"] for s in plain["methods"][0]["samples"]]
    assert lifted["methods"][0]["accuracy"] == plain["methods"][0]["accuracy"]
    with pytest.raises(ValueError, match="beyond_context must be True or False"):
        hf_eval.run(str(model), ["full"], beyond_context="yes", **kwargs)


def test_the_command_refuses_bad_input_with_status_2(folders, tmp_path, capsys, monkeypatch):
    from attnkit.hf import subject

    model, corpus = folders
    monkeypatch.setattr(subject, "DEFAULT_PATH", tmp_path / "not-trained-yet")
    monkeypatch.chdir(tmp_path / "..")  # the default --out is a new folder here: a refused run must not leave it
    before = set((tmp_path / "..").iterdir())
    assert main(["eval", "--corpus", str(corpus)]) == 2
    assert set((tmp_path / "..").iterdir()) == before
    err = capsys.readouterr().err
    assert "attnkit eval: error: --model not given and the shipped subject model is missing" in err
    assert "pass --model PATH" in err
    (tmp_path / "taken").write_text("a file")
    assert main(["eval", "--model", str(model), "--out", str(tmp_path / "taken")]) == 2
    assert f"--out {str(tmp_path / 'taken')!r} is a file" in capsys.readouterr().err
    assert main(["eval", "--model", str(model), "--method", "streaming:window=-1", "--out", str(tmp_path / "o")]) == 2
    assert "--method 'streaming:window=-1'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written for a refused run


def test_without_transformers_the_command_names_the_extra():
    code = ("import sys\nsys.modules['transformers'] = None\nfrom attnkit.cli import main\n"
            "sys.exit(main(['eval', '--model', 'x']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "attnkit eval: error: attnkit.hf needs transformers" in out.stderr
