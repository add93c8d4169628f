"""`clipseg spool` (webhook events set aside, and putting them back) and `clipseg status` (the queue-side status of
`finetune.commands` plus the spool, which is a serving concern and lives in backend/)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from backend.intake.spool import QUARANTINE, REJECTED, Spool
from finetune.commands import configure_status  # noqa: F401 - `clipseg status` takes the same options
from finetune.commands import run_status as _queue_status


def spool_state(data_dir: str | Path, limit: int = 20) -> dict:
    """Webhook events pending / rejected / quarantined in DATA_DIR/spool, with the reasons of the first `limit`."""
    spool = Spool(Path(data_dir) / "spool")
    set_aside = {kind: spool.set_aside(kind) for kind in (REJECTED, QUARANTINE)}
    items = [{"kind": kind, "file": p.name, "reason": spool.reason(p)} for kind, paths in set_aside.items() for p in paths]
    return {"dir": str(spool.dir), "pending": len(spool), "rejected": len(set_aside[REJECTED]),
            "quarantined": len(set_aside[QUARANTINE]), "set_aside": items[:limit]}


def precision_state(settings) -> dict:
    """What PRECISION gives MODEL on this machine: set (fp32/bf16), or the choice `clipseg serve` measured and cached
    under DATA_DIR/precision (auto/int8; None until a server has loaded MODEL once)."""
    from clipseg_model.precision_choice import cached_choices

    mode = settings.precision_mode
    if mode in ("fp32", "bf16"):
        return {"mode": mode, "precision": mode, "reason": f"PRECISION={mode}", "at": None}
    cache = Path(settings.data_dir) / "precision"
    mine = [c for c in cached_choices(cache) if c["mode"] == mode and c["model"] == settings.model]
    if not mine:
        return {"mode": mode, "precision": None, "at": None,
                "reason": f"not measured yet for {settings.model} (a server measures it when it loads the model; "
                          f"cache {cache})"}
    return {"mode": mode, **mine[0]}


def _precision_line(state: dict) -> str:
    when = f" (measured {state['at']})" if state.get("at") else ""
    return f"precision {state['precision'] or '-'} under PRECISION={state['mode']}: {state['reason']}{when}"


def _lines(state: dict) -> list[str]:
    lines = [f"spool     {state['pending']} pending, {state['rejected']} rejected, {state['quarantined']} quarantined "
             f"({state['dir']})"]
    lines += [f"  {item['kind']:<10} {item['file']}: {item['reason']}" for item in state["set_aside"]]
    if state["rejected"] or state["quarantined"]:
        lines.append("          once the cause is fixed: clipseg spool --replay-rejected")
    return lines


def run_status(args: argparse.Namespace, settings) -> int:
    state = spool_state(settings.data_dir)
    precision = precision_state(settings)
    return _queue_status(args, settings, extra={"spool": state, "precision": precision},
                         extra_lines=[_precision_line(precision), *_lines(state)])


def configure_spool(parser: argparse.ArgumentParser, settings) -> None:
    parser.add_argument("--replay-rejected", action="store_true",
                        help="put rejected and quarantined events back in line; the running server replays them")
    parser.add_argument("--json", action="store_true")


def run_spool(args: argparse.Namespace, settings) -> int:
    spool_dir = Path(settings.data_dir) / "spool"
    if args.replay_rejected:
        moved = Spool(spool_dir).replay_rejected()
        print(f"{moved} events put back in the spool ({spool_dir}); `clipseg serve` replays them within seconds")
        return 0
    state = spool_state(settings.data_dir, limit=100_000)
    if args.json:
        print(json.dumps(state, indent=2))
    else:
        print("\n".join(_lines(state)))
    return 0
