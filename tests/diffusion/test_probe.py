"""attnkit.diffusion.probe: a tiny probe learns to read scenes on CPU; save/load; bad inputs."""

import pytest
import torch

from attnkit.diffusion import probe as P
from attnkit.diffusion import scenes as S


@pytest.fixture(scope="module")
def probe():
    return P.train_probe(120, 16, "cpu", batch_size=32, width=16, seed=0)


def test_a_short_training_reads_held_out_scenes_far_above_chance(probe):
    curve = probe.record["curve"]
    assert curve[-1][1] < 0.5 * curve[0][1], curve
    held_out = S.sample_scenes(256, torch.Generator().manual_seed(12345))
    scores = P.accuracy(probe, S.render_batch(held_out, 16)["image"], held_out)
    # chance: style 1/5, size 1/2, colour 1/6, position 1/9; the centre of a uniform guess is ~0.3 off
    assert scores["style"] > 0.95 and scores["colour"] > 0.6 and scores["position"] > 0.6, scores
    assert scores["size"] > 0.6 and scores["centre_error"] < 0.1, scores
    assert set(scores) == {*S.ATTRIBUTES, "centre_error"}


def test_read_consistency_and_read_scenes(probe):
    scenes = [S.Scene.at("rings", shape, colour, "large", cell)
              for shape, colour, cell in zip(S.SHAPES, S.COLOURS, (0, 2, 6, 8))]
    images = S.render_batch(scenes, 16)["image"]
    out = P.read(probe, images)
    assert out["centre"].shape == (4, 2) and all(out[a].shape == (4,) for a in S.ATTRIBUTES)
    assert P.consistency(probe, images)["style"] == 1.0  # one style shared by the batch
    mixed = S.render_batch([S.Scene.at(style, "circle", "red", "large", 4) for style in S.STYLES[:4]], 16)["image"]
    assert P.consistency(probe, mixed)["style"] == 0.25  # four styles, one each
    read = P.read_scenes(probe, images)
    assert [s.style for s in read] == ["rings"] * 4 and all(isinstance(s, S.Scene) for s in read)


def test_save_load_round_trip(probe, tmp_path):
    P.save(probe, tmp_path / "p")
    again = P.load(tmp_path / "p")
    images = S.render_batch(S.sample_scenes(5, torch.Generator().manual_seed(1)), 16)["image"]
    a, b = probe(images), again(images)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again.record["steps"] == 120


def test_probe_command_trains_and_saves(tmp_path, capsys):
    assert P.main(["train", "--out", str(tmp_path / "p"), "--size", "8", "--steps", "3", "--batch-size", "4",
                   "--width", "8", "--device", "cpu"]) == 0
    assert "held-out accuracy: style" in capsys.readouterr().out
    assert "held_out" in P.load(tmp_path / "p").record


def test_bad_inputs_raise_value_errors(probe, tmp_path):
    images = torch.zeros(2, 3, 16, 16)
    cases = [
        (lambda: P.Probe(size=12), "size must be a positive multiple of 8"),
        (lambda: P.Probe(width=12), "width must be a positive multiple of 8"),
        (lambda: P.read(probe, torch.zeros(2, 3, 32, 32)), "images must be (B, 3, 16, 16)"),
        (lambda: P.accuracy(probe, images, [S.Scene("dots", "circle", "red", "small")]), "match one to one"),
        (lambda: P.train_probe(0, 16), "steps must be an int >= 1"),
        (lambda: P.train_probe(2, 16, batch_size=0), "batch_size must be an int >= 1"),
        (lambda: P.train_probe(2, 16, noise=-1.0), "noise must be a std in [0, 1]"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError) as err:
            make()
        assert message in str(err.value), (message, str(err.value))
    with pytest.raises(FileNotFoundError, match="holds no probe"):
        P.load(tmp_path / "none")
