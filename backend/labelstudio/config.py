"""Labeling config → what this backend can answer.

Label Studio sends the project's labeling config (XML) to /setup (`schema`), /predict (`label_config`) and in every
webhook (`project.label_config`). This module finds the Image object, the BrushLabels/PolygonLabels controls that
target it, the TextAreas (typed prompts) and the task data fields shown next to the image (`$field` on
Text/Header/...), which may hold a referring phrase. Which phrase a region is about is decided in one place,
`backend.labelstudio.prompts` (which imports this module; this one never imports it), with the prompt settings
(PROMPT_FIELD, LABEL_PROMPTS) its callers give it: a `LabelConfig` says what the config shows, nothing else.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from lxml import etree

from backend.settings import Settings

logger = logging.getLogger(__name__)

OutputKind = Literal["brush", "polygon"]

_CONTROL_TYPES = {"BrushLabels": "brushlabels", "PolygonLabels": "polygonlabels"}
# Tags whose `value="$key"` shows task text next to the image; any of them may hold the referring phrase.
_TEXT_TAGS = {"Text", "Header", "HyperText", "Paragraphs"}


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
class LabelConfig:
    """The parts of a labeling config this backend answers; build it with `parse_label_config`."""

    image_name: str  # the Image tag's name: the results' `to_name`
    image_key: str  # task data key of the image (`$image` -> "image")
    controls: tuple[LabelControl, ...]  # controls of the chosen output kind, config order
    all_controls: tuple[LabelControl, ...]  # every Brush/PolygonLabels control targeting the image
    output: OutputKind
    textareas: tuple[str, ...] = ()  # from_names of TextArea controls (interactive prompts)
    text_fields: tuple[str, ...] = ()  # data keys referenced by Text/Header/... tags, config order
    similar_tools: tuple[str, ...] = ()  # from_names of smart controls marked similar="true": "more like this"

    @property
    def textarea(self) -> str | None:
        """from_name of the first TextArea, the one the prompt box usually is."""
        return self.textareas[0] if self.textareas else None

    @classmethod
    def from_settings(cls, config: str, settings: Settings) -> "LabelConfig":
        """`parse_label_config` with `polygon` (POLYGONS: which controls answer) from `settings`."""
        return parse_label_config(config, polygon=settings.polygon)

    def image_ref(self, task: Mapping[str, Any]) -> str | None:
        """The task's image reference (URL, `/data/upload/...`, `s3://...`, `data:`), or None when missing."""
        value = (task.get("data") or {}).get(self.image_key)
        return value if isinstance(value, str) and value.strip() else None


def parse_label_config(config: str, *, polygon: bool = False) -> LabelConfig:
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
    # A visual-prompt tool (a smart RectangleLabels/KeyPointLabels/BrushLabels) marked similar="true" asks for
    # every object like the example, not only the one it marks (Label Studio keeps unknown attributes).
    similar_tools = tuple(c.name for c in interface.controls
                          if str((getattr(c, "attr", None) or {}).get("similar", "")).lower() in ("true", "1", "yes"))
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
        similar_tools=similar_tools,
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


class LabelConfigs:
    """Parsed labeling configs of this process: cached by XML, and the latest one seen per project.

    A project's config arrives with /setup, with /predict (`label_config`) and in every webhook
    (`project.label_config`); whichever came last is the project's.
    """

    def __init__(self, settings: Settings, max_cached: int = 256):
        self.settings = settings
        self.max_cached = max_cached
        self._parsed: dict[str, LabelConfig] = {}
        self._by_project: dict[str, LabelConfig] = {}
        self._lock = threading.Lock()

    def parse(self, xml: str) -> LabelConfig:
        """Parse (cached) with this process's settings; raises UnsupportedConfigError."""
        parsed = self._parsed.get(xml)
        if parsed is None:
            parsed = LabelConfig.from_settings(xml, self.settings)
            with self._lock:
                if len(self._parsed) >= self.max_cached:
                    self._parsed.clear()
                self._parsed[xml] = parsed
        return parsed

    def remember(self, project: str | None, config: LabelConfig) -> None:
        if project:
            with self._lock:
                self._by_project[project] = config

    def for_project(self, project: str | None, xml: str | None = None) -> LabelConfig | None:
        """The project's config: parsed from `xml` when given (and remembered), else the last one seen; None when
        neither is known or the config is not one this backend answers."""
        if xml:
            try:
                config = self.parse(xml)
            except UnsupportedConfigError as exc:
                logger.warning("project %s: labeling config not usable here (%s)", project, exc)
                return None
            self.remember(project, config)
            return config
        return self._by_project.get(project or "")
