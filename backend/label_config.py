"""Labeling config → what this backend can answer, and the text prompts for each task.

Label Studio sends the project's labeling config (XML) to /setup (`schema`) and /predict (`label_config`).
This module finds the Image object, the BrushLabels/PolygonLabels controls that target it, an optional
TextArea used for interactive prompts and the task data fields that may hold a referring phrase, and then
resolves, per task, which phrases to segment and which label each result gets.

Prompt resolution, first match wins:
1. text typed in an interactive TextArea: /predict's `params.context` is
   `{"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea", "value": {"text": ["cats"]}}, ...]}`;
2. a task data field: `prompt_field` (setting) or a `$field` referenced by a Text/Header/... tag in the config;
3. the labels themselves, each optionally mapped to a phrase (`label_prompts`, e.g. `person -> "a person"`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping, Sequence

from lxml import etree

from backend.settings import Settings

logger = logging.getLogger(__name__)

OutputKind = Literal["brush", "polygon"]
PromptSource = Literal["context", "field", "label"]

_CONTROL_TYPES = {"BrushLabels": "brushlabels", "PolygonLabels": "polygonlabels"}
# Tags whose `value="$key"` shows task text next to the image; any of them may hold the referring phrase.
_TEXT_TAGS = {"Text", "Header", "HyperText", "Paragraphs"}
# Context region types that carry a selected label in `value[<type>]`.
_LABEL_RESULT_TYPES = ("brushlabels", "polygonlabels", "labels", "rectanglelabels", "keypointlabels", "ellipselabels")


class UnsupportedConfigError(ValueError):
    """The labeling config has nothing this backend can answer (/setup answers 400 with the message)."""


@dataclass(frozen=True)
class LabelControl:
    """A BrushLabels or PolygonLabels control that targets the image.

    `labels` are the strings Label Studio stores in results (a Label's `alias` when set, else its `value`);
    `label_texts` maps each of them to the Label's human `value`, which is what a prompt should say.
    """

    from_name: str
    to_name: str
    type: str  # result type: "brushlabels" or "polygonlabels"
    labels: tuple[str, ...]
    label_texts: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def kind(self) -> OutputKind:
        return "brush" if self.type == "brushlabels" else "polygon"


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
class LabelConfig:
    """The parts of a labeling config this backend answers; build it with `parse_label_config`."""

    image_name: str  # the Image tag's name: the results' `to_name`
    image_key: str  # task data key of the image (`$image` -> "image")
    controls: tuple[LabelControl, ...]  # controls of the chosen output kind, config order
    all_controls: tuple[LabelControl, ...]  # every Brush/PolygonLabels control targeting the image
    output: OutputKind
    textareas: tuple[str, ...] = ()  # from_names of TextArea controls (interactive prompts)
    text_fields: tuple[str, ...] = ()  # data keys referenced by Text/Header/... tags, config order
    prompt_field: str = ""
    label_prompts: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def textarea(self) -> str | None:
        """from_name of the first TextArea, the one the prompt box usually is."""
        return self.textareas[0] if self.textareas else None

    @classmethod
    def from_settings(cls, config: str, settings: Settings) -> "LabelConfig":
        """`parse_label_config` with `polygon`, `prompt_field` and `label_prompts` from `settings`."""
        return parse_label_config(
            config,
            polygon=settings.polygon,
            prompt_field=settings.prompt_field,
            label_prompts=settings.label_prompts,
        )

    def image_ref(self, task: Mapping[str, Any]) -> str | None:
        """The task's image reference (URL, `/data/upload/...`, `s3://...`, `data:`), or None when missing."""
        value = (task.get("data") or {}).get(self.image_key)
        return value if isinstance(value, str) and value.strip() else None

    def prompts(self, task: Mapping[str, Any], context: Mapping[str, Any] | None = None) -> list[PromptRequest]:
        """Prompts for one task: typed context text, else a data field, else one prompt per label.

        Args:
            task: a Label Studio task (`{"id", "data": {...}, ...}`).
            context: /predict's `params.context` (None or `{}` outside interactive mode).
        Returns:
            PromptRequests in a stable order; empty only when the controls have no labels and nothing was typed.
        """
        context_items = _context_items(context)
        selected = self._selected_label(context_items)
        typed = self._typed_texts(context_items)
        if typed:
            return [self._free_text_request(text, selected, "context") for text in typed]
        phrases = self._field_texts(task)
        if phrases:
            return [self._free_text_request(text, selected, "field") for text in phrases]
        out = []
        for control in self.controls:
            for label in control.labels:
                out.append(PromptRequest(self._label_phrase(control, label), label, control, "label"))
        return out

    # -- helpers ---------------------------------------------------------------------------------------

    def _label_phrase(self, control: LabelControl, label: str) -> str:
        text = control.label_texts.get(label, label)
        for key in (label, text):
            if key in self.label_prompts and self.label_prompts[key].strip():
                return self.label_prompts[key].strip()
        return text

    def _free_text_request(
        self, text: str, selected: tuple[LabelControl, str] | None, source: PromptSource
    ) -> PromptRequest:
        if selected is not None:
            control, label = selected
        else:
            control, label = self._label_for_text(text)
        return PromptRequest(text, label, control, source)

    def _label_for_text(self, text: str) -> tuple[LabelControl, str]:
        """A label whose name or phrase equals the text (case-insensitive), else the first control's first label."""
        wanted = text.strip().lower()
        for control in self.controls:
            for label in control.labels:
                names = {label, control.label_texts.get(label, label), self.label_prompts.get(label, "")}
                if wanted in {n.strip().lower() for n in names if n}:
                    return control, label
        control = self.controls[0]
        # A control without <Label> children still needs a label string in the result.
        return control, control.labels[0] if control.labels else text

    def _selected_label(self, items: Sequence[Mapping[str, Any]]) -> tuple[LabelControl, str] | None:
        """The label picked in the labeling UI, when the context carries a labeled region."""
        by_name = {c.from_name: c for c in self.controls}
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
            for control in self.controls:
                if label in control.labels:
                    return control, label
        return None

    def _typed_texts(self, items: Sequence[Mapping[str, Any]]) -> list[str]:
        textareas = [i for i in items if i.get("type") == "textarea"]
        # Prefer the config's own TextAreas; accept any textarea item when names don't match (renamed config).
        own = [i for i in textareas if i.get("from_name") in self.textareas]
        return _texts(v for i in (own or textareas) for v in _as_list(_value(i).get("text")))

    def _field_texts(self, task: Mapping[str, Any]) -> list[str]:
        data = task.get("data") or {}
        keys = [self.prompt_field] if self.prompt_field else list(self.text_fields)
        for key in keys:
            texts = _texts(_as_list(data.get(key)))
            if texts:
                return texts
        return []


def parse_label_config(
    config: str,
    *,
    polygon: bool = False,
    prompt_field: str = "",
    label_prompts: Mapping[str, str] | None = None,
) -> LabelConfig:
    """Parse a labeling config (XML string) with label-studio-sdk's `LabelInterface`.

    Output kind: brush by default; polygons when the config has only PolygonLabels for the image, or when
    `polygon` is set and a PolygonLabels control exists.

    Raises:
        UnsupportedConfigError: invalid XML, no Image object, or no BrushLabels/PolygonLabels targeting one.
    """
    from label_studio_sdk.label_interface import LabelInterface

    if not config or not config.strip():
        raise UnsupportedConfigError("empty labeling config")
    try:
        interface = LabelInterface(config)
    except Exception as exc:  # the SDK raises several types for malformed XML
        raise UnsupportedConfigError(f"cannot parse the labeling config: {exc}") from exc

    images = {o.name: o for o in interface.objects if o.tag == "Image"}
    if not images:
        raise UnsupportedConfigError("the labeling config has no <Image> tag: this backend segments images")

    controls: list[LabelControl] = []
    for control in interface.controls:
        rtype = _CONTROL_TYPES.get(control.tag)
        if rtype is None:
            continue
        targets = [name for name in control.to_name if name in images]
        if not targets:
            continue
        label_texts = {key: tag.attr.get("value", key) for key, tag in (control.labels_attrs or {}).items()}
        controls.append(LabelControl(control.name, targets[0], rtype, tuple(control.labels), label_texts))
    if not controls:
        raise UnsupportedConfigError(
            "the labeling config has no <BrushLabels> or <PolygonLabels> control targeting an <Image> "
            f"(images: {', '.join(sorted(images))}); add one, e.g. "
            '<BrushLabels name="tag" toName="image"><Label value="person"/></BrushLabels>'
        )

    # Several images: answer the one the first usable control targets.
    image = images[controls[0].to_name]
    controls = [c for c in controls if c.to_name == image.name]
    if not image.value.startswith("$"):
        raise UnsupportedConfigError(f'<Image name="{image.name}"> has no $data key in value="{image.value}"')

    has_brush = any(c.kind == "brush" for c in controls)
    has_polygon = any(c.kind == "polygon" for c in controls)
    output: OutputKind = "polygon" if has_polygon and (polygon or not has_brush) else "brush"
    chosen = tuple(c for c in controls if c.kind == output)

    textareas = tuple(c.name for c in interface.controls if c.tag == "TextArea")
    text_fields = _text_fields(config, exclude={image.value_name})
    logger.debug(
        "label config: image=%s key=%s output=%s controls=%s textareas=%s text_fields=%s",
        image.name, image.value_name, output, [c.from_name for c in chosen], textareas, text_fields,
    )
    return LabelConfig(
        image_name=image.name,
        image_key=image.value_name,
        controls=chosen,
        all_controls=tuple(controls),
        output=output,
        textareas=textareas,
        text_fields=text_fields,
        prompt_field=prompt_field,
        label_prompts=dict(label_prompts or {}),
    )


def _text_fields(config: str, exclude: set[str]) -> tuple[str, ...]:
    """Data keys of `$key` values on text-showing tags. Read from the XML because the SDK skips <Header>."""
    try:
        root = etree.fromstring(config.encode("utf-8"), parser=etree.XMLParser(resolve_entities=False, no_network=True))
    except etree.XMLSyntaxError:
        return ()
    keys: list[str] = []
    for element in root.iter():
        if not isinstance(element.tag, str) or element.tag not in _TEXT_TAGS:
            continue
        value = element.get("value", "")
        # `$key` only: a literal Header ("Describe the object") is not a data reference.
        if value.startswith("$") and len(value) > 1 and " " not in value:
            key = value[1:]
            if key not in exclude and key not in keys:
                keys.append(key)
    return tuple(keys)


def _context_items(context: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    if not isinstance(context, Mapping):
        return []
    items = context.get("result") or []
    return [i for i in items if isinstance(i, Mapping)] if isinstance(items, list) else []


def _value(item: Mapping[str, Any]) -> Mapping[str, Any]:
    """A context item's `value` object; {} when it is missing or not an object (the context is client input)."""
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
