"""CorrectionStore (and the webhook ingester in front of it) against a real Redis: webhook events -> samples,
replace/delete, images by hash, review IoU, listing and re-prompting."""
from __future__ import annotations

import hashlib
import logging

import numpy as np
import pytest

from backend.labelstudio.results import result_to_mask
from backend.labelstudio.rle import rle_to_mask
from backend.intake.ingest import CorrectionIngester
from backend.labelstudio.config import LabelConfigs
from backend.labelstudio.prompts import PromptSettings
from backend.settings import Settings
from finetune.corrections import CorrectionStore, mask_iou, mask_to_png, png_to_mask
from tests.fixtures.webhooks import (
    annotation_event,
    brush_region,
    deleted_event,
    polygon_region,
    scene,
    textarea_region,
)

log = logging.getLogger(__name__)


@pytest.fixture
def store(redis_conn):
    return CorrectionStore(redis_conn)


@pytest.fixture
def ingester(store):
    return CorrectionIngester(store, LabelConfigs(Settings()), PromptSettings("expression", {"dog": "a dog"}))


def loader_for(image: bytes, calls: list | None = None):
    def load(ref: str, task_id: int) -> bytes:
        if calls is not None:
            calls.append(task_id)
        return image

    return load


def test_rle_and_png_round_trip():
    _, mask = scene(seed=1)
    rle = brush_region(mask)["value"]["rle"]
    assert np.array_equal(rle_to_mask(rle, *mask.shape), mask)
    assert np.array_equal(png_to_mask(mask_to_png(mask)), mask)
    assert png_to_mask(mask_to_png(mask)).dtype == np.bool_


def test_event_becomes_samples(store, ingester):
    image, mask = scene(seed=2)
    calls: list = []
    event = annotation_event([brush_region(mask, "cat")], data={"image": "/x.jpg", "expression": "the red blob"})
    res = ingester.ingest_event(event, loader_for(image, calls))
    assert (res.status, res.project, res.task_id, res.annotation_ids, res.n_samples) == ("stored", "1", 3, (11,), 1)
    assert calls == [3]
    [s] = store.samples("1")
    assert s.prompt == "the red blob"  # the task field wins over the label
    assert s.label == "cat" and s.mask.dtype == np.bool_ and np.array_equal(s.mask, mask)
    assert s.image_sha256 == hashlib.sha256(image).hexdigest() and s.load_image() == image
    assert (s.project, s.task_id, s.annotation_id, s.region) == ("1", 3, 11, 0)
    assert store.count(1) == 1 and store.projects() == ["1"]


def test_prompt_precedence_textarea_field_label(redis_conn):
    store = CorrectionStore(redis_conn)
    ingester = CorrectionIngester(store, LabelConfigs(Settings()), PromptSettings(label_prompts={"dog": "a sleeping dog"}))
    image, mask = scene(seed=3)
    poly = polygon_region([[10, 10], [40, 10], [40, 50], [10, 50]], 640, 480, "dog", "p1")
    result = [brush_region(mask, "cat", "r1"), textarea_region("the cat on the left", "r1"), poly]
    ingester.ingest_event(annotation_event(result), image_bytes=image)
    by_label = {s.label: s for s in store.samples(1)}
    assert by_label["cat"].prompt == "the cat on the left"  # per-region TextArea
    assert by_label["dog"].prompt == "a sleeping dog"  # label mapping
    dog = by_label["dog"].mask
    assert dog.shape == (480, 640) and dog[100, 150] and not dog[300, 400]
    assert np.array_equal(dog, result_to_mask(poly, 640, 480))  # the backend's own rasterisation
    assert abs(dog.mean() - 0.30 * 0.40) < 0.01  # 30 % x 40 % of the image


def test_same_event_twice_is_one_sample(store, ingester):
    image, mask = scene(seed=4)
    event = annotation_event([brush_region(mask)])
    ingester.ingest_event(event, image_bytes=image)
    res = ingester.ingest_event(event, image_bytes=image)
    assert res.status == "replaced"
    assert len(store.samples()) == 1 and store.count(1) == 1
    assert store.new_since_last_finetune(1) == 1  # a re-delivery is not a new correction
    assert store.image_refs() == {hashlib.sha256(image).hexdigest(): 1}


def test_update_replaces(store, ingester):
    image, mask = scene(seed=5)
    image2, mask2 = scene(seed=6)
    ingester.ingest_event(annotation_event([brush_region(mask), brush_region(mask, "dog", "r2")]), image_bytes=image)
    assert len(store.samples(1)) == 2
    upd = annotation_event([brush_region(mask2)], action="ANNOTATION_UPDATED", updated_at="2026-11-26T19:00:00Z")
    assert ingester.ingest_event(upd, image_bytes=image2).status == "replaced"
    [s] = store.samples(1)
    assert np.array_equal(s.mask, mask2) and s.load_image() == image2
    # the first image had no other user: its bytes are gone
    assert store.image_refs() == {hashlib.sha256(image2).hexdigest(): 1}
    assert not store.conn.exists(store.image_key(hashlib.sha256(image).hexdigest()))
    # an older version arriving late (e.g. replayed from the spool) does not win
    assert ingester.ingest_event(annotation_event([brush_region(mask)]), image_bytes=image).status == "stale"
    assert np.array_equal(store.samples(1)[0].mask, mask2)


def test_delete_removes_samples_and_unused_images(store, ingester):
    image, mask = scene(seed=7)
    ingester.ingest_event(annotation_event([brush_region(mask)], annotation_id=11), image_bytes=image)
    ingester.ingest_event(annotation_event([brush_region(mask)], annotation_id=12), image_bytes=image)
    sha = hashlib.sha256(image).hexdigest()
    assert store.image_refs() == {sha: 2}
    res = ingester.ingest_event(deleted_event(11))
    assert res.status == "deleted" and res.annotation_ids == (11,)
    assert [s.annotation_id for s in store.samples()] == [12]
    assert store.image_refs() == {sha: 1} and store.conn.exists(store.image_key(sha))
    ingester.ingest_event(deleted_event(12, 999))
    assert store.samples() == [] and store.image_refs() == {} and not store.conn.exists(store.image_key(sha))
    assert store.projects() == []


def test_cancelled_and_empty_store_nothing(store, ingester):
    image, mask = scene(seed=8)
    assert ingester.ingest_event(annotation_event([brush_region(mask)], was_cancelled=True), image_bytes=image).status == "cancelled"
    assert store.samples() == []
    ingester.ingest_event(annotation_event([brush_region(mask)]), image_bytes=image)
    skipped = annotation_event([brush_region(mask)], action="ANNOTATION_UPDATED", was_cancelled=True,
                               updated_at="2026-11-26T20:00:00Z")
    assert ingester.ingest_event(skipped).status == "cancelled"
    assert store.samples() == [] and store.image_refs() == {}
    assert ingester.ingest_event(annotation_event([])).status == "empty"
    assert ingester.ingest_event({"action": "PROJECT_UPDATED", "project": {"id": 1}}).status == "ignored"


def test_tasks_and_project_deleted(store, ingester):
    image, mask = scene(seed=9)
    for ann, task in [(1, 1), (2, 1), (3, 2)]:
        ingester.ingest_event(annotation_event([brush_region(mask)], annotation_id=ann, task_id=task), image_bytes=image)
    assert sorted(ingester.ingest_event({"action": "TASKS_DELETED", "tasks": [{"id": 1}]}).annotation_ids) == [1, 2]
    assert [s.annotation_id for s in store.samples()] == [3]
    ingester.ingest_event({"action": "PROJECT_DELETED", "project": {"id": 1}})
    assert store.samples() == [] and store.image_refs() == {}


def test_new_since_and_mark_trained(store, ingester):
    image, mask = scene(seed=10)
    for ann in range(1, 6):
        ingester.ingest_event(annotation_event([brush_region(mask)], annotation_id=ann), image_bytes=image)
    assert store.new_since_last_finetune(1) == 5
    upto = store.watermark(1)
    ingester.ingest_event(annotation_event([brush_region(mask)], annotation_id=6), image_bytes=image)
    assert store.mark_trained(1, upto) == upto
    assert store.new_since_last_finetune(1) == 1
    # an update of an already trained annotation is a new correction again
    ingester.ingest_event(annotation_event([brush_region(mask)], annotation_id=2, action="ANNOTATION_UPDATED",
                                        updated_at="2026-11-27T00:00:00Z"), image_bytes=image)
    assert store.new_since_last_finetune(1) == 2
    assert store.mark_trained(1, 1) == upto  # never backwards
    assert [s.annotation_id for s in store.samples(1, min_seq=upto)] == [6, 2]


def test_review_stats_iou_per_model_version(store, ingester):
    image, mask = scene(seed=11)
    half = mask.copy()
    half[:, : mask.shape[1] // 2] = False
    expected = mask_iou(mask, half)
    store.record_prediction(1, 3, "cat", rle_to_mask(brush_region(half)["value"]["rle"], *half.shape), "v1", 0.9)
    store.record_prediction(1, 4, "cat", mask, "v2", 0.8)
    store.record_prediction(1, 5, "cat", mask_to_png(mask), "v2", 0.8)
    ingester.ingest_event(annotation_event([brush_region(mask)], task_id=3, annotation_id=1, parent_prediction=7), image_bytes=image)
    ingester.ingest_event(annotation_event([brush_region(mask)], task_id=4, annotation_id=2), image_bytes=image)
    ingester.ingest_event(annotation_event([brush_region(half)], task_id=5, annotation_id=3), image_bytes=image)
    stats = store.review_stats()
    assert stats["v1"] == {"n": 1, "mean_iou": pytest.approx(expected, abs=1e-5)}
    assert stats["v2"]["n"] == 2 and stats["v2"]["mean_iou"] == pytest.approx((1.0 + expected) / 2, abs=1e-5)
    s = [x for x in store.samples(1) if x.task_id == 3][0]
    assert s.model_version == "v1" and s.iou == pytest.approx(expected, abs=1e-5)
    # replaced and deleted corrections do not count twice
    ingester.ingest_event(annotation_event([brush_region(mask)], task_id=3, annotation_id=1), image_bytes=image)
    ingester.ingest_event(deleted_event(3))
    assert store.review_stats() == {"v1": {"n": 1, "mean_iou": pytest.approx(expected, abs=1e-5)},
                                    "v2": {"n": 1, "mean_iou": pytest.approx(1.0)}}
    assert store.review_stats(project=2) == {}


def test_loader_optional_needs_image(store, ingester):
    _, mask = scene(seed=12)
    with pytest.raises(ValueError):
        ingester.ingest_event(annotation_event([brush_region(mask)]))


def test_memory_per_sample(store, redis_conn, ingester):
    """MEMORY USAGE of the keys of one correction: 640x480 JPEG + one brush mask (numbers go to the log)."""
    image, mask = scene(seed=13)
    ingester.ingest_event(annotation_event([brush_region(mask)]), image_bytes=image)
    sha = hashlib.sha256(image).hexdigest()
    ann_key = "clipseg:corr:ann:1:3:11"
    usage = {k: redis_conn.memory_usage(k, samples=0) for k in
             [store.image_key(sha), ann_key, "clipseg:corr:idx:1", "clipseg:corr:where", "clipseg:img:refs"]}
    png = len(mask_to_png(mask))
    rle = len(bytes(brush_region(mask)["value"]["rle"]))
    log.warning("memory per sample: image %d B (jpeg %d B), annotation hash %d B (png mask %d B; LS RLE would be %d B"
                " as bytes), index %d B, where %d B, refs %d B", usage[store.image_key(sha)], len(image),
                usage[ann_key], png, rle, usage["clipseg:corr:idx:1"], usage["clipseg:corr:where"],
                usage["clipseg:img:refs"])
    image_cost, image_len = usage[store.image_key(sha)], len(image)
    assert image_cost < 1.25 * image_len + 1024  # jemalloc size classes round large strings up
    assert usage[ann_key] < 4096 and png < rle
