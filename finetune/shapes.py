"""A generated referring-segmentation dataset: coloured shapes on varied backgrounds.

Each sample is a scene of a few non-overlapping shapes (circle, square, triangle, star, ellipse) in
named colours, on a solid, gradient or noise background, with a phrase that picks out exactly one of
them ("the red circle", "the leftmost square", "the bigger blue shape", "the shape at the top") and
the exact boolean mask of that shape.

Why generated data: it gives a fast, offline, infinitely large training and evaluation set whose
concepts can be switched off and on, which is what the "learn a new concept from corrections" demo
needs (train without ever saying "green", then teach "green" from a handful of corrected masks).

Determinism: sample `i` depends only on `(seed, i)` and the config, never on which samples were
generated before, so any index can be produced lazily in any order or worker.

Unambiguity rules (what the generator guarantees for every phrase):
- colour / shape words: the target is the only object in the scene with those attributes;
- position words (leftmost, on the top, ...): among the objects matching the phrase's noun, the
  target's centroid is beyond every other one by at least `position_margin` x min(W, H) pixels;
- size words (bigger, smallest, ...): the target's area is at least `size_ratio` x (or at most
  1 / `size_ratio` x) every other matching object's area.
Shapes never overlap, so each mask is exactly the pixels painted in the target's colour.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

from finetune.samples import ReferringSample, SceneGroup

# Saturated colours far apart in RGB, so jittered instances never look like a neighbour.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 210, 35),
    "orange": (245, 135, 25),
    "purple": (135, 50, 185),
    "pink": (245, 125, 195),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ellipse")
BACKGROUNDS: tuple[str, ...] = ("solid", "gradient", "noise")
# Phrase families; a config may restrict generation to some of them.
KINDS: tuple[str, ...] = ("color_shape", "color", "shape", "position", "size")

# Words for each direction: (superlative used with 3+ candidates, phrase forms valid with 2).
_DIRECTIONS: dict[str, tuple[str, ...]] = {
    "left": ("the leftmost {noun}", "the {noun} on the left"),
    "right": ("the rightmost {noun}", "the {noun} on the right"),
    "top": ("the topmost {noun}", "the {noun} on the top", "the {noun} at the top"),
    "bottom": ("the bottommost {noun}", "the {noun} at the bottom"),
}
_SIZE_WORDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # (comparatives for exactly two candidates, superlatives for three or more)
    "big": (("bigger", "larger"), ("biggest", "largest")),
    "small": (("smaller",), ("smallest",)),
}


@dataclass(frozen=True)
class ShapesConfig:
    """Options of the generator; every field has a usable default.

    Concept options (words are matched as whole, lower-case tokens of the phrase):
        exclude_words: no phrase contains any of these words (objects may still show the concept,
            e.g. green shapes appear but are never called "green").
        require_words: every phrase contains at least one of these words (generate ONLY a concept).
        exclude_targets: colour or shape names the referred object never has (may be distractors).
        exclude_from_scenes: colour or shape names that never appear in any scene.
        kinds: phrase families allowed, a subset of `KINDS`.
    """

    image_size: int | tuple[int, int] = 224  # int → square; tuple → (W, H)
    min_objects: int = 2
    max_objects: int = 5
    colors: tuple[str, ...] = tuple(COLORS)
    shapes: tuple[str, ...] = SHAPES
    backgrounds: tuple[str, ...] = BACKGROUNDS
    kinds: tuple[str, ...] = KINDS
    exclude_words: frozenset[str] = field(default_factory=frozenset)
    require_words: frozenset[str] = field(default_factory=frozenset)
    exclude_targets: frozenset[str] = field(default_factory=frozenset)
    exclude_from_scenes: frozenset[str] = field(default_factory=frozenset)
    min_radius: float = 0.07  # bounding-circle radius, as a fraction of min(W, H)
    max_radius: float = 0.17
    position_margin: float = 0.08  # fraction of min(W, H) a position word needs
    size_ratio: float = 1.5  # area ratio a size word needs
    color_jitter: int = 12  # max per-channel offset from the named colour
    max_tries: int = 100  # scenes to draw before giving up on the filters

    def __post_init__(self) -> None:
        # Accept any iterable of words for convenience; store lower-case frozensets.
        for name in ("exclude_words", "require_words", "exclude_targets", "exclude_from_scenes"):
            object.__setattr__(self, name, frozenset(w.lower() for w in getattr(self, name)))
        unknown = [c for c in self.colors if c not in COLORS] + [s for s in self.shapes if s not in SHAPES]
        if unknown:
            raise ValueError(f"unknown colours/shapes: {unknown}")
        if not set(self.kinds) <= set(KINDS):
            raise ValueError(f"kinds must be a subset of {KINDS}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError("need 1 <= min_objects <= max_objects")
        if not self.scene_colors or not self.scene_shapes:
            raise ValueError("exclude_from_scenes removes every colour or every shape")

    @property
    def size(self) -> tuple[int, int]:
        """(W, H) of generated images."""
        if isinstance(self.image_size, int):
            return (self.image_size, self.image_size)
        return (int(self.image_size[0]), int(self.image_size[1]))

    @property
    def scene_colors(self) -> tuple[str, ...]:
        return tuple(c for c in self.colors if c not in self.exclude_from_scenes)

    @property
    def scene_shapes(self) -> tuple[str, ...]:
        return tuple(s for s in self.shapes if s not in self.exclude_from_scenes)


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


@dataclass(frozen=True)
class Candidate:
    """A phrase that picks out exactly one object of a scene."""

    target: int
    phrase: str
    kind: str
    words: frozenset[str]


# --------------------------------------------------------------------------------------------
# Rendering


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


# --------------------------------------------------------------------------------------------
# Phrases


def _words(phrase: str) -> frozenset[str]:
    """Content tokens of a phrase (what concept filters match against)."""
    return frozenset(phrase.lower().split()) - {"the", "on", "at"}


def _unique_phrases(objects: Sequence[SceneObject]) -> list[Candidate]:
    """Attribute phrases: colour+shape, colour alone, shape alone, when unique in the scene."""
    out = []
    for i, o in enumerate(objects):
        same_both = sum(p.color == o.color and p.shape == o.shape for p in objects)
        same_color = sum(p.color == o.color for p in objects)
        same_shape = sum(p.shape == o.shape for p in objects)
        if same_both == 1:
            out.append(Candidate(i, f"the {o.color} {o.shape}", "color_shape", _words(f"{o.color} {o.shape}")))
        if same_color == 1:
            for noun in ("shape", "object"):
                out.append(Candidate(i, f"the {o.color} {noun}", "color", _words(f"{o.color} {noun}")))
        if same_shape == 1:
            out.append(Candidate(i, f"the {o.shape}", "shape", _words(o.shape)))
    return out


def _groups(objects: Sequence[SceneObject]) -> list[tuple[str, list[int]]]:
    """(noun, member indices) for every noun phrase that covers 2+ objects."""
    groups: list[tuple[str, list[int]]] = [("shape", list(range(len(objects))))]
    for color in sorted({o.color for o in objects}):
        members = [i for i, o in enumerate(objects) if o.color == color]
        groups.append((f"{color} shape", members))
    for shape in sorted({o.shape for o in objects}):
        members = [i for i, o in enumerate(objects) if o.shape == shape]
        groups.append((shape, members))
    for color, shape in sorted({(o.color, o.shape) for o in objects}):
        members = [i for i, o in enumerate(objects) if o.color == color and o.shape == shape]
        groups.append((f"{color} {shape}", members))
    return [g for g in groups if len(g[1]) >= 2]


def _relational_phrases(objects: Sequence[SceneObject], cfg: ShapesConfig, w: int, h: int) -> list[Candidate]:
    """Position and size phrases whose winner beats every other group member by the margin."""
    margin = cfg.position_margin * min(w, h)
    centroids = [o.centroid for o in objects]
    areas = [o.area for o in objects]
    out = []
    for noun, members in _groups(objects):
        # Position: value along an axis where bigger means "more that way".
        axes = {
            "left": [-centroids[i][0] for i in members],
            "right": [centroids[i][0] for i in members],
            "top": [-centroids[i][1] for i in members],
            "bottom": [centroids[i][1] for i in members],
        }
        for direction, values in axes.items():
            order = np.argsort(values)[::-1]
            if values[order[0]] - values[order[1]] < margin:
                continue
            target = members[int(order[0])]
            forms = _DIRECTIONS[direction] if len(members) == 2 else _DIRECTIONS[direction][:1]
            for form in forms:
                phrase = form.format(noun=noun)
                out.append(Candidate(target, phrase, "position", _words(phrase)))
        # Size: the winner's area must dominate every other member's by `size_ratio`.
        for which, (comparatives, superlatives) in _SIZE_WORDS.items():
            sign = 1 if which == "big" else -1
            vals = [sign * math.log(max(areas[i], 1)) for i in members]
            order = np.argsort(vals)[::-1]
            if vals[order[0]] - vals[order[1]] < math.log(cfg.size_ratio):
                continue
            target = members[int(order[0])]
            words = comparatives if len(members) == 2 else superlatives
            for adj in words:
                phrase = f"the {adj} {noun}"
                out.append(Candidate(target, phrase, "size", _words(phrase)))
    return out


def candidate_phrases(scene: Scene, cfg: ShapesConfig) -> list[Candidate]:
    """Every unambiguous phrase for `scene` that passes the config's concept filters."""
    w, h = cfg.size
    objs = scene.objects
    cands = _unique_phrases(objs) + _relational_phrases(objs, cfg, w, h)
    kept = []
    for c in cands:
        tokens = c.words
        target = objs[c.target]
        if c.kind not in cfg.kinds:
            continue
        if tokens & cfg.exclude_words:
            continue
        if cfg.require_words and not tokens & cfg.require_words:
            continue
        if {target.color, target.shape} & cfg.exclude_targets:
            continue
        kept.append(c)
    return kept


def _forced_attributes(rng: np.random.Generator, cfg: ShapesConfig) -> tuple[str | None, str | None]:
    """Pick a required colour/shape for one object so `require_words` can be satisfied quickly."""
    colors = [w for w in cfg.require_words if w in cfg.scene_colors and w not in cfg.exclude_targets]
    shapes = [w for w in cfg.require_words if w in cfg.scene_shapes and w not in cfg.exclude_targets]
    if not colors and not shapes:
        return (None, None)
    options = [(c, None) for c in sorted(colors)] + [(None, s) for s in sorted(shapes)]
    return options[int(rng.integers(len(options)))]


def generate(seed: int, index: int, cfg: ShapesConfig) -> ReferringSample:
    """Generate sample `index` of the stream `seed`; a pure function of its arguments.

    Returns:
        ReferringSample with an RGB image of cfg.size, a phrase and a bool (H, W) mask.
    Raises:
        RuntimeError: if the filters leave no valid phrase in `cfg.max_tries` scenes.
    """
    return generate_scene(seed, index, cfg, 1)[0]


def _choose(rng: np.random.Generator, cands: Sequence[Candidate]) -> Candidate:
    """One candidate, the family first, so rare families (size) are not drowned by common ones."""
    kinds = sorted({c.kind for c in cands})
    kind = kinds[int(rng.integers(len(kinds)))]
    pool = [c for c in cands if c.kind == kind]
    return pool[int(rng.integers(len(pool)))]


def generate_scene(seed: int, index: int, cfg: ShapesConfig, phrases: int) -> list[ReferringSample]:
    """Scene `index` of the stream `seed` with up to `phrases` different phrases about it, all sharing one image
    object (a `SceneGroup`); a pure function of its arguments. The first phrase is `generate`'s; the others refer
    to objects no earlier phrase picked while there are such, then to any object by a phrase not used yet.

    Returns:
        1 to `phrases` ReferringSamples (fewer where the scene has fewer valid phrases).
    Raises:
        RuntimeError: if the filters leave no valid phrase in `cfg.max_tries` scenes.
    """
    if phrases < 1:
        raise ValueError(f"phrases must be >= 1, got {phrases}")
    rng = np.random.default_rng([int(seed), int(index)])
    for attempt in range(cfg.max_tries):
        scene = render_scene(rng, cfg, force=_forced_attributes(rng, cfg))
        cands = candidate_phrases(scene, cfg)
        if not cands:
            continue
        chosen = [_choose(rng, cands)]
        while len(chosen) < phrases:
            unused = [c for c in cands if c.phrase not in {x.phrase for x in chosen}]
            fresh = [c for c in unused if c.target not in {x.target for x in chosen}]
            if not unused:
                break
            chosen.append(_choose(rng, fresh or unused))
        image = Image.fromarray(scene.image, "RGB")
        objects = [o.describe() for o in scene.objects]
        return [
            ReferringSample(
                image=image,
                phrase=choice.phrase,
                mask=scene.objects[choice.target].mask.copy(),
                source="shapes",
                meta={"seed": int(seed), "index": int(index), "kind": choice.kind, "words": sorted(choice.words),
                      "target": choice.target, "objects": objects, "attempts": attempt + 1},
            )
            for choice in chosen
        ]
    raise RuntimeError(
        f"no phrase satisfies the filters after {cfg.max_tries} scenes (seed={seed}, index={index}); "
        "loosen exclude_words / require_words / exclude_targets"
    )


class ShapesDataset:
    """A lazily generated, seedable `ReferringDataset` of shape scenes.

    Example:
        train = ShapesDataset(10_000, seed=0, exclude_words={"green"})
        teach = ShapesDataset(32, seed=1, require_words={"green"})
    """

    def __init__(self, length: int, seed: int = 0, config: ShapesConfig | None = None, phrases_per_scene: int = 0,
                 **options: Any) -> None:
        """Args: length (number of items), seed, either a ShapesConfig or its fields as keywords, and
        `phrases_per_scene`: 0 (default) yields one ReferringSample per item; k >= 1 yields a `SceneGroup` of up to
        k phrases of one scene per item (for training; `generate_scene`)."""
        if length < 0:
            raise ValueError("length must be >= 0")
        if phrases_per_scene < 0:
            raise ValueError("phrases_per_scene must be >= 0")
        base = config or ShapesConfig()
        self.config = replace(base, **options) if options else base
        self.length = int(length)
        self.seed = int(seed)
        self.phrases_per_scene = int(phrases_per_scene)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> ReferringSample | SceneGroup:
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for length {self.length}")
        if self.phrases_per_scene:
            return generate_scene(self.seed, index, self.config, self.phrases_per_scene)
        return generate(self.seed, index, self.config)

    def __iter__(self) -> Iterator[ReferringSample | SceneGroup]:
        return (self[i] for i in range(self.length))


def concept_vocabulary(cfg: ShapesConfig | None = None) -> dict[str, list[str]]:
    """The words the generator can use, grouped by concept family (for building filters)."""
    cfg = cfg or ShapesConfig()
    positions = sorted({w for forms in _DIRECTIONS.values() for f in forms for w in f.split() if w not in {"the", "{noun}", "on", "at"}})
    sizes = sorted({w for pair in _SIZE_WORDS.values() for group in pair for w in group})
    return {
        "colors": list(cfg.colors),
        "shapes": list(cfg.shapes),
        "positions": positions,
        "sizes": sizes,
        "nouns": ["shape", "object"],
    }


FILLER_WORDS = ("the", "on", "at")  # words of phrase templates that are not concepts


def phrase_words(cfg: ShapesConfig | None = None) -> list[str]:
    """Every word a generated phrase can contain (concepts and template words)."""
    return [w for group in concept_vocabulary(cfg).values() for w in group] + list(FILLER_WORDS)
