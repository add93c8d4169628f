"""`clipseg serve`: the ML backend under gunicorn; with no REDIS_URL, also an embedded Redis, a worker and the
scheduler, so one command runs the whole loop on one machine. Ctrl-C stops everything it started."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

log = logging.getLogger("clipseg.serve")


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


def _child(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "backend.cli", *args]
    log.info("starting %s", " ".join(args))
    return subprocess.Popen(cmd, env=env)


def _stop_children(children: list[subprocess.Popen]) -> None:
    for proc in children:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in children:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def run(args: argparse.Namespace, settings) -> int:
    from backend.embedded_redis import EmbeddedRedis

    embedded = not settings.redis_url
    with_worker = embedded if args.worker is None else args.worker
    with_scheduler = embedded if args.scheduler is None else args.scheduler
    children: list[subprocess.Popen] = []
    with ExitStack() as stack:
        if embedded:
            redis_dir = Path(settings.data_dir) / "redis"
            server = stack.enter_context(EmbeddedRedis(redis_dir))
            settings = dataclasses.replace(settings, redis_url=server.url)
        env = {**os.environ, "REDIS_URL": settings.redis_url, "DATA_DIR": str(Path(settings.data_dir).resolve())}
        stack.callback(_stop_children, children)
        if with_worker:
            children.append(_child(["worker"], env))
        if with_scheduler:
            children.append(_child(["scheduler"], env))
        _run_gunicorn(args, settings)
    return 0


def _run_gunicorn(args: argparse.Namespace, settings) -> None:
    from gunicorn.app.base import BaseApplication

    class _App(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"{args.host}:{args.port}")
            self.cfg.set("workers", args.workers)
            self.cfg.set("threads", args.threads)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("timeout", args.timeout)
            self.cfg.set("graceful_timeout", 10)
            self.cfg.set("accesslog", None)
            self.cfg.set("loglevel", "warning")

        def load(self):  # runs in each gunicorn process after the fork: the model loads there, in the background
            from backend.app import create_app

            return create_app(settings)

    log.info("serving on http://%s:%d (model %s, Redis %s)", args.host, args.port, settings.model,
             "embedded" if "unix://" in settings.redis_url else "external")
    _App().run()
