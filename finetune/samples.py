"""The one item type every dataset in `finetune` yields: an image, a referring phrase and its mask.

Loaders (RefCOCO formats, generated shapes, Label Studio corrections) all return `ReferringSample`,
so training and evaluation never need to know where a sample came from.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace
from typing import Any, Hashable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image


@dataclass
class ReferringSample:
    """One referring-segmentation example.

    Attributes:
        image: RGB PIL image of size (W, H).
        phrase: the referring expression, e.g. "the red circle".
        mask: bool array of shape (H, W), True on the referred object.
        source: short name of the dataset it came from ("shapes", "refcoco-hf", ...).
        meta: free-form extras (ids, split, the concept a phrase tests); JSON-friendly values.
    """

    image: Image.Image
    phrase: str
    mask: np.ndarray
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Normalise once here so no consumer has to guess dtype or mode.
        if self.image.mode != "RGB":
            self.image = self.image.convert("RGB")
        mask = np.asarray(self.mask)
        if mask.ndim != 2:
            raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
        if mask.dtype != bool:
            mask = mask > 0
        w, h = self.image.size
        if mask.shape != (h, w):
            raise ValueError(f"mask shape {mask.shape} does not match image size (H, W) = {(h, w)}")
        self.mask = mask


# Several phrases of ONE image (the same image object in every sample), as a training item: the image is encoded
# once for all of them, and the model must tell its objects apart by the phrase alone (`finetune.batching.collate`).
SceneGroup = list[ReferringSample]


@runtime_checkable
class ReferringDataset(Protocol):
    """Anything indexable that yields `ReferringSample` (map-style, like a torch Dataset). A training set may also
    yield `SceneGroup`s (`ShapesDataset(phrases_per_scene=k)`); evaluation takes samples only."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> ReferringSample: ...


class SampleList:
    """A `ReferringDataset` over an in-memory list of samples."""

    def __init__(self, samples: Sequence[ReferringSample]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> ReferringSample:
        return self.samples[index]


class Subset:
    """A view of `dataset` restricted to `indices` (kept in the given order)."""

    def __init__(self, dataset: ReferringDataset, indices: Sequence[int]) -> None:
        n = len(dataset)
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        bad = [i for i in self.indices if not -n <= i < n]
        if bad:
            raise IndexError(f"indices out of range for dataset of length {n}: {bad[:5]}")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> ReferringSample:
        return self.dataset[self.indices[index]]


def image_keys(dataset: ReferringDataset) -> list[Hashable]:
    """Which image each sample of `dataset` shows, listed without loading any image: the dataset's own
    `image_keys()` (RefCOCO loaders: the COCO image id), through `Subset` and `Concat` views.

    Raises:
        ValueError: the dataset cannot list its images.
    """
    if isinstance(dataset, Subset):
        inner = image_keys(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    if isinstance(dataset, Concat):
        return [(part, key) for part, ds in enumerate(dataset.datasets) for key in image_keys(ds)]
    lister = getattr(dataset, "image_keys", None)
    if lister is None:
        raise ValueError(f"{type(dataset).__name__} cannot list which image each sample shows, so its samples "
                         "cannot be grouped by image")
    keys = list(lister())
    if len(keys) != len(dataset):
        raise ValueError(f"{type(dataset).__name__}.image_keys() gave {len(keys)} keys for {len(dataset)} samples")
    return keys


class ImageGroups:
    """A training view of `dataset` whose items are `SceneGroup`s: the samples of one image, at most `k` at a
    time, so an image's phrases share a step and one encoding. Every sample is in exactly one group; an image with
    more than `k` samples gives several groups, each spread over its samples (with refs A and B of three sentences
    each and k = 2: (A1, B1), (A2, B2), (A3, B3)), so a group tends to name different objects.
    """

    def __init__(self, dataset: ReferringDataset, k: int) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.dataset, self.k = dataset, int(k)
        by_image: dict[Hashable, list[int]] = {}
        for index, key in enumerate(image_keys(dataset)):
            by_image.setdefault(key, []).append(index)
        self.groups: list[list[int]] = []
        for indices in by_image.values():
            chunks = -(-len(indices) // self.k)
            self.groups += [indices[j::chunks] for j in range(chunks)]

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> SceneGroup:
        samples = [self.dataset[i] for i in self.groups[index]]
        # One image object for the group (the collate encodes group[0].image for all of them).
        return [samples[0]] + [replace(s, image=samples[0].image) for s in samples[1:]]


class Concat:
    """Several datasets one after another."""

    def __init__(self, datasets: Sequence[ReferringDataset]) -> None:
        self.datasets = list(datasets)
        self._ends: list[int] = []
        total = 0
        for ds in self.datasets:
            total += len(ds)
            self._ends.append(total)

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, index: int) -> ReferringSample:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for length {n}")
        which = bisect.bisect_right(self._ends, index)
        start = self._ends[which - 1] if which else 0
        return self.datasets[which][index - start]


def subset(dataset: ReferringDataset, indices: Sequence[int]) -> Subset:
    """Return a view of `dataset` holding only `indices`."""
    return Subset(dataset, indices)


def concat(*datasets: ReferringDataset) -> Concat:
    """Return the datasets chained end to end."""
    return Concat(datasets)


def random_split(
    dataset: ReferringDataset, fractions: Sequence[float], seed: int = 0
) -> list[Subset]:
    """Split `dataset` into disjoint random subsets with sizes proportional to `fractions`.

    The last part takes the rounding remainder so that every index is used exactly once.
    """
    if not fractions or any(f < 0 for f in fractions):
        raise ValueError("fractions must be non-empty and non-negative")
    n = len(dataset)
    order = np.random.default_rng(seed).permutation(n)
    total = float(sum(fractions))
    sizes = [int(n * f / total) for f in fractions[:-1]]
    sizes.append(n - sum(sizes))
    parts, start = [], 0
    for size in sizes:
        parts.append(Subset(dataset, order[start : start + size].tolist()))
        start += size
    return parts


def iterate(dataset: ReferringDataset) -> Iterator[ReferringSample]:
    """Yield every sample of a map-style dataset in order."""
    for i in range(len(dataset)):
        yield dataset[i]
