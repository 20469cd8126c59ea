import numpy as np
import pytest

from ale_backend.label_config import LabelConfigError, map_labels, parse_label_config
from testkit.label_studio_stand_in import LABEL_CONFIG


def test_parses_the_rectangle_labels_on_the_image():
    config = parse_label_config(LABEL_CONFIG)
    assert (config.from_name, config.to_name, config.image_key) == ("label", "image", "image")
    assert config.labels == ("Circle", "box", "Springtail")
    assert config.aliases["box"] == ("box", "square")


def test_maps_by_name_ignoring_case_and_by_predicted_values():
    label_map = map_labels({0: "circle", 1: "square", 2: "triangle"}, parse_label_config(LABEL_CONFIG))
    assert dict(label_map.class_to_label) == {0: "Circle", 1: "box"}
    assert label_map.unmapped_classes == ("triangle",)
    assert label_map.new_labels == ("Springtail",)


def test_only_the_project_classes_columns_count_for_certainty():
    coco_like = {0: "person", 1: "bird", 2: "cat"}
    scores = np.array([[0.05, 0.9, 0.1], [0.8, 0.02, 0.3]])
    with_bird = parse_label_config(LABEL_CONFIG.replace('<Label value="Circle"/>', '<Label value="Bird"/>'))
    np.testing.assert_array_equal(map_labels(coco_like, with_bird).project_class_scores(scores), [[0.9], [0.02]])
    species_only = parse_label_config(LABEL_CONFIG)  # no model class has a label: every box is unknown
    none = map_labels(coco_like, species_only).project_class_scores(scores)
    np.testing.assert_array_equal(none, np.zeros((2, 1)))
    assert map_labels(coco_like, species_only).project_class_scores(np.zeros((0, 3))).shape == (0, 1)


def test_first_label_wins_when_two_claim_a_class():
    config = parse_label_config(
        '<View><Image name="img" value="$url"/><RectangleLabels name="r" toName="img">'
        '<Label value="Cat"/><Label value="Feline" predicted_values="cat"/></RectangleLabels></View>'
    )
    label_map = map_labels({0: "cat"}, config)
    assert dict(label_map.class_to_label) == {0: "Cat"} and label_map.new_labels == ("Feline",)
    assert config.image_key == "url"


def test_picks_the_control_that_labels_an_image():
    config = parse_label_config(
        '<View><Text name="t" value="$text"/><RectangleLabels name="wrong" toName="t"><Label value="A"/>'
        '</RectangleLabels><Image name="photo" value="$img"/><RectangleLabels name="boxes" toName="photo">'
        '<Label value="B"/></RectangleLabels></View>'
    )
    assert (config.from_name, config.labels) == ("boxes", ("B",))


@pytest.mark.parametrize(
    "xml, reason",
    [
        ("", "no labelling config"),
        ("<View><Image", "not valid XML"),
        ('<View><Image name="i" value="$i"/><Choices name="c" toName="i"><Choice value="x"/></Choices></View>',
         "no <RectangleLabels>"),
        ('<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i"/></View>', "no <Label"),
        ('<View><Text name="t" value="$t"/><RectangleLabels name="r" toName="t"><Label value="a"/>'
         "</RectangleLabels></View>", "pointing at an <Image>"),
    ],
)
def test_unusable_configs_say_why(xml, reason):
    with pytest.raises(LabelConfigError, match=reason.replace("<", r"\<")):
        parse_label_config(xml)


@pytest.mark.parametrize("raw, expected", [(None, None), ("0.6", 0.6), ("0", 0.0), ("1", 1.0)])
def test_model_score_threshold_is_read_from_the_control(raw, expected):
    attribute = f' model_score_threshold="{raw}"' if raw is not None else ""
    config = parse_label_config(LABEL_CONFIG.replace('toName="image"', f'toName="image"{attribute}'))
    assert config.score_threshold == expected


@pytest.mark.parametrize("raw", ["high", "1.5", "-0.1", "nan", ""])
def test_a_bad_model_score_threshold_is_refused_with_its_value(raw):
    with pytest.raises(LabelConfigError, match=f"model_score_threshold='{raw}'.*from 0 to 1"):
        parse_label_config(LABEL_CONFIG.replace('toName="image"', f'toName="image" model_score_threshold="{raw}"'))


def test_an_image_named_without_a_data_key_is_refused():
    with pytest.raises(LabelConfigError, match=r'needs value="\$<task data key>", got \'image_url\''):
        parse_label_config(LABEL_CONFIG.replace('value="$image"', 'value="image_url"'))


def test_a_repeated_label_is_read_once():
    config = parse_label_config(LABEL_CONFIG.replace('<Label value="Springtail"/>',
                                                     '<Label value="Springtail"/><Label value="Springtail"/>'))
    assert config.labels == ("Circle", "box", "Springtail")


def test_to_name_naming_several_objects_takes_the_first_image():
    config = parse_label_config(LABEL_CONFIG.replace('toName="image"', 'toName="image,caption"'))
    assert (config.to_name, config.labels) == ("image", ("Circle", "box", "Springtail"))


def test_model_class_names_and_predicted_values_meet_labels_whatever_their_case():
    config = parse_label_config(LABEL_CONFIG.replace('predicted_values="square"', 'predicted_values="Square,RECT"'))
    label_map = map_labels({0: "CIRCLE", 1: "square", 2: "Rect", 3: "Triangle"}, config)
    assert dict(label_map.class_to_label) == {0: "Circle", 1: "box", 2: "box"}
    assert label_map.unmapped_classes == ("Triangle",)
