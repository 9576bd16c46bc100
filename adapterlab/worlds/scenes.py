"""The embedded image set: small rendered scenes of shapes, drawn by our own code.

What the scenes are asked and told is in :mod:`adapterlab.worlds.scenetext`.

Every scene shows ``count`` copies of one shape in one colour, grouped in one corner:

    shape    in SHAPES     circle, square, triangle, cross
    colour   in COLOURS    red, green, blue, yellow
    count    in COUNTS     1 .. 4
    corner   in CORNERS    top left, top right, bottom left, bottom right

The corner is split into a 2 x 2 grid of cells; each object sits in its own cell with a
random size and a small random offset, and its colour is jittered a little, so no two
scenes are pixel-identical even when their attributes are. Rendering is deterministic for
a seed and needs only numpy (shapes are drawn 4x supersampled, then averaged down, so
edges are anti-aliased).

Images are uint8 tensors (N, 3, H, W) - the layout torch's vision code uses; the
encoders in :mod:`adapterlab.worlds.vision` take floats in [0, 1] (``images.float() / 255``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow")
COUNTS = (1, 2, 3, 4)
CORNERS = ("top left", "top right", "bottom left", "bottom right")
IMAGE_SIZE = 48

RGB = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 220),
    "yellow": (235, 205, 20),
}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}  # counts are spelt out in all texts
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}


@dataclass(frozen=True)
class Scene:
    """What a picture shows (its ground truth)."""

    shape: str
    colour: str
    count: int
    corner: str

    def to_dict(self) -> dict:
        return asdict(self)

    def noun_phrase(self) -> str:
        """'a red circle', 'three blue crosses'."""
        if self.count == 1:
            article = "an" if self.colour[0] in "aeiou" else "a"
            return f"{article} {self.colour} {self.shape}"
        return f"{NUMBER_WORDS[self.count]} {self.colour} {PLURAL[self.shape]}"

    def attribute_ids(self) -> tuple[int, int, int, int]:
        """Class indices (shape, colour, count, corner), e.g. for pretraining the encoder."""
        return (SHAPES.index(self.shape), COLOURS.index(self.colour), COUNTS.index(self.count),
                CORNERS.index(self.corner))


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=COLOURS[rng.integers(len(COLOURS))],
        count=int(COUNTS[rng.integers(len(COUNTS))]),
        corner=CORNERS[rng.integers(len(CORNERS))],
    )


# --------------------------------------------------------------------------- drawing
def shape_mask(shape: str, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean mask of one shape of 'radius' r centred at (cx, cy) on the grid xs, ys (pixel units)."""
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        s = 0.8 * r
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "triangle":  # apex up: the half-width grows linearly from the apex to the base
        top, bottom = cy - r, cy + 0.8 * r
        return (ys >= top) & (ys <= bottom) & (np.abs(dx) <= (ys - top) / (bottom - top) * r)
    if shape == "cross":
        arm = 0.35 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_scene(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE, supersample: int = 4) -> np.ndarray:
    """Draw one scene -> uint8 array (3, size, size)."""
    if scene.shape not in SHAPES or scene.colour not in COLOURS or scene.count not in COUNTS \
            or scene.corner not in CORNERS:
        raise ValueError(f"cannot draw {scene}: shape, colour, count and corner must come from "
                         f"{SHAPES}, {COLOURS}, {COUNTS} and {CORNERS}")
    S = size * supersample
    coords = (np.arange(S) + 0.5) / supersample  # pixel-unit coordinates of the supersampled grid
    xs, ys = np.meshgrid(coords, coords)  # (S, S) each
    background = 235 + rng.integers(-8, 9)
    canvas = np.full((S, S, 3), float(background))

    half, cell = size / 2, size / 4
    x0 = 0.0 if scene.corner.endswith("left") else half
    y0 = 0.0 if scene.corner.startswith("top") else half
    cells = rng.permutation(4)[: scene.count]  # which of the 2 x 2 cells hold an object
    base_rgb = np.array(RGB[scene.colour], dtype=float)
    for c in cells:
        r = cell * rng.uniform(0.30, 0.42)
        cx = x0 + (c % 2 + 0.5) * cell + rng.uniform(-1, 1) * (cell / 2 - r) * 0.8
        cy = y0 + (c // 2 + 0.5) * cell + rng.uniform(-1, 1) * (cell / 2 - r) * 0.8
        colour = np.clip(base_rgb + rng.integers(-15, 16, size=3), 0, 255)
        canvas[shape_mask(scene.shape, xs, ys, cx, cy, r)] = colour
    image = canvas.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))  # anti-alias
    image = image + rng.normal(0, 2.0, size=image.shape)  # a little sensor noise
    return np.clip(np.rint(image), 0, 255).astype(np.uint8).transpose(2, 0, 1)  # (3, H, W)


def make_scenes(n: int, seed: int = 0, size: int = IMAGE_SIZE) -> tuple[list[Scene], torch.Tensor]:
    """n random scenes and their pictures -> (scenes, uint8 images (n, 3, size, size)). Deterministic per seed."""
    if n < 1:
        raise ValueError(f"make_scenes needs n >= 1; got n={n}")
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    images = np.stack([render_scene(s, rng, size) for s in scenes])
    return scenes, torch.from_numpy(images)
