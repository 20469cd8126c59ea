import math

import pytest
import yaml

from ale_backend.dataset import (
    TASK_SKIPPED,
    Example,
    Skips,
    class_names_for,
    examples_from_tasks,
    is_validation,
    pick_annotation,
    rectangle_to_yolo,
    remapped_validation_set,
    write_dataset,
)
from ale_backend.image_cache import ImageCache
from ale_backend.images import ImageLoader
from ale_backend.label_config import map_labels, parse_label_config
from testkit import synthetic
from testkit.label_studio_stand_in import LABEL_CONFIG


def annotation(aid, updated, cancelled=False, ground_truth=False, label="Circle"):
    return {"id": aid, "updated_at": updated, "was_cancelled": cancelled, "ground_truth": ground_truth,
            "result": [{"from_name": "label", "to_name": "image", "type": "rectanglelabels",
                        "value": {"x": 10, "y": 20, "width": 30, "height": 40, "rectanglelabels": [label]}}]}


def test_ground_truth_wins_then_the_latest_non_cancelled():
    task = {"annotations": [annotation(1, "2026-01-03"), annotation(2, "2026-01-01", ground_truth=True),
                            annotation(3, "2026-01-05", cancelled=True)]}
    assert pick_annotation(task)["id"] == 2
    task["annotations"][1]["ground_truth"] = False
    assert pick_annotation(task)["id"] == 1
    assert pick_annotation({"annotations": [annotation(3, "x", cancelled=True)]}) is None


def test_examples_keep_this_controls_boxes_and_skip_skipped_tasks():
    config = parse_label_config(LABEL_CONFIG)
    other = {"from_name": "other", "type": "rectanglelabels", "value": {"x": 0, "y": 0, "width": 5, "height": 5,
                                                                       "rectanglelabels": ["Circle"]}}
    tasks = [
        {"id": 1, "data": {"image": "a.png"}, "annotations": [annotation(1, "t")]},
        {"id": 2, "data": {"image": "b.png"}, "annotations": [annotation(2, "t", cancelled=True)]},
        {"id": 3, "data": {"image": "c.png"}, "annotations": [{"id": 4, "result": [other]}]},
        {"id": 4, "data": {"image": "d.png"}, "annotations": [annotation(5, "t", label="Unknown")]},
    ]
    examples = examples_from_tasks(tasks, config)
    assert [e.task_id for e in examples] == [1, 3, 4]
    assert examples[0].boxes[0].label == "Circle"
    assert examples[0].boxes[0].cx == pytest.approx(0.25) and examples[0].boxes[0].h == pytest.approx(0.4)
    assert examples[1].boxes == () and examples[2].boxes == ()  # negatives: nothing of this project's labels


def poisoned_tasks():
    """A good task and, one per task, what the hardening review sent (ids 2 to 13)."""
    def with_region(task_id, **value_changes):
        task = {"id": task_id, "data": {"image": f"{task_id}.png"}, "annotations": [annotation(task_id, "t")]}
        task["annotations"][0]["result"][0]["value"].update(value_changes)
        return task

    good = with_region(1)
    region = good["annotations"][0]["result"][0]
    return [
        good,
        with_region(2, rotation=float("inf")),  # 1e400 in JSON
        with_region(3, rotation="abc"),
        with_region(4, x=float("nan")),
        {"id": 5, "data": {"image": "5.png"}, "annotations": [{"id": 5, "result": ["a string"]}]},
        {"id": 6, "data": {"image": "6.png"}, "annotations": [{"id": 6, "result": [{**region, "value": "text"}]}]},
        {"id": 7, "data": {"image": "7.png"}, "annotations": [{"id": 7, "result": {"not": "a list"}}]},
        {"id": 8, "data": {"image": "8.png"}, "annotations": [None, annotation(8, "t")]},  # null: the other counts
        with_region(9, rectanglelabels=[["Circle"]]),
        {"id": "abc", "data": {"image": "x.png"}, "annotations": [annotation(10, "t")]},
        with_region(1),  # the id of task 1 again
        {"id": 11, "data": {"image": "11.png"}, "annotations": [annotation(11, "t"), "junk"]},
        {"id": 12, "data": {"image": "12.png"}, "annotations": [{"id": 12, "result": [
            region, {**region, "type": "polygonlabels"}, {"from_name": "class", "type": "choices", "value": {}},
            {**region, "value": {**region["value"], "rectanglelabels": ["Removed"]}}]}]},
        "not a task",
    ]


def test_what_cannot_be_trained_on_is_left_out_and_counted_by_reason_and_the_rest_is_kept():
    skips = Skips()
    examples = examples_from_tasks(poisoned_tasks(), parse_label_config(LABEL_CONFIG), skips)
    assert [e.task_id for e in examples] == [1, 8, 11, 12]
    assert all(math.isfinite(v) for e in examples for b in e.boxes for v in (b.cx, b.cy, b.w, b.h))
    assert len(examples[-1].boxes) == 1  # task 12 keeps its one usable rectangle
    assert skips.as_dict() == {
        "task skipped: a rectangle's rotation is not a finite number": {"count": 2, "tasks": [2, 3]},
        "task skipped: its id is not a positive integer": {"count": 2, "tasks": ["abc", None]},
        "task skipped: a rectangle's x is not a finite number": {"count": 1, "tasks": [4]},
        "task skipped: a region (or its value) is not an object": {"count": 2, "tasks": [5, 6]},
        "task skipped: its annotation's result is not a list": {"count": 1, "tasks": [7]},
        "task skipped: a rectangle's labels are not a list of names": {"count": 1, "tasks": [9]},
        "task skipped: its id repeats another task's": {"count": 1, "tasks": [1]},
        "region of another type dropped (polygonlabels)": {"count": 1, "tasks": [12]},
        "region of another control dropped (class)": {"count": 1, "tasks": [12]},
        "label not in the labelling config dropped (Removed)": {"count": 1, "tasks": [12]},
        "annotation that is not an object dropped": {"count": 1, "tasks": [11]},
    }
    assert skips.total(TASK_SKIPPED) == 10


def test_a_region_keeps_every_label_the_config_has_and_a_bad_region_costs_only_itself():
    def task(task_id, **value_changes):
        region = annotation(task_id, "t")["result"][0]
        region["value"].update(value_changes)
        return {"id": task_id, "data": {"image": f"{task_id}.png"}, "annotations": [{"id": task_id, "result": [
            region, annotation(task_id, "t", label="box")["result"][0]]}]}

    skips = Skips()
    examples = examples_from_tasks([
        task(1, rectanglelabels=["Removed", "Circle"]),  # its first label left the config: Circle stays
        task(2, rectanglelabels=[]),  # no label: that region goes, the task's other region stays
        task(3, rectanglelabels=["Circle", "box"]),  # two labels on one box: one box per label
        task(4, rotation=30),  # rotated, without the image's size: that region goes
    ], parse_label_config(LABEL_CONFIG), skips)
    assert [(e.task_id, [b.label for b in e.boxes]) for e in examples] == [
        (1, ["Circle", "box"]), (2, ["box"]), (3, ["Circle", "box", "box"]), (4, ["box"])]
    first, second = examples[2].boxes[:2]
    assert (first.cx, first.cy, first.w, first.h) == (second.cx, second.cy, second.w, second.h)  # one rectangle
    assert skips.as_dict() == {
        "label not in the labelling config dropped (Removed)": {"count": 1, "tasks": [1]},
        "rectangle without a label dropped": {"count": 1, "tasks": [2]},
        "rotated rectangle without the image's size (original_width, original_height) dropped":
            {"count": 1, "tasks": [4]},
    }
    sized = task(5, rotation=90)
    sized["annotations"][0]["result"][0].update(original_width=1000, original_height=500)
    sized["annotations"][0]["result"][0]["value"].update(x=30, y=20, width=30, height=20)
    turned = examples_from_tasks([sized], parse_label_config(LABEL_CONFIG))[0].boxes[0]
    assert (turned.cx, turned.cy, turned.w, turned.h) == pytest.approx((0.25, 0.5, 0.1, 0.6))


def test_rotated_rectangles_become_their_bounding_box_turned_in_pixels():
    assert rectangle_to_yolo({"x": 10, "y": 20, "width": 30, "height": 40}) == pytest.approx((0.25, 0.4, 0.3, 0.4))
    # a square image: rotated 90 degrees about the top-left corner (10, 20): spans x 10-40 -> -30..10, y 20..50
    cx, cy, w, h = rectangle_to_yolo({"x": 10, "y": 20, "width": 30, "height": 40, "rotation": 90}, (200, 200))
    assert (cx, cy, w, h) == pytest.approx((0.05, 0.35, 0.1, 0.3))  # clipped at the left edge
    # 1000 x 500: x 300 px, y 100 px, 300 x 100 px, turned clockwise about (300, 100): x 200-300, y 100-400 px
    turned = {"x": 30, "y": 20, "width": 30, "height": 20, "rotation": 90}
    assert rectangle_to_yolo(turned, (1000, 500)) == pytest.approx((0.25, 0.5, 0.1, 0.6))
    with pytest.raises(ValueError, match="rotated rectangle comes without original_width"):
        rectangle_to_yolo(turned)
    assert rectangle_to_yolo({**turned, "rotation": 360}) == pytest.approx((0.45, 0.3, 0.3, 0.2))  # a full turn
    assert rectangle_to_yolo({"x": 120, "y": 0, "width": 5, "height": 5}) is None
    with pytest.raises(ValueError, match="y is not a finite number"):
        rectangle_to_yolo({"x": 1})
    assert math.isfinite(rectangle_to_yolo({"x": 0, "y": 0, "width": 10, "height": 10, "rotation": 45},
                                           (640, 480))[0])


def test_the_validation_split_is_stable_and_near_the_requested_share():
    chosen = [is_validation(i, 20) for i in range(2000)]
    assert 0.17 < sum(chosen) / 2000 < 0.23
    assert chosen == [is_validation(i, 20) for i in range(2000)]
    assert not any(is_validation(i, 0) for i in range(100))


def test_known_labels_keep_the_model_class_name():
    config = parse_label_config(LABEL_CONFIG)
    names = {0: "circle", 1: "square", 2: "triangle"}
    mapping = map_labels(names, config)
    assert class_names_for(config, mapping.class_to_label, names) == ["circle", "square", "Springtail"]


def test_dataset_files_skip_broken_images_and_relabel_for_another_model(tmp_path, sample_images):
    config = parse_label_config(LABEL_CONFIG)
    tasks = [{"id": i, "data": {"image": str(p)}, "annotations": [annotation(i, "t", label="Springtail")]}
             for i, p in enumerate(sample_images[:10], start=1)]
    tasks.append({"id": 99, "data": {"image": str(tmp_path / "missing.png")}, "annotations": [annotation(9, "t")]})
    examples = examples_from_tasks(tasks, config)
    cache = ImageCache(tmp_path / "cache", ImageLoader(None, local_roots=[tmp_path, sample_images[0].parent]))
    summary = write_dataset(examples, ["circle", "square", "Springtail"], {"Circle": 0, "box": 1, "Springtail": 2},
                            cache, tmp_path / "ds", val_percent=30)
    assert [t for t, _ in summary.skipped] == [99]
    assert summary.train_images + summary.val_images == 10 and summary.val_images > 0
    assert summary.boxes == 10 and summary.boxes_per_class == {"Springtail": 10}
    data = yaml.safe_load(summary.data_yaml.read_text())
    assert data["names"] == {0: "circle", 1: "square", 2: "Springtail"}
    label = (tmp_path / "ds" / "labels" / "task1.txt").read_text().split()
    assert label[0] == "2" and float(label[1]) == pytest.approx(0.25)
    assert len(list((tmp_path / "cache").iterdir())) == 10  # cached once...
    write_dataset(examples, ["circle", "square", "Springtail"], {"Circle": 0, "box": 1, "Springtail": 2},
                  cache, tmp_path / "ds2", val_percent=30)
    assert len(list((tmp_path / "cache").iterdir())) == 10  # ...and reused

    # For the model being replaced (which calls triangles class 2 and knows no Springtail), Springtail is new.
    other = remapped_validation_set(summary, {0: "circle", 1: "square", 2: "triangle"}, tmp_path / "other")
    assert yaml.safe_load(other.read_text())["names"] == {0: "circle", 1: "square", 2: "triangle", 3: "Springtail"}
    rows = [p.read_text().split()[0] for p in (tmp_path / "other" / "labels").iterdir()]
    assert rows and set(rows) == {"3"}


def test_no_usable_image_is_an_error(tmp_path):
    cache = ImageCache(tmp_path / "cache", ImageLoader(None, local_roots=[tmp_path]))
    with pytest.raises(ValueError, match="no annotated task could be used"):
        write_dataset([Example(1, str(tmp_path / "none.png"), ())], ["a"], {"a": 0}, cache, tmp_path / "ds", 20)


def test_the_base_dataset_is_replayed_with_classes_renumbered(tmp_path, sample_images):
    base = tmp_path / "base"
    synthetic.write_yolo_dataset(base, {"train": 4}, seed=2, size=64, classes=("square", "circle"))
    spec = base / "data.yaml"  # the base data names its classes in other cases than the project
    spec.write_text(spec.read_text().replace("square", "Square").replace("circle", "CIRCLE"))
    examples = [Example(1, str(sample_images[0]), ())]
    cache = ImageCache(tmp_path / "cache", ImageLoader(None, local_roots=[tmp_path, sample_images[0].parent]))
    names = ["circle", "Springtail"]
    summary = write_dataset(examples, names, {"Circle": 0, "Springtail": 1}, cache, tmp_path / "ds", 0,
                            base_dataset=base / "data.yaml")
    assert summary.replay_images == 4 and summary.class_names == ["circle", "Springtail", "Square"]
    train = (tmp_path / "ds" / "train.txt").read_text().split()
    assert len(train) == 5
    for i in range(4):
        original = (base / "train" / "labels" / f"train_{i:05d}.txt").read_text().split("\n")
        replayed = (tmp_path / "ds" / "replay" / "labels" / f"base{i:06d}.txt").read_text().split("\n")
        for before, after in zip(original, replayed):
            if before:
                # base "square" (0) is now 2, base "circle" (1) is now 0; coordinates unchanged
                assert {"0": "2", "1": "0"}[before.split()[0]] == after.split()[0]
                assert before.split()[1:] == after.split()[1:]


@pytest.fixture()
def cache_over(image_server, sample_images):
    """A project's image cache reading the stand-in Label Studio, whose folder 1/ serves the sample images."""
    from ale_backend.label_studio import LabelStudioClient

    loader = ImageLoader(LabelStudioClient(image_server.url, image_server.legacy_token))
    return lambda folder: ImageCache(folder, loader)


@pytest.mark.parametrize("form", ["local-files", "storage link"])
def test_a_task_whose_image_changed_gets_the_new_one(cache_over, tmp_path, sample_images, form):
    import base64

    def url(name):
        if form == "local-files":
            return f"/data/local-files/?d=1/{name}"
        return f"/tasks/7/resolve/?fileuri={base64.urlsafe_b64encode(f's3://bucket/1/{name}'.encode()).decode()}"

    cache = cache_over(tmp_path / "cache")
    first, second = sample_images[0], sample_images[5]
    assert cache.get(7, url(first.name)).read_bytes() == first.read_bytes()
    assert cache.get(7, url(second.name)).read_bytes() == second.read_bytes()  # not the old image again


def test_a_presigned_urls_signature_does_not_make_a_new_download(cache_over, tmp_path, image_server, sample_images):
    cache = cache_over(tmp_path / "cache")
    base = f"{image_server.url}/public/1/{sample_images[0].name}"
    cache.get(3, base + "?X-Amz-Date=20261202T000000Z&X-Amz-Signature=aaa&versionId=2")
    before = len(image_server.requests)
    cache.get(3, base + "?X-Amz-Date=20261202T010000Z&X-Amz-Signature=bbb&versionId=2")
    assert len(image_server.requests) == before  # the same file, from the cache
    cache.get(3, base + "?X-Amz-Date=20261202T010000Z&X-Amz-Signature=bbb&versionId=3")
    assert len(image_server.requests) == before + 1  # another version of the object: another file


def test_a_write_that_fails_half_way_leaves_nothing_a_lookup_would_take(cache_over, tmp_path, sample_images,
                                                                        monkeypatch):
    import errno
    from pathlib import Path

    cache = cache_over(tmp_path / "cache")
    url = f"/data/local-files/?d=1/{sample_images[0].name}"
    real_write = Path.write_bytes

    def disk_full(self, data):
        real_write(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(OSError, match="No space left"):
        cache.get(4, url)
    monkeypatch.undo()
    assert list((tmp_path / "cache").iterdir()) == []  # the partial file went with the failure
    assert cache.get(4, url).read_bytes() == sample_images[0].read_bytes()  # the next round downloads it whole


def test_leftovers_of_a_killed_writer_are_never_taken_and_are_removed_when_old(cache_over, tmp_path, sample_images):
    import os

    from ale_backend.image_cache import cache_key

    folder = tmp_path / "cache"
    folder.mkdir()
    url = f"/data/local-files/?d=1/{sample_images[0].name}"
    key = cache_key(4, url)
    (folder / f"{key}.part123").write_bytes(b"truncated")  # the name an earlier release wrote
    old = folder / f".{key}.123.deadbeef.partial"
    old.write_bytes(b"truncated")
    os.utime(old, (1, 1))
    recent = folder / f".{key}.456.cafebabe.partial"  # another process may still be writing it
    recent.write_bytes(b"half")
    cache = cache_over(folder)
    assert not old.exists() and recent.exists()
    assert cache.get(4, url).read_bytes() == sample_images[0].read_bytes()


def test_two_model_classes_meeting_one_label_train_under_the_first_ones_name():
    config = parse_label_config(LABEL_CONFIG.replace('predicted_values="square"', 'predicted_values="square,rect"'))
    names = {0: "circle", 1: "rect", 2: "square"}
    assert class_names_for(config, map_labels(names, config).class_to_label, names) == ["circle", "rect",
                                                                                       "Springtail"]


def test_without_a_validation_split_the_round_validates_on_what_it_trains_on(tmp_path, sample_images):
    cache = ImageCache(tmp_path / "cache", ImageLoader(None, local_roots=[sample_images[0].parent]))
    examples = [Example(i, str(p), ()) for i, p in enumerate(sample_images[:3], start=1)]
    summary = write_dataset(examples, ["circle"], {"Circle": 0}, cache, tmp_path / "ds", val_percent=0)
    assert summary.train_images == summary.val_images == 3
    assert (tmp_path / "ds" / "train.txt").read_text() == (tmp_path / "ds" / "val.txt").read_text()
