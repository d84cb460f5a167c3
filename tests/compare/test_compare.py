"""attnkit compare: end-to-end run, reuse of finished runs, schedule, seeding, errors."""

import json

import pytest

from attnkit.compare import CompareConfig, run_compare
from attnkit.compare.harness import lr_at
from attnkit.cli import main

TINY = dict(model={"dim": 32, "num_layers": 1, "num_heads": 2}, train={"batch_size": 8, "warmup": 5},
            task_options={"vocab_size": 32, "seq_len": 32, "num_pairs": 4})


def test_twenty_step_run_and_reuse(tmp_path):
    cfg = CompareConfig(mechanisms=["mha", "no-mixing"], steps=20, cache_dir=str(tmp_path), log_every=5, **TINY)
    first = run_compare(cfg, command="test")
    assert first["schema"] == "attnkit.compare/1"
    assert [r["mechanism"] for r in first["runs"]] == ["mha", "no-mixing"]
    for run in first["runs"]:
        assert not run["reused"]
        assert [s for s, _ in run["loss_curve"]] == [5, 10, 15, 20]
        assert 0.0 <= run["metric"] <= 1.0 and run["params"] > 0 and run["tokens_per_s"] > 0
    assert first["runs"][0]["params"] > first["runs"][1]["params"]  # no-mixing has no q/k
    second = run_compare(cfg, command="test")
    assert all(r["reused"] for r in second["runs"])
    assert second["runs"][0]["loss_curve"] == first["runs"][0]["loss_curve"]
    other = run_compare(CompareConfig(mechanisms=["mha"], steps=20, seed=1, cache_dir=str(tmp_path), log_every=5, **TINY))
    assert not other["runs"][0]["reused"]  # a different seed is a different run


def test_runs_are_deterministic(tmp_path):
    a = run_compare(CompareConfig(mechanisms=["gqa"], steps=10, cache_dir=str(tmp_path / "a"), log_every=5, **TINY))
    b = run_compare(CompareConfig(mechanisms=["gqa"], steps=10, cache_dir=str(tmp_path / "b"), log_every=5, **TINY))
    assert a["runs"][0]["loss_curve"] == b["runs"][0]["loss_curve"]


def test_training_learns_something(tmp_path):
    result = run_compare(CompareConfig(mechanisms=["mha"], steps=60, cache_dir=str(tmp_path), log_every=10,
                                       **{**TINY, "train": {"batch_size": 16, "warmup": 5, "lr": 3e-3}}))
    curve = result["runs"][0]["loss_curve"]
    assert curve[-1][1] < curve[0][1] - 0.3


def test_lr_schedule():
    assert lr_at(0, lr=1.0, warmup=10, steps=100) == pytest.approx(0.1)
    assert lr_at(9, lr=1.0, warmup=10, steps=100) == pytest.approx(1.0)
    assert lr_at(10, lr=1.0, warmup=10, steps=100) == pytest.approx(1.0)
    assert lr_at(100, lr=1.0, warmup=10, steps=100) == pytest.approx(0.1)


def test_save_checkpoints(tmp_path):
    from attnkit.models import DecoderLM

    cfg = CompareConfig(mechanisms=["mqa"], steps=3, cache_dir=str(tmp_path / "c"), log_every=1, **TINY)
    run_compare(cfg, save_dir=tmp_path / "ckpt")
    model = DecoderLM.from_pretrained(tmp_path / "ckpt" / "mqa")
    assert model.config["attention"] == ["mqa"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(mechanisms=["nope"]), "unknown mechanism 'nope'"),
    (dict(task="vision"), "unknown --task"),
    (dict(preset="tpu"), "unknown --preset"),
    (dict(steps=0), "--steps"),
])
def test_bad_config(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_compare(CompareConfig(cache_dir=str(tmp_path), **{**TINY, **kwargs}))


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "c.json"
    code = main(["compare", "--task", "text", "--mechanisms", "mha", "--steps", "4", "--model", "dim=32,num_layers=1,num_heads=2",
                 "--task-options", "seq_len=32", "--train", "batch_size=4", "--cache-dir", str(tmp_path), "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["task"]["metric"] == "bits_per_byte" and result["runs"][0]["metric"] > 0
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert main(["compare", "--mechanisms", "nope", "--cache-dir", str(tmp_path)]) == 2
    assert "registered" in capsys.readouterr().err


def test_mechanism_specs_carry_their_own_options():
    from attnkit.compare.harness import parse_mechanism

    assert parse_mechanism("mha") == ("mha", {})
    assert parse_mechanism("s2:block_size=8:vert_stride=4") == ("s2", {"block_size": 8, "vert_stride": 4})
    assert parse_mechanism("sigmoid:score_bias=-1.5") == ("sigmoid", {"score_bias": -1.5})
    with pytest.raises(ValueError, match="name:key=value"):
        parse_mechanism("s2:block_size")
    cfg = CompareConfig(mechanisms=["sliding-window:windw=8"], steps=1, task_options=dict(num_pairs=2, seq_len=16))
    with pytest.raises(ValueError, match="windw"):
        run_compare(cfg)


def test_a_diverging_run_is_reported_and_the_rest_goes_on(tmp_path, monkeypatch):
    import attnkit.compare.harness as harness

    real = harness.train_one

    def flaky(name, *args, **kwargs):
        if name == "gqa":
            raise harness.Diverged("gqa: training loss became nan at step 10", [[5, 3.2]], 123)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(harness, "train_one", flaky)
    cfg = CompareConfig(mechanisms=["gqa", "mha"], steps=10, cache_dir=str(tmp_path), log_every=5, **TINY)
    result = run_compare(cfg, command="test")
    gqa, mha = result["runs"]
    assert gqa["status"] == "diverged" and gqa["metric"] is None and "nan" in gqa["message"]
    assert mha["status"] == "ok" and mha["metric"] is not None
    assert not any(p.name.startswith("gqa") for p in (tmp_path / "mqar").iterdir())  # not cached: a rerun retries
    from rich.console import Console

    from attnkit.compare.cli import print_table
    from attnkit.compare.plot import plot_compare

    console = Console(record=True, width=200)
    print_table(result, console)
    assert "diverged" in console.export_text()
    plot_compare(result, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_nan_loss_is_detected(tmp_path):
    cfg = CompareConfig(mechanisms=["mha"], steps=10, cache_dir=str(tmp_path), log_every=5,
                        **{**TINY, "train": {"batch_size": 8, "warmup": 1, "lr": 1e30}})
    (run,) = run_compare(cfg, command="test")["runs"]
    assert run["status"] == "diverged"


def test_task_specific_preset_model_and_overrides():
    """The CPU preset narrows the MLP for MQAR only; --model overrides win over the preset."""
    mqar = CompareConfig(task="mqar").resolved()
    assert mqar["model"]["mlp_hidden"] == 128 and mqar["train"]["steps"] == 1000
    assert "mlp_hidden" not in CompareConfig(task="text").resolved()["model"]
    assert CompareConfig(task="mqar", model={"mlp_hidden": 256}).resolved()["model"]["mlp_hidden"] == 256
