"""`clipseg serve`: the ML backend under gunicorn; with no REDIS_URL, also an embedded Redis, a worker and the
scheduler, so one command runs the whole loop on one machine. Ctrl-C stops everything it started.

Self-healing: a `Supervisor` thread restarts the embedded redis-server, the worker and the scheduler when they die
(backoff 1 s doubling to 30 s, reset after a minute of running; one log line each), and writes their state to
`DATA_DIR/run/parts.json`, which /health reports ("worker: restarting (exit -9)"). Every child gets a parent-death
signal (prctl PR_SET_PDEATHSIG), so a SIGKILLed serve leaves no redis-server holding the append-only file. One
serve per DATA_DIR: `DATA_DIR/serve.lock` (flock + PID) refuses a second one with one line; a dead owner's lock is
taken over, and an orphaned redis-server of that owner is stopped first.

Stopping (Ctrl-C or SIGTERM) takes under 10 s, nothing lost. The worker and the scheduler run in sessions of their
own, so a Ctrl-C reaches serve alone, which stops them in order: as soon as gunicorn starts its shutdown they get
SIGTERM (RQ's warm shutdown: an idle worker exits at once), while gunicorn gives its requests GRACEFUL_S; a worker
still busy STOP_GRACE_S after that gets a second SIGTERM, which abandons its job: the job goes back to the front of
its queue and the next worker runs it first (finetune.worker); whatever still runs STOP_KILL_S after the first
signal is SIGKILLed (its job is then recovered from its heartbeat on the next start); Redis stops last.
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

from backend.cli.child_processes import die_with_parent
from clipseg_model.atomic import pid_running
from clipseg_model.errors import ClipsegError

log = logging.getLogger("clipseg.serve")

BACKOFF_START_S, BACKOFF_MAX_S, HEALTHY_AFTER_S = 1.0, 30.0, 60.0
# Stopping: gunicorn's graceful timeout; after the first SIGTERM, when a busy worker's job is abandoned (second
# SIGTERM) and when anything still running is killed. Redis stops after them (well under a second when healthy).
GRACEFUL_S, STOP_GRACE_S, STOP_KILL_S = 4, 3.0, 7.0


def configure(parser: argparse.ArgumentParser, settings) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in containers)")
    parser.add_argument("--port", type=int, default=9090)
    parser.add_argument("--workers", type=int, default=1, help="gunicorn processes (each holds a model copy)")
    parser.add_argument("--threads", type=int, default=8, help="threads per process (requests share the model)")
    parser.add_argument("--timeout", type=int, default=120, help="seconds before gunicorn restarts a stuck process")
    parser.add_argument("--worker", dest="worker", action=argparse.BooleanOptionalAction, default=None,
                        help="also run a fine-tune worker (default: on with the embedded Redis, off with REDIS_URL)")
    parser.add_argument("--scheduler", dest="scheduler", action=argparse.BooleanOptionalAction, default=None,
                        help="also run the periodic scheduler (same default as --worker)")


# ---- one serve per DATA_DIR -------------------------------------------------------------------------------------
class ServeLock:
    """An exclusive flock on `DATA_DIR/serve.lock` holding the owner's PID; released by the kernel when it dies."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "serve.lock"
        self._fd: int | None = None

    def acquire(self, wait_for_dead_s: float = 10.0) -> "ServeLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_for_dead_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                owner = _read_pid(self.path)
                if owner is not None and pid_running(owner) or time.monotonic() > deadline:
                    os.close(fd)
                    raise ClipsegError(f"another `clipseg serve` (pid {owner or '?'}) uses DATA_DIR "
                                       f"{self.path.parent}; stop it or choose another DATA_DIR") from None
                time.sleep(0.2)  # its owner is dead; processes it forked are still exiting
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stop_orphaned_redis(redis_dir: Path, parts_file: Path) -> None:
    """A redis-server left by a serve that died (before parent-death signals existed, or on another kernel)
    must not keep appending to the AOF while a new one starts on it."""
    try:
        pid = int(json.loads(parts_file.read_text()).get("pids", {}).get("redis", 0))
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode() if pid else ""
    except (OSError, ValueError, AttributeError):
        return
    if "redis-server" in cmdline and str(redis_dir) in cmdline:
        log.warning("stopping the redis-server (pid %d) left running by a previous serve", pid)
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not pid_running(pid):
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)


# ---- supervision ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Part:
    name: str
    start: Callable[[], subprocess.Popen]
    stop: Callable[[subprocess.Popen], None] | None  # None: stopped by signals (stop_by_signal), before the others
    proc: subprocess.Popen | None = None
    state: str = "starting"
    started_at: float = 0.0
    backoff: float = BACKOFF_START_S
    restart_at: float | None = None
    restarts: int = 0


class Supervisor:
    """Starts child processes, restarts them when they die (with backoff), stops them (`begin_stop`, `stop`)."""

    def __init__(self, parts_file: Path, poll_s: float = 0.5) -> None:
        self.parts_file = parts_file
        self.poll_s = poll_s
        self.parts: list[_Part] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._stopping_since: float | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)

    def add(self, name: str, start: Callable[[], subprocess.Popen],
            stop: Callable[[subprocess.Popen], None] | None = None) -> None:
        """Start `name` now (raises if it cannot start the first time) and keep it running. `stop`: how to stop it,
        after every part stopped by signals (the default: SIGTERM, a second SIGTERM, SIGKILL; `stop_by_signal`)."""
        part = _Part(name, start, stop)
        part.proc, part.state, part.started_at = start(), "up", time.monotonic()
        self.parts.append(part)
        self._write()

    def start(self) -> "Supervisor":
        self._thread.start()
        return self

    def begin_stop(self) -> None:
        """Restart nothing from now on and send SIGTERM to the parts stopped by signals; returns at once (once)."""
        self._stop.set()
        with self._lock:  # a restart under way finishes first, and its process is signalled too
            if self._stopping_since is not None:
                return
            self._stopping_since = time.monotonic()
            for part in self.parts:
                if part.stop is None and part.proc is not None and part.proc.poll() is None:
                    part.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """Stop every part: those stopped by signals first (`stop_by_signal`), then the others in reverse order."""
        self.begin_stop()
        with self._lock:
            stop_by_signal([p.proc for p in self.parts if p.stop is None and p.proc is not None],
                           self._stopping_since or time.monotonic())
            for part in reversed(self.parts):  # the worker and scheduler are gone before the Redis they use
                if part.stop is not None and part.proc is not None and part.proc.poll() is None:
                    part.stop(part.proc)
                part.state = "stopped"
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.parts_file.unlink(missing_ok=True)

    def _write(self) -> None:
        state = {"pid": os.getpid(), "parts": {p.name: p.state for p in self.parts},
                 "pids": {p.name: p.proc.pid for p in self.parts if p.proc is not None},
                 "restarts": {p.name: p.restarts for p in self.parts}}
        self.parts_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.parts_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.parts_file)

    def _run(self) -> None:
        # Restarts happen on this thread, which lives as long as serve: the parent-death signal of a child fires
        # when the thread that forked it ends.
        while not self._stop.wait(self.poll_s):
            with self._lock:
                changed = any([self._check(part) for part in self.parts])
                if changed:
                    self._write()
        self._stopped.wait()  # a child this thread restarted would get its parent-death signal now, not stopped

    def _check(self, part: _Part) -> bool:
        now = time.monotonic()
        if part.restart_at is None:
            code = part.proc.poll() if part.proc is not None else -1
            if code is None:
                if now - part.started_at > HEALTHY_AFTER_S:
                    part.backoff = BACKOFF_START_S
                return False
            # gunicorn's arbiter reaps every child (waitpid(-1)), so the code may read 0 for a killed process
            part.restart_at = now + part.backoff
            part.state = f"restarting (exit {code})"
            log.warning("%s exited (code %s); restarting in %.0f s", part.name, code, part.backoff)
            part.backoff = min(BACKOFF_MAX_S, part.backoff * 2)
            return True
        if now < part.restart_at or self._stop.is_set():
            return False
        try:
            part.proc = part.start()
        except Exception as exc:  # noqa: BLE001 - try again later, with a longer wait
            part.restart_at = now + part.backoff
            part.state = f"down (restart failed: {exc}; next try in {part.backoff:.0f} s)"
            log.error("%s did not restart: %s; next try in %.0f s", part.name, exc, part.backoff)
            part.backoff = min(BACKOFF_MAX_S, part.backoff * 2)
            return True
        part.restart_at, part.state, part.started_at = None, "up", now
        part.restarts += 1
        log.warning("%s restarted (pid %d, restart %d)", part.name, part.proc.pid, part.restarts)
        return True


def stop_by_signal(procs: list[subprocess.Popen], since: float, grace_s: float = STOP_GRACE_S,
                   kill_s: float = STOP_KILL_S) -> None:
    """Wait for `procs`, sent SIGTERM at `since` (time.monotonic()): a second SIGTERM at `since + grace_s` (an RQ
    worker abandons its job), SIGKILL to what still runs at `since + kill_s`."""
    second = False
    while True:
        alive = [p for p in procs if p.poll() is None]
        if not alive:
            return
        elapsed = time.monotonic() - since
        if elapsed >= kill_s:
            for p in alive:
                log.warning("pid %d did not stop within %.0f s; killing it", p.pid, kill_s)
                try:  # with what it started (RQ's scheduler process, a work horse): a child leads its session
                    os.killpg(p.pid, signal.SIGKILL)
                except OSError:
                    p.kill()
                p.wait(5)
            return
        if elapsed >= grace_s and not second:
            second = True
            for p in alive:
                p.send_signal(signal.SIGTERM)
        time.sleep(0.05)


def _child(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "backend.cli", *args]
    log.info("starting %s", " ".join(args))
    # A session of its own: a Ctrl-C reaches serve only, which stops its children in order (see the docstring).
    # SIGKILL when serve dies: a worker's job is found abandoned and retried from its heartbeat.
    return subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=die_with_parent(signal.SIGKILL))


def run(args: argparse.Namespace, settings) -> int:
    from backend.cli.embedded_redis import EmbeddedRedis
    from backend.http.health import PARTS_FILE

    embedded = not settings.redis_url
    _log_replay_source(settings)
    with_worker = embedded if args.worker is None else args.worker
    with_scheduler = embedded if args.scheduler is None else args.scheduler
    data_dir = Path(settings.data_dir).resolve()
    parts_file = data_dir / PARTS_FILE
    # Until gunicorn installs its own handlers, a SIGTERM unwinds the ExitStack below like a Ctrl-C does.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    with ExitStack() as stack:
        lock = ServeLock(data_dir).acquire()
        stack.callback(lock.release)
        supervisor = Supervisor(parts_file)
        stack.callback(supervisor.stop)
        if embedded:
            redis_dir = data_dir / "redis"
            _stop_orphaned_redis(redis_dir, parts_file)
            server = EmbeddedRedis(redis_dir)

            def start_redis() -> subprocess.Popen:
                server.start()
                return server.proc  # type: ignore[return-value]

            supervisor.add("redis", start_redis, lambda proc: server.stop())
            settings = dataclasses.replace(settings, redis_url=server.url)
        env = {**os.environ, "REDIS_URL": settings.redis_url, "DATA_DIR": str(data_dir),
               "REDIS_NAMESPACE": settings.namespace}
        if with_worker:
            supervisor.add("worker", lambda: _child(["worker"], env))
        if with_scheduler:
            supervisor.add("scheduler", lambda: _child(["scheduler"], env))
        supervisor.start()
        _run_gunicorn(args, settings, on_stop=supervisor.begin_stop)
    return 0


def _exit_on_signal(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def _log_replay_source(settings) -> None:
    """Say once, at start, what a fine-tune will replay (and how to get RefCOCO when it is not that)."""
    from finetune.replay import GET_REFCOCO, choose_source

    try:
        source = choose_source(settings.finetune_spec(), settings.data_dir)
    except ValueError as exc:
        log.warning("fine-tune replay is misconfigured: %s", exc)
        return
    log.info("fine-tunes will replay %s%s", source.describe(), "" if source.kind in ("refcoco", "fetched") else f"; {GET_REFCOCO}")


def _run_gunicorn(args: argparse.Namespace, settings, on_stop: Callable[[], None]) -> None:
    """gunicorn's arbiter in this process; `on_stop` runs when it starts stopping (any signal, or an error)."""
    from gunicorn.app.base import BaseApplication
    from gunicorn.arbiter import Arbiter

    class _Arbiter(Arbiter):
        def stop(self, graceful=True):
            on_stop()  # the worker and the scheduler stop while gunicorn drains its requests
            super().stop(graceful)

    class _App(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"{args.host}:{args.port}")
            self.cfg.set("workers", args.workers)
            self.cfg.set("threads", args.threads)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("timeout", args.timeout)
            self.cfg.set("graceful_timeout", GRACEFUL_S)
            self.cfg.set("accesslog", None)
            self.cfg.set("loglevel", "warning")

        def load(self):  # runs in each gunicorn process after the fork: the model loads there, in the background
            from backend.http.app import create_app

            return create_app(settings)

        def run(self):  # BaseApplication.run, with the arbiter above
            try:
                _Arbiter(self).run()
            except RuntimeError as e:
                print(f"\nError: {e}\n", file=sys.stderr)
                sys.exit(1)

    log.info("serving on http://%s:%d (model %s, Redis %s)", args.host, args.port, settings.model,
             "embedded" if "unix://" in settings.redis_url else "external")
    _App().run()
