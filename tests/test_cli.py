"""The ``attnkit`` command: --version, help texts, the shared console helpers, run metadata."""

import io
import re
import subprocess
from pathlib import Path

import pytest

import attnkit
from attnkit.cli import build_parser, main


def test_version(capsys):
    import torch

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"attnkit {attnkit.__version__}") and f"torch {torch.__version__}" in out


def _subparsers(parser):
    import argparse

    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


@pytest.mark.parametrize("command", ["compare", "sinks"])
def test_every_option_names_its_default(command):
    parser = _subparsers(build_parser())[command]
    for action in parser._actions:
        if action.dest in ("help", "models"):
            continue
        assert action.help and "default" in action.help, f"{command} {action.option_strings}: {action.help!r}"
        if action.choices:
            assert all(str(choice) in action.help for choice in action.choices)


def test_console_helpers_live_in_one_module():
    from attnkit import _console, cli

    assert cli.console is _console.console and cli.write_outputs is _console.write_outputs
    assert cli.invoked_command is _console.invoked_command  # bench still imports them from cli
    src = Path(attnkit.__file__).parent
    for module in ("compare/cli.py", "analysis/cli.py"):
        assert "from ..cli import" not in (src / module).read_text(), module  # no import circle


def test_step_printer_prints_each_tenth_once():
    from attnkit._console import StepPrinter

    stream = io.StringIO()
    on_step = StepPrinter("compare", stream).start("mha", 95)
    for step in list(range(7, 95, 7)) + [95]:
        on_step(step, 1.5)
    lines = stream.getvalue().splitlines()
    steps = [int(re.search(r"step (\d+)/95", line).group(1)) for line in lines]
    assert steps == [14, 21, 35, 42, 49, 63, 70, 77, 91, 95]  # the first log step past each 10% mark, and the end
    assert lines[0].startswith("compare: mha: step 14/95 (15%) loss 1.5000, ")


def test_run_metadata():
    from attnkit._meta import code_hash, run_metadata

    meta = run_metadata("cpu")
    root = Path(attnkit.__file__).resolve().parents[2]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode == 0 and (root / "src" / "attnkit").resolve() == Path(attnkit.__file__).resolve().parent:
        assert meta["git"]["commit"] == head.stdout.strip()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        if names:
            assert meta["cpu"]["model"] == names[0] and meta["device"]["name"] == names[0]
    assert re.fullmatch(r"[0-9a-f]{16}", meta["code_hash"]) and meta["code_hash"] == code_hash()
    assert meta["versions"]["attnkit"] == attnkit.__version__ and meta["device"]["type"] == "cpu"


def test_sinks_bad_inputs(tmp_path, capsys):
    assert main(["sinks", str(tmp_path / "nothing")]) == 2
    assert "holds no config.json" in capsys.readouterr().err
    assert main(["sinks", str(tmp_path), "--windows", "0"]) == 2
    assert "--windows must be an integer >= 1, got 0" in capsys.readouterr().err


def test_list_shows_the_hf_methods_after_the_layers(capsys):
    pytest.importorskip("transformers")
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "attnkit.hf methods" in out
    assert out.index("hf-headwise") > out.index("attnkit.hf methods") > out.index("sliding-window")
    assert "2410.10819" in out and "2309.17453" in out
    # the weight tools (not policies) in a table of their own, after the methods
    assert out.index("hf-mergelock") > out.index("attnkit.hf weight tools") > out.index("hf-headwise")
    assert "2509.01548" in out


def test_list_shows_every_kind_and_filters_by_kind(capsys):
    """Every card list is reachable from `attnkit list`: the module kinds of issue 28 each get a
    table with their cards' names; --kind lists one kind only."""
    from attnkit.cli import _MODULE_KINDS
    import importlib

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for kind, module, _ in _MODULE_KINDS:
        cards = importlib.import_module(module, "attnkit").CARDS
        assert cards, kind
        assert f"{kind}: " in out
        for card in cards:
            assert card.name in out, (kind, card.name)
    assert main(["list", "--kind", "vision"]) == 0
    out = capsys.readouterr().out
    assert "lookupvit" in out and "sliding-window" not in out and "mqsa-ted" not in out
    with pytest.raises(SystemExit):
        main(["list", "--kind", "speechh"])
