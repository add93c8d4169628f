"""`clipseg predict IMAGE "phrase" ... --out DIR`: try a model by hand; writes mask PNGs and an overlay.

`--exemplar EXAMPLE_IMAGE EXAMPLE_MASK` (repeatable) segments what the example regions show (a visual prompt);
with phrases as well, each phrase is mixed with the examples by `--visual-weight`."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
from PIL import Image

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230)]


def configure(parser: argparse.ArgumentParser, settings) -> None:
    """Arguments; defaults come from `settings` (MODEL, THRESHOLD, DEVICE, BF16)."""
    parser.add_argument("image", type=Path)
    parser.add_argument("phrases", nargs="*", help="one or more referring phrases (optional with --exemplar)")
    parser.add_argument("--exemplar", nargs=2, action="append", type=Path, metavar=("EXAMPLE_IMAGE", "EXAMPLE_MASK"),
                        help="an example image and its mask (non-zero pixels = the example); repeat for k-shot")
    parser.add_argument("--visual-weight", type=float, default=0.5,
                        help="weight of the examples when mixed with a phrase (0 = text only, 1 = examples only)")
    parser.add_argument("--model", default=settings.model, help=f"directory or hub id (default: MODEL or {settings.model})")
    parser.add_argument("--out", type=Path, default=Path("predictions"))
    parser.add_argument("--threshold", type=float, default=settings.mask_threshold)
    parser.add_argument("--device", default=settings.device)
    parser.add_argument("--bf16", action="store_true", default=settings.bf16)


def _slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-")[:40] or "prompt"


def overlay(image: Image.Image, masks: list[np.ndarray], alpha: float = 0.5) -> Image.Image:
    """Colour each (H, W) bool mask over `image` (RGB) with its own palette colour."""
    canvas = np.asarray(image, dtype=np.float32).copy()
    for i, mask in enumerate(masks):
        colour = np.array(PALETTE[i % len(PALETTE)], dtype=np.float32)
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * colour
    return Image.fromarray(canvas.clip(0, 255).astype(np.uint8))


def run(args: argparse.Namespace, settings) -> int:
    from clipseg_model.errors import ClipsegError
    from clipseg_model.image_io import to_display_rgb
    from clipseg_model.loading import load_model
    from clipseg_model.predictor import Segmenter

    try:
        image = to_display_rgb(Image.open(args.image))
    except (OSError, ValueError) as exc:
        raise ClipsegError(f"cannot read image {args.image}: {exc}") from exc
    if not args.phrases and not args.exemplar:
        raise ClipsegError("give at least one phrase or --exemplar EXAMPLE_IMAGE EXAMPLE_MASK")
    model = load_model(args.model, args.device)
    segmenter = Segmenter(model, threshold=args.threshold, bf16=args.bf16)
    if args.exemplar:
        predictions = _exemplar_predictions(segmenter, image, args)
    else:
        predictions = segmenter.predict(image, args.phrases)
    args.out.mkdir(parents=True, exist_ok=True)
    for i, pred in enumerate(predictions):
        path = args.out / f"mask_{i:02d}_{_slug(pred.prompt)}.png"
        Image.fromarray(pred.mask.astype(np.uint8) * 255, "L").save(path)
        print(f"{pred.prompt!r}: {int(pred.mask.sum())} px ({pred.mask.mean():.1%}), score {pred.score:.3f} -> {path}")
    overlay(image, [p.mask for p in predictions]).save(args.out / "overlay.png")
    print(f"overlay -> {args.out / 'overlay.png'} (model {model.version})")
    return 0


def _exemplar_predictions(segmenter, image: Image.Image, args: argparse.Namespace) -> list:
    """One prediction from the examples alone, or one per phrase mixed with them."""
    from clipseg_model.errors import ClipsegError
    from clipseg_model.exemplar_segmenter import ExemplarSegmenter
    from clipseg_model.image_io import to_display_rgb

    examples = []
    for example_path, mask_path in args.exemplar:
        try:
            example = to_display_rgb(Image.open(example_path))
            mask = np.asarray(Image.open(mask_path).convert("L")) > 0
        except (OSError, ValueError) as exc:
            raise ClipsegError(f"cannot read example {example_path} / {mask_path}: {exc}") from exc
        if mask.shape != (example.height, example.width) or not mask.any():
            raise ClipsegError(f"mask {mask_path} must be non-empty and the size of {example_path}")
        examples.append((example, mask))
    exemplar = ExemplarSegmenter(segmenter)
    if not args.phrases:
        return [exemplar.predict(image, examples, name="exemplar")]
    return [exemplar.predict(image, examples, text=p, visual_weight=args.visual_weight) for p in args.phrases]
