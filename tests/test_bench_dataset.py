"""The benchmark on a labelled YOLO dataset: its splits per seed, the resized-image cache, a Label Studio export, and
the protocol end to end on generated photographs-like data (non-square, larger than the training size)."""

import json
import os
import shutil

import cv2
import numpy as np
import pytest
import yaml

from ale_backend.yolo_files import label_path, make_split_folders, pixel_label_text, read_labels
from benchmarks.active_learning.__main__ import main
from benchmarks.active_learning.yolo_dataset import YoloDataset, YoloDatasetConfig
from testkit.synthetic import SHAPES, shapes_image

NEW = ("triangle",)


def write_dataset(root, counts, seed=0, layout="data.yaml"):
    """Shapes on 160 x 160 padded to 240 x 160 (so that resizing keeps the aspect and the labels); ``layout``
    ``data.yaml`` (train / valid / test splits, Roboflow's names) or ``label-studio`` (one folder, classes.txt)."""
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        folder = root / split if layout == "data.yaml" else root
        make_split_folders(folder)
        for i in range(n):
            sample = shapes_image(rng, 160)
            image = cv2.copyMakeBorder(sample.image, 0, 0, 0, 80, cv2.BORDER_REPLICATE)
            cv2.imwrite(str(folder / "images" / f"{split}-{i:03d}.jpg"), image)
            (folder / "labels" / f"{split}-{i:03d}.txt").write_text(
                pixel_label_text(sample.class_ids, sample.boxes, 240, 160))
    if layout == "data.yaml":
        spec = {"path": ".", "train": "train/images", "val": "valid/images", "test": "test/images",
                "names": list(SHAPES)}
        (root / "data.yaml").write_text(yaml.safe_dump(spec))
        return root / "data.yaml"
    (root / "classes.txt").write_text("\n".join(SHAPES) + "\n")
    return root


def sources(data, split):
    """The original names of a split's images (written as ``<draw index>-<name>``)."""
    return [p.stem.split("-", 1)[1] for p in data.images(split)]


def classes_in(data, split):
    return {int(c) for p in data.images(split) for c in read_labels(label_path(p))[:, 0]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("photos"), {"train": 40, "valid": 8, "test": 6})


def test_seeds_share_the_test_set_and_never_put_it_in_the_pool(dataset, tmp_path):
    config = YoloDatasetConfig(data=str(dataset), new_classes=NEW, image_size=96, val_images=4, val_new_images=1,
                               base_share=0.5, pool_share=0.8)
    source = YoloDataset(config, tmp_path / "cache")
    first, second = (source.write(seed, tmp_path / f"seed{seed}") for seed in (0, 1))
    assert first.new_classes == (2,) and first.class_names == SHAPES
    for data in (first, second):
        assert sorted(sources(data, "test")) == sorted([f"valid-{i:03d}" for i in range(8)]
                                                       + [f"test-{i:03d}" for i in range(6)])
        assert not set(sources(data, "pool")) & set(sources(data, "test"))
        assert not set(sources(data, "pool")) & (set(sources(data, "base")) | set(sources(data, "val")))
        assert 2 not in classes_in(data, "base")  # the base model never sees a triangle
        assert 2 in classes_in(data, "pool")
        counts = data.counts()
        assert counts["val"]["images"] == 4 and counts["base"]["new_boxes"] == 0
        assert counts["val"]["new_images"] == 1  # fine-tunes are validated on the new class too...
        base_yaml = yaml.safe_load(data.write_base_yaml().read_text())  # ...the base model on the rest only
        base_val = sorted((data.root / "base-known" / "val" / "images").iterdir())
        assert base_yaml["names"] == {0: "circle", 1: "square"} and len(base_val) == 3
        assert counts["pool"]["images"] == round(0.8 * (40 - 4 - counts["base"]["images"]))
    # one base split (and so one base model) for every seed; the pools differ
    assert sources(first, "base") == sources(second, "base") and first.base_digest() == second.base_digest()
    assert sorted(sources(first, "pool")) != sorted(sources(second, "pool"))
    own = YoloDataset(YoloDatasetConfig(data=str(dataset), new_classes=NEW, image_size=96, val_images=4,
                                        shared_base=False), tmp_path / "cache")
    assert sources(own.write(0, tmp_path / "own0"), "base") != sources(own.write(1, tmp_path / "own1"), "base")


def test_images_are_resized_once_keeping_their_labels_and_cached_by_content(dataset, tmp_path):
    config = YoloDatasetConfig(data=str(dataset), new_classes=NEW, image_size=96, val_images=4, pool_share=1.0)
    data = YoloDataset(config, tmp_path / "cache").write(0, tmp_path / "a")
    image = data.images("test")[0]
    assert cv2.imread(str(image)).shape[:2] == (64, 96)  # 240 x 160 -> 96 x 64
    original = dataset.parent / "test" / "labels" / f"{image.stem.split('-', 1)[1]}.txt"
    if not original.exists():
        original = dataset.parent / "valid" / "labels" / original.name
    assert label_path(image).read_text() == original.read_text()
    cached = sorted((tmp_path / "cache" / "images").glob("*.jpg"))
    assert len(cached) == 54
    stamps = [p.stat().st_mtime_ns for p in cached]
    YoloDataset(config, tmp_path / "cache").write(1, tmp_path / "b")
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "cache" / "images").glob("*.jpg"))] == stamps
    # a changed image is another entry; a renamed one is the same
    changed = dataset.parent / "train" / "images" / "train-000.jpg"
    original_bytes = changed.read_bytes()
    try:
        cv2.imwrite(str(changed), np.zeros((160, 240, 3), np.uint8))
        YoloDataset(config, tmp_path / "cache").write(0, tmp_path / "c")
        assert len(list((tmp_path / "cache" / "images").glob("*.jpg"))) == 55
    finally:
        changed.write_bytes(original_bytes)


def test_a_label_studio_export_gets_a_fixed_test_share(tmp_path):
    export = write_dataset(tmp_path / "export", {"all": 60}, layout="label-studio")
    config = YoloDatasetConfig(data=str(export), new_classes=("Triangle",), image_size=96, val_images=4,
                               test_share=0.25)
    first = YoloDataset(config, tmp_path / "cache").write(0, tmp_path / "s0")
    second = YoloDataset(config, tmp_path / "cache").write(3, tmp_path / "s3")
    assert sources(first, "test") == sources(second, "test") and 8 <= len(sources(first, "test")) <= 22
    assert not set(sources(first, "test")) & set(sources(first, "pool"))


@pytest.mark.parametrize("new, message", [
    (("hexagon",), "no class 'hexagon' in the data set; its classes are: circle, square"),
    ((), "name the new classes")])
def test_a_new_class_the_data_does_not_have_is_refused(dataset, tmp_path, new, message):
    with pytest.raises(ValueError, match=message):
        YoloDataset(YoloDatasetConfig(data=str(dataset), new_classes=new), tmp_path)


def test_the_protocol_runs_on_a_dataset_end_to_end_and_resumes_from_its_fine_tunes(dataset, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    command = ["--config", "dataset-smoke", "--data", str(dataset), "--new-classes", "triangle", "--out", str(out),
               "--cache", str(cache), "--box-budgets", "9"]
    assert main(command) == 0
    results = json.loads((out / "results.json").read_text())
    by_boxes = [r for r in results["runs"] if r["budget_unit"] == "boxes"]
    results["runs"] = [r for r in results["runs"] if r["budget_unit"] == "images"]
    assert sorted((r["strategy"], r["seed"]) for r in by_boxes) == [  # random-boxes has no box budget of its own
        ("ale-unknown-mean", 0), ("ale-unknown-mean", 1), ("random", 0), ("random", 1)]
    for run in by_boxes:  # an order's first images until they hold at least 9 boxes
        assert run["budget"] == 9 and run["boxes"] >= 9 and run["images"] >= 1
    assert results["new_classes"] == ["triangle"] and results["data"]["source"] == "YOLO dataset"
    assert results["protocol"].startswith("the selection plus every base image (the paper's protocol)")
    assert {b["base_model"] for b in results["baselines"]} == {results["baselines"][0]["base_model"]}  # shared
    assert len(list(cache.glob("base-*/base-weights.pt"))) == 1
    for baseline in results["baselines"]:
        assert baseline["splits"]["test"]["images"] == 14 and baseline["splits"]["base"]["new_boxes"] == 0
        assert set(baseline["ap50_95_per_class"]) <= set(SHAPES) and 0 <= baseline["val_map50_95"] <= 1
    by = {(r["strategy"], r["budget"], r["seed"]): r for r in results["runs"]}
    assert {s for s, _, _ in by} == {"random", "random-boxes", "ale-unknown-mean"}
    for (strategy, budget, seed), run in by.items():
        assert 0 <= run["new_ap50_95"] <= 1 and isinstance(run["promoted"], bool) and run["promotion"]
        if strategy == "random-boxes":  # random images until they hold the default's boxes, and no more
            assert run["boxes"] >= by[("ale-unknown-mean", budget, seed)]["boxes"]
        else:
            assert run["images"] == run["budget"]
    records = sorted((out / "finetunes").glob("*.json"))
    assert records and {json.loads(p.read_text())["result"]["map50_95"] for p in records} <= {
        r["map50_95"] for r in results["runs"]}
    report = (out / "report.md").read_text()
    assert "one base model shared by every seed" in report and "## Diagnosis" in report
    assert "## What labels buy" in report and "against `random-boxes`" in report and "## At equal effort" in report
    assert os.path.basename(str(dataset)) in report
    # a second run into the same folder trains nothing and gives the same results
    os.rename(out / "finetunes", tmp_path / "kept")
    shutil.rmtree(out)
    out.mkdir()
    os.rename(tmp_path / "kept", out / "finetunes")
    assert main(command) == 0
    assert not list((out / "work").glob("seed*/ft*"))  # nothing was fine-tuned
    resumed = json.loads((out / "results.json").read_text())
    assert [(r["strategy"], r["map50_95"]) for r in resumed["runs"] if r["budget_unit"] == "images"] == [
        (r["strategy"], r["map50_95"]) for r in results["runs"]]


def test_the_command_line_asks_for_what_a_dataset_run_needs(dataset, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--config", "dataset", "--out", str(tmp_path)])
    assert "needs --data and --new-classes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", "quick", "--data", str(dataset), "--new-classes", "triangle"])
    assert "generates its data" in capsys.readouterr().err
