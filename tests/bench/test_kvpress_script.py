"""benchmarks/kvpress/run.py: its arguments, its prompts (attnkit eval's), its budgets and Duo patterns.

kvpress lives in its own environment (benchmarks/kvpress/setup.sh; it pins transformers < 5.3), so
the normal suite checks what needs no kvpress; the end-to-end test at the bottom runs only where
kvpress is installed (``.attnkit-cache/kvpress-env/bin/python -m pytest tests/bench/test_kvpress_script.py``).
"""

import importlib.util
import math
import random
import sys
from pathlib import Path

import pytest
import torch

from attnkit.tasks.longcontext import passkey_example
from attnkit.tasks.passkey import QUESTION

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kvpress" / "run.py"


@pytest.fixture(scope="module")
def kv():
    spec = importlib.util.spec_from_file_location("kvpress_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)  # must import without kvpress or transformers
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module


def _has(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _eval():
    if not _has("transformers"):
        return None
    try:
        from attnkit.hf import eval as hf_eval
    except ImportError:
        return None
    return hf_eval


# -- arguments ------------------------------------------------------------------------------------------


def test_defaults_are_attnkit_evals_grid(kv):
    args = kv.parse_args([])
    assert args.lengths == [2048, 4096]
    assert args.depths == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert args.budgets == [260, 516, 1028]  # sink 4 + window 256 / 512 / 1024
    assert args.presses == ["full", "streaming", "snapkv", "adakv", "duo"]
    assert args.protocol == ["prompt"] and args.seed == 0 and args.samples == 4
    assert args.duo_sparsities == [0.25, 0.5, 0.75] and (args.duo_sink, args.duo_window) == (64, 256)
    assert args.dtype == "float32" and args.threads == 1
    hf_eval = _eval()
    if hf_eval is not None:  # the same defaults as `attnkit eval` where this attnkit has it
        assert tuple(args.depths) == tuple(hf_eval.DEFAULT_DEPTHS)
        assert args.samples == hf_eval.DEFAULT_SAMPLES
        assert "streaming:sink=4,window=256" in hf_eval.DEFAULT_METHODS


def test_lists_are_parsed(kv):
    args = kv.parse_args(["--presses", "streaming,adakv", "--budgets", "100,300", "--lengths", "512",
                          "--depths", "0,1", "--protocol", "context-question,prompt", "--duo-sparsities", "0.5"])
    assert args.presses == ["streaming", "adakv"] and args.budgets == [100, 300] and args.lengths == [512]
    assert args.depths == [0.0, 1.0] and args.protocol == ["context-question", "prompt"] and args.duo_sparsities == [0.5]


BAD = [
    (["--presses", "h2o"], "--presses: 'h2o' is unknown"),
    (["--presses", "full,full"], "--presses names 'full' twice"),
    (["--budgets", "260,x"], "--budgets: 'x' is not an integer"),
    (["--budgets", "0"], "--budgets: 0 is below 1"),
    (["--budgets", "300,300"], "--budgets repeats a value"),
    (["--lengths", "-5"], "--lengths: -5 is below 1"),
    (["--depths", "1.5"], "--depths: 1.5 is outside [0, 1]"),
    (["--depths", "half"], "--depths: 'half' is not a number"),
    (["--protocol", "pipeline"], "--protocol: 'pipeline' is unknown"),
    (["--duo-sparsities", "2"], "--duo-sparsities: 2 is outside [0, 1]"),
    (["--samples", "0"], "--samples must be an integer >= 1, got 0"),
    (["--seed", "-1"], "--seed must be an integer >= 0, got -1"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--threads", "0"], "--threads must be an integer >= 1, got 0"),
    (["--duo-window", "0"], "--duo-window must be an integer >= 1, got 0"),
    (["--streaming-sink", "-1"], "--streaming-sink must be an integer >= 0, got -1"),
    (["--snapkv-kernel", "4"], "--snapkv-kernel must be odd"),
    (["--budgets", "4"], "--budgets [4] do not exceed --streaming-sink 4"),
    (["--presses", "snapkv", "--budgets", "64"], "--budgets [64] do not exceed --snapkv-window 64"),
    (["--duo-pattern", "/nonexistent/pattern.tsv"], "--duo-pattern '/nonexistent/pattern.tsv' does not exist"),
    (["--corpus", "/nonexistent/corpus"], "--corpus '/nonexistent/corpus' does not exist"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_arguments_name_the_option(kv, argv, message):
    with pytest.raises(ValueError) as err:
        kv.parse_args(argv)
    assert message in str(err.value)
    assert "accepted" in str(err.value) or "must be" in str(err.value)


def test_main_reports_a_bad_argument_without_a_traceback(kv, capsys):
    assert kv.main(["--depths", "2"]) == 2
    assert "run.py: error: --depths: 2 is outside [0, 1]" in capsys.readouterr().err


# -- prompts -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    from attnkit.hf.subject import byte_tokenizer

    return byte_tokenizer(4096)


@pytest.fixture(scope="module")
def held_out():
    # text with multi-byte characters: a window may start inside one, and the bytes must survive eval's decode
    rng = random.Random(3)
    words = ["def", "return", "café", "naïve", "import", "λ", "self", "None", "数据", "x"]
    return " ".join(rng.choice(words) for _ in range(6000)).encode()


def test_cells_are_passkey_example_with_evals_seed_scheme(kv, tokenizer, held_out):
    prompts = kv.Prompts(tokenizer, held_out, use_eval=False)
    assert prompts.source == "attnkit.tasks.longcontext.passkey_example"
    assert prompts.question_tokens() == len(QUESTION) and prompts.encode_length("99999") == 5
    for length, depth in ((512, 0.0), (512, 0.5), (1024, 1.0)):
        cell = prompts.cell(7, length, depth, 3)
        rng = random.Random(f"7-passkey-{length}-{float(depth)}")  # attnkit eval's _cell_rng(seed, task, length, depth)
        expected = [passkey_example(rng, held_out, length, depth) for _ in range(3)]
        assert [p for p, _ in cell] == [list(e.prompt) for e in expected]
        assert [k for _, k in cell] == [e.answer.decode() for e in expected]
        assert all(len(p) == length and bytes(p).endswith(QUESTION) for p, _ in cell)
    timing = prompts.timing(7, 512)
    assert timing == list(passkey_example(random.Random("7-timing-512"), held_out, 512, 0.5).prompt)
    assert prompts.cell(7, 512, 0.5, 2) != prompts.cell(8, 512, 0.5, 2)  # the seed matters


def test_cells_equal_attnkit_evals_prompts(kv, tokenizer, held_out):
    hf_eval = _eval()
    if hf_eval is None:
        pytest.skip("this attnkit has no attnkit.hf.eval (attnkit eval) to compare with")
    mine = kv.Prompts(tokenizer, held_out, use_eval=False)
    theirs = hf_eval.Haystack(tokenizer, held_out)
    for length, depth in ((512, 0.0), (512, 0.25), (1024, 0.75), (1024, 1.0)):
        rng = hf_eval._cell_rng(0, "passkey", length, depth)
        assert mine.cell(0, length, depth, 4) == [theirs.passkey(rng, length, depth) for _ in range(4)]
    assert mine.timing(0, 512) == theirs.passkey(hf_eval._cell_rng(0, "timing", 512), 512, 0.5)[0]
    via_eval = kv.Prompts(tokenizer, held_out)  # the script's default: eval's own Haystack
    assert via_eval.source == "attnkit.hf.eval.Haystack.passkey"
    assert via_eval.cell(0, 1024, 0.5, 4) == mine.cell(0, 1024, 0.5, 4)
    assert via_eval.question_tokens() == mine.question_tokens()
    assert kv.answer_correct(" 48213\n", "48213") == hf_eval.answer_correct(" 48213\n", "48213") is True
    assert kv.answer_correct("4821", "48213") == hf_eval.answer_correct("4821", "48213") is False


def test_non_byte_tokenizer_without_eval_is_refused(kv, held_out, monkeypatch):
    class Words:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [len(w) for w in text.split()]}

    monkeypatch.setattr(kv, "_eval_haystack", lambda: None)
    with pytest.raises(ValueError, match="not byte-level"):
        kv.Prompts(Words(), held_out)


# -- budgets and patterns ------------------------------------------------------------------------------------


def test_compression_ratio_keeps_exactly_the_budget(kv):
    for k_len in (100, 511, 2048, 2009, 4096, 4057, 32768):
        for kept in (1, 7, 64, 260, 516, 1028, k_len - 1):
            if kept >= k_len:
                continue
            ratio = kv.compression_ratio(k_len, kept)
            assert 0 <= ratio < 1
            assert int(k_len * (1 - ratio)) == kept  # kvpress.utils.compute_n_kept's rule
            assert k_len - int(k_len * (1 - ratio)) == k_len - kept  # StreamingLLMPress's pruned count
    for bad in (0, 100, 150):
        with pytest.raises(ValueError, match="kept tokens must be in"):
            kv.compression_ratio(100, bad)


def test_streaming_heads_rule(kv):
    gates = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.7]], dtype=torch.float64)
    assert kv.streaming_heads(gates, 0.5).tolist() == [[False, True], [True, False], [True, False]]
    assert kv.streaming_heads(gates, 0.0).sum() == 0 and kv.streaming_heads(gates, 1.0).all()
    for sparsity in (0.25, 0.5, 0.75, 1 / 12, 0.999):
        assert int(kv.streaming_heads(torch.rand(12, 2, dtype=torch.float64), sparsity).sum()) == min(
            24, math.floor(sparsity * 24 + 0.5))
    # ties: the earlier (layer, head) streams first
    assert kv.streaming_heads(torch.full((2, 2), 0.5, dtype=torch.float64), 0.25).tolist() == [[True, False],
                                                                                              [False, False]]


def test_streaming_heads_match_attnkits_duo(kv):
    if not _has("transformers"):
        pytest.skip("attnkit.hf needs transformers")
    try:
        from attnkit.hf.duo import DuoPattern
    except ImportError:
        pytest.skip("this attnkit has no attnkit.hf.duo")
    generator = torch.Generator().manual_seed(0)
    for gates in (torch.rand(12, 2, generator=generator, dtype=torch.float64),
                  torch.tensor([[0.5, 0.5], [0.5, 0.1], [0.5, 0.5]], dtype=torch.float64)):
        for sparsity in (0.25, 0.5, 0.75):
            assert torch.equal(kv.streaming_heads(gates, sparsity), ~DuoPattern(gates).full_heads(sparsity=sparsity))


PATTERN = """# attnkit DuoAttention pattern (arXiv 2410.10819): one row per layer
# {"format": "attnkit-duo-pattern", "version": 1, "model": {}, "settings": {}, "curve": []}
0.9\t0.1
1.2\t-0.3
0.25\t0.75
"""


def test_duo_pattern_files(kv, tmp_path):
    path = tmp_path / "pattern.tsv"
    path.write_text(PATTERN)
    gates = kv.load_duo_gates(path, 3, 2)
    assert gates.tolist() == [[0.9, 0.1], [1.0, 0.0], [0.25, 0.75]]  # clipped to [0, 1]
    folder = tmp_path / "official"
    folder.mkdir()
    (folder / "full_attention_heads.tsv").write_text("0.9\t0.1\n0.2\t0.3\n0.25\t0.75\n")
    assert kv.load_duo_gates(folder, 3, 2).shape == (3, 2)
    with pytest.raises(ValueError, match=r"has \[num_layers, num_kv_heads\] = \[3, 2\] but the model has \[12, 2\]"):
        kv.load_duo_gates(path, 12, 2)
    bad = tmp_path / "bad.tsv"
    bad.write_text("0.5\tnope\n")
    with pytest.raises(ValueError, match="line 1 is not numbers"):
        kv.load_duo_gates(bad, 1, 2)
    bad.write_text("0.5\t0.5\n0.5\n")
    with pytest.raises(ValueError, match="one row per layer of the same number of gates"):
        kv.load_duo_gates(bad, 2, 2)
    bad.write_text("# only metadata\n")
    with pytest.raises(ValueError, match="one row per layer"):
        kv.load_duo_gates(bad, 2, 2)
    bad.write_text("0.5\tnan\n")
    with pytest.raises(ValueError, match="non-finite"):
        kv.load_duo_gates(bad, 1, 2)
    with pytest.raises(ValueError, match="is not a file"):
        kv.load_duo_gates(tmp_path / "empty-folder-without-pattern", 1, 2)


def test_duo_pattern_written_by_attnkit_reads_back(kv, tmp_path):
    if not _has("transformers"):
        pytest.skip("attnkit.hf needs transformers")
    try:
        from attnkit.hf.duo import DuoPattern
    except ImportError:
        pytest.skip("this attnkit has no attnkit.hf.duo")
    gates = torch.rand(4, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = {"model_type": "llama", "num_layers": 4, "num_query_heads": 4, "num_kv_heads": 2}
    written = DuoPattern(gates, model=model, settings={"sink": 64}, curve=[[0, 1.0, 0.5, 1.5]]).save(tmp_path / "p.tsv")
    assert torch.equal(kv.load_duo_gates(written, 4, 2), gates)
    assert torch.equal(kv.load_duo_gates(tmp_path, 4, 2) if written.name == "full_attention_heads.tsv"
                       else kv.load_duo_gates(written, 4, 2), gates)


def test_attnkit_equivalents(kv):
    args = kv.parse_args(["--presses", "full,streaming,snapkv,duo", "--budgets", "260,1028"])
    specs = {c.label: c.attnkit_equivalent() for c in kv.configs(args)}
    assert specs["full"] == "full"
    assert specs["streaming 260"] == "streaming:sink=4,window=256"
    assert specs["streaming 1028"] == "streaming:sink=4,window=1024"
    assert specs["snapkv 260"] is None
    assert specs["duo s=0.5 (64+256)"] == "duo:pattern=PATTERN,sparsity=0.5,sink=64,window=256"


# -- end to end, where kvpress is installed ------------------------------------------------------------------------


def _tiny_model(folder):
    from transformers import LlamaConfig, LlamaForCausalLM

    from attnkit.hf.subject import byte_tokenizer

    torch.manual_seed(0)
    # head dim 64, as the subject's: kvpress's fake keys must lie in a half-space against every query of a group,
    # which fails for many queries in a small head dim (the question's 39 tokens x 2 query heads in dim 16 do)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=None, eos_token_id=None, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    byte_tokenizer(512).save_pretrained(folder)
    return folder


def _corpus(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 2000)
    return corpus


def test_tiny_run_with_kvpress(kv, tmp_path):
    pytest.importorskip("kvpress")
    import transformers

    folder = _tiny_model(tmp_path / "model")
    (tmp_path / "pattern.tsv").write_text("0.9\t0.1\n0.2\t0.8\n")
    args = kv.parse_args(["--model", str(folder), "--presses", "full,streaming,snapkv,adakv,duo", "--budgets",
                          "100,200", "--lengths", "256", "--depths", "0,1", "--samples", "2", "--duo-sparsities",
                          "0.5", "--duo-sink", "4", "--duo-window", "96", "--protocol", "prompt,context-question",
                          "--duo-pattern", str(tmp_path / "pattern.tsv"), "--corpus", str(_corpus(tmp_path))])
    record = kv.run(args, command="test", progress=lambda line: None)
    assert record["versions"]["transformers"] == transformers.__version__ and record["versions"]["kvpress"]
    assert record["failures"] == [] and record["skipped"] == []
    by = {(r["protocol"], r["label"]): r for r in record["summary"]}
    for protocol in ("prompt", "context-question"):
        full = by[(protocol, "full")]["kv_bytes"]
        assert full == 2 * 2 * 2 * 64 * 4 * 256  # layers x (K, V) x KV heads x head dim x fp32 bytes x tokens
        for budget in (100, 200):
            for press in ("streaming", "snapkv"):
                row = by[(protocol, f"{press} {budget}")]
                assert row["kept_tokens"] == budget and row["kv_bytes"] == full * budget // 256
            ada = by[(protocol, f"adakv {budget}")]
            assert ada["kv_bytes"] == full and ada["attended_tokens"] == pytest.approx(budget)  # masked, not freed
        duo = by[(protocol, "duo s=0.5 (4+96)")]
        assert duo["kv_bytes"] == full and duo["streaming_heads"] == 2
        assert duo["attended_tokens"] == pytest.approx((2 * 256 + 2 * 100) / 4)
        assert all(r["replay_matches_press"] for r in record["summary"])
    assert len(record["rows"]) == 2 * 8 * 2  # protocols x (full, 2 + 2 + 2 budgets, 1 duo) x depths and {r["depth"] for r in record["rows"]} == {0.0, 1.0}
    kv.plot(record, tmp_path / "kv.png")
    assert (tmp_path / "kv.png").stat().st_size > 10_000


def test_a_press_that_fails_in_kvpress_is_recorded(kv, tmp_path, monkeypatch, capsys):
    kvpress = pytest.importorskip("kvpress")

    class Broken(kvpress.BasePress):
        def compress(self, module, hidden_states, keys, values, attentions, kwargs):
            raise ValueError("Could not find fake keys such that for every query q, exp(<q, k>) = 0")

    made = kv.make_press
    monkeypatch.setattr(kv, "make_press", lambda c, *a: (Broken(), {}) if c.press == "adakv" else made(c, *a))
    args = kv.parse_args(["--model", str(_tiny_model(tmp_path / "model")), "--presses", "full,adakv", "--budgets",
                          "100", "--lengths", "256", "--depths", "0.5", "--samples", "1",
                          "--corpus", str(_corpus(tmp_path))])
    record = kv.run(args, command="test", progress=lambda line: None)
    assert [f["label"] for f in record["failures"]] == ["adakv 100"]
    assert record["failures"][0]["error"].startswith("ValueError: Could not find fake keys")
    assert [r["label"] for r in record["rows"]] == ["full"]
    assert record["summary"][1]["mean_accuracy"] is None
    kv.print_summary(record)
    assert "failed in kvpress: ValueError: Could not find fake keys" in capsys.readouterr().out
    kv.plot(record, tmp_path / "kv.png")  # the failed row is left out, the plot still drawn


def test_shared_prefill_replay_equals_kvpress_own_path(kv, tmp_path):
    """The accuracy cells replay each press's forward_hook on one shared prefill; the tokens and the
    masks must be those of ``with press(model)`` itself, batch of 3, both protocols (8 question
    tokens: with random token ids, kvpress's fake-key search fails for the 39 of the real question)."""
    pytest.importorskip("kvpress")
    folder = _tiny_model(tmp_path / "model")
    model, tokenizer = kv._load(folder, "float32", torch.device("cpu"))
    args = kv.parse_args(["--presses", "full,streaming,snapkv,adakv,duo", "--budgets", "120", "--duo-sparsities",
                          "0.5", "--duo-sink", "4", "--duo-window", "96"])
    gates = torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float64)
    ids = torch.randint(0, 256, (3, 256), generator=torch.Generator().manual_seed(0))
    for question in (0, 8):
        shared = kv.SharedPrefill(model, ids, question)
        for c in kv.configs(args):
            press, _ = kv.make_press(c, 256 - question, question, kv.streaming_heads(gates, 0.5) if c.press == "duo" else None)
            kv._clear_masks(model)
            tokens, cache = kv.generate(model, press, ids, 6, question)
            masks = kv._masks(model)
            replayed, logits = shared.replay(press)
            assert replayed.layers[0].keys.shape[2] == (120 if c.press in ("streaming", "snapkv") else 256)
            assert torch.equal(kv._decode(model, replayed, logits, 6, 256), tokens), (c.label, question)
            assert kv.masks_equal(masks, kv._masks(model)), (c.label, question)
            kv._clear_masks(model)
