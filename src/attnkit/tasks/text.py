"""Language modelling on a real corpus, byte-level.

Built-in default: the Python standard library's own source files (present on every
machine with Python; found through ``sysconfig``), split into train and validation by
file (a CRC of the relative path puts about 1 file in 10 into validation). ``path`` takes
any text file or folder instead. Tokens are bytes (vocab 256), so the validation loss in
nats per token converts directly to bits per byte: ``bpb = loss / ln 2``.
"""

from __future__ import annotations

import math
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .base import Task, whole_number

__all__ = ["TextCorpus", "stdlib_path", "load_corpus"]

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")


def stdlib_path() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    skip = {"site-packages", "__pycache__", "test", "tests", "idlelib", "lib2to3"}
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES and not (skip & set(p.parts))]
    return sorted(files)


def load_corpus(path=None, *, val_every: int = 10, max_bytes: int = 16 << 20) -> tuple[bytes, bytes, dict]:
    """(train bytes, validation bytes, info). Files go to validation when crc32(path) % val_every == 0."""
    root = Path(path) if path is not None else stdlib_path()
    if not root.exists():
        raise ValueError(f"corpus path {str(root)!r} does not exist; give a text file or a folder of text files")
    files = _files(root)
    if not files:
        raise ValueError(f"corpus path {str(root)!r} holds no text files ({', '.join(TEXT_SUFFIXES)})")
    train, val = [], []
    sizes = [0, 0]
    for f in files:
        rel = str(f.relative_to(root)) if f != root else f.name
        data = f.read_bytes()
        is_val = len(files) > 1 and zlib.crc32(rel.encode()) % val_every == 0
        if sizes[is_val] >= (max_bytes // 8 if is_val else max_bytes):
            continue
        (val if is_val else train).append(data)
        sizes[is_val] += len(data)
    if len(files) == 1:  # one file: the last tenth validates
        data = train[0]
        cut = len(data) - len(data) // val_every
        train, val = [data[:cut]], [data[cut:]]
    train_bytes, val_bytes = b"\n".join(train), b"\n".join(val)
    info = {"root": str(root), "files": len(files), "train_bytes": len(train_bytes), "val_bytes": len(val_bytes)}
    return train_bytes, val_bytes, info


@dataclass
class TextCorpus(Task):
    seq_len: int = 256
    path: str | None = None
    eval_windows: int = 256
    eval_seed: int = 777

    name = "text"
    metric = "bits_per_byte"
    higher_is_better = False
    vocab_size = 256

    def __post_init__(self):
        whole_number(self.seq_len, "seq_len", minimum=2)
        whole_number(self.eval_windows, "eval_windows", minimum=1)
        whole_number(self.eval_seed, "eval_seed")
        train, val, self.info = load_corpus(self.path)
        if len(train) <= self.seq_len + 1 or len(val) <= self.seq_len + 1:
            raise ValueError(f"corpus too small for seq_len={self.seq_len}: {self.info}")
        self._train = torch.frombuffer(bytearray(train), dtype=torch.uint8)
        self._val = torch.frombuffer(bytearray(val), dtype=torch.uint8)

    def config(self) -> dict:
        return {"task": self.name, "seq_len": self.seq_len, "path": self.info["root"],
                "train_bytes": self.info["train_bytes"], "val_bytes": self.info["val_bytes"],
                "eval_windows": self.eval_windows, "eval_seed": self.eval_seed}

    def _windows(self, data: torch.Tensor, starts: torch.Tensor):
        idx = starts[:, None] + torch.arange(self.seq_len + 1)
        chunk = data[idx].long()
        return chunk[:, :-1], chunk[:, 1:]

    def train_batch(self, batch_size, generator):
        starts = torch.randint(0, len(self._train) - self.seq_len - 1, (batch_size,), generator=generator)
        return self._windows(self._train, starts)

    @torch.no_grad()
    def evaluate(self, model, device, *, batch_size: int = 64) -> dict:
        generator = torch.Generator().manual_seed(self.eval_seed)
        starts = torch.randint(0, len(self._val) - self.seq_len - 1, (self.eval_windows,), generator=generator)
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        for i in range(0, len(starts), batch_size):
            inputs, targets = self._windows(self._val, starts[i : i + batch_size])
            logits = model(inputs.to(device)).float()
            total += float(F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten(), reduction="sum"))
            count += targets.numel()
        model.train(was_training)
        loss = total / count
        return {"val_loss": loss, "bits_per_byte": loss / math.log(2), "tokens": count}
