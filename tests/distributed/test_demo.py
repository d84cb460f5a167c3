"""The README's sequence-parallel example: `python -m attnkit.distributed.demo` (local processes) and
under torchrun; its training and decoding agree with one process or it exits non-zero."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnkit.distributed import demo

SRC = str(Path(demo.__file__).resolve().parents[2])


def test_the_demo_on_local_processes_agrees_with_one_process(capsys):
    assert demo.main(["--world", "2", "--steps", "2", "--seq", "16", "--new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "generated tokens equal" in out and "largest loss difference" in out


def test_the_demo_under_torchrun_as_the_readme_says(tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                          "attnkit.distributed.demo", "--steps", "1", "--seq", "16", "--new-tokens", "4"],
                         capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "generated tokens equal" in run.stdout


@pytest.mark.parametrize("args, message", [(["--world", "0"], "--world must be >= 1"),
                                           (["--world", "3", "--seq", "16"], "--seq 16 must be a multiple of --world 3"),
                                           (["--steps", "-1"], "--steps must be >= 0")])
def test_bad_options_exit_2_with_the_rule(args, message, capsys):
    with pytest.raises(SystemExit) as err:
        demo.main(args)
    assert err.value.code == 2 and message in capsys.readouterr().err
