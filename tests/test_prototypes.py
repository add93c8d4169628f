"""Per-label prototypes (issue 28, build 3): a label's corrections, embedded as visual prompts, mixed with its
phrase where its own corrections say it helps. Real Redis, the Flask app, and a tiny film-decoder trained here for
a few seconds on generated colour scenes with visual prompts only (a random model cannot tell one example from
another: no prototype could help it). Its text path never learnt a word, so a label's phrase gives ~nothing."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.http.app import create_app
from backend.settings import Settings
from finetune.corrections import CorrectionStore, Region, mask_iou
from finetune.keyspace import NAMESPACE
from finetune.prototypes import PrototypeStore
from tests.test_app import data_uri

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "7"
CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
          '<Label value="zqx"/><Label value="smudge"/></BrushLabels></View>')
SHAPES = dict(image_size=64, kinds=("color",), min_radius=0.15, max_radius=0.3, min_objects=2, max_objects=3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """tiny-seed trained 250 steps with visual prompts only (ratio 1, no text mixes): ~10-20 s on 2 cores."""
    import torch

    from clipseg_model.loading import load_model
    from clipseg_model.random_init import init_model
    from finetune.recipe import TRAIN_PRESETS
    from finetune.shapes import ShapesDataset
    from finetune.training import train

    root = tmp_path_factory.mktemp("proto-model")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads spin against each other on the shared 2-core machine
    try:
        model = load_model(init_model("tiny-seed", root / "init", seed=0), "cpu")
        cfg = TRAIN_PRESETS["improved"].replace(lr=5e-3, batch_size=16, steps=250, warmup_fraction=0.03, log_every=50,
                                                visual_prompt_ratio=1.0, visual_prompt_mix=0.0, seed=0)
        result = train(model, ShapesDataset(100_000, seed=1, **SHAPES), None, cfg, root / "run", "cpu", progress=False)
    finally:
        torch.set_num_threads(threads)
    return result.last_checkpoint


def red_scenes(n: int, seed: int):
    """(PIL image, (H, W) bool mask of its red object) pairs."""
    from finetune.shapes import ShapesDataset

    return [(s.image, s.mask) for s in ShapesDataset(n, seed=seed, require_words={"red"}, **SHAPES)]


def background_patches(n: int, seed: int):
    """Scenes whose 'correction' is a patch of background that no example can stand for (nothing to learn)."""
    rng = np.random.default_rng(seed)
    out = []
    for image, objects in red_scenes(n, seed + 1):
        mask = np.zeros(objects.shape, bool)
        y, x = rng.integers(0, 48, 2)
        mask[y:y + 12, x:x + 12] = True
        out.append((image, mask & ~objects if (mask & ~objects).any() else mask))
    return out


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def store_corrections(conn, label: str, pairs, first_task: int, namespace: str = NAMESPACE) -> None:
    store = CorrectionStore(conn, namespace)
    for i, (image, mask) in enumerate(pairs):
        region = Region(label, mask, label=label, source="label", key=f"r{i}")
        assert store.put_annotation(PROJECT, first_task + i, 1000 + first_task + i, [region], png(image),
                                    updated=1.0).status == "stored"


def app_for(trained: Path, redis_url: str, data_dir: Path, namespace: str = NAMESPACE):
    app = create_app(Settings(model=str(trained), device="cpu", precision="fp32", threshold=0.5, data_dir=data_dir,
                              redis_url=redis_url, finetune_every=10_000, sync_label_studio=False,
                              namespace=namespace))
    runtime = app.extensions["clipseg_runtime"]
    assert runtime.model.wait_ready(60)
    return app, runtime


def predict(client, image: Image.Image, project: str = PROJECT) -> dict:
    r = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": data_uri(image)}}],
                                      "project": f"{project}.1", "label_config": CONFIG})
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def label_mask(answer: dict, label: str, shape) -> np.ndarray:
    from backend.labelstudio.results import result_to_mask

    mask = np.zeros(shape, bool)
    for item in answer["results"][0]["result"]:
        if item["value"]["brushlabels"] == [label]:
            mask |= result_to_mask(item, shape[1], shape[0])
    return mask


def test_an_unknown_phrase_gets_its_corrections_look_and_a_better_mask(trained, redis_conn, redis_url, tmp_path):
    """(a) 'zqx' means nothing to the model; its corrections are all red objects: the leave-one-out evidence picks a
    weight > 0 and a new red scene's zqx mask is better than the phrase alone gives (the same app, a project
    without corrections); the version says a prototype is in use."""
    store_corrections(redis_conn, "zqx", red_scenes(6, seed=10), first_task=1)
    app, runtime = app_for(trained, redis_url, tmp_path / "d")
    try:
        client = app.test_client()
        records = runtime.refresh_prototypes(PROJECT)
        zqx = records["zqx"]
        assert zqx.examples == 6 and zqx.weight > 0, zqx.describe()
        assert zqx.evidence["mixed"][f"{zqx.weight:g}"] >= zqx.evidence["text"] + 0.05
        got, before = [], []
        for new_image, truth in red_scenes(4, seed=99):  # new scenes, none of them a correction
            with_proto, alone = predict(client, new_image), predict(client, new_image, project="8")
            assert with_proto["model_version"] == f"{alone['model_version']}+proto." + with_proto["model_version"][-8:]
            got.append(mask_iou(label_mask(with_proto, "zqx", truth.shape), truth))
            before.append(mask_iou(label_mask(alone, "zqx", truth.shape), truth))
            # the other label has no corrections: its region is the phrase's, unchanged
            assert np.array_equal(label_mask(with_proto, "smudge", truth.shape),
                                  label_mask(alone, "smudge", truth.shape))
        print(zqx.describe(), "new scenes: with", np.round(got, 3), "phrase alone", np.round(before, 3))
        assert np.mean(got) >= np.mean(before) + 0.2 and np.mean(before) < 0.2, (got, before)
    finally:
        runtime.stop()


def test_a_prototype_that_does_not_help_keeps_weight_zero_and_changes_nothing(trained, redis_conn, redis_url,
                                                                             tmp_path):
    """(b) 'smudge' corrections are patches of background (no look in common): weight 0, and /predict answers
    exactly what it answers without them (same masks, same version); fewer than 3 corrections: no prototype tried."""
    store_corrections(redis_conn, "smudge", background_patches(6, seed=20), first_task=1)
    store_corrections(redis_conn, "zqx", red_scenes(2, seed=10), first_task=50)
    app, runtime = app_for(trained, redis_url, tmp_path / "d")
    try:
        client = app.test_client()
        records = runtime.refresh_prototypes(PROJECT)
        assert records["smudge"].examples == 6 and records["smudge"].weight == 0, records["smudge"].describe()
        assert records["smudge"].evidence["n"] == 6 and "text" in records["smudge"].evidence
        assert records["zqx"].weight == 0 and records["zqx"].embedding is None and "text" not in records["zqx"].evidence
        image = red_scenes(1, seed=99)[0][0]
        with_corrections, without = predict(client, image), predict(client, image, project="8")
        assert with_corrections["model_version"] == without["model_version"]
        for label in ("smudge", "zqx"):
            assert np.array_equal(label_mask(with_corrections, label, (64, 64)), label_mask(without, label, (64, 64)))
    finally:
        runtime.stop()


def test_corrections_on_fewer_than_three_images_get_no_weight(trained, redis_conn, redis_url, tmp_path):
    """Six corrections of two images (each annotated three times): held out by image, each is predicted from one
    other image's look only, too little evidence: weight 0, said why."""
    scenes = red_scenes(2, seed=10)
    store_corrections(redis_conn, "zqx", scenes * 3, first_task=1)
    app, runtime = app_for(trained, redis_url, tmp_path / "d")
    try:
        zqx = runtime.refresh_prototypes(PROJECT)["zqx"]
        assert zqx.examples == 6 and zqx.weight == 0 and not zqx.applied, zqx.describe()
        assert zqx.evidence == {"reason": "corrections on fewer than 3 images", "n": 6}, zqx.evidence
    finally:
        runtime.stop()


def test_prototypes_survive_a_restart_and_are_listed(trained, redis_conn, redis_url, tmp_path):
    """(c) Prototypes live in Redis beside the corrections: a new server (nothing recomputed) answers with the same
    version and masks; `clipseg corrections` lists each label's examples, weight and evidence, `clipseg status`
    each label's weight."""
    store_corrections(redis_conn, "zqx", red_scenes(6, seed=10), first_task=1)
    image = red_scenes(1, seed=99)[0][0]
    app, runtime = app_for(trained, redis_url, tmp_path / "one")
    try:
        assert runtime.refresh_prototypes(PROJECT)["zqx"].weight > 0
        first = predict(app.test_client(), image)
        stored = PrototypeStore(redis_conn).all(PROJECT)["zqx"]
    finally:
        runtime.stop()
    assert "+proto." in first["model_version"]
    app, runtime = app_for(trained, redis_url, tmp_path / "two")  # a restart: a new process state, the same Redis
    try:
        again = predict(app.test_client(), image)
        assert again["model_version"] == first["model_version"]
        assert np.array_equal(label_mask(again, "zqx", (64, 64)), label_mask(first, "zqx", (64, 64)))
        assert PrototypeStore(redis_conn).all(PROJECT)["zqx"].updated == stored.updated  # read, not recomputed
    finally:
        runtime.stop()
    env = {**os.environ, "REDIS_URL": redis_url, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "backend.cli", "corrections", "--project", PROJECT], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"prototype 'zqx': 6 example(s), weight {stored.weight:g}; leave-one-out IoU phrase 'zqx' alone" in out.stdout
    status = subprocess.run([sys.executable, "-m", "backend.cli", "status"], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert f"prototype 'zqx' weight {stored.weight:g} (6 examples)" in status.stdout, status.stdout + status.stderr


def test_a_server_in_another_namespace_makes_prototypes_from_its_own_corrections(trained, redis_conn, redis_url,
                                                                               tmp_path):
    """REDIS_NAMESPACE: a server in namespace "team-b" computes its prototypes from team-b's corrections and keeps
    them in team-b's store, where its /predict reads them; the default namespace's store stays empty."""
    store_corrections(redis_conn, "zqx", red_scenes(6, seed=10), first_task=1, namespace="team-b")
    app, runtime = app_for(trained, redis_url, tmp_path / "d", namespace="team-b")
    try:
        assert runtime.refresh_prototypes(PROJECT)["zqx"].examples == 6
        assert PrototypeStore(redis_conn, "team-b").all(PROJECT)["zqx"].weight > 0
        assert PrototypeStore(redis_conn).all(PROJECT) == {}
        assert "+proto." in predict(app.test_client(), red_scenes(1, seed=99)[0][0])["model_version"]
    finally:
        runtime.stop()
    env = {**os.environ, "REDIS_URL": redis_url, "REDIS_NAMESPACE": "team-b", "PYTHONPATH": str(ROOT)}
    status = subprocess.run([sys.executable, "-m", "backend.cli", "status"], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert "prototype 'zqx' weight" in status.stdout, status.stdout + status.stderr


def test_a_prelabel_run_with_one_exemplar_per_label(trained, redis_conn):
    """`clipseg prelabel --exemplar A --exemplar B` (one region per label): every task gets one region per label,
    each exactly what that label's example alone gives (the chunk's code path, `PredictService.answer`), so the
    red example's label covers the red object and the blue example's does not; the spec carries both names."""
    from backend.images import ImageFetcher
    from backend.labelstudio.config import parse_label_config
    from backend.labelstudio.prompts import PromptSettings
    from backend.metrics import BackendMetrics
    from backend.prelabel.spec import PrelabelSpec
    from backend.serving.predict_service import PredictService
    from clipseg_model.loading import load_model
    from clipseg_model.predictor import Segmenter
    from finetune.exemplars import ExemplarStore
    from finetune.shapes import ShapesDataset

    store = ExemplarStore(redis_conn)
    red_image, red_mask = red_scenes(1, seed=10)[0]
    blue = next(iter(ShapesDataset(1, seed=11, require_words={"blue"}, **SHAPES)))
    red = store.put(PROJECT, "task1-r", png(red_image), red_mask, "zqx", "task 1 region r")
    other = store.put(PROJECT, "task2-b", png(blue.image), blue.mask, "smudge", "task 2 region b")
    spec = PrelabelSpec(PROJECT, exemplars=[red.name, other.name])
    assert PrelabelSpec.from_dict(spec.to_dict()).exemplar_names == ["task1-r", "task2-b"]
    assert "exemplar task1-r, task2-b" in spec.summary()

    service = PredictService(ImageFetcher.from_settings(Settings()), BackendMetrics())
    segmenter = Segmenter(load_model(trained, "cpu"), threshold=0.5).for_state(None)
    config, prompts = parse_label_config(CONFIG), PromptSettings("", {})
    scenes = red_scenes(3, seed=99)
    tasks = [{"id": i + 1, "data": {"image": data_uri(image)}} for i, (image, _) in enumerate(scenes)]
    both = service.answer(segmenter, config, prompts, tasks, None, PROJECT,
                          exemplars=[store.get(PROJECT, red.name), store.get(PROJECT, other.name)])
    red_only = service.answer(segmenter, config, prompts, tasks, None, PROJECT, exemplars=[store.get(PROJECT, red.name)])
    blue_only = service.answer(segmenter, config, prompts, tasks, None, PROJECT, exemplars=[store.get(PROJECT, other.name)])
    own, wrong = [], []
    for answer, alone_red, alone_blue, (_, truth) in zip(both, red_only, blue_only, scenes):
        labels = sorted(item["value"]["brushlabels"][0] for item in answer.result)
        assert labels == ["smudge", "zqx"], labels
        as_json = {"results": [{"result": answer.result}]}
        zqx, smudge = label_mask(as_json, "zqx", truth.shape), label_mask(as_json, "smudge", truth.shape)
        assert np.array_equal(zqx, label_mask({"results": [{"result": alone_red.result}]}, "zqx", truth.shape))
        assert np.array_equal(smudge, label_mask({"results": [{"result": alone_blue.result}]}, "smudge", truth.shape))
        own.append(mask_iou(zqx, truth))
        wrong.append(mask_iou(smudge, truth))
    assert np.mean(own) > np.mean(wrong) + 0.2, (own, wrong)
