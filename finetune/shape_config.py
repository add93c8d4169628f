"""Options of the shape-scene generator (`finetune.shapes`): the named colours, shapes, backgrounds, phrase families
and the `ShapesConfig` that every render and phrase step reads."""
from __future__ import annotations

from dataclasses import dataclass, field

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
