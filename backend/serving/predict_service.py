"""/predict: Label Studio tasks → images and prompts → masks → result items, one answer per task, in order.

A task whose image cannot be fetched or decoded gets an empty result (and a logged error and a metric); the other
tasks of the request are still answered.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import torch

from backend.images import FetchedImage, ImageFetchError, ImageFetcher
from backend.labelstudio.config import LabelConfig
from backend.labelstudio.image_refs import task_image_ref
from backend.labelstudio.interactive import ContextRegion, context_regions
from backend.labelstudio.prompts import (PromptRequest, PromptSettings, label_for_text, label_phrase, origin_meta,
                                         predict_prompts)
from backend.labelstudio.protocol import prediction_json
from backend.metrics import BackendMetrics
from backend.serving.visual_prompts import VisualPrompts
from backend.labelstudio.results import mask_to_results
from clipseg_model.predictor import MaskPrediction, Segmenter
from finetune.exemplars import Exemplar

log = logging.getLogger(__name__)

IMAGES_PER_PASS = 8  # images decoded and segmented together; bounds memory for big requests


@dataclass
class TaskAnswer:
    result: list[dict[str, Any]]
    score: float
    error: str | None = None
    predictions: list[tuple[PromptRequest, MaskPrediction]] | None = None

    def to_json(self, version: str) -> dict[str, Any]:
        return prediction_json(self.result, self.score, version)


class PredictService:
    """Turns a batch of tasks into Label Studio predictions with a `Segmenter`."""

    def __init__(self, fetcher: ImageFetcher, metrics: BackendMetrics, polygon_tolerance: float = 1.0, download_threads: int = 8,
                 on_prediction: Callable[[str | None, Mapping[str, Any], Sequence[tuple[PromptRequest, MaskPrediction]], str], None] | None = None):
        self.fetcher = fetcher
        self.metrics = metrics
        self.polygon_tolerance = polygon_tolerance
        self.on_prediction = on_prediction
        self.visual_prompts = VisualPrompts()
        self._pool = ThreadPoolExecutor(download_threads, thread_name_prefix="image-fetch")
        # Regions are encoded (brush RLE / polygons) in parallel: numpy releases the GIL for most of the work, and a
        # 4-region answer of noisy 640x480 masks takes 27 instead of 36 ms on 2 cores.
        self._encoders = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="region-encode")

    def _fetch(self, config: LabelConfig, task: Mapping[str, Any], decode: bool = True) -> FetchedImage | ImageFetchError | None:
        ref = task_image_ref(task, config)
        if ref is None:
            return ImageFetchError(f"task has no '{config.image_key}' field", 400)
        try:
            if not decode:
                self.fetcher.fetch_bytes(ref, task.get("id"))
                return None
            return self.fetcher.fetch(ref, task.get("id"))
        except ImageFetchError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - one task's failure never breaks the request
            log.exception("unexpected error fetching the image of task %s", task.get("id"))
            return ImageFetchError(f"unexpected error: {type(exc).__name__}", 500)

    def download(self, config: LabelConfig, task: Mapping[str, Any]) -> ImageFetchError | None:
        """Fetch the task's image bytes into the fetcher's cache ahead of `answer` (which decodes them from there);
        the error that task's answer would carry, or None."""
        return self._fetch(config, task, decode=False)

    def answer(self, segmenter: Segmenter, config: LabelConfig, prompts: PromptSettings,
               tasks: Sequence[Mapping[str, Any]], context: Mapping[str, Any] | None,
               project: str | None = None, exemplars: Sequence[Exemplar] = ()) -> list[TaskAnswer]:
        """One TaskAnswer per task, in order; phrases by the prompt rule with `config` and `prompts`. With
        `exemplars` (stored example regions, `clipseg prelabel --exemplar`), every task is answered with everything
        like them instead of the phrases: one region per label, each from that label's own examples (averaged where
        a label has several), labelled with it."""
        by_label: dict[str, list[Exemplar]] = {}
        for ex in exemplars:
            by_label.setdefault(ex.label, []).append(ex)
        answers: list[TaskAnswer | None] = [None] * len(tasks)
        version = segmenter.version
        for start in range(0, len(tasks), IMAGES_PER_PASS):
            chunk = list(range(start, min(start + IMAGES_PER_PASS, len(tasks))))
            fetched = list(self._pool.map(lambda i: self._fetch(config, tasks[i]), chunk))
            ok: list[tuple[int, FetchedImage, list[PromptRequest]]] = []
            for i, item in zip(chunk, fetched):
                if isinstance(item, ImageFetchError):
                    log.error("task %s: no prediction: %s", tasks[i].get("id"), item)
                    self.metrics.errors.labels("image").inc()
                    self.metrics.tasks.labels("error").inc()
                    answers[i] = TaskAnswer([], 0.0, str(item))
                    continue
                requests = [p for p in predict_prompts(config, prompts, tasks[i], context) if p.text.strip()]
                ok.append((i, item, requests))
            # Example regions drawn with a smart tool make it a visual prompt (interactive requests: one task).
            regions_of = {i: context_regions(context, image.width, image.height) for i, image, _ in ok} if context else {}
            visual = {i: regions for i, regions in regions_of.items() if any(r.positive for r in regions)}
            if exemplars:
                visual = {i: regions_of.get(i, []) for i, _, _ in ok}
            batched = [(i, image, requests) for i, image, requests in ok if i not in visual]
            # Label-prompted requests of a label with a prototype (`backend.serving.prototypes`) are decoded from
            # the phrase mixed with it; the others in one batch, as before.
            results = segmenter.predict_batch([f.image for _, f, _ in batched],
                                              [[p.text for p in ps if not self._prototype(segmenter, p)]
                                               for _, _, ps in batched]) if batched else []
            for i, image, requests in ok:
                if i in visual:
                    try:
                        if len(by_label) > 1:  # one region per label, from its own examples
                            pairs = [self._visual(segmenter, config, prompts, image, visual[i], requests, group)
                                     for group in by_label.values()]
                            requests = [r for rs, _ in pairs for r in rs]
                            preds = [p for _, ps in pairs for p in ps]
                        else:
                            requests, preds = self._visual(segmenter, config, prompts, image, visual[i], requests,
                                                           exemplars)
                    except NotImplementedError as exc:  # a model that cannot take visual prompts: its text answer
                        log.warning("task %s: visual prompt ignored: %s", tasks[i].get("id"), exc)
                        preds = segmenter.predict_batch([image.image], [[p.text for p in requests]])[0]
                else:
                    preds = self._with_prototypes(segmenter, image, requests, results.pop(0))
                answers[i] = self._to_answer(image, requests, preds, config)
                self.metrics.tasks.labels("ok").inc()
                if self.on_prediction is not None and requests:
                    try:
                        self.on_prediction(project, tasks[i], list(zip(requests, preds)), version)
                    except Exception as exc:  # noqa: BLE001 - the review signal is best effort
                        log.warning("could not record the prediction of task %s: %s", tasks[i].get("id"), exc)
        return [a if a is not None else TaskAnswer([], 0.0) for a in answers]

    @staticmethod
    def _prototype(segmenter: Segmenter, request: PromptRequest):
        find = getattr(segmenter, "prototype_for", None)  # a PrototypedSegmenter: a project with label prototypes
        return find(request) if find is not None else None

    def _with_prototypes(self, segmenter: Segmenter, image: FetchedImage, requests: Sequence[PromptRequest],
                         text_preds: Sequence[MaskPrediction]) -> list[MaskPrediction]:
        """One prediction per request, in order: `text_preds` for the requests without a prototype, the phrase
        mixed with its label's prototype for the others."""
        plain = iter(text_preds)
        out = []
        for request in requests:
            proto = self._prototype(segmenter, request)
            if proto is None:
                out.append(next(plain))
                continue
            exemplar = self.visual_prompts.exemplar(segmenter.segmenter)  # type: ignore[attr-defined]
            visual = torch.from_numpy(proto.embedding).reshape(1, -1)  # (1, D)
            pred = exemplar.predict_embedding(image.image, visual, request.text, proto.weight,
                                              state=segmenter.state)  # type: ignore[attr-defined]
            out.append(replace(pred, prompt=request.text))
        return out

    def _visual(self, segmenter: Segmenter, config: LabelConfig, settings: PromptSettings, image: FetchedImage,
                regions: Sequence[ContextRegion], prompts: Sequence[PromptRequest], exemplars: Sequence[Exemplar] = (),
                ) -> tuple[list[PromptRequest], list[MaskPrediction]]:
        """The answer to a visual prompt (`backend.serving.visual_prompts`): one region, labelled with the examples'
        label (else as the phrase would be), for the typed phrase mixed in when there is one. The request's phrase
        (the typed one, else the label's) is what a correction of this region is trained with."""
        typed = next((p.text for p in prompts if p.source == "typed"), None)
        example_label = exemplars[0].label if exemplars else next(r for r in regions if r.positive).label
        control, label = label_for_text(config, settings, example_label or (typed or ""))
        similar = any(r.from_name in config.similar_tools for r in regions if r.positive)
        examples = [(ex.image, ex.mask) for ex in exemplars]
        pred = self.visual_prompts.predict(segmenter, image.image, regions, typed, similar, examples)
        text = typed or label_phrase(settings, control, label)
        return [PromptRequest(text, label, control, "typed" if typed else "label")], [replace(pred, prompt=text)]

    def _to_answer(self, image: FetchedImage, prompts: Sequence[PromptRequest], preds: Sequence[MaskPrediction],
                   config: LabelConfig) -> TaskAnswer:
        items: list[dict[str, Any]] = []
        scores = []

        def encode(pair: tuple[PromptRequest, MaskPrediction]) -> list[dict[str, Any]]:
            request, pred = pair
            return mask_to_results(
                pred.mask, kind=request.control.type, from_name=request.control.from_name,
                to_name=request.control.to_name, label=request.label, score=pred.score,
                tolerance=self.polygon_tolerance,
            )

        pairs = list(zip(prompts, preds))
        regions = list(self._encoders.map(encode, pairs)) if len(pairs) > 1 else [encode(p) for p in pairs]
        for (request, pred), region in zip(pairs, regions):
            for item in region:
                item["original_width"], item["original_height"] = image.width, image.height
                item["meta"] = origin_meta(request)
            items.extend(region)
            scores.append(pred.score)
        self.metrics.regions.inc(len(items))
        # The task score is the least certain region's: "sort by prediction score" then puts the tasks most in need
        # of review first.
        return TaskAnswer(items, float(min(scores)) if scores else 0.0, predictions=list(zip(prompts, preds)))

