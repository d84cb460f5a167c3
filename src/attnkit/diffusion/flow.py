"""Classical optical flow in torch, warping, occlusion and a clip's warping error (for LatentWarp).

No learned flow weights are needed: :func:`estimate_flow` is a coarse-to-fine Horn-Schunck
estimator (Horn & Schunck 1981, with image warping between pyramid levels) written in torch, so
it runs on any device and dtype. ``method="farneback"`` uses OpenCV where ``cv2`` happens to be
importable (optional; nothing here needs it).

Conventions. Images / features ``[B, C, H, W]``; a flow ``[B, 2, H, W]`` in pixels, channel 0 the
x (width) displacement, channel 1 the y (height) one. ``flow = estimate_flow(a, b)`` is the flow
*from a to b*: the pixel ``p`` of ``a`` is seen at ``p + flow(p)`` in ``b``, so ``a ≈ warp(b, flow)``
(backward warping). To bring frame ``i - 1`` into frame ``i`` use the flow from ``i`` to ``i - 1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["clip_flows", "estimate_flow", "occlusion", "resize_flow", "warp", "warping_error"]


def _check_images(name: str, x) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating tensor [B, C, H, W], got {got}")


def _check_flow(name: str, flow, like: Tensor | None = None) -> None:
    if not isinstance(flow, Tensor) or flow.dim() != 4 or flow.shape[1] != 2 or not flow.is_floating_point():
        got = f"{tuple(flow.shape)} {flow.dtype}" if isinstance(flow, Tensor) else type(flow).__name__
        raise ValueError(f"{name} must be a floating tensor [B, 2, H, W] (x, y displacements in pixels), got {got}")
    if like is not None and (flow.shape[0] != like.shape[0] or flow.shape[2:] != like.shape[2:]):
        raise ValueError(f"{name} of shape {tuple(flow.shape)} does not fit the images {tuple(like.shape)}; "
                         f"accepted: [{like.shape[0]}, 2, {like.shape[2]}, {like.shape[3]}]")


def _base_grid(flow: Tensor) -> Tensor:
    """Pixel coordinates ``[1, 2, H, W]`` (x, y) in the flow's dtype and device."""
    H, W = flow.shape[2:]
    y, x = torch.meshgrid(torch.arange(H, dtype=flow.dtype, device=flow.device),
                          torch.arange(W, dtype=flow.dtype, device=flow.device), indexing="ij")
    return torch.stack([x, y])[None]


def warp(x: Tensor, flow: Tensor, *, mode: str = "bilinear", padding: str = "border") -> Tensor:
    """Backward warping: ``out(p) = x(p + flow(p))``, sampled with ``grid_sample`` (pixel centres
    at integer coordinates, ``align_corners=True``, so an integer flow moves pixels exactly).
    x ``[B, C, H, W]``, flow ``[B|1, 2, H, W]`` -> ``[B, C, H, W]``. ``padding``: what a sample
    outside the image reads (``"border"``, ``"zeros"``, ``"reflection"``)."""
    _check_images("x", x)
    _check_flow("flow", flow)
    if flow.shape[2:] != x.shape[2:] or flow.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"flow of shape {tuple(flow.shape)} does not fit x {tuple(x.shape)}; accepted: "
                         f"[{x.shape[0]}|1, 2, {x.shape[2]}, {x.shape[3]}] (resize_flow rescales a flow)")
    H, W = x.shape[2:]
    pos = _base_grid(flow) + flow.to(x.dtype)
    gx = 2 * pos[:, 0] / max(W - 1, 1) - 1
    gy = 2 * pos[:, 1] / max(H - 1, 1) - 1
    grid = torch.stack([gx, gy], dim=-1).expand(x.shape[0], -1, -1, -1)
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding, align_corners=True)


def resize_flow(flow: Tensor, size: tuple[int, int]) -> Tensor:
    """A flow ``[B, 2, H, W]`` in pixels at ``(H, W)`` as a flow at ``size = (h, w)``: averaged over
    each cell (area) when shrinking, bilinear when growing, displacements scaled by ``w / W`` and
    ``h / H`` (a latent cell of an 8x-downsampling VAE moves an eighth of the pixels)."""
    _check_flow("flow", flow)
    h, w = int(size[0]), int(size[1])
    H, W = flow.shape[2:]
    if (h, w) == (H, W):
        return flow
    mode = "area" if h <= H and w <= W else "bilinear"
    out = F.interpolate(flow, size=(h, w), mode=mode, **({} if mode == "area" else {"align_corners": False}))
    scale = torch.tensor([w / W, h / H], dtype=flow.dtype, device=flow.device).view(1, 2, 1, 1)
    return out * scale


def occlusion(flow_fw: Tensor, flow_bw: Tensor, *, alpha: float = 0.01, beta: float = 0.5) -> Tensor:
    """Forward-backward consistency (Sundaram et al. 2010): ``flow_fw`` from a to b, ``flow_bw`` from
    b to a, both ``[B, 2, H, W]``. A pixel ``p`` of a is occluded in b (True) when the round trip
    does not come back, ``|f(p) + g(p + f(p))|^2 > alpha (|f(p)|^2 + |g(p + f(p))|^2) + beta``, or
    when ``p + f(p)`` leaves the image. -> bool ``[B, 1, H, W]``."""
    _check_flow("flow_fw", flow_fw)
    _check_flow("flow_bw", flow_bw, like=flow_fw)
    back = warp(flow_bw, flow_fw)  # g(p + f(p))
    err = (flow_fw + back).pow(2).sum(1, keepdim=True)
    bound = alpha * (flow_fw.pow(2).sum(1, keepdim=True) + back.pow(2).sum(1, keepdim=True)) + beta
    H, W = flow_fw.shape[2:]
    pos = _base_grid(flow_fw) + flow_fw
    outside = ((pos[:, :1] < 0) | (pos[:, :1] > W - 1) | (pos[:, 1:] < 0) | (pos[:, 1:] > H - 1))
    return (err > bound) | outside


def _gray(x: Tensor) -> Tensor:
    return x.mean(1, keepdim=True) if x.shape[1] != 1 else x


def _blur(x: Tensor, sigma: float) -> Tensor:
    if sigma <= 0:
        return x
    r = max(1, int(round(2 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def _grad(x: Tensor) -> tuple[Tensor, Tensor]:
    """Central differences with replicated borders: d/dx, d/dy of ``[B, 1, H, W]``."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return (p[..., 1:-1, 2:] - p[..., 1:-1, :-2]) / 2, (p[..., 2:, 1:-1] - p[..., :-2, 1:-1]) / 2


_AVG = ((1 / 12, 1 / 6, 1 / 12), (1 / 6, 0.0, 1 / 6), (1 / 12, 1 / 6, 1 / 12))  # Horn-Schunck's neighbourhood mean


def _horn_schunck_level(a: Tensor, b: Tensor, flow: Tensor, smoothness: float, iters: int, warps: int) -> Tensor:
    kernel = torch.tensor(_AVG, dtype=a.dtype, device=a.device).view(1, 1, 3, 3)

    def mean(u):
        return F.conv2d(F.pad(u, (1, 1, 1, 1), mode="replicate"), kernel)

    for _ in range(warps):
        bw = warp(b, flow)  # b brought back onto a with the current flow
        ix, iy = _grad((a + bw) / 2)
        it = bw - a
        # where p + flow leaves b there is no data: those pixels take their flow from the smoothness term alone
        pos = _base_grid(flow) + flow
        H, W = a.shape[2:]
        inside = ((pos[:, :1] >= 0) & (pos[:, :1] <= W - 1) & (pos[:, 1:] >= 0) & (pos[:, 1:] <= H - 1)).to(a.dtype)
        ix, iy, it = ix * inside, iy * inside, it * inside
        u0, v0 = flow[:, :1], flow[:, 1:]
        u, v = u0, v0
        denom = smoothness ** 2 + ix ** 2 + iy ** 2
        for _ in range(iters):
            ub, vb = mean(u), mean(v)
            # linearised data term around the current flow: it + ix (u - u0) + iy (v - v0) = 0
            r = (ix * (ub - u0) + iy * (vb - v0) + it) / denom
            u, v = ub - ix * r, vb - iy * r
        flow = torch.cat([u, v], 1)
    return flow


def estimate_flow(a: Tensor, b: Tensor, *, method: str = "horn-schunck", levels: int | None = None,
                  smoothness: float = 0.05, iters: int = 60, warps: int = 3, sigma: float = 1.0) -> Tensor:
    """The optical flow from ``a`` to ``b`` (both ``[B, C, H, W]``, colour is averaged to grey)
    -> ``[B, 2, H, W]`` in pixels, so that ``a ≈ warp(b, flow)``.

    ``method="horn-schunck"``: a Gaussian pyramid of ``levels`` levels (default: down to ~16
    pixels), at each level ``warps`` rounds of re-warping ``b`` with the current flow and ``iters``
    Jacobi iterations of Horn-Schunck on the linearised brightness constancy, with smoothness
    weight ``smoothness`` (on the pair's intensities mapped to [0, 1]; larger: smoother flow).
    ``method="farneback"``: OpenCV's ``calcOpticalFlowFarneback`` on each pair (needs ``cv2``)."""
    _check_images("a", a)
    _check_images("b", b)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if method == "farneback":
        return _farneback(a, b)
    if method != "horn-schunck":
        raise ValueError(f"method must be 'horn-schunck' or 'farneback' (OpenCV), got {method!r}")
    for name, value, low in (("iters", iters, 1), ("warps", warps, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not smoothness > 0:
        raise ValueError(f"smoothness must be > 0, got {smoothness!r}")
    H, W = a.shape[2:]
    if levels is None:
        levels = 1
        while min(H, W) >> levels >= 16:
            levels += 1
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels must be an integer >= 1, got {levels!r}")
    ga, gb = _gray(a), _gray(b)
    # one affine map of both images to [0, 1] (per pair): the smoothness weight means the same for
    # videos in [0, 1], [-1, 1] or [0, 255]
    lo = torch.minimum(ga.amin((1, 2, 3), keepdim=True), gb.amin((1, 2, 3), keepdim=True))
    hi = torch.maximum(ga.amax((1, 2, 3), keepdim=True), gb.amax((1, 2, 3), keepdim=True))
    span = (hi - lo).clamp_min(torch.finfo(a.dtype).tiny)
    pa, pb = [_blur((ga - lo) / span, sigma)], [_blur((gb - lo) / span, sigma)]
    for _ in range(levels - 1):
        pa.append(F.avg_pool2d(_blur(pa[-1], 1.0), 2, ceil_mode=True))
        pb.append(F.avg_pool2d(_blur(pb[-1], 1.0), 2, ceil_mode=True))
    flow = torch.zeros(a.shape[0], 2, *pa[-1].shape[2:], dtype=a.dtype, device=a.device)
    for la, lb in zip(reversed(pa), reversed(pb)):
        if flow.shape[2:] != la.shape[2:]:
            flow = resize_flow(flow, la.shape[2:])
        flow = _horn_schunck_level(la, lb, flow, smoothness, iters, warps)
    return flow


def _farneback(a: Tensor, b: Tensor) -> Tensor:
    try:
        import cv2
    except ImportError as err:
        raise ValueError("method='farneback' needs OpenCV (cv2), which is not importable here; accepted without "
                         "it: method='horn-schunck'") from err
    import numpy as np

    def u8(x):
        g = _gray(x)[:, 0].detach().float().cpu().numpy()
        lo, hi = float(g.min()), float(g.max())
        return np.clip((g - lo) / max(hi - lo, 1e-12) * 255, 0, 255).astype(np.uint8)

    ga, gb = u8(a), u8(b)
    flows = [cv2.calcOpticalFlowFarneback(ga[i], gb[i], None, 0.5, 4, 15, 5, 5, 1.2, 0) for i in range(a.shape[0])]
    return torch.from_numpy(np.stack(flows)).permute(0, 3, 1, 2).to(a.dtype).to(a.device)


def clip_flows(frames: Tensor, **options) -> tuple[Tensor, Tensor]:
    """The flows of a clip ``[F, C, H, W]`` between consecutive frames: ``(back, occluded)``, where
    ``back[i - 1]`` ``[2, H, W]`` is the flow from frame ``i`` to frame ``i - 1`` (what brings frame
    ``i - 1`` onto frame ``i``) and ``occluded[i - 1]`` ``[1, H, W]`` marks the pixels of frame ``i``
    not seen in frame ``i - 1`` (forward-backward check), for ``i = 1 .. F - 1``. ``options`` go to
    :func:`estimate_flow`."""
    _check_images("frames", frames)
    if frames.shape[0] < 2:
        raise ValueError(f"frames must hold at least 2 frames [F, C, H, W], got F = {frames.shape[0]}")
    cur, prev = frames[1:], frames[:-1]
    back = estimate_flow(cur, prev, **options)
    fwd = estimate_flow(prev, cur, **options)
    return back, occlusion(back, fwd)


def warping_error(clip: Tensor, flow: Tensor, occluded: Tensor | None = None) -> Tensor:
    """Frame-to-frame inconsistency of a clip ``[F, C, H, W]`` along a flow (the source clip's):
    ``mean_i  sum_p m_i(p) |y_i(p) - warp(y_{i-1}, f_i)(p)|^2 / (C sum_p m_i(p))`` over
    ``i = 1 .. F - 1``, with ``f_i = flow[i - 1]`` the flow from frame ``i`` to ``i - 1`` and ``m_i``
    the pixels not ``occluded`` (all when None): the warping error of Lai et al. 2018 ("Learning
    Blind Video Temporal Consistency"). A flow at another resolution (the source video's, for a
    clip of latents) is resized. -> a scalar (0 for a clip that moves exactly along the flow)."""
    _check_images("clip", clip)
    if clip.shape[0] < 2:
        raise ValueError(f"clip must hold at least 2 frames [F, C, H, W], got F = {clip.shape[0]}")
    _check_flow("flow", flow)
    if flow.shape[0] != clip.shape[0] - 1:
        raise ValueError(f"flow must hold F - 1 = {clip.shape[0] - 1} flows (frame i to i - 1), got {flow.shape[0]}")
    size = clip.shape[2:]
    flow = resize_flow(flow.to(clip.dtype), size)
    keep = torch.ones_like(clip[1:, :1], dtype=torch.bool)
    if occluded is not None:
        if (not isinstance(occluded, Tensor) or occluded.dtype != torch.bool or occluded.dim() != 4
                or occluded.shape[:2] != (clip.shape[0] - 1, 1)):
            got = f"{tuple(occluded.shape)} {occluded.dtype}" if isinstance(occluded, Tensor) else type(occluded).__name__
            raise ValueError(f"occluded must be a boolean tensor [F - 1, 1, H, W] = [{clip.shape[0] - 1}, 1, H, W], "
                             f"got {got}")
        keep = ~_resize_mask(occluded, size)
    err = (clip[1:] - warp(clip[:-1], flow)).pow(2).mean(1, keepdim=True)
    per = (err * keep).flatten(1).sum(1) / keep.flatten(1).sum(1).clamp_min(1)
    return per.mean()


def _resize_mask(mask: Tensor, size) -> Tensor:
    """A boolean mask at another size: a cell is True where any pixel it covers is (conservative)."""
    if tuple(mask.shape[2:]) == tuple(size):
        return mask
    return F.interpolate(mask.to(torch.float32), size=tuple(size), mode="area") > 0
