"""Phrases of generated shape scenes: every unambiguous referring phrase for a scene and the concept filters
(`finetune.shapes` picks among them; this module knows words and geometry, not pixels)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from finetune.shape_config import ShapesConfig
from finetune.shape_render import Scene, SceneObject

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
class Candidate:
    """A phrase that picks out exactly one object of a scene."""

    target: int
    phrase: str
    kind: str
    words: frozenset[str]


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
