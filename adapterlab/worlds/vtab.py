"""VTAB-1k in miniature: pictures to pretrain a small ViT on, the pretrained ViT base, and seven
downstream classification tasks it never saw as labels.

The paper's last experiments tune a ViT pretrained on ImageNet-21k (supervised) on VTAB-1k: 19
small tasks with 1,000 training pictures each, reported in three groups. Nothing can be
downloaded here, so this module makes the same kind of study from pictures our own code draws,
plus one task of real scans that ship inside scikit-learn (its handwritten digits):

    the base        a ViT (:mod:`adapterlab.encoders.transformer`) trained to name shape x colour of 1-4
                    objects on a light background (4 x 4 = 16 classes, PRETRAIN_CLASSES) - our
                    "ImageNet-21k": :func:`build_vit_base`, :func:`load_vit_base`

    natural         digits          real handwritten digits (scikit-learn's 1,797 8x8 scans), 10 classes
                    new_shapes      six shapes the base never saw, in colours it never saw, 6 classes
    specialized     noisy_shapes    the base's four shapes through a bad camera: low contrast, heavy noise
                    outline_shapes  the four shapes drawn as thin light outlines on a dark background
    structured      count           how many objects (1-6), mixed shapes and colours
                    distance        how far apart two objects are (4 bins of the centre distance)
                    orientation     which way a bar points (6 bins of 30 degrees)

Every task has 800 training and 200 validation pictures (the 1,000 of VTAB-1k: choose the learning
rate on val, then train the final run on all 1,000, :meth:`Task.train_and_val`) and 500 test
pictures; classes are balanced (counts differ by at most one). Pictures are uint8 (N, 3, 32, 32);
:func:`images_to_float` makes them the floats in [0, 1] the ViT takes.

Everything is deterministic for a seed: pictures are drawn with numpy from a generator seeded by
(seed, task, split), so a split does not depend on the sizes of the others or on torch's threads.
Drawing follows :mod:`adapterlab.worlds.scenes` (4x supersampled, then averaged down: anti-aliased edges).
"""
from __future__ import annotations

import hashlib
import json
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..io.files import atomic_write_text, base_folder, build_machine
from .scenes import COLOURS, RGB, SHAPES, shape_mask

IMAGE_SIZE = 32
GROUPS = ("natural", "specialized", "structured")
TASKS: dict[str, str] = {
    "digits": "natural",
    "new_shapes": "natural",
    "noisy_shapes": "specialized",
    "outline_shapes": "specialized",
    "count": "structured",
    "distance": "structured",
    "orientation": "structured",
}
SPLITS = ("train", "val", "test")
SPLIT_SIZES = {"train": 800, "val": 200, "test": 500}
PRETRAIN_SHAPES = SHAPES  # the scenes' circle, square, triangle, cross
PRETRAIN_CLASSES = [f"{colour} {shape}" for shape in PRETRAIN_SHAPES for colour in COLOURS]  # label = 4 * shape + colour
NEW_SHAPES = ("ring", "diamond", "star", "hexagon", "crescent", "heart")  # never in the pretraining pictures


# --------------------------------------------------------------------------- drawing
@dataclass
class Thing:
    """One object in a picture: a shape of 'radius' r (pixels) centred at (x, y), turned by angle
    (radians), filled with rgb - or, if outline > 0, only a band that wide inside its edge."""

    shape: str
    x: float
    y: float
    r: float
    rgb: tuple[float, float, float]
    angle: float = 0.0
    outline: float = 0.0


def thing_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of a shape of radius r centred at the origin of the offsets dx, dy (pixels)."""
    if shape in SHAPES:  # the scenes' circle, square, triangle, cross
        return shape_mask(shape, dx, dy, 0.0, 0.0, r)
    d2 = dx * dx + dy * dy
    if shape == "ring":
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "star":  # five points, one up: the radius swings with the angle around the centre
        theta = np.arctan2(dy, dx) + np.pi / 2
        return np.sqrt(d2) <= r * (0.55 + 0.45 * np.cos(5 * theta))
    if shape == "hexagon":  # flat top and bottom
        return np.maximum(np.abs(dx) * 0.866 + np.abs(dy) * 0.5, np.abs(dy)) <= 0.85 * r
    if shape == "crescent":  # a disc with a bite out of its right side
        return (d2 <= r * r) & ((dx - 0.45 * r) ** 2 + dy * dy > (0.8 * r) ** 2)
    if shape == "heart":  # the classic quartic, point down (image y grows downwards)
        u, v = dx / (0.85 * r), -dy / (0.85 * r) + 0.25
        return (u * u + v * v - 1) ** 3 - u * u * v ** 3 <= 0
    if shape == "bar":  # a thin bar along the x axis (turn it with the angle)
        return (np.abs(dx) <= r) & (np.abs(dy) <= max(0.9, 0.12 * r))
    raise ValueError(f"unknown shape {shape!r}; expected one of {PRETRAIN_SHAPES + NEW_SHAPES + ('bar',)}")


def render(things: list[Thing], background: np.ndarray, rng: np.random.Generator, noise: float = 2.0,
           size: int = IMAGE_SIZE, supersample: int = 4) -> np.ndarray:
    """Draw things over a background (size, size, 3) -> uint8 (3, size, size), with sensor noise (std, 0-255)."""
    S = size * supersample
    coords = (np.arange(S) + 0.5) / supersample  # pixel-unit coordinates of the supersampled grid
    xs, ys = np.meshgrid(coords, coords)  # (S, S) each
    canvas = np.repeat(np.repeat(background.astype(float), supersample, 0), supersample, 1)  # (S, S, 3)
    for t in things:
        c, s = np.cos(t.angle), np.sin(t.angle)
        dx, dy = xs - t.x, ys - t.y
        u, v = c * dx + s * dy, -s * dx + c * dy  # offsets in the thing's own (turned) frame
        mask = thing_mask(t.shape, u, v, t.r)
        if t.outline > 0:
            mask &= ~thing_mask(t.shape, u, v, t.r - t.outline)
        canvas[mask] = t.rgb
    image = canvas.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))  # anti-alias
    image = image + rng.normal(0, noise, size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8).transpose(2, 0, 1)  # (3, H, W)


def plain(rng: np.random.Generator, lo: int = 225, hi: int = 245, size: int = IMAGE_SIZE) -> np.ndarray:
    """A flat grey background (size, size, 3) of a random brightness in [lo, hi]."""
    return np.full((size, size, 3), float(rng.integers(lo, hi + 1)))


def upsample_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights of linear interpolation between pixel centres (edges clamped)."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = np.zeros((n_out, n_in))
    w[np.arange(n_out), lo] += 1 - (pos - lo)
    w[np.arange(n_out), hi] += pos - lo
    return w


def jitter(rgb: tuple, rng: np.random.Generator, amount: int = 15) -> tuple:
    """A named colour, a little off (as in the scenes)."""
    return tuple(np.clip(np.array(rgb, float) + rng.integers(-amount, amount + 1, size=3), 0, 255))


def bright_colour(rng: np.random.Generator) -> tuple:
    """A saturated colour of random hue (fully on, fully off and one channel in between)."""
    channels = rng.permutation(3)
    rgb = np.zeros(3)
    rgb[channels[0]], rgb[channels[1]] = 255.0, rng.uniform(0, 255)
    return tuple(rgb)


def place(rng: np.random.Generator, radii: list[float], gap: float = 1.0, margin: float = 0.5,
          size: int = IMAGE_SIZE, tries: int = 200) -> list[tuple[float, float]]:
    """Centres for objects of the given radii, inside the picture and not touching (rejection sampling)."""
    for _ in range(tries):
        centres: list[tuple[float, float]] = []
        for r in radii:
            for _ in range(50):
                x, y = rng.uniform(r + margin, size - r - margin, size=2)
                if all((x - a) ** 2 + (y - b) ** 2 >= (r + rb + gap) ** 2 for (a, b), rb in zip(centres, radii)):
                    centres.append((x, y))
                    break
            else:
                break  # no room for this one: start the picture again
        if len(centres) == len(radii):
            return centres
    raise RuntimeError(f"could not place {len(radii)} objects of radii {radii} in a {size}x{size} picture")


def balanced_labels(n: int, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """n labels in random order, every class n // n_classes or one more times."""
    return rng.permutation(np.arange(n) % n_classes)


# --------------------------------------------------------------------------- one picture per task
def pretrain_picture(label: int, rng: np.random.Generator) -> np.ndarray:
    """The base's pictures: 1-4 objects of one shape and colour (label = 4 * shape + colour), anywhere."""
    shape, colour = PRETRAIN_SHAPES[label // len(COLOURS)], COLOURS[label % len(COLOURS)]
    radii = list(rng.uniform(3.0, 6.0, size=rng.integers(1, 5)))
    things = [Thing(shape, x, y, r, jitter(RGB[colour], rng)) for (x, y), r in zip(place(rng, radii), radii)]
    return render(things, plain(rng), rng)


def new_shapes_picture(label: int, rng: np.random.Generator) -> np.ndarray:
    """One of six shapes the base never saw, in a bright colour of any hue, on a light background."""
    r = rng.uniform(6.0, 10.0)
    (x, y), = place(rng, [r])
    return render([Thing(NEW_SHAPES[label], x, y, r, bright_colour(rng))], plain(rng), rng)


def noisy_shapes_picture(label: int, rng: np.random.Generator) -> np.ndarray:
    """1-3 of one of the base's shapes through a poor camera: a third of the contrast, noise of std 45."""
    radii = list(rng.uniform(3.5, 6.0, size=rng.integers(1, 4)))
    colour = COLOURS[rng.integers(len(COLOURS))]
    things = [Thing(SHAPES[label], x, y, r, jitter(RGB[colour], rng)) for (x, y), r in zip(place(rng, radii), radii)]
    clean = render(things, plain(rng), rng, noise=0.0).astype(float)
    dim = 128 + (clean - 128) / 3
    return np.clip(np.rint(dim + rng.normal(0, 45.0, size=dim.shape)), 0, 255).astype(np.uint8)


def outline_shapes_picture(label: int, rng: np.random.Generator) -> np.ndarray:
    """One of the base's shapes as a thin light outline on a dark background (a different imaging process)."""
    r = rng.uniform(5.0, 10.0)
    (x, y), = place(rng, [r])
    light = tuple(rng.uniform(180, 255, size=3))
    return render([Thing(SHAPES[label], x, y, r, light, outline=1.2)], plain(rng, 15, 45), rng)


def count_picture(label: int, rng: np.random.Generator) -> np.ndarray:
    """label + 1 small objects, each of a random shape and colour."""
    radii = list(rng.uniform(2.5, 4.0, size=label + 1))
    things = [Thing(SHAPES[rng.integers(len(SHAPES))], x, y, r, jitter(RGB[COLOURS[rng.integers(len(COLOURS))]], rng))
              for (x, y), r in zip(place(rng, radii), radii)]
    return render(things, plain(rng), rng)


DISTANCE_BINS = (8.0, 12.0, 16.0, 20.0, 24.0)  # pixel distance between the two centres (never touching); class i: [bins[i], bins[i+1])


def distance_picture(label: int, rng: np.random.Generator) -> np.ndarray:
    """Two small objects whose centres are a distance in DISTANCE_BINS[label] .. DISTANCE_BINS[label + 1] apart."""
    radii = rng.uniform(2.5, 3.5, size=2)
    lo, hi = DISTANCE_BINS[label], DISTANCE_BINS[label + 1]
    for _ in range(1000):
        d, angle = rng.uniform(lo, hi), rng.uniform(0, 2 * np.pi)
        x0, y0 = rng.uniform(radii[0] + 0.5, IMAGE_SIZE - radii[0] - 0.5, size=2)
        x1, y1 = x0 + d * np.cos(angle), y0 + d * np.sin(angle)
        if radii[1] + 0.5 <= min(x1, y1) and max(x1, y1) <= IMAGE_SIZE - radii[1] - 0.5:
            break
    else:
        raise RuntimeError(f"could not place two objects {lo:g}-{hi:g} pixels apart in a {IMAGE_SIZE}-pixel picture")
    centres = [(x0, y0), (x1, y1)]
    things = [Thing(SHAPES[rng.integers(len(SHAPES))], x, y, r, jitter(RGB[COLOURS[rng.integers(len(COLOURS))]], rng))
              for (x, y), r in zip(centres, radii)]
    return render(things, plain(rng), rng)


ORIENTATION_BINS = 6  # 180 degrees in bins of 30


def orientation_picture(label: int, rng: np.random.Generator) -> np.ndarray:
    """A bar at an angle in bin ``label`` of 180 / ORIENTATION_BINS degrees (0 = pointing right)."""
    width = np.pi / ORIENTATION_BINS
    angle = (label + rng.uniform(0, 1)) * width
    r = rng.uniform(7.0, 11.0)
    (x, y), = place(rng, [r])
    colour = COLOURS[rng.integers(len(COLOURS))]
    return render([Thing("bar", x, y, r, jitter(RGB[colour], rng), angle=-angle)], plain(rng), rng)  # y points down


PictureFn = Callable[[int, np.random.Generator], np.ndarray]
DRAWN: dict[str, tuple[list[str], PictureFn]] = {  # task -> (class names, draw one picture of a class)
    "new_shapes": (list(NEW_SHAPES), new_shapes_picture),
    "noisy_shapes": (list(SHAPES), noisy_shapes_picture),
    "outline_shapes": (list(SHAPES), outline_shapes_picture),
    "count": ([str(n) for n in range(1, 7)], count_picture),
    "distance": ([f"{lo:g}-{hi:g} px" for lo, hi in zip(DISTANCE_BINS, DISTANCE_BINS[1:])], distance_picture),
    "orientation": ([f"{30 * i}-{30 * (i + 1)} deg" for i in range(ORIENTATION_BINS)], orientation_picture),
}


# --------------------------------------------------------------------------- sets of pictures
def stream(seed: int, name: str, split: str) -> np.random.Generator:
    """The random generator of one split of one task (or of the pretraining set): independent streams."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), zlib.crc32(split.encode())])


def draw_set(draw: PictureFn, n: int, n_classes: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n pictures with balanced labels -> (uint8 (n, 3, 32, 32), int64 (n,))."""
    labels = balanced_labels(n, n_classes, rng)
    images = np.stack([draw(int(y), rng) for y in labels]) if n else np.zeros((0, 3, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def pretrain_set(n: int, seed: int = 0, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The base's pretraining pictures: n pictures, labels in 0..15 (PRETRAIN_CLASSES), balanced.
    split names an independent stream ("train", "heldout"); deterministic for (n, seed, split)."""
    return draw_set(pretrain_picture, n, len(PRETRAIN_CLASSES), stream(seed, "pretrain", split))


def digits_to_images(digits: np.ndarray) -> np.ndarray:
    """scikit-learn's 8x8 digits (values 0-16, ink high) -> uint8 (N, 3, 32, 32): dark ink on white paper."""
    w = upsample_matrix(IMAGE_SIZE, 8)
    ink = np.einsum("yi,nij,xj->nyx", w, digits / 16.0, w)  # (N, 32, 32) in [0, 1]
    grey = np.clip(np.rint(245 - 225 * ink), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, None], 3, axis=1)


def digits_split_indices(seed: int, sizes: dict[str, int], targets: np.ndarray) -> dict[str, np.ndarray]:
    """Which of scikit-learn's digits go to each split: disjoint, class-balanced, shuffled."""
    rng = stream(seed, "digits", "split")
    per_class = [rng.permutation(np.flatnonzero(targets == c)) for c in range(10)]  # each class's pictures, shuffled
    start = np.zeros(10, dtype=int)
    indices = {}
    for split in SPLITS:
        counts = np.bincount(np.arange(sizes[split]) % 10, minlength=10)  # balanced: n // 10 or one more per class
        if np.any(start + counts > [len(p) for p in per_class]):
            raise ValueError(f"the digits task has {len(targets)} pictures ({min(map(len, per_class))} of its "
                             f"rarest class); sizes {sizes} ask for more. Use smaller n_train/n_val/n_test")
        idx = np.concatenate([p[s : s + k] for p, s, k in zip(per_class, start, counts)])
        start += counts
        indices[split] = idx[rng.permutation(len(idx))]
    return indices


def digits_splits(seed: int, sizes: dict[str, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train/val/test pictures of scikit-learn's 1,797 bundled handwritten digits (no download)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    indices = digits_split_indices(seed, sizes, digits.target)
    return {split: (torch.from_numpy(digits_to_images(digits.images[idx])),
                    torch.from_numpy(digits.target[idx].astype(np.int64))) for split, idx in indices.items()}


@dataclass
class Task:
    """One downstream task: pictures uint8 (N, 3, 32, 32) and labels int64 (N,) in 0..len(classes)-1."""

    name: str
    group: str
    classes: list[str]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def train_and_val(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All 1,000 training pictures (train + val): what the final run trains on, as in VTAB-1k."""
        return torch.cat([self.train_images, self.val_images]), torch.cat([self.train_labels, self.val_labels])


def make_task(name: str, seed: int = 0, n_train: int = SPLIT_SIZES["train"], n_val: int = SPLIT_SIZES["val"],
              n_test: int = SPLIT_SIZES["test"]) -> Task:
    """Build a task of TASKS; deterministic for (name, seed, and each split's size). Smaller sizes
    make quick tests; the VTAB-1k sizes are the defaults (800 + 200 + 500)."""
    if name not in TASKS:
        raise ValueError(f"unknown VTAB task {name!r}; the tasks are {', '.join(TASKS)}")
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    if any(n < 0 for n in sizes.values()):
        raise ValueError(f"make_task({name!r}): split sizes must be >= 0; got {sizes}")
    if name == "digits":
        classes = [str(d) for d in range(10)]
        splits = digits_splits(seed, sizes)
    else:
        classes, draw = DRAWN[name]
        splits = {s: draw_set(draw, sizes[s], len(classes), stream(seed, name, s)) for s in SPLITS}
    return Task(name, TASKS[name], classes, *splits["train"], *splits["val"], *splits["test"])


def images_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pictures (N, 3, H, W) in 0..255 -> float32 in [0, 1] (what the ViT takes)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"images_to_float expects uint8 pictures (0..255); got dtype {images.dtype}")
    return images.float() / 255.0


# --------------------------------------------------------------------------- the ViT base
VTAB_VERSION = 1  # bump when the pictures or the pretraining code change what gets built


@dataclass
class ViTRecipe:
    """Everything that decides the pretrained ViT base; its hash names the folder."""

    model: dict = field(default_factory=lambda: dict(image_size=IMAGE_SIZE, patch_size=4, channels=3,
                                                    n_classes=len(PRETRAIN_CLASSES), dim=64, n_layers=4, n_heads=4,
                                                    mlp_hidden=256))
    n_images: int = 8000  # pretraining pictures (the "ImageNet-21k" of this study)
    n_heldout: int = 512  # more pictures, never trained on, that measure the base
    steps: int = 600
    batch_size: int = 64
    lr: float = 5e-3
    warmup_steps: int = 30
    weight_decay: float = 0.05
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({"recipe": asdict(self), "version": VTAB_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


VIT_RECIPE = ViTRecipe()


def vit_base_name(recipe: Optional[ViTRecipe] = None) -> str:
    """The base's folder name: ``vit-<12 hex digits of the recipe's and VTAB_VERSION's hash>``."""
    return f"vit-{(recipe or VIT_RECIPE).key()}"


def pretrain_vit(recipe: ViTRecipe, progress: bool = True, callbacks: Sequence = ()):
    """Train a ViT from scratch to name the shape x colour of the pretraining pictures -> (model, info).

    The one training loop (:func:`adapterlab.train.train`, whose ``callbacks`` these are): plain
    AdamW (weight decay on matrices only), linear warm-up and cosine decay, no clipping; batches in
    an order drawn with numpy, so the run depends on the seed alone (and on torch's thread count,
    which :func:`build_vit_base` fixes to 1).
    """
    from ..encoders.transformer import ViT, ViTConfig, init_encoder_weights
    from ..train import TrainConfig, train

    t0 = time.perf_counter()
    images, labels = pretrain_set(recipe.n_images, recipe.seed, "train")
    held_images, held_labels = pretrain_set(recipe.n_heldout, recipe.seed, "heldout")
    x_all = images_to_float(images)  # (N, 3, 32, 32)
    model = init_encoder_weights(ViT(ViTConfig(**recipe.model)), seed=recipe.seed)
    rng = np.random.default_rng([recipe.seed, zlib.crc32(b"batches")])
    order, pos = rng.permutation(recipe.n_images), 0

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal order, pos
        if pos + recipe.batch_size > len(order):  # a new epoch
            order, pos = rng.permutation(recipe.n_images), 0
        idx = torch.from_numpy(order[pos : pos + recipe.batch_size])
        pos += recipe.batch_size
        return x_all[idx], labels[idx]  # (B, 3, 32, 32), (B,)

    def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, targets = batch
        return F.cross_entropy(model(images), targets)

    config = TrainConfig(steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr,
                         warmup_steps=recipe.warmup_steps, weight_decay=recipe.weight_decay, seed=recipe.seed,
                         checkpoint=False, log_every=1, progress=progress, desc="pretraining the ViT base")
    metrics = train(model, x_all, config, callbacks=callbacks, batch_fn=batch, loss_fn=loss_fn)
    history = [round(loss, 4) for _, loss in metrics["loss_history"]]  # every step's
    model.eval().requires_grad_(False)
    info = {"recipe": asdict(recipe), "version": VTAB_VERSION, "name": vit_base_name(recipe),
            "classes": PRETRAIN_CLASSES, "loss_history": history, "final_loss": float(np.mean(history[-20:])),
            "heldout_accuracy": accuracy(model, held_images, held_labels),
            "train_accuracy": accuracy(model, images[:2048], labels[:2048]),
            "params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "pretrain_seconds": round(time.perf_counter() - t0, 1)}
    return model, info


def build_vit_base(progress: bool = True, force: bool = False, recipe: Optional[ViTRecipe] = None) -> Path:
    """The folder of the pretrained ViT base: shipped with the package, else cached, else built now.

    A build (first use only, about two minutes on one CPU thread) runs under a file lock and
    appears complete or not at all, so concurrent first uses build it once. It always runs on
    one thread with fixed seeds: the same torch on the same kind of CPU builds the same bytes.
    The folder holds ``model.safetensors`` and ``config.json`` (:func:`adapterlab.encoders.transformer.save_encoder`)
    and ``vit.json`` (the recipe, the loss history and the held-out accuracy).
    """
    from ..encoders.transformer import save_encoder

    recipe = recipe or VIT_RECIPE
    name = vit_base_name(recipe)

    def build(folder: Path) -> None:
        model, info = pretrain_vit(recipe, progress=progress)
        save_encoder(model, folder)
        atomic_write_text(folder / "vit.json", json.dumps({**info, "built_with": build_machine()}, indent=1))

    announce = ("Building the ViT base (first use only, about 2 minutes on one CPU thread) into {folder}"
                if progress else None)
    return base_folder(name, "vit.json", build, force=force, announce=announce)


def load_vit_base(device=None, progress: bool = True, recipe: Optional[ViTRecipe] = None):
    """The pretrained ViT base, frozen (requires_grad False) and in eval mode; built on first use."""
    from ..encoders.transformer import load_encoder

    model = load_encoder(build_vit_base(progress=progress, recipe=recipe))
    return model.to(device or "cpu").eval().requires_grad_(False)


def base_info(recipe: Optional[ViTRecipe] = None) -> dict:
    """The base's ``vit.json``: recipe, loss history, held-out accuracy, build time."""
    return json.loads((build_vit_base(progress=False, recipe=recipe) / "vit.json").read_text())


# --------------------------------------------------------------------------- measuring
@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Fraction of pictures (uint8 (N, 3, H, W)) whose highest logit is their label. Runs in eval
    mode without autograd and puts the model back in the mode it was in."""
    if len(images) != len(labels):
        raise ValueError(f"accuracy: {len(images)} pictures but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError("accuracy needs at least one picture")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = model(images_to_float(images[i : i + batch_size]).to(device))  # (b, n_classes)
        correct += (logits.argmax(-1).cpu() == labels[i : i + batch_size]).sum().item()
    model.train(was_training)
    return correct / len(images)
