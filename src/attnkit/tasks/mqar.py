"""MQAR, multi-query associative recall (Zoology: Arora et al., arXiv 2312.04927).

A sequence shows ``num_pairs`` key-value pairs, then asks for every key again in random
order at random places later on; the model must emit the value that followed the key::

    k1 v1 k2 v2 ... kN vN   r r k2 r r r k1 r r ... kN r
                                ^        ^              loss only where a key is queried:
                                target v2 target v1     predict its value as the next token

Keys come from ``[1, V/2)`` (distinct within a sequence), values from ``[V/2, V)``. As in
Zoology's generator (``random_non_queries``), every other position holds a random token from
``[1, V)`` (``filler="random"``; ``"zero"`` fills with token 0), and a queried key is not
followed by its value. Chance accuracy is about ``2 / V``. Generated on the fly from a seed.

The filler matters for training, not for the answer: with zeros between the queries (and the
answers shown after them), a 2-layer MHA sat at the "guess a value not yet asked for"
plateau (0.53 accuracy at 4 pairs, at every step count, width, depth, head count and learning
rate tried). With random filler it can leave the plateau, but when it does depends on the
seed (and even on the thread count, through the order of floating-point sums). On the 2-core
CPU (2 layers, width 128, 8 heads, batch 128): with the 384-wide MLP and 600 steps MHA
escaped in 3 of 6 runs; with the CPU default (MLP 128, 1000 steps, about the same time) MHA
reached 0.976 / 0.976 / 0.978 at seeds 0 / 3 / 4 and stayed at 0.26 ("one of the 4 values")
at seeds 2 and 5 (and 1), escaping between steps 250 and 350 when it did. Not the fix: a
larger vocabulary (1024-8192: smoother but slower learning), 4 heads of width 32, 8 or 16
pairs, learning rate 1e-3 or 1e-2, 1000 steps for a seed that had not escaped by 600 (each
tried on a seed that had failed). The GPU preset (16 pairs, seq 256, width 256, 2 layers) reaches 0.988.

Training-data knobs (evaluation always uses ``seq_len``, ``num_pairs`` and uniform query
slots, so runs with different training data are scored on the same examples):

- ``train_num_pairs`` and ``train_seq_lens``: a Zoology-style mixture. Each training example
  draws one (length, pairs) combination, uniformly among those with ``length >= 4 * pairs``;
  a length below ``seq_len`` places the pairs and queries in the first ``length`` tokens and
  fills the rest with filler that carries no loss (a causal model cannot tell the difference
  from a shorter sequence). On the command line: ``train_num_pairs=2/4/8``.
- ``train_gap_power``: Zoology's power law for where a key is asked again: slot ``g``
  (1-based, after the pairs) with probability proportional to ``g ** (a - 1)``; ``a = 1`` is
  uniform, Zoology's ``a = 0.01`` asks mostly soon after the pairs. ``None``: the uniform
  random slots of the evaluation data.

Left at their defaults (``None``) the training batches are exactly those of earlier versions.
With ``train_num_pairs=(1, 2, 4, 8)`` on the CPU preset, MHA left the plateau at all of seeds 0-9
(accuracy 0.948-0.993, mean 0.968; 0.95 by step 800 at 9 of them) and the no-mixing control
stayed at chance (0.008): ``benchmarks/mqar_seed_sweep.py --recipes mix-pairs``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .base import Task, masked_accuracy, number_tuple, whole_number

__all__ = ["MQAR"]


@dataclass
class MQAR(Task):
    vocab_size: int = 256
    seq_len: int = 64
    num_pairs: int = 8
    eval_examples: int = 1024
    eval_seed: int = 12345
    filler: str = "random"
    train_num_pairs: tuple | None = None
    train_seq_lens: tuple | None = None
    train_gap_power: float | None = None

    name = "mqar"
    metric = "accuracy"
    higher_is_better = True

    def __post_init__(self):
        for name in ("vocab_size", "seq_len", "num_pairs", "eval_seed"):
            whole_number(getattr(self, name), name)
        whole_number(self.eval_examples, "eval_examples", minimum=1)
        if not 8 <= self.vocab_size <= 65536:
            raise ValueError(f"vocab_size must be in [8, 65536], got {self.vocab_size}")
        if self.filler not in ("random", "zero"):
            raise ValueError(f"filler must be 'random' or 'zero', got {self.filler!r}")
        self._check_pairs(self.num_pairs, "num_pairs")
        if self.seq_len < 4 * self.num_pairs:
            raise ValueError(
                f"seq_len={self.seq_len} is too short for num_pairs={self.num_pairs}: "
                f"the pairs and their queries need at least 4 * num_pairs = {4 * self.num_pairs} tokens"
            )
        if self.train_num_pairs is not None:
            self.train_num_pairs = number_tuple(self.train_num_pairs, "train_num_pairs")
            for pairs in self.train_num_pairs:
                self._check_pairs(pairs, "train_num_pairs")
        if self.train_seq_lens is not None:
            self.train_seq_lens = number_tuple(self.train_seq_lens, "train_seq_lens")
            for length in self.train_seq_lens:
                if not 4 <= length <= self.seq_len:
                    raise ValueError(f"train_seq_lens must lie in [4, seq_len={self.seq_len}] (the batch's length is "
                                     f"seq_len), got {length} in {self.train_seq_lens}")
        if self.train_gap_power is not None:
            power = self.train_gap_power
            if isinstance(power, bool) or not isinstance(power, (int, float)) or not 0 < power <= 1:
                raise ValueError(f"train_gap_power must be a number in (0, 1] (1: uniform, Zoology's 0.01: mostly "
                                 f"short gaps) or None, got {power!r}")
            self.train_gap_power = float(power)
        lengths = self.train_seq_lens or (self.seq_len,)
        pair_counts = self.train_num_pairs or (self.num_pairs,)
        # sorted and deduplicated: the mixture, not the order it was written in, defines the data
        self._train_combos = sorted({(length, pairs) for length in lengths for pairs in pair_counts if length >= 4 * pairs})
        if not self._train_combos:
            raise ValueError(f"train_seq_lens={lengths} and train_num_pairs={pair_counts} leave no combination with "
                             f"length >= 4 * pairs (the room the pairs and their queries need)")

    def _check_pairs(self, pairs: int, name: str) -> None:
        if pairs < 1 or pairs > self.vocab_size // 2 - 1:
            raise ValueError(f"{name} must be in [1, vocab_size/2 - 1 = {self.vocab_size // 2 - 1}], got {pairs}")

    def config(self) -> dict:
        return {"task": self.name, **asdict(self)}

    def generate(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs, targets ``[B, T]`` (targets -100 except at queried keys): the evaluation's data."""
        return self._generate(batch_size, self.seq_len, self.num_pairs, generator)

    def _generate(self, batch_size: int, seq_len: int, num_pairs: int, generator: torch.Generator,
                  gap_power: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, N, V = batch_size, seq_len, num_pairs, self.vocab_size
        half = V // 2
        keys = torch.rand(B, half - 1, generator=generator).argsort(dim=1)[:, :N] + 1  # (B, N) distinct
        values = torch.randint(half, V, (B, N), generator=generator)
        if self.filler == "random":
            inputs = torch.randint(1, V, (B, T), generator=generator)
        else:
            inputs = torch.zeros(B, T, dtype=torch.long)
        targets = torch.full((B, T), -100, dtype=torch.long)
        inputs[:, 0 : 2 * N : 2] = keys
        inputs[:, 1 : 2 * N : 2] = values
        # queries: every key once, at two-token slots after the pairs; the slot's second token
        # stays filler (the answer is never shown)
        slots = (T - 2 * N) // 2
        if gap_power is None:  # random order, uniform slots
            order = torch.rand(B, N, generator=generator).argsort(dim=1)
            chosen = torch.rand(B, slots, generator=generator).argsort(dim=1)[:, :N].sort(dim=1).values
            q_keys, q_values = keys.gather(1, order), values.gather(1, order)
        else:  # Zoology: key i asked at slot g_i, drawn without replacement with weight g ** (a - 1)
            weights = torch.arange(1, slots + 1, dtype=torch.float64) ** (gap_power - 1)
            chosen = torch.multinomial(weights.expand(B, slots), N, replacement=False, generator=generator)
            q_keys, q_values = keys, values
        pos = 2 * N + 2 * chosen  # (B, N) positions of the queried keys
        inputs.scatter_(1, pos, q_keys)
        targets.scatter_(1, pos, q_values)
        return inputs, targets

    def train_batch(self, batch_size, generator):
        combos = self._train_combos
        if combos == [(self.seq_len, self.num_pairs)] and self.train_gap_power is None:
            return self.generate(batch_size, generator)  # the plain task: the same batches as before the knobs
        B, T, V = batch_size, self.seq_len, self.vocab_size
        which = torch.randint(len(combos), (B,), generator=generator)
        if self.filler == "random":
            inputs = torch.randint(1, V, (B, T), generator=generator)
        else:
            inputs = torch.zeros(B, T, dtype=torch.long)
        targets = torch.full((B, T), -100, dtype=torch.long)
        for i, (length, pairs) in enumerate(combos):
            rows = (which == i).nonzero().flatten()
            if rows.numel():
                x, y = self._generate(rows.numel(), length, pairs, generator, self.train_gap_power)
                inputs[rows, :length] = x
                targets[rows, :length] = y
        return inputs, targets

    def evaluate(self, model, device, *, batch_size: int = 64) -> dict:
        generator = torch.Generator().manual_seed(self.eval_seed)
        correct = counted = 0
        was_training = model.training
        model.eval()
        for start in range(0, self.eval_examples, batch_size):
            n = min(batch_size, self.eval_examples - start)
            inputs, targets = self.generate(n, generator)
            c, k = masked_accuracy(model, inputs.to(device), targets.to(device))
            correct, counted = correct + c, counted + k
        model.train(was_training)
        return {"accuracy": correct / counted, "chance": 2.0 / self.vocab_size, "queries": counted}
