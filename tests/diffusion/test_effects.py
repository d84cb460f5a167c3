"""benchmarks/diffusion_effects.py: its metrics on known inputs, its option checks, and a tiny run end to end."""

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from attnkit.diffusion import probe as P  # noqa: E402
from attnkit.tasks import scenes as S  # noqa: E402


@pytest.fixture(scope="module")
def fx():
    from conftest import load_script

    return load_script("diffusion_effects")


def test_summary_paired_and_the_verdict(fx):
    s = fx.summary([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == pytest.approx(1.0) and s["n"] == 3
    assert s["ci95"] == pytest.approx(1.96 / math.sqrt(3))
    d = fx.paired([0.0, 0.0, 0.0, 0.0], [1.0, 1.2, 0.8, 1.0])
    assert d["mean"] == pytest.approx(1.0)
    assert fx.shows(d, "up") == "yes" and fx.shows(d, "down") == "no"
    assert fx.shows(fx.paired([0.0, 0.0], [1.0, -1.0]), "up") == "unclear"
    with pytest.raises(ValueError, match="one baseline per method"):
        fx.paired([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="direction"):
        fx.shows(d, "sideways")


def test_agreement_and_consistency_on_known_readings(fx):
    assert fx.agreement(torch.tensor([3, 3, 3, 3])) == 1.0
    assert fx.agreement(torch.tensor([3, 1, 3, 2])) == pytest.approx(1 / 3)  # the reference itself does not count
    assert fx.consistency(torch.tensor([2, 2, 2])) == 1.0
    assert fx.consistency(torch.tensor([0, 1, 2, 3])) == 0.25
    assert fx.consistency(torch.tensor([4, 0, 4, 1])) == 0.5


def test_identical_images_read_perfectly_consistent_and_centre_error_is_the_drag(fx):
    """With the shipped probe: copies of one rendered scene agree on every attribute, and a scene
    rendered at (0.2, 0.5) is about 0.6 from a target at (0.8, 0.5)."""
    probe = P.load()
    scene = S.Scene("dots", "square", "red", "large", (0.2, 0.5))
    images = S.render(scene, 32)["image"][None].expand(4, -1, -1, -1)
    r = P.read(probe, images)
    assert all(fx.consistency(r[a]) == 1.0 for a in S.ATTRIBUTES)
    err = fx.centre_error(r["centre"], torch.tensor([[0.8, 0.5]]).expand(4, -1))
    assert err.shape == (4,) and torch.allclose(err, torch.full((4,), 0.6), atol=0.05)
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        fx.centre_error(r["centre"], torch.zeros(4, 3))


def test_crop_masked_mse_token_mask_box_and_dilate(fx):
    img = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    c = fx.crop(img, torch.tensor([[0.5, 0.5], [0.0, 1.0]]), 2)  # the second is shifted inside the image
    assert c.shape == (2, 1, 4, 4)
    assert torch.equal(c[0], img[0, :, 2:6, 2:6]) and torch.equal(c[1], img[1, :, 4:8, 0:4])
    a, b = torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    b[..., 0, 0] = 2.0  # one pixel off by 2 in every channel
    keep = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    keep[..., :2, :2] = True
    assert fx.masked_mse(a, b, keep).item() == pytest.approx(4.0 / 4)
    assert fx.masked_mse(a, b, ~keep).item() == 0.0
    pm = torch.zeros(8, 8, dtype=torch.bool)
    pm[3, 5] = True
    tm = fx.token_mask(pm)
    assert tm.shape == (4, 4) and tm.sum() == 1 and tm[1, 2]
    # a large object (half-extent 0.18) at the centre of a 16-token grid: tokens 5.12 .. 10.88 -> 5 .. 11
    assert fx.object_box((0.5, 0.5), "large", 16) == (5, 5, 11, 11)
    assert fx.object_box((0.0, 1.0), "small", 16) == (14, 0, 16, 2)  # clipped to the grid
    grown = fx.dilate(torch.zeros(1, 1, 5, 5, dtype=torch.bool).index_put_((torch.tensor([0]),) * 2
                                                                            + (torch.tensor([2]),) * 2,
                                                                            torch.tensor(True)), 1)
    assert grown.sum() == 9


def test_bad_options_are_refused_with_what_is_accepted(fx, capsys):
    for argv, needle in ((["--seeds", "1"], "--seeds must be an int >= 2"),
                         (["--steps", "2"], "--steps must be an int >= 4"),
                         (["--methods", "alignedgen,nope"], "accepted: a comma-separated subset"),
                         (["--nfe", "3"], "--nfe must be comma-separated even ints"),
                         (["--nfe", "a,b"], "--nfe must be comma-separated even ints"),
                         (["--threads", "0"], "--threads must be an int >= 1")):
        with pytest.raises(SystemExit):
            fx.parse(argv)
        assert needle in capsys.readouterr().err, argv
    args = fx.parse(["--quick"])
    assert (args.seeds, args.steps, args.budgets) == (4, 8, [4, 8])


def test_a_tiny_run_writes_every_metric_with_a_verdict_and_its_grids(fx, tmp_path):
    out = tmp_path / "fx.json"
    assert fx.main(["--quick", "--seeds", "2", "--steps", "4", "--nfe", "2", "--methods", "rf-edit,diffuhaul,rf-solver",
                    "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert "diffusion_effects.py" in record["command"] and record["seeds"] == 2 and record["versions"]["diffusers"]
    results = record["results"]
    assert set(results) == {"rf-edit", "diffuhaul", "rf-solver"}
    for name in ("rf-edit", "diffuhaul"):
        assert results[name]["n_seeds"] == 2
        for metric, entry in results[name]["metrics"].items():
            assert entry["baseline"]["n"] == entry["method"]["n"] == 2, (name, metric)
            assert entry["shows"] in ("yes", "no", "unclear")
            assert entry["difference"]["mean"] == pytest.approx(entry["method"]["mean"] - entry["baseline"]["mean"])
    assert 0 <= results["diffuhaul"]["metrics"]["centre_error"]["method"]["mean"] < 1.5
    assert results["rf-solver"]["nfe_2"]["setup"]["rf_solver_steps"] == 1
    for name in ("rf-edit", "diffuhaul", "rf-solver"):
        png = Path(record["grids"][name])
        assert png.parent == tmp_path and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_merge_joins_runs_of_disjoint_methods_or_seeds_and_refuses_overlaps_or_other_setups(fx, tmp_path):
    def record(name, results, **kw):
        r = {"command": f"run {name}", "seeds": 32, "first_seed": 0, "steps": 16, "quick": False, "subject": "s",
             "probe": "p", "git_commit": "abc", "git_dirty": False, "complete": True, "cpu_s": 1.5,
             "timings": {name: {}}, "grids": {name: f"{name}.png"}, "results": results}
        r.update(kw)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(r))
        return str(path)

    a, b = record("a", {"x": {"setup": 1}}), record("b", {"y": {"setup": 2}}, complete=False)
    out = tmp_path / "m.json"
    assert fx.main(["--merge", f"{a},{b}", "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["results"] == {"x": {"setup": 1}, "y": {"setup": 2}} and m["cpu_s"] == 3.0
    assert m["command"].startswith("run a & run b & wait; ")
    assert m["complete"] is False and [p["complete"] for p in m["parts"]] == [True, False]  # x, y: no experiment's
    ok = [record(n, {k: {} for k in fx.RESULTS[e]}, methods=[e], complete=c)
          for n, e, c in (("f", "freecus", True), ("g", "rf-edit", False), ("h", "latentwarp", True))]
    assert fx.main(["--merge", ",".join(ok), "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["complete"] is True and m["methods"] == ["freecus", "rf-edit", "latentwarp"]
    # one experiment over two seed ranges: the per-seed values are joined and summarised again
    base, meth = [0.0, 0.1, 0.2, 0.1], [1.0, 0.9, 1.2, 1.1]
    halves = [record(f"s{i}", {"diffuhaul": fx.result({"m": (base[2 * i:2 * i + 2], meth[2 * i:2 * i + 2])},
                                                      {"m": "up"}, 2)}, seeds=2, first_seed=2 * i)
              for i in (1, 0)]
    assert fx.main(["--merge", ",".join(halves), "--out", str(out)]) == 0
    joined = json.loads(out.read_text())["results"]["diffuhaul"]
    assert joined == fx.result({"m": (base, meth)}, {"m": "up"}, 4) and joined["metrics"]["m"]["shows"] == "yes"
    with pytest.raises(SystemExit, match="repeats seeds"):
        fx.main(["--merge", f"{a},{record('c', {'x': {}})}", "--out", str(out)])
    with pytest.raises(SystemExit, match="differs"):
        fx.main(["--merge", f"{a},{record('d', {'z': {}}, steps=8)}", "--out", str(out)])
