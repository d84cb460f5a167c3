"""Passkey retrieval: a number hidden in filler text, asked for at the end.

The long-context probe of Landmark Attention (Mohtashami & Jaggi, arXiv 2305.16300) that
DuoAttention, LongHeads and S2-Attention report. Byte-level::

    <filler ...> The pass key is 48213. Remember it. 48213 is the pass key. <filler ...>
    What is the pass key? The pass key is 48213

The needle sits at ``depth`` (0 = start, 1 = end of the filler); the total length is
``length`` bytes before the answer. Training takes the loss on the answer digits only;
evaluation generates the digits greedily and counts exact matches, per depth.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import Task, number_tuple, whole_number

__all__ = ["Passkey"]

FILLER = b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = b" What is the pass key? The pass key is "


def _needle(key: str) -> bytes:
    return f" The pass key is {key}. Remember it. {key} is the pass key. ".encode()


@dataclass
class Passkey(Task):
    length: int = 256
    digits: int = 5
    eval_depths: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    eval_per_depth: int = 32
    eval_seed: int = 4242
    vocab_size: int = field(default=256, init=False)

    name = "passkey"
    metric = "accuracy"
    higher_is_better = True

    def __post_init__(self):
        for name in ("length", "digits", "eval_seed"):
            whole_number(getattr(self, name), name)
        whole_number(self.eval_per_depth, "eval_per_depth", minimum=1)
        self.eval_depths = number_tuple(self.eval_depths, "eval_depths", float)
        if not 1 <= self.digits <= 12:
            raise ValueError(f"digits must be in [1, 12], got {self.digits}")
        fixed = len(_needle("0" * self.digits)) + len(QUESTION)
        if self.length < fixed + 8:
            raise ValueError(f"length={self.length} leaves no room for filler; it must be >= {fixed + 8}")
        for d in self.eval_depths:
            if not 0.0 <= d <= 1.0:
                raise ValueError(f"eval_depths must lie in [0, 1], got {d}")

    @property
    def seq_len(self) -> int:
        return self.length + self.digits

    def config(self) -> dict:
        return {"task": self.name, "length": self.length, "digits": self.digits, "eval_depths": list(self.eval_depths),
                "eval_per_depth": self.eval_per_depth, "eval_seed": self.eval_seed}

    def example(self, key: str, depth: float) -> tuple[bytes, bytes]:
        """(prompt of exactly ``length`` bytes, answer digits)."""
        needle = _needle(key)
        n_filler = self.length - len(needle) - len(QUESTION)
        filler = (FILLER * (n_filler // len(FILLER) + 1))[:n_filler]
        cut = int(round(depth * n_filler))
        prompt = filler[:cut] + needle + filler[cut:] + QUESTION
        assert len(prompt) == self.length
        return prompt, key.encode()

    def _key(self, generator) -> str:
        low, high = 10 ** (self.digits - 1), 10**self.digits
        return str(int(torch.randint(low, high, (1,), generator=generator)))

    def train_batch(self, batch_size, generator):
        inputs, targets = [], []
        for _ in range(batch_size):
            depth = float(torch.rand(1, generator=generator))
            prompt, answer = self.example(self._key(generator), depth)
            seq = torch.tensor(list(prompt + answer), dtype=torch.long)
            target = torch.full_like(seq, -100)
            # position t predicts token t+1: the last prompt byte and the answer digits but the last
            target[self.length - 1 : self.length - 1 + self.digits] = seq[self.length : self.length + self.digits]
            inputs.append(seq)
            targets.append(target)
        return torch.stack(inputs), torch.stack(targets)

    @torch.no_grad()
    def evaluate(self, model, device, *, batch_size: int = 64) -> dict:
        generator = torch.Generator().manual_seed(self.eval_seed)
        was_training = model.training
        model.eval()
        per_depth = {}
        for depth in self.eval_depths:
            keys = [self._key(generator) for _ in range(self.eval_per_depth)]
            prompts = torch.tensor([list(self.example(k, depth)[0]) for k in keys], dtype=torch.long, device=device)
            out = model.generate(prompts, max_new_tokens=self.digits)[:, self.length :]
            got = [bytes(row.tolist()).decode(errors="replace") for row in out.cpu()]
            per_depth[str(depth)] = sum(g == k for g, k in zip(got, keys)) / len(keys)
        model.train(was_training)
        return {"accuracy": sum(per_depth.values()) / len(per_depth), "per_depth": per_depth, "chance": 10.0**-self.digits}
