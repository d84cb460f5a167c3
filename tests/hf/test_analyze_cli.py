"""attnkit analyze: the subcommands on a tiny saved model, and the missing-extra message (issue 25)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from hf_models import tiny

pytest.importorskip("attnkit.hf")
from attnkit.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from attnkit.hf.subject import byte_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny("llama", vocab_size=256, max_position_embeddings=512).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    corpus = folder / "corpus.txt"
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    g = torch.Generator().manual_seed(0)
    corpus.write_text(" ".join(words[i] for i in torch.randint(0, 8, (6000,), generator=g).tolist()))
    return folder, corpus


def test_sinks_waad_patch_write_table_json_png(saved, tmp_path, capsys):
    folder, corpus = saved
    common = ["--model", str(folder), "--corpus", str(corpus), "--out", str(tmp_path)]
    assert main(["analyze", "sinks", *common, "--length", "32", "--windows", "2"]) == 0
    assert main(["analyze", "waad", *common, "--prompt-length", "24", "--new-tokens", "12"]) == 0
    assert main(["analyze", "patch", *common, "--length", "160", "--examples", "1", "--repair-examples", "1",
                 "--pairs", "2", "--top", "2", "--repair-heads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "first-token share" in printed and "preplan tokens" in printed and "circuit overlap" in printed
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["analyze-patch.json", "analyze-patch.png", "analyze-sinks.json", "analyze-sinks.png",
                     "analyze-waad-heads.png", "analyze-waad-signals.png", "analyze-waad.json"]
    sinks = json.loads((tmp_path / "analyze-sinks.json").read_text())
    assert sinks["schema"] == "attnkit.analyze.sinks/1" and len(sinks["layers"]) == 2 and sinks["peak_rss_mib"] > 0
    waad = json.loads((tmp_path / "analyze-waad.json").read_text())
    assert len(waad["credit"]["weights"]) == waad["tokens"] and waad["start"] == 24
    patch = json.loads((tmp_path / "analyze-patch.json").read_text())
    assert len(patch["patching"]["multikey-has"]["normalized"]) == 2 and 0 <= patch["circuit_overlap"]["overlap"] <= 1


def test_bad_options_are_clear(saved, capsys):
    folder, corpus = saved
    assert main(["analyze", "sinks", "--model", str(folder), "--corpus", str(corpus), "--length", "1"]) == 2
    assert "--length must be an integer >= 2, got 1" in capsys.readouterr().err
    assert main(["analyze", "sinks", "--model", str(corpus.parent / "nowhere")]) == 2
    assert "is not a transformers model folder" in capsys.readouterr().err
    assert main(["analyze", "patch", "--model", str(folder), "--examples", "0"]) == 2
    assert "--examples must be an integer >= 1, got 0" in capsys.readouterr().err


def test_analyze_without_transformers_says_so():
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None\n"
        "from attnkit.cli import main\n"
        "sys.exit(main(['analyze', 'sinks', '--length', '8']))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "attnkit analyze needs transformers" in out.stderr and 'pip install "attnkit[hf]"' in out.stderr


def test_patch_refuses_bad_tasks(saved, capsys):
    folder, corpus = saved
    assert main(["analyze", "patch", "--model", str(folder), "--corpus", str(corpus), "--tasks", "passkey"]) == 2
    assert "--tasks must name two different tasks of passkey, multikey, multikey-has, got 'passkey'" in \
        capsys.readouterr().err
