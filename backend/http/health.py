"""What /health reports besides the model: the state of each part a server depends on, so an outage shows up as
`"status": "DEGRADED"` with reasons ("redis: down (...)", "worker: restarting") instead of a bare UP.

Parts: Redis (pinged with a short timeout: Label Studio gives /health 1 s), the webhook spool (a write that failed,
events waiting behind a transient fault, events set aside), and the processes `clipseg serve` supervises, which it
describes in `DATA_DIR/run/parts.json` (written by `backend.cli.serve.Supervisor`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PARTS_FILE = Path("run") / "parts.json"


def supervised_parts(data_dir: str | os.PathLike[str]) -> dict[str, str]:
    """{"redis": "up", "worker": "restarting (exit -9)", ...} from a live `clipseg serve`; {} without one."""
    path = Path(data_dir) / PARTS_FILE
    try:
        state = json.loads(path.read_text())
        os.kill(int(state["pid"]), 0)  # a file left by a dead serve says nothing
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {str(k): str(v) for k, v in (state.get("parts") or {}).items()}


def redis_state(url: str, timeout: float = 0.3) -> str:
    """'up' or 'down (<reason>)' for the Redis at `url`; a write refused for lack of disk or memory shows too."""
    import redis

    conn = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        conn.ping()
        info = conn.info("persistence")
        if info.get("aof_last_write_status", "ok") != "ok" or info.get("rdb_last_bgsave_status", "ok") != "ok":
            return "degraded (cannot write to disk: MISCONF)"
        return "up"
    except redis.ResponseError as exc:  # it answers, but refuses: MISCONF (disk full), LOADING, ...
        return f"refusing writes ({str(exc)[:120]})"
    except redis.RedisError as exc:
        return f"down ({type(exc).__name__}: {str(exc)[:120]})"
    finally:
        conn.close()


def health_report(runtime: Any) -> dict[str, Any]:
    """The parts and the list of degraded ones, for /health."""
    settings = runtime.settings
    parts: dict[str, str] = {}
    if settings.redis_url:
        parts["redis"] = redis_state(settings.redis_url)
    for name, state in supervised_parts(settings.data_dir).items():
        if name != "redis" or "redis" not in parts or parts["redis"] == "up":
            parts[name] = state
    inbox = runtime.inbox
    if inbox is not None:
        counts = inbox.counts()
        if inbox.spool_error:
            parts["spool"] = f"failing ({inbox.spool_error})"
        elif counts["pending"] and inbox.last_error:
            parts["spool"] = f"{counts['pending']} events waiting ({inbox.last_error})"
        else:
            parts["spool"] = "ok"
        if counts["rejected"] or counts["quarantined"]:
            parts["spool"] += f"; {counts['rejected']} rejected, {counts['quarantined']} quarantined"
    degraded = [f"{name}: {state}" for name, state in parts.items() if state not in ("up", "ok")]
    sync = runtime.version_sync.status() if runtime.version_sync is not None else None
    return {"parts": parts, "degraded": degraded, "spool": inbox.counts() if inbox is not None else None,
            "label_studio_model_version": sync}
