"""Labeling config parsing and per-task prompt resolution."""
from __future__ import annotations

import pytest

from backend.labelstudio.config import LabelConfig, UnsupportedConfigError, parse_label_config
from backend.labelstudio.prompts import PromptRequest, PromptSettings, predict_prompts
from backend.settings import Settings

BRUSH = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">
    <Label value="person" background="red"/>
    <Label value="car" alias="vehicle" background="blue"/>
  </BrushLabels>
</View>"""

# The interactive layout from label-studio-ml-backend's grounding_sam example: a prompt TextArea on the image.
INTERACTIVE = """<View>
  <Image name="image" value="$image"/>
  <View className="prompt">
    <TextArea name="prompt" toName="image" editable="true" rows="2" maxSubmissions="1" showSubmitButton="true"/>
  </View>
  <BrushLabels name="tag" toName="image">
    <Label value="cats"/>
    <Label value="house"/>
  </BrushLabels>
</View>"""

REFERRING = """<View>
  <Image name="img" value="$picture"/>
  <Header value="$expression"/>
  <BrushLabels name="mask" toName="img"><Label value="referent"/></BrushLabels>
</View>"""

BOTH = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image"><Label value="cat"/></BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="cat"/><Label value="dog"/></PolygonLabels>
</View>"""

NONE = PromptSettings()  # no PROMPT_FIELD, no LABEL_PROMPTS

POLY_ONLY = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="poly" toName="image" strokeWidth="3"><Label value="road"/></PolygonLabels>
</View>"""


def textarea_context(*texts, from_name="prompt", extra=()):
    """/predict `params.context` as Label Studio sends it after the user submits the prompt TextArea."""
    return {
        "result": [
            {
                "id": "abc123",
                "from_name": from_name,
                "to_name": "image",
                "type": "textarea",
                "origin": "manual",
                "value": {"text": list(texts)},
            },
            *extra,
        ]
    }


def test_brush_config():
    cfg = parse_label_config(BRUSH)
    assert cfg.image_name == "image" and cfg.image_key == "image" and cfg.output == "brush"
    (control,) = cfg.controls
    assert (control.from_name, control.to_name, control.type) == ("tag", "image", "brushlabels")
    # Results carry the alias when a Label has one (as the editor does); prompts say the Label's value.
    assert control.labels == ("person", "vehicle")
    assert control.label_texts["vehicle"] == "car"
    assert cfg.textarea is None and cfg.text_fields == ()


def test_label_prompts_default_and_mapped():
    task = {"id": 1, "data": {"image": "/data/upload/1/a.jpg"}}
    prompts = predict_prompts(parse_label_config(BRUSH), NONE, task)
    assert [(p.text, p.label, p.source) for p in prompts] == [("person", "person", "label"), ("car", "vehicle", "label")]
    mapped = predict_prompts(parse_label_config(BRUSH), PromptSettings(label_prompts={"person": "a person", "car": "a car"}),
                             task)
    assert [(p.text, p.label) for p in mapped] == [("a person", "person"), ("a car", "vehicle")]
    assert all(isinstance(p, PromptRequest) and p.control.from_name == "tag" for p in mapped)


def test_image_ref():
    cfg = parse_label_config(REFERRING)
    assert cfg.image_key == "picture" and cfg.image_name == "img"
    assert cfg.image_ref({"data": {"picture": "s3://b/x.png"}}) == "s3://b/x.png"
    assert cfg.image_ref({"data": {"picture": "  "}}) is None
    assert cfg.image_ref({"data": {}}) is None


def test_interactive_textarea_context_wins():
    cfg, settings = parse_label_config(INTERACTIVE), PromptSettings(prompt_field="expression")
    assert cfg.textarea == "prompt"
    task = {"id": 3, "data": {"image": "x", "expression": "the man on the left"}}
    (p,) = predict_prompts(cfg, settings, task, textarea_context("a sleeping cat"))
    assert (p.text, p.label, p.source, p.control.from_name) == ("a sleeping cat", "cats", "typed", "tag")
    # Without context (batch predictions) the field is used; empty/None context means no interaction.
    for context in (None, {}, {"result": []}):
        (p,) = predict_prompts(cfg, settings, task, context)
        assert (p.text, p.source) == ("the man on the left", "field")


def test_typed_text_matching_a_label_gets_that_label():
    cfg = parse_label_config(INTERACTIVE)
    (p,) = predict_prompts(cfg, NONE, {"data": {"image": "x"}}, textarea_context("House "))
    assert (p.text, p.label) == ("House", "house")


def test_selected_label_in_context_is_used():
    cfg = parse_label_config(INTERACTIVE)
    selected = {"from_name": "tag", "to_name": "image", "type": "brushlabels", "value": {"brushlabels": ["house"]}}
    (p,) = predict_prompts(cfg, NONE, {"data": {"image": "x"}}, textarea_context("the red building", extra=[selected]))
    assert (p.text, p.label) == ("the red building", "house")


def test_several_typed_texts_and_unknown_textarea_name():
    cfg = parse_label_config(INTERACTIVE)
    prompts = predict_prompts(cfg, NONE, {"data": {"image": "x"}}, textarea_context("cat", "", "  dog ", "cat", from_name="renamed"))
    # Only the most recent line is a prompt (issue 26: older lines are a restored draft), even one repeating an older.
    assert [p.text for p in prompts] == ["cat"]
    # A bare string (not a list) in value.text is accepted too.
    ctx = {"result": [{"from_name": "prompt", "type": "textarea", "value": {"text": "tree"}}]}
    assert [p.text for p in predict_prompts(cfg, NONE, {"data": {}}, ctx)] == ["tree"]


def test_malformed_context_is_ignored():
    cfg = parse_label_config(INTERACTIVE)
    for context in ({"result": None}, {"result": "x"}, {"result": [1, None, {"type": "textarea"}]}, "junk"):
        assert [p.source for p in predict_prompts(cfg, NONE, {"data": {"image": "x"}}, context)] == ["label", "label"]


def test_referenced_field_from_header():
    cfg = parse_label_config(REFERRING)
    assert cfg.text_fields == ("expression",)
    (p,) = predict_prompts(cfg, NONE, {"data": {"picture": "x", "expression": "  zebra in front  "}})
    assert (p.text, p.label, p.source) == ("zebra in front", "referent", "field")
    # A list of expressions (RefCOCO has several per object) gives one prompt each.
    prompts = predict_prompts(cfg, NONE, {"data": {"picture": "x", "expression": ["left zebra", "zebra in front"]}})
    assert [p.text for p in prompts] == ["left zebra", "zebra in front"]
    # Missing or empty field: fall back to labels.
    (p,) = predict_prompts(cfg, NONE, {"data": {"picture": "x", "expression": ""}})
    assert (p.text, p.source) == ("referent", "label")


def test_text_tag_and_prompt_field_setting():
    config = BRUSH.replace("</View>", '<Text name="caption" value="$caption"/><Header value="Instructions"/></View>')
    cfg = parse_label_config(config)
    assert cfg.text_fields == ("caption",)  # a literal Header is not a data reference
    (p,) = predict_prompts(cfg, NONE, {"data": {"image": "x", "caption": "red car"}})
    assert (p.text, p.label) == ("red car", "person")  # first label of the control
    ref = PromptSettings(prompt_field="ref")
    assert predict_prompts(cfg, ref, {"data": {"image": "x", "caption": "red car", "ref": "a dog"}})[0].text == "a dog"
    # prompt_field set but missing in the task: labels, not the config's caption field.
    assert [p.source for p in predict_prompts(cfg, ref, {"data": {"image": "x", "caption": "red car"}})] == ["label", "label"]


def test_from_settings():
    """POLYGONS picks the controls; PROMPT_FIELD and LABEL_PROMPTS reach the rule as PromptSettings only."""
    settings = Settings(prompt_field="expression", label_prompts={"cat": "a cat"}, polygon=True)
    cfg = LabelConfig.from_settings(BOTH, settings)
    assert cfg.output == "polygon" and cfg == parse_label_config(BOTH, polygon=True)
    prompts = PromptSettings.from_settings(settings)
    assert prompts == PromptSettings("expression", {"cat": "a cat"})
    assert [p.text for p in predict_prompts(cfg, prompts, {"data": {"image": "x"}})] == ["a cat", "dog"]
    assert [p.text for p in predict_prompts(cfg, prompts, {"data": {"image": "x", "expression": "a cat"}})] == ["a cat"]


def test_brush_vs_polygon_choice():
    both = parse_label_config(BOTH)
    assert both.output == "brush" and [c.from_name for c in both.controls] == ["brush"]
    assert [c.from_name for c in both.all_controls] == ["brush", "poly"]
    assert parse_label_config(BOTH, polygon=True).output == "polygon"
    only = parse_label_config(POLY_ONLY)
    assert only.output == "polygon" and only.controls[0].type == "polygonlabels"
    # polygon=True without a PolygonLabels control still answers with brushes.
    assert parse_label_config(BRUSH, polygon=True).output == "brush"


def test_control_on_second_image():
    config = """<View>
      <Image name="thumb" value="$thumb"/>
      <Image name="full" value="$full"/>
      <BrushLabels name="tag" toName="full"><Label value="a"/></BrushLabels>
    </View>"""
    cfg = parse_label_config(config)
    assert (cfg.image_name, cfg.image_key) == ("full", "full")


def test_control_without_labels():
    cfg = parse_label_config('<View><Image name="i" value="$i"/><BrushLabels name="b" toName="i"/></View>')
    assert predict_prompts(cfg, NONE, {"data": {"i": "x"}}) == []
    (p,) = predict_prompts(cfg, NONE, {"data": {"i": "x"}}, textarea_context("a cat"))
    assert (p.text, p.label) == ("a cat", "a cat")


@pytest.mark.parametrize(
    "config, message",
    [
        ("", "empty"),
        ("<View><Image name='i' value='$i'", "parse"),
        ('<View><Text name="t" value="$t"/><Labels name="l" toName="t"><Label value="x"/></Labels></View>', "<Image>"),
        (
            '<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i"><Label value="x"/></RectangleLabels></View>',
            "BrushLabels",
        ),
        (
            '<View><Image name="i" value="$i"/><Text name="t" value="$t"/>'
            '<BrushLabels name="b" toName="t"><Label value="x"/></BrushLabels></View>',
            "BrushLabels",
        ),
    ],
)
def test_unsupported_configs(config, message):
    with pytest.raises(UnsupportedConfigError) as err:
        parse_label_config(config)
    assert message in str(err.value)
