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

from dataclasses import replace
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from finetune.samples import ReferringSample, SceneGroup
from finetune.shape_phrases import _DIRECTIONS, _SIZE_WORDS, Candidate, candidate_phrases
from finetune.shape_config import BACKGROUNDS, COLORS, KINDS, SHAPES, ShapesConfig
from finetune.shape_render import Scene, SceneObject, render_scene

__all__ = [  # the public names, re-exported from the render and phrase modules too
    "BACKGROUNDS", "COLORS", "FILLER_WORDS", "KINDS", "SHAPES", "Candidate", "Scene", "SceneObject", "ShapesConfig",
    "ShapesDataset", "candidate_phrases", "concept_vocabulary", "generate", "generate_scene", "phrase_words",
    "render_scene", "visual_concept",
]

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


def visual_concept(objects: Sequence[SceneObject], choice: Candidate) -> str | None:
    """What an example crop of the phrase's target shows that picks it out of its scene (`meta["concept"]`): the
    phrase's own colour and/or shape for those kinds ("red", "red circle", "circle"), for position and size phrases
    the target's colour + shape where no other object has both, else None (no example stands for "the leftmost
    circle"). Training with visual prompts pairs samples of one concept (`finetune.visual_training`)."""
    target = objects[choice.target]
    if choice.kind == "color":
        return target.color
    if choice.kind == "shape":
        return target.shape
    look = f"{target.color} {target.shape}"
    if choice.kind == "color_shape" or sum(o.color == target.color and o.shape == target.shape for o in objects) == 1:
        return look
    return None


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
                      "target": choice.target, "objects": objects, "attempts": attempt + 1,
                      "concept": visual_concept(scene.objects, choice)},
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
