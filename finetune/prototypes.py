"""Per-label prototypes: each label's accepted corrections, embedded as visual prompts and averaged, mixed with the
label's phrase where the label's own corrections say it helps (issue 28, build 3).

A label's prototype is the mean visual embedding (`ExemplarSegmenter.embed`: the engineered crop of the region,
cached by content) of its latest corrections. The weight w it gets against the label's phrase ((1 - w) * phrase +
w * prototype) is chosen from evidence on those corrections alone, held out by image: each correction is predicted
from its phrase alone and from the phrase mixed with the prototype of the corrections on *other* images, at each of
`WEIGHTS`. The weight with the best mean IoU is kept only if it beats the phrase alone by `MIN_GAIN` on average, on
at least half of the corrections, and by the fine-tune gate's rule (`finetune.gate.paired_evidence`: the one-sided
lower bound of the paired difference > 0, at `CONFIDENCE` corrected for the weights tried); else w = 0, the phrase
alone, and nothing changes. Labels with corrections on fewer than `MIN_EXAMPLES` images get no prototype. So a
prototype never replaces a phrase that works, and a phrase that cannot work (a word the model never learnt, a part
number) gets the corrections' look instead.

The corrections are the exemplars (one home: `finetune.corrections`); what is derived from them is kept beside them,
so it survives restarts and every server and pre-label worker reads the same:

| key                     | type | content                                                                          |
|-------------------------|------|----------------------------------------------------------------------------------|
| `ns:corr:proto:{p}`     | hash | `{label}` -> JSON (phrase, examples, weight, evidence, basis, model version, ...) |
|                         |      | `{label}:emb` -> the prototype, (D,) float32 bytes (labels with >= MIN_EXAMPLES)  |

`basis` fingerprints what a record was computed from (the model version, phrase, threshold, engineering mode and
the corrections' ids, sequence numbers and images): a label is recomputed only when it changes.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from finetune.correction_types import CorrectionSample, mask_iou
from finetune.keyspace import NAMESPACE

log = logging.getLogger(__name__)

MIN_EXAMPLES = 3  # corrections a label needs before its prototype is tried (leave-one-out needs >= 2 others)
MAX_EXAMPLES = 24  # the label's latest corrections used (each costs 1 + len(WEIGHTS) decodes per refresh)
WEIGHTS = (0.25, 0.5, 0.75, 1.0)  # visual weights tried against the phrase alone (w = 0)
MIN_GAIN = 0.05  # mean held-out IoU a weight must add over the phrase alone to be used
CONFIDENCE = 0.9  # the fine-tune gate's: one-sided confidence that the best weight beats the phrase alone
PROTOTYPE_SUFFIX = "+proto."


@dataclass(frozen=True)
class LabelPrototype:
    """One label's prototype: `embedding` (D,) float32 (None below MIN_EXAMPLES), the `weight` chosen for it
    (0: the phrase alone), and the `evidence` it was chosen on (mean leave-one-out IoUs)."""

    project: str
    label: str
    phrase: str
    examples: int
    weight: float
    evidence: dict[str, Any]
    basis: str
    model_version: str
    updated: float
    embedding: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def applied(self) -> bool:
        return self.weight > 0 and self.embedding is not None

    def meta(self) -> dict[str, Any]:
        """The JSON-able part (no embedding), as stored and as `clipseg corrections` lists it."""
        return {"label": self.label, "phrase": self.phrase, "examples": self.examples, "weight": self.weight,
                "evidence": self.evidence, "basis": self.basis, "model_version": self.model_version,
                "updated": self.updated}

    def describe(self) -> str:
        """One line: examples, weight, evidence."""
        ev = self.evidence
        if "text" not in ev:
            return (f"prototype {self.label!r}: {self.examples} example(s), weight 0 ({ev.get('reason', '')}), "
                    f"version {self.model_version}")
        mixed = ", ".join(f"w={w} {v:.3f}" for w, v in ev.get("mixed", {}).items())
        return (f"prototype {self.label!r}: {self.examples} example(s), weight {self.weight:g}; leave-one-out IoU "
                f"phrase {self.phrase!r} alone {ev['text']:.3f}, {mixed}; version {self.model_version}")


def prototype_version(version: str, prototypes: Sequence[LabelPrototype]) -> str:
    """The version predictions made by `version` with the applied `prototypes` carry: "<version>+proto.<8 hex
    digits of the labels, phrases, weights and embeddings>", so stored predictions of another set are not taken for
    current; `version` itself when there are none."""
    if not prototypes:
        return version
    digest = hashlib.sha256()
    for p in sorted(prototypes, key=lambda p: p.label):
        digest.update(json.dumps([p.label, p.phrase, p.weight]).encode())
        if p.embedding is not None:
            digest.update(np.ascontiguousarray(p.embedding, dtype=np.float32).tobytes())
    return f"{version}{PROTOTYPE_SUFFIX}{digest.hexdigest()[:8]}"


def served_version(version: str) -> str:
    """The model version of a prediction's version: "v3+proto.1a2b3c4d" -> "v3" (others unchanged)."""
    return str(version).split(PROTOTYPE_SUFFIX)[0]


class PrototypeStore:
    """Prototype records of each project in Redis, beside the corrections (keys in the module docstring)."""

    def __init__(self, redis_conn: Any, namespace: str = NAMESPACE) -> None:
        self.conn = redis_conn
        self.ns = namespace

    def _key(self, project: str | int) -> str:
        return f"{self.ns}:corr:proto:{project}"

    def put(self, proto: LabelPrototype) -> None:
        mapping: dict[str, Any] = {proto.label: json.dumps(proto.meta())}
        with self.conn.pipeline(transaction=True) as pipe:
            if proto.embedding is not None:
                mapping[f"{proto.label}:emb"] = np.ascontiguousarray(proto.embedding, dtype=np.float32).tobytes()
            else:
                pipe.hdel(self._key(proto.project), f"{proto.label}:emb")
            pipe.hset(self._key(proto.project), mapping=mapping)
            pipe.execute()

    def delete(self, project: str | int, label: str) -> None:
        self.conn.hdel(self._key(project), label, f"{label}:emb")

    def all(self, project: str | int) -> dict[str, LabelPrototype]:
        """label -> LabelPrototype of `project` (one HGETALL)."""
        row = self.conn.hgetall(self._key(project))
        out: dict[str, LabelPrototype] = {}
        for raw_key, raw in row.items():
            key = raw_key.decode()
            if key.endswith(":emb") and key[:-4].encode() in row:
                continue
            meta = json.loads(raw)
            emb = row.get(f"{key}:emb".encode())
            out[key] = LabelPrototype(
                project=str(project), label=meta["label"], phrase=meta["phrase"], examples=int(meta["examples"]),
                weight=float(meta["weight"]), evidence=meta["evidence"], basis=meta["basis"],
                model_version=meta["model_version"], updated=float(meta["updated"]),
                embedding=np.frombuffer(emb, dtype=np.float32).copy() if emb is not None else None)
        return out


def latest_by_label(samples: Sequence[CorrectionSample], limit: int = MAX_EXAMPLES) -> dict[str, list[CorrectionSample]]:
    """label -> its latest `limit` samples (by ingest sequence), for labelled samples with a non-empty mask."""
    out: dict[str, list[CorrectionSample]] = {}
    for s in sorted(samples, key=lambda s: (s.seq, s.region)):
        if s.label and s.mask.any():
            out.setdefault(s.label, []).append(s)
    return {label: group[-limit:] for label, group in out.items()}


def basis_of(samples: Sequence[CorrectionSample], phrase: str, model_version: str, threshold: float, mode: str) -> str:
    """Fingerprint of what a label's prototype is computed from (see the module docstring)."""
    ids = [[s.task_id, s.annotation_id, s.region, s.seq, s.image_sha256] for s in samples]
    raw = json.dumps([model_version, phrase, round(float(threshold), 6), mode, MIN_EXAMPLES, list(WEIGHTS), MIN_GAIN,
                      CONFIDENCE, ids])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def choose_weight(text_ious: Sequence[float], mixed_ious: Mapping[float, Sequence[float]],
                  min_gain: float = MIN_GAIN) -> tuple[float, dict[str, Any]]:
    """The visual weight the held-out IoUs support (0: the phrase alone) and the evidence, as module docstring says.

    Args:
        text_ious: (n,) IoU of each held-out correction from the phrase alone.
        mixed_ious: weight -> (n,) IoUs of the same corrections from the phrase mixed with the others' prototype.
    """
    from finetune.gate import paired_evidence

    text = float(np.mean(text_ious))
    means = {w: float(np.mean(v)) for w, v in mixed_ious.items()}
    best = max(means, key=lambda w: (means[w], -w))  # ties: the smaller weight
    wins = int(sum(m > t for m, t in zip(mixed_ious[best], text_ious)))
    # The fine-tune gate's rule (paired per correction, one-sided t bound), at a confidence corrected for the
    # weights tried (Bonferroni): the best of several weights is not taken for better by chance.
    paired = paired_evidence(text_ious, mixed_ious[best], MIN_EXAMPLES, 1 - (1 - CONFIDENCE) / len(mixed_ious))
    gain = means[best] - text
    weight = best if gain >= min_gain and paired.better and 2 * wins >= len(text_ious) else 0.0
    bound = paired.bound if np.isfinite(paired.bound) else None
    evidence = {"held_out": "leave-one-image-out", "text": round(text, 4),
                "mixed": {f"{w:g}": round(v, 4) for w, v in sorted(means.items())},
                "best": f"{best:g}", "gain": round(gain, 4), "bound": None if bound is None else round(bound, 4),
                "confidence": round(paired.confidence, 4), "wins": wins, "n": len(text_ious)}
    return float(weight), evidence


def evaluate_label(exemplar, state, examples: Sequence[tuple[Any, np.ndarray]], phrase: str,
                   images: Sequence[str] | None = None,
                   weights: Sequence[float] = WEIGHTS) -> tuple[np.ndarray, float, dict[str, Any]]:
    """Prototype, chosen weight and evidence of one label from its `examples` ((PIL RGB image, (H, W) bool mask)
    pairs) with `exemplar` (a `clipseg_model.exemplar_segmenter.ExemplarSegmenter`) and trainable `state`.

    `images` (one id per example, e.g. the image's sha256; None: all different) hold out by image: a correction is
    predicted from the prototype of the corrections on *other* images only (the same image annotated twice would
    otherwise show the model its own answer). Returns ((D,) float32 mean embedding, weight, evidence); weight 0
    when fewer than MIN_EXAMPLES corrections could be held out."""
    import torch

    images = list(images) if images is not None else [str(i) for i in range(len(examples))]
    embeddings = exemplar.embed_examples(examples, state)  # (n, D)
    prototype = embeddings.mean(dim=0).numpy().astype(np.float32)
    if len(set(images)) < MIN_EXAMPLES:  # (an example can be held out when another image exists)
        return prototype, 0.0, {"reason": f"corrections on fewer than {MIN_EXAMPLES} images",
                                "n": len(examples) if len(set(images)) > 1 else 0}
    text_ious: list[float] = []
    mixed: dict[float, list[float]] = {float(w): [] for w in weights}
    for i, (image, mask) in enumerate(examples):
        rest = [j for j, other in enumerate(images) if other != images[i]]
        if not rest:
            continue
        text_ious.append(mask_iou(exemplar.segmenter.predict(image, [phrase], state)[0].mask, mask))
        others = embeddings[torch.tensor(rest)].mean(dim=0, keepdim=True)  # (1, D)
        for w in mixed:
            pred = exemplar.predict_embedding(image, others, phrase, w, state=state)
            mixed[w].append(mask_iou(pred.mask, mask))
    weight, evidence = choose_weight(text_ious, mixed)
    return prototype, weight, evidence


def refresh_prototypes(store, prototypes: PrototypeStore, exemplar, state, model_version: str, threshold: float,
                       project: str | int, phrase_of: Callable[[str], str]) -> dict[str, LabelPrototype]:
    """Bring `project`'s prototype records up to date with its corrections (`store`, a CorrectionStore) for the
    model `model_version` (decoded with `exemplar` and `state`): labels whose basis changed are recomputed, labels
    without corrections dropped. `phrase_of(label)` is the phrase a label-prompted request sends. Returns the
    records now stored, label -> LabelPrototype."""
    from PIL import Image

    project = str(project)
    known = prototypes.all(project)
    groups = latest_by_label(store.samples(project))
    for label in set(known) - set(groups):
        prototypes.delete(project, label)
    out: dict[str, LabelPrototype] = {}
    for label, group in sorted(groups.items()):
        phrase = phrase_of(label)
        basis = basis_of(group, phrase, model_version, threshold, exemplar.mode)
        old = known.get(label)
        if old is not None and old.basis == basis:
            out[label] = old
            continue
        started = time.perf_counter()
        if len(group) < MIN_EXAMPLES:
            proto = LabelPrototype(project, label, phrase, len(group), 0.0,
                                   {"reason": f"fewer than {MIN_EXAMPLES} corrections"}, basis, model_version,
                                   round(time.time(), 3))
        else:
            examples = [(Image.open(io.BytesIO(s.load_image())).convert("RGB"), s.mask) for s in group]
            embedding, weight, evidence = evaluate_label(exemplar, state, examples, phrase,
                                                         [s.image_sha256 for s in group])
            proto = LabelPrototype(project, label, phrase, len(group), weight, evidence, basis, model_version,
                                   round(time.time(), 3), embedding)
        prototypes.put(proto)
        out[label] = proto
        log.info("project %s %s (%.1f s)", project, proto.describe(), time.perf_counter() - started)
    return out
