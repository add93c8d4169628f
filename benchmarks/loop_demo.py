"""Fine-tune loop demo: a model that never heard a colour word learns it from 30 corrections sent as webhooks.

1. Train the CPU learning benchmark's model (`small-film` at 64 px) from random init on generated shapes whose phrases never say "green" (colour phrases only:
   "the red shape", "the blue object", ...; green shapes do appear, unnamed).
2. Start the real backend, `clipseg serve` with no REDIS_URL: embedded Redis + fine-tune worker + scheduler.
3. Send 30 corrections of "the green ..." through /webhook, as Label Studio would: data: URI images, brush RLE
   masks of the ground truth, the phrase in a per-region TextArea. The 30th triggers a fine-tune (FINETUNE_EVERY=30).
4. Wait for the server to serve the new version (or for the job to reject it) and print mIoU on held-out
   "green" scenes and on held-out scenes of the old colours, before and after.

    .venv/bin/python benchmarks/loop_demo.py            # numbers in docs/loop.md, "Demo: learning a new concept"

Replay (REPLAY_RATIO=3 by default), `--replay shapes`: draws from the pretraining distribution (REPLAY_SHAPES: the
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
CONCEPT = "green"
KINDS = ("color",)


def _png_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--corrections", type=int, default=30)
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--finetune-lr", type=float, default=5e-4)
    parser.add_argument("--promote-epsilon", type=float, default=0.05)
    parser.add_argument("--replay-ratio", type=float, default=3.0, help="replayed pretraining samples per correction")
    parser.add_argument("--replay", choices=["shapes", "distill"], default="shapes",
                        help="shapes: generated pretraining data (REPLAY_SHAPES); distill: self-distillation")
    parser.add_argument("--val", type=int, default=100, help="held-out scenes per group")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    flush_denormals()  # before torch starts threads: subnormals made trained steps 2.7x slower
    torch.set_num_threads(args.threads)
    started = time.time()
    work = args.out or Path(tempfile.mkdtemp(prefix="loop-demo-"))
    # The CPU learning benchmark's model (benchmarks/learning_cpu.py, preset cpu-scratch: 64 px, towers 64 wide,
    # trained embeddings, no decoder dropout, a word-level vocabulary) without its pixel branch, alignment head, word
    # attention and position options (= small-film at 64 px), on scenes with objects of 12-25 % of the image.
    preset = bench_preset(64, pixel_channels=0, pixel_tokens=False, pixel_token_layers=0, pixel_stride=1,
                          pixel_coordinates=False, text_alignment=False, word_attention=False,
                          decoder_positions=False, relative_positions=False)
    size = preset.config.image_size
    shapes = dict(image_size=size, kinds=KINDS, min_radius=0.12, max_radius=0.25, min_objects=2, max_objects=4)

    # 1. a model that never heard the concept
    base_dir = work / "pretrain" / "last"
    if is_checkpoint(str(base_dir)):  # a second run in the same --out (the other replay) reuses the pretrained model
        model = load_model(base_dir, "cpu")
    else:
        tokenizer = word_level_tokenizer(phrase_words())
        model = load_model(build_random(preset, work / "init", 0, tokenizer), "cpu")
        cfg = TRAIN_PRESETS["improved"].replace(lr=1e-3, batch_size=args.batch_size, steps=args.pretrain_steps,
                                                warmup_fraction=0.03, log_every=25, seed=0)
        result = train(model, ShapesDataset(100_000, seed=1000, exclude_words={CONCEPT}, **shapes), None, cfg,
                       work / "pretrain", "cpu", progress=False)
        base_dir = result.last_checkpoint
    new_val = [s for s in ShapesDataset(args.val, seed=3000, require_words={CONCEPT}, **shapes)]
    old_val = [s for s in ShapesDataset(args.val, seed=4000, exclude_words={CONCEPT}, **shapes)]
    before = {"new": miou(model, new_val), "old": miou(model, old_val)}
    pretrain_s = time.time() - started
    log.info("pretrained in %.0f s: %s", pretrain_s, before)

    # 2. the real backend: embedded Redis, worker and scheduler
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MODEL": str(base_dir), "DATA_DIR": str(work / f"data-{args.replay}"),
           "REDIS_URL": "", "HF_HUB_OFFLINE": "1", "DEVICE": "cpu", "FINETUNE_EVERY": str(args.corrections),
           "FINETUNE_STEPS": str(args.finetune_steps), "FINETUNE_LR": str(args.finetune_lr),
           "REPLAY_RATIO": str(args.replay_ratio),
           "REPLAY_SHAPES": json.dumps({**shapes, "kinds": list(KINDS), "exclude_words": [CONCEPT]}),
           "REPLAY": args.replay,
           # what self-distillation asks the parent about: the old colours' phrases
           "DISTILL_PHRASES": ",".join(f"the {c} {n}" for c in ("red", "blue", "yellow", "orange", "purple", "pink")
                                       for n in ("shape", "object")),
           "PROMOTE_EPSILON": str(args.promote_epsilon), "LOG_LEVEL": "INFO"}
    server = ManagedProcess([sys.executable, "-m", "backend.cli", "serve", "--port", str(port)], env=env,
                            base_env={}, cwd=ROOT, log_path=work / f"serve-{args.replay}.log", health_url=f"{url}/health",
                            name="clipseg-serve")
    with server:
        while not requests.get(f"{url}/health", timeout=5).json()["ready"]:
            time.sleep(0.2)
        setup = {"project": "1.0", "schema": LABEL_CONFIG, "hostname": "http://localhost:8080", "access_token": "x"}
        base_version = requests.post(f"{url}/setup", json=setup, timeout=10).json()["model_version"]

        # 3. corrections of the new concept through the webhook, as Label Studio sends them
        sent = time.time()
        for i, sample in enumerate(ShapesDataset(args.corrections, seed=5000, require_words={CONCEPT}, **shapes)):
            w, h = sample.image.size
            result_items = [brush_region(sample.mask, "cat", f"r{i}"), textarea_region(sample.phrase, f"r{i}", w, h)]
            body = annotation_event(result_items, annotation_id=10_000 + i, task_id=i + 1, project_id=1,
                                    data={"image": _png_uri(sample.image)})
            assert requests.post(f"{url}/webhook", json=body, timeout=5).status_code == 201
        last_sent = time.time()  # the 30th correction: from here to the new version being served

        # 4. wait for the new version (the server hot-reloads it) or for the job to finish without one
        redis_url = f"unix://{work / f'data-{args.replay}' / 'redis' / 'redis.sock'}?db=0"
        cli_env = {**env, "REDIS_URL": redis_url}
        version, record = base_version, None
        while time.time() - sent < 1800:
            version = requests.post(f"{url}/setup", json=setup, timeout=10).json()["model_version"]
            listing = json.loads(subprocess.run([sys.executable, "-m", "backend.cli", "versions", "--json"],
                                                env=cli_env, cwd=ROOT, capture_output=True, text=True).stdout or "{}")
            done = [v for v in listing.get("versions", []) if v["status"] in ("promoted", "rejected", "inconclusive")]
            if done and (done[-1]["status"] != "promoted" or version == done[-1]["version"]):
                record = done[-1]
                break
            time.sleep(2)
        loop_s = time.time() - last_sent
    if record is None:
        raise SystemExit(f"no fine-tune finished; see {work}/serve-{args.replay}.log")
    tuned = load_model(record["path"], "cpu")
    after = {"new": miou(tuned, new_val), "old": miou(tuned, old_val)}
    threshold = record["metrics"].get("threshold", 0.5)
    at_threshold = {"new": miou(tuned, new_val, threshold), "old": miou(tuned, old_val, threshold)}
    summary = {"concept": CONCEPT, "corrections": args.corrections, "pretrain_steps": args.pretrain_steps,
               "finetune_steps": args.finetune_steps, "finetune_lr": args.finetune_lr,
               "version": record["version"], "status": record["status"], "reason": record["reason"],
               "served_version": version, "gate_metrics": record["metrics"],
               "replay": args.replay, "replay_ratio": args.replay_ratio,
               "miou_before": before, "miou_after": after, "threshold": threshold,
               "miou_after_at_threshold": at_threshold, "pretrain_seconds": round(pretrain_s),
               "load": [round(x, 2) for x in os.getloadavg()],
               "loop_seconds": round(loop_s), "total_seconds": round(time.time() - started), "out": str(work)}
    print(json.dumps(summary, indent=2))
    print(f"mIoU on '{CONCEPT}' (n={len(new_val)}): {before['new']:.3f} -> {after['new']:.3f}; on the old colours "
          f"(n={len(old_val)}): {before['old']:.3f} -> {after['old']:.3f}; version {record['version']} "
          f"{record['status']} ({record['reason']}); {loop_s:.0f} s from the 30th correction to the version served; "
          f"threshold {threshold:.2f}: green {at_threshold['new']:.3f}, old {at_threshold['old']:.3f}; "
          f"{summary['total_seconds'] / 60:.1f} min in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
