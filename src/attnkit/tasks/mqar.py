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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .base import Task, masked_accuracy

__all__ = ["MQAR"]


@dataclass
class MQAR(Task):
    vocab_size: int = 256
    seq_len: int = 64
    num_pairs: int = 8
    eval_examples: int = 1024
    eval_seed: int = 12345
    filler: str = "random"

    name = "mqar"
    metric = "accuracy"
    higher_is_better = True

    def __post_init__(self):
        if not 8 <= self.vocab_size <= 65536:
            raise ValueError(f"vocab_size must be in [8, 65536], got {self.vocab_size}")
        if self.filler not in ("random", "zero"):
            raise ValueError(f"filler must be 'random' or 'zero', got {self.filler!r}")
        if self.num_pairs < 1 or self.num_pairs > self.vocab_size // 2 - 1:
            raise ValueError(f"num_pairs must be in [1, vocab_size/2 - 1 = {self.vocab_size // 2 - 1}], got {self.num_pairs}")
        if self.seq_len < 4 * self.num_pairs:
            raise ValueError(
                f"seq_len={self.seq_len} is too short for num_pairs={self.num_pairs}: "
                f"the pairs and their queries need at least 4 * num_pairs = {4 * self.num_pairs} tokens"
            )

    def config(self) -> dict:
        return {"task": self.name, **asdict(self)}

    def generate(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs, targets ``[B, T]`` (targets -100 except at queried keys)."""
        B, T, N, V = batch_size, self.seq_len, self.num_pairs, self.vocab_size
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
        # queries: every key once, in random order, at random two-token slots after the pairs;
        # the slot's second token stays filler (the answer is never shown)
        order = torch.rand(B, N, generator=generator).argsort(dim=1)
        slots = (T - 2 * N) // 2
        chosen = torch.rand(B, slots, generator=generator).argsort(dim=1)[:, :N].sort(dim=1).values
        pos = 2 * N + 2 * chosen  # (B, N) positions of the queried keys
        q_keys = keys.gather(1, order)
        q_values = values.gather(1, order)
        inputs.scatter_(1, pos, q_keys)
        targets.scatter_(1, pos, q_values)
        return inputs, targets

    def train_batch(self, batch_size, generator):
        return self.generate(batch_size, generator)

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
