"""`clipseg prelabel --project P [--unlabeled-only] [--wait] [--chunk N] [--exemplar TASK[:REGION]]`: queue a
pre-label run (backend.prelabel) that any number of `clipseg worker`s share; `--status RUN` shows a run chunk by
chunk. `--exemplar` stores an annotated region as the project's exemplar and pre-labels every task with everything
like it (a visual prompt) instead of the phrases; repeated (one region per label), each label's region of every
task comes from its own example."""
from __future__ import annotations

import argparse
import json
import sys
import time

from clipseg_model.errors import ClipsegError


def configure(parser: argparse.ArgumentParser, settings) -> None:
    parser.add_argument("--project", help="Label Studio project id")
    parser.add_argument("--unlabeled-only", action="store_true", help="only tasks without an annotation")
    parser.add_argument("--chunk", type=int, default=settings.prelabel_chunk,
                        help=f"tasks per chunk, the unit workers share (default PRELABEL_CHUNK={settings.prelabel_chunk})")
    parser.add_argument("--exemplar", metavar="TASK[:REGION]", action="append",
                        help="pre-label with everything like this annotated region (default: the first region of the "
                             "task's latest annotation) instead of the phrases; stored with the corrections. Repeat "
                             "it, one region per label, to pre-label each label from its own example")
    parser.add_argument("--wait", action="store_true", help="show a progress bar until the run is done")
    parser.add_argument("--status", metavar="RUN", help="show a run (chunk by chunk) instead of queueing one")
    parser.add_argument("--json", action="store_true", help="with --status or --wait: the summary as JSON")


def _bar(summary: dict, width: int = 30) -> str:
    total = max(1, summary["tasks"])
    done = sum(c.get("done") or 0 for c in summary["chunk_progress"].values())
    filled = int(width * done / total)
    return (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{summary['tasks']} tasks, "
            f"{summary['chunks_done']}/{summary['chunks']} chunks, {summary['written']} written, "
            f"{summary['failed']} failed ({summary['state']})")


def _print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
        return
    print(f"run {summary['run']}: project {summary['project']}, {summary['state']}, version {summary['predicts_with']}"
          f" ({summary['reason']})")
    if summary["error"]:
        print(f"  error: {summary['error']}")
    for i, c in summary["chunk_progress"].items():
        print(f"  chunk {i:>4} {c['state']:<8} {c.get('done') or 0}/{c.get('total') or '-'} "
              f"worker {c.get('worker') or '-'} attempts {c.get('attempts') or 0}")
    print(f"  {_bar(summary)}; {summary['skipped']} skipped, {summary['replaced']} older predictions removed")
    for f in summary["failed_tasks"]:
        print(f"  task {f['task']}: no prediction: {f['error']}")


def _store_exemplar(settings, conn, project: str, ref: str) -> str:
    """Take the region `ref` from Label Studio, store it as an exemplar of `project`, and return its name."""
    from backend.images import ImageFetcher, ImageFetchError
    from backend.prelabel.client import connect
    from backend.prelabel.exemplar_source import exemplar_from_task
    from backend.prelabel.runs import PrelabelError
    from finetune.exemplars import ExemplarStore

    try:
        client, label_config = connect(settings, project)
        exemplar = exemplar_from_task(ExemplarStore(conn, settings.namespace), client, ImageFetcher.from_settings(settings), project,
                                      label_config, ref)
    except (PrelabelError, ImageFetchError) as exc:
        raise ClipsegError(f"--exemplar {ref}: {exc}") from None
    print(f"exemplar {exemplar.name}: label {exemplar.label!r}, {int(exemplar.mask.sum())} pixels of "
          f"{exemplar.mask.shape[1]}x{exemplar.mask.shape[0]}, from {exemplar.origin}")
    return exemplar.name


def run(args: argparse.Namespace, settings) -> int:
    from backend.prelabel import PrelabelRuns, PrelabelSpec, queue_prelabel
    from finetune.commands import _redis

    conn = _redis(settings)
    runs = PrelabelRuns(conn, settings.namespace)
    if args.status:
        try:
            _print_summary(runs.summary(args.status), args.json)
        except KeyError:
            raise ClipsegError(f"no pre-label run {args.status} (recent: {', '.join(runs.runs(5)) or 'none'})") from None
        return 0
    if not args.project:
        raise ClipsegError("--project is required (or --status RUN)")
    names = [_store_exemplar(settings, conn, args.project, ref) for ref in args.exemplar or []]
    exemplar, exemplars = (names[0], ()) if len(names) == 1 else (None, tuple(names))
    from backend.cli.status import precision_state

    # The precision a server on this machine measured for MODEL (cached under DATA_DIR): the run's masks are then
    # the ones /predict answers, instead of the worker timing its own choice.
    measured = precision_state(settings)["precision"]
    spec = PrelabelSpec.from_settings(settings, args.project, unlabeled_only=args.unlabeled_only, chunk_size=args.chunk,
                                      exemplar=exemplar, exemplars=exemplars,
                                      precision=measured or settings.precision_mode)
    run_id, created = queue_prelabel(conn, spec, reason="clipseg prelabel")
    print(f"{'queued' if created else 'already running:'} pre-label run {run_id} for project {args.project}; "
          f"`clipseg worker`s on any machine with REDIS_URL, LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY share it")
    if not args.wait:
        return 0
    while True:
        summary = runs.summary(run_id)  # settles a run whose every job failed, so this loop ends
        if summary["state"] != "planning" or summary["error"]:
            print(f"\r{_bar(summary)}", end="", file=sys.stderr, flush=True)
            if summary["state"] in ("done", "failed"):
                print(file=sys.stderr)
                _print_summary(summary, args.json)
                return 0 if summary["state"] == "done" else 1
        time.sleep(1.0)
