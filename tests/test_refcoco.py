"""RefCOCO loaders on miniatures written in exactly each format (offline, through the real code path).

The miniature COCO world: two JPEG images and four annotations —
  ann 11 (image 1): one polygon, a 10 x 10 square
  ann 12 (image 1): two polygons (a two-part object)
  ann 13 (image 2): crowd annotation, uncompressed RLE (counts a list)
  ann 14 (image 2): compressed RLE (counts a string, as COCO json files hold it)
Expected masks are built as numpy rectangles, independently of pycocotools.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from finetune.refcoco import (
    HFRefCOCO,
    LmmsRefCOCO,
    ReferRefCOCO,
    decode_segmentation,
    load_refs_pickle,
)

SIZES = {1: (40, 30), 2: (32, 24)}  # image id → (W, H)
FILES = {i: f"COCO_train2014_{i:012d}.jpg" for i in SIZES}


def rect(image_id: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    w, h = SIZES[image_id]
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def poly(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    """COCO polygon of the pixel block [x0, x1) x [y0, y1)."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def uncompressed_rle(m: np.ndarray) -> dict:
    """COCO uncompressed RLE: run lengths over the column-major pixels, starting with zeros."""
    flat = m.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"counts": counts, "size": list(m.shape)}


EXPECTED = {
    11: rect(1, 5, 5, 15, 15),
    12: rect(1, 20, 2, 26, 8) | rect(1, 30, 20, 36, 26),
    13: rect(2, 10, 3, 21, 9),
    14: rect(2, 2, 12, 8, 22),
}


def _annotations() -> list[dict]:
    compressed = mask_utils.encode(np.asfortranarray(EXPECTED[14].astype(np.uint8)))
    segs = {
        11: [poly(5, 5, 15, 15)],
        12: [poly(20, 2, 26, 8), poly(30, 20, 36, 26)],
        13: uncompressed_rle(EXPECTED[13]),
        14: {"counts": compressed["counts"].decode("ascii"), "size": compressed["size"]},
    }
    image_of = {11: 1, 12: 1, 13: 2, 14: 2}
    out = []
    for ann_id, seg in segs.items():
        ys, xs = np.nonzero(EXPECTED[ann_id])
        out.append({
            "id": ann_id, "image_id": image_of[ann_id], "category_id": 1, "segmentation": seg,
            "area": float(EXPECTED[ann_id].sum()), "iscrowd": int(ann_id == 13),
            "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)],
        })
    return out


ANNS = {a["id"]: a for a in _annotations()}
IMAGES = {i: {"id": i, "file_name": FILES[i], "width": w, "height": h} for i, (w, h) in SIZES.items()}


def _sent(i: int, text: str) -> dict:
    return {"raw": text.capitalize(), "sent": text, "sent_id": i, "tokens": text.split()}


# ref id → (ann id, split, sentences); ann 11 is also referred to from train.
REFS = {
    1: (11, "val", ["left box", "the small square"]),
    2: (12, "val", ["two parts thing"]),
    3: (13, "testA", ["the crowd"]),
    4: (14, "testB", ["compressed one", "second"]),
    5: (11, "train", ["train sentence"]),
}


def _refs() -> list[dict]:
    out, sid = [], 100
    for ref_id, (ann_id, split, texts) in REFS.items():
        sents = []
        for t in texts:
            sents.append(_sent(sid, t))
            sid += 1
        image_id = ANNS[ann_id]["image_id"]
        out.append({
            "ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split,
            "sentences": sents, "sent_ids": [s["sent_id"] for s in sents], "category_id": 1,
            # Upstream refs carry the annotation id as a suffix on the file name.
            "file_name": FILES[image_id].replace(".jpg", f"_{ann_id}.jpg"),
        })
    return out


@pytest.fixture(scope="module")
def coco_images(tmp_path_factory) -> Path:
    """<root>/coco/train2014/COCO_train2014_*.jpg"""
    root = tmp_path_factory.mktemp("coco_root")
    folder = root / "coco" / "train2014"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in SIZES.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / FILES[i], quality=90)
    return root


def _check(sample, ann_id: int, phrase: str) -> None:
    assert sample.phrase == phrase
    assert sample.mask.dtype == bool
    np.testing.assert_array_equal(sample.mask, EXPECTED[ann_id])
    w, h = SIZES[ANNS[ann_id]["image_id"]]
    assert sample.image.mode == "RGB" and sample.image.size == (w, h)


# --------------------------------------------------------------------------------------------
# decode_segmentation


def test_decode_all_segmentation_kinds() -> None:
    for ann_id, ann in ANNS.items():
        img = IMAGES[ann["image_id"]]
        np.testing.assert_array_equal(decode_segmentation(ann["segmentation"], img["height"], img["width"]), EXPECTED[ann_id])
    # Flat single polygon (the lmms-lab column), compressed counts given as bytes, and degenerate parts.
    np.testing.assert_array_equal(decode_segmentation(poly(5, 5, 15, 15), 30, 40), EXPECTED[11])
    comp = mask_utils.encode(np.asfortranarray(EXPECTED[14].astype(np.uint8)))
    np.testing.assert_array_equal(decode_segmentation(comp, 24, 32), EXPECTED[14])
    assert not decode_segmentation([[1.0, 2.0, 3.0, 4.0]], 5, 5).any()
    with pytest.raises(TypeError):
        decode_segmentation("nonsense", 5, 5)


# --------------------------------------------------------------------------------------------
# (a) jxu124/refcoco


def _jxu124_row(ref: dict) -> dict:
    ann = ANNS[ref["ann_id"]]
    img = IMAGES[ref["image_id"]]
    x, y, w, h = ann["bbox"]
    return {
        "sent_ids": ref["sent_ids"],
        "file_name": ref["file_name"],
        "ann_id": ref["ann_id"],
        "ref_id": ref["ref_id"],
        "image_id": ref["image_id"],
        "split": ref["split"],
        "sentences": ref["sentences"],
        "category_id": ref["category_id"],
        "raw_anns": json.dumps(ann),
        "raw_image_info": json.dumps(img),
        "raw_sentences": json.dumps(ref["sentences"]),
        "image_path": f"coco/train2014/{img['file_name']}",
        "bbox": [x, y, x + w, y + h],  # xyxy in this dataset
        "captions": [s["sent"] for s in ref["sentences"]],
        "global_image_id": f"coco.{ref['image_id']}",
        "anns_id": str(ref["ann_id"]),
    }


JXU124_FEATURES = datasets.Features({
    "sent_ids": datasets.Sequence(datasets.Value("int64")),
    "file_name": datasets.Value("string"),
    "ann_id": datasets.Value("int64"),
    "ref_id": datasets.Value("int64"),
    "image_id": datasets.Value("int64"),
    "split": datasets.Value("string"),
    "sentences": [{
        "raw": datasets.Value("string"), "sent": datasets.Value("string"),
        "sent_id": datasets.Value("int64"), "tokens": datasets.Sequence(datasets.Value("string")),
    }],
    "category_id": datasets.Value("int64"),
    "raw_anns": datasets.Value("string"),
    "raw_image_info": datasets.Value("string"),
    "raw_sentences": datasets.Value("string"),
    "image_path": datasets.Value("string"),
    "bbox": datasets.Sequence(datasets.Value("float64")),
    "captions": datasets.Sequence(datasets.Value("string")),
    "global_image_id": datasets.Value("string"),
    "anns_id": datasets.Value("string"),
})


@pytest.fixture(scope="module")
def jxu124_dir(tmp_path_factory) -> Path:
    """Hub layout of jxu124/refcoco: data/<split>-00000-of-00001.parquet with its Hub split names."""
    root = tmp_path_factory.mktemp("jxu124_refcoco")
    (root / "data").mkdir()
    hub_split = {"train": "train", "val": "validation", "testA": "test", "testB": "testB"}
    for split, hub in hub_split.items():
        rows = [_jxu124_row(r) for r in _refs() if r["split"] == split]
        table = {k: [row[k] for row in rows] for k in JXU124_FEATURES}
        datasets.Dataset.from_dict(table, features=JXU124_FEATURES).to_parquet(
            str(root / "data" / f"{hub}-00000-of-00001.parquet")
        )
    return root


def test_jxu124_val_one_sample_per_sentence(jxu124_dir, coco_images, tmp_path) -> None:
    ds = HFRefCOCO(str(jxu124_dir), split="val", image_root=coco_images, cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 3  # ref 1 has two sentences, ref 2 one
    _check(ds[0], 11, "left box")
    _check(ds[1], 11, "the small square")
    _check(ds[2], 12, "two parts thing")  # two-part polygon
    assert ds[2].meta["ref_id"] == 2 and ds[2].meta["file_name"] == FILES[1]
    assert ds[0].source == "refcoco-jxu124"
    with pytest.raises(IndexError):
        ds[3]


def test_jxu124_splits_and_rle(jxu124_dir, coco_images, tmp_path) -> None:
    cache = str(tmp_path / "cache")
    train_folder = coco_images / "coco" / "train2014"  # the folder itself works as image_root too
    testa = HFRefCOCO(str(jxu124_dir), split="testA", image_root=train_folder, cache_dir=cache)
    assert len(testa) == 1
    _check(testa[0], 13, "the crowd")  # crowd, uncompressed RLE
    assert testa[0].meta["iscrowd"] == 1
    testb = HFRefCOCO(str(jxu124_dir), split="testB", image_root=coco_images, cache_dir=cache, sentences="first")
    assert len(testb) == 1
    _check(testb[0], 14, "compressed one")
    train = HFRefCOCO(str(jxu124_dir), split="train", image_root=coco_images, cache_dir=cache, text_field="raw")
    assert [s.phrase for s in train] == ["Train sentence"]
    test = HFRefCOCO(str(jxu124_dir), split="test", image_root=coco_images, cache_dir=cache)  # refer's test: A + B
    assert [s.meta["ref_id"] for s in test] == [3, 4, 4]


def test_jxu124_missing_image_is_reported_when_opened(jxu124_dir, tmp_path) -> None:
    """A wrong image root fails when the dataset is opened (one line), not inside a training loop."""
    with pytest.raises(FileNotFoundError, match=FILES[1]) as info:
        HFRefCOCO(str(jxu124_dir), split="val", image_root=tmp_path, cache_dir=str(tmp_path / "cache"))
    assert "\n" not in str(info.value) and "coco/train2014" in str(info.value)


# --------------------------------------------------------------------------------------------
# (b) lmms-lab/RefCOCO

LMMS_README = """---
dataset_info:
  features:
  - name: question_id
    dtype: string
  - name: image
    dtype: image
  - name: question
    dtype: string
  - name: answer
    sequence: string
  - name: segmentation
    sequence: float32
  - name: bbox
    sequence: float32
  - name: iscrowd
    dtype: int8
  - name: file_name
    dtype: string
configs:
- config_name: default
  data_files:
  - split: val
    path: data/val-*
  - split: test
    path: data/test-*
  - split: testA
    path: data/testA-*
  - split: testB
    path: data/testB-*
---
"""

LMMS_FEATURES = datasets.Features({
    "question_id": datasets.Value("string"),
    "image": datasets.Image(),
    "question": datasets.Value("string"),
    "answer": datasets.Sequence(datasets.Value("string")),
    "segmentation": datasets.Sequence(datasets.Value("float32")),
    "bbox": datasets.Sequence(datasets.Value("float32")),
    "iscrowd": datasets.Value("int8"),
    "file_name": datasets.Value("string"),
})


@pytest.fixture(scope="module")
def lmms_dir(tmp_path_factory, coco_images) -> Path:
    """Hub layout of lmms-lab/RefCOCO: README configs + data/<split>-*.parquet, images embedded."""
    root = tmp_path_factory.mktemp("lmms_refcoco")
    (root / "data").mkdir()
    (root / "README.md").write_text(LMMS_README)
    folder = coco_images / "coco" / "train2014"
    # val: ann 11 (polygon), testA: ann 13 (crowd: counts as floats), testB: ann 14 polygon outline.
    rows = {
        "val": [(11, REFS[1][2], poly(5, 5, 15, 15))],
        "testA": [(13, REFS[3][2], [float(c) for c in uncompressed_rle(EXPECTED[13])["counts"]])],
        "testB": [(14, REFS[4][2], poly(2, 12, 8, 22))],
        "test": [],
    }
    for split, items in rows.items():
        table = {k: [] for k in LMMS_FEATURES}
        for ann_id, answers, seg in items:
            ann = ANNS[ann_id]
            file_name = IMAGES[ann["image_id"]]["file_name"]
            table["question_id"].append(str(ann_id))
            table["image"].append(Image.open(folder / file_name))
            table["question"].append("Please carefully observe the area circled in the image and come up with a caption for the area.")
            table["answer"].append(answers)
            table["segmentation"].append(seg)
            table["bbox"].append(ann["bbox"])
            table["iscrowd"].append(ann["iscrowd"])
            table["file_name"].append(file_name)
        datasets.Dataset.from_dict(table, features=LMMS_FEATURES).to_parquet(
            str(root / "data" / f"{split}-00000-of-00001.parquet")
        )
    return root


def test_lmms_splits(lmms_dir, tmp_path) -> None:
    cache = str(tmp_path / "cache")
    val = LmmsRefCOCO(str(lmms_dir), split="val", cache_dir=cache)
    assert len(val) == 2
    _check(val[0], 11, "left box")
    _check(val[1], 11, "the small square")
    assert val[0].meta["question_id"] == "11" and val[0].source == "refcoco-lmms"
    testa = LmmsRefCOCO(str(lmms_dir), split="testA", cache_dir=cache)
    _check(testa[0], 13, "the crowd")
    testb = LmmsRefCOCO(str(lmms_dir), split="testB", cache_dir=cache, sentences="first")
    assert len(testb) == 1
    _check(testb[0], 14, "compressed one")
    # Loading one split's files only (what a user does to avoid downloading every split).
    only = LmmsRefCOCO(str(lmms_dir), split="testA", cache_dir=cache, data_files={"testA": "data/testA-*"})
    _check(only[0], 13, "the crowd")
    with pytest.raises(ValueError, match="no 'train' split"):
        LmmsRefCOCO(str(lmms_dir), split="train", cache_dir=cache)


def test_lmms_crowd_reading_rule() -> None:
    counts = uncompressed_rle(EXPECTED[13])["counts"]
    assert LmmsRefCOCO.segmentation_of(counts, 1, 24, 32) == {"counts": counts, "size": [24, 32]}
    # The same numbers on a non-crowd row stay a polygon.
    assert LmmsRefCOCO.segmentation_of(counts, 0, 24, 32) == [float(c) for c in counts]


# --------------------------------------------------------------------------------------------
# (c) refer layout


@pytest.fixture(scope="module")
def refer_root(tmp_path_factory, coco_images) -> Path:
    """<root>/refcoco/refs(unc).p + instances.json, and images at the refer default path."""
    root = tmp_path_factory.mktemp("refer")
    (root / "refcoco").mkdir()
    with open(root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(_refs(), f, protocol=2)
    instances = {"images": list(IMAGES.values()), "annotations": list(ANNS.values()),
                 "categories": [{"id": 1, "name": "thing", "supercategory": "thing"}]}
    (root / "refcoco" / "instances.json").write_text(json.dumps(instances))
    default_images = root / "images" / "mscoco" / "images"
    default_images.mkdir(parents=True)
    (default_images / "train2014").symlink_to(coco_images / "coco" / "train2014")
    return root


def test_refer_all_splits(refer_root, coco_images) -> None:
    val = ReferRefCOCO(refer_root, split="val")
    assert [s.phrase for s in val] == ["left box", "the small square", "two parts thing"]
    _check(val[2], 12, "two parts thing")
    assert val[2].meta["file_name"] == FILES[1]  # not the refs' suffixed name
    testa = ReferRefCOCO(refer_root, split="testA", image_root=coco_images / "coco" / "train2014")
    _check(testa[0], 13, "the crowd")
    testb = ReferRefCOCO(refer_root, split="testB", text_field="raw")
    assert len(testb) == 2
    _check(testb[1], 14, "Second")
    assert len(ReferRefCOCO(refer_root, split="train")) == 1
    with pytest.raises(ValueError):
        ReferRefCOCO(refer_root, split="validation")


def test_refs_pickle_written_by_python2(tmp_path) -> None:
    # A protocol-2 pickle of the Python 2 list ['caf\xe9'] (a byte string, SHORT_BINSTRING opcode).
    path = tmp_path / "refs(unc).p"
    path.write_bytes(b"\x80\x02]U\x04caf\xe9a.")
    assert load_refs_pickle(path) == ["café"]


# --------------------------------------------------------------------------------------------
# refer layouts of refcoco+, refcocog (umd, google) and refcoco's test split

# The split names each published refs file uses (refer's README): refcoco(unc) and refcoco+(unc) train/val/testA/
# testB, refcocog(umd) train/val/test, refcocog(google) train/val, refcoco(google) train/val/test.
LAYOUTS = {
    ("refcoco", "unc"): {1: "val", 2: "val", 3: "testA", 4: "testB", 5: "train"},
    ("refcoco+", "unc"): {1: "val", 2: "train", 3: "testA", 4: "testB", 5: "train"},
    ("refcocog", "umd"): {1: "val", 2: "train", 3: "test", 4: "test", 5: "train"},
    ("refcocog", "google"): {1: "val", 2: "train", 3: "train", 4: "val", 5: "train"},
    ("refcoco", "google"): {1: "val", 2: "train", 3: "test", 4: "test", 5: "train"},
}


def write_refer(root: Path, dataset: str, split_by: str, coco_images: Path | None = None) -> Path:
    """`<root>/<dataset>/refs(<split_by>).p` + instances.json with the miniature refs in that layout's splits; COCO
    images (when given) at refer's default place, `<root>/images/mscoco/images/train2014`."""
    folder = root / dataset
    folder.mkdir(parents=True, exist_ok=True)
    splits = LAYOUTS[(dataset, split_by)]
    refs = [{**r, "split": splits[r["ref_id"]]} for r in _refs()]
    with open(folder / f"refs({split_by}).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    instances = {"images": list(IMAGES.values()), "annotations": list(ANNS.values()),
                 "categories": [{"id": 1, "name": "thing", "supercategory": "thing"}]}
    (folder / "instances.json").write_text(json.dumps(instances))
    if coco_images is not None and not (root / "images").exists():
        (root / "images" / "mscoco" / "images").mkdir(parents=True)
        (root / "images" / "mscoco" / "images" / "train2014").symlink_to(coco_images / "coco" / "train2014")
    return root


@pytest.fixture(scope="module")
def refer_all(tmp_path_factory, coco_images) -> Path:
    root = tmp_path_factory.mktemp("refer_all")
    for dataset, split_by in LAYOUTS:
        write_refer(root, dataset, split_by, coco_images)
    return root


def test_refer_test_split_is_every_test_split(refer_all) -> None:
    """refer's `test` is testA + testB for refcoco(unc) (there is no ref whose split is plain "test")."""
    test = ReferRefCOCO(refer_all, split="test")
    assert [s.meta["ref_id"] for s in test] == [3, 4, 4]
    assert {s.meta["ref_id"] for s in ReferRefCOCO(refer_all, split="testA")} == {3}
    umd = ReferRefCOCO(refer_all, dataset="refcocog", split_by="umd", split="test")
    assert [s.phrase for s in umd] == ["the crowd", "compressed one", "second"]


@pytest.mark.parametrize("dataset,split_by", list(LAYOUTS))
def test_refer_datasets_and_split_schemes(refer_all, dataset, split_by) -> None:
    splits = LAYOUTS[(dataset, split_by)]
    for split in sorted(set(splits.values())):
        ds = ReferRefCOCO(refer_all, dataset=dataset, split_by=split_by, split=split)
        assert sorted({s.meta["ref_id"] for s in ds}) == sorted(r for r, sp in splits.items() if sp == split)
        assert all(s.meta["dataset"] == f"{dataset}({split_by})" for s in ds)
        _check(ds[0], REFS[ds[0].meta["ref_id"]][0], ds[0].phrase)


def test_refer_default_split_scheme_and_refused_pairs(refer_all) -> None:
    assert ReferRefCOCO(refer_all, dataset="refcocog", split="val").split_by == "umd"
    assert ReferRefCOCO(refer_all, dataset="refcoco+", split="val").split_by == "unc"
    with pytest.raises(ValueError, match="refcoco\\+ has no 'umd' split"):
        ReferRefCOCO(refer_all, dataset="refcoco+", split_by="umd")
    with pytest.raises(ValueError, match="unknown dataset"):
        ReferRefCOCO(refer_all, dataset="refclef")


def test_refer_wrong_paths_are_one_line(refer_all, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="refs\\(google\\).p does not exist") as info:
        ReferRefCOCO(tmp_path, dataset="refcoco", split_by="google")
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="not found under --image-root") as info:
        ReferRefCOCO(refer_all, split="val", image_root=tmp_path)
    assert "\n" not in str(info.value) and FILES[1] in str(info.value)


@pytest.mark.parametrize("where", [".", "coco", "coco/train2014"])
def test_image_root_is_searched(refer_all, coco_images, where) -> None:
    """--image-root may name the image folder or a folder above it (docs/training.md)."""
    ds = ReferRefCOCO(refer_all, split="val", image_root=coco_images / where if where != "." else coco_images)
    _check(ds[0], 11, "left box")
    # no --image-root: refer's own layout under the data root
    assert ReferRefCOCO(refer_all, split="val").image_root == refer_all / "images" / "mscoco" / "images" / "train2014"


def test_image_groups_put_an_images_phrases_together(refer_all) -> None:
    """ImageGroups (training with --phrases-per-image): each sample in exactly one group, a group's samples on one
    image (one image object), spread over the image's refs so a group names different objects; through Subset and
    Concat views; a dataset that cannot list its images is refused in one line."""
    from finetune.samples import ImageGroups, SampleList, Subset, concat

    val = ReferRefCOCO(refer_all, split="val")  # refs 1 (two sentences) and 2, both on image 1
    assert val.image_keys() == [1, 1, 1]
    groups = ImageGroups(val, 2)
    assert [[s.phrase for s in g] for g in groups] == [["left box", "two parts thing"], ["the small square"]]
    first = groups[0]
    assert first[1].image is first[0].image and first[1].meta["ref_id"] == 2
    both = ImageGroups(concat(val, ReferRefCOCO(refer_all, split="test")), 3)
    assert sorted(i for g in both.groups for i in g) == list(range(6))
    assert all(len({s.meta["image_id"] for s in g}) == 1 for g in both) and sorted(map(len, both)) == [3, 3]
    assert [[s.phrase for s in g] for g in ImageGroups(Subset(val, [2, 0]), 2)] == [["two parts thing", "left box"]]
    with pytest.raises(ValueError, match="cannot list which image"):
        ImageGroups(SampleList([val[0]]), 2)


def test_a_presets_phrases_per_image_falls_back_on_a_loader_that_cannot_group(refer_all, caplog) -> None:
    """cpu-scratch's recipe groups phrases by image; on a loader without image keys (lmms-lab's) that is a warning
    and one phrase per item, while an explicit --phrases-per-image stays a one-line error."""
    from clipseg_model.errors import ClipsegError
    from finetune.samples import SampleList
    from finetune.train_command import group_by_image

    plain = SampleList([ReferRefCOCO(refer_all, split="val")[0]])
    with caplog.at_level("WARNING"):
        assert group_by_image(plain, 2, strict=False) is plain
    assert "training one phrase per item" in caplog.text
    with pytest.raises(ClipsegError, match="--phrases-per-image 2: SampleList cannot list"):
        group_by_image(plain, 2)
