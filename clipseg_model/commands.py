"""`clipseg model ...`: model utilities (init with random weights, list presets, describe a model)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from clipseg_model.config import PRESETS


def configure(parser: argparse.ArgumentParser, settings) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    init = sub.add_parser("init", help="build a preset with random weights (and tokenizer files) in a directory")
    init.add_argument("--preset", required=True, choices=sorted(PRESETS))
    init.add_argument("--out", required=True, type=Path, help="directory to create")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--vocab", type=Path, default=None,
                      help="OpenAI bpe_simple_vocab_16e6.txt.gz (default: from an installed open_clip, else byte-level)")
    sub.add_parser("presets", help="list the presets")
    info = sub.add_parser("info", help="print a model's architecture, version and parameter counts")
    info.add_argument("model", help="directory or hub id")


def run(args: argparse.Namespace, settings) -> int:
    from clipseg_model.errors import ClipsegError

    if args.action == "presets":
        for name, p in PRESETS.items():
            print(f"{name:<14} {p.config.architecture:<13} {p.description}")
        return 0
    if args.action == "init":
        from clipseg_model.random_init import init_model

        if args.out.exists():
            raise ClipsegError(f"{args.out} already exists; choose another --out or remove it")
        init_model(args.preset, args.out, seed=args.seed, bpe_path=args.vocab)
        print(f"wrote {args.out} (preset {args.preset}, random weights); try: clipseg predict IMAGE 'a phrase' --model {args.out}")
        return 0
    if args.action == "info":
        from clipseg_model.loading import load_model

        model = load_model(args.model, "cpu")
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.trainable_parameters())
        print(json.dumps({"architecture": model.config.architecture, "version": model.version,
                          "parameters": total, "trainable": trainable, "config": model.config.to_dict()}, indent=2))
        return 0
    return 2
