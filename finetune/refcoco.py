"""RefCOCO loaders for the three formats people have, all yielding `ReferringSample`.

Formats:
- `HFRefCOCO`: the Hugging Face dataset `jxu124/refcoco` (also refcoco+/refcocog by the same author).
  One row per referred object ("ref"); images are NOT embedded: rows name a COCO train2014 file and
  the mask comes from `raw_anns`, the COCO annotation as a JSON string.
  Columns: sent_ids, file_name, ann_id, ref_id, image_id, split, sentences (list of {raw, sent,
  sent_id, tokens}), category_id, raw_anns (JSON str), raw_image_info (JSON str), raw_sentences
  (JSON str), image_path ("coco/train2014/COCO_train2014_<id>.jpg"), bbox (xyxy), captions,
  global_image_id, anns_id. Hub splits: train, validation, test (= testA for refcoco/refcoco+), testB.
- `LmmsRefCOCO`: the Hugging Face dataset `lmms-lab/RefCOCO` (an evaluation set: no train split).
  Columns: question_id (str), image (embedded image), question (str), answer (list of referring
  sentences), segmentation (flat float list x0, y0, x1, y1, ... — one polygon), bbox (xywh), iscrowd
  (int8), file_name. Splits: val, test, testA, testB.
- `ReferRefCOCO`: the original layout of the `refer` toolkit: `<root>/<dataset>/refs(<split_by>).p`
  (a pickle), `<root>/<dataset>/instances.json` (COCO-style images/annotations/categories) and a
  folder of COCO train2014 images.

Split names are the canonical RefCOCO ones everywhere: train, val, testA, testB (and test for
RefCOCOg); each loader maps them to its format's own names.

Masks are decoded with pycocotools from polygons (one or several parts), uncompressed RLE (crowd
annotations, `counts` a list) and compressed RLE (`counts` a string).
"""
from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from finetune.samples import ReferringSample

log = logging.getLogger(__name__)

CANONICAL_SPLITS = ("train", "val", "testA", "testB", "test")
# The refer toolkit's datasets and the split schemes each was published with (refs(<split_by>).p files).
REFER_SPLIT_BY: dict[str, tuple[str, ...]] = {
    "refcoco": ("unc", "google"),
    "refcoco+": ("unc",),
    "refcocog": ("umd", "google"),
}
# Where COCO train2014 images are found relative to an --image-root (or a refer data root).
IMAGE_SUBFOLDERS = (".", "train2014", "coco/train2014", "images/mscoco/images/train2014", "images/train2014")


def default_split_by(dataset: str) -> str:
    """The split scheme used when none is named: unc for refcoco/refcoco+, umd for refcocog."""
    check_refer_dataset(dataset, None)
    return REFER_SPLIT_BY[dataset][0]


def check_refer_dataset(dataset: str, split_by: str | None) -> None:
    """Refuse dataset / split scheme pairs that were never published (refcoco+ has only unc, refcocog umd/google)."""
    if dataset not in REFER_SPLIT_BY:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(REFER_SPLIT_BY)}")
    if split_by is not None and split_by not in REFER_SPLIT_BY[dataset]:
        raise ValueError(f"{dataset} has no {split_by!r} split; it has {', '.join(REFER_SPLIT_BY[dataset])}")


def refer_split_matches(split: str, ref_split: str) -> bool:
    """Whether a ref whose `split` field is `ref_split` belongs to the requested `split`, as the refer toolkit's
    `getRefIds` decides: test = every test* split (testA + testB for refcoco), testA/testB = test splits with that
    letter (testAB counts for both), train/val exactly."""
    if split == "test":
        return "test" in ref_split
    if split in ("testA", "testB"):
        return ref_split.startswith("test") and split[-1] in ref_split[4:]
    return ref_split == split


def find_image_folder(root: Path, file_name: str) -> Path:
    """The folder under `root` that holds `file_name`: `root` itself, or one of the usual COCO sub-folders
    (`IMAGE_SUBFOLDERS`). Raises FileNotFoundError, in one line naming every place tried."""
    tried = [root / sub for sub in IMAGE_SUBFOLDERS]
    for folder in tried:
        if (folder / file_name).is_file():
            return folder
    raise FileNotFoundError(f"image {file_name} not found under --image-root {root} (looked in "
                            f"{', '.join(str(t) for t in tried)})")


# --------------------------------------------------------------------------------------------
# Masks


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating))


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode a COCO segmentation into a bool (height, width) mask.

    Accepts: a list of polygons ([[x0, y0, x1, y1, ...], ...], parts are OR-ed), a single flat
    polygon ([x0, y0, ...]), an uncompressed RLE dict ({"counts": [int, ...], "size": [h, w]}) or a
    compressed RLE dict ({"counts": "str" or b"bytes", "size": [h, w]}).
    """
    seg = segmentation
    if isinstance(seg, np.ndarray):
        seg = seg.tolist()
    if isinstance(seg, dict):
        counts = seg["counts"]
        if isinstance(counts, (list, tuple, np.ndarray)):
            rle = mask_utils.frPyObjects({"counts": [int(c) for c in counts], "size": list(seg["size"])}, height, width)
        else:
            rle = {"counts": counts.encode("ascii") if isinstance(counts, str) else counts, "size": list(seg["size"])}
        mask = mask_utils.decode(rle)
    elif isinstance(seg, (list, tuple)):
        if seg and _is_number(seg[0]):
            seg = [seg]  # one flat polygon
        # A polygon needs 3 points; pycocotools misreads shorter lists as boxes, so drop them.
        polys = [[float(v) for v in p] for p in seg if len(p) >= 6]
        if not polys:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
        mask = mask_utils.decode(rle)
    else:
        raise TypeError(f"unsupported segmentation type {type(seg).__name__}")
    if mask.ndim == 3:  # decode of a list of RLEs gives (H, W, N)
        mask = mask.any(axis=2)
    if mask.shape != (height, width):
        raise ValueError(f"segmentation decodes to {mask.shape}, expected {(height, width)}")
    return mask.astype(bool)


def _check_split(split: str) -> None:
    if split not in CANONICAL_SPLITS:
        raise ValueError(f"split must be one of {CANONICAL_SPLITS}, got {split!r}")


def _choose_sentences(sentences: Sequence[str], mode: str) -> list[int]:
    """Indices of the sentences to turn into samples: all of them, or the first one."""
    if mode == "all":
        return list(range(len(sentences)))
    if mode == "first":
        return [0] if sentences else []
    raise ValueError(f"sentences must be 'all' or 'first', got {mode!r}")


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


class _IndexedRows:
    """Shared part of the loaders: a flat index of (row, sentence) pairs over some rows."""

    source = "refcoco"

    def __init__(self) -> None:
        self.index: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return len(self.index)

    def _build_index(self, sentence_lists: Iterable[Sequence[str]], mode: str) -> None:
        self.index = [(r, s) for r, sents in enumerate(sentence_lists) for s in _choose_sentences(sents, mode)]

    def _position(self, index: int) -> tuple[int, int]:
        n = len(self.index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for length {n}")
        return self.index[index]


# --------------------------------------------------------------------------------------------
# (a) jxu124/refcoco


class HFRefCOCO(_IndexedRows):
    """`jxu124/refcoco`-format rows + a local COCO train2014 folder → `ReferringSample`s.

    Example:
        ds = HFRefCOCO("jxu124/refcoco", split="val", image_root="/data/coco/train2014")
    """

    source = "refcoco-jxu124"
    # Canonical split → the Hub split name of the jxu124 datasets.
    HUB_SPLITS = {"train": "train", "val": "validation", "testA": "test", "testB": "testB", "test": "test"}

    def __init__(
        self,
        name_or_path: str = "jxu124/refcoco",
        split: str = "val",
        image_root: str | os.PathLike = "train2014",
        sentences: str = "all",
        text_field: str = "sent",
        **load_kwargs: Any,
    ) -> None:
        """Args:
            name_or_path: Hub id or local directory/files that `datasets.load_dataset` accepts.
            split: train, val, testA, testB, test (refcoco/refcoco+: testA + testB, as refer defines it; a
                name containing "refcocog": the Hub's "test", the real test).
            image_root: folder holding COCO_train2014_*.jpg, or a folder containing coco/train2014/.
            sentences: "all" (one sample per sentence) or "first" (one per referred object).
            text_field: "sent" (lower-cased, tokenised) or "raw" (as typed by the annotator).
            load_kwargs: passed on to `datasets.load_dataset` (cache_dir, revision, ...).
        """
        import datasets  # heavy import; only loaders that need it pay for it

        super().__init__()
        _check_split(split)
        self.split = split
        self.image_root = Path(image_root)
        self.text_field = text_field
        if split == "test" and "refcocog" not in str(name_or_path).lower():
            # refer's test of refcoco / refcoco+ is testA + testB; the Hub's "test" there is testA alone.
            self.rows = datasets.concatenate_datasets([datasets.load_dataset(name_or_path, split=hub, **load_kwargs)
                                                       for hub in (self.HUB_SPLITS["testA"], self.HUB_SPLITS["testB"])])
        else:
            self.rows = datasets.load_dataset(name_or_path, split=self.HUB_SPLITS[split], **load_kwargs)
        self.sentence_lists = [self._sentences(row) for row in self.rows.select_columns(self._text_columns())]
        self._build_index(self.sentence_lists, sentences)
        if len(self.rows):  # a wrong --image-root fails here, in one line, not inside the training loop
            first = self.rows[0]
            self.image_path(first, json.loads(first["raw_image_info"]))
        log.info("loaded %s split %s: %d refs, %d samples", name_or_path, split, len(self.rows), len(self))

    def _text_columns(self) -> list[str]:
        return [c for c in ("sentences", "captions") if c in self.rows.column_names]

    def _sentences(self, row: dict[str, Any]) -> list[str]:
        if row.get("sentences"):
            return [s[self.text_field] for s in row["sentences"]]
        return list(row.get("captions") or [])

    def image_path(self, row: dict[str, Any], info: dict[str, Any]) -> Path:
        """Where the row's image lives under `image_root` (first candidate that exists)."""
        rel = row.get("image_path") or ""
        if rel and (self.image_root / rel).is_file():
            return self.image_root / rel
        return find_image_folder(self.image_root, info["file_name"]) / info["file_name"]

    def image_keys(self) -> list[Any]:
        """The COCO image id of every sample, in index order (read from a text column; no image is read)."""
        if "image_id" in self.rows.column_names:
            ids = self.rows["image_id"]
        else:
            ids = [json.loads(info)["id"] for info in self.rows["raw_image_info"]]
        return [ids[r] for r, _ in self.index]

    def __getitem__(self, index: int) -> ReferringSample:
        r, s = self._position(index)
        row = self.rows[r]
        ann = json.loads(row["raw_anns"])
        info = json.loads(row["raw_image_info"])
        image = _open_rgb(self.image_path(row, info))
        h, w = int(info["height"]), int(info["width"])
        if image.size != (w, h):
            raise ValueError(f"image {info['file_name']} is {image.size}, annotation says {(w, h)}")
        mask = decode_segmentation(ann["segmentation"], h, w)
        sent = row["sentences"][s] if row.get("sentences") else {}
        meta = {
            "split": self.split,
            "ref_id": row.get("ref_id"),
            "ann_id": row.get("ann_id"),
            "image_id": row.get("image_id"),
            "sent_id": sent.get("sent_id"),
            "category_id": row.get("category_id"),
            "file_name": info["file_name"],
            "iscrowd": int(ann.get("iscrowd", 0)),
        }
        return ReferringSample(image, self.sentence_lists[r][s], mask, self.source, meta)


# --------------------------------------------------------------------------------------------
# (b) lmms-lab/RefCOCO


class LmmsRefCOCO(_IndexedRows):
    """`lmms-lab/RefCOCO`-format rows (images embedded) → `ReferringSample`s.

    Example:
        ds = LmmsRefCOCO("lmms-lab/RefCOCO", split="testA")
    """

    source = "refcoco-lmms"
    HUB_SPLITS = {"val": "val", "testA": "testA", "testB": "testB", "test": "test"}

    def __init__(
        self,
        name_or_path: str = "lmms-lab/RefCOCO",
        split: str = "val",
        sentences: str = "all",
        **load_kwargs: Any,
    ) -> None:
        """Args:
            name_or_path: Hub id or local directory/files that `datasets.load_dataset` accepts.
            split: val, testA, testB or test (this dataset has no train split).
            sentences: "all" (one sample per sentence in `answer`) or "first".
            load_kwargs: passed on to `datasets.load_dataset`. `load_dataset` prepares every split
                of a config (about 2.3 GB here); to fetch one split only, pass e.g.
                `data_files={"testA": "data/testA-*"}`.
        """
        import datasets

        super().__init__()
        _check_split(split)
        if split not in self.HUB_SPLITS:
            raise ValueError(f"lmms-lab/RefCOCO has no {split!r} split; it has {sorted(self.HUB_SPLITS)}")
        self.split = split
        self.rows = datasets.load_dataset(name_or_path, split=self.HUB_SPLITS[split], **load_kwargs)
        # Read text columns only: touching "image" would decode every picture up front.
        self.sentence_lists = [list(a or []) for a in self.rows["answer"]]
        self._build_index(self.sentence_lists, sentences)
        log.info("loaded %s split %s: %d rows, %d samples", name_or_path, split, len(self.rows), len(self))

    @staticmethod
    def segmentation_of(values: Sequence[float], iscrowd: int, height: int, width: int) -> Any:
        """Interpret the flat float `segmentation` column.

        Non-crowd rows hold one polygon. For crowd rows the column cannot hold an RLE dict; when the
        values sum to H * W they are read as uncompressed RLE counts (column-major, as COCO), else
        as a polygon.
        """
        vals = [float(v) for v in values]
        if iscrowd and vals and all(v.is_integer() and v >= 0 for v in vals) and sum(vals) == height * width:
            return {"counts": [int(v) for v in vals], "size": [height, width]}
        return vals

    def __getitem__(self, index: int) -> ReferringSample:
        r, s = self._position(index)
        row = self.rows[r]
        image = row["image"]
        if not isinstance(image, Image.Image):  # raw {"bytes", "path"} if the Image feature was cast away
            import io

            image = Image.open(io.BytesIO(image["bytes"]))
        image = image.convert("RGB")
        w, h = image.size
        iscrowd = int(row.get("iscrowd") or 0)
        mask = decode_segmentation(self.segmentation_of(row["segmentation"], iscrowd, h, w), h, w)
        meta = {
            "split": self.split,
            "question_id": row.get("question_id"),
            "file_name": row.get("file_name"),
            "bbox_xywh": list(row["bbox"]) if row.get("bbox") is not None else None,
            "iscrowd": iscrowd,
            "sentence_index": s,
        }
        return ReferringSample(image, self.sentence_lists[r][s], mask, self.source, meta)


# --------------------------------------------------------------------------------------------
# (c) the original refer layout


def load_refs_pickle(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read `refs(<split_by>).p`, the refer toolkit's list of ref dicts.

    Pickle is the dataset's own upstream format (there is no other copy of these files), so it is
    read as such. Unpickling runs code from the file: only load refs files from a trusted source.
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        return pickle.loads(data)
    except UnicodeDecodeError:
        # The published files were written by Python 2; its byte strings need latin-1 in Python 3.
        return pickle.loads(data, encoding="latin1")


class ReferRefCOCO(_IndexedRows):
    """The refer toolkit layout (refs pickle + instances.json + COCO images) → `ReferringSample`s.

    Example:
        ds = ReferRefCOCO("data/refer", dataset="refcoco", split_by="unc", split="testA",
                          image_root="data/refer/images/mscoco/images/train2014")
    """

    source = "refcoco-refer"

    def __init__(
        self,
        data_root: str | os.PathLike,
        dataset: str = "refcoco",
        split_by: str | None = None,
        split: str = "val",
        image_root: str | os.PathLike | None = None,
        sentences: str = "all",
        text_field: str = "sent",
    ) -> None:
        """Args:
            data_root: folder holding `<dataset>/refs(<split_by>).p` and `<dataset>/instances.json`.
            dataset: refcoco, refcoco+, refcocog.
            split_by: unc (refcoco, refcoco+), umd or google (refcoco, refcocog); default: unc, umd for refcocog.
            split: train, val, testA, testB, or test (every test split: testA + testB for refcoco, as refer does).
            image_root: folder of COCO_train2014_*.jpg, or a folder above it (`IMAGE_SUBFOLDERS` are searched);
                default: `data_root` (so `<data_root>/images/mscoco/images/train2014`, refer's layout, is found).
            sentences: "all" or "first"; text_field: "sent" or "raw".
        Raises:
            FileNotFoundError / ValueError, in one line, for a missing refs file, a dataset/split_by pair that does
            not exist, or images that are not under `image_root`.
        """
        super().__init__()
        _check_split(split)
        split_by = split_by or default_split_by(dataset)
        check_refer_dataset(dataset, split_by)
        root = Path(data_root)
        refs_path = root / dataset / f"refs({split_by}).p"
        if not refs_path.is_file():
            present = sorted(str(p.relative_to(root)) for p in root.glob("*/refs(*).p")) if root.is_dir() else []
            raise FileNotFoundError(f"{refs_path} does not exist (--data-path should hold {dataset}/refs({split_by}).p"
                                    f"{'; found ' + ', '.join(present) if present else ''})")
        self.dataset, self.split_by, self.split = dataset, split_by, split
        self.text_field = text_field
        refs = load_refs_pickle(refs_path)
        with open(root / dataset / "instances.json", encoding="utf-8") as f:
            instances = json.load(f)
        self.images = {int(im["id"]): im for im in instances["images"]}
        self.annotations = {int(a["id"]): a for a in instances["annotations"]}
        self.refs = [r for r in refs if refer_split_matches(split, r["split"])]
        self.sentence_lists = [[s[text_field] for s in r["sentences"]] for r in self.refs]
        self._build_index(self.sentence_lists, sentences)
        # Resolve the image folder once, on the first ref's image: a wrong --image-root is one line here.
        search = Path(image_root) if image_root else root
        self.image_root = (find_image_folder(search, self.images[int(self.refs[0]["image_id"])]["file_name"])
                           if self.refs else search)
        log.info("loaded %s(%s) split %s: %d refs, %d samples", dataset, split_by, split, len(self.refs), len(self))

    def image_keys(self) -> list[int]:
        """The COCO image id of every sample, in index order (no image is read)."""
        return [int(self.refs[r]["image_id"]) for r, _ in self.index]

    def __getitem__(self, index: int) -> ReferringSample:
        r, s = self._position(index)
        ref = self.refs[r]
        ann = self.annotations[int(ref["ann_id"])]
        info = self.images[int(ref["image_id"])]
        # The refs' own file_name carries an annotation suffix (..._<ann>.jpg); instances.json has the real one.
        image = _open_rgb(self.image_root / info["file_name"])
        h, w = int(info["height"]), int(info["width"])
        if image.size != (w, h):
            raise ValueError(f"image {info['file_name']} is {image.size}, annotation says {(w, h)}")
        mask = decode_segmentation(ann["segmentation"], h, w)
        meta = {
            "split": self.split,
            "ref_id": ref["ref_id"],
            "ann_id": ref["ann_id"],
            "image_id": ref["image_id"],
            "sent_id": ref["sentences"][s].get("sent_id"),
            "dataset": f"{self.dataset}({self.split_by})",
            "category_id": ref.get("category_id"),
            "file_name": info["file_name"],
            "iscrowd": int(ann.get("iscrowd", 0)),
        }
        return ReferringSample(image, self.sentence_lists[r][s], mask, self.source, meta)
