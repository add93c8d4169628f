"""Per-project models over one backbone (issue 14) and damaged versions that never stop serving (issue 18, item 4).

In process: the predictor's state switching (equal to a model of that version, feature cache shared by image).
Against a real `clipseg serve` process and a real Redis: a truncated checkpoint and one with a tensor's bytes
overwritten (header intact) are each marked broken, the project falls back to the parent, then to the base model,
/health says so, other projects are untouched, and no request waits for a model that is not coming.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from backend.http.app import create_app
from backend.settings import Settings
from clipseg_model.checkpoint import read_trainable_state, save_checkpoint
from clipseg_model.loading import load_model
from clipseg_model.predictor import Segmenter
from finetune.versions import VersionRecord, VersionRegistry
from tests.fixtures.webhooks import LABEL_CONFIG, scene
from tests.test_finetune_loop import BASE_VERSION, PRESET, Server, _env, data_uri, wait_for, without_region_ids


def _image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))


def _variant(base: Path, out: Path, version: str, shift: float, parent: str | None = None) -> Path:
    """A checkpoint over `base`'s backbone whose trainable part differs (a stand-in for a fine-tune)."""
    model = load_model(str(base), "cpu")
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(shift * torch.randn_like(p))
    return save_checkpoint(model, out, {"version": version, "parent": parent})


def test_states_over_one_backbone_equal_their_own_models_and_share_image_features(tiny_model_factory, tmp_path):
    base = tiny_model_factory(PRESET)
    a_dir = _variant(base, tmp_path / "a1", "a1", 0.2)
    backbone = Segmenter(load_model(str(base), "cpu"))
    state = read_trainable_state(backbone.model, a_dir)
    images, prompts = [_image(0), _image(1)], [["cat"], ["dog", "cat"]]
    alone_a = Segmenter(load_model(str(a_dir), "cpu")).predict_batch(images, prompts)
    alone_base = Segmenter(load_model(str(base), "cpu")).predict_batch(images, prompts)
    for _ in range(2):  # switch back and forth: each answer equals its own model's, exactly
        for got, want in ((backbone.predict_batch(images, prompts, state), alone_a),
                          (backbone.predict_batch(images, prompts), alone_base)):
            for g_image, w_image in zip(got, want):
                for g, w in zip(g_image, w_image):
                    np.testing.assert_array_equal(g.probability, w.probability)
    assert backbone.version == BASE_VERSION and backbone.for_state(state).version == "a1"
    assert len(backbone.feature_cache) == 2  # keyed by image, shared by both versions
    assert backbone.feature_cache.misses == 2 and backbone.state_switches == 4
    assert not np.array_equal(alone_a[0][0].probability, alone_base[0][0].probability)


def test_projects_are_served_their_own_versions_and_damage_falls_back(redis_conn, redis_url, tiny_model_factory,
                                                                       tmp_path, caplog):
    """In process (Flask test client): /setup and /predict per project; a damaged version falls back to its
    parent, a broken lineage to the base; a model that is not coming answers 503 at once."""
    base = tiny_model_factory(PRESET)
    registry = VersionRegistry(redis_conn)
    registry.record_base(BASE_VERSION, str(base))
    a1 = _variant(base, tmp_path / "a1", "a1", 0.2, BASE_VERSION)
    registry.record(VersionRecord("a1", str(a1), BASE_VERSION, project="1"))
    registry.activate("a1", project="1")
    app = create_app(Settings(model=str(base), device="cpu", precision="fp32", data_dir=tmp_path / "d", redis_url=redis_url))
    runtime = app.extensions["clipseg_runtime"]
    client = app.test_client()
    image = data_uri(scene(96, 64, seed=0)[0])

    def setup(project: str) -> str:
        r = client.post("/setup", json={"project": f"{project}.1", "schema": LABEL_CONFIG})
        assert r.status_code == 200, r.get_json()
        return r.get_json()["model_version"]

    def predict(project: str) -> dict:
        r = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": image}}], "project": f"{project}.1",
                                          "label_config": LABEL_CONFIG})
        assert r.status_code == 200, r.get_json()
        return without_region_ids(r.get_json())

    try:
        assert runtime.model.wait_ready(60)
        assert setup("1") == "a1" and setup("2") == BASE_VERSION
        a_answer, b_answer = predict("1"), predict("2")
        assert a_answer["model_version"] == "a1" and b_answer["model_version"] == BASE_VERSION
        assert predict("1") == predict("1") == a_answer and setup("1") == "a1"  # A's state in the backbone: still A
        assert predict("2") == b_answer
        assert a_answer["results"] != b_answer["results"]
        assert runtime.model.segmenter.feature_cache.misses == 1  # one vision pass for both projects

        # a truncated child of a1: project 1 falls back to a1, says so, and nothing else changes
        a2 = _variant(base, tmp_path / "a2", "a2", 0.3, "a1")
        weights = a2 / "trainable.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        registry.record(VersionRecord("a2", str(a2), "a1", project="1"))
        registry.activate("a2", project="1")
        assert wait_for(lambda: setup("1") == "a1", 10, "the fallback to the parent")
        assert predict("1") == a_answer and predict("2") == b_answer
        health = client.get("/health").get_json()
        assert health["fallbacks"] == {"1": {"wanted": "a2", "serving": "a1"}} and "a2" in health["broken"]
        assert "project 1: version a2 cannot be loaded" in health["error"] and health["ready"]
        assert "damaged" in registry.get("a2").broken  # recorded for `clipseg versions`
        metrics = client.get("/metrics").get_data(as_text=True)
        assert 'clipseg_active_version{project="1",version="a2"}' in metrics

        # a1 itself damaged on disk (an artifact in Redis cannot help: the recorded path exists): the base
        shutil.copyfile(weights, a1 / "trainable.safetensors")
        registry.record(VersionRecord("a3", str(a2), "a1", project="1"))
        runtime.model._states.clear()  # a server restarted after the damage: nothing cached
        registry.activate("a3", project="1")
        assert wait_for(lambda: setup("1") == BASE_VERSION, 10, "the fallback to the base model")
        assert predict("1")["results"] == b_answer["results"] and setup("2") == BASE_VERSION
    finally:
        runtime.stop()

    # the backbone itself cannot load: /setup and /predict answer 503 at once instead of waiting for it
    broken_base = tmp_path / "broken-base"
    shutil.copytree(base, broken_base)
    (broken_base / "trainable.safetensors").write_bytes(b"\x00")
    app = create_app(Settings(model=str(broken_base), device="cpu", precision="fp32", data_dir=tmp_path / "e", redis_url=redis_url))
    runtime = app.extensions["clipseg_runtime"]
    try:
        client = app.test_client()
        assert wait_for(lambda: not runtime.model.loading, 60, "the failed load")
        started = time.monotonic()
        r = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": image}}], "label_config": LABEL_CONFIG})
        assert r.status_code == 503 and "damaged" in r.get_json()["error"]
        assert client.post("/setup", json={"schema": LABEL_CONFIG}).status_code == 503
        assert time.monotonic() - started < 5  # not the 60 s a loading model is given
    finally:
        runtime.stop()


@pytest.mark.slow
def test_real_server_survives_a_truncated_and_an_overwritten_checkpoint(redis_conn, redis_url, tiny_model_factory,
                                                                         tmp_path):
    """Issue 18 item 4 against a real `clipseg serve`: the active version of project 7 damaged in the two ways
    seen in the field; the server keeps answering project 7 with the parent, project 8 with the base, in time."""
    base = tiny_model_factory(PRESET)
    registry = VersionRegistry(redis_conn)
    registry.record_base(BASE_VERSION, str(base))
    models = tmp_path / "models"
    good = _variant(base, models / "g1", "g1", 0.2, BASE_VERSION)
    registry.record(VersionRecord("g1", str(good), BASE_VERSION, project="7", status="promoted"))
    registry.activate("g1", project="7")
    env = _env(redis_url, base, tmp_path / "data")
    tasks = [{"id": 1, "data": {"image": data_uri(scene(96, 64, seed=0)[0])}}]
    with Server(env, tmp_path / "serve.log") as server:
        assert server.setup(7) == "g1" and server.setup(8) == BASE_VERSION
        good_answer = without_region_ids(server.predict(tasks, 7))
        base_answer = without_region_ids(server.predict(tasks, 8))
        assert good_answer["results"] != base_answer["results"]

        # 1. truncated weights of the newly active version
        truncated = _variant(base, models / "t1", "t1", 0.3, "g1")
        w = truncated / "trainable.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 3])
        # 2. one tensor's bytes overwritten, the header intact (safetensors loads it; only the checksum sees it)
        overwritten = _variant(base, models / "o1", "o1", 0.3, "g1")
        w = overwritten / "trainable.safetensors"
        data = w.read_bytes()
        header = 8 + int.from_bytes(data[:8], "little")
        w.write_bytes(data[:header] + bytes(b ^ 0xFF for b in data[header:header + 4096]) + data[header + 4096:])
        for version, path in (("t1", truncated), ("o1", overwritten)):
            registry.record(VersionRecord(version, str(path), "g1", project="7"))
            registry.activate(version, project="7")
            started = time.monotonic()
            wait_for(lambda: version in requests.get(f"{server.url}/health", timeout=5).json()["broken"], 15,
                     f"{version} to be marked broken")
            health = requests.get(f"{server.url}/health", timeout=5).json()
            assert health["ready"] and health["fallbacks"]["7"] == {"wanted": version, "serving": "g1"}
            assert f"version {version} cannot be loaded" in health["error"]
            assert server.setup(7) == "g1" and server.setup(8) == BASE_VERSION
            assert without_region_ids(server.predict(tasks, 7)) == good_answer  # the parent's masks, not empty ones
            assert without_region_ids(server.predict(tasks, 8)) == base_answer
            assert time.monotonic() - started < 30
            assert "damaged" in registry.get(version).broken
        log = (tmp_path / "serve.log").read_text()
        assert "cannot load model version t1" in log and "cannot load model version o1" in log

        # the parent damaged too (a second server would see the same): project 7 falls back to the base model
        shutil.copyfile(truncated / "trainable.safetensors", good / "trainable.safetensors")
        registry.record(VersionRecord("g2", str(overwritten), "g1", project="7"))
        registry.activate("g2", project="7")
        with Server(_env(redis_url, base, tmp_path / "data2"), tmp_path / "serve2.log") as fresh:
            assert fresh.setup(7) == BASE_VERSION and fresh.setup(8) == BASE_VERSION
            assert without_region_ids(fresh.predict(tasks, 7))["results"] == base_answer["results"]
            assert set(requests.get(f"{fresh.url}/health", timeout=5).json()["broken"]) >= {"g1", "g2"}


def test_a_version_with_unfrozen_backbone_layers_is_served_beside_the_base(redis_conn, redis_url, tiny_model_factory,
                                                                            tmp_path):
    """A version whose trainable part includes CLIP vision layers (unfreeze_last=1): its project is served exactly
    what that model alone answers, and the base project's answers do not change before or after (the unfrozen
    layers never leak into the shared backbone)."""
    from clipseg_model.checkpoint import read_checkpoint_config
    from clipseg_model.loading import build_model

    base = tiny_model_factory(PRESET)
    config, _ = read_checkpoint_config(base)
    model = build_model(config.replace(unfreeze_last=1), "cpu")
    vision = [n for n, p in model.named_parameters() if p.requires_grad and "vision" in n]
    assert vision, "unfreeze_last=1 makes vision-layer weights trainable"
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p))
    u1 = save_checkpoint(model, tmp_path / "u1", {"version": "u1", "parent": BASE_VERSION})
    registry = VersionRegistry(redis_conn)
    registry.record_base(BASE_VERSION, str(base))
    registry.record(VersionRecord("u1", str(u1), BASE_VERSION, project="1"))
    registry.activate("u1", project="1")
    image = data_uri(scene(96, 64, seed=2)[0])

    def predict(client, project: str) -> dict:
        r = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": image}}], "project": f"{project}.1",
                                          "label_config": LABEL_CONFIG})
        assert r.status_code == 200, r.get_json()
        return without_region_ids(r.get_json())

    alone = {}
    for name, model_dir in (("u1", u1), ("base", base)):  # each model served on its own, no Redis
        app = create_app(Settings(model=str(model_dir), device="cpu", precision="fp32", data_dir=tmp_path / f"alone-{name}"))
        runtime = app.extensions["clipseg_runtime"]
        try:
            assert runtime.model.wait_ready(60)
            alone[name] = predict(app.test_client(), "9")
        finally:
            runtime.stop()
    assert alone["u1"]["results"] != alone["base"]["results"]

    app = create_app(Settings(model=str(base), device="cpu", precision="fp32", data_dir=tmp_path / "d", redis_url=redis_url))
    runtime = app.extensions["clipseg_runtime"]
    try:
        client = app.test_client()
        assert runtime.model.wait_ready(60)
        for _ in range(2):  # back and forth
            assert predict(client, "2")["results"] == alone["base"]["results"]
            got = predict(client, "1")
            assert got["model_version"] == "u1" and got["results"] == alone["u1"]["results"]
    finally:
        runtime.stop()


def test_each_version_is_binarised_at_its_calibrated_threshold_unless_threshold_is_set(tiny_model_factory, tmp_path):
    """A fine-tune records a calibrated threshold with its version: served over the shared backbone, that version's
    masks are `probability > its threshold`; a version without one uses 0.5; THRESHOLD, when set, wins for all."""
    base = tiny_model_factory(PRESET)
    model = load_model(str(base), "cpu")
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.2 * torch.randn_like(p))
    tuned = save_checkpoint(model, tmp_path / "t1", {"version": "t1", "threshold": 0.55})
    image, prompts = _image(3), ["cat", "dog"]

    served = Segmenter(load_model(str(base), "cpu"), threshold=None)  # THRESHOLD unset
    state = read_trainable_state(served.model, tuned)
    assert state.threshold == 0.55 and served.threshold_for(state) == 0.55 and served.threshold_for() == 0.5
    for pred in served.predict(image, prompts, state):
        np.testing.assert_array_equal(pred.mask, pred.probability > 0.55)
    for pred in served.predict(image, prompts):
        np.testing.assert_array_equal(pred.mask, pred.probability > 0.5)

    fixed = Segmenter(load_model(str(base), "cpu"), threshold=0.3)  # THRESHOLD=0.3
    assert fixed.threshold_for(state) == 0.3
    for pred in fixed.predict(image, prompts, state):
        np.testing.assert_array_equal(pred.mask, pred.probability > 0.3)
    assert load_model(str(tuned), "cpu").calibrated_threshold == 0.55


def test_cache_budgets_come_from_the_environment(tiny_model_factory, tmp_path):
    """IMAGE_CACHE_MB, FEATURE_CACHE_MB and MODEL_CACHE_MB size the three in-memory caches (0 turns one off)."""
    from backend.images import ImageFetcher
    from backend.serving.model import ServingModel

    env = {"MODEL": str(tiny_model_factory(PRESET)), "DEVICE": "cpu", "DATA_DIR": str(tmp_path),
           "IMAGE_CACHE_MB": "0", "FEATURE_CACHE_MB": "0", "MODEL_CACHE_MB": "3"}
    settings = Settings.from_env(env)
    assert ImageFetcher.from_settings(settings)._cache.capacity == 0
    served = ServingModel.from_settings(settings)
    served.start()
    assert served.wait_ready(60)
    assert served._states.capacity == 3 * 1024 * 1024 and served.models_dir == str(tmp_path / "models")
    segmenter = served.segmenter
    for _ in range(2):
        segmenter.predict_batch([_image(0)], [["cat"]])
    assert segmenter.feature_cache.capacity == 0 and segmenter.feature_cache.misses == 2  # the encoder ran twice
    served.stop()
    default = ServingModel.from_settings(Settings.from_env({**env, "FEATURE_CACHE_MB": "1"}))
    default.start()
    assert default.wait_ready(60)
    for _ in range(2):
        default.segmenter.predict_batch([_image(0)], [["cat"]])
    assert default.segmenter.feature_cache.hits == 1
    default.stop()
