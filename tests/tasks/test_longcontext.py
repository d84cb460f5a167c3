"""The subject model's prompt generators and training mixture (attnkit.tasks.longcontext)."""

import random
import re

import pytest
import torch

from attnkit.tasks.longcontext import (CATEGORIES, FEWSHOT_RULES, PASSKEY_MIN_LENGTH, SubjectMixture, fewshot_example,
                                       multikey_example, passkey_example)
from attnkit.tasks.passkey import QUESTION, _needle

# real-looking text with digits in it, long enough for every prompt here
HAYSTACK = b"".join(f"def f{i}(x):\n    return x * {i} + {i * 7}  # line {i}\n".encode() for i in range(3000))


@pytest.mark.parametrize("length", [PASSKEY_MIN_LENGTH, 300, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_passkey_needle_at_the_stated_depth_and_question_at_the_end(length, depth):
    e = passkey_example(random.Random(3), HAYSTACK, length, depth)
    key = e.answer.decode()
    assert len(e.prompt) == length and re.fullmatch(rb"\d{5}", e.answer)
    needle = _needle(key)
    n_hay = length - len(needle) - len(QUESTION)
    assert e.needle_at == round(depth * n_hay)
    assert e.prompt[e.needle_at : e.needle_at + len(needle)] == needle
    assert e.prompt.endswith(QUESTION)
    # the haystack around the needle is one contiguous window of the text
    assert e.prompt[: e.needle_at] + e.prompt[e.needle_at + len(needle) : -len(QUESTION)] in HAYSTACK


def test_multikey_asks_one_of_its_needles():
    for seed in range(20):
        e = multikey_example(random.Random(seed), HAYSTACK, 1500, 1 + seed % 8)
        name, key = e.info["name"], e.info["key"]
        assert len(e.prompt) == 1500 and e.answer == key.encode()
        assert e.prompt[e.needle_at :].startswith(f" The pass key of {name} is {key}. ".encode())
        assert e.prompt.endswith(f" What is the pass key of {name}? The pass key of {name} is ".encode())
        names = re.findall(rb" The pass key of (\w+) is \d{5}\. ", e.prompt)
        assert len(names) == e.info["num_pairs"] == len(set(names))


def test_fewshot_labels_follow_the_rule_and_are_arbitrary_per_prompt():
    assignments = set()
    for seed in range(60):
        e = fewshot_example(random.Random(seed), 8)
        shots = re.findall(rb"Input: (\w+)\nLabel: (\w+)\n", e.prompt)
        query = re.search(rb"Input: (\w+)\nLabel: $", e.prompt).group(1).decode()
        labels, rule = e.info["labels"], e.info["rule"]
        assert len(shots) == 8 and {lab.decode() for _, lab in shots} == set(labels)  # both classes shown

        def cls(word):
            if rule == "category":
                return next(i for i, c in enumerate(e.info["classes"]) if word in CATEGORIES[c])
            if rule == "vowel":
                return 0 if word[0] in "aeiou" else 1
            return 0 if len(word) <= 4 else 1

        assert all(labels[cls(w.decode())] == lab.decode() for w, lab in shots)
        assert e.answer.decode() == labels[cls(query)] and cls(query) == e.info["query_class"]
        assignments.add((rule, tuple(labels)))
    assert {rule for rule, _ in assignments} == set(FEWSHOT_RULES)
    assert len(assignments) > 30  # label words and their order change from prompt to prompt


def test_fewshot_max_length_drops_shots_but_keeps_both_classes():
    e = fewshot_example(random.Random(0), 16, max_length=120)
    assert len(e.prompt) <= 120 or e.info["shots"] == 2
    assert len({lab for lab in re.findall(rb"Label: (\w+)\n", e.prompt)}) == 2


def test_generators_and_mixture_are_deterministic():
    def draw(seed):
        rng = random.Random(seed)
        return (passkey_example(rng, HAYSTACK, 500, 0.3), multikey_example(rng, HAYSTACK, 900, 4),
                fewshot_example(rng, 6), SubjectMixture(HAYSTACK, 512, max_pairs=4).batch(4, rng))

    a, b, c = draw(1), draw(1), draw(2)
    for x, y in zip(a[:3], b[:3]):
        assert x == y
    assert all(torch.equal(x, y) for x, y in zip(a[3], b[3]))
    assert a[0] != c[0] and not torch.equal(a[3][0], c[3][0])


def test_mixture_takes_the_loss_on_answers_and_text_only():
    rng = random.Random(0)
    mix = SubjectMixture(HAYSTACK, 1024, weights={"passkey": 1.0}, max_pairs=2)
    inputs, targets, answers = mix.batch(8, rng, answers=True)
    assert inputs.shape == targets.shape == answers.shape == (8, 1024)
    for x, y, a in zip(inputs, targets, answers):
        seq = bytes(x.tolist())
        ends = [m.end() for m in re.finditer(re.escape(QUESTION), seq)]
        assert ends  # a passkey row holds at least one prompt
        for end in ends:
            # the byte at end - 1 predicts the first digit; the 5 targets are the key of the needle before it
            key = re.findall(rb"The pass key is (\d{5})\. Remember it", seq[:end])[-1]
            answer = y[end - 1 : end - 1 + 5]
            if end - 1 + 5 <= 1024:
                assert bytes(answer.tolist()) == key
        # nothing before the last answer is supervised except the answers themselves
        last = ends[-1] - 1 + 5
        supervised = (y[:last] != -100).nonzero().flatten().tolist()
        assert supervised == [p for end in ends for p in range(end - 1, end + 4)]
        assert a.nonzero().flatten().tolist() == [p for p in supervised + (y[last:] != -100).nonzero().flatten().add(last)
                                                  .tolist() if p < last]  # answers, not the trailing text
    text = SubjectMixture(HAYSTACK, 256, weights={"text": 1.0, "passkey": 0.0}, max_pairs=1)
    inputs, targets, answers = text.batch(2, rng, answers=True)
    assert torch.equal(targets[:, :-1], inputs[:, 1:]) and not answers.any()  # text: every byte, no answer


@pytest.mark.parametrize("call, match", [
    (lambda: passkey_example(random.Random(0), HAYSTACK, 300, 1.5), r"depth must be a number in \[0, 1\].*1\.5"),
    (lambda: passkey_example(random.Random(0), HAYSTACK, 50, 0.5), r"length must be an integer >= \d+, got 50"),
    (lambda: passkey_example(random.Random(0), b"short", 300, 0.5), r"haystack has 5 bytes"),
    (lambda: multikey_example(random.Random(0), HAYSTACK, 900, 0), r"num_pairs must be an integer >= 1, got 0"),
    (lambda: multikey_example(random.Random(0), HAYSTACK, 900, 99), r"num_pairs must be in \[1, 32\].*99"),
    (lambda: multikey_example(random.Random(0), HAYSTACK, 100, 4), r"length=100 is too short for num_pairs=4"),
    (lambda: fewshot_example(random.Random(0), 1), r"shots must be an integer >= 2, got 1"),
    (lambda: fewshot_example(random.Random(0), 4, rule="parity"), r"rule must be one of category, vowel, length"),
    (lambda: SubjectMixture(HAYSTACK, 512, weights={"sound": 1.0}), r"weights must map text, passkey.*sound"),
    (lambda: SubjectMixture(HAYSTACK, 256, max_pairs=8), r"seq_len=256 is too short for max_pairs=8"),
    (lambda: SubjectMixture(b"x" * 1000, 512, max_pairs=2), r"train_text has 1000 bytes"),
])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()
