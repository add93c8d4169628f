"""The Label Studio harness on its own: a real LS 1.23 server per auth mode, three ways to get an image in.

One server per auth mode (module-scoped). Measured here (2 CPU cores): LS venv install 65 s once; a cold start with
migrations 29-31 s, done once per machine to build the cached template data dir; each server start from the
template ~3-4 s; restart on the same data dir ~3.6 s. So both modes cost ~8 s after the first run.
"""
from __future__ import annotations

import base64
import json
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from tests.e2e.ls_harness import (
    LabelStudioAPIError,
    LabelStudioServer,
    ManagedProcess,
    free_port,
    port_is_free,
    wait_for_http,
)

pytestmark = pytest.mark.e2e

BRUSH_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">
    <Label value="cat"/>
    <Label value="dog"/>
  </BrushLabels>
</View>"""


def png_bytes(w: int = 8, h: int = 6, rgb=(200, 30, 30)) -> bytes:
    """A tiny valid RGB PNG, made without Pillow."""
    raw = b"".join(b"\x00" + bytes(rgb) * w for _ in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module", params=["legacy", "pat"])
def ls(request):
    with LabelStudioServer(request.param) as server:
        print(f"\n{server!r} timings: { {k: round(v, 2) for k, v in server.timings.items()} }")
        yield server


def test_auth_mode_is_what_was_asked(ls):
    legacy = requests.get(f"{ls.url}/api/projects", headers={"Authorization": f"Token {ls.legacy_token}"})
    anonymous = requests.get(f"{ls.url}/api/projects", allow_redirects=False)
    assert anonymous.status_code == 401
    if ls.auth_mode == "legacy":
        assert legacy.status_code == 200
        assert ls.client.auth_header()["Authorization"].startswith("Token ")
    else:
        assert legacy.status_code == 401, "JWT-only organisation must refuse legacy tokens"
        assert ls.client.auth_header()["Authorization"].startswith("Bearer ")
        # The PAT itself is a refresh token, not an access token.
        bad = requests.get(f"{ls.url}/api/projects", headers={"Authorization": f"Bearer {ls.pat}"})
        assert bad.status_code == 401
    assert ls.client.current_user()["email"] == ls.username
    with pytest.raises(LabelStudioAPIError) as e:
        ls.client.project(999999)
    assert e.value.status_code == 404 and "999999" in str(e.value)


def test_three_ways_to_import_an_image(ls, tmp_path):
    c = ls.client
    project = c.create_project(f"harness {ls.auth_mode}", BRUSH_CONFIG)
    image = png_bytes()

    # 1. upload, like the UI's import dialog
    up = tmp_path / "uploaded.png"
    up.write_bytes(image)
    c.upload_file(project, up)
    # 2. local files storage under LOCAL_FILES_DOCUMENT_ROOT
    folder = ls.local_files_root / f"p{project}"
    folder.mkdir()
    (folder / "local.png").write_bytes(image)
    storage = c.add_local_files_storage(project, folder, regex_filter=r".*\.png")
    # 3. JSON task with a data: URL
    data_url = "data:image/png;base64," + base64.b64encode(image).decode()
    c.import_tasks(project, [{"image": data_url}])

    tasks = c.tasks(project)
    urls = sorted((t["data"]["image"] for t in tasks), key=lambda u: u[:12])
    print(json.dumps({"storage": storage, "urls": [u[:80] for u in urls]}, indent=1))
    assert len(tasks) == 3
    upload_url = next(u for u in urls if u.startswith(f"/data/upload/{project}/"))
    local_url = next(u for u in urls if u.startswith("/data/local-files/?d="))
    assert local_url == f"/data/local-files/?d={folder.relative_to(ls.local_files_root)}/local.png"
    assert data_url in urls

    for url in (upload_url, local_url):
        ok = c.download(url)
        assert ok.status_code == 200 and ok.content == image, (url, ok.status_code)
        refused = c.download(url, with_auth=False)
        assert refused.status_code in (401, 403, 302), (url, refused.status_code)


# --- a protocol recorder standing in for an ML backend, to pin down what LS sends (the real backend comes later)


class Recorder(BaseHTTPRequestHandler):
    calls: list = []
    model_version = "recorder-v1"

    def _reply(self, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.calls.append(("GET", self.path, None, dict(self.headers)))
        self._reply({"status": "UP", "model_class": "Recorder"})

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n) or b"null")
        self.calls.append(("POST", self.path, body, dict(self.headers)))
        if self.path == "/setup":
            self._reply({"model_version": self.model_version})
        elif self.path == "/predict":
            self._reply({"results": [{"result": [], "score": 0.5, "model_version": self.model_version}
                                     for _ in body["tasks"]]})
        else:
            self._reply({})

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder():
    port = free_port()
    handler = type("R", (Recorder,), {"calls": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    wait_for_http(f"http://127.0.0.1:{port}/health", 10)
    handler.calls.clear()
    yield f"http://127.0.0.1:{port}", handler.calls
    httpd.shutdown()
    httpd.server_close()


def _png_file(ls):
    path = ls.local_files_root / "media-check.png"
    path.write_bytes(png_bytes())
    return path


def _wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_ml_backend_calls(ls, recorder):
    url, calls = recorder
    c = ls.client
    project = c.create_project("ml backend", BRUSH_CONFIG)
    c.import_tasks(project, [{"image": "data:image/png;base64," + base64.b64encode(png_bytes()).decode()}])
    task_id = c.tasks(project)[0]["id"]

    ml = c.add_ml_backend(project, url, "recorder", is_interactive=True)
    hooks = c.webhooks(project)
    assert [h["url"] for h in hooks] == [f"{url}/webhook"]
    assert hooks[0]["send_payload"] and hooks[0]["send_for_all_actions"]
    setup = next(b for m, p, b, h in calls if p == "/setup")
    assert setup["project"].startswith(f"{project}.") and setup["schema"] == BRUSH_CONFIG
    assert setup["hostname"] == f"http://localhost:{ls.port}" and setup["access_token"] == ls.legacy_token
    if ls.auth_mode == "pat":  # the known trap: in a JWT-only org the token /setup hands out cannot read media
        upload = c.upload_file(project, _png_file(ls))
        url = next(t["data"]["image"] for t in c.tasks(project) if t["data"]["image"].startswith("/data/upload/"))
        denied = requests.get(ls.url + url, headers={"Authorization": f"Token {setup['access_token']}"})
        assert denied.status_code == 401 and upload["task_count"] == 1
        task_ids = [t["id"] for t in c.tasks(project)]
    else:
        task_ids = [task_id]

    calls.clear()
    reply = c.retrieve_predictions(project, task_ids)
    assert reply["processed_items"] == len(task_ids)
    predict = [b for m, p, b, h in calls if p == "/predict"]
    assert len(predict) == 1 and [t["id"] for t in predict[0]["tasks"]] == task_ids  # one call for all tasks
    assert predict[0]["params"]["context"] is None and predict[0]["label_config"] == BRUSH_CONFIG
    assert sorted(p["task"] for p in c.predictions(project)) == task_ids

    calls.clear()
    context = {"result": [{"type": "textarea", "value": {"text": ["cat"]}}]}
    out = c.interactive_annotating(ml, task_id, context)
    assert out["data"]["model_version"] == Recorder.model_version
    predict = [b for m, p, b, h in calls if p == "/predict"]
    assert len(predict) == 1 and predict[0]["params"]["context"] == context
    assert all("Authorization" not in h for m, p, b, h in calls)

    calls.clear()
    ann = c.create_annotation(task_id, [])
    c.update_annotation(ann["id"], [])
    c.delete_annotation(ann["id"])
    _wait_for(lambda: {"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"}
              <= {b.get("action") for m, p, b, h in calls if p == "/webhook"})
    deleted = next(b for m, p, b, h in calls if p == "/webhook" and b["action"] == "ANNOTATIONS_DELETED")
    assert deleted["annotations"] == [{"id": ann["id"]}]
    created = next(b for m, p, b, h in calls if p == "/webhook" and b["action"] == "ANNOTATION_CREATED")
    assert created["annotation"]["id"] == ann["id"] and created["task"]["id"] == task_id
    assert created["project"]["id"] == project

    calls.clear()
    c.patch_project(project, start_training_on_annotation_update=True)
    c.train(ml)
    _wait_for(lambda: any(p == "/webhook" and b.get("action") == "START_TRAINING" for m, p, b, h in calls))


def test_restart_keeps_data_and_auth(ls):
    project = ls.client.create_project("survives restart", BRUSH_CONFIG)
    old_port, pat = ls.port, ls.pat
    seconds = ls.restart()
    print(f"restart took {seconds:.1f} s")
    assert ls.port == old_port and ls.pat == pat
    assert ls.client.project(project)["title"] == "survives restart"
    assert seconds < 60


def test_managed_process_for_other_servers(tmp_path):
    """How the backend's e2e test starts `clipseg serve`: any command, its log, a /health wait, group stop."""
    port = free_port()
    (tmp_path / "health").write_text("ok")
    cmd = ["python3", "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)]
    with ManagedProcess(cmd, env={"SOME_VAR": "1"}, health_url=f"http://127.0.0.1:{port}/health",
                        name="http.server") as proc:
        assert proc.base_url == f"http://127.0.0.1:{port}"
        assert requests.get(f"{proc.base_url}/health").text == "ok"
    assert not proc.alive()
    _wait_for(lambda: port_is_free(port))
    assert "GET /health" in proc.log_tail()
