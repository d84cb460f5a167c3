"""Paired tasks of issue 28: retrieval pairs for pooled embeddings, and a two-modality matching task.

:func:`function_pairs`: (docstring, code) pairs of the Python standard library's functions, on disk
(no download): retrieving a function's code from its docstring among held-out functions is the
embedding task of :mod:`attnkit.pooling`.

:class:`TwoModalityMatch`: modality A is a sequence of distinct symbols; modality B a set of noisy
views in another space (each symbol's code vector through a fixed random rotation, plus Gaussian
noise). B's first token views one of A's symbols, the others symbols absent from A; the label is the
position in A of the symbol B's first token shows, so it depends on both modalities and is found only
by matching tokens across them. The fusion blocks of :mod:`attnkit.multimodal` are compared on it.
"""

from __future__ import annotations

import ast
import random
from pathlib import Path

import torch
from torch import Tensor

from .text import stdlib_path

__all__ = ["function_pairs", "TwoModalityMatch"]


def function_pairs(root: Path | None = None, *, max_pairs: int = 1200, max_bytes: int = 80, min_doc: int = 24,
                   seed: int = 0) -> list[tuple[bytes, bytes]]:
    """Up to ``max_pairs`` (docstring, code) byte pairs, each cut to ``max_bytes``: the docstring's
    text, and the function's source with its docstring removed (signature first). Functions of the
    standard library's top-level modules (tests excluded), in a shuffled but seeded order, one pair
    per distinct docstring."""
    for name, value in (("max_pairs", max_pairs), ("max_bytes", max_bytes), ("min_doc", min_doc)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    root = Path(root) if root is not None else stdlib_path()
    if not root.is_dir():
        raise ValueError(f"root must be a folder of Python sources, got {str(root)!r}")
    pairs, seen = [], set()
    for path in sorted(root.glob("*.py")):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.body:
                continue
            doc = ast.get_docstring(node)
            first = node.body[0]
            if not doc or len(doc) < min_doc or doc in seen or len(node.body) < 2:
                continue
            seen.add(doc)
            # the code without its docstring: the signature lines, then the body after the docstring
            head = lines[node.lineno - 1 : first.lineno - 1]
            body = lines[first.end_lineno : node.end_lineno]
            code = "\n".join(line.strip() for line in head + body if line.strip())
            doc_text = " ".join(doc.split())
            pairs.append((doc_text.encode()[:max_bytes], code.encode()[:max_bytes]))
    random.Random(seed).shuffle(pairs)
    return pairs[:max_pairs]


class TwoModalityMatch:
    """Batches of (A symbols (B, n) long, B features (B, n, F) float, label (B,) long).

    Modality A: ``length`` distinct symbols out of ``num_symbols``. Modality B: ``length`` feature
    vectors of width ``feature_dim``, each a symbol's code seen through a fixed random rotation plus
    Gaussian noise of std ``noise`` (codes have unit norm): B's first token views the symbol at a
    random position ``j`` of A, the others view symbols absent from A (distractors), in random order.
    The label is ``j``: which A token B's first token shows, so it depends on both modalities and is
    found by matching tokens across them. The codebook and rotation are fixed by ``world_seed``, the
    samples by the generator passed to :meth:`batch`.
    """

    def __init__(self, *, num_symbols: int = 16, length: int = 6, feature_dim: int = 16, noise: float = 0.3,
                 world_seed: int = 0):
        for name, value in (("num_symbols", num_symbols), ("length", length), ("feature_dim", feature_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ValueError(f"{name} must be an integer >= 2, got {value!r}")
        if num_symbols < 2 * length:
            raise ValueError(f"num_symbols must be >= 2 * length = {2 * length} (A's symbols and B's distractors are "
                             f"distinct), got {num_symbols}")
        if not (isinstance(noise, (int, float)) and not isinstance(noise, bool) and noise >= 0):
            raise ValueError(f"noise must be a number >= 0, got {noise!r}")
        self.num_symbols, self.length, self.feature_dim, self.noise = num_symbols, length, feature_dim, float(noise)
        g = torch.Generator().manual_seed(world_seed)
        codes = torch.nn.functional.normalize(torch.randn(num_symbols, feature_dim, generator=g), dim=-1)
        rotation, _ = torch.linalg.qr(torch.randn(feature_dim, feature_dim, generator=g))
        self.codes = codes @ rotation.T  # (V, F): symbol v seen through modality B

    @property
    def num_classes(self) -> int:
        return self.length

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        n, V = self.length, self.num_symbols
        symbols = torch.argsort(torch.rand(batch_size, V, generator=generator), dim=1)  # a random order of all symbols
        a, others = symbols[:, :n], symbols[:, n : 2 * n - 1]  # A's symbols, B's distractors (not in A)
        label = torch.randint(0, n, (batch_size,), generator=generator)
        viewed = torch.cat([a.gather(1, label[:, None]), others], dim=1)  # (B, n): the query first
        b = self.codes[viewed] + self.noise / self.feature_dim ** 0.5 * torch.randn(batch_size, n, self.feature_dim,
                                                                                  generator=generator)
        return a, b, label
