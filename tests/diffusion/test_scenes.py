"""attnkit.diffusion.scenes: deterministic rendering of known attributes, captions, clips."""

import pytest
import torch

from attnkit.diffusion import scenes as S
from attnkit.diffusion.scenes import Scene


def test_sampling_is_deterministic_from_the_generator_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = S.sample_scenes(64, torch.Generator().manual_seed(7))
    b = S.sample_scenes(64, torch.Generator().manual_seed(7))
    assert torch.equal(torch.random.get_rng_state(), before)
    for name in ("style", "shape", "colour", "size", "centre", "cell"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    c = S.sample_scenes(64, torch.Generator().manual_seed(8))
    assert not torch.equal(a.centre, c.centre)
    # every value of every attribute turns up in 2000 draws
    many = S.sample_scenes(2000, torch.Generator().manual_seed(0))
    for name, values in (("style", S.STYLES), ("shape", S.SHAPES), ("colour", S.COLOURS), ("size", S.SIZES),
                         ("cell", S.POSITIONS)):
        assert set(getattr(many, name).tolist()) == set(range(len(values))), name
    # half the centres lie near their cell's centre (prototypical position words), half anywhere in
    # their cell within [0.12, 0.88]: every place between cells is seen too
    offsets = many.centre - torch.tensor([S.cell_centre(int(c)) for c in many.cell])
    near = (offsets.abs() <= 0.05 + 1e-6).all(dim=1)
    assert 0.5 < near.float().mean() < 0.65  # the spread half lands near a centre too, 9-22% of the time
    assert many.centre.min() >= 0.12 - 1e-6 and many.centre.max() <= 0.88 + 1e-6
    between = ((many.centre * 3) % 1 - 0.5).abs()  # 0 at a cell's centre, 0.5 at its border
    assert (between > 0.4).any(dim=1).sum() > 50
    tight = S.sample_scenes(500, torch.Generator().manual_seed(0), spread=0.0)
    offsets = tight.centre - torch.tensor([S.cell_centre(int(c)) for c in tight.cell])
    assert (offsets.abs() <= 0.05 + 1e-6).all()


def test_render_shapes_ranges_and_that_the_object_is_where_and_what_the_scene_says():
    scene = Scene.at("checks", "square", "blue", "large", "top-right")
    out = S.render(scene, 32)
    assert out["image"].shape == (3, 32, 32) and out["depth"].shape == out["mask"].shape == (1, 32, 32)
    assert out["image"].min() >= -1 and out["image"].max() <= 1
    assert set(out["mask"].unique().tolist()) == {0.0, 1.0}
    # the mask's centroid is the scene's centre (in pixels), the square's side 2 * 0.85 * 0.18 of the image
    ys, xs = out["mask"][0].nonzero(as_tuple=True)
    assert abs((xs.float().mean() + 0.5) / 32 - 0.8) < 0.02 and abs((ys.float().mean() + 0.5) / 32 - 0.2) < 0.02
    assert abs(out["mask"].sum().item() - (2 * 0.85 * 0.18 * 32) ** 2) < 2 * 2 * 0.85 * 0.18 * 32 + 1
    # object pixels have the object's colour; the object is nearer than every background pixel
    blue = torch.tensor(S._COLOUR_RGB[S.COLOURS.index("blue")]) * 2 - 1
    inside = out["image"][:, out["mask"][0] > 0]
    assert torch.allclose(inside.median(dim=1).values, blue, atol=1e-5)
    depth = out["depth"][0]
    assert depth[out["mask"][0] > 0].max() < depth[out["mask"][0] == 0].min()
    assert depth.min() >= 0.2 and depth.max() <= 1.0


def test_shapes_differ_and_the_background_is_the_style_alone():
    base = dict(style="dots", colour="red", size="large", position="centre")
    masks = {shape: S.render(Scene.at(shape=shape, **base), 32)["mask"] for shape in S.SHAPES}
    for a in S.SHAPES:
        for b in S.SHAPES:
            if a < b:
                assert (masks[a] != masks[b]).sum() > 10, (a, b)
    # two scenes of one style agree on every pixel outside both objects; two styles do not
    one = S.render(Scene.at("dots", "circle", "red", "small", "top-left"), 32)
    two = S.render(Scene.at("dots", "cross", "cyan", "large", "bottom-right"), 32)
    # outside both masks grown by a pixel (the anti-aliased rim blends the object into the background)
    grown = torch.nn.functional.max_pool2d(one["mask"] + two["mask"], 3, stride=1, padding=1)
    outside = grown[0] == 0
    assert torch.equal(one["image"][:, outside], two["image"][:, outside])
    assert torch.equal(one["depth"][:, outside], two["depth"][:, outside])
    other = S.render(Scene.at("rings", "circle", "red", "small", "top-left"), 32)
    assert (other["image"] - one["image"]).abs().amax(dim=0)[one["mask"][0] == 0].mean() > 0.1


def test_render_batch_matches_render_one_by_one_and_any_size():
    scenes = S.sample_scenes(6, torch.Generator().manual_seed(3))
    for size in (8, 16, 32):
        batch = S.render_batch(scenes, size)
        for i, scene in enumerate(scenes.scenes()):
            one = S.render(scene, size)
            for key in ("image", "depth", "mask"):
                assert torch.allclose(batch[key][i], one[key], atol=1e-6), (size, key)
    assert S.render_batch(scenes.scenes(), 16)["image"].shape == (6, 3, 16, 16)


def test_captions_name_the_attributes_and_partial_captions_drop_words_in_order():
    scene = Scene.at("stripes", "triangle", "yellow", "small", "bottom-left")
    assert S.caption_words(scene) == ["stripes", "small", "yellow", "triangle", "bottom-left"]
    ids = S.caption_tokens(scene)
    assert ids.shape == (S.CAPTION_LENGTH,) and ids.dtype == torch.long
    assert [S.VOCAB[i] for i in ids[:5]] == S.caption_words(scene) and (ids[5:] == S.PAD_ID).all()
    assert S.decode_caption(ids) == "stripes small yellow triangle bottom-left"
    assert S.caption_words(scene, drop=("size", "position")) == ["stripes", "yellow", "triangle"]
    assert torch.equal(S.encode_caption(""), torch.zeros(S.CAPTION_LENGTH, dtype=torch.long))
    # the batch captions agree with the one-by-one ones, and dropout keeps the order of what stays
    batch = S.sample_scenes(300, torch.Generator().manual_seed(1))
    full = S.caption_batch(batch)
    assert torch.equal(full, torch.stack([S.caption_tokens(s) for s in batch.scenes()]))
    dropped = S.caption_batch(batch, drop_word=0.3, drop_all=0.2, generator=torch.Generator().manual_seed(0))
    empty = (dropped == S.PAD_ID).all(dim=1)
    assert 0.12 < empty.float().mean() < 0.32
    for row, whole in zip(dropped.tolist(), full.tolist()):
        words = [w for w in row if w != S.PAD_ID]
        assert row[: len(words)] == words  # the kept words come first
        it = iter(whole)
        assert all(w in it for w in words)  # a subsequence of the full caption


def test_clip_moves_the_object_by_the_true_displacement():
    scene = Scene.at("gradient", "circle", "green", "small", "left")
    out = S.clip(scene, frames=5, motion=(0.1, -0.05), size=32)
    assert out["frames"].shape == (5, 3, 32, 32) and out["masks"].shape == (5, 1, 32, 32)
    assert torch.allclose(out["displacement"], torch.tensor([[3.2, -1.6]]).expand(4, 2))
    centroids = []
    for mask in out["masks"]:
        ys, xs = mask[0].nonzero(as_tuple=True)
        centroids.append(torch.stack([xs.float().mean(), ys.float().mean()]))
    moves = torch.stack(centroids).diff(dim=0)
    assert torch.allclose(moves, out["displacement"], atol=0.5)
    # the background stays still: pixels away from every frame's object agree across frames
    outside = torch.nn.functional.max_pool2d(out["masks"].sum(0), 3, stride=1, padding=1)[0] == 0
    assert torch.equal(out["frames"][0][:, outside], out["frames"][-1][:, outside])


def test_bad_inputs_raise_value_errors_naming_the_argument():
    cases = [
        (lambda: Scene("velvet", "circle", "red", "small"), "style must be one of"),
        (lambda: Scene("dots", "hexagon", "red", "small"), "shape must be one of"),
        (lambda: Scene("dots", "circle", "mauve", "small"), "colour must be one of"),
        (lambda: Scene("dots", "circle", "red", "huge"), "size must be one of"),
        (lambda: Scene("dots", "circle", "red", "small", (1.2, 0.5)), "centre must lie in"),
        (lambda: Scene("dots", "circle", "red", "small", "middle"), "centre must be a pair"),
        (lambda: Scene.at("dots", "circle", "red", "small", "middle"), "position must be one of"),
        (lambda: Scene.at("dots", "circle", "red", "small", 9), "position must be a cell index"),
        (lambda: S.render(Scene("dots", "circle", "red", "small"), 12), "size must be a positive multiple of 8"),
        (lambda: S.render_batch([], 8), "non-empty list of Scene"),
        (lambda: S.render("dots", 8), "scene must be a Scene"),
        (lambda: S.sample_scenes(0, torch.Generator()), "n must be a positive int"),
        (lambda: S.sample_scenes(2, torch.Generator(), spread=1.5), "spread must be a fraction"),
        (lambda: S.sample_scene(0), "generator must be a torch.Generator"),
        (lambda: S.encode_caption("dots purple circle"), "unknown ['purple']"),
        (lambda: S.encode_caption(["dots"] * 11), "at most 10 words"),
        (lambda: S.caption_words(Scene("dots", "circle", "red", "small"), drop=("hue",)), "drop must name"),
        (lambda: S.caption_batch(S.sample_scenes(2, torch.Generator()), drop_word=0.5), "needs a generator"),
        (lambda: S.caption_batch(S.sample_scenes(2, torch.Generator()), drop_all=1.5), "drop_all must be"),
        (lambda: S.clip(Scene.at("dots", "circle", "red", "small", "right"), 5, (0.1, 0.0)), "outside the image"),
        (lambda: S.clip(Scene("dots", "circle", "red", "small"), 1), "frames must be an int >= 2"),
        (lambda: S.clip(Scene("dots", "circle", "red", "small"), 3, 0.1), "motion must be a pair"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError) as err:
            make()
        assert message in str(err.value), (message, str(err.value))
