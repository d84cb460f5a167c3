"""Task generators: answers at the right positions, determinism, corpus split, bad options."""

import math

import pytest
import torch

from attnkit.tasks import MQAR, Passkey, TextCorpus, load_corpus


def test_mqar_targets_are_the_values_of_the_queried_keys():
    task = MQAR(vocab_size=64, seq_len=48, num_pairs=6)
    inputs, targets = task.generate(16, torch.Generator().manual_seed(0))
    N = 6
    for row_in, row_t in zip(inputs, targets):
        keys, values = row_in[0 : 2 * N : 2], row_in[1 : 2 * N : 2]
        assert len(set(keys.tolist())) == N and (keys >= 1).all() and (keys < 32).all()
        assert (values >= 32).all() and (values < 64).all()
        pairs = dict(zip(keys.tolist(), values.tolist()))
        queried = (row_t != -100).nonzero().flatten()
        assert len(queried) == N and (queried >= 2 * N).all()
        for p in queried.tolist():
            key = int(row_in[p])
            assert int(row_t[p]) == pairs[key]  # predict the key's value as the next token
        assert sorted(int(row_in[p]) for p in queried) == sorted(keys.tolist())  # every key asked once
        rest = torch.ones(len(row_in), dtype=torch.bool)
        rest[: 2 * N] = False
        rest[queried] = False
        assert (row_in[rest] >= 1).all() and (row_in[rest] < 64).all()  # random filler (Zoology's)
        assert len(set(row_in[rest].tolist())) > 8


def test_mqar_zero_filler():
    task = MQAR(vocab_size=64, seq_len=48, num_pairs=6, filler="zero")
    inputs, targets = task.generate(4, torch.Generator().manual_seed(0))
    queried = targets != -100
    rest = queried.clone()
    rest[:, :12] = True
    assert (inputs[~rest] == 0).all()
    assert (inputs[queried] >= 1).all() and (inputs[queried] < 32).all()


def test_mqar_is_deterministic_per_seed():
    task = MQAR()
    a = task.generate(4, torch.Generator().manual_seed(3))
    b = task.generate(4, torch.Generator().manual_seed(3))
    c = task.generate(4, torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_pairs=20, seq_len=64), "too short"),
    (dict(vocab_size=16, num_pairs=8), "num_pairs"),
    (dict(vocab_size=4), "vocab_size"),
    (dict(filler="noise"), "filler"),
])
def test_mqar_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MQAR(**kwargs)


def test_passkey_needle_depth_and_answer():
    task = Passkey(length=200, digits=5)
    for depth in (0.0, 0.5, 1.0):
        prompt, answer = task.example("48213", depth)
        assert len(prompt) == 200 and answer == b"48213"
        at = prompt.index(b"The pass key is 48213")
        assert prompt.endswith(b"The pass key is ")
        filler = 200 - len(b" The pass key is 48213. Remember it. 48213 is the pass key. ") - len(b" What is the pass key? The pass key is ")
        assert abs(at - 1 - round(depth * filler)) <= 1  # the needle's leading space sits at the cut
    inputs, targets = task.train_batch(3, torch.Generator().manual_seed(0))
    assert inputs.shape == (3, 205)
    for row_in, row_t in zip(inputs, targets):
        kept = (row_t != -100).nonzero().flatten().tolist()
        assert kept == list(range(199, 204))
        assert bytes(row_t[199:204].tolist()) == bytes(row_in[200:205].tolist())
        key = bytes(row_in[200:205].tolist())
        assert b"The pass key is " + key in bytes(row_in[:200].tolist())


def test_passkey_bad_options():
    with pytest.raises(ValueError, match="length"):
        Passkey(length=50)
    with pytest.raises(ValueError, match="eval_depths"):
        Passkey(eval_depths=(1.5,))


def test_passkey_eval_counts_exact_matches():
    class Oracle(torch.nn.Module):
        """Answers by reading the key out of the prompt: evaluate must score it 100%."""

        def generate(self, prompts, max_new_tokens):
            out = []
            for row in prompts.tolist():
                text = bytes(row)
                i = text.index(b"The pass key is ") + len(b"The pass key is ")
                out.append(row + list(text[i : i + max_new_tokens]))
            return torch.tensor(out)

    task = Passkey(length=200, eval_per_depth=4)
    result = task.evaluate(Oracle(), "cpu")
    assert result["accuracy"] == 1.0 and set(result["per_depth"].values()) == {1.0}


def test_text_corpus_split_by_file(tmp_path):
    for i in range(30):
        (tmp_path / f"f{i}.py").write_text(f"# file {i}\n" + "x = 1\n" * 100)
    train, val, info = load_corpus(tmp_path)
    assert info["files"] == 30 and len(train) > len(val) > 0
    train_text, val_text = train.decode(), val.decode()
    for i in range(30):
        marker = f"# file {i}\n"
        assert (marker in train_text) != (marker in val_text)  # every file on exactly one side
    task = TextCorpus(seq_len=32, path=str(tmp_path), eval_windows=8)
    x, y = task.train_batch(4, torch.Generator().manual_seed(0))
    assert x.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1])


def test_text_default_corpus_is_the_stdlib():
    task = TextCorpus(seq_len=64, eval_windows=4)
    assert task.info["files"] > 100 and task.info["val_bytes"] > 10_000


def test_text_eval_bits_per_byte_of_uniform_model_is_8():
    class Uniform(torch.nn.Module):
        def forward(self, tokens):
            return torch.zeros(*tokens.shape, 256)

    task = TextCorpus(seq_len=32, eval_windows=4)
    result = task.evaluate(Uniform(), "cpu")
    assert result["bits_per_byte"] == pytest.approx(8.0)
    assert result["val_loss"] == pytest.approx(math.log(256))


def test_text_bad_path():
    with pytest.raises(ValueError, match="does not exist"):
        TextCorpus(path="/nonexistent/corpus")


def test_mqar_plain_training_batches_are_the_evaluation_generator():
    """Without the training-data knobs, train_batch is generate (the data of earlier versions)."""
    task = MQAR(vocab_size=64, seq_len=32, num_pairs=4)
    a = task.train_batch(8, torch.Generator().manual_seed(1))
    b = task.generate(8, torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def _check_rows(task, inputs, targets):
    """Every row is a valid MQAR example of some (length, pairs) of the mixture; returns them."""
    seen = []
    for row_in, row_t in zip(inputs, targets):
        queried = (row_t != -100).nonzero().flatten()
        N = len(queried)
        keys, values = row_in[0 : 2 * N : 2], row_in[1 : 2 * N : 2]
        pairs = dict(zip(keys.tolist(), values.tolist()))
        assert len(pairs) == N and (keys < task.vocab_size // 2).all() and (values >= task.vocab_size // 2).all()
        assert sorted(int(row_in[p]) for p in queried) == sorted(keys.tolist())
        assert all(int(row_t[p]) == pairs[int(row_in[p])] for p in queried)
        length = min(length for length, pairs_ in task._train_combos if pairs_ == N and length > int(queried.max()))
        seen.append((length, N))
    return seen


def test_mqar_training_mixture_of_pairs_and_lengths():
    task = MQAR(vocab_size=64, seq_len=32, num_pairs=4, train_num_pairs="2/4/8", train_seq_lens=(16, 32))
    assert task.train_num_pairs == (2, 4, 8) and task._train_combos == [(16, 2), (16, 4), (32, 2), (32, 4), (32, 8)]
    inputs, targets = task.train_batch(200, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (200, 32)
    seen = _check_rows(task, inputs, targets)
    assert {n for _, n in seen} == {2, 4, 8}  # every pair count drawn
    short = [i for i, row in enumerate(targets) if (row[16:] == -100).all()]
    assert 40 < len(short) < 160  # about 2 of the 5 combinations ask only within the first 16 tokens
    assert task.config()["train_num_pairs"] == (2, 4, 8)  # part of the cache key
    # evaluation data is unchanged by the mixture
    plain = MQAR(vocab_size=64, seq_len=32, num_pairs=4)
    assert torch.equal(task.generate(4, torch.Generator().manual_seed(3))[0], plain.generate(4, torch.Generator().manual_seed(3))[0])


def test_mqar_gap_power_asks_soon_after_the_pairs():
    def median_slot(power):
        task = MQAR(vocab_size=256, seq_len=128, num_pairs=4, train_gap_power=power)
        inputs, targets = task.train_batch(256, torch.Generator().manual_seed(0))
        _check_rows(task, inputs, targets)
        pos = (targets != -100).nonzero()[:, 1].double()
        return float(((pos - 8) / 2).median())  # slot index after the 4 pairs

    zoology, uniform = median_slot(0.01), median_slot(1.0)
    # 60 slots: uniform's median is about 30; with weight ~1/g half of the mass lies in the first ~5 slots
    assert zoology < 10 < 25 < uniform


@pytest.mark.parametrize("kwargs, match", [
    (dict(train_num_pairs="2/x"), "train_num_pairs must be integers"),
    (dict(train_num_pairs=(0, 2)), "train_num_pairs must be in"),
    (dict(train_seq_lens=(128,)), r"train_seq_lens must lie in \[4, seq_len=64\]"),
    (dict(train_seq_lens=(8,), train_num_pairs=(4,)), "leave no combination"),
    (dict(train_gap_power=0), r"train_gap_power must be a number in \(0, 1\]"),
    (dict(eval_examples=0), "eval_examples must be an integer >= 1"),
    (dict(seq_len="64"), "seq_len must be an integer"),
])
def test_mqar_bad_training_knobs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MQAR(**kwargs)


def test_passkey_and_text_option_types(tmp_path):
    assert Passkey(eval_depths="0/0.5/1").eval_depths == (0.0, 0.5, 1.0)  # the command line's form
    with pytest.raises(ValueError, match="eval_per_depth must be an integer >= 1"):
        Passkey(eval_per_depth=0)
    with pytest.raises(ValueError, match="eval_windows must be an integer >= 1"):
        TextCorpus(seq_len=32, eval_windows=0, path=str(tmp_path))
