"""`clipseg bench`: the inference benchmark (benchmarks/inference) as a subcommand.

The benchmark is not serving code: it lives in the `benchmarks` package, and this module only hands it the command's
parser and arguments, importing it when the subcommand runs.
"""
from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser, settings) -> None:
    """Arguments of `clipseg bench` (see benchmarks.inference.command)."""
    from benchmarks.inference import configure as configure_bench

    configure_bench(parser, settings)


def run(args: argparse.Namespace, settings) -> int:
    """Run every row and print the table; returns the exit status."""
    from benchmarks.inference import run as run_bench

    return run_bench(args, settings)
