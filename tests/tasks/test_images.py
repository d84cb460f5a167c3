"""attnkit.tasks.images: patch tokens, labels and masks from the scene renderer; the frozen encoder."""

import pytest
import torch

from attnkit.tasks import images
from attnkit.tasks.images import FrozenPatchEncoder, ImageTask, patch_fraction, patchify


def test_patchify_is_row_major_over_the_grid():
    img = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    tokens = patchify(img, 2)
    assert tokens.shape == (2, 4, 12)
    # patch (row 0, col 1): pixels [0:2, 2:4] of each channel
    assert tokens[0, 1].view(3, 2, 2).tolist() == img[0, :, 0:2, 2:4].tolist()


def test_split_labels_masks_and_determinism():
    task = ImageTask(label="shape", size=32, patch=4)
    data = task.split(train=16, test=8, seed=3)
    train = data["train"]
    assert train["tokens"].shape == (16, 64, 48) and train["mask"].shape == (16, 64)
    assert train["label"].max() < task.num_classes == 4
    assert ((train["mask"] > 0).sum(1) > 0).all()  # every object covers some patch
    again = task.split(train=16, test=8, seed=3)
    assert torch.equal(again["train"]["tokens"], train["tokens"])
    assert not torch.equal(data["test"]["tokens"][:8], train["tokens"][:8])
    assert torch.equal(patch_fraction(torch.ones(1, 1, 8, 8), 4), torch.ones(1, 4))


def test_frozen_encoder_is_seeded_frozen_and_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    a, b = FrozenPatchEncoder(48, 8, dim=32, seed=1), FrozenPatchEncoder(48, 8, dim=32, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    x = torch.randn(2, 64, 48)
    assert torch.equal(a(x), b(x)) and not any(p.requires_grad for p in a.parameters())
    assert not torch.equal(FrozenPatchEncoder(48, 8, dim=32, seed=2)(x), a(x))
    assert a.features(x, batch=1).shape == (2, 64, 32)


@pytest.mark.parametrize("make,message", [
    (lambda: ImageTask(label="texture"), "label must be one of shape, colour, style, position, size, got 'texture'"),
    (lambda: ImageTask(size=32, patch=5), "patch must be a positive int dividing size=32, got 5"),
    (lambda: ImageTask(spread=2), r"spread must be a fraction in \[0, 1\], got 2"),
    (lambda: ImageTask().split(train=0), "train must be a positive int, got 0"),
    (lambda: patchify(torch.zeros(3, 8, 8), 4), r"images must be \(B, C, H, W\)"),
    (lambda: FrozenPatchEncoder(48, 8, dim=30), "dim must be a multiple of 4|dim=30 is not divisible"),
    (lambda: FrozenPatchEncoder(48, 8, dim=32)(torch.zeros(1, 10, 48)), r"tokens must be \(B, 64, token_dim\)"),
])
def test_bad_inputs(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_exported_from_tasks():
    import attnkit.tasks as tasks

    assert tasks.ImageTask is images.ImageTask
