"""The ``attnkit`` command: ``list``, ``bench``, ``compare``, ``sinks``, ``train-subject``, ``eval``."""

from __future__ import annotations

import argparse
import importlib
import sys

# re-exported for code that imported these from attnkit.cli before they moved to _console
from ._console import console, invoked_command, write_outputs  # noqa: F401

__all__ = ["main"]


# the kinds whose cards are not the registry's layers: (kind, module holding CARDS, how a card is used)
_MODULE_KINDS = (
    ("vision", ".vision", "modules over image patch tokens (attnkit.vision)"),
    ("pooling", ".pooling", "pooling heads over a frozen LM's hidden states (attnkit.pooling)"),
    ("multimodal", ".multimodal", "fusion blocks over tokens of two modalities (attnkit.multimodal)"),
    ("recsys", ".models.recsys", "recommendation models over item ids (attnkit.models.recsys)"),
    ("speech", ".speech", "speech enhancement over STFT spectrograms (attnkit.speech)"),
    ("routing", ".routing", "mixture-of-experts blocks with token routers (attnkit.routing)"),
)


def _cmd_list(args) -> int:
    kind = getattr(args, "kind", None)
    if kind in (None, "layer"):
        _list_layers()
    if kind in (None, "hf"):
        _list_hf()
    if kind in (None, "diffusion"):
        _list_diffusion()
    for name, module, title in _MODULE_KINDS:
        if kind in (None, name):
            cards = importlib.import_module(module, __package__).CARDS
            _card_table(f"{name}: {title}", cards, family=True)
    return 0


def _list_layers() -> None:
    from rich.table import Table

    from . import registry

    table = Table(title="attnkit mechanisms (layers: attnkit.build(name, dim, num_heads))")
    for column in ("name", "family", "paper", "backends", "decode", "causal", "bidirectional", "varlen"):
        table.add_column(column, overflow="fold")
    yes = lambda flag: "yes" if flag else "-"  # noqa: E731
    for card in registry.mechanisms():
        caps = card.capabilities
        table.add_row(
            card.name,
            card.family,
            card.paper,
            ", ".join(caps.backends),
            yes(caps.decode),
            yes(caps.causal),
            yes(caps.bidirectional),
            yes(caps.varlen),
        )
    console().print(table)


def _card_table(title: str, cards, *, family: bool = False) -> None:
    """One table of cards (name, [family,] paper, what it does): every list but the layers'."""
    from rich.table import Table

    table = Table(title=title)
    columns = ("name", "family", "paper", "what it does") if family else ("name", "paper", "what it does")
    for column in columns:
        table.add_column(column, overflow="fold")
    for card in cards:
        table.add_row(*((card.name, card.family) if family else (card.name,)), card.paper, card.summary)
    console().print(table)


def _list_diffusion() -> None:
    try:  # attention sharing in diffusers pipelines: its own list (attnkit.diffusion needs the diffusion extra)
        from .diffusion import CARDS as diffusion_cards
    except ImportError:
        console().print('attnkit.diffusion methods: not available here (pip install "attnkit[diffusion]")')
        return
    _card_table("attnkit.diffusion methods (attnkit.diffusion.apply(pipe, name))", diffusion_cards)


def _list_hf() -> None:
    try:  # the methods on Hugging Face models: their own list (attnkit.hf needs the hf extra)
        from .hf import CARDS as hf_cards
    except ImportError:
        console().print('attnkit.hf methods: not available here (pip install "attnkit[hf]")')
        return
    _card_table("attnkit.hf methods (attnkit.hf.apply(model, name))", hf_cards)
    from .hf.cards import TOOL_CARDS

    _card_table("attnkit.hf weight tools (not attention policies)", TOOL_CARDS)


def _version_text() -> str:
    import torch

    from . import __version__
    from ._meta import git_commit

    commit = git_commit()
    return f"attnkit {__version__}" + (f" (git {commit[:12]})" if commit else "") + f", torch {torch.__version__}"


# (command, module, the function adding its parser, its help line when transformers is missing)
_HF_COMMANDS = (
    ("train-subject", ".hf.subject", "add_train_subject_parser", "train the subject model (needs attnkit[hf])"),
    ("eval", ".hf.eval", "add_eval_parser", "long-context probe of attnkit.hf methods (needs attnkit[hf])"),
    ("identify-duo", ".hf.duo", "add_identify_parser", "find DuoAttention's retrieval heads (needs attnkit[hf])"),
)
_HF_COMMANDS += (
    ("analyze", ".analysis.hf.cli", "add_analyze_parser", "attention analyses of HF models (needs attnkit[hf])"),
)


def _missing_extra_parser(name: str, help_text: str, why: str):
    def add(sub):
        def missing(args):
            raise ValueError(why)
        # no option prefix: whatever options are given, the answer is the missing extra
        p = sub.add_parser(name, help=help_text, prefix_chars="\0")
        p.add_argument("options", nargs="*")
        p.set_defaults(func=missing)

    return add


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnkit", description="attention mechanisms from recent research, one API")
    parser.add_argument("--version", action="version", version=_version_text(),
                        help="print attnkit's version, the git commit it runs from (if any) and torch's version")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list the registered mechanisms, methods and modules of every kind")
    kinds = ("layer", "hf", "diffusion", *(name for name, _, _ in _MODULE_KINDS))
    p_list.add_argument("--kind", choices=kinds, default=None,
                        help=f"list only this kind ({', '.join(kinds)}; default: every kind)")
    p_list.set_defaults(func=_cmd_list)
    from .analysis.cli import add_sinks_parser
    from .bench.cli import add_bench_parser
    from .compare.cli import add_compare_parser

    add_bench_parser(sub)
    add_compare_parser(sub)
    add_sinks_parser(sub)
    # attnkit.hf's commands need transformers (the hf extra); without it each one says so when run
    for name, module, adder, help_text in _HF_COMMANDS:
        try:
            add = getattr(importlib.import_module(module, __package__), adder)
        except ImportError as err:
            add = _missing_extra_parser(name, help_text, str(err))
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"attnkit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
