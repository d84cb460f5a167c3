"""attnkit.diffusion.flow: the classical flow estimator recovers known motions of a smooth pattern,
warping is exact where it must be, the occlusion check finds uncovered regions, and the warping
error measures a clip's frame-to-frame inconsistency."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")
from attnkit.diffusion import flow as fl  # noqa: E402

H = W = 48
INNER = (slice(None), slice(None), slice(8, -8), slice(8, -8))


def pattern(x, y):
    """A smooth, textured intensity in [0, 1] (no flat region: every pixel constrains the flow)."""
    return (0.5 + 0.2 * torch.sin(x / 3.1) * torch.cos(y / 4.3) + 0.15 * torch.sin((x + 2 * y) / 5.7)
            + 0.1 * torch.cos((x - y) / 2.9))


def coords(h=H, w=W):
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    return x, y


def test_horn_schunck_recovers_a_translation():
    x, y = coords()
    d = (2.6, -1.7)
    a = pattern(x, y)[None, None]
    b = pattern(x - d[0], y - d[1])[None, None]  # a(p) = b(p + d): the flow from a to b is d everywhere
    flow = fl.estimate_flow(a, b)
    err = (flow - torch.tensor(d, dtype=torch.float64).view(1, 2, 1, 1))[INNER].abs()
    assert err.mean() < 0.05 and err.max() < 0.25, (err.mean(), err.max())
    # the estimate brings b back onto a
    assert (fl.warp(b, flow) - a)[INNER].abs().max() < 0.01
    # the same flow for the clip in [0, 255] or [-1, 1]: the pair is mapped to [0, 1] first
    torch.testing.assert_close(fl.estimate_flow(255 * a, 255 * b), flow, rtol=0, atol=1e-8)
    torch.testing.assert_close(fl.estimate_flow(2 * a - 1, 2 * b - 1), flow, rtol=0, atol=1e-8)


def test_horn_schunck_recovers_a_rotation_and_scale():
    x, y = coords()
    c, th, s = (W - 1) / 2, 0.05, 1.03
    A = torch.tensor([[s * math.cos(th), -s * math.sin(th)], [s * math.sin(th), s * math.cos(th)]], dtype=torch.float64)
    Ai = torch.linalg.inv(A)
    # b(q) = a(A^-1 (q - c) + c): the point p of a is at q = A (p - c) + c in b
    px = Ai[0, 0] * (x - c) + Ai[0, 1] * (y - c) + c
    py = Ai[1, 0] * (x - c) + Ai[1, 1] * (y - c) + c
    a, b = pattern(x, y)[None, None], pattern(px, py)[None, None]
    true = torch.stack([A[0, 0] * (x - c) + A[0, 1] * (y - c) + c - x, A[1, 0] * (x - c) + A[1, 1] * (y - c) + c - y])[None]
    flow = fl.estimate_flow(a, b)
    err = (flow - true)[INNER].abs()
    assert true[INNER].abs().max() > 1.0  # a motion worth the name
    assert err.mean() < 0.05 and err.max() < 0.25, (err.mean(), err.max())


def test_farneback_is_optional():
    x, y = coords()
    a, b = pattern(x, y)[None, None], pattern(x - 2.0, y)[None, None]
    try:
        import cv2  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"needs OpenCV \(cv2\), which is not importable here; accepted without "
                                             r"it: method='horn-schunck'"):
            fl.estimate_flow(a, b, method="farneback")
        return
    flow = fl.estimate_flow(a, b, method="farneback")
    assert flow.shape == (1, 2, H, W) and (flow[INNER][:, 0] - 2.0).abs().mean() < 0.3


def test_warp_zero_flow_is_the_identity_and_integer_shifts_are_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 10, 12, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fl.warp(x, torch.zeros(2, 2, 10, 12, dtype=torch.float64)), x, rtol=0, atol=1e-12)
    flow = torch.zeros(1, 2, 10, 12, dtype=torch.float64)
    flow[:, 0], flow[:, 1] = 3.0, -2.0  # out(p) = x(p + (3, -2))
    out = fl.warp(x, flow)
    torch.testing.assert_close(out[:, :, 2:, :-3], x[:, :, :-2, 3:], rtol=0, atol=1e-12)
    # a half-pixel shift is the mean of the two neighbours (bilinear)
    flow = torch.zeros(1, 2, 10, 12, dtype=torch.float64)
    flow[:, 0] = 0.5
    torch.testing.assert_close(fl.warp(x, flow)[..., :-1], (x[..., :-1] + x[..., 1:]) / 2, rtol=0, atol=1e-12)


def test_resize_flow_scales_displacements():
    flow = torch.ones(1, 2, 64, 32, dtype=torch.float64) * torch.tensor([8.0, 16.0], dtype=torch.float64).view(1, 2, 1, 1)
    small = fl.resize_flow(flow, (8, 4))
    assert small.shape == (1, 2, 8, 4)
    torch.testing.assert_close(small, torch.ones_like(small) * torch.tensor([1.0, 2.0], dtype=torch.float64).view(1, 2, 1, 1))


def test_occlusion_flags_what_a_moving_square_uncovers():
    # a square moves right by 4 pixels over a static background; frame b's pixels just left of the
    # square were covered by it in a: the flow from b to a there is 0 (background), but a's pixel
    # there is the square, whose flow forward goes elsewhere: the round trip fails
    h = w = 32
    fwd = torch.zeros(1, 2, h, w, dtype=torch.float64)  # a -> b
    bwd = torch.zeros(1, 2, h, w, dtype=torch.float64)  # b -> a
    fwd[:, 0, 10:20, 10:20] = 4.0  # the square in a (columns 10..19) is at columns 14..23 in b
    bwd[:, 0, 10:20, 14:24] = -4.0
    occ_b = fl.occlusion(bwd, fwd)[0, 0]  # pixels of b not seen in a
    occ_a = fl.occlusion(fwd, bwd)[0, 0]  # pixels of a not seen in b
    uncovered = torch.zeros(h, w, dtype=torch.bool)
    uncovered[10:20, 10:14] = True  # b's background revealed behind the square
    assert torch.equal(occ_b, uncovered)
    covered = torch.zeros(h, w, dtype=torch.bool)
    covered[10:20, 20:24] = True  # a's background hidden by the square in b
    assert torch.equal(occ_a, covered)
    # leaving the image counts as occluded
    out = torch.zeros(1, 2, h, w, dtype=torch.float64)
    out[:, 0] = 3.0
    assert fl.occlusion(out, -out)[0, 0, :, -3:].all() and not fl.occlusion(out, -out)[0, 0, :, :-3].any()


def test_clip_flows_and_the_warping_error_of_a_moving_clip():
    x, y = coords()
    clip = torch.stack([pattern(x - 1.5 * t, y + 0.5 * t)[None] for t in range(3)])  # [3, 1, H, W], steady motion
    back, occ = fl.clip_flows(clip)
    assert back.shape == (2, 2, H, W) and occ.shape == (2, 1, H, W) and occ.dtype == torch.bool
    torch.testing.assert_close(back[INNER].mean((0, 2, 3)), torch.tensor([-1.5, 0.5], dtype=torch.float64),
                               rtol=0, atol=0.05)
    assert occ[:, :, 8:-8, 8:-8].float().mean() < 0.02  # little occluded inside
    assert occ[:, 0, :, :1].all()  # frame i's left column came from outside frame i - 1
    consistent = fl.warping_error(clip, back, occ)
    g = torch.Generator().manual_seed(0)
    flicker = clip + 0.05 * torch.randn(clip.shape, generator=g, dtype=torch.float64)
    assert consistent < 1e-4 and fl.warping_error(flicker, back, occ) > 10 * consistent
    # a clip of latents at 1/8 of the resolution is measured with the flow resized
    small = torch.nn.functional.avg_pool2d(clip, 8)
    assert fl.warping_error(small, back, occ).ndim == 0


def test_bad_input_is_refused_clearly():
    img = torch.zeros(1, 1, 8, 8)
    cases = [
        (lambda: fl.warp(img, torch.zeros(1, 2, 4, 4)), r"flow of shape \(1, 2, 4, 4\) does not fit x \(1, 1, 8, 8\)"),
        (lambda: fl.warp(img, torch.zeros(1, 3, 8, 8)), r"flow must be a floating tensor \[B, 2, H, W\]"),
        (lambda: fl.warp(img[0], torch.zeros(1, 2, 8, 8)), r"x must be a floating tensor \[B, C, H, W\]"),
        (lambda: fl.estimate_flow(img, torch.zeros(1, 1, 8, 9)), "a and b must have the same shape"),
        (lambda: fl.estimate_flow(img, img, method="raft"), "method must be 'horn-schunck' or 'farneback'"),
        (lambda: fl.estimate_flow(img, img, iters=0), "iters must be an integer >= 1"),
        (lambda: fl.estimate_flow(img, img, smoothness=0), "smoothness must be > 0"),
        (lambda: fl.occlusion(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 7)), "flow_bw of shape"),
        (lambda: fl.clip_flows(img), "frames must hold at least 2 frames"),
        (lambda: fl.warping_error(torch.zeros(3, 1, 8, 8), torch.zeros(3, 2, 8, 8)), r"flow must hold F - 1 = 2 flows"),
        (lambda: fl.warping_error(torch.zeros(3, 1, 8, 8), torch.zeros(2, 2, 8, 8), torch.zeros(2, 1, 8, 8)),
         r"occluded must be a boolean tensor \[F - 1, 1, H, W\]"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()
