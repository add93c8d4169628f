"""End-to-end harness: a real Label Studio 1.23 server (its own cached virtualenv) plus a small REST client.

Everything runs on 127.0.0.1 as real processes; nothing is mocked.

    venv = ensure_label_studio_venv()                      # ~65 s the first time, then cached
    with LabelStudioServer(auth="pat") as ls:              # or "legacy" / "both"
        c = ls.client                                      # LabelStudioClient with the right Authorization
        pid = c.create_project("t", BRUSH_CONFIG)
        ...

Starting a server copies a pre-migrated data directory ("template", built once per machine and LS version by a
cold start with migrations, ~30-50 s) into a fresh temp dir, so each server starts in ~3-5 s. The auth mode is then
set through the API exactly as an admin would do it (`POST /api/jwt/settings`), and for personal access tokens a PAT
is created with `POST /api/token/` from a logged-in session and exchanged with `POST /api/token/refresh/`.

For other processes under test (our ML backend) use `ManagedProcess` / `wait_for_http` / `free_port`:

    port = free_port()
    with ManagedProcess(["clipseg", "serve", "--host", "127.0.0.1", "--port", str(port)],
                        env={"MODEL": model_dir, "REDIS_URL": redis_url},
                        health_url=f"http://127.0.0.1:{port}/health", name="backend") as backend:
        c.add_ml_backend(pid, backend.base_url, "clipseg")
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import requests

LS_REQUIREMENT = "label-studio==1.23.*"
LS_VERSION_PREFIX = "1.23."
DEFAULT_CACHE = Path.home() / ".cache" / "clipseg-tests"
DEFAULT_USERNAME = "e2e@example.com"
DEFAULT_PASSWORD = "e2e-password-1234"
DEFAULT_LEGACY_TOKEN = "e2e0legacy0token0000000000000000000000000"
AUTH_MODES = ("legacy", "pat", "both")
_OK_MARKER = ".clipseg-ls-ok"
_STATE_FILE = ".clipseg-harness.json"

# Environment variables Label Studio reads under plain names too (get_env tries LABEL_STUDIO_X, HEARTEX_X, X): an
# inherited HOST/PORT/USERNAME/... would silently change the server, so they are dropped from the child's env.
_LS_PLAIN_ENV = {
    "HOST", "PORT", "USERNAME", "PASSWORD", "USER_TOKEN", "DEBUG", "LOG_LEVEL", "BASE_DATA_DIR", "DJANGO_DB",
    "DATABASE_URL", "SECRET_KEY", "INTERNAL_HOST", "DISABLE_SIGNUP_WITHOUT_LINK", "ML_TIMEOUT_PREDICT",
}


class HarnessError(RuntimeError):
    """Something in the harness itself failed (install, start, readiness); the message carries the log tail."""


# ----------------------------------------------------------------------------------------------------------------
# Generic helpers


def tail(path: str | os.PathLike | None, n: int = 60) -> str:
    """Last n lines of a text file ('' when missing)."""
    if not path or not Path(path).exists():
        return ""
    lines = Path(path).read_text(errors="replace").splitlines()
    return "\n".join(lines[-n:])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Nobody listens on host:port and a server could bind it (SO_REUSEADDR, as Django's runserver does, so
    TIME_WAIT leftovers of a stopped server do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        if s.connect_ex((host, port)) == 0:
            return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", avoid: Iterable[int] = ()) -> int:
    """A TCP port on host that is free now (checked, not just handed out by the kernel)."""
    avoid = set(avoid)
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in avoid and port_is_free(port, host):
            return port
    raise HarnessError("no free port found")


def wait_for_http(
    url: str,
    timeout: float = 60.0,
    *,
    proc: subprocess.Popen | None = None,
    log_path: str | os.PathLike | None = None,
    ok_status: Sequence[int] = (200,),
    interval: float = 0.25,
    name: str = "server",
) -> requests.Response:
    """Poll GET url until it answers with one of ok_status. Fails early if proc exits; errors show the log tail."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        if proc is not None and proc.poll() is not None:
            raise HarnessError(
                f"{name} exited with code {proc.returncode} before {url} answered\n--- log {log_path} ---\n"
                f"{tail(log_path)}"
            )
        try:
            r = requests.get(url, timeout=2, allow_redirects=False)
            if r.status_code in ok_status:
                return r
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except requests.RequestException as e:
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() > deadline:
            raise HarnessError(
                f"{name}: {url} not ready after {timeout:.0f} s (last: {last})\n"
                f"--- log {log_path} ---\n{tail(log_path)}"
            )
        time.sleep(interval)


_LIVE: set["ManagedProcess"] = set()


@atexit.register
def _stop_leftovers() -> None:  # a crashed test must not leave servers behind
    for p in list(_LIVE):
        with contextlib.suppress(Exception):
            p.stop()


class ManagedProcess:
    """A child process in its own process group, its output in a log file, stopped (whole group) on exit.

    env is added to a copy of os.environ (a value None removes the variable). With health_url, start() waits for it.
    """

    def __init__(
        self,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str | None] | None = None,
        cwd: str | os.PathLike | None = None,
        log_path: str | os.PathLike | None = None,
        health_url: str | None = None,
        startup_timeout: float = 120.0,
        name: str | None = None,
        base_env: Mapping[str, str] | None = None,
    ):
        self.cmd = [str(c) for c in cmd]
        self.name = name or Path(self.cmd[0]).name
        self.env = dict(os.environ if base_env is None else base_env)
        for k, v in (env or {}).items():
            if v is None:
                self.env.pop(k, None)
            else:
                self.env[k] = str(v)
        self.cwd = str(cwd) if cwd else None
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix=f"{self.name}-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.health_url = health_url
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str | None:
        if not self.health_url:
            return None
        m = re.match(r"^(https?://[^/]+)", self.health_url)
        return m.group(1) if m else None

    def start(self) -> "ManagedProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== {time.strftime('%H:%M:%S')} start: {' '.join(self.cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.cmd, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        _LIVE.add(self)
        if self.health_url:
            try:
                self.wait_ready()
            except BaseException:
                self.stop()
                raise
        return self

    def wait_ready(self, url: str | None = None, timeout: float | None = None) -> requests.Response:
        return wait_for_http(
            url or self.health_url, timeout or self.startup_timeout, proc=self.proc, log_path=self.log_path,
            name=self.name,
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after timeout. Returns the exit code."""
        proc, self.proc = self.proc, None
        _LIVE.discard(self)
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        # Children that outlived the leader (e.g. a reloader) share its group id.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.returncode

    def log_tail(self, n: int = 60) -> str:
        return tail(self.log_path, n)

    def __enter__(self) -> "ManagedProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ----------------------------------------------------------------------------------------------------------------
# Label Studio virtualenv


def ls_venv_path() -> Path:
    return Path(os.environ.get("CLIPSEG_LS_VENV") or DEFAULT_CACHE / "ls-venv").expanduser()


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def label_studio_version(venv: Path) -> str | None:
    """Version of label-studio installed in venv (importlib.metadata; never runs `label-studio --version`)."""
    py = venv / "bin" / "python"
    if not py.exists():
        return None
    code = "import importlib.metadata as m, label_studio; print(m.version('label-studio'))"
    try:
        r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _venv_ok(venv: Path) -> bool:
    v = label_studio_version(venv)
    return bool(v and v.startswith(LS_VERSION_PREFIX) and (venv / "bin" / "label-studio").exists())


def ensure_label_studio_venv(venv: str | os.PathLike | None = None, timeout: float = 1200) -> Path:
    """A virtualenv with label-studio 1.23.x, created on first use (~65 s) and reused afterwards.

    Location: venv, else $CLIPSEG_LS_VENV, else ~/.cache/clipseg-tests/ls-venv. A file lock next to it keeps
    parallel test processes from installing at the same time; a broken or wrong-version venv is rebuilt.
    """
    venv = Path(venv).expanduser() if venv else ls_venv_path()
    if (venv / _OK_MARKER).exists() and _venv_ok(venv):
        return venv
    with _file_lock(venv.parent / f".{venv.name}.lock"):
        if _venv_ok(venv):  # another process finished it while we waited
            (venv / _OK_MARKER).touch()
            return venv
        if venv.exists():
            shutil.rmtree(venv)
        log = venv.parent / f"{venv.name}-install.log"
        with open(log, "w") as out:
            for cmd in (
                [sys.executable, "-m", "venv", str(venv)],
                [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                 "--no-input", LS_REQUIREMENT],
            ):
                out.write(f"$ {' '.join(cmd)}\n")
                out.flush()
                r = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
                if r.returncode:
                    raise HarnessError(f"installing Label Studio failed ({' '.join(cmd)}):\n{tail(log, 40)}")
        if not _venv_ok(venv):
            raise HarnessError(f"label-studio in {venv} is not {LS_VERSION_PREFIX}x after install:\n{tail(log, 40)}")
        (venv / _OK_MARKER).touch()
        return venv


# ----------------------------------------------------------------------------------------------------------------
# Auth


class LegacyTokenAuth(requests.auth.AuthBase):
    """`Authorization: Token <key>` (needs legacy tokens enabled in the organisation)."""

    def __init__(self, token: str):
        self.token = token

    def header(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.token}"}

    def __call__(self, r):
        r.headers.update(self.header())
        return r


class PersonalAccessTokenAuth(requests.auth.AuthBase):
    """A personal access token (a JWT refresh token) exchanged for short-lived access tokens, sent as Bearer.

    Access tokens live 5 minutes; a new one is fetched after `refresh_after` seconds.
    """

    def __init__(self, base_url: str, pat: str, refresh_after: float = 240.0):
        self.base_url = base_url.rstrip("/")
        self.pat = pat
        self.refresh_after = refresh_after
        self._access: str | None = None
        self._at = 0.0

    def access_token(self) -> str:
        if self._access is None or time.monotonic() - self._at > self.refresh_after:
            r = requests.post(f"{self.base_url}/api/token/refresh/", json={"refresh": self.pat}, timeout=30)
            if r.status_code != 200:
                raise HarnessError(f"PAT refresh failed: HTTP {r.status_code} {r.text[:500]}")
            self._access, self._at = r.json()["access"], time.monotonic()
        return self._access

    def header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token()}"}

    def __call__(self, r):
        r.headers.update(self.header())
        return r


# ----------------------------------------------------------------------------------------------------------------
# REST client


class LabelStudioAPIError(RuntimeError):
    def __init__(self, response: requests.Response):
        self.response = response
        self.status_code = response.status_code
        req = response.request
        super().__init__(f"{req.method} {req.url} -> HTTP {response.status_code}: {response.text[:3000]}")


class LabelStudioClient:
    """A thin client over the Label Studio REST API. Every method raises LabelStudioAPIError on HTTP errors."""

    def __init__(self, base_url: str, auth: requests.auth.AuthBase | str | None, timeout: float = 120.0):
        self.base_url = base_url.rstrip("/")
        self.auth = LegacyTokenAuth(auth) if isinstance(auth, str) else auth
        self.timeout = timeout
        self.http = requests.Session()

    # -- plumbing
    def url(self, path: str) -> str:
        return path if re.match(r"^https?://", path) else f"{self.base_url}/{path.lstrip('/')}"

    def auth_header(self) -> dict[str, str]:
        """The Authorization header as a dict (e.g. to hand to a backend as LABEL_STUDIO_API_KEY-style config)."""
        return self.auth.header() if self.auth is not None else {}

    def request(self, method: str, path: str, *, ok: Sequence[int] | None = None, **kw) -> requests.Response:
        kw.setdefault("timeout", self.timeout)
        kw.setdefault("auth", self.auth)
        r = self.http.request(method, self.url(path), **kw)
        if (ok is not None and r.status_code not in ok) or (ok is None and r.status_code >= 400):
            raise LabelStudioAPIError(r)
        return r

    def json(self, method: str, path: str, **kw) -> Any:
        r = self.request(method, path, **kw)
        return r.json() if r.content else None

    def get(self, path: str, **kw) -> Any:
        return self.json("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw) -> Any:
        return self.json("POST", path, json=body, **kw)

    def patch(self, path: str, body: Any = None, **kw) -> Any:
        return self.json("PATCH", path, json=body, **kw)

    def delete(self, path: str, **kw) -> Any:
        return self.json("DELETE", path, **kw)

    def download(self, url: str, *, with_auth: bool = True) -> requests.Response:
        """GET a task data URL (relative like /data/upload/... or absolute); no redirects followed, never raises."""
        return self.http.get(self.url(url), auth=self.auth if with_auth else None, timeout=self.timeout,
                             allow_redirects=False)

    # -- server
    def version(self) -> dict:
        return self.get("/api/version")

    def current_user(self) -> dict:
        return self.get("/api/current-user/whoami")

    # -- projects
    def create_project(self, title: str, label_config: str, **fields) -> int:
        return self.post("/api/projects", {"title": title, "label_config": label_config, **fields})["id"]

    def project(self, project: int) -> dict:
        return self.get(f"/api/projects/{project}")

    def patch_project(self, project: int, **fields) -> dict:
        """PATCH /api/projects/{id}, e.g. start_training_on_annotation_update=True, label_config=..."""
        return self.patch(f"/api/projects/{project}", fields)

    # -- data
    def import_tasks(self, project: int, tasks: list[dict]) -> dict:
        """Import JSON tasks, e.g. [{"image": "data:image/png;base64,..."}] or [{"data": {...}}]."""
        return self.post(f"/api/projects/{project}/import", tasks)

    def upload_file(self, project: int, path: str | os.PathLike) -> dict:
        """Upload a file like the UI does; its task gets a /data/upload/<project>/<name> URL."""
        path = Path(path)
        with open(path, "rb") as f:
            r = self.request("POST", f"/api/projects/{project}/import", files={"file": (path.name, f)})
        return r.json()

    def add_local_files_storage(
        self, project: int, path: str | os.PathLike, *, regex_filter: str = ".*", use_blob_urls: bool = True,
        title: str = "local files", sync: bool = True, **fields,
    ) -> dict:
        """Connect a local directory (must lie under LOCAL_FILES_DOCUMENT_ROOT) and sync it; each file becomes a
        task with a /data/local-files/?d=<path relative to the root> URL. Returns the storage (after sync)."""
        storage = self.post("/api/storages/localfiles", {
            "project": project, "path": str(path), "regex_filter": regex_filter, "use_blob_urls": use_blob_urls,
            "title": title, **fields,
        })
        if sync:
            storage = self.sync_local_files_storage(storage["id"])
        return storage

    def sync_local_files_storage(self, storage_id: int) -> dict:
        return self.post(f"/api/storages/localfiles/{storage_id}/sync")

    def tasks(self, project: int, page_size: int = 100) -> list[dict]:
        """All tasks of a project (data manager list, all fields), following pages."""
        out: list[dict] = []
        page = 1
        while True:
            body = self.get("/api/tasks", params={"project": project, "page": page, "page_size": page_size,
                                                  "fields": "all"})
            items = body["tasks"] if isinstance(body, dict) else body
            out.extend(items)
            total = body.get("total") if isinstance(body, dict) else None
            if not items or (total is not None and len(out) >= total) or len(items) < page_size:
                return out
            page += 1

    def task(self, task_id: int) -> dict:
        return self.get(f"/api/tasks/{task_id}")

    # -- ML backends
    def add_ml_backend(self, project: int, url: str, title: str = "ml backend", *, is_interactive: bool = True,
                       **fields) -> int:
        """POST /api/ml. LS checks the backend (/health, /setup) and auto-creates a project webhook to <url>/webhook
        (send_payload, all actions). is_interactive=True is needed for interactive_annotating."""
        body = {"project": project, "url": url, "title": title, "is_interactive": is_interactive, **fields}
        return self.post("/api/ml", body)["id"]

    def ml_backends(self, project: int) -> list[dict]:
        return self.get("/api/ml", params={"project": project})

    def update_ml_backend(self, ml_id: int, project: int, **fields) -> dict:
        """PATCH /api/ml/{id}; LS needs "project" in the body."""
        return self.patch(f"/api/ml/{ml_id}", {"project": project, **fields})

    def train(self, ml_id: int) -> Any:
        """The UI's "Start Training" button: LS sends START_TRAINING to <backend>/webhook."""
        return self.post(f"/api/ml/{ml_id}/train")

    def retrieve_predictions(self, project: int, task_ids: Iterable[int]) -> dict:
        """Data manager action "Retrieve Predictions": one /predict call with these tasks; LS answers success even
        when the backend failed, so check predictions() afterwards."""
        return self.post(
            "/api/dm/actions", {"selectedItems": {"all": False, "included": [int(t) for t in task_ids]}},
            params={"id": "retrieve_tasks_predictions", "project": project},
        )

    def predictions(self, project: int | None = None, task: int | None = None) -> list[dict]:
        params = {k: v for k, v in (("project", project), ("task", task)) if v is not None}
        return self.get("/api/predictions", params=params)

    def interactive_annotating(self, ml_id: int, task_id: int, context: Any = None, *,
                               raise_on_errors: bool = True) -> dict:
        """POST /api/ml/{id}/interactive-annotating {"task": id, "context": ...}. LS sends the backend /predict with
        params.context = context and answers 200 {"data": results[0]} — or 200 {"errors": [...]}, which raises
        unless raise_on_errors=False."""
        body = self.post(f"/api/ml/{ml_id}/interactive-annotating", {"task": int(task_id), "context": context})
        if raise_on_errors and isinstance(body, dict) and body.get("errors"):
            raise HarnessError(f"interactive-annotating errors: {body['errors']}")
        return body

    # -- annotations
    def create_annotation(self, task_id: int, result: list[dict], **fields) -> dict:
        return self.post(f"/api/tasks/{task_id}/annotations", {"result": result, **fields})

    def update_annotation(self, annotation_id: int, result: list[dict], **fields) -> dict:
        return self.patch(f"/api/annotations/{annotation_id}", {"result": result, **fields})

    def delete_annotation(self, annotation_id: int) -> None:
        self.request("DELETE", f"/api/annotations/{annotation_id}")

    def annotations(self, task_id: int) -> list[dict]:
        return self.get(f"/api/tasks/{task_id}/annotations")

    # -- webhooks
    def webhooks(self, project: int | None = None) -> list[dict]:
        return self.get("/api/webhooks", params={"project": project} if project is not None else None)


# ----------------------------------------------------------------------------------------------------------------
# Label Studio server


def _ls_env(data_dir: Path, root: Path, port: int, host: str | None,
            extra: Mapping[str, str | None] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _LS_PLAIN_ENV and not k.startswith(("LABEL_STUDIO_", "HEARTEX_"))}
    env.update({
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LATEST_VERSION_CHECK": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        "LOCAL_FILES_SERVING_ENABLED": "true",
        "LOCAL_FILES_DOCUMENT_ROOT": str(root),
        "PYTHONUNBUFFERED": "1",
    })
    if host:
        env["LABEL_STUDIO_HOST"] = host
    for k, v in (extra or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    return env


class LabelStudioServer:
    """A real `label-studio start` on 127.0.0.1 in a fresh data dir, in one of three auth modes:

    - "legacy": legacy tokens enabled (`--enable-legacy-api-token`); client sends `Authorization: Token <key>`.
    - "pat":    JWT-only organisation (the 1.23 default); legacy tokens are refused (401); a personal access
                token is created and the client sends `Authorization: Bearer <access>`.
    - "both":   legacy and PAT both work; `client` uses the PAT, `legacy_client` the legacy token.

    Attributes after start: url, port, data_dir, local_files_root, log_path, legacy_token, pat, client,
    legacy_client, pat_client. `restart()` stops and starts again on the same data dir (~3-5 s).

    data_dir: use (and keep) this directory; an existing LS data dir is reused as is. Default: a fresh temp dir
    removed on stop (unless keep=True); the log file stays.
    local_files_root: LOCAL_FILES_DOCUMENT_ROOT (default <tmp>/files, removed on stop).
    use_template: copy a cached pre-migrated data dir instead of a cold start with migrations (~30-50 s).
    public_host: LABEL_STUDIO_HOST. Default None, as users run it: /setup then tells backends
    "http://localhost:<port>" and local-files URLs are relative (/data/local-files/?d=...). With a URL (or True for
    http://127.0.0.1:<port>) /setup sends that hostname and local-files task URLs become absolute (<host>/data/...).
    """

    def __init__(
        self,
        auth: str = "legacy",
        *,
        data_dir: str | os.PathLike | None = None,
        local_files_root: str | os.PathLike | None = None,
        port: int | None = None,
        username: str = DEFAULT_USERNAME,
        password: str = DEFAULT_PASSWORD,
        legacy_token: str = DEFAULT_LEGACY_TOKEN,
        use_template: bool = True,
        startup_timeout: float = 240.0,
        extra_env: Mapping[str, str | None] | None = None,
        venv: str | os.PathLike | None = None,
        keep: bool = False,
        public_host: str | bool | None = None,
    ):
        if auth not in AUTH_MODES:
            raise ValueError(f"auth must be one of {AUTH_MODES}")
        self.auth_mode = auth
        self.username, self.password, self._legacy_token_arg = username, password, legacy_token
        self.use_template = use_template and (username, password, legacy_token) == (
            DEFAULT_USERNAME, DEFAULT_PASSWORD, DEFAULT_LEGACY_TOKEN)
        self.startup_timeout = startup_timeout
        self.extra_env = dict(extra_env or {})
        self._venv_arg = venv
        self.keep = keep
        self.public_host = public_host
        self._tmp: Path | None = None
        self._data_dir_arg = Path(data_dir) if data_dir else None
        self._root_arg = Path(local_files_root) if local_files_root else None
        self._port_arg = port
        self.port: int | None = None
        self.data_dir: Path | None = None
        self.local_files_root: Path | None = None
        self.log_path: Path | None = None
        self.process: ManagedProcess | None = None
        self.legacy_token: str | None = None
        self.pat: str | None = None
        self.session: requests.Session | None = None
        self.client: LabelStudioClient | None = None
        self.legacy_client: LabelStudioClient | None = None
        self.pat_client: LabelStudioClient | None = None
        self.timings: dict[str, float] = {}

    def _host_for(self, port: int) -> str | None:
        if self.public_host is True:
            return f"http://127.0.0.1:{port}"
        return self.public_host or None

    # -- paths
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _prepare_dirs(self) -> None:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="ls-e2e-"))
        self.data_dir = self._data_dir_arg or self._tmp / "data"
        self.local_files_root = self._root_arg or self._tmp / "files"
        self.local_files_root.mkdir(parents=True, exist_ok=True)
        self.log_path = self._tmp / "label-studio.log"

    # -- lifecycle
    def start(self) -> "LabelStudioServer":
        t0 = time.monotonic()
        venv = ensure_label_studio_venv(self._venv_arg)
        self.timings["venv_s"] = time.monotonic() - t0
        self._prepare_dirs()
        fresh = not (self.data_dir / "label_studio.sqlite3").exists()
        if fresh and self.use_template:
            template = _ensure_template(venv)
            t1 = time.monotonic()
            shutil.copytree(template, self.data_dir, dirs_exist_ok=True)
            self.timings["template_copy_s"] = time.monotonic() - t1
        cold = not (self.data_dir / "label_studio.sqlite3").exists()
        t1 = time.monotonic()
        self._launch(venv, cold)
        self.timings["cold_start_s" if cold else "start_s"] = time.monotonic() - t1
        try:
            self._configure_auth()
        except BaseException:
            self.stop()
            raise
        self.timings["total_s"] = time.monotonic() - t0
        return self

    def _launch(self, venv: Path, cold: bool) -> None:
        last_error = None
        for attempt in range(3):
            port = self._port_arg if (self._port_arg and attempt == 0) else free_port()
            if not port_is_free(port):
                if self._port_arg and attempt == 0:
                    raise HarnessError(f"port {port} is busy")
                continue
            cmd = [str(venv / "bin" / "label-studio"), "start", "--no-browser", "--internal-host", "127.0.0.1",
                   "--port", str(port), "--username", self.username, "--password", self.password,
                   "--user-token", self._legacy_token_arg]
            if cold and self.auth_mode in ("legacy", "both"):
                cmd.append("--enable-legacy-api-token")
            self.data_dir.mkdir(parents=True, exist_ok=True)
            proc = ManagedProcess(cmd, base_env=_ls_env(self.data_dir, self.local_files_root, port,
                                                   self._host_for(port), self.extra_env),
                                  log_path=self.log_path, name="label-studio")
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            proc.start()
            try:
                actual = self._wait_started_port(proc, offset)
                if actual != port:  # LS silently moved to another port: someone took ours meanwhile
                    last_error = f"asked for port {port}, Label Studio took {actual}"
                    proc.stop()
                    continue
                self.port, self.process = port, proc
                proc.health_url = f"{self.url}/health"
                proc.wait_ready(timeout=self.startup_timeout)
                return
            except BaseException:
                proc.stop()
                raise
        raise HarnessError(f"could not start Label Studio on a free port: {last_error}")

    def _wait_started_port(self, proc: ManagedProcess, offset: int) -> int:
        deadline = time.monotonic() + self.startup_timeout
        pattern = re.compile(rb"Starting development server at https?://[^:/\s]+:(\d+)/")
        while True:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                m = pattern.search(f.read())
            if m:
                return int(m.group(1))
            if not proc.alive():
                raise HarnessError(f"label-studio exited during start\n--- log {self.log_path} ---\n"
                                   f"{tail(self.log_path)}")
            if time.monotonic() > deadline:
                raise HarnessError(f"label-studio did not start within {self.startup_timeout:.0f} s\n--- log "
                                   f"{self.log_path} ---\n{tail(self.log_path)}")
            time.sleep(0.2)

    def _login(self) -> requests.Session:
        """A browser-like session (the way a user creates a PAT in the UI)."""
        s = requests.Session()
        s.get(f"{self.url}/user/login/", timeout=30)
        r = s.post(f"{self.url}/user/login/", data={
            "email": self.username, "password": self.password, "csrfmiddlewaretoken": s.cookies.get("csrftoken", ""),
        }, headers={"Referer": f"{self.url}/user/login/"}, allow_redirects=False, timeout=30)
        if r.status_code != 302 or "sessionid" not in s.cookies:
            raise HarnessError(f"login as {self.username} failed: HTTP {r.status_code}\n{tail(self.log_path, 30)}")
        s.headers.update({"X-CSRFToken": s.cookies["csrftoken"], "Referer": f"{self.url}/"})
        return s

    def _session_call(self, method: str, path: str, **kw) -> Any:
        r = self.session.request(method, f"{self.url}{path}", timeout=30, **kw)
        if r.status_code >= 400:
            raise LabelStudioAPIError(r)
        return r.json()

    def _state(self) -> dict:
        p = self.data_dir / _STATE_FILE
        return json.loads(p.read_text()) if p.exists() else {}

    def _configure_auth(self) -> None:
        self.session = self._login()
        want = {"api_tokens_enabled": True, "legacy_api_tokens_enabled": self.auth_mode in ("legacy", "both")}
        if self._session_call("GET", "/api/jwt/settings") != want:
            self._session_call("POST", "/api/jwt/settings", json=want)
        self.legacy_token = self._session_call("GET", "/api/current-user/token")["token"]
        self.legacy_client = LabelStudioClient(self.url, LegacyTokenAuth(self.legacy_token))
        self.pat, self.pat_client = None, None
        if self.auth_mode in ("pat", "both"):
            state = self._state()
            self.pat = state.get("pat")
            if not self.pat:  # only one live PAT per user: keep it with the data dir for restarts
                self.pat = self._session_call("POST", "/api/token/")["token"]
                (self.data_dir / _STATE_FILE).write_text(json.dumps({**state, "pat": self.pat}))
            self.pat_client = LabelStudioClient(self.url, PersonalAccessTokenAuth(self.url, self.pat))
        self.client = self.pat_client or self.legacy_client
        self.client.get("/api/projects", params={"page_size": 1})  # the chosen auth really works

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
        # Remove what we created, but keep the log (self.log_path) for debugging.
        if self._tmp is not None and not self.keep:
            if self._data_dir_arg is None and self.data_dir is not None:
                shutil.rmtree(self.data_dir, ignore_errors=True)
            if self._root_arg is None and self.local_files_root is not None:
                shutil.rmtree(self.local_files_root, ignore_errors=True)

    def restart(self) -> float:
        """Stop and start again on the same data dir and (if still free) the same port. Returns seconds taken."""
        t0 = time.monotonic()
        if self.process is not None:
            self.process.stop()
            self.process = None
        self._port_arg = self.port
        venv = ensure_label_studio_venv(self._venv_arg)
        self._launch(venv, cold=False)
        self._configure_auth()
        self.timings["restart_s"] = time.monotonic() - t0
        return self.timings["restart_s"]

    def log_tail(self, n: int = 60) -> str:
        return tail(self.log_path, n)

    def __enter__(self) -> "LabelStudioServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LabelStudioServer({self.auth_mode!r}, url={self.url if self.port else None}, log={self.log_path})"


def _ensure_template(venv: Path) -> Path:
    """A pre-migrated data dir (default user, legacy tokens on), built once per venv/LS version by a cold start."""
    version = label_studio_version(venv) or "unknown"
    template = venv.parent / f"ls-template-{version}"
    if (template / _OK_MARKER).exists():
        return template
    with _file_lock(venv.parent / f".ls-template-{version}.lock"):
        if (template / _OK_MARKER).exists():
            return template
        building = Path(tempfile.mkdtemp(prefix=f"ls-template-{version}-", dir=venv.parent))
        try:
            server = LabelStudioServer("legacy", data_dir=building / "data", use_template=False, venv=venv)
            server._tmp = building  # its log goes there too
            server.start()
            server.stop()
            data = building / "data"
            (data / _STATE_FILE).unlink(missing_ok=True)
            (data / _OK_MARKER).touch()
            if template.exists():
                shutil.rmtree(template)
            data.rename(template)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return template
