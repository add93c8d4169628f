"""Security through the app: who may call it, where images may come from, what is logged, what weights load.

Complements tests/test_images.py (the fetcher alone: SSRF rules, DNS rebinding, redirects, token refresh) by going
through `create_app` routes, and tests/test_app.py (basic auth happy path).
"""
from __future__ import annotations

import ast
import base64
import inspect
import logging
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import backend.http.app
from backend.http.app import create_app
from backend.settings import Settings
from clipseg_model.errors import CheckpointMismatchError, ModelNotAvailableError
from clipseg_model.loading import load_model
from tests.fixtures.bad_images import ImageHost, data_uri, png

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="cat"/></BrushLabels>
</View>"""
USER, PASSWORD = "label-studio", "pa:ss wörd"
LEGACY = "0123456789abcdef0123456789abcdef01234567"
# A personal access token's shape (JWT, token_type refresh); the refresh endpoint below rejects it.
PAT = ".".join(base64.urlsafe_b64encode(part).decode().rstrip("=") for part in (
    b'{"alg":"HS256","typ":"JWT"}', b'{"token_type":"refresh","exp":4102444800,"jti":"secret-jti-1234"}',
    b"signature-bytes-that-are-secret"))


@pytest.fixture(scope="module")
def host():
    with ImageHost() as server:
        server.add("/img.png", png())
        yield server


def _app(model: Path, tmp: Path, **overrides):
    settings = Settings(model=str(model), device="cpu", threshold=0.0, data_dir=tmp, **overrides)
    app = create_app(settings)
    assert app.extensions["clipseg_runtime"].model.wait_ready(60)
    return app


@pytest.fixture(scope="module")
def open_app(tiny_model_factory, tmp_path_factory, host):
    """No private networks allowed, Label Studio on the image host's port."""
    app = _app(tiny_model_factory("tiny-clipseg"), tmp_path_factory.mktemp("sec"),
               label_studio_url=f"http://127.0.0.1:{host.port}")
    yield app
    app.extensions["clipseg_runtime"].stop()


def _predict_one(client, ref: str, **kw):
    response = client.post("/predict", json={"tasks": [{"id": 5, "data": {"image": ref}}], "label_config": CONFIG}, **kw)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()["results"][0]


# -- where images may come from ----------------------------------------------------------------------------------

@pytest.mark.parametrize("ref, status", [
    ("file:///etc/passwd", 403),
    ("FILE:///etc/passwd", 403),
    ("http://169.254.169.254/latest/meta-data/iam/security-credentials/", 403),
    ("http://[fe80::1]/x.png", 403),
    ("http://10.0.0.1/x.png", 403),
    ("http://192.168.1.1/x.png", 403),
    ("http://localhost:6379/", 403),  # Redis's port on this host: not Label Studio's origin
    ("http://127.0.0.2/x.png", 403),
    ("http://[::ffff:127.0.0.1]:1/x.png", 403),
    ("http://example.com/x.png", 403),  # not Label Studio's host and not allowed
    ("gopher://127.0.0.1:6379/_FLUSHALL", 400),
    ("/data/local-files/?d=../../etc/passwd", 400),
    ("/data/local-files/?d=%2e%2e/%2e%2e/etc/passwd", 400),
    ("/data/upload/1/../../../etc/passwd", 400),
    ("/data/upload/1/..%2f..%2fetc%2fpasswd", 400),
    ("/etc/passwd", 400),
    ("../../etc/passwd", 400),
])
def test_forbidden_image_references_are_refused(open_app, host, caplog, ref, status):
    hits = len(host.hits)
    with caplog.at_level(logging.ERROR, logger="backend.serving.predict_service"):
        result = _predict_one(open_app.test_client(), ref)
    assert result["result"] == []
    assert f"(status {status})" in caplog.text, caplog.text
    assert len(host.hits) == hits  # nothing reached the image host either


def test_label_studio_origin_is_allowed_and_other_ports_are_not(open_app, host):
    client = open_app.test_client()
    assert _predict_one(client, "/data/upload/1/../1/img.png")["result"] == []  # traversal even inside LS
    assert _predict_one(client, host.url("/img.png"))["result"]  # LS's own origin: allowed
    assert _predict_one(client, "/img.png")["result"] == []  # relative, but not a /data/ media path
    other = ImageHost()
    with other:
        other.add("/img.png", png())
        assert _predict_one(client, other.url("/img.png"))["result"] == []  # same host, another port
        assert other.hits == []


def test_private_hosts_need_both_listing_and_private_networks(tiny_model_factory, tmp_path, host):
    other = ImageHost()
    with other:
        url = other.add("/img.png", png())
        listed = _app(tiny_model_factory("tiny-clipseg"), tmp_path / "a", allowed_hosts=(f"127.0.0.1:{other.port}",))
        assert _predict_one(listed.test_client(), url)["result"] == []  # listed, but loopback is private
        both = _app(tiny_model_factory("tiny-clipseg"), tmp_path / "b", allowed_hosts=(f"127.0.0.1:{other.port}",),
                    allow_private_networks=True)
        assert _predict_one(both.test_client(), url)["result"]
        assert _predict_one(both.test_client(), "http://169.254.169.254/x.png")["result"] == []  # never
        for app in (listed, both):
            app.extensions["clipseg_runtime"].stop()


# -- basic auth --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def locked(tiny_model_factory, tmp_path_factory):
    app = _app(tiny_model_factory("tiny-clipseg"), tmp_path_factory.mktemp("auth"),
               basic_auth_user=USER, basic_auth_pass=PASSWORD)
    yield app.test_client()
    app.extensions["clipseg_runtime"].stop()


def _basic(raw: bytes) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


GOOD = _basic(f"{USER}:{PASSWORD}".encode())


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": ""}, {"Authorization": "Basic"}, {"Authorization": "Basic !!!not-base64"},
    {"Authorization": "Basic " + "A" * 10_001}, {"Authorization": "Bearer " + LEGACY},
    {"Authorization": "Token " + LEGACY}, {"Authorization": "basic " + GOOD["Authorization"][6:]},
    _basic(USER.encode()), _basic(f"{USER}:".encode()), _basic(f":{PASSWORD}".encode()),
    _basic(f"{USER}:{PASSWORD} ".encode()), _basic(f"{USER}:{PASSWORD[:-1]}".encode()),
    _basic(f"{USER.upper()}:{PASSWORD}".encode()), _basic(b"\xff\xfe:\x00"),
    _basic(f"{USER}:{PASSWORD}:extra".encode()),
])
def test_every_endpoint_but_health_needs_the_password(locked, headers):
    for method, path in [("post", "/setup"), ("post", "/predict"), ("post", "/webhook"), ("get", "/metrics"),
                         ("get", "/nope"), ("post", "/health/../setup")]:
        response = getattr(locked, method)(path, json={"schema": CONFIG}, headers=headers)
        assert response.status_code == 401, (method, path, headers, response.status_code)
        assert response.headers["WWW-Authenticate"].startswith("Basic")
        assert PASSWORD not in response.get_data(as_text=True)
    assert locked.get("/health", headers=headers).status_code == 200


def test_right_password_opens_every_endpoint(locked):
    assert locked.post("/setup", json={"schema": CONFIG}, headers=GOOD).status_code == 200
    assert locked.post("/predict", json={"tasks": [{"id": 1, "data": {"image": data_uri(png())}}],
                                         "label_config": CONFIG}, headers=GOOD).status_code == 200
    assert locked.get("/metrics", headers=GOOD).status_code == 200
    assert locked.post("/webhook", json={"action": "PROJECT_UPDATED"}, headers=GOOD).status_code == 200


def test_credentials_are_compared_in_constant_time():
    """The auth hook compares user and password with hmac.compare_digest, both always, and never with ==."""
    source = inspect.getsource(backend.http.app._auth_and_reload)  # the auth hook, a module-level view since issue 25
    tree = ast.parse(source.lstrip())
    compare_digest = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "compare_digest"]
    assert len(compare_digest) >= 2
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            names = {getattr(x, "id", None) for x in [node.left, *node.comparators]}
            assert not names & {"auth_user", "auth_pass", "user", "password"}, ast.unparse(node)
        if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.And):  # `and` would skip the 2nd comparison
            assert "compare_digest" not in ast.unparse(node), ast.unparse(node)


# -- secrets in logs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", [LEGACY, PAT], ids=["legacy", "pat"])
def test_tokens_never_logged(tiny_model_factory, tmp_path, host, caplog, key):
    """A predict that uses the key (image from Label Studio's origin, one 404, a refused PAT refresh) and a /setup
    carrying another token: neither token nor the basic-auth password appears in any log record."""
    from backend.logs import setup_logging

    setup_token = "setup-token-" + "9" * 28
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    setup_logging("DEBUG")  # the servers' own logging set-up, at its most verbose
    root.addHandler(caplog.handler)
    try:
        caplog.handler.setLevel(logging.DEBUG)
        app = _app(tiny_model_factory("tiny-clipseg"), tmp_path, label_studio_url=f"http://127.0.0.1:{host.port}",
                   label_studio_api_key=key, basic_auth_user=USER, basic_auth_pass=PASSWORD)
        client = app.test_client()
        client.post("/setup", json={"project": "3.1", "schema": CONFIG, "hostname": host.url(""),
                                    "access_token": setup_token}, headers=GOOD)
        for ref in ("/data/upload/3/img.png", "/data/upload/3/missing.png", host.url("/img.png") + "?token=" + key):
            client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": ref}}], "project": "3.1"}, headers=GOOD)
        client.post("/predict", json={"tasks": []}, headers=_basic(f"{USER}:{PASSWORD}x".encode()))
        app.extensions["clipseg_runtime"].stop()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert host.hits, "the predict never reached the image host: nothing was tested"
    for secret in (key, setup_token, PASSWORD, "secret-jti-1234", PAT.split(".")[2]):
        assert secret not in text


# -- weights -----------------------------------------------------------------------------------------------------

def _pickled_copy(model_dir: Path, dst: Path) -> Path:
    """The tiny model's HF backbone with its safetensors replaced by a pickle (pytorch_model.bin)."""
    shutil.copytree(model_dir / "base", dst)
    state = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    torch.save(state, dst / "pytorch_model.bin")
    return dst


def test_pickle_weights_are_refused(tiny_model_factory, tmp_path):
    pickled = _pickled_copy(tiny_model_factory("tiny-clipseg"), tmp_path / "pickled")
    with pytest.raises(ModelNotAvailableError, match="pickle"):
        load_model(pickled, "cpu")
    # transformers alone would load it: the refusal is ours.
    from transformers import CLIPSegForImageSegmentation

    assert CLIPSegForImageSegmentation.from_pretrained(pickled) is not None


def test_pickle_next_to_safetensors_is_ignored(tiny_model_factory, tmp_path):
    """A pytorch_model.bin planted beside model.safetensors is never unpickled (it would raise if it were)."""
    model_dir = tmp_path / "planted"
    shutil.copytree(tiny_model_factory("tiny-clipseg") / "base", model_dir)
    (model_dir / "pytorch_model.bin").write_bytes(b"\x80\x04 not a valid pickle: loading me would fail")
    assert load_model(model_dir, "cpu") is not None


def test_checkpoint_with_pickle_instead_of_safetensors_is_refused(tiny_model_factory, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_model_factory("tiny-improved"), ckpt)
    state = load_file(str(ckpt / "trainable.safetensors"))
    (ckpt / "trainable.safetensors").unlink()
    torch.save(state, ckpt / "trainable.pt")
    with pytest.raises(CheckpointMismatchError, match="unreadable"):
        load_model(ckpt, "cpu")


def test_server_with_pickle_model_reports_it_and_answers_503(tiny_model_factory, tmp_path):
    pickled = _pickled_copy(tiny_model_factory("tiny-clipseg"), tmp_path / "pickled")
    app = create_app(Settings(model=str(pickled), device="cpu", data_dir=tmp_path / "d"))
    client = app.test_client()
    runtime = app.extensions["clipseg_runtime"]
    deadline = time.monotonic() + 30
    while runtime.model.loading and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not runtime.model.ready
    health = client.get("/health").get_json()
    assert "pickle" in health["error"]
    assert client.post("/setup", json={"schema": CONFIG}).status_code == 503
    runtime.stop()


# -- request size ------------------------------------------------------------------------------------------------

def test_request_size_limit_from_the_environment(tiny_model_factory, tmp_path):
    settings = Settings.from_env({"MAX_REQUEST_BYTES": "2048", "MODEL": str(tiny_model_factory("tiny-clipseg")),
                                  "DATA_DIR": str(tmp_path), "DEVICE": "cpu"})
    app = create_app(settings)
    client = app.test_client()
    small = client.post("/setup", json={"schema": CONFIG})
    assert small.status_code in (200, 503)  # under the limit (503 only while the model loads)
    big = client.post("/webhook", data=b"{" + b" " * 4096 + b"}", content_type="application/json")
    assert big.status_code == 413
    app.extensions["clipseg_runtime"].stop()
