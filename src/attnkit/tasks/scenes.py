"""Procedural scenes: the data the diffusion subject (:mod:`attnkit.diffusion.subject`) learns, and the
images of the vision tasks (also importable as ``attnkit.diffusion.scenes``; this module needs torch only).

No image data set can be downloaded here, so the subject learns a small world whose every attribute
is known: one object of a given shape, colour and size at a given position, on a background
*style* (a palette and a texture). Because the attributes are known, an attention-sharing method's
effect is measurable: render the truth, or read a generated image back with the attribute probe
(:mod:`attnkit.diffusion.probe`).

Attributes (the words of the caption vocabulary are these names):

- style: :data:`STYLES` (``stripes``, ``checks``, ``dots``, ``gradient``, ``rings``), each a fixed
  two-colour palette and texture, and a background depth ramp of its own
- shape: :data:`SHAPES` (``circle``, ``square``, ``triangle``, ``cross``)
- colour: :data:`COLOURS` (``red``, ``green``, ``blue``, ``yellow``, ``magenta``, ``cyan``), saturated,
  so they stand out from the muted backgrounds
- size: :data:`SIZES` (``small``, ``large``): half-extent 0.11 or 0.18 of the image side
- position: the object's centre ``(x, y)`` in image fractions (x right, y down); its cell in a 3x3 grid,
  ``row * 3 + col`` with ``col = floor(3 x)``, names :data:`POSITIONS` (``top-left`` ... ``bottom-right``);
  sampled near the cell's centre (0.2, 0.5 or 0.8 per axis) or, for half the scenes, anywhere in the cell

Rendering works on coordinate grids with torch ops, for a whole batch at once
(:func:`render_batch`), on any device: every output is a function of the attributes only (no noise),
so the same scene renders the same pixels everywhere. Depth is a distance (larger is farther): the
background lies in [0.6, 1.0] on a ramp that depends on the style, the object at 0.2 (large) or 0.3
(small), nearer than any background.

Example::

    >>> g = torch.Generator().manual_seed(0)
    >>> scene = sample_scene(g)
    >>> out = render(scene, 32)          # image (3, 32, 32) in [-1, 1], depth (1, 32, 32), mask (1, 32, 32)
    >>> caption_words(scene)             # e.g. ['dots', 'large', 'red', 'circle', 'top-left']
    >>> caption_tokens(scene).shape      # (CAPTION_LENGTH,), padded with PAD_ID
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

__all__ = ["STYLES", "SHAPES", "COLOURS", "SIZES", "POSITIONS", "ATTRIBUTES", "VOCAB", "PAD", "PAD_ID",
           "CAPTION_LENGTH", "Scene", "SceneBatch", "sample_scene", "sample_scenes", "render", "render_batch",
           "caption_words", "caption_tokens", "caption_batch", "encode_caption", "decode_caption", "clip",
           "cell_centre", "check_size"]

STYLES = ("stripes", "checks", "dots", "gradient", "rings")
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
SIZES = ("small", "large")
POSITIONS = ("top-left", "top", "top-right", "left", "centre", "right", "bottom-left", "bottom", "bottom-right")
#: the attribute names, in caption order; the probe has one classification head per name
ATTRIBUTES = ("style", "size", "colour", "shape", "position")
_VALUES = {"style": STYLES, "size": SIZES, "colour": COLOURS, "shape": SHAPES, "position": POSITIONS}

PAD = "<pad>"
#: the caption vocabulary: the pad token (id 0), then every attribute value; ``and`` is reserved for
#: captions of two objects (``style size colour shape position and size colour shape position``)
VOCAB = (PAD, *STYLES, *SIZES, *COLOURS, *SHAPES, *POSITIONS, "and")
PAD_ID = 0
CAPTION_LENGTH = 10  # room for two objects: 1 + 4 + 1 + 4
_TOKEN = {word: i for i, word in enumerate(VOCAB)}

_HALF_EXTENT = (0.11, 0.18)  # small, large: in image fractions
_OBJECT_DEPTH = (0.3, 0.2)   # small, large: nearer than every background (>= 0.6)
_COLOUR_RGB = ((0.90, 0.12, 0.10), (0.10, 0.80, 0.15), (0.12, 0.25, 0.95),
               (0.95, 0.85, 0.10), (0.90, 0.15, 0.85), (0.10, 0.85, 0.90))
# per style: two muted colours the texture mixes, so every object colour stands out
_STYLE_RGB = (((0.20, 0.22, 0.35), (0.45, 0.47, 0.60)),   # stripes: slate
              ((0.55, 0.45, 0.32), (0.30, 0.22, 0.15)),   # checks: wood
              ((0.18, 0.30, 0.22), (0.55, 0.62, 0.50)),   # dots: moss
              ((0.05, 0.05, 0.08), (0.62, 0.62, 0.65)),   # gradient: night to grey
              ((0.40, 0.30, 0.45), (0.22, 0.15, 0.28)))   # rings: plum
_CELL_OFFSET = 0.3   # the grid's cell centres are 0.2, 0.5, 0.8 (large objects stay mostly inside)
_JITTER = 0.05       # centres sampled near a cell's centre lie within +-_JITTER of it
_SPAN = (0.12, 0.88)  # centres sampled anywhere in a cell stay in here: a large object stays mostly inside


def check_size(size) -> int:
    """``size`` as an int: a positive multiple of 8 (the subject packs 2x2 pixels into a token and
    the probe halves the image twice)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 8 or size % 8:
        raise ValueError(f"size must be a positive multiple of 8 (8, 16, 32, ...), got {size!r}")
    return size


def _index(name: str, value, values) -> int:
    if value not in values:
        raise ValueError(f"{name} must be one of {', '.join(values)}, got {value!r}")
    return values.index(value)


def cell_centre(position: str | int) -> tuple[float, float]:
    """The centre ``(x, y)`` of a grid cell, given by name (``"top-left"``) or index ``row * 3 + col``."""
    cell = position if isinstance(position, int) and not isinstance(position, bool) else None
    if cell is None:
        cell = _index("position", position, POSITIONS)
    if not 0 <= cell < 9:
        raise ValueError(f"position must be a cell index in 0..8 or one of {', '.join(POSITIONS)}, got {position!r}")
    return 0.5 + (cell % 3 - 1) * _CELL_OFFSET, 0.5 + (cell // 3 - 1) * _CELL_OFFSET


@dataclass(frozen=True)
class Scene:
    """One object on a background. ``centre`` is ``(x, y)`` in image fractions (x to the right, y
    down), inside [0, 1]; ``position`` (the grid cell word the caption uses) follows from it.
    The default centre is the middle of the image."""

    style: str
    shape: str
    colour: str
    size: str
    centre: tuple[float, float] = (0.5, 0.5)

    def __post_init__(self):
        _index("style", self.style, STYLES)
        _index("shape", self.shape, SHAPES)
        _index("colour", self.colour, COLOURS)
        _index("size", self.size, SIZES)
        try:
            x, y = (float(c) for c in self.centre)
        except (TypeError, ValueError):
            raise ValueError(f"centre must be a pair (x, y) of numbers in [0, 1], got {self.centre!r}") from None
        if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
            raise ValueError(f"centre must lie in [0, 1] x [0, 1] (image fractions), got {self.centre!r}")
        object.__setattr__(self, "centre", (x, y))

    @classmethod
    def at(cls, style: str, shape: str, colour: str, size: str, position: str | int) -> "Scene":
        """The scene with its object at the centre of a grid cell (``"top-left"`` or 0..8)."""
        return cls(style, shape, colour, size, cell_centre(position))

    @property
    def cell(self) -> int:
        """The grid cell of the centre: ``row * 3 + col`` (0 top-left ... 8 bottom-right)."""
        x, y = self.centre
        return min(int(y * 3), 2) * 3 + min(int(x * 3), 2)

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    def moved(self, centre: tuple[float, float]) -> "Scene":
        """The same scene with the object at another centre (a DiffUHaul-style move)."""
        return Scene(self.style, self.shape, self.colour, self.size, centre)


@dataclass
class SceneBatch:
    """A batch of scenes as attribute tensors (what :func:`render_batch` draws and the trainer
    samples on the device): index tensors ``style``, ``shape``, ``colour``, ``size`` of shape (B,)
    into :data:`STYLES` ... and ``centre`` (B, 2) float, ``(x, y)`` in image fractions."""

    style: torch.Tensor
    shape: torch.Tensor
    colour: torch.Tensor
    size: torch.Tensor
    centre: torch.Tensor
    cell: torch.Tensor = field(init=False)

    def __post_init__(self):
        x, y = self.centre[:, 0], self.centre[:, 1]
        self.cell = (y * 3).long().clamp(0, 2) * 3 + (x * 3).long().clamp(0, 2)

    def __len__(self) -> int:
        return self.style.shape[0]

    @classmethod
    def of(cls, scenes, device=None) -> "SceneBatch":
        """The batch of a list of :class:`Scene`."""
        scenes = list(scenes)
        if not scenes or not all(isinstance(s, Scene) for s in scenes):
            raise ValueError(f"scenes must be a non-empty list of Scene, got {scenes!r:.200}")
        idx = lambda values, attr: torch.tensor([values.index(getattr(s, attr)) for s in scenes], device=device)
        return cls(idx(STYLES, "style"), idx(SHAPES, "shape"), idx(COLOURS, "colour"), idx(SIZES, "size"),
                   torch.tensor([s.centre for s in scenes], dtype=torch.float32, device=device))

    def scenes(self) -> list[Scene]:
        """The batch as a list of :class:`Scene`."""
        rows = zip(self.style.tolist(), self.shape.tolist(), self.colour.tolist(), self.size.tolist(),
                   self.centre.tolist())
        return [Scene(STYLES[a], SHAPES[b], COLOURS[c], SIZES[d], tuple(e)) for a, b, c, d, e in rows]

    def labels(self) -> dict[str, torch.Tensor]:
        """The index of each attribute (:data:`ATTRIBUTES`, ``position`` is the cell) and ``centre``."""
        return {"style": self.style, "size": self.size, "colour": self.colour, "shape": self.shape,
                "position": self.cell, "centre": self.centre}


def _check_generator(generator) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator (no global RNG is used), got {type(generator).__name__}")
    return generator


def sample_scenes(n: int, generator: torch.Generator, spread: float = 0.5) -> SceneBatch:
    """``n`` scenes with every attribute and the cell uniform, on ``generator``'s device (a CUDA
    generator samples on the GPU). A fraction ``spread`` of them has its centre uniform over its
    cell (within [0.12, 0.88] on each axis), the others within +-0.05 of the cell's centre: the
    position words stay prototypical while the subject also sees the places in between, where
    DiffUHaul moves and clips take objects."""
    _check_generator(generator)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not 0.0 <= spread <= 1.0:
        raise ValueError(f"spread must be a fraction in [0, 1], got {spread!r}")
    device = generator.device
    draw = lambda k: torch.randint(k, (n,), generator=generator, device=device)
    style, shape, colour, size, cell = draw(len(STYLES)), draw(len(SHAPES)), draw(len(COLOURS)), draw(2), draw(9)
    grid = torch.stack([cell % 3, cell // 3], dim=1).float()  # (n, 2): col, row
    jitter = (torch.rand(n, 2, generator=generator, device=device) * 2 - 1) * _JITTER
    near = 0.5 + (grid - 1) * _CELL_OFFSET + jitter
    low, high = (grid / 3).clamp(min=_SPAN[0]), ((grid + 1) / 3).clamp(max=_SPAN[1])
    anywhere = low + (high - low) * torch.rand(n, 2, generator=generator, device=device)
    pick = torch.rand(n, 1, generator=generator, device=device) < spread
    return SceneBatch(style, shape, colour, size, torch.where(pick, anywhere, near))


def sample_scene(generator: torch.Generator) -> Scene:
    """One scene drawn as :func:`sample_scenes` draws each."""
    return sample_scenes(1, generator).scenes()[0]


# -- rendering ----------------------------------------------------------------------------------


def _grid(size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates in image fractions: x (1, 1, W) and y (1, H, 1)."""
    c = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    return c.view(1, 1, size), c.view(1, size, 1)


def _texture(style: int, x: torch.Tensor, y: torch.Tensor, size: int) -> torch.Tensor:
    """The mix weight in [0, 1] between a style's two colours, (1, H, W); the textures' periods
    are in image fractions, so a scene looks the same at every resolution."""
    if style == 0:    # diagonal stripes, period 1/3 along each axis
        t = (torch.sin((x + y) * math.pi * 2 * 3) > 0).float()
    elif style == 1:  # 4x4 checkerboard
        t = (((x * 4).floor() + (y * 4).floor()) % 2).float()
    elif style == 2:  # a 5x5 lattice of dots of radius 0.06
        fx, fy = (x * 5) % 1 - 0.5, (y * 5) % 1 - 0.5
        t = ((fx.square() + fy.square()).sqrt() / 5 < 0.06).float()
    elif style == 3:  # a vertical gradient, dark at the top
        t = y.expand(1, size, size)
    else:             # concentric rings about the centre, period 1/5
        r = ((x - 0.5).square() + (y - 0.5).square()).sqrt()
        t = (torch.sin(r * math.pi * 2 * 5) > 0).float()
    return t.expand(1, size, size)


def _background_depth(style: int, x: torch.Tensor, y: torch.Tensor, size: int) -> torch.Tensor:
    """The background's distance in [0.6, 1.0], (1, H, W): a floor receding upwards, a wall
    receding to the right or left, a bowl, by style."""
    ramps = (lambda: 1.0 - 0.4 * y, lambda: 0.6 + 0.4 * x, lambda: 1.0 - 0.4 * x,
             lambda: 1.0 - 0.4 * y, lambda: 1.0 - 0.4 * ((x - 0.5).square() + (y - 0.5).square()).sqrt() / math.sqrt(0.5))
    return ramps[style]().expand(1, size, size)


def _signed_distance(batch: SceneBatch, x: torch.Tensor, y: torch.Tensor, half_extent: torch.Tensor) -> torch.Tensor:
    """A signed distance in image fractions to each object's outline (negative inside), (B, H, W).
    Exact for the circle and square, a bound with the right sign for the triangle and cross, which
    is all the one-pixel anti-aliasing needs."""
    r = half_extent[batch.size].view(-1, 1, 1)
    dx = x - batch.centre[:, 0].view(-1, 1, 1)  # (B, 1, W)
    dy = y - batch.centre[:, 1].view(-1, 1, 1)  # (B, H, 1)
    dx, dy = torch.broadcast_tensors(dx, dy)    # (B, H, W)
    ax, ay = dx.abs(), dy.abs()
    circle = (dx.square() + dy.square()).sqrt() - r
    square = torch.maximum(ax, ay) - r * 0.85  # about the circle's area
    # an equilateral triangle pointing up (y grows downwards), centroid at the centre, inradius 0.6 r:
    # the three edges' outward normals are (0, 1), (+-sin 60, -cos 60)
    s, c = math.sin(math.pi / 3), math.cos(math.pi / 3)
    triangle = torch.maximum(dy, torch.maximum(s * dx - c * dy, -s * dx - c * dy)) - r * 0.6
    arm = r * 0.35
    cross = torch.minimum(torch.maximum(ax - r, ay - arm), torch.maximum(ax - arm, ay - r))
    out = torch.where(batch.shape.view(-1, 1, 1) == 0, circle, square)
    out = torch.where(batch.shape.view(-1, 1, 1) == 2, triangle, out)
    return torch.where(batch.shape.view(-1, 1, 1) == 3, cross, out)


@functools.lru_cache(maxsize=32)
def _tables(size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """What every scene of a size shares, made once per (size, device): the pixel grid, each style's
    texture and background depth (S, H, W), the palettes. Without it every batch would copy the
    constants to the device, and each copy from host memory waits for the GPU's queue to drain."""
    x, y = _grid(size, device)
    styles = range(len(STYLES))
    return {"x": x, "y": y,
            "texture": torch.cat([_texture(s, x, y, size) for s in styles]),              # (S, H, W)
            "back_depth": torch.cat([_background_depth(s, x, y, size) for s in styles]),  # (S, H, W)
            "style_rgb": torch.tensor(_STYLE_RGB, device=device),                         # (S, 2, 3)
            "colour_rgb": torch.tensor(_COLOUR_RGB, device=device),                       # (colours, 3)
            "half_extent": torch.tensor(_HALF_EXTENT, device=device),
            "object_depth": torch.tensor(_OBJECT_DEPTH, device=device)}


def render_batch(scenes, size: int = 32) -> dict[str, torch.Tensor]:
    """Render a batch: ``scenes`` a :class:`SceneBatch` (rendered on its device) or a list of
    :class:`Scene`. Returns ``image`` (B, 3, H, W) in [-1, 1], ``depth`` (B, 1, H, W) in [0.2, 1.0]
    (a distance) and ``mask`` (B, 1, H, W) in {0, 1} (the object's pixels), H = W = ``size``.
    On a GPU it never waits for the device (no host copies, no data-dependent shapes)."""
    size = check_size(size)
    batch = scenes if isinstance(scenes, SceneBatch) else SceneBatch.of(scenes)
    tables = _tables(size, batch.style.device)
    t = tables["texture"][batch.style].unsqueeze(1)  # (B, 1, H, W)
    palette = tables["style_rgb"][batch.style]  # (B, 2, 3)
    background = palette[:, 0, :, None, None] * (1 - t) + palette[:, 1, :, None, None] * t  # (B, 3, H, W)
    # one-pixel anti-aliasing: coverage ramps from 1 to 0 across the outline
    distance = _signed_distance(batch, tables["x"], tables["y"], tables["half_extent"])
    coverage = (0.5 - distance * size).clamp(0, 1).unsqueeze(1)  # (B, 1, H, W)
    colour = tables["colour_rgb"][batch.colour][:, :, None, None]  # (B, 3, 1, 1)
    image = background * (1 - coverage) + colour * coverage
    mask = (coverage > 0.5).float()
    object_depth = tables["object_depth"][batch.size].view(-1, 1, 1, 1)
    depth = torch.where(mask > 0, object_depth, tables["back_depth"][batch.style].unsqueeze(1))
    return {"image": image * 2 - 1, "depth": depth, "mask": mask}


def render(scene: Scene, size: int = 32) -> dict[str, torch.Tensor]:
    """Render one scene: ``image`` (3, H, W) in [-1, 1], ``depth`` (1, H, W), ``mask`` (1, H, W)."""
    if not isinstance(scene, Scene):
        raise ValueError(f"scene must be a Scene, got {type(scene).__name__}")
    return {k: v[0] for k, v in render_batch([scene], size).items()}


def clip(scene: Scene, frames: int = 8, motion: tuple[float, float] = (0.05, 0.0), size: int = 32) -> dict:
    """A clip of the object moving along a straight line over a still background, for LatentWarp and
    video methods: frame f has the object at ``scene.centre + f * motion`` (image fractions per frame).

    Returns ``frames`` (F, 3, H, W) in [-1, 1], ``masks`` (F, 1, H, W), ``depth`` (F, 1, H, W),
    ``centres`` (F, 2) in image fractions and ``displacement`` (F - 1, 2): the true motion from each
    frame to the next in pixels, ``(dx, dy)``. ``ValueError`` if the path leaves the image."""
    if not isinstance(scene, Scene):
        raise ValueError(f"scene must be a Scene, got {type(scene).__name__}")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
        raise ValueError(f"frames must be an int >= 2, got {frames!r}")
    try:
        mx, my = (float(m) for m in motion)
    except (TypeError, ValueError):
        raise ValueError(f"motion must be a pair (dx, dy) in image fractions per frame, got {motion!r}") from None
    size = check_size(size)
    x0, y0 = scene.centre
    end = (x0 + (frames - 1) * mx, y0 + (frames - 1) * my)
    if not (0.0 <= end[0] <= 1.0 and 0.0 <= end[1] <= 1.0):
        raise ValueError(f"motion {motion!r} over {frames} frames takes the centre from {scene.centre} to "
                         f"({end[0]:.3f}, {end[1]:.3f}), outside the image [0, 1] x [0, 1]")
    centres = torch.tensor([(x0 + f * mx, y0 + f * my) for f in range(frames)], dtype=torch.float32)
    one = SceneBatch.of([scene])
    batch = SceneBatch(*(v.expand(frames) for v in (one.style, one.shape, one.colour, one.size)), centres)
    out = render_batch(batch, size)
    displacement = torch.tensor([[mx * size, my * size]], dtype=torch.float32).expand(frames - 1, 2).clone()
    return {"frames": out["image"], "masks": out["mask"], "depth": out["depth"], "centres": centres,
            "displacement": displacement}


# -- captions -----------------------------------------------------------------------------------


def caption_words(scene: Scene, drop=()) -> list[str]:
    """The caption's words, in :data:`ATTRIBUTES` order, leaving out the attributes named in ``drop``."""
    drop = set(drop)
    if not drop <= set(ATTRIBUTES):
        raise ValueError(f"drop must name attributes among {', '.join(ATTRIBUTES)}, got {sorted(drop)!r}")
    values = {"style": scene.style, "size": scene.size, "colour": scene.colour, "shape": scene.shape,
              "position": scene.position}
    return [values[a] for a in ATTRIBUTES if a not in drop]


def encode_caption(words) -> torch.Tensor:
    """Token ids (CAPTION_LENGTH,) of a caption: a string of space-separated words or a list of words
    from :data:`VOCAB`, padded with :data:`PAD_ID`. The empty caption is all padding (the
    unconditional caption of classifier-free guidance)."""
    if isinstance(words, str):
        words = words.split()
    words = list(words)
    unknown = [w for w in words if w not in _TOKEN or w == PAD]
    if unknown:
        raise ValueError(f"caption words must come from the vocabulary ({', '.join(VOCAB[1:])}), "
                         f"got unknown {unknown!r}")
    if len(words) > CAPTION_LENGTH:
        raise ValueError(f"a caption holds at most {CAPTION_LENGTH} words, got {len(words)}: {words!r}")
    ids = [_TOKEN[w] for w in words] + [PAD_ID] * (CAPTION_LENGTH - len(words))
    return torch.tensor(ids, dtype=torch.long)


def decode_caption(ids: torch.Tensor) -> str:
    """The words of token ids (L,), without padding."""
    return " ".join(VOCAB[i] for i in ids.tolist() if i != PAD_ID)


def caption_tokens(scene: Scene, drop=()) -> torch.Tensor:
    """The caption of a scene as token ids (CAPTION_LENGTH,), see :func:`caption_words`."""
    return encode_caption(caption_words(scene, drop))


def caption_batch(batch: SceneBatch, drop_word: float = 0.0, drop_all: float = 0.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids (B, CAPTION_LENGTH) of a batch's captions, on its device. Each attribute word is left
    out with probability ``drop_word`` (the words that stay keep their order and move left) and the
    whole caption with probability ``drop_all``, drawn from ``generator``: partial captions teach the
    subject to fill in what a caption does not say, empty ones give classifier-free guidance its
    unconditional branch."""
    for name, p in (("drop_word", drop_word), ("drop_all", drop_all)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    if (drop_word or drop_all) and generator is None:
        raise ValueError("caption dropout needs a generator (no global RNG is used)")
    device, n = batch.style.device, len(batch)
    offsets = {a: _TOKEN[_VALUES[a][0]] for a in ATTRIBUTES}  # each attribute's values are consecutive in VOCAB
    index = {"style": batch.style, "size": batch.size, "colour": batch.colour, "shape": batch.shape,
             "position": batch.cell}
    words = torch.stack([index[a] + offsets[a] for a in ATTRIBUTES], dim=1)  # (B, 5)
    keep = torch.ones_like(words, dtype=torch.bool)
    if drop_word:
        keep &= torch.rand(words.shape, generator=generator, device=device) >= drop_word
    if drop_all:
        keep &= (torch.rand(n, 1, generator=generator, device=device) >= drop_all)
    # move the kept words left, in order: a stable sort on "dropped"
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    words = torch.where(keep, words, PAD_ID).gather(1, order)
    out = torch.full((n, CAPTION_LENGTH), PAD_ID, dtype=torch.long, device=device)
    out[:, : len(ATTRIBUTES)] = words
    return out
