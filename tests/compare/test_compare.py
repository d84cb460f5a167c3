"""attnkit compare: end-to-end run, reuse of finished runs, schedule, seeding, errors."""

import json

import pytest

from attnkit.compare import CompareConfig, run_compare
from attnkit.compare.harness import lr_at
from attnkit.cli import main

TINY = dict(model={"dim": 32, "num_layers": 1, "num_heads": 2}, train={"batch_size": 8, "warmup": 5},
            task_options={"vocab_size": 32, "seq_len": 32, "num_pairs": 4}, seeds=1)


def test_twenty_step_run_and_reuse(tmp_path):
    cfg = CompareConfig(mechanisms=["mha", "no-mixing"], steps=20, cache_dir=str(tmp_path), log_every=5, **TINY)
    first = run_compare(cfg, command="test")
    assert first["schema"] == "attnkit.compare/2"
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
                 "--task-options", "seq_len=32", "--train", "batch_size=4", "--seeds", "1", "--cache-dir", str(tmp_path), "--out", str(out)])
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
    # a switch: "False" was kept as the (truthy) string, so titans-mag:rope=False trained with RoPE on
    assert parse_mechanism("titans-mag:rope=False:window=16") == ("titans-mag", {"rope": False, "window": 16})
    assert parse_mechanism("titans-mag:rope=true") == ("titans-mag", {"rope": True})
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


# -- issue 20: cache robustness, validation, seeds, code-keyed cache, dense patterns, metadata, progress --

MICRO = dict(model={"dim": 16, "num_layers": 1, "num_heads": 2}, train={"batch_size": 4, "warmup": 1},
             task_options={"vocab_size": 16, "seq_len": 16, "num_pairs": 2, "eval_examples": 8}, seeds=1)


def _cache_files(root, suffix=".json"):
    return sorted(p for p in (root / "mqar").iterdir() if p.name.endswith(suffix))


@pytest.mark.parametrize("damage", ["", '{"mechanism": "mha", "metric"', "missing-metric", "[1, 2]",
                                    "params-str", "eval-number"])
def test_a_bad_cache_file_is_named_set_aside_and_recomputed(tmp_path, damage):
    cfg = CompareConfig(mechanisms=["mha"], steps=2, cache_dir=str(tmp_path), log_every=1, **MICRO)
    first = run_compare(cfg, command="test")
    (path,) = _cache_files(tmp_path)
    edits = {"missing-metric": lambda r: r.pop("metric"), "params-str": lambda r: r.update(params="x"),
             "eval-number": lambda r: r.update(eval=5)}  # the last two: reused before, then a crash
    if damage in edits:
        record = json.loads(path.read_text())
        edits[damage](record)
        damage = json.dumps(record)
    path.write_text(damage)
    with pytest.warns(UserWarning, match=f"cache file {path}") as caught:
        again = run_compare(cfg, command="test")
    assert str(path) + ".bad" in str(caught[0].message) and (path.parent / (path.name + ".bad")).read_text() == damage
    (run,) = again["runs"]
    assert not run["reused"] and run["status"] == "ok"
    assert run["loss_curve"] == first["runs"][0]["loss_curve"]  # recomputed, same numbers
    assert json.loads(path.read_text())["metric"] == run["metric"]  # and cached again
    assert any("cache file" in w for w in again["warnings"])
    assert run_compare(cfg, command="test")["runs"][0]["reused"]  # the third run reuses it quietly


def test_cache_writes_are_atomic(tmp_path, monkeypatch):
    import attnkit._console as output

    path = tmp_path / "run.json"
    path.write_text('{"old": 1}')

    def interrupted(src, dst):
        raise KeyboardInterrupt  # killed between writing the temporary file and the rename

    monkeypatch.setattr("os.replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        output.write_atomic(path, '{"new": 2}')
    assert path.read_text() == '{"old": 1}'  # never half of the new file
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temporary file left behind
    monkeypatch.undo()
    output.write_atomic(path, '{"new": 2}')
    assert path.read_text() == '{"new": 2}'


def test_cache_key_includes_the_code_and_torch(tmp_path, monkeypatch):
    import torch

    import attnkit.compare.harness as harness

    task = harness.make_task("mqar", MICRO["task_options"])
    resolved = CompareConfig(**MICRO).resolved()
    key = harness.run_key("mha", task, resolved, {}, "cpu")
    assert harness.run_key("mha", task, resolved, {}, "cpu") == key
    monkeypatch.setattr(harness, "code_hash", lambda: "0" * 16)
    assert harness.run_key("mha", task, resolved, {}, "cpu") != key  # a changed source file trains again
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert harness.run_key("mha", task, resolved, {}, "cpu") != key
    monkeypatch.undo()
    # end to end: a finished run is not reused once the code changed
    cfg = CompareConfig(mechanisms=["mha"], steps=1, cache_dir=str(tmp_path), log_every=1, **MICRO)
    run_compare(cfg)
    monkeypatch.setattr(harness, "code_hash", lambda: "f" * 16)
    assert not run_compare(cfg)["runs"][0]["reused"]


BAD_OPTIONS = [
    (["--train", "batch_size=0"], "batch_size must be an integer >= 1, got 0"),
    (["--train", "lr=0"], "lr must be a number > 0"),
    (["--train", "lr=fast"], "lr must be a number > 0"),
    (["--train", "warmup=-1"], "warmup must be an integer >= 0"),
    (["--train", "batchsize=8"], "--train: unknown key 'batchsize'; accepted: batch_size, lr"),
    (["--train", "beta2=1"], "beta2 must be a number in"),
    (["--model", "dims=64"], "--model: unknown key 'dims'; accepted: dim, num_layers"),
    (["--model", "num_layers=0"], "num_layers must be an integer >= 1"),
    (["--model", "dim=30"], "dim=30 is not divisible by num_heads=8"),
    (["--task-options", "num_pair=3"], "--task-options: unknown key 'num_pair' for task mqar; accepted: vocab_size"),
    (["--task-options", "eval_examples=0"], "eval_examples must be an integer >= 1"),
    (["--task-options", "seq_len=abc"], "seq_len must be an integer"),
    (["--task-options", "train_num_pairs=2/x"], "train_num_pairs must be integers"),
    (["--task", "text", "--task-options", "path=foo"], "the corpus is --corpus"),
    (["--steps", "0"], "--steps must be an integer >= 1"),
    (["--seeds", "0"], "--seeds must be an integer >= 1"),
    (["--seed", "-1"], "--seed must be an integer >= 0"),
    (["--device", "tpu"], "--device 'tpu'"),
]


@pytest.mark.parametrize("argv, message", BAD_OPTIONS)
def test_bad_options_fail_up_front_with_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    import attnkit.compare.harness as harness

    def no_training(*args, **kwargs):
        raise AssertionError("training started before the options were checked")

    monkeypatch.setattr(harness, "train_one", no_training)
    assert main(["compare", *argv, "--cache-dir", str(tmp_path), "--out", str(tmp_path / "c.json")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "c.json").exists()


def test_several_seeds_report_mean_min_max(tmp_path):
    from rich.console import Console

    from attnkit.compare.cli import print_table
    from attnkit.compare.plot import plot_compare

    cfg = CompareConfig(mechanisms=["mha", "no-mixing"], steps=3, cache_dir=str(tmp_path), log_every=1,
                        **{**MICRO, "seeds": 2, "seed": 5})
    result = run_compare(cfg, command="test")
    assert result["seeds"] == [5, 6]
    for row in result["runs"]:
        assert [r["seed"] for r in row["per_seed"]] == [5, 6] and len(row["metrics"]) == 2
        assert row["metric"] == pytest.approx(sum(row["metrics"]) / 2)
        assert row["metric_min"] == min(row["metrics"]) and row["metric_max"] == max(row["metrics"])
        curves = [r["loss_curve"] for r in row["per_seed"]]
        assert curves[0] != curves[1]  # the seeds differ (data order and initialisation)
        assert row["loss_curve"][-1][1] == pytest.approx((curves[0][-1][1] + curves[1][-1][1]) / 2)
    # a third seed trains only the new one
    more = run_compare(CompareConfig(mechanisms=["mha"], steps=3, cache_dir=str(tmp_path), log_every=1,
                                     **{**MICRO, "seeds": 3, "seed": 5}))
    assert [r["reused"] for r in more["runs"][0]["per_seed"]] == [True, True, False]
    console = Console(record=True, width=200)
    print_table(result, console)
    text = console.export_text()
    assert "accuracy mean" in text and "min" in text and "max" in text and "seeds 5-6" in text
    plot_compare(result, tmp_path / "seeds.png")
    assert (tmp_path / "seeds.png").stat().st_size > 1000


def test_default_seeds_come_from_the_preset():
    assert CompareConfig().seed_list() == [0, 1, 2]
    assert CompareConfig(seed=4, seeds=2).seed_list() == [4, 5]


def test_a_pattern_that_is_dense_at_the_task_length_is_warned_about(tmp_path):
    from attnkit.compare.harness import prepare

    cfg = CompareConfig(mechanisms=["mha", "s2:block_size=8:vert_stride=4", "sliding-window:window=4",
                                    "sliding-window:window=64"], cache_dir=str(tmp_path), **MICRO)
    notes = prepare(cfg)[-1]
    assert len(notes) == 2
    assert notes[0].startswith("s2:block_size=8:vert_stride=4: its pattern S2Strided(") and "sequence length 16" in notes[0]
    assert notes[1].startswith("sliding-window:window=64: its pattern SlidingWindow(window=64)")
    longer = CompareConfig(mechanisms=["sliding-window:window=64"], cache_dir=str(tmp_path),
                           **{**MICRO, "task_options": {**MICRO["task_options"], "seq_len": 128}})
    assert prepare(longer)[-1] == []


def test_results_record_provenance(tmp_path):
    from attnkit._meta import cpu_model

    result = run_compare(CompareConfig(mechanisms=["no-mixing"], steps=1, cache_dir=str(tmp_path), **MICRO))
    assert set(result["git"]) == {"commit", "dirty"} and len(result["code_hash"]) == 16
    assert {"attnkit", "torch", "triton", "python"} <= set(result["versions"])
    assert result["device"] == {"type": "cpu", "name": cpu_model() or result["device"]["name"]}
    assert result["cpu"]["model"] == cpu_model()
    assert result["task"]["chance"] == pytest.approx(2 / 16)


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path, capsys):
    code = main(["compare", "--mechanisms", "no-mixing", "--steps", "20", "--seeds", "1", "--model",
                 "dim=16,num_layers=1,num_heads=2", "--train", "batch_size=2", "--task-options",
                 "vocab_size=16,seq_len=16,num_pairs=2,eval_examples=8", "--cache-dir", str(tmp_path),
                 "--out", str(tmp_path / "c.json"), "--plot", "none"])
    assert code == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("compare: no-mixing: step")]
    assert [line.split()[3] for line in lines] == ["10/20", "20/20"]  # log_every 10: each 10% mark it passes
    assert "loss" in lines[0] and lines[0].endswith(" s")


@pytest.mark.parametrize("option, make", [("--out", "dir"), ("--save", "file"), ("--cache-dir", "file"),
                                          ("--plot", "dir")])
def test_output_paths_are_checked_before_training(tmp_path, capsys, monkeypatch, option, make):
    """The probe's case: an unwritable --out / --plot, or a --save / --cache-dir that is a file, used
    to fail after training with a raw traceback; now exit 2 before any training."""
    import attnkit.compare.cli as compare_cli
    from attnkit.cli import main

    target = tmp_path / "target"
    if make == "dir":
        target.mkdir()
    else:
        target.write_text("a file")
    monkeypatch.setattr(compare_cli, "run_compare", lambda *a, **k: pytest.fail("training started"))
    args = ["compare", "--mechanisms", "mha", "--steps", "2", "--seeds", "1", option, str(target)]
    if option != "--out":
        args += ["--out", str(tmp_path / "r.json")]
    assert main(args) == 2
    assert option in capsys.readouterr().err


def test_plot_name_without_suffix_is_written_and_reported_as_png(tmp_path):
    from attnkit._console import plot_path_for

    assert plot_path_for(tmp_path / "r.json", str(tmp_path / "c1")) == tmp_path / "c1.png"
    assert plot_path_for(tmp_path / "r.json", None) == tmp_path / "r.png"
    assert plot_path_for(tmp_path / "r.json", "none") is None


def test_a_mechanism_named_twice_is_refused(capsys):
    assert main(["compare", "--mechanisms", "mha,gqa,mha", "--steps", "2"]) == 2
    assert "more than once" in capsys.readouterr().err
