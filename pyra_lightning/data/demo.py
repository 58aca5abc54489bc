"""The built-in ``demo`` task: a small generated dataset in the VTAB-1k folder layout.

It exists so that the whole pipeline (configs, CLI, training, folding, throughput) can be run and tested
offline, on a laptop CPU, without the 19 real VTAB-1k tasks. The images imitate VTAB's *structured*
tasks (Clevr, dSprites): a few flat shapes on a noisy background. The label is the **kind of shape**
(circle, square, triangle or cross); every object in one image has that kind, while the number of
objects (1-3), their positions, sizes and colours and the background all vary at random.

Two things keep the task honest but small:

* hues are drawn independently of the class, and each kind is scaled so that a shape of size ``s``
  covers the same area (``pi * s**2 / 4``) whatever its kind, so an image's mean colour or brightness
  says nothing about its label (it tracks the object count instead);
* shapes are large (a quarter to a third of the image side), axis-aligned, and always lighter than the dark
  background. With a fixed contrast polarity, a shape's edges are simple linear patterns inside a patch,
  which a tiny ViT trained from scratch picks up in a few epochs on 800 images at 32x32 (patch 4,
  width 64, depth 3, AdamW 1e-3: ~70% test accuracy after 5 epochs, ~85% after 10, ~2 s per epoch on
  one CPU thread). Random polarities, or shapes rotated by +-20 degrees, left it at chance for 10 epochs.

Generation is deterministic (one seed, a separate random stream per split) and atomic: everything is
written into a hidden temporary sibling folder that is renamed to ``<root>/demo`` only once complete.
"""

import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pyra_lightning.files import plain_dir_mode

DEMO_TASK_NAME = "demo"
DEMO_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
DEMO_SEED = 1234
DEMO_IMAGE_SIZE = 32
# Images per split folder; train800val200.txt lists train + val (1000), like the real release.
DEMO_SPLIT_SIZES: dict[str, int] = {"train": 800, "val": 200, "test": 400}

_SUPERSAMPLE = 4  # shapes are drawn 4x larger and box-filtered down, which antialiases their edges
_BACKGROUND_RANGE = (0.0, 90.0)  # per-channel base colour of the background...
_OBJECT_RANGE = (150.0, 255.0)  # ...and of the objects: always lighter, in any hue
_SIZE_RANGE = (0.25, 0.34)  # object size (diameter of the equal-area circle) as a fraction of the image side


def _polygon(kind: str, size: float) -> np.ndarray:
    """Vertices (V, 2), centred on the origin, of a polygonal shape whose area is ``pi * size**2 / 4``.

    Matching the area of a circle of diameter ``size`` keeps the number of object pixels (and so the
    image's mean colour) independent of the class.
    """
    area = math.pi * size**2 / 4
    if kind == "square":
        half = math.sqrt(area) / 2
        return np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
    if kind == "triangle":
        side = math.sqrt(4 * area / math.sqrt(3))  # equilateral: area = sqrt(3)/4 * side**2
        height = side * math.sqrt(3) / 2
        # centroid at the origin: apex 2/3 of the height above it, base 1/3 below
        return np.array([[0.0, -2 * height / 3], [side / 2, height / 3], [-side / 2, height / 3]])
    if kind == "cross":
        # arms of width w = L/3 over a span L: area = 2*L*w - w**2 = 5/9 * L**2
        span = math.sqrt(9 * area / 5)
        a, b = span / 2, span / 6
        return np.array(
            [
                [-b, -a],
                [b, -a],
                [b, -b],
                [a, -b],
                [a, b],
                [b, b],
                [b, a],
                [-b, a],
                [-b, b],
                [-a, b],
                [-a, -b],
                [-b, -b],
            ]
        )
    raise ValueError(f"unknown demo shape {kind!r}; expected one of {DEMO_CLASSES}")


def _placement_radius(size: float) -> float:
    """Radius of a circle that holds a shape of ``size`` of any kind, for placing it.

    It is the largest circumradius of the four kinds (the triangle's). Placing every kind with the same
    radius keeps positions and overlaps independent of the label.
    """
    return max(size / 2, *(float(np.linalg.norm(_polygon(k, size), axis=1).max()) for k in DEMO_CLASSES[1:]))


def _shape_alpha(kind: str, centre: tuple[float, float], size: float, image_size: int) -> np.ndarray:
    """Antialiased coverage mask (H, W) in [0, 1] of one shape, in image pixel coordinates."""
    scale = _SUPERSAMPLE
    canvas = Image.new("L", (image_size * scale, image_size * scale), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = centre[0] * scale, centre[1] * scale
    if kind == "circle":
        radius = size * scale / 2
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
    else:
        vertices = _polygon(kind, size * scale) + np.array([cx, cy])  # (V, 2)
        draw.polygon([tuple(v) for v in vertices.tolist()], fill=255)
    small = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0  # (H, W)


def render_demo_image(rng: np.random.Generator, label: int, image_size: int = DEMO_IMAGE_SIZE) -> np.ndarray:
    """Draw one demo image whose objects are all of kind ``DEMO_CLASSES[label]``.

    Args:
        rng: random stream; the image is a pure function of its state, which makes generation
            reproducible.
        label: class index into ``DEMO_CLASSES``.
        image_size: side of the square image in pixels.

    Returns:
        The image as a ``uint8`` array (H, W, 3), e.g. (32, 32, 3).
    """
    kind = DEMO_CLASSES[label]
    background = rng.uniform(*_BACKGROUND_RANGE, size=3)
    # low-frequency blotches plus pixel noise, so "background" is not a constant the model can subtract
    cells = -(-image_size // 8)
    blotches = rng.normal(0, 18, size=(cells, cells, 3))
    blotches = np.kron(blotches, np.ones((8, 8, 1)))[:image_size, :image_size]
    image = background + blotches + rng.normal(0, 10, size=(image_size, image_size, 3))  # (H, W, 3)

    count = int(rng.integers(1, 4))
    placed: list[tuple[float, float, float]] = []  # (x, y, placement radius)
    for _ in range(count):
        size = rng.uniform(*_SIZE_RANGE) * image_size
        radius = _placement_radius(size)
        # Rejection-sample a centre whose circle stays inside the image and clear of earlier objects, so
        # shapes are neither clipped nor occluded; if none is found, the last try overlaps a little.
        for _ in range(100):
            centre = (rng.uniform(radius, image_size - radius), rng.uniform(radius, image_size - radius))
            if all(math.dist(centre, (x, y)) > radius + other for x, y, other in placed):
                break
        placed.append((*centre, radius))
        alpha = _shape_alpha(kind, centre, size, image_size)[..., None]  # (H, W, 1)
        colour = rng.uniform(*_OBJECT_RANGE, size=3)
        image = image * (1 - alpha) + colour * alpha
    image += rng.normal(0, 6, size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _save_png(pixels: np.ndarray, path: Path) -> None:
    """Write one (H, W, 3) ``uint8`` image; a separate function so tests can make it fail."""
    Image.fromarray(pixels).save(path, format="PNG")


def _write_split(task_dir: Path, split: str, size: int, seed: int, image_size: int) -> list[str]:
    """Render one split into ``images/<split>/`` and return its ``"<path> <label>"`` lines."""
    split_index = list(DEMO_SPLIT_SIZES).index(split)
    rng = np.random.default_rng([seed, split_index])  # independent stream per split
    labels = np.arange(size) % len(DEMO_CLASSES)  # balanced classes...
    rng.shuffle(labels)  # ...in random order
    folder = task_dir / "images" / split
    folder.mkdir(parents=True)
    lines = []
    for index, label in enumerate(labels.tolist()):
        relative = f"images/{split}/{index:05d}.png"
        _save_png(render_demo_image(rng, label, image_size), task_dir / relative)
        lines.append(f"{relative} {label}")
    return lines


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def generate_demo(root: str | Path, seed: int = DEMO_SEED, image_size: int = DEMO_IMAGE_SIZE) -> Path:
    """Create ``<root>/demo`` in VTAB-1k layout unless it already exists.

    Safe to call from several processes at once and after a crash: each call renders into its own
    hidden temporary folder under ``root`` and renames it into place only when every file is written;
    a call that finds ``demo/`` already there (or loses the race to another process) keeps it as is.

    Args:
        root: VTAB-1k root folder; created if missing.
        seed: seed of the generator; the default gives the dataset every test and config expects.
        image_size: side of the square PNG images in pixels.

    Returns:
        The task folder ``<root>/demo``.
    """
    root = Path(root)
    target = root / DEMO_TASK_NAME
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEMO_TASK_NAME}.tmp-", dir=root))
    os.chmod(staging, plain_dir_mode())  # mkdtemp makes 0700; the data is shared like any other
    try:
        split_lines = {
            split: _write_split(staging, split, size, seed, image_size)
            for split, size in DEMO_SPLIT_SIZES.items()
        }
        _write_lines(staging / "train800.txt", split_lines["train"])
        _write_lines(staging / "val200.txt", split_lines["val"])
        _write_lines(staging / "train800val200.txt", split_lines["train"] + split_lines["val"])
        _write_lines(staging / "test.txt", split_lines["test"])
        (staging / "README.txt").write_text(
            f"Generated by pyra_lightning.data.demo (seed={seed}, {image_size}x{image_size} PNG).\n"
            f"Label = kind of every shape in the image: {', '.join(f'{i}={c}' for i, c in enumerate(DEMO_CLASSES))}.\n",
            encoding="utf-8",
        )
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():  # a real failure, not another process finishing first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # no-op after a successful rename
    return target
