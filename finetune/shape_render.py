"""Rendering of generated shape scenes: backgrounds, exact shape masks, placement (`finetune.shapes` builds the
dataset on top of it; this module knows pixels, not phrases)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from finetune.shape_config import COLORS, ShapesConfig

@dataclass
class SceneObject:
    """One drawn shape: its attributes, its exact mask (bool, H x W) and statistics of that mask."""

    color: str
    shape: str
    rgb: tuple[int, int, int]
    mask: np.ndarray
    area: int  # mask pixel count
    centroid: tuple[float, float]  # (x, y) mean of the mask's pixel coordinates
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), x1/y1 exclusive

    def describe(self) -> dict[str, Any]:
        """JSON-friendly summary (no mask)."""
        return {
            "color": self.color,
            "shape": self.shape,
            "area": self.area,
            "centroid": [round(self.centroid[0], 2), round(self.centroid[1], 2)],
            "bbox": list(self.bbox),
        }


@dataclass
class Scene:
    """A rendered scene: RGB image (H, W, 3) uint8, its objects and background kind."""

    image: np.ndarray
    objects: list[SceneObject]
    background: str



def _background(rng: np.random.Generator, kind: str, w: int, h: int) -> np.ndarray:
    """(H, W, 3) uint8 background in muted colours, so that named colours stand out."""

    def muted() -> np.ndarray:
        grey = rng.uniform(70, 200)
        return np.clip(grey + rng.uniform(-25, 25, size=3), 0, 255).astype(np.float32)

    if kind == "solid":
        img = np.empty((h, w, 3), dtype=np.uint8)
        img[:] = muted().astype(np.uint8)
        return img
    if kind == "gradient":
        # A linear ramp on a 16 x 16 grid, bilinearly resized: linear stays linear, and the
        # resize runs in C instead of several full-frame float passes.
        a, b = muted(), muted()
        angle = rng.uniform(0, 2 * math.pi)
        g = np.linspace(0, 1, 16, dtype=np.float32)
        t = g[:, None] * math.sin(angle) + g[None, :] * math.cos(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        small = (a + (b - a) * t[..., None]).astype(np.uint8)
        return np.array(Image.fromarray(small).resize((w, h), Image.BILINEAR))
    if kind == "noise":
        # Blocky low-frequency noise plus fine grain: texture without salt-and-pepper colour.
        # Coarse values are capped at 240 so adding grain in [0, 15] cannot overflow uint8.
        base = muted()
        cells = int(rng.integers(4, 12))
        coarse = np.clip(base + rng.normal(0, 18, size=(cells, cells, 3)) - 8, 0, 240).astype(np.uint8)
        img = np.array(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))
        img += np.frombuffer(rng.bytes(h * w * 3), dtype=np.uint8).reshape(h, w, 3) & 15
        return img
    raise ValueError(f"unknown background {kind!r}")


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    """Vertices of a shape inscribed in the circle (cx, cy, r), rotated by `rot` radians."""
    if shape == "square":
        # Axis-aligned: a rotated square reads as a "diamond", which no phrase names.
        s = r / math.sqrt(2)
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [
            (cx + r * math.cos(rot - math.pi / 2 + k * 2 * math.pi / 3),
             cy + r * math.sin(rot - math.pi / 2 + k * 2 * math.pi / 3))
            for k in range(3)
        ]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            a = rot - math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if shape == "ellipse":
        # Aspect 0.55 keeps it clearly distinct from a circle at any size.
        pts = []
        for k in range(48):
            t = k * 2 * math.pi / 48
            x, y = r * math.cos(t), 0.55 * r * math.sin(t)
            pts.append((cx + x * math.cos(rot) - y * math.sin(rot), cy + x * math.sin(rot) + y * math.cos(rot)))
        return pts
    raise ValueError(f"no polygon for {shape!r}")


def _shape_mask(
    shape: str, cx: float, cy: float, r: float, rot: float, w: int, h: int
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Bool (H, W) mask of one shape, drawn without anti-aliasing so it is exact, and its crop box.

    Drawn on a crop around the bounding circle only: full-frame drawing dominated the run time.
    """
    x0, y0 = max(int(math.floor(cx - r)) - 1, 0), max(int(math.floor(cy - r)) - 1, 0)
    x1, y1 = min(int(math.ceil(cx + r)) + 2, w), min(int(math.ceil(cy + r)) + 2, h)
    canvas = Image.new("1", (x1 - x0, y1 - y0), 0)
    draw = ImageDraw.Draw(canvas)
    lx, ly = cx - x0, cy - y0
    if shape == "circle":
        draw.ellipse([lx - r, ly - r, lx + r, ly + r], fill=1)
    else:
        draw.polygon(_polygon(shape, lx, ly, r, rot), fill=1)
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = np.asarray(canvas, dtype=bool)
    return mask, (x0, y0, x1, y1)


def _mask_stats(
    mask: np.ndarray, box: tuple[int, int, int, int]
) -> tuple[int, tuple[float, float], tuple[int, int, int, int]]:
    """(area, centroid (x, y), tight bbox) of a mask whose pixels all lie inside `box`."""
    x0, y0, x1, y1 = box
    ys, xs = np.nonzero(mask[y0:y1, x0:x1])
    if len(xs) == 0:
        return 0, (0.0, 0.0), (0, 0, 0, 0)
    bbox = (int(xs.min()) + x0, int(ys.min()) + y0, int(xs.max()) + x0 + 1, int(ys.max()) + y0 + 1)
    return int(len(xs)), (float(xs.mean()) + x0, float(ys.mean()) + y0), bbox


def _place(rng: np.random.Generator, n: int, w: int, h: int, cfg: ShapesConfig) -> list[tuple[float, float, float]]:
    """Up to `n` non-overlapping bounding circles (cx, cy, r) inside the image (rejection sampling)."""
    unit = min(w, h)
    placed: list[tuple[float, float, float]] = []
    gap = 0.02 * unit
    for _ in range(n * 30):
        if len(placed) == n:
            break
        r = rng.uniform(cfg.min_radius, cfg.max_radius) * unit
        cx = rng.uniform(r + 1, w - r - 1)
        cy = rng.uniform(r + 1, h - r - 1)
        if all(math.hypot(cx - x, cy - y) >= r + q + gap for x, y, q in placed):
            placed.append((cx, cy, r))
    return placed


def render_scene(
    rng: np.random.Generator,
    cfg: ShapesConfig,
    force: tuple[str | None, str | None] = (None, None),
) -> Scene:
    """Draw one random scene.

    Args:
        rng: source of randomness (the only one used).
        cfg: generator options.
        force: (colour, shape) that the first object must have, or None for random.
    Returns:
        Scene with image (H, W, 3) uint8 and objects whose masks are bool (H, W) and disjoint.
    """
    w, h = cfg.size
    background = str(cfg.backgrounds[int(rng.integers(len(cfg.backgrounds)))])
    image = _background(rng, background, w, h)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    objects: list[SceneObject] = []
    for i, (cx, cy, r) in enumerate(_place(rng, n, w, h, cfg)):
        color = force[0] if i == 0 and force[0] else str(rng.choice(cfg.scene_colors))
        shape = force[1] if i == 0 and force[1] else str(rng.choice(cfg.scene_shapes))
        rot = float(rng.uniform(0, 2 * math.pi))
        mask, box = _shape_mask(shape, cx, cy, r, rot, w, h)
        area, centroid, bbox = _mask_stats(mask, box)
        if area == 0:
            continue
        jitter = rng.integers(-cfg.color_jitter, cfg.color_jitter + 1, size=3)
        rgb = tuple(int(v) for v in np.clip(np.array(COLORS[color]) + jitter, 0, 255))
        x0, y0, x1, y1 = box
        image[y0:y1, x0:x1][mask[y0:y1, x0:x1]] = rgb  # paint only the crop: same pixels, less work
        objects.append(SceneObject(color, shape, rgb, mask, area, centroid, bbox))
    return Scene(image=image, objects=objects, background=background)
