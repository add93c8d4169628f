"""`clipseg corrections --project P [--json] [--reprompt]`: what the model will learn from.

Lists every stored region of a project: task, annotation, label, the phrase it will be trained with (and where
that phrase came from), the mask's size and area, and the image's hash; then the project's exemplars and each
label's prototype (`finetune.prototypes`: examples, the weight mixed with the label's phrase, its evidence). Stored corrections keep the task data and
typed texts their phrases were resolved from, so after a change of PROMPT_FIELD or LABEL_PROMPTS the listing
shows, per region, the phrase the current settings would give (`now`), and `--reprompt` rewrites the stored
phrases with them. Re-prompting is explicit rather than automatic: a fine-tune's data should change only when
someone says so, and the listing shows beforehand what would change.
"""
from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from clipseg_model.errors import ClipsegError

if TYPE_CHECKING:  # imported where used: `clipseg --help` stays quick
    from backend.labelstudio.config import LabelConfigs
    from backend.labelstudio.prompts import PromptSettings
    from finetune.corrections import CorrectionStore


def configure(parser: argparse.ArgumentParser, settings) -> None:
    parser.add_argument("--project", required=True, help="Label Studio project id")
    parser.add_argument("--json", action="store_true", help="one JSON object per region instead of a table")
    parser.add_argument("--reprompt", action="store_true",
                        help="rewrite stored phrases with the current prompt settings (PROMPT_FIELD, LABEL_PROMPTS)")


def rows(store: "CorrectionStore", configs: "LabelConfigs", prompts: "PromptSettings", project: str) -> list[dict[str, Any]]:
    """One dict per stored region of `project`, with `now`: the (phrase, source) `prompts` (the current
    PROMPT_FIELD and LABEL_PROMPTS) give."""
    from backend.intake.ingest import project_label_config
    from backend.labelstudio.webhooks import reprompt

    xml = project_label_config(store, project)
    config = configs.for_project(project, xml) if xml else None
    out = []
    for ann in store.annotations(project):
        now = reprompt(ann.context, [r.get("key") for r in ann.regions], config, prompts) if ann.context else []
        for i, region in enumerate(ann.regions):
            current = now[i] if i < len(now) else None
            out.append({
                "task": ann.task_id, "annotation": ann.annotation_id, "region": i, "label": region.get("label"),
                "prompt": region.get("prompt"), "source": region.get("source"),
                "now": current[0] if current else None, "now_source": current[1] if current else None,
                "mask": "x".join(map(str, region.get("shape", []))), "area": region.get("area"),
                "image": ann.image_sha256, "seq": ann.seq,
            })
    return out


def run(args: argparse.Namespace, settings) -> int:
    from backend.labelstudio.config import LabelConfigs
    from backend.labelstudio.prompts import PromptSettings
    from finetune.commands import _redis
    from finetune.corrections import CorrectionStore
    from finetune.exemplars import ExemplarStore
    from finetune.prototypes import PrototypeStore

    store = CorrectionStore(_redis(settings), settings.namespace)
    project = str(args.project)
    prompts = PromptSettings.from_settings(settings)
    listing = rows(store, LabelConfigs(settings), prompts, project)
    exemplars = ExemplarStore(store.conn, store.ns).list(project)
    prototypes = PrototypeStore(store.conn, store.ns).all(project)
    if not listing and not exemplars:
        if project not in store.projects():
            raise ClipsegError(f"project {project} has no stored corrections (projects with some: "
                               f"{', '.join(store.projects()) or 'none'})")
    if args.reprompt:
        changed = _reprompt(store, project, listing)
        listing = rows(store, LabelConfigs(settings), prompts, project)
        print(f"re-prompted {changed} region(s) of project {project}")
    if args.json:
        for row in listing:
            print(json.dumps(row))
        for ex in exemplars:
            print(json.dumps({"exemplar": ex["name"], **{k: v for k, v in ex.items() if k != "name"}}))
        for label, proto in sorted(prototypes.items()):
            print(json.dumps({"prototype": label, **{k: v for k, v in proto.meta().items() if k != "label"}}))
        return 0
    header = f"{'task':>6} {'ann':>6} {'#':>2} {'label':<12} {'mask':>9} {'area':>7} {'image':<12} prompt (source)"
    print(header)
    stale = 0
    for r in listing:
        line = (f"{r['task']:>6} {r['annotation']:>6} {r['region']:>2} {str(r['label'])[:12]:<12} {r['mask']:>9} "
                f"{r['area'] if r['area'] is not None else '-':>7} {r['image'][:12]:<12} {r['prompt']!r} ({r['source']})")
        if r["now"] is not None and r["now"] != r["prompt"]:
            stale += 1
            line += f"  -> now {r['now']!r} ({r['now_source']})"
        print(line)
    print(f"{len(listing)} region(s) in {len({(r['task'], r['annotation']) for r in listing})} correction(s)")
    if stale:
        print(f"{stale} region(s) would get another phrase with the current settings: "
              f"`clipseg corrections --project {project} --reprompt` rewrites them")
    for ex in exemplars:
        print(f"exemplar {ex['name']}: label {ex['label']!r}, {ex['area']} pixels of {ex['shape'][1]}x{ex['shape'][0]}, "
              f"from {ex['origin']}")
    for _, proto in sorted(prototypes.items()):  # each label's corrections as its visual prompt (finetune.prototypes)
        print(proto.describe())
    return 0


def _reprompt(store, project: str, listing: list[dict[str, Any]]) -> int:
    by_ann: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for row in listing:
        by_ann.setdefault((row["task"], row["annotation"]), []).append(row)
    changed = 0
    for (task, ann), regions in by_ann.items():
        new = [r["now"] if r["now"] is not None else r["prompt"] for r in regions]
        n = sum(1 for r, p in zip(regions, new) if p != r["prompt"])
        if n and store.set_prompts(project, task, ann, new):
            changed += n
    return changed
