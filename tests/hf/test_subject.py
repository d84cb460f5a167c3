"""attnkit train-subject (issue 22, item 6): the tiny preset trains and writes a folder that
transformers loads offline, computing exactly what the trained DecoderLM computes."""

import os
import json
import random

import pytest
import torch

hf = pytest.importorskip("attnkit.hf")

from attnkit.cli import main  # noqa: E402
from attnkit.hf import subject  # noqa: E402
from attnkit.models import DecoderLM  # noqa: E402
from attnkit.tasks import load_corpus, stdlib_path  # noqa: E402

# a small corpus: the stdlib's email package (train and held-out files), read in a fraction of a second
CORPUS = str(stdlib_path() / "email")
TEXT = "déjà vu: naïve café, 東京, emoji 🙂, tab\tand\nnewline, double  space, NUL\x00 ."


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("subject") / "tiny"
    record = subject.train_subject(out, preset="tiny", steps=20, seed=3, corpus=CORPUS, command="test")
    return out, record


def test_folder_loads_offline_and_logits_equal_the_decoder(trained):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out, record = trained
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "README.md", "loss_curve.png", "training.json"} <= names
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging folder or checkpoint left
    assert (out / "model.safetensors").stat().st_mode == (out / "config.json").stat().st_mode
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    llama = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(llama).__name__ == "LlamaForCausalLM"
    assert (llama.config.num_attention_heads, llama.config.num_key_value_heads) == (4, 2)
    ids = torch.tensor([list(TEXT.encode())])
    model = record["model"].eval()
    with torch.no_grad():
        torch.testing.assert_close(llama(ids).logits, model(ids), atol=1e-5, rtol=0)
        # greedy generation agrees too (the generation config: no sampling, no EOS stopping on byte 2)
        assert torch.equal(llama.generate(ids[:, :20], max_new_tokens=8), model.generate(ids[:, :20], 8))


def test_tokenizer_ids_are_the_bytes_and_round_trip(trained):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained[0])
    ids = tokenizer(TEXT)["input_ids"]
    assert ids == list(TEXT.encode("utf-8"))
    assert tokenizer.decode(ids) == TEXT
    assert len(tokenizer) == 256 and tokenizer.pad_token_id == 0
    batch = tokenizer(["ab", "abcd"], padding=True)
    assert batch["input_ids"][0][-2:] == [0, 0] and batch["attention_mask"][0] == [1, 1, 0, 0]


def test_card_has_the_table_and_reproduces_from_the_hf_model(trained):
    from transformers import AutoModelForCausalLM

    out, record = trained
    card = (out / "README.md").read_text()
    assert "| depth \\ length | 128 | 256 |" in card
    for depth in subject.DEPTHS:
        assert f"\n| {depth} | " in card
    for words in ("bits per byte", "4 query heads and 2 KV heads", "20 steps", "seed 3", "loss_curve.png", "    test"):
        assert words in card
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "training.json").read_text())
    assert saved["eval"] == record["eval"] and saved["steps"] == 20
    # the card's passkey numbers, measured again on the loaded HF model
    llama = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    _, val, _ = load_corpus(CORPUS)
    grid = subject.passkey_grid(llama, val, (128, 256), per_cell=4, seed=3 + 1, device="cpu")
    assert grid == record["eval"]["passkey"]


def test_text_and_answer_losses_are_averaged_separately():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 256)
    targets = torch.randint(0, 256, (2, 6))
    targets[0, :2] = -100
    answers = torch.zeros(2, 6, dtype=torch.bool)
    answers[1, 4:] = True
    text_loss, answer_loss = subject._split_loss(logits, targets, answers)
    nll = -torch.log_softmax(logits.double(), -1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    text = (targets != -100) & ~answers
    torch.testing.assert_close(text_loss.double(), nll[text].mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(answer_loss.double(), nll[answers].mean(), rtol=1e-6, atol=0)
    none = subject._split_loss(logits, targets, torch.zeros_like(answers))[1]
    assert float(none) == 0.0  # a batch without answers: no NaN


def test_the_schedule_is_compare_s():
    from attnkit.compare import harness

    assert subject.lr_at is harness.lr_at  # one schedule (attnkit.models.training), not a copy


def test_presets_fit_the_size_limit_and_the_help_gives_the_estimate(capsys):
    for name in subject.PRESETS:
        built = DecoderLM(**subject._model_args(subject.PRESETS[name]))
        assert subject.preset_parameters(name) == built.num_parameters()
        assert 2 * built.num_parameters() <= subject.SIZE_LIMIT_BYTES
    assert subject.preset_parameters("default") > 8_000_000  # the shipped one is not a toy
    minutes = subject.estimate_h200_seconds("default") / 60
    assert 1 < minutes < 10
    with pytest.raises(SystemExit):
        main(["train-subject", "--help"])
    assert f"about {minutes:.1f} min on one H200" in " ".join(capsys.readouterr().out.split())


@pytest.fixture
def quick_eval(trained, monkeypatch):
    """The folder-writing tests skip the evaluation (the card takes the trained run's numbers)."""
    monkeypatch.setattr(subject, "evaluate", lambda *args: trained[1]["eval"])


def test_every_option_names_its_default():
    from attnkit.cli import build_parser

    parser = next(a for a in build_parser()._actions if a.dest == "command").choices["train-subject"]
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help and "default" in action.help, f"{action.option_strings}: {action.help!r}"
        assert all(str(choice) in action.help for choice in action.choices or ())


def test_out_is_refused_when_not_empty_and_replaced_with_force(tmp_path, quick_eval):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(ValueError, match="is not empty; pass --force"):
        subject.train_subject(out, preset="tiny", steps=1, corpus=CORPUS)
    subject.train_subject(out, preset="tiny", steps=2, corpus=CORPUS, force=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_stopped_run_resumes_to_the_same_weights(tmp_path, quick_eval):
    whole = subject.train_subject(tmp_path / "whole", preset="tiny", steps=12, corpus=CORPUS)
    out = tmp_path / "not" / "yet" / "resumed"  # the checkpoint's folder is created too
    stopped = subject.train_subject(out, preset="tiny", steps=12, corpus=CORPUS, max_minutes=1e-9)
    assert stopped == {"finished": False, "step": 5, "steps": 12, "checkpoint": str(subject.checkpoint_path(out))}
    assert subject.checkpoint_path(out).exists() and not out.exists()
    with pytest.raises(ValueError, match="holds an unfinished run with other settings"):
        subject.train_subject(out, preset="tiny", steps=13, corpus=CORPUS)
    resumed = subject.train_subject(out, preset="tiny", steps=12, corpus=CORPUS)
    assert resumed["finished"] and resumed["resumed_at_steps"] == [5]
    assert "resumed from checkpoints at steps 5" in (out / "README.md").read_text()
    assert not subject.checkpoint_path(out).exists()
    assert resumed["loss_curve"][:1] == whole["loss_curve"][:1] and len(resumed["loss_curve"]) == len(whole["loss_curve"])
    for (name, a), b in zip(whole["model"].state_dict().items(), resumed["model"].state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_the_command_trains_stops_and_resumes(tmp_path, quick_eval, capsys):
    argv = ["train-subject", "--out", str(tmp_path / "m"), "--preset", "tiny", "--steps", "12", "--corpus", CORPUS]
    assert main([*argv, "--max-minutes", "1e-9"]) == 3
    err = capsys.readouterr().err
    assert "step 5/12" in err and "stopped at step 5 of 12" in err and "run the same command again" in err
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "found the checkpoint" in captured.err and "step 12/12 (100%)" in captured.err
    assert f"wrote {tmp_path / 'm'}" in captured.out
    assert "resumed from checkpoints at steps 5" in (tmp_path / "m" / "README.md").read_text()


def test_a_budget_chooses_the_steps_and_steps_n_reproduces_the_run(tmp_path, quick_eval, monkeypatch):
    # the probe says 0.5 s per step: a budget of 0.05 minutes (3 s) leaves 6 of the 12 steps asked
    monkeypatch.setattr(subject, "_probe_steps", lambda *a: {"seconds_per_step": 0.5})
    seen = []
    budgeted = subject.train_subject(tmp_path / "b", preset="tiny", steps=12, corpus=CORPUS, budget_minutes=0.05,
                                     on_budget=seen.append)
    assert budgeted["steps"] == 6 and budgeted["budget"]["steps_chosen"] == 6 and budgeted["budget"]["steps_asked"] == 12
    assert seen == [budgeted["budget"]]
    again = subject.train_subject(tmp_path / "s", preset="tiny", steps=6, corpus=CORPUS)
    assert again["budget"] is None and again["loss_curve"] == budgeted["loss_curve"]
    for (name, a), b in zip(budgeted["model"].state_dict().items(), again["model"].state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_the_probe_leaves_the_model_and_optimiser_untouched():
    model = DecoderLM(**subject._model_args(subject.PRESETS["tiny"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    calls = []

    def step(m, o, batch):
        calls.append(m is model or o is opt)
        m(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
        o.step()

    probe = subject._probe_steps(model, opt, step, lambda i: None, torch.device("cpu"))
    assert len(calls) == subject.PROBE_STEPS and not any(calls) and probe["seconds_per_step"] > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not opt.state


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch, quick_eval):
    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(subject, "_plot_curve", broken)
    with pytest.raises(OSError, match="disk full"):
        subject.train_subject(tmp_path / "model", preset="tiny", steps=1, corpus=CORPUS)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, match", [
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["--seed", "-1"], "--seed must be an integer >= 0, got -1"),
    (["--device", "tpu"], "unknown --device 'tpu'; accepted: cpu, cuda, cuda:N"),
    (["--out", "FILE"], "is a file; accepted: a folder"),
    (["--out", "."], "the folder this process runs in"),
    (["--max-minutes", "0"], "--max-minutes must be a number > 0, got 0.0"),
    (["--budget-minutes", "-1"], "--budget-minutes must be a number > 0, got -1.0"),
    (["--corpus", "/nonexistent/corpus"], "corpus path '/nonexistent/corpus' does not exist"),
])
def test_bad_options_give_clear_errors(argv, match, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("x")
    if "--out" not in argv:
        argv = ["--out", "model", *argv]
    with pytest.raises(SystemExit) if argv[-1] == "huge" else _no_raise():
        code = main(["train-subject", "--preset", "tiny", *argv])
        assert code == 2
    err = capsys.readouterr().err
    assert match in err and "training" not in err  # refused before anything starts
    assert not (tmp_path / "model").exists()


def test_without_transformers_the_command_names_the_extra():
    import subprocess
    import sys

    code = ("import sys\nsys.modules['transformers'] = None\nfrom attnkit.cli import main\n"
            "sys.exit(main(['train-subject', '--out', 'x', '--preset', 'tiny']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "attnkit train-subject: error: attnkit.hf needs transformers" in out.stderr
    assert 'pip install "attnkit[hf]"' in out.stderr


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_the_mixture_rows_match_the_tokenizer(trained):
    """What DecoderLM trains on (bytes of the text) is what the shipped tokenizer produces."""
    from transformers import AutoTokenizer

    from attnkit.tasks.longcontext import fewshot_example

    tokenizer = AutoTokenizer.from_pretrained(trained[0])
    example = fewshot_example(random.Random(0), 4)
    assert tokenizer(example.prompt.decode())["input_ids"] == list(example.prompt)


def test_a_failed_swap_puts_the_users_folder_back(tmp_path, quick_eval, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    real = os.rename

    def failing(src, dst):
        if ".writing-" in str(src):  # the finished folder moving into place
            raise OSError("disk went away")
        return real(src, dst)

    monkeypatch.setattr(subject.os, "rename", failing)
    with pytest.raises(OSError, match="disk went away"):
        subject.train_subject(out, preset="tiny", steps=1, corpus=CORPUS, force=True)
    assert (out / "mine.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_the_shipped_subject_loads_and_retrieves_its_passkeys_at_short_length():
    # item 10: the default subject (trained on the H200, committed as package data) loads offline with
    # transformers and retrieves the passkey as its card says at 512 bytes (card: 0.93 over depths)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = subject.default_subject()
    record = json.loads((path / "training.json").read_text())
    assert (path / "model.safetensors").stat().st_size <= subject.SIZE_LIMIT_BYTES
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    _, val_text, _ = load_corpus(None)
    grid = subject.passkey_grid(model, val_text, [512], depths=(0.25, 0.5, 1.0), per_cell=4, seed=11, device="cpu")
    got = sum(grid["512"].values()) / 3
    assert got >= 0.75, grid  # the card's 512 row is 0.93-0.98 at these depths; 12 prompts leave room for chance
    assert record["eval"]["passkey"]["2048"]["0.5"] >= 0.9
    assert tok("ab")["input_ids"] == [97, 98]
