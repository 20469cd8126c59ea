import json
import os

import pytest

from ale_backend.label_studio import project_id
from ale_backend.registry import Registry, Serving
from testkit.versions import version_info as info


@pytest.fixture()
def weights(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(b"weights")
    return path


def test_a_promoted_version_becomes_current_and_a_rejected_one_does_not(tmp_path, weights):
    registry = Registry(tmp_path)
    assert registry.current(3) is None
    registry.add(weights, info("p3-v1-a"))
    assert registry.current(3) == "p3-v1-a"
    registry.add(weights, info("p3-v2-b", promoted=False, created="2026-11-26T11:00:00+00:00"))
    assert registry.current(3) == "p3-v1-a"
    assert [i.version for i in registry.versions(3)] == ["p3-v1-a", "p3-v2-b"]
    assert registry.weights(3, "p3-v2-b").read_bytes() == b"weights"
    stored = json.loads((registry.version_dir(3, "p3-v2-b") / "version.json").read_text())
    assert stored["promoted"] is False and stored["boxes"] == 9


def test_version_names_count_up_per_project(tmp_path, weights):
    registry = Registry(tmp_path)
    first = registry.new_version_name(3)
    assert first.startswith("p3-v1-")
    registry.add(weights, info(first))
    assert registry.new_version_name(3).startswith("p3-v2-")
    assert registry.new_version_name(4).startswith("p4-v1-")


def test_prune_keeps_the_newest_and_never_the_current(tmp_path, weights):
    registry = Registry(tmp_path)
    for n in range(1, 5):
        registry.add(weights, info(f"p3-v{n}-x", promoted=(n == 1), created=f"2026-11-26T1{n}:00:00+00:00"))
    assert registry.current(3) == "p3-v1-x"
    removed = registry.prune(3, keep=2)
    assert removed == ["p3-v2-x"]
    assert [i.version for i in registry.versions(3)] == ["p3-v1-x", "p3-v3-x", "p3-v4-x"]


def test_incomplete_versions_are_invisible_and_cleaned(tmp_path, weights):
    registry = Registry(tmp_path)
    staging = registry.files(3).versions / ".incoming-crashed"
    staging.mkdir(parents=True)
    (staging / "weights.pt").write_bytes(b"half")
    assert registry.versions(3) == [] and registry.current(3) is None
    registry.files(3).clean_incomplete()
    assert not staging.exists()


def test_a_dangling_pointer_serves_the_base_model(tmp_path, weights):
    registry = Registry(tmp_path)
    registry.add(weights, info("p3-v1-a"))
    os.remove(registry.weights(3, "p3-v1-a"))
    assert registry.current(3) is None
    with pytest.raises(FileNotFoundError):
        registry.set_current(3, "p3-v1-a")


@pytest.mark.parametrize("value, expected", [("3.1700000000", 3), (3, 3), ({"id": 12}, 12), ("12", 12),
                                             (None, None), ("x.1", None), ({}, None)])
def test_project_references_from_label_studio(value, expected):
    assert project_id(value) == expected


def test_the_registered_weights_are_recorded_and_checked_before_they_are_served(tmp_path, weights):
    registry = Registry(tmp_path)
    registry.add(weights, info("p3-v1-a"))
    recorded = registry.info(3, "p3-v1-a")
    assert recorded.weights_size == 7 and len(recorded.weights_sha256) == 64
    registry.add(weights, info("p3-v2-b", promoted=False, created="2026-11-26T11:00:00+00:00"))
    registry.weights(3, "p3-v2-b").write_bytes(b"weighTs")  # same size, other bytes
    with pytest.raises(ValueError, match="p3-v2-b's weights are not the file registered"):
        registry.set_current(3, "p3-v2-b")
    assert registry.current(3) == "p3-v1-a"


def test_a_damaged_current_version_gives_way_to_the_newest_good_one_with_the_reason(tmp_path, weights):
    registry = Registry(tmp_path)
    registry.add(weights, info("p3-v1-a"))
    registry.add(weights, info("p3-v2-b", created="2026-11-26T11:00:00+00:00"))
    registry.add(weights, info("p3-v3-c", promoted=False, created="2026-11-26T12:00:00+00:00"))  # never served
    registry.weights(3, "p3-v2-b").write_bytes(b"wei")  # truncated
    serving = registry.serving(3)
    assert serving.version == "p3-v1-a"
    assert serving.problem == "version p3-v2-b's weights are 3 bytes, 7 were registered; serving p3-v1-a instead"
    registry.weights(3, "p3-v1-a").unlink()
    assert registry.serving(3) == Serving(None, "version p3-v2-b's weights are 3 bytes, 7 were registered; serving "
                                                "the base model instead")


@pytest.mark.parametrize("pointer, reason", [
    ("directory", "'current' cannot be read (IsADirectoryError)"),
    ("../../10/versions/p10-v1-a", "'current' names '../../10/versions/p10-v1-a', not a version of project 14"),
    ("p14-v9-gone", "'current' names 'p14-v9-gone', which project 14 does not have"),
])
def test_a_current_pointer_that_is_not_a_version_of_the_project_serves_the_base_model(tmp_path, weights, pointer,
                                                                                       reason):
    registry = Registry(tmp_path)
    registry.add(weights, info("p10-v1-a", project=10))  # another project's weights, one path away
    current = registry.files(14).current
    current.parent.mkdir(parents=True, exist_ok=True)
    if pointer == "directory":
        current.mkdir()
    else:
        current.write_text(pointer + "\n")
    assert registry.serving(14).version is None and registry.serving(14).problem == f"{reason}; serving the base " \
                                                                                    "model instead"


def test_a_version_whose_record_cannot_be_read_is_left_out_of_the_list(tmp_path, weights):
    registry = Registry(tmp_path)
    registry.add(weights, info("p3-v1-a"))
    registry.add(weights, info("p3-v2-b", created="2026-11-26T11:00:00+00:00"))
    path = registry.version_dir(3, "p3-v2-b") / "version.json"
    path.write_text(path.read_text()[:40])  # truncated
    assert [i.version for i in registry.versions(3)] == ["p3-v1-a"]
    assert registry.serving(3).version == "p3-v1-a" and "p3-v2-b's record cannot be read" in registry.serving(3).problem


def test_version_numbers_keep_counting_after_pruning_and_pruning_follows_creation_time(tmp_path, weights):
    registry = Registry(tmp_path)
    for n in range(1, 12):  # v1 ... v11, created in that order: by name v10 and v11 sort before v2
        registry.add(weights, info(f"p3-v{n}-x", promoted=(n == 11), created=f"2026-11-26T10:{n:02d}:00+00:00"))
    assert [i.version for i in registry.versions(3)][-3:] == ["p3-v9-x", "p3-v10-x", "p3-v11-x"]
    removed = registry.prune(3, keep=3)
    assert removed == [f"p3-v{n}-x" for n in range(1, 9)]  # the oldest, not the first by name
    assert registry.new_version_name(3).startswith("p3-v12-")  # not len + 1 = v4, a name already used


@pytest.mark.parametrize("field, value", [("created_at", None), ("promoted", "yes"), ("weights_size", True),
                                          ("class_names", None), ("version", 7)])
def test_a_record_with_a_field_of_the_wrong_type_is_left_out_with_the_reason(tmp_path, weights, caplog, field,
                                                                             value):
    registry = Registry(tmp_path)
    registry.add(weights, info("p3-v1-a"))
    registry.add(weights, info("p3-v2-b", created="2026-11-26T11:00:00+00:00"))  # served
    path = registry.version_dir(3, "p3-v2-b") / "version.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    with caplog.at_level("WARNING", logger="ale_backend.registry"):
        assert [i.version for i in registry.versions(3)] == ["p3-v1-a"]
    assert any(f"its {field} is" in r.getMessage() for r in caplog.records)
    serving = registry.serving(3)
    assert serving.version == "p3-v1-a" and "p3-v2-b's record cannot be read (ValueError)" in serving.problem
