"""Fine-tune loop demo: a model that never heard a colour word learns it from 30 corrections sent as webhooks.

1. Train the CPU learning benchmark's model (`small-film` at 64 px) from random init on generated shapes whose phrases never say "green" (colour phrases only:
   "the red shape", "the blue object", ...; green shapes do appear, unnamed).
2. Start the real backend, `clipseg serve` with no REDIS_URL: embedded Redis + fine-tune worker + scheduler.
3. Send 30 corrections of "the green ..." through /webhook, as Label Studio would: data: URI images, brush RLE
   masks of the ground truth, the phrase in a per-region TextArea. The 30th triggers a fine-tune (FINETUNE_EVERY=30).
4. Wait for the server to serve the new version (or for the job to reject it) and print mIoU on held-out
   "green" scenes and on held-out scenes of the old colours, before and after.

    .venv/bin/python benchmarks/loop_demo.py            # numbers in docs/loop.md, "Demo: learning a new concept"

`--rounds N`: N successive fine-tunes of one project, each teaching a new colour (green, yellow, orange, purple,
pink: the model is pretrained without the N colours' words, the rest are the old concepts); `--json OUT` writes
one record per round (new_before, new_after, old_before, old_after, seconds_to_served, verdict, ...). "after" is the
model served after the round: the candidate when promoted, else its parent.

Replay (REPLAY_RATIO=6 by default, 300 steps: chosen in docs/loop.md to keep the old within 0.02), `--replay shapes`: draws from the pretraining distribution (REPLAY_SHAPES: the
same generator options, phrases without "green"), so the job keeps the old colours while it learns the new one;
`--replay distill`: self-distillation, the parent's own answers for old-colour phrases on the corrections' images
(no pretraining data needed); `--replay-ratio 0` shows what happens without replay.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.learning_cpu import bench_preset, build_random  # noqa: E402
from clipseg_model.checkpoint import is_checkpoint  # noqa: E402
from clipseg_model.loading import load_model  # noqa: E402
from clipseg_model.numerics import flush_denormals  # noqa: E402
from finetune.jobs import miou  # noqa: E402
from clipseg_model.vocab import word_level_tokenizer  # noqa: E402
from finetune.shapes import ShapesDataset, phrase_words  # noqa: E402
from finetune.recipe import TRAIN_PRESETS  # noqa: E402
from finetune.training import train  # noqa: E402
from tests.e2e.ls_harness import ManagedProcess, free_port  # noqa: E402
from tests.fixtures.webhooks import LABEL_CONFIG, annotation_event, brush_region, textarea_region  # noqa: E402

log = logging.getLogger("loop_demo")
CONCEPTS = ("green", "yellow", "orange", "purple", "pink")
KINDS = ("color",)


def _png_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _versions(cli_env: dict) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "backend.cli", "versions", "--json"], env=cli_env, cwd=ROOT,
                          capture_output=True, text=True)
    return json.loads(done.stdout or "{}").get("versions", [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--corrections", type=int, default=30, help="corrections per round (FINETUNE_EVERY)")
    parser.add_argument("--rounds", type=int, default=1, help=f"successive fine-tunes, one new colour each (<= {len(CONCEPTS)})")
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--finetune-lr", type=float, default=5e-4)
    parser.add_argument("--anchor", type=float, default=None, help="FINETUNE_ANCHOR (L2-SP weight; default: the setting's)")
    parser.add_argument("--promote-epsilon", type=float, default=0.02, help="PROMOTE_EPSILON: the forgetting budget")
    parser.add_argument("--replay-ratio", type=float, default=6.0, help="replayed pretraining samples per correction")
    parser.add_argument("--replay", choices=["shapes", "distill"], default="shapes",
                        help="shapes: generated pretraining data (REPLAY_SHAPES); distill: self-distillation")
    parser.add_argument("--val", type=int, default=100, help="held-out scenes per group")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the summary with one record per round here")
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= len(CONCEPTS):
        parser.error(f"--rounds must be 1..{len(CONCEPTS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # `timeout` sends SIGTERM: exit through the `with server:` block so the server it started stops too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    flush_denormals()  # before torch starts threads: subnormals made trained steps 2.7x slower
    torch.set_num_threads(args.threads)
    started = time.time()
    work = args.out or Path(tempfile.mkdtemp(prefix="loop-demo-"))
    concepts = CONCEPTS[:args.rounds]
    # The CPU learning benchmark's model (benchmarks/learning_cpu.py, preset cpu-scratch: 64 px, towers 64 wide,
    # trained embeddings, no decoder dropout, a word-level vocabulary) without its pixel branch (and the options that
    # only a pixel branch has), alignment head, word attention and position options (= small-film at 64 px), on
    # scenes with objects of 12-25 % of the image.
    preset = bench_preset(64, pixel_channels=0, pixel_tokens=False, pixel_token_layers=0, pixel_stride=1,
                          pixel_coordinates=False, text_alignment=False, word_attention=False,
                          decoder_positions=False, relative_positions=False)
    size = preset.config.image_size
    shapes = dict(image_size=size, kinds=KINDS, min_radius=0.12, max_radius=0.25, min_objects=2, max_objects=4)
    unknown = set(concepts)

    # 1. a model that never heard the concepts (one pretrained model per set of concepts, reused in the same --out)
    pre_dir = work / ("pretrain" if concepts == ("green",) else "pretrain-" + "-".join(concepts))
    base_dir = pre_dir / "last"
    if is_checkpoint(str(base_dir)):
        model = load_model(base_dir, "cpu")
    else:
        tokenizer = word_level_tokenizer(phrase_words())
        model = load_model(build_random(preset, pre_dir.with_name(pre_dir.name + "-init"), 0, tokenizer), "cpu")
        cfg = TRAIN_PRESETS["improved"].replace(lr=1e-3, batch_size=args.batch_size, steps=args.pretrain_steps,
                                                warmup_fraction=0.03, log_every=25, seed=0)
        result = train(model, ShapesDataset(100_000, seed=1000, exclude_words=unknown, **shapes), None, cfg,
                       pre_dir, "cpu", progress=False)
        base_dir = result.last_checkpoint
    new_val = {c: list(ShapesDataset(args.val, seed=3000 + i, require_words={c}, **shapes))
               for i, c in enumerate(concepts)}
    old_val = list(ShapesDataset(args.val, seed=4000, exclude_words=unknown, **shapes))
    pretrain_s = time.time() - started
    old_start = miou(model, old_val)
    log.info("pretrained in %.0f s: old concepts %.3f", pretrain_s, old_start)

    # 2. the real backend: embedded Redis, worker and scheduler
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data_dir = work / f"data-{args.replay}-r{args.rounds}"
    shutil.rmtree(data_dir, ignore_errors=True)  # a fresh project each run: an old one's corrections trained already
    old_colours = [c for c in ("red", "blue", "yellow", "orange", "purple", "pink", "green") if c not in unknown]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MODEL": str(base_dir), "DATA_DIR": str(data_dir),
           "REDIS_URL": "", "HF_HUB_OFFLINE": "1", "DEVICE": "cpu", "FINETUNE_EVERY": str(args.corrections),
           "FINETUNE_STEPS": str(args.finetune_steps), "FINETUNE_LR": str(args.finetune_lr),
           "REPLAY_RATIO": str(args.replay_ratio),
           "REPLAY_SHAPES": json.dumps({**shapes, "kinds": list(KINDS), "exclude_words": sorted(unknown)}),
           "REPLAY": args.replay,
           # what self-distillation asks the parent about: the old colours' phrases
           "DISTILL_PHRASES": ",".join(f"the {c} {n}" for c in old_colours for n in ("shape", "object")),
           "PROMOTE_EPSILON": str(args.promote_epsilon), "LOG_LEVEL": "INFO"}
    if args.anchor is not None:
        env["FINETUNE_ANCHOR"] = str(args.anchor)
    server = ManagedProcess([sys.executable, "-m", "backend.cli", "serve", "--port", str(port)], env=env,
                            base_env={}, cwd=ROOT, log_path=data_dir.with_suffix(".log"), health_url=f"{url}/health",
                            name="clipseg-serve")
    cli_env = {**env, "REDIS_URL": f"unix://{data_dir / 'redis' / 'redis.sock'}?db=0"}
    rounds: list[dict] = []
    served = model
    with server:
        while not requests.get(f"{url}/health", timeout=5).json()["ready"]:
            time.sleep(0.2)
        setup = {"project": "1.0", "schema": LABEL_CONFIG, "hostname": "http://localhost:8080", "access_token": "x"}
        for k, concept in enumerate(concepts):
            before = {"new": miou(served, new_val[concept]), "old": miou(served, old_val)}
            seen = {v["version"] for v in _versions(cli_env)}
            # 3. corrections of the new concept through the webhook, as Label Studio sends them
            for i, sample in enumerate(ShapesDataset(args.corrections, seed=5000 + k, require_words={concept}, **shapes)):
                w, h = sample.image.size
                n = k * args.corrections + i
                result_items = [brush_region(sample.mask, "cat", f"r{n}"), textarea_region(sample.phrase, f"r{n}", w, h)]
                body = annotation_event(result_items, annotation_id=10_000 + n, task_id=n + 1, project_id=1,
                                        data={"image": _png_uri(sample.image)})
                assert requests.post(f"{url}/webhook", json=body, timeout=5).status_code == 201
            last_sent = time.time()  # the round's last correction: from here to the new version being served
            # 4. wait for the new version (the server hot-reloads it) or for the job to finish without one
            record = None
            while time.time() - last_sent < 1800:
                version = requests.post(f"{url}/setup", json=setup, timeout=10).json()["model_version"]
                done = [v for v in _versions(cli_env) if v["version"] not in seen
                        and v["status"] in ("promoted", "rejected", "inconclusive")]
                if done and (done[-1]["status"] != "promoted" or version == done[-1]["version"]):
                    record = done[-1]
                    break
                time.sleep(1)
            if record is None:
                raise SystemExit(f"round {k + 1}: no fine-tune finished; see {data_dir.with_suffix('.log')}")
            seconds = time.time() - last_sent
            candidate = load_model(record["path"], "cpu")
            cand = {"new": miou(candidate, new_val[concept]), "old": miou(candidate, old_val)}
            if record["status"] == "promoted":
                served = candidate
            after = cand if record["status"] == "promoted" else before
            learnt = {c: round(miou(served, new_val[c]), 4) for c in concepts[:k]}
            rounds.append({"round": k + 1, "concept": concept, "version": record["version"],
                           "new_before": round(before["new"], 4), "new_after": round(after["new"], 4),
                           "old_before": round(before["old"], 4), "old_after": round(after["old"], 4),
                           "candidate_new": round(cand["new"], 4), "candidate_old": round(cand["old"], 4),
                           "earlier_concepts_after": learnt, "seconds_to_served": round(seconds, 1),
                           "verdict": record["status"], "reason": record["reason"],
                           "forgetting": record["metrics"].get("forgetting"),
                           "threshold": record["metrics"].get("threshold")})
            log.info("round %d (%s): %s", k + 1, concept, rounds[-1])
    summary = {"concepts": list(concepts), "corrections_per_round": args.corrections,
               "pretrain_steps": args.pretrain_steps, "finetune_steps": args.finetune_steps,
               "finetune_lr": args.finetune_lr, "anchor": args.anchor, "replay": args.replay,
               "replay_ratio": args.replay_ratio, "promote_epsilon": args.promote_epsilon,
               "old_start": round(old_start, 4), "old_end": rounds[-1]["old_after"],
               "cumulative_old_drop": round(old_start - rounds[-1]["old_after"], 4), "rounds": rounds,
               "pretrain_seconds": round(pretrain_s), "load": [round(x, 2) for x in os.getloadavg()],
               "total_seconds": round(time.time() - started), "out": str(work)}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    for r in rounds:
        print(f"round {r['round']} '{r['concept']}': new {r['new_before']:.3f} -> {r['new_after']:.3f}, old "
              f"{r['old_before']:.3f} -> {r['old_after']:.3f}, {r['verdict']} in {r['seconds_to_served']:.0f} s "
              f"({r['reason']})")
    print(f"old concepts {summary['old_start']:.3f} -> {summary['old_end']:.3f} (cumulative drop "
          f"{summary['cumulative_old_drop']:+.3f}) over {len(rounds)} round(s); {summary['total_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
