"""benchmarks/mqar_seed_sweep.py: recipes resolve, runs are cached and resumed, JSON per seed."""

import json

import pytest


@pytest.fixture(scope="module")
def sweep():
    from conftest import load_script

    return load_script("mqar_seed_sweep")


def test_every_recipe_is_a_valid_configuration(sweep):
    from attnkit.compare.harness import prepare

    for name in sweep.RECIPES:
        resolved = prepare(sweep.recipe_config(name))[0]
        assert resolved["task_options"]["num_pairs"] == 4 and resolved["task_options"]["seq_len"] == 64  # same eval


def test_sweep_writes_per_seed_accuracy_and_resumes(sweep, tmp_path, capsys):
    argv = ["--recipes", "default,mix-pairs", "--mechanisms", "no-mixing", "--seeds", "0-1", "--steps", "2",
            "--eval-every", "1", "--model", "dim=16,num_layers=1,num_heads=2", "--task-options", "eval_examples=8",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "sweep.json")]
    assert sweep.main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if " seed " in line]
    assert lines[0].startswith("default no-mixing seed 0: accuracy ") and len(lines) == 4
    result = json.loads((tmp_path / "sweep.json").read_text())
    runs = result["recipes"]["mix-pairs"]["runs"]["no-mixing"]
    assert [r["seed"] for r in runs] == [0, 1] and all(0 <= r["accuracy"] <= 1 for r in runs)
    assert [s for s, _ in runs[0]["eval_curve"]] == [1, 2]
    assert result["recipes"]["mix-pairs"]["resolved"]["task_options"]["train_num_pairs"] == [1, 2, 4, 8]
    assert result["recipes"]["default"]["summary"]["no-mixing"]["seeds_done"] == 2 and result["git"]
    assert sweep.main(argv) == 0  # a second command reuses every run
    assert all(", cached" in line for line in capsys.readouterr().out.splitlines() if " seed " in line)
    with pytest.raises(SystemExit):
        sweep.main(["--recipes", "nope"])
