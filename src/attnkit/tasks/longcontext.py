"""Long-context and in-context prompts for the shipped subject model (``attnkit train-subject``), byte-level.

Three generators, each deterministic given a ``random.Random``; the haystack is real text
(the standard library's source, :func:`attnkit.tasks.load_corpus`), so a model cannot find the
needle by spotting the only non-repetitive bytes:

- :func:`passkey_example`: :mod:`attnkit.tasks.passkey`'s needle ("The pass key is 48213. Remember
  it. ...") at ``depth`` of the haystack (0: first, 1: last), the question at the end::

      <haystack[:cut]> The pass key is 48213. ... <haystack[cut:]> What is the pass key? The pass key is | 48213

- :func:`multikey_example`: ``num_pairs`` needles "The pass key of <name> is <key>." at random
  depths, one name asked at the end.
- :func:`fewshot_example`: in-context classification. ``shots`` lines ``Input: <word>`` /
  ``Label: <label>`` labelled by a rule (the word's category, whether it starts with a vowel,
  whether it is short), then an unlabelled query. The two label words are drawn afresh for every
  prompt and assigned to the classes at random, so the mapping can only be read from the shots.

Every example is an :class:`Example` (prompt bytes, answer bytes, where the asked needle starts).
:class:`SubjectMixture` packs examples and plain text windows into training rows of a fixed
length, with the loss on the answers of the synthetic examples and on every byte of the text.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

from .base import whole_number
from .passkey import QUESTION, _needle

__all__ = ["Example", "passkey_example", "multikey_example", "fewshot_example", "SubjectMixture", "KINDS",
           "FEWSHOT_RULES", "PASSKEY_MIN_LENGTH"]

KINDS = ("text", "passkey", "multikey", "fewshot")
FEWSHOT_RULES = ("category", "vowel", "length")
SEPARATOR = b"\n\n"
DIGITS = 5

NAMES = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima",
         "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey",
         "xray", "yankee", "zulu", "amber", "cobalt", "saffron", "indigo", "maple", "cedar")
CATEGORIES = {
    "fruit": ("apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "melon", "kiwi", "fig"),
    "animal": ("horse", "tiger", "zebra", "otter", "camel", "eagle", "mouse", "sheep", "whale", "snake", "goat", "wolf"),
    "colour": ("red", "green", "blue", "yellow", "purple", "orange", "black", "white", "brown", "pink", "grey", "teal"),
    "tool": ("hammer", "saw", "drill", "wrench", "chisel", "pliers", "shovel", "rake", "axe", "ladder", "file", "vise"),
    "city": ("paris", "london", "tokyo", "lima", "cairo", "oslo", "rome", "delhi", "madrid", "dublin", "quito", "riga"),
}
LABELS = ("foo", "bar", "yes", "no", "red", "blue", "up", "down", "left", "right", "zip", "zap", "cat", "dog", "one",
          "two", "hot", "cold", "north", "south", "alpha", "beta", "on", "off", "sun", "moon", "A", "B", "X", "Y")
_VOWELS, _CONSONANTS = "aeiou", "bcdfghjklmnprstvwz"
FEWSHOT_HEADER = b"Label each word.\n"

# the shortest passkey prompt: the needle, the question and a little haystack
PASSKEY_MIN_LENGTH = len(_needle("0" * DIGITS)) + len(QUESTION) + 16


@dataclass(frozen=True)
class Example:
    """One prompt. ``prompt + answer`` is the full sequence; ``needle_at`` is the byte offset in
    ``prompt`` where the asked needle starts (None for few-shot); ``info`` says how it was made."""

    prompt: bytes
    answer: bytes
    kind: str
    needle_at: int | None = None
    info: dict = field(default_factory=dict)


def _window(rng: random.Random, haystack: bytes, size: int) -> bytes:
    if size > len(haystack):
        raise ValueError(f"the haystack has {len(haystack)} bytes, fewer than the {size} a prompt needs")
    start = rng.randrange(len(haystack) - size + 1)
    return haystack[start : start + size]


def _key(rng: random.Random) -> str:
    return str(rng.randrange(10 ** (DIGITS - 1), 10**DIGITS))


def _check_depth(depth: float) -> float:
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a number in [0, 1] (0: the start of the haystack, 1: its end), got {depth!r}")
    return float(depth)


def passkey_example(rng: random.Random, haystack: bytes, length: int, depth: float) -> Example:
    """A passkey prompt of exactly ``length`` bytes; the needle starts after ``round(depth * n)``
    of the ``n`` haystack bytes; the answer is the 5-digit key."""
    whole_number(length, "length", minimum=PASSKEY_MIN_LENGTH)
    depth = _check_depth(depth)
    key = _key(rng)
    needle = _needle(key)
    n_hay = length - len(needle) - len(QUESTION)
    hay = _window(rng, haystack, n_hay)
    cut = int(round(depth * n_hay))
    prompt = hay[:cut] + needle + hay[cut:] + QUESTION
    return Example(prompt, key.encode(), "passkey", cut, {"length": length, "depth": depth, "key": key})


def _multikey_needle(name: str, key: str) -> bytes:
    return f" The pass key of {name} is {key}. ".encode()


def _multikey_question(name: str) -> bytes:
    return f" What is the pass key of {name}? The pass key of {name} is ".encode()


def multikey_example(rng: random.Random, haystack: bytes, length: int, num_pairs: int) -> Example:
    """``num_pairs`` (name, key) needles at random depths of a haystack, one name asked; exactly
    ``length`` bytes (the prompt) before the key."""
    whole_number(num_pairs, "num_pairs", minimum=1)
    if num_pairs > len(NAMES):
        raise ValueError(f"num_pairs must be in [1, {len(NAMES)}] (the number of names), got {num_pairs}")
    names = rng.sample(NAMES, num_pairs)
    keys = [_key(rng) for _ in names]
    asked = rng.randrange(num_pairs)
    needles = [_multikey_needle(n, k) for n, k in zip(names, keys)]
    question = _multikey_question(names[asked])
    n_hay = length - sum(map(len, needles)) - len(question)
    if n_hay < 16:
        raise ValueError(f"length={length} is too short for num_pairs={num_pairs}: it must be >= "
                         f"{length - n_hay + 16}")
    hay = _window(rng, haystack, n_hay)
    cuts = sorted(rng.randint(0, n_hay) for _ in names)
    parts, offset, needle_at = [], 0, None
    for i, (cut, needle) in enumerate(zip(cuts, needles)):
        start = cuts[i - 1] if i else 0
        parts.append(hay[start:cut])
        offset += cut - start
        if i == asked:
            needle_at = offset
        parts.append(needle)
        offset += len(needle)
    parts += [hay[cuts[-1]:], question]
    prompt = b"".join(parts)
    return Example(prompt, keys[asked].encode(), "multikey", needle_at,
                   {"length": length, "num_pairs": num_pairs, "name": names[asked], "key": keys[asked],
                    "depth": cuts[asked] / n_hay})


def _pseudo_word(rng: random.Random, length: int, first: str | None = None) -> str:
    """A pronounceable made-up word: consonants and vowels alternate after ``first``."""
    letters = [first or rng.choice(_CONSONANTS + _VOWELS)]
    while len(letters) < length:
        letters.append(rng.choice(_CONSONANTS if letters[-1] in _VOWELS else _VOWELS))
    return "".join(letters)


def _fewshot_word(rng: random.Random, rule: str, cls: int, classes: list) -> str:
    if rule == "category":
        return rng.choice(CATEGORIES[classes[cls]])
    if rule == "vowel":  # class 0: starts with a vowel
        return _pseudo_word(rng, rng.randint(3, 8), rng.choice(_VOWELS if cls == 0 else _CONSONANTS))
    return _pseudo_word(rng, rng.randint(2, 4) if cls == 0 else rng.randint(7, 10))  # length: class 0 short


def fewshot_example(rng: random.Random, shots: int, rule: str | None = None, max_length: int | None = None) -> Example:
    """In-context classification by ``rule`` (one of :data:`FEWSHOT_RULES`, default: drawn) with
    ``shots`` labelled words (both classes among them); fewer shots (at least 2) when the prompt
    would exceed ``max_length`` bytes. The answer is the query's label."""
    whole_number(shots, "shots", minimum=2)
    if rule is None:
        rule = rng.choice(FEWSHOT_RULES)
    if rule not in FEWSHOT_RULES:
        raise ValueError(f"rule must be one of {', '.join(FEWSHOT_RULES)}, got {rule!r}")
    classes = rng.sample(sorted(CATEGORIES), 2) if rule == "category" else [0, 1]
    labels = rng.sample(LABELS, 2)  # which label names which class: arbitrary per prompt
    order = [0, 1] + [rng.randrange(2) for _ in range(shots - 2)]
    rng.shuffle(order)
    query_class = rng.randrange(2)
    query = f"Input: {_fewshot_word(rng, rule, query_class, classes)}\nLabel: ".encode()
    lines = [f"Input: {_fewshot_word(rng, rule, c, classes)}\nLabel: {labels[c]}\n".encode() for c in order]
    if max_length is not None:
        while len(lines) > 2 and len(FEWSHOT_HEADER) + sum(map(len, lines)) + len(query) > max_length:
            # drop from the end, but keep both classes shown
            drop = next(i for i in range(len(lines) - 1, -1, -1)
                        if sum(1 for j, c in enumerate(order) if c == order[i] and j != i) > 0)
            del lines[drop], order[drop]
    prompt = FEWSHOT_HEADER + b"".join(lines) + query
    return Example(prompt, labels[query_class].encode(), "fewshot", None,
                   {"rule": rule, "shots": len(lines), "labels": labels, "classes": classes, "query_class": query_class})


@dataclass
class SubjectMixture:
    """Training rows of ``seq_len`` bytes from text windows and packed synthetic examples.

    A row is plain text (loss on every byte) with probability ``weights["text"]``; otherwise it
    packs examples one after another (separated by a blank line, no loss on prompts or
    separators, loss on each answer), each of a kind drawn by the other weights. Passkey and
    multi-key prompts either fill the rest of the row or take a log-uniform length in
    ``[PASSKEY_MIN_LENGTH, rest]``, so every length up to ``seq_len`` is trained; a leftover too
    short for an example is text. Deterministic given the ``random.Random`` passed in.
    """

    train_text: bytes
    seq_len: int
    weights: dict = field(default_factory=lambda: {"text": 0.4, "passkey": 0.3, "multikey": 0.15, "fewshot": 0.15})
    max_pairs: int = 8
    max_shots: int = 16

    def __post_init__(self):
        whole_number(self.seq_len, "seq_len", minimum=2 * PASSKEY_MIN_LENGTH)
        whole_number(self.max_pairs, "max_pairs", minimum=1)
        whole_number(self.max_shots, "max_shots", minimum=2)
        unknown = sorted(set(self.weights) - set(KINDS))
        if unknown or any(isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 for w in self.weights.values()):
            raise ValueError(f"weights must map {', '.join(KINDS)} to numbers >= 0, got {self.weights!r}")
        if sum(w for k, w in self.weights.items() if k != "text") <= 0 and self.weights.get("text", 0) < 1:
            raise ValueError(f"weights give no synthetic kind a positive weight, but text < 1: {self.weights!r}")
        if self.seq_len + 1 < self._min_room():
            raise ValueError(f"seq_len={self.seq_len} is too short for max_pairs={self.max_pairs}: a multi-key prompt "
                             f"needs up to {self._min_room()} bytes; lower max_pairs or raise seq_len")
        if len(self.train_text) < 4 * (self.seq_len + 1):
            raise ValueError(f"train_text has {len(self.train_text)} bytes; seq_len={self.seq_len} needs at least "
                             f"{4 * (self.seq_len + 1)}")

    def _min_room(self) -> int:
        # the longest minimal example: a multi-key prompt with max_pairs needles (<= 40 bytes each)
        return PASSKEY_MIN_LENGTH + 40 * self.max_pairs + DIGITS + len(SEPARATOR)

    def _synthetic(self, rng: random.Random, room: int) -> Example:
        kinds = [k for k in KINDS[1:] if self.weights.get(k, 0) > 0]
        kind = rng.choices(kinds, [self.weights[k] for k in kinds])[0]
        if kind == "fewshot":
            return fewshot_example(rng, rng.randint(2, self.max_shots), max_length=room - 16)
        low = PASSKEY_MIN_LENGTH + (40 * self.max_pairs if kind == "multikey" else 0)
        length = room if rng.random() < 0.5 else int(math.exp(rng.uniform(math.log(low), math.log(room))))
        length = max(low, length - DIGITS)
        if kind == "passkey":
            return passkey_example(rng, self.train_text, length, rng.random())
        return multikey_example(rng, self.train_text, length, rng.randint(1, self.max_pairs))

    def row(self, rng: random.Random) -> tuple[bytes, bytes]:
        """``(sequence of seq_len + 1 bytes, loss mask of the same length)``: byte ``i`` of the mask
        is 0 where byte ``i`` is no target, 1 for text, 2 for an answer."""
        total = self.seq_len + 1
        if rng.random() < self.weights.get("text", 0):
            return _window(rng, self.train_text, total), b"\x01" * total
        seq, mask = bytearray(), bytearray()
        low = self._min_room()
        while len(seq) < total:
            room = total - len(seq)
            if room < low:
                seq += _window(rng, self.train_text, room)
                mask += b"\x01" * room
                break
            example = self._synthetic(rng, room - len(SEPARATOR))
            seq += example.prompt + example.answer + SEPARATOR
            mask += b"\x00" * len(example.prompt) + b"\x02" * len(example.answer) + b"\x00" * len(SEPARATOR)
        return bytes(seq[:total]), bytes(mask[:total])

    def batch(self, batch_size: int, rng: random.Random, *, answers: bool = False):
        """``inputs, targets [B, seq_len]`` (targets ``-100`` where no loss is taken); with
        ``answers=True`` also a boolean ``[B, seq_len]``, True where the target is an answer byte
        (the trainer averages the loss over answers and over text separately: a few answer bytes
        per row would otherwise weigh next to nothing against thousands of text bytes)."""
        whole_number(batch_size, "batch_size", minimum=1)
        rows = [self.row(rng) for _ in range(batch_size)]
        total = self.seq_len + 1
        seq = torch.frombuffer(bytearray(b"".join(s for s, _ in rows)), dtype=torch.uint8).view(batch_size, total).long()
        mask = torch.frombuffer(bytearray(b"".join(m for _, m in rows)), dtype=torch.uint8).view(batch_size, total)
        targets = seq[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        return (seq[:, :-1], targets, mask[:, 1:] == 2) if answers else (seq[:, :-1], targets)
