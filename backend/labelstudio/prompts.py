"""The one prompt rule: which phrase a region is about, for /predict and for stored corrections alike.

A phrase comes from the first of these that gives one:
1. text typed for the region itself: a per-region TextArea result item with the region's id (corrections only:
   at /predict time the region does not exist yet);
1b. the phrase the region was predicted for, when it is a suggestion or prediction of ours the annotator accepted
   (corrections only): every result item /predict writes carries it in `meta` (`origin_meta`), Label Studio's
   editor keeps a result item's `meta` when the item becomes part of an annotation, and it counts while the region
   keeps the label it was predicted with (a relabelled region is about something else);
2. text typed in a TextArea of the config, for the whole task: /predict's `params.context.result` textarea items,
   or the annotation's textarea items not bound to a region;
3. a task data field: `PROMPT_FIELD` when set, else the first `$field` the config shows with Text/Header/...;
4. the label itself: `LABEL_PROMPTS` maps a label (its stored value or its human value) to a phrase, else the
   label's human `value`.

Steps 2 and 3 may give several phrases (a list field, several typed lines); /predict segments each one and picks
a label for it (the label selected in the editor, else the label whose name or phrase is the text, else the
first). A stored region has a label already, so it takes the phrase whose label is its own (else the first):
the phrase /predict used for that region. `tests/test_prompt_rule.py` checks both paths agree for every source.

The rule reads two inputs: the project's `LabelConfig` (what the config shows: controls, TextAreas, `$field`s; None
when no config is known, which the rule reads as a config showing none of them) and `PromptSettings` (PROMPT_FIELD,
LABEL_PROMPTS: the only settings it takes, given by each caller: /predict, ingest, re-prompting, pre-labelling).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping, Sequence

from backend.labelstudio.config import LabelConfig, LabelControl
from backend.settings import Settings

PromptSource = Literal["region_text", "suggestion", "typed", "field", "label"]
_ORIGIN_PROMPT, _ORIGIN_LABEL = "prompt", "prompt_label"  # keys of a result item's `meta` (rule step 1b)

# Context region types that carry a selected label in `value[<type>]`.
_LABEL_RESULT_TYPES = ("brushlabels", "polygonlabels", "labels", "rectanglelabels", "keypointlabels", "ellipselabels")
SHAPE_TYPES = frozenset({"brushlabels", "brush", "polygonlabels", "polygon"})


@dataclass(frozen=True)
class PromptRequest:
    """One phrase to segment in one task's image, and where to put the answer.

    `text` goes to the model; `label` is the label value written into the result item of `control`.
    """

    text: str
    label: str
    control: LabelControl
    source: PromptSource = "label"


@dataclass(frozen=True)
class PromptSettings:
    """The prompt rule's settings: `prompt_field` (PROMPT_FIELD: the task data field holding the phrase; "" = the
    config's `$field`s) and `label_prompts` (LABEL_PROMPTS: label, stored or human value -> phrase)."""

    prompt_field: str = ""
    label_prompts: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "label_prompts", dict(self.label_prompts or {}))

    @classmethod
    def from_settings(cls, settings: Settings) -> "PromptSettings":
        """PROMPT_FIELD and LABEL_PROMPTS of `settings` (a server's, or a pre-label run's queuer's)."""
        return cls(settings.prompt_field, settings.label_prompts)


# ---- /predict ----------------------------------------------------------------------------------------------


def predict_prompts(config: LabelConfig, settings: PromptSettings, task: Mapping[str, Any],
                    context: Mapping[str, Any] | None = None) -> list[PromptRequest]:
    """Prompts /predict segments for one task (rule steps 2-4), in a stable order.

    Args:
        config: the project's parsed labeling config.
        settings: PROMPT_FIELD and LABEL_PROMPTS.
        task: a Label Studio task (`{"id", "data": {...}, ...}`).
        context: /predict's `params.context` (None or `{}` outside interactive mode).
    Returns:
        PromptRequests; empty only when the controls have no labels and nothing was typed.
    """
    items = _result_items(context)
    selected = _selected_label(config, items)
    for source, texts in (("typed", _typed_texts(config, items)), ("field", field_texts(config, settings, task))):
        if texts:
            out = []
            for text in texts:
                control, label = selected if selected is not None else label_for_text(config, settings, text)
                out.append(PromptRequest(text, label, control, source))  # type: ignore[arg-type]
            return out
    return [PromptRequest(label_phrase(settings, control, label), label, control, "label")
            for control in config.controls for label in control.labels]


def origin_meta(request: PromptRequest) -> dict[str, str]:
    """The `meta` of a result item /predict makes for `request`: the phrase and label it was predicted for (rule
    step 1b), e.g. `{"prompt": "the red circle", "prompt_label": "circle"}`."""
    return {_ORIGIN_PROMPT: request.text, _ORIGIN_LABEL: request.label}


# ---- stored corrections ----------------------------------------------------------------------------------------


def region_prompt(config: LabelConfig | None, settings: PromptSettings, task: Mapping[str, Any],
                  result: Sequence[Mapping[str, Any]], region: Mapping[str, Any]) -> tuple[str, PromptSource] | None:
    """The phrase a stored region is trained with (rule steps 1-4), and its source; None when nothing gives one.

    Args:
        config: the project's labeling config, or None when unknown (a config showing no controls, TextAreas or
            `$field`s: any TextArea counts as typed text, only PROMPT_FIELD names a field).
        settings: PROMPT_FIELD and LABEL_PROMPTS.
        task: the task the annotation belongs to (`data` is read).
        result: the annotation's whole `result` list (textarea items are read from it).
        region: the brush/polygon result item.
    """
    shape_ids = {r.get("id") for r in result if r.get("type") in SHAPE_TYPES}
    own = [r for r in result if r.get("type") == "textarea" and r.get("id") == region.get("id")]
    text = " ".join(_texts(v for r in own for v in _as_list(_value(r).get("text"))))
    if text:
        return text, "region_text"
    label = _region_label(region)
    origin = _origin(region, label)
    if origin:
        return origin, "suggestion"
    whole = [r for r in result if r.get("type") == "textarea" and r.get("id") not in shape_ids]
    for source, texts in (("typed", _typed_texts(config, whole)), ("field", field_texts(config, settings, task))):
        if texts:
            return _text_for_label(config, settings, texts, label), source  # type: ignore[return-value]
    if label is None:
        return None
    controls = config.all_controls if config is not None else ()
    control = (next((c for c in controls if c.from_name == region.get("from_name")), None)
               or next((c for c in controls if label in c.labels), None))
    return label_phrase(settings, control, label), "label"


def _origin(region: Mapping[str, Any], label: str | None) -> str | None:
    """Rule step 1b: the phrase in the region's `meta` while the region has the label it was predicted with."""
    meta = region.get("meta")
    if not isinstance(meta, Mapping) or label is None or meta.get(_ORIGIN_LABEL) != label:
        return None
    text = meta.get(_ORIGIN_PROMPT)
    return text.strip() if isinstance(text, str) and text.strip() else None


def _text_for_label(config: LabelConfig | None, settings: PromptSettings, texts: Sequence[str],
                    label: str | None) -> str:
    """Of several phrases, the one /predict would have given `label` (else the first)."""
    if label is not None and len(texts) > 1 and config is not None and config.controls:
        for text in texts:
            if label_for_text(config, settings, text)[1] == label:
                return text
    return texts[0]


def _region_label(region: Mapping[str, Any]) -> str | None:
    labels = _value(region).get(region.get("type")) or []
    labels = labels if isinstance(labels, list) else [labels]
    return str(labels[0]) if labels and isinstance(labels[0], (str, int, float)) else None


# ---- pieces of the rule ----------------------------------------------------------------------------------------


def label_phrase(settings: PromptSettings, control: LabelControl | None, label: str) -> str:
    """Rule step 4: LABEL_PROMPTS for the label (stored value or human value), else the label's human value (the
    label itself when no control of the config has it)."""
    text = control.label_texts.get(label, label) if control is not None else label
    for key in (label, text):
        if settings.label_prompts.get(key, "").strip():
            return settings.label_prompts[key].strip()
    return text


def label_for_text(config: LabelConfig, settings: PromptSettings, text: str) -> tuple[LabelControl, str]:
    """A label whose name or phrase equals the text (case-insensitive), else the first control's first label."""
    wanted = text.strip().lower()
    for control in config.controls:
        for label in control.labels:
            names = {label, control.label_texts.get(label, label), settings.label_prompts.get(label, "")}
            if wanted in {n.strip().lower() for n in names if n}:
                return control, label
    control = config.controls[0]
    # A control without <Label> children still needs a label string in the result.
    return control, control.labels[0] if control.labels else text


def field_texts(config: LabelConfig | None, settings: PromptSettings, task: Mapping[str, Any]) -> list[str]:
    """Rule step 3: phrases in the task data field (PROMPT_FIELD, else the first `$field` shown that has one)."""
    data = task.get("data") or {}
    if not isinstance(data, Mapping):
        return []
    shown = config.text_fields if config is not None else ()
    keys = [settings.prompt_field] if settings.prompt_field else list(shown)
    for key in keys:
        texts = _texts(_as_list(data.get(key)))
        if texts:
            return texts
    return []


def _typed_texts(config: LabelConfig | None, items: Sequence[Mapping[str, Any]]) -> list[str]:
    """Rule step 2: the most recent typed line; the config's own TextAreas first, any when names don't match."""
    textareas = [i for i in items if i.get("type") == "textarea"]
    own = [i for i in textareas if config is not None and i.get("from_name") in config.textareas]
    return _latest_line(own or textareas)


def _latest_line(textareas: Sequence[Mapping[str, Any]]) -> list[str]:
    """The last non-empty line of the textarea items, alone (or []): Label Studio's editor restores an unsubmitted
    draft, so a TextArea can hold older lines first and the phrase just typed last (1.23.2); older lines are never
    prompts, even when the newest repeats one of them."""
    lines = [v.strip() for i in textareas for v in _as_list(_value(i).get("text")) if isinstance(v, str) and v.strip()]
    return lines[-1:]


def _selected_label(config: LabelConfig, items: Sequence[Mapping[str, Any]]) -> tuple[LabelControl, str] | None:
    """The label picked in the labeling UI, when /predict's context carries a labeled region."""
    by_name = {c.from_name: c for c in config.controls}
    for item in items:
        rtype = item.get("type")
        if rtype not in _LABEL_RESULT_TYPES:
            continue
        values = _value(item).get(rtype) or []
        if not isinstance(values, list) or not values or not isinstance(values[0], str):
            continue
        label = values[0]
        from_name = item.get("from_name")
        control = by_name.get(from_name) if isinstance(from_name, str) else None
        if control is not None and (label in control.labels or not control.labels):
            return control, label
        for control in config.controls:
            if label in control.labels:
                return control, label
    return None


def _result_items(context: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    if not isinstance(context, Mapping):
        return []
    items = context.get("result") or []
    return [i for i in items if isinstance(i, Mapping)] if isinstance(items, list) else []


def _value(item: Mapping[str, Any]) -> Mapping[str, Any]:
    """A result item's `value` object; {} when it is missing or not an object (client input)."""
    value = item.get("value")
    return value if isinstance(value, Mapping) else {}


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _texts(values: Iterable[Any]) -> list[str]:
    """Non-empty stripped strings, duplicates dropped, order kept."""
    out: list[str] = []
    for value in values:
        if isinstance(value, str) and value.strip() and value.strip() not in out:
            out.append(value.strip())
    return out
