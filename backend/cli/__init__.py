"""The `clipseg` command: one entry point, subcommands implemented next to the code they drive.

Each subcommand lives in a module exposing `configure(parser, settings)` and `run(args, settings) -> int`; the module
is imported only when its subcommand is used, so `clipseg --help` stays instant and `clipseg serve` never imports
training code. Settings (read from the environment in `backend.settings`) are handed in, so command modules in
`clipseg_model` and `finetune` read no environment themselves.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from clipseg_model.errors import ClipsegError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "model": ("clipseg_model.commands", "model utilities: `clipseg model init --preset P --out DIR`"),
    "predict": ("clipseg_model.predict_command", "segment an image with phrases; writes mask PNGs and an overlay"),
    "serve": ("backend.cli.serve", "run the Label Studio ML backend (embedded Redis + worker when REDIS_URL is unset)"),
    "worker": ("finetune.commands", "run an RQ worker for fine-tuning jobs"),
    "scheduler": ("finetune.commands", "run the periodic fine-tune scheduler"),
    "finetune": ("finetune.commands", "queue (or run) a fine-tune for a project"),
    "prelabel": ("backend.cli.prelabel", "pre-annotate a whole project in the background through Label Studio's API"),
    "jobs": ("finetune.commands", "list queued, running and failed jobs with progress"),
    "versions": ("finetune.commands", "list model versions with metrics"),
    "rollback": ("finetune.commands", "make an earlier model version active again"),
    "status": ("backend.cli.status", "Redis, queue, workers, versions and the webhook spool at a glance"),
    "spool": ("backend.cli.status", "webhook events set aside (rejected, quarantined); --replay-rejected"),
    "corrections": ("backend.cli.corrections", "list a project's stored corrections and their phrases; --reprompt"),
    "data": ("finetune.commands", "replay data for fine-tunes: `clipseg data fetch-replay`"),
    "train": ("finetune.train_command", "train a model (RefCOCO or generated data)"),
    "eval": ("finetune.eval_command", "evaluate a model: Dice, mIoU, oIoU, Prec@X, HTML report"),
    "bench": ("backend.cli.bench", "inference benchmark against HF CLIPSeg (random full-size weights)"),
}
# Subcommands that run torch: they flush subnormal floats before torch starts any thread (clipseg_model.numerics).
TORCH_COMMANDS = frozenset({"model", "predict", "serve", "worker", "finetune", "train", "eval", "bench"})


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipseg",
        description="Text-prompted segmentation for Label Studio.",
        epilog="commands:\n" + "\n".join(f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND", help="see the list below")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), run one subcommand and return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in COMMANDS:
        _top_parser().parse_args(argv[:1] or ["--help"])
        return 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"clipseg {name}", description=COMMANDS[name][1])
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default: LOG_LEVEL or INFO)")
    configure = getattr(module, f"configure_{name}", None) or module.configure
    run = getattr(module, f"run_{name}", None) or module.run
    from backend.logs import setup_logging
    from backend.settings import Settings

    settings = Settings.from_env()
    configure(parser, settings)
    args = parser.parse_args(rest)
    setup_logging(args.log_level or settings.log_level, settings.log_json)
    if name in TORCH_COMMANDS:  # before the first tensor op; gunicorn and RQ children fork from here and inherit it
        from clipseg_model.numerics import flush_denormals

        flush_denormals()
    try:
        return int(run(args, settings) or 0)
    except KeyboardInterrupt:
        return 130
    except ClipsegError as exc:  # one clear line, no traceback soup
        logging.getLogger("clipseg").debug("details", exc_info=True)
        print(f"clipseg {name}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy, so exception classes are the same objects.
    from backend.cli import main as _main

    sys.exit(_main())
