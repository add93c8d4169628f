"""Evaluation of a model on a `ReferringDataset`: metrics at each sample's ground-truth resolution, an optional
threshold sweep, per-sample rows and the first samples as grid rows."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from clipseg_model.segmenter_base import SegmentationModel
from finetune.metrics import MetricAccumulator, ThresholdSweep
from finetune.optimization import precision_policy
from finetune.report import GridRow
from finetune.samples import ReferringDataset, ReferringSample


@dataclass
class EvalResult:
    """Evaluation output.

    Attributes:
        metrics: n, mean_dice, pooled_dice, miou, oiou, prec@0.5..0.9 at `threshold` (see finetune.metrics).
        sweep: {threshold: metrics} for 0.1..0.9 when asked for, else None.
        rows: up to max_rows `GridRow`s for the HTML grid (first samples of the dataset).
        per_sample: per sample: its dataset index, phrase, ids (ref_id, sent_id, ... when the dataset has them),
            iou, dice and pixel counts.
    """

    metrics: dict[str, float]
    sweep: dict[float, dict[str, float]] | None = None
    rows: list[GridRow] = field(default_factory=list)
    per_sample: list[dict[str, Any]] = field(default_factory=list)


def spread_indices(total: int, n: int) -> list[int]:
    """`n` indices spread evenly over range(total) (all of them when n is 0 or >= total).

    RefCOCO loaders order samples by ref, and refs by image: the first N samples are a few images' objects, often
    all from one split-scheme corner (testA people); evenly spaced ones see the whole split.
    """
    if not n or n >= total:
        return list(range(total))
    return [(i * total) // n for i in range(n)]


def _eval_collate(samples: Sequence[ReferringSample], model: SegmentationModel | None) -> tuple[torch.Tensor | None, list[ReferringSample]]:
    return (model.preprocess([s.image for s in samples]) if model is not None else None), list(samples)


# Sample metadata copied into every per-sample row (RefCOCO loaders and the shapes generator set them).
PER_SAMPLE_META = ("ref_id", "sent_id", "ann_id", "image_id", "file_name", "dataset", "kind", "question_id")


@torch.no_grad()
def evaluate(model: SegmentationModel, dataset: ReferringDataset, batch_size: int = 16,
             device: str | torch.device | None = None, threshold: float = 0.5, sweep: bool = False,
             max_rows: int = 0, num_workers: int = 0, max_samples: int = 0,
             forward: Callable[[list[ReferringSample]], torch.Tensor] | None = None) -> EvalResult:
    """Metrics of `model` on `dataset` at each sample's ground-truth resolution.

    Logits (P, S_out, S_out) become probabilities that are bilinearly resized to the sample's (H, W), as the
    predictor does, then binarised at `threshold`. The model is left in the mode it was in. `max_samples` > 0
    evaluates that many samples spread evenly over the dataset (`spread_indices`). `forward` replaces the model
    call (samples → logits (B, S_out, S_out)), e.g. on cached frozen features; images are then not preprocessed.
    """
    device = torch.device(device) if device is not None else model.device
    indices = spread_indices(len(dataset), max_samples)
    accumulator = MetricAccumulator(threshold)
    sweeper = ThresholdSweep() if sweep else None
    rows: list[GridRow] = []
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=num_workers,
                        collate_fn=functools.partial(_eval_collate, model=None if forward else model))
    precision = precision_policy(device)
    index = 0
    per_sample: list[dict[str, Any]] = []
    try:
        for pixel_values, samples in loader:
            with precision.autocast():
                if forward is not None:
                    logits = forward(samples)
                else:
                    logits = model(pixel_values.to(device), [s.phrase for s in samples])  # (B, S_out, S_out)
            probs = torch.sigmoid(logits.float()).unsqueeze(1).cpu()  # (B, 1, S_out, S_out)
            for prob, sample in zip(probs, samples):
                h, w = sample.mask.shape
                full = F.interpolate(prob[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0].clamp_(0, 1)
                full_np = full.numpy()
                meta = sample.meta if isinstance(sample.meta, dict) else {}
                sample_id = meta.get("id", indices[index])
                (counts,) = accumulator.update(full_np, sample.mask, ids=[sample_id])
                # What a reader needs to find the sample again: its dataset index, the phrase, and the
                # dataset's own ids (RefCOCO: ref, sentence, annotation, image).
                per_sample.append({"index": indices[index], "phrase": sample.phrase,
                                   **{k: meta[k] for k in PER_SAMPLE_META if meta.get(k) is not None}})
                if sweeper is not None:
                    sweeper.update(full_np, sample.mask, ids=[sample_id])
                if len(rows) < max_rows:
                    rows.append(GridRow(sample.phrase, sample.image, full_np > threshold, sample.mask,
                                        note=f"IoU {counts.iou:.2f}"))
                index += 1
    finally:
        model.train(was_training)
    metrics = accumulator.compute()
    metrics["threshold"] = float(threshold)
    rows_out = [{**extra, **counts} for extra, counts in zip(per_sample, accumulator.per_sample())]
    return EvalResult(metrics, sweeper.compute() if sweeper else None, rows, rows_out)
